"""One run per results directory: ``<log_dir>/run.lock`` names the run that owns the directory.

The lock is a small JSON file (host, PID, start time, command) created atomically by global rank 0 when the
experiment directory is set up, before anything else is written there, and removed when the run's ``main`` returns
or raises (and at interpreter exit). A second run on the same directory stops at once with
:class:`RunLockedError` naming the holder. A lock whose holder is gone (same host, and the PID is not running or is
a different process now: after SIGKILL, OOM or a node reboot) is stale and taken over, so kill-and-resume works
unchanged. A lock held from another host cannot be checked from here: the message says how to remove it.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

LOCK_FILE = "run.lock"
_held: list[Path] = []


class RunLockedError(RuntimeError):
    """Another run holds the results directory; the message names it (host, PID, start time)."""


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _start_ticks(pid: int) -> int | None:
    """The process's start time since boot (Linux ``/proc/<pid>/stat`` field 22): tells a reused PID apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def _identity() -> dict[str, Any]:
    pid = os.getpid()
    return {
        "host": socket.gethostname(),
        "pid": pid,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "boot_id": _boot_id(),
        "start_ticks": _start_ticks(pid),
        "command": " ".join(sys.argv),
    }


def _is_stale(holder: dict[str, Any]) -> bool:
    """True when the holder surely is gone; a holder on another host is never judged stale."""
    if holder.get("host") != socket.gethostname():
        return False
    if holder.get("boot_id") and holder.get("boot_id") != _boot_id():
        return True  # the machine rebooted since
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, another user's
    ticks = holder.get("start_ticks")
    return ticks is not None and _start_ticks(pid) != ticks  # the PID now belongs to another process


def _read(path: Path) -> dict[str, Any]:
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def acquire(log_dir: Path) -> Path:
    """Take ``<log_dir>/run.lock`` (rank 0 only); raises RunLockedError naming the holder when it is taken."""
    path = Path(log_dir) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read(path)
            if holder and not _is_stale(holder):
                raise RunLockedError(_held_message(path, holder)) from None
            _take_over(path, holder)
            continue
        with os.fdopen(fd, "w") as file:
            json.dump(_identity(), file)
        _held.append(path)
        return path
    raise RunLockedError(_held_message(path, _read(path)))


def _take_over(path: Path, judged: dict[str, Any]) -> None:
    """Remove a stale lock, unless another starter replaced it meanwhile (then it is put back)."""
    aside = path.with_name(f"{LOCK_FILE}.stale-{os.getpid()}")
    try:
        os.replace(path, aside)
    except FileNotFoundError:
        return
    if _read(aside) != judged:
        with contextlib.suppress(OSError):
            os.link(aside, path)
    aside.unlink(missing_ok=True)


def _held_message(path: Path, holder: dict[str, Any]) -> str:
    who = f"host {holder.get('host', '?')}, PID {holder.get('pid', '?')}, started {holder.get('started', '?')}"
    return (
        f"results directory {path.parent} is in use by another run ({who}; lock file {path}). Wait for that run "
        "to finish or give this one another exp_manager.explicit_log_dir; if that run is gone (a run on another "
        "host cannot be checked from here), delete the lock file."
    )


def release(path: Path) -> None:
    """Remove the lock if this process still holds it."""
    if path in _held:
        _held.remove(path)
        if _read(path).get("pid") == os.getpid():
            path.unlink(missing_ok=True)


@contextlib.contextmanager
def released_on_exit() -> Iterator[None]:
    """Release every lock taken inside the block when it ends (an entry script's ``main``, even when it raises)."""
    before = len(_held)
    try:
        yield
    finally:
        for path in _held[before:]:
            release(path)


@atexit.register
def _release_all() -> None:
    for path in list(_held):
        release(path)
