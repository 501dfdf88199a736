"""The sbatch scripts in examples/nlp/gpt/slurm/: valid bash, and the command srun would start composes with the
script's Hydra config and validates (config only: no model, no process group beyond this one process)."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from nemo_aligner.utils.config import compose_config
from tests.conftest import NEMO_FIXTURES
from tests.cpu_fp32 import FP32
from tests.functional.sft_runs import REPO, SCRIPTS

SLURM = SCRIPTS / "slurm"
EMBEDDED = REPO / "nemo_aligner" / "data" / "embedded"
NODES, GPUS_PER_NODE = 4, 8
# script -> (entry script, config, training data, validation data, scale-down suffix for one CPU process)
SCRIPTS_UNDER_TEST = {
    "sft": (
        "train_gpt_sft.py",
        "gpt_sft",
        "chat_train.jsonl",
        "chat_validation.jsonl",
        ["trainer.sft.max_steps=2"],
    ),
    "dpo": (
        "train_gpt_dpo.py",
        "gpt_dpo",
        "dpo_train.jsonl",
        "dpo_validation.jsonl",
        ["model.global_batch_size=4", *FP32],
    ),
    "spin": (
        "train_gpt_spin.py",
        "gpt_spin",
        "chat_train.jsonl",
        "chat_validation.jsonl",
        ["model.global_batch_size=4", *FP32],
    ),
    "self_rewarding": (
        "train_gpt_self_rewarding.py",
        "gpt_self_rewarding",
        "chat_train.jsonl",
        "chat_validation.jsonl",
        ["model.global_batch_size=4", *FP32],
    ),
}
SCALE_DOWN = ["trainer.num_nodes=1", "trainer.devices=1", "exp_manager.create_wandb_logger=False"]


def run_sbatch_script(name: str, tmp_path: Path, **env: str) -> list[str]:
    """Run the script as sbatch would on the first node, with `srun` replaced by a stub; returns srun's argv."""
    entry, config, train, valid, _ = SCRIPTS_UNDER_TEST[name]
    stub_dir = tmp_path / "bin"
    stub_dir.mkdir()
    argv_file = tmp_path / "srun_argv"
    (stub_dir / "srun").write_text(f'#!/bin/bash\nprintf "%s\\0" "$@" > {argv_file}\n')
    (stub_dir / "srun").chmod(0o755)
    full_env = {
        "PATH": f"{stub_dir}:{os.environ['PATH']}",
        "SLURM_JOB_NUM_NODES": str(NODES),
        "SLURM_JOB_ID": "1234",
        "SLURM_SUBMIT_DIR": str(REPO),
        "CONTAINER": "/lustre/me/nemo_aligner.sqsh",
        "PRETRAINED_CHECKPOINT_NEMO_FILE": str(NEMO_FIXTURES / "tiny_gpt_rms_swiglu_rope_gqa.nemo"),
        "TRAIN_DATA_PATH": str(EMBEDDED / train),
        "VALID_DATA_PATH": str(EMBEDDED / valid),
        "RESULTS_DIR": str(tmp_path / "results"),
        **env,
    }
    subprocess.run(["bash", str(SLURM / f"{name}.sbatch")], env=full_env, check=True, timeout=60)
    return argv_file.read_bytes().decode().split("\0")[:-1]


def python_command(bash_command: str) -> list[str]:
    """The `python -u script overrides...` part of the `cmd1 && cmd2 && ...` string srun runs."""
    (python,) = [part for part in bash_command.split(" && ") if part.lstrip().startswith("python")]
    return shlex.split(python)


@pytest.mark.parametrize("name", list(SCRIPTS_UNDER_TEST))
def test_script_is_valid_bash(name):
    subprocess.run(["bash", "-n", str(SLURM / f"{name}.sbatch")], check=True)


