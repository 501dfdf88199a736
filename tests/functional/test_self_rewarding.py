"""Self-Rewarding / Meta-Rewarding end to end on the embedded default's tiny judge model: a 2-iteration run with the
meta-judge and length control, kill-and-resume, a judge that never parses, the user guide's command."""

from __future__ import annotations

import csv
import json
import os
import shlex
import signal
import subprocess
import sys

import pytest
import torch

from examples.nlp.gpt.train_gpt_self_rewarding import main as self_rewarding_main
from examples.nlp.gpt.train_gpt_self_rewarding import validate_self_rewarding_config
from nemo_aligner.checkpoint.nemo_file import open_nemo, read_torch_dist_tensors
from nemo_aligner.data.embedded import JUDGE_SCORE_HIGH, JUDGE_SCORE_LOW
from nemo_aligner.evaluation import rollout_judge_quality
from nemo_aligner.utils.config import compose_config
from nemo_aligner.utils.config_validation import ConfigError
from tests.functional.sft_runs import REPO, SCRIPTS

EMBEDDED = REPO / "nemo_aligner" / "data" / "embedded"


def run_subprocess(log_dir, model_path, *overrides, env=None):
    cmd = [
        sys.executable,
        str(SCRIPTS / "train_gpt_self_rewarding.py"),
        "--config-name",
        "gpt_self_rewarding_tiny",
        f"exp_manager.explicit_log_dir={log_dir}",
        f"pretrained_checkpoint.restore_from_path={model_path}",
        *overrides,
    ]
    return subprocess.run(
        cmd,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )


def final_weights(log_dir):
    with open_nemo(log_dir / "checkpoints" / "megatron_gpt_self_rewarding.nemo") as unpacked:
        return read_torch_dist_tensors(unpacked / "model_weights")


