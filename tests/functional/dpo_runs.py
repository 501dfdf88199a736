"""Helpers to run DPO on the embedded default from the tiny SFT model."""

from __future__ import annotations

from pathlib import Path

from nemo_aligner.utils.config import compose_config
from tests.cpu_fp32 import FP32
from tests.functional.sft_runs import SCRIPTS

# Scaled to the tiny model: small batches, a constant LR suited to 0.5M parameters, adamw.
FAST_DPO = [
    "model.global_batch_size=8",
    "model.micro_batch_size=4",
    "trainer.dpo.max_steps=3",
    "trainer.dpo.val_check_interval=3",
    "trainer.dpo.save_interval=3",
    "trainer.dpo.limit_val_batches=2",
    "model.optim.name=adamw",
    "model.optim.lr=1e-4",
    "model.optim.sched.name=Constant",
]


def dpo_config(log_dir: Path, model_path: Path, *overrides: str):
    return compose_config(
        SCRIPTS / "conf",
        "gpt_dpo",
        [
            f"exp_manager.explicit_log_dir={log_dir}",
            f"pretrained_checkpoint.restore_from_path={model_path}",
            *FP32,
            *overrides,
        ],
    )