@pytest.mark.parametrize("name", list(SCRIPTS_UNDER_TEST))
def test_srun_command_composes_with_the_config(name, tmp_path):
    entry, config, train, valid, suffix = SCRIPTS_UNDER_TEST[name]
    argv = run_sbatch_script(name, tmp_path)
    results = tmp_path / "results"
    assert results.is_dir()
    assert argv[:4] == ["-o", f"{results}/{name}-%j_%t.out", "-e", f"{results}/{name}-%j_%t.err"]
    assert argv[4] == "--container-image=/lustre/me/nemo_aligner.sqsh"
    mounts = argv[5].removeprefix("--container-mounts=").split(",")
    for path in (REPO, EMBEDDED / train, EMBEDDED / valid, results):
        assert f"{path}:{path}" in mounts
    assert argv[6:8] == ["bash", "-c"]
    command = argv[8]
    assert "export HYDRA_FULL_ERROR=1" in command
    nvte = ("export NVTE_ALLOW_NONDETERMINISTIC_ALGO=0", "export NVTE_MASKED_SOFTMAX_FUSION=0")
    assert all((flag in command) == (name == "self_rewarding") for flag in nvte)

    python, flag, script, *overrides = python_command(command)
    assert (python, flag, script) == ("python", "-u", str(SCRIPTS / entry))
    cfg = compose_config(SCRIPTS / "conf", config, overrides)
    assert (cfg.trainer.num_nodes, cfg.trainer.devices) == (NODES, GPUS_PER_NODE)
    assert cfg.exp_manager.explicit_log_dir == str(results)
    data = cfg.model.data
    if name == "dpo":
        assert list(data.data_prefix.train) == [str(EMBEDDED / train)]
        assert list(data.data_prefix.validation) == [str(EMBEDDED / valid)]
    else:
        assert (data.train_ds.file_path, data.validation_ds.file_path) == (str(EMBEDDED / train), str(EMBEDDED / valid))

    scaled = compose_config(SCRIPTS / "conf", config, overrides + SCALE_DOWN + suffix)
    assert (scaled.trainer.num_nodes, scaled.trainer.devices) == (1, 1)


@pytest.mark.parametrize("name", ["dpo", "spin", "self_rewarding"])
def test_srun_command_validates_at_its_scale(name, tmp_path):
    """The full-size command's config passes the run's validation for NODES x GPUS_PER_NODE processes."""
    from examples.nlp.gpt.train_gpt_self_rewarding import validate_self_rewarding_config
    from nemo_aligner.utils.train_script_utils import (
        model_config_for_training,
        validate_dpo_config,
        validate_spin_config,
    )

    validate = {"dpo": validate_dpo_config, "spin": validate_spin_config}.get(name, validate_self_rewarding_config)
    _, _, script, *overrides = python_command(run_sbatch_script(name, tmp_path, WANDB="False")[-1])
    cfg = compose_config(SCRIPTS / "conf", SCRIPTS_UNDER_TEST[name][1], overrides)
    OmegaConf.resolve(cfg)  # as resolve_and_create_trainer does first
    model_cfg = model_config_for_training(cfg, cfg.pretrained_checkpoint.restore_from_path)
    validate(cfg, model_cfg, NODES * GPUS_PER_NODE)


def test_extra_args_come_last_and_win(tmp_path):
    argv = run_sbatch_script("spin", tmp_path, EXTRA_ARGS="model.global_batch_size=8 trainer.spin.max_iterations=2")
    _, _, _, *overrides = python_command(argv[-1])
    cfg = compose_config(SCRIPTS / "conf", "gpt_spin", overrides)
    assert (cfg.model.global_batch_size, cfg.trainer.spin.max_iterations) == (8, 2)


def test_without_container_srun_runs_directly(tmp_path):
    argv = run_sbatch_script("dpo", tmp_path, CONTAINER="")
    assert not any(arg.startswith("--container") for arg in argv)
    assert argv[4:6] == ["bash", "-c"]


def test_missing_required_variable_stops_before_srun(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRAIN_DATA_PATH"}
    result = subprocess.run(
        ["bash", str(SLURM / "sft.sbatch")],
        env={
            **env,
            "PRETRAINED_CHECKPOINT_NEMO_FILE": "x.nemo",
            "VALID_DATA_PATH": "v.jsonl",
            "PATH": "/nonexistent:/usr/bin:/bin",
        },
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "set TRAIN_DATA_PATH to the training data" in result.stderr