def train_metrics(log_dir) -> list[dict[str, float]]:
    """Rows of the CSV logger that hold a training step's metrics."""
    with (log_dir / "csv" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    return [
        {k: float(v) for k, v in row.items() if v not in ("", None)}
        for row in rows
        if row.get("train/bad_samples_per_GBS") not in ("", None)
    ]


def judge_quality(log_dir, iterations: int) -> list[dict[str, float]]:
    """Per iteration: how the judge's scores of the policy's responses match the exact answers."""
    rollouts = [
        torch.load(log_dir / "self_rewarding_rollouts" / f"iteration_{t}.pt", weights_only=True)
        for t in range(iterations)
    ]
    return [rollout_judge_quality(r["records"], JUDGE_SCORE_HIGH) for r in rollouts]


@pytest.mark.slow
def test_two_iterations_with_meta_judge_train_then_resume_after_a_kill_to_the_same_weights(tmp_path, tiny_judge_model):
    clean = run_subprocess(tmp_path / "clean", tiny_judge_model)
    assert clean.returncode == 0, clean.stderr[-3000:]
    rows = train_metrics(tmp_path / "clean")
    assert len(rows) == 6
    bad = sum(r["train/bad_samples_per_GBS"] for r in rows) / len(rows)
    meta = sum(r["train/meta_pairs_per_GBS"] for r in rows)
    quality = judge_quality(tmp_path / "clean", 2)
    print(f"bad_samples_per_GBS={bad:.3f} meta_pairs_trained={meta:.0f} judge_quality={quality}")
    for key in (
        "loss",
        "acc",
        "preference_loss",
        "sft_loss",
        "rewards_chosen_mean",
        "rewards_rejected_mean",
        "rewards_all_mean",
        "rewards_all_std",
        "grad_norm",
        "lr",
        "chosen_lengths",
        "reject_lengths",
        "chosen_generated_rewards",
        "rejected_generated_rewards",
        "bad_ends_per_GBS",
    ):
        assert f"train/{key}" in rows[0], key
    assert bad < 0.5 and meta >= 1
    # The held-out evaluation (on in the tiny config): the start and each iteration, with the model's own judge score.
    report = json.loads((tmp_path / "clean" / "evaluation.json").read_text())
    assert [e["label"] for e in report["evaluations"]] == ["start", "iteration 1", "iteration 2"]
    for entry in report["evaluations"]:
        assert entry["metrics"]["judge_unparseable_fraction"] < 1.0
        assert JUDGE_SCORE_LOW <= entry["metrics"]["judge_score"] <= JUDGE_SCORE_HIGH
    expected = final_weights(tmp_path / "clean")
    # Killed at iteration 2's first training step (its rollout is persisted), then resumed.
    killed = run_subprocess(tmp_path / "resumed", tiny_judge_model, env={"NEMO_ALIGNER_KILL_AT": "after_step:4"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = run_subprocess(tmp_path / "resumed", tiny_judge_model)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    actual = final_weights(tmp_path / "resumed")
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key


@pytest.mark.slow
def test_a_judge_that_never_parses_gives_only_bad_samples_and_no_update(tmp_path, tiny_judge_model):
    cfg = compose_config(
        SCRIPTS / "conf",
        "gpt_self_rewarding_tiny",
        [
            f"exp_manager.explicit_log_dir={tmp_path}",
            f"pretrained_checkpoint.restore_from_path={tiny_judge_model}",
            "trainer.self_rewarding.max_iterations=1",
            "trainer.self_rewarding.limit_train_batches=1",
            "trainer.self_rewarding.val_check_interval=1",
            "model.spin.length_control=0.0",
            "model.spin.judge_reward_regex='Never-a-score: {{ reward }}'",
        ],
    )
    self_rewarding_main(cfg)
    (row,) = train_metrics(tmp_path)
    assert row["train/bad_samples_per_GBS"] == 1.0 and row["train/meta_pairs_per_GBS"] == 0.0
    assert row["train/loss"] == 0.0 and row["train/grad_norm"] == 0.0


SELF_REWARDING_COMMAND = """python -u ${GPFS}/examples/nlp/gpt/train_gpt_self_rewarding.py \
   trainer.num_nodes=1 trainer.devices=8 \
   model.micro_batch_size=1 model.global_batch_size=64 \
   pretrained_checkpoint.restore_from_path=/path/to/megatron_gpt_sft.nemo \
   "model.data.train_ds.file_path=${TRAIN_DATA_PATH}" \
   "model.data.validation_ds.file_path=${VALID_DATA_PATH}" \
   exp_manager.create_wandb_logger=false \
   exp_manager.wandb_logger_kwargs.project=self_rewarding_training \
   exp_manager.wandb_logger_kwargs.name=self_rewarding_training \
   exp_manager.explicit_log_dir=/results \
   ++model.sequence_parallel=false ++model.apply_rope_fusion=false \
   trainer.self_rewarding.max_iterations=3 trainer.self_rewarding.max_epochs=1 \
   model.spin.ref_policy_kl_penalty=0.1 model.spin.use_meta_judge=false \
   model.spin.length_params.max_length=2048 \
   model.data.train_ds.max_seq_length=4096"""

SCALE_DOWN = [
    "trainer.devices=1",
    "model.global_batch_size=4",
    "trainer.self_rewarding.limit_train_batches=1",
    "trainer.self_rewarding.limit_val_batches=1",
    "model.spin.length_params.max_length=32",
    "model.spin.rollout_micro_batch_size=8",
]


def command_overrides(**paths):
    command = SELF_REWARDING_COMMAND
    for name, value in paths.items():
        command = command.replace("${" + name + "}", value)
    return shlex.split(command)[3:]


@pytest.mark.slow
def test_user_guide_command_runs_with_the_scale_down_suffix(tmp_path, tiny_judge_model):
    overrides = command_overrides(
        GPFS=str(REPO),
        TRAIN_DATA_PATH=str(EMBEDDED / "chat_train.jsonl"),
        VALID_DATA_PATH=str(EMBEDDED / "chat_validation.jsonl"),
    )
    overrides = [
        o.replace("/path/to/megatron_gpt_sft.nemo", str(tiny_judge_model)).replace("/results", str(tmp_path))
        for o in overrides
    ]
    self_rewarding_main(compose_config(SCRIPTS / "conf", "gpt_self_rewarding", overrides + SCALE_DOWN))
    assert (tmp_path / "checkpoints" / "megatron_gpt_self_rewarding.nemo").is_file()


def test_user_guide_command_composes_and_validates_without_the_suffix(tmp_path):
    overrides = command_overrides(
        GPFS="/repo", TRAIN_DATA_PATH=str(tmp_path / "t.jsonl"), VALID_DATA_PATH=str(tmp_path / "v.jsonl")
    )
    cfg = compose_config(SCRIPTS / "conf", "gpt_self_rewarding", overrides)
    assert cfg.trainer.devices == 8 and cfg.model.global_batch_size == 64
    assert cfg.trainer.self_rewarding.max_iterations == 3 and cfg.model.spin.use_meta_judge is False
    with pytest.raises(ConfigError) as info:  # placeholder paths: validation names them, nothing runs
        validate_self_rewarding_config(cfg, cfg.model, world_size=8)
    assert "restore_from_path" in str(info.value) and "t.jsonl" in str(info.value)


def test_trt_llm_enable_is_a_clear_start_up_error(tmp_path):
    train, valid = tmp_path / "t.jsonl", tmp_path / "v.jsonl"
    for path in (train, valid):
        path.write_text((EMBEDDED / "chat_validation.jsonl").read_text())
    cfg = compose_config(
        SCRIPTS / "conf",
        "gpt_self_rewarding",
        [
            f"model.data.train_ds.file_path={train}",
            f"model.data.validation_ds.file_path={valid}",
            "pretrained_checkpoint.restore_from_path=/nonexistent.nemo",
            "trainer.self_rewarding.trt_llm.enable=true",
            "model.spin.length_control=[0.0,0.1]",
        ],
    )
    with pytest.raises(ConfigError) as info:
        validate_self_rewarding_config(cfg, cfg.model, world_size=1)
    message = str(info.value)
    assert "trt_llm.enable" in message and "TensorRT-LLM is not installed" in message
    assert "length_control" in message and "max_iterations is 3" in message
