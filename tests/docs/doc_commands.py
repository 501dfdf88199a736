"""Reading and running the commands of the documentation (README.md and docs/*.md).

The convention (docs/README.md, "Every documented command is tested"): a ```bash block holds shell commands that
the doc-test runs; ```console and ```text blocks are never run. Each command of a block (lines joined at a trailing
backslash, split at ``&&`` and ``;``, comments dropped) is either

* **run**: ``python`` entry points and scripts, in-process (``runpy`` with ``sys.argv`` patched, so Hydra parses the
  documented command line exactly as a shell would pass it), with the script's scale-down suffix from the table in
  docs/README.md appended (later Hydra overrides win) and path placeholders substituted; ``export``; ``cd``;
  a few harmless file utilities (``mkdir``, ``ls``, ``head``, ...) in a subprocess;
* **checked, not run**: installs and environment set-up (``python -m venv``, ``. .venv/bin/activate``,
  ``pip install``: the torch pin must be CI's and extras must exist in setup.py), ``pytest`` (markers and paths
  must exist), ``docker`` (no docker here) and ``tensorboard`` (a server);
* anything else is an error that names the command: mark its block ```console, or teach this module the command.

Every command of a document runs in one workspace directory (so a later command can use an earlier one's
outputs, as a reader would), with a fresh directory for each ``/results``.
"""

from __future__ import annotations

import ast
import contextlib
import os
import re
import runpy
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
INDEX = REPO / "docs" / "README.md"
EMBEDDED = REPO / "nemo_aligner" / "data" / "embedded"

FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
SUFFIX_ROW = re.compile(r"^\| `([\w.]+\.py)` \| `([^`]*)` \|", re.MULTILINE)
PLACEHOLDER_ROW = re.compile(r"^\| `([^`]+)` \| ", re.MULTILINE)
SUFFIX_HEADING = "### Scale-down suffixes"
PLACEHOLDER_HEADING = "### Path placeholders"
VARIABLE = re.compile(r"\$\{(\w+)\}|\$(\w+)")
FILE_UTILITIES = frozenset({"mkdir", "ls", "head", "tail", "cat", "wc", "cp", "echo", "tar"})
PIP_FLAGS = frozenset({"-e", "--editable", "-q", "--quiet", "-U", "--upgrade", "--no-cache-dir"})
PYTEST_FLAGS = frozenset({"-q", "-x", "-s", "-v", "-ra", "--durations=20"})


def documents() -> list[Path]:
    """README.md and every docs/*.md: the files whose ```bash blocks are doc-tested."""
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def fenced_blocks(path: Path, language: str) -> list[str]:
    """The bodies of the fenced blocks of ``path`` opened with ```<language> (fences at the start of a line)."""
    return [m.group(2) for m in FENCE.finditer(path.read_text(encoding="utf-8")) if m.group(1) == language]


def split_commands(block: str) -> list[list[str]]:
    """A bash block's commands as argument lists: continuations joined, comments dropped, split at && and ;."""
    commands: list[list[str]] = []
    for line in block.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        current: list[str] = []
        for token in lexer:
            if token in ("&&", ";"):
                commands.append(current)
                current = []
            elif token in ("|", "||", ">", ">>", "<", "&"):
                raise ValueError(f"pipes, redirections and background jobs are not doc-tested: {line.strip()!r}")
            else:
                current.append(token)
        commands.append(current)
    return [command for command in commands if command]


def _section(heading: str) -> str:
    text = INDEX.read_text(encoding="utf-8")
    start = text.index(heading)
    end = text.find("\n#", start + len(heading))
    return text[start : end if end >= 0 else len(text)]


def scale_down_suffixes() -> dict[str, list[str]]:
    """Script file name -> the overrides the doc-test appends, read from docs/README.md's table."""
    return {name: shlex.split(suffix) for name, suffix in SUFFIX_ROW.findall(_section(SUFFIX_HEADING))}


def documented_placeholders() -> set[str]:
    """The path placeholders docs/README.md's table lists."""
    return set(PLACEHOLDER_ROW.findall(_section(PLACEHOLDER_HEADING))) - {"placeholder"}


