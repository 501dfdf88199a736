"""The separate NVIDIA NeMo 2.5.0 virtual environment the interoperability tests run NeMo in.

Built once with `tests/fixtures/nemo_toolkit/setup_nemo_venv.sh` (2-4 minutes, 3.1 GB) and reused by every later
run: by default at `<repo>/.cache/nemo_venv` (git-ignored), or where `NEMO_VENV` points. A file `READY` inside it,
written after the setup script's own import check passed, marks a complete build; a folder without it is a build
that was cut short and is rebuilt (only at the default place; elsewhere the test stops and says so).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TOOLKIT = REPO / "tests" / "fixtures" / "nemo_toolkit"
DEFAULT_VENV = REPO / ".cache" / "nemo_venv"
READY = "READY"
BUILD_TIMEOUT_S = 900


def venv_dir() -> Path:
    return Path(os.environ.get("NEMO_VENV") or DEFAULT_VENV)


def python(venv: Path) -> Path:
    return venv / "bin" / "python"


class NemoVenvBuild:
    """A build of the NeMo venv, started in the background so the caller can work meanwhile; `wait()` joins it.

    Nothing is started when a complete venv is already there.
    """

    def __init__(self, venv: Path | None = None) -> None:
        self.venv = venv or venv_dir()
        self.log = self.venv.parent / f"{self.venv.name}.build.log"
        self.process: subprocess.Popen | None = None
        if (self.venv / READY).is_file():
            return
        if self.venv.exists():
            if self.venv != DEFAULT_VENV:
                raise RuntimeError(f"NEMO_VENV={self.venv} exists but is not a complete NeMo venv (no {READY} file)")
            shutil.rmtree(self.venv)
        self.venv.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHON": sys.executable, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
        env.pop("PYTHONPATH", None)
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(
                ["bash", str(TOOLKIT / "setup_nemo_venv.sh"), str(self.venv)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )

    @property
    def built_now(self) -> bool:
        return self.process is not None

    def wait(self) -> Path:
        """The venv's python once the build (if any) has finished; RuntimeError with the log's tail if it failed."""
        if self.process is not None:
            try:
                code = self.process.wait(timeout=BUILD_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                code = "timeout"
            if code != 0:
                tail = self.log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"building the NeMo venv failed ({code}); {self.log} ends with:\n{tail}")
            (self.venv / READY).write_text("setup_nemo_venv.sh finished and its import check passed\n")
            self.process = None
        return python(self.venv)


def run_nemo(venv_python: Path, script: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run `script` with NeMo's python, without this repository on the path (NeMo must not see our packages)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled")
    return subprocess.run(
        [str(venv_python), str(script), *args], env=env, capture_output=True, text=True, timeout=timeout
    )
