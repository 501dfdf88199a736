"""W&B in offline mode: the metric names and generation tables the user guides promise reach the run file.

The offline run's ``.wandb`` transaction log is read back with wandb's own reader (``wandb leet inspect --json``)
and compared with the CSV logger of the same run: every promised name is there, with the same values.
"""

from __future__ import annotations

import csv
import json
import subprocess

import pytest

from examples.nlp.gpt.train_gpt_dpo import main as dpo_main
from examples.nlp.gpt.train_gpt_spin import main as spin_main
from nemo_aligner.utils.config import compose_config
from tests.functional.dpo_runs import FAST_DPO, dpo_config
from tests.functional.sft_runs import SCRIPTS

WANDB = [
    "exp_manager.create_wandb_logger=true",
    "exp_manager.wandb_logger_kwargs.project=guide_check",
    "exp_manager.wandb_logger_kwargs.offline=true",
]
# docs/dpo.md "Metrics" (plus grad_norm and lr, logged for every algorithm).
DPO_METRICS = [
    "loss",
    "acc",
    "rewards_chosen_mean",
    "rewards_rejected_mean",
    "rewards_all_mean",
    "rewards_all_std",
    "preference_loss",
    "sft_loss",
]
# docs/spin.md "Metrics".
SPIN_TRAIN_METRICS = [
    "loss",
    "acc",
    "rewards_actual_mean",
    "rewards_generated_mean",
    "rewards_all_mean",
    "rewards_all_std",
    "avg_generated_lengths",
    "grad_norm",
    "lr",
    "rollout_identical_fraction",
    "rollout_unfinished_fraction",
    "rollout_generated_length_mean",
]


def wandb_history(log_dir) -> list[dict]:
    """The history rows of the run's offline ``.wandb`` file, through wandb's own transaction-log reader.

    The training run finished its wandb run itself (the last row is written then): no ``wandb.finish()`` here.
    """
    [run_file] = (log_dir / "wandb").glob("offline-run-*/run-*.wandb")
    result = subprocess.run(
        ["wandb", "leet", "inspect", "--json", str(run_file)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    return [r["history"]["item"] for r in records if r.get("type") == "history"]


def csv_values(log_dir, name: str) -> list[float]:
    with open(log_dir / "csv" / "metrics.csv", newline="") as file:
        return [float(row[name]) for row in csv.DictReader(file) if row.get(name)]


def logged(history: list[dict], name: str) -> list[float]:
    return [row[name] for row in history if name in row]


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))


@pytest.mark.slow
def test_dpo_metric_names_of_the_guide_are_in_the_offline_run(offline, tmp_path, tiny_sft_model):
    dpo_main(dpo_config(tmp_path, tiny_sft_model, *FAST_DPO, *WANDB, "exp_manager.wandb_logger_kwargs.name=dpo"))
    history = wandb_history(tmp_path)
    for name in [f"train/{m}" for m in [*DPO_METRICS, "grad_norm", "lr"]] + [f"val/{m}" for m in DPO_METRICS]:
        values = logged(history, name)
        assert values, f"{name} missing from the W&B run"
        assert values == pytest.approx(csv_values(tmp_path, name), rel=1e-12), name
    assert len(logged(history, "train/loss")) == 3


@pytest.mark.slow
def test_spin_metrics_and_generation_table_are_in_the_offline_run(offline, tmp_path, tiny_sft_model):
    cfg = compose_config(
        SCRIPTS / "conf",
        "gpt_spin_tiny",
        [
            f"exp_manager.explicit_log_dir={tmp_path}",
            f"pretrained_checkpoint.restore_from_path={tiny_sft_model}",
            "trainer.spin.max_iterations=1",
            "trainer.spin.limit_train_batches=2",
            "trainer.spin.val_check_interval=2",
            "trainer.spin.limit_val_batches=1",
            "model.global_batch_size=8",
            "model.micro_batch_size=8",
            "model.spin.rollout_micro_batch_size=16",
            *WANDB,
            "exp_manager.wandb_logger_kwargs.name=spin",
        ],
    )
    spin_main(cfg)
    history = wandb_history(tmp_path)
    for name in [f"train/{m}" for m in SPIN_TRAIN_METRICS] + ["val/loss"]:
        values = logged(history, name)
        assert values, f"{name} missing from the W&B run"
        assert values == pytest.approx(csv_values(tmp_path, name), rel=1e-12), name

    # wandb's reader flattens the nested table reference: "table/train_generations._type", ".path", ...
    [table_ref] = [
        {k.removeprefix("table/train_generations."): v for k, v in row.items()}
        for row in history
        if "table/train_generations._type" in row
    ]
    assert table_ref["_type"] == "table-file" and (table_ref["ncols"], table_ref["nrows"]) == (3, 4)
    [run_dir] = (tmp_path / "wandb").glob("offline-run-*")
    table = json.loads((run_dir / "files" / table_ref["path"]).read_text())
    assert table["columns"] == ["prompt", "generated", "ground_truth"]
    assert len(table["data"]) == 4 and all(isinstance(cell, str) for row in table["data"] for cell in row)
