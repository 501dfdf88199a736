"""The separate NVIDIA NeMo 2.5.0 virtual environment the interoperability tests run NeMo in.

Built with `tests/fixtures/nemo_toolkit/setup_nemo_venv.sh` (3.1 GB; about 35 s: the script installs
with uv, several minutes with pip) at most once per machine and recipe, then reused: it lives in the
project's cache directory (`$NEMO_ALIGNER_CACHE`, default `~/.cache/nemo_aligner`, as for
`scripts/build_tiny_base_model.py`) under a name holding the hash of the recipe files, or where `NEMO_VENV`
points. A `READY` file inside it, written after the setup script's own import check passed, marks a complete
build; a folder without it (a build cut short) is rebuilt. A lock file lets concurrent test runs share one build.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TOOLKIT = REPO / "tests" / "fixtures" / "nemo_toolkit"
RECIPE = ("setup_nemo_venv.sh", "nemo_venv_constraints.txt")
READY = "READY"
BUILD_TIMEOUT_S = 1800


def venv_dir() -> Path:
    if os.environ.get("NEMO_VENV"):
        return Path(os.environ["NEMO_VENV"])
    digest = hashlib.sha256(b"".join((TOOLKIT / name).read_bytes() for name in RECIPE)).hexdigest()[:12]
    cache = Path(os.environ.get("NEMO_ALIGNER_CACHE", Path.home() / ".cache" / "nemo_aligner"))
    return cache / f"nemo_venv-{digest}"


class NemoVenvBuild:
    """Makes sure the NeMo venv exists: starts its build in the background (the caller works meanwhile) unless a
    complete one is there; `wait()` joins the build and returns the venv's python."""

    def __init__(self, venv: Path | None = None) -> None:
        self.venv = venv or venv_dir()
        self.venv.parent.mkdir(parents=True, exist_ok=True)
        self.log = self.venv.parent / f"{self.venv.name}.build.log"
        self.process: subprocess.Popen | None = None
        # Held until the build is done: another test run waits here, then finds READY.
        self._lock = open(self.venv.parent / f"{self.venv.name}.lock", "w")  # noqa: SIM115
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        if (self.venv / READY).is_file():
            self._release()
            return
        shutil.rmtree(self.venv, ignore_errors=True)
        env = {**os.environ, "PYTHON": sys.executable, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
        env.pop("PYTHONPATH", None)
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(
                ["bash", str(TOOLKIT / "setup_nemo_venv.sh"), str(self.venv)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )

    def _release(self) -> None:
        fcntl.flock(self._lock, fcntl.LOCK_UN)
        self._lock.close()

    def wait(self) -> Path:
        """The venv's python once the build (if any) has finished; RuntimeError with the log's tail if it failed."""
        if self.process is not None:
            try:
                code = self.process.wait(timeout=BUILD_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                code = "timeout"
            self.process = None
            try:
                if code != 0:
                    tail = self.log.read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"building the NeMo venv failed ({code}); {self.log} ends with:\n{tail}")
                (self.venv / READY).write_text("setup_nemo_venv.sh finished and its import check passed\n")
            finally:
                self._release()
        return self.venv / "bin" / "python"


def run_nemo(venv_python: Path, script: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run `script` with NeMo's python, without this repository on the path (NeMo must not see our packages)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled")
    return subprocess.run(
        [str(venv_python), str(script), *args], env=env, capture_output=True, text=True, timeout=timeout
    )
