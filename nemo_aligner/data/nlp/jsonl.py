"""Reading and validating jsonl data files before any model work.

A file is read whole and every line is checked up front, so a bad line fails the run in seconds with a message
naming the file, the 1-based line number and the key, instead of crashing hours later inside a worker. Problems are
collected (up to :data:`MAX_REPORTED_PROBLEMS`) and reported together, so one run shows what to fix.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAX_REPORTED_PROBLEMS = 20
_UTF8_BOM = b"\xef\xbb\xbf"


class DataError(ValueError):
    """A data file cannot be used; the message names the file, line and key and says what is wrong."""


@dataclass(frozen=True)
class JsonlRecord:
    """One non-blank line of a jsonl file: its 1-based line number and the parsed object."""

    line: int
    data: dict[str, Any]


class ProblemReport:
    """Collects problems found in one file and raises them as a single :class:`DataError`.

    Every problem is formatted ``<file>:<line>: '<key>': <message>``; the first ``MAX_REPORTED_PROBLEMS`` are
    listed, the rest only counted.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = str(path)
        self.problems: list[str] = []
        self.count = 0

    def add(self, line: int | None, key: str | None, message: str) -> None:
        """Record a problem at ``line`` (None: the whole file) concerning ``key`` (None: the whole line)."""
        self.count += 1
        if len(self.problems) < MAX_REPORTED_PROBLEMS:
            where = self.path if line is None else f"{self.path}:{line}"
            what = f"'{key}': " if key is not None else ""
            self.problems.append(f"{where}: {what}{message}")

    def raise_if_any(self) -> None:
        """Raise a :class:`DataError` listing the collected problems, if there are any."""
        if not self.count:
            return
        if self.count == 1:
            raise DataError(self.problems[0])
        shown = f" (first {len(self.problems)} shown)" if self.count > len(self.problems) else ""
        lines = "\n  ".join(self.problems)
        raise DataError(f"{self.count} problems in {self.path}{shown}:\n  {lines}")


def read_jsonl(path: str | os.PathLike[str], report: ProblemReport | None = None) -> list[JsonlRecord]:
    """Parse every line of ``path`` into a JSON object.

    Blank lines are skipped (their numbers still count). Undecodable UTF-8, malformed JSON and lines that are not
    objects are problems. With ``report`` given, problems are added to it and the good records returned, so the
    caller can go on validating them and raise everything at once; without it they are raised here. A missing
    file or a file without any record is always raised at once.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a directory, not a jsonl file" if path.is_dir() else "no such file"
        raise DataError(f"{path}: {what}")
    own_report = report is None
    report = ProblemReport(path) if report is None else report
    records: list[JsonlRecord] = []
    raw = path.read_bytes()
    if raw.startswith(_UTF8_BOM):
        raw = raw[len(_UTF8_BOM) :]
    for number, raw_line in enumerate(raw.split(b"\n"), start=1):
        try:
            text = raw_line.decode("utf-8")
        except UnicodeDecodeError as err:
            report.add(number, None, f"not valid UTF-8 (byte {err.start + 1} of the line); re-encode the file as UTF-8")
            continue
        if not text.strip():
            continue
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            report.add(number, None, f"malformed JSON: {err.msg} at column {err.colno}")
            continue
        if not isinstance(data, dict):
            report.add(number, None, f"expected a JSON object, got {_json_type(data)}")
            continue
        unencodable = _unencodable_strings(data)
        for key, position in unencodable:
            report.add(
                number,
                key,
                f"character {position + 1} is a lone surrogate (a \\ud800-\\udfff escape without its pair): no "
                "tokenizer can encode it; fix the escape or remove the character",
            )
        if not unencodable:
            records.append(JsonlRecord(number, data))
    if not records and not report.count:
        raise DataError(f"{path}: the file holds no samples (it is empty or only blank lines)")
    if own_report:
        report.raise_if_any()
    return records


def _unencodable_strings(value: Any, key: str = "") -> list[tuple[str, int]]:
    """(key path, character index) of each string that holds a lone UTF-16 surrogate (valid JSON, not valid text)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            return [(key or "(value)", err.start)]
        return []
    if isinstance(value, dict):
        return [found for k, v in value.items() for found in _unencodable_strings(v, f"{key}.{k}" if key else k)]
    if isinstance(value, list):
        return [found for i, v in enumerate(value) for found in _unencodable_strings(v, f"{key}[{i}]")]
    return []


def check_global_batch_fits(path: str | os.PathLike[str], num_samples: int, global_batch_size: int) -> None:
    """Raise when a file holds fewer samples than one global batch, so not a single optimizer step could run."""
    if num_samples < global_batch_size:
        raise DataError(
            f"{path}: {num_samples} samples, fewer than one global batch (global_batch_size={global_batch_size}); "
            "add samples or lower model.global_batch_size"
        )


def _json_type(value: Any) -> str:
    """JSON's name for the type of a parsed value, for error messages."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def type_problem(value: Any, expected: str) -> str:
    """The message for a value of the wrong JSON type."""
    return f"must be {expected}, got {_json_type(value)}"
