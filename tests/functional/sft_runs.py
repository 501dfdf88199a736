"""Helpers to run the SFT entry script on the embedded default, in-process or as a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from nemo_aligner.utils.config import compose_config

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "examples" / "nlp" / "gpt"

# A small, fast version of the embedded default (the architecture of gpt_sft_tiny.yaml, fewer steps).
FAST_SFT = [
    "trainer.sft.max_steps=8",
    "trainer.sft.val_check_interval=3",
    "trainer.sft.save_interval=3",
    "trainer.sft.limit_val_batches=2",
    "model.data.train_ds.global_batch_size=8",
    "model.data.train_ds.micro_batch_size=4",
    "model.optim.sched.warmup_steps=2",
]


def sft_config(log_dir: Path, *overrides: str):
    return compose_config(SCRIPTS / "conf", "gpt_sft_tiny", [f"exp_manager.explicit_log_dir={log_dir}", *overrides])


def run_sft_subprocess(log_dir: Path, *overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run train_gpt_sft.py as its own process (needed when the test kills it)."""
    cmd = [sys.executable, str(SCRIPTS / "train_gpt_sft.py"), "--config-name", "gpt_sft_tiny"]
    cmd += [f"exp_manager.explicit_log_dir={log_dir}", *overrides]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, env=full_env, cwd=REPO, capture_output=True, text=True, timeout=600)