def _setup_literal(name: str):
    tree = ast.parse((REPO / "setup.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise LookupError(f"setup.py defines no {name}")


def _requirement_name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ]", requirement, maxsplit=1)[0].lower()


def check_pip_install(args: list[str]) -> None:
    """``pip install`` arguments: known flags, the repository with extras setup.py has, CI's torch pin, or a
    package setup.py already depends on."""
    if not args or args[0] != "install":
        raise AssertionError(f"only 'pip install' is documented, got 'pip {' '.join(args)}'")
    extras = _setup_literal("EXTRAS")
    known = {_requirement_name(r) for r in _setup_literal("INSTALL_REQUIRES")} | {"pip"}
    known |= {_requirement_name(r) for group in extras.values() for r in group}
    torch_pin = re.search(r"torch==([\w.+]+)", (REPO / ".ci" / "run").read_text(encoding="utf-8")).group(1)
    for arg in args[1:]:
        if arg.startswith("-"):
            assert arg in PIP_FLAGS, f"pip flag {arg!r} is not one the docs use ({sorted(PIP_FLAGS)})"
        elif arg == "." or arg.startswith(".["):
            wanted = set(re.findall(r"[\w-]+", arg[1:]))
            assert wanted <= set(extras), f"pip install {arg}: setup.py has no extra {sorted(wanted - set(extras))}"
        elif arg.startswith("torch=="):
            assert arg == f"torch=={torch_pin}", f"{arg}: CI installs torch=={torch_pin}"
        else:
            assert _requirement_name(arg) in known, f"pip install {arg}: not a dependency in setup.py"


def check_pytest(args: list[str]) -> None:
    """``pytest`` arguments: known flags, ``-m`` over the markers pyproject.toml declares, existing test paths."""
    pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    markers = set(re.findall(r'^\s*"(\w+):', re.search(r"^markers = \[(.*?)^\]", pyproject, re.M | re.S)[1], re.M))
    it = iter(args)
    for arg in it:
        if arg == "-m":
            words = set(re.findall(r"\w+", next(it))) - {"and", "or", "not"}
            assert words <= markers, f"pytest -m: unknown markers {sorted(words - markers)} (pyproject: {markers})"
        elif arg == "-k":
            next(it)
        elif arg.startswith("-"):
            assert arg in PYTEST_FLAGS, f"pytest flag {arg!r} is not one the docs use ({sorted(PYTEST_FLAGS)})"
        else:
            assert (REPO / arg.split("::")[0]).exists(), f"pytest {arg}: no such test path"


@dataclass
class DocRunner:
    """Runs one document's commands in ``workspace``; ``placeholders`` map a placeholder and the script it is an
    argument of to a path (so the judge model can stand in for Self-Rewarding's starting model)."""

    workspace: Path
    placeholders: dict[str, Callable[[str], str]]
    suffixes: dict[str, list[str]]
    env: dict[str, str] = field(default_factory=dict)
    ran: list[str] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.cwd = self.workspace

    def expand(self, token: str) -> str:
        return VARIABLE.sub(lambda m: self.env.get(m.group(1) or m.group(2), os.environ.get(m[1] or m[2], "")), token)

    def substitute(self, token: str, script: str) -> str:
        for placeholder, value in self.placeholders.items():
            if placeholder == "/results":
                token = re.sub(r"(?<![\w./-])/results(?![\w.-])", lambda _: self.fresh_results(), token)
            elif placeholder in token:
                token = token.replace(placeholder, value(script))
        if "/path/to/" in token:
            raise AssertionError(f"{token!r}: a path placeholder docs/README.md does not list")
        return token

    def fresh_results(self) -> str:
        path = self.workspace / f"results_{len(self.ran)}"
        return str(path)

    def run(self, argv: list[str]) -> None:
        text = shlex.join(argv)
        head, args = argv[0], [self.expand(a) for a in argv[1:]]
        if head == "export":
            for assignment in args:
                name, _, value = assignment.partition("=")
                self.env[name] = value
            self.ran.append(text)
        elif head in ("python", "python3") and args[:2] == ["-m", "venv"] or head in (".", "source"):
            assert head not in (".", "source") or args[0].endswith("bin/activate"), f"{text}: not a venv activation"
            self.checked.append(text)
        elif head in ("python", "python3") and args[:2] == ["-m", "pip"]:
            check_pip_install(args[2:])
            self.checked.append(text)
        elif head in ("pip", "pip3"):
            check_pip_install(args)
            self.checked.append(text)
        elif head == "pytest":
            check_pytest(args)
            self.checked.append(text)
        elif head in ("docker", "tensorboard"):
            assert head != "docker" or args[0] in ("build", "run"), f"{text}: only docker build/run are documented"
            self.checked.append(text)
        elif head in ("python", "python3"):
            self.run_python([a for a in args if a != "-u"])
            self.ran.append(text)
        elif head == "cd":
            target = Path(self.substitute(args[0], ""))
            self.cwd = target if target.is_absolute() else self.cwd / target
            assert self.cwd.is_dir(), f"{text}: no such directory"
            self.ran.append(text)
        elif head in FILE_UTILITIES:
            command = [head, *(self.substitute(a, "") for a in args)]
            result = subprocess.run(command, cwd=self.cwd, capture_output=True, text=True, timeout=60)
            assert result.returncode == 0, f"{text} failed:\n{result.stderr}"
            self.ran.append(text)
        else:
            raise AssertionError(f"{text}: not a doc-testable command; mark its block ```console, or teach {__file__}")

    def run_python(self, args: list[str]) -> None:
        if args[0] == "-c":
            with self.context(["-c"]):
                exec(compile(args[1], "<documented python -c>", "exec"), {"__name__": "__main__"})
            return
        if args[0] == "-m":
            with self.context([args[1], *args[2:]]):
                runpy.run_module(args[1], run_name="__main__", alter_sys=True)
            return
        script = Path(self.substitute(args[0], ""))
        if not script.is_absolute() and not (self.cwd / script).exists():
            script = REPO / script  # the docs run scripts from the repository root; outputs go to the workspace
        name = script.name
        argv = [str(script), *(self.substitute(a, name) for a in args[1:]), *self.suffixes.get(name, [])]
        with self.context(argv):
            runpy.run_path(str(script), run_name="__main__")

    @contextlib.contextmanager
    def context(self, argv: list[str]) -> Iterator[None]:
        """sys.argv, the working directory and the exported variables of the document, restored afterwards;
        a non-zero SystemExit (Hydra's way to report an error) is a failure."""
        saved_argv, saved_cwd, saved_env = sys.argv, Path.cwd(), dict(os.environ)
        sys.argv = list(argv)
        os.chdir(self.cwd)
        os.environ.update({k: self.substitute(v, "") for k, v in self.env.items()})
        try:
            yield
        except SystemExit as exit_:
            if exit_.code not in (0, None):
                raise AssertionError(f"{' '.join(argv)} exited with {exit_.code}") from exit_
        finally:
            sys.argv = saved_argv
            os.chdir(saved_cwd)
            os.environ.clear()
            os.environ.update(saved_env)
