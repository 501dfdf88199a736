"""bf16 training writes and resumes its trainer checkpoints, with bf16 weights (megatron_amp_O2, as gpt_dpo.yaml) and
with fp32 weights under autocast (O2 off, as NeMo-Aligner's gpt_sft.yaml). The second used to fail at the first
save: megatron's float16 optimizer was built over fp32 weights and could not name their optimizer state
("Param id 0 does not match any model sharded param")."""

from __future__ import annotations

import pytest

from examples.nlp.gpt.train_gpt_sft import main as sft_main
from nemo_aligner.checkpoint.trainer_checkpoint import list_checkpoints, read_trainer_state
from tests.functional.sft_runs import sft_config

STEPS = [
    "trainer.precision=bf16",
    "trainer.sft.val_check_interval=2",
    "trainer.sft.save_interval=2",
    "trainer.sft.limit_val_batches=1",
    "model.data.train_ds.global_batch_size=4",
    "model.data.train_ds.micro_batch_size=2",
    "model.optim.sched.warmup_steps=1",
]


@pytest.mark.parametrize("o2", [False, True], ids=["fp32_weights_autocast", "bf16_weights_O2"])
def test_bf16_runs_save_and_resume_their_checkpoints(tmp_path, o2):
    overrides = [*STEPS, f"model.megatron_amp_O2={str(o2).lower()}"]
    sft_main(sft_config(tmp_path, *overrides, "trainer.sft.max_steps=2"))
    (first,) = list_checkpoints(tmp_path / "checkpoints")
    assert read_trainer_state(first)["step"] == 2

    sft_main(sft_config(tmp_path, *overrides, "trainer.sft.max_steps=4"))  # resumes from step 2
    states = [read_trainer_state(path) for path in list_checkpoints(tmp_path / "checkpoints")]
    assert [(s["step"], s["consumed_samples"]) for s in states] == [(2, 8), (4, 16)]
