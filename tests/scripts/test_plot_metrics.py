"""scripts/plot_metrics.py on a real DPO run's logs (CSV and TensorBoard) and on a hand-written Self-Rewarding log.

The plotted series are read back from ``plots.json`` (built from the drawn matplotlib lines) and compared with the
CSV file read independently here. TensorBoard stores float32, hence the 1e-6 relative tolerance there.
"""

from __future__ import annotations

import csv
import json
import shutil

import pytest

from examples.nlp.gpt.train_gpt_dpo import main as dpo_main
from scripts.plot_metrics import main as plot_main
from tests.functional.dpo_runs import FAST_DPO, dpo_config

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def csv_columns(path) -> dict[str, tuple[list[int], list[float]]]:
    """{column: (steps, values)} of the rows where the column has a value, in file order."""
    columns: dict[str, tuple[list[int], list[float]]] = {}
    with open(path, newline="") as file:
        for row in csv.DictReader(file):
            for name, value in row.items():
                if name != "step" and value:
                    steps, values = columns.setdefault(name, ([], []))
                    steps.append(int(row["step"]))
                    values.append(float(value))
    return columns


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory, tiny_sft_model):
    log_dir = tmp_path_factory.mktemp("dpo_run")
    dpo_main(dpo_config(log_dir, tiny_sft_model, *FAST_DPO, "trainer.dpo.val_check_interval=1"))
    return log_dir


def _check_pngs(out_dir, summary: dict) -> None:
    for name in [*(p["file"] for p in summary["panels"].values()), summary["overview"]]:
        data = (out_dir / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 1000, name


@pytest.mark.slow
def test_dpo_run_plots_the_csv_series(dpo_run, tmp_path):
    out = tmp_path / "plots"
    plot_main([str(dpo_run), "--out", str(out)])
    summary = json.loads((out / "plots.json").read_text())
    panels = summary["panels"]
    assert {"loss", "sft_loss", "accuracy", "rewards", "lr", "grad_norm"} <= set(panels)
    assert "judge_health" not in panels and "rollout" not in panels  # DPO logs neither
    assert set(panels["rewards"]["series"]) >= {"train/rewards_chosen_mean", "train/rewards_rejected_mean"}
    assert set(panels["loss"]["series"]) == {"train/loss", "val/loss", "train/preference_loss", "val/preference_loss"}
    assert set(panels["sft_loss"]["series"]) == {"train/sft_loss", "val/sft_loss"}
    _check_pngs(out, summary)

    columns = csv_columns(dpo_run / "csv" / "metrics.csv")
    drawn = {name: s for panel in panels.values() for name, s in panel["series"].items()}
    assert len(drawn) >= 12
    for name, series in drawn.items():
        steps, values = columns[name]
        assert series["step"] == steps == sorted(set(steps)), name
        assert series["value"] == values, name
    assert drawn["train/loss"]["step"] == [1, 2, 3]


@pytest.mark.slow
def test_tensorboard_logs_give_the_same_series(dpo_run, tmp_path):
    tb_only = tmp_path / "run"
    shutil.copytree(dpo_run / "tensorboard", tb_only / "tensorboard")
    plot_main([str(tb_only), "--metrics", "loss,train/acc"])
    summary = json.loads((tb_only / "plots" / "plots.json").read_text())
    assert list(summary["panels"]) == ["loss", "train_acc"]
    columns = csv_columns(dpo_run / "csv" / "metrics.csv")
    for panel in summary["panels"].values():
        for name, series in panel["series"].items():
            steps, values = columns[name]
            assert series["step"] == steps
            assert series["value"] == pytest.approx(values, rel=1e-6)
    assert set(summary["panels"]["loss"]["series"]) == {"train/loss", "val/loss"}


@pytest.mark.slow
def test_self_rewarding_log_gets_judge_panels_and_iteration_markers(tmp_path):
    # What a Self-Rewarding run's CSV logger writes: judge statistics once per iteration (steps 1 and 3), then steps.
    header = (
        "step,train/judge_unparseable_fraction,train/judge_score_hist_1,train/judge_score_hist_5,"
        "train/loss,train/chosen_lengths,train/reject_lengths,train/meta_pairs_per_GBS"
    )
    rows = ["1,0.25,0.5,0.25,,,,", "1,,,,0.69,7.0,9.0,1", "2,,,,0.60,6.0,9.5,0"]
    rows += ["3,0.0,0.1,0.9,,,,", "3,,,,0.55,5.0,9.0,2"]
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "metrics.csv").write_text("\n".join([header, *rows]) + "\n")
    plot_main([str(tmp_path)])
    summary = json.loads((tmp_path / "plots" / "plots.json").read_text())
    panels = summary["panels"]
    assert summary["iteration_markers"] == [1, 3]  # the steps where a rollout's judge statistics were logged
    assert set(panels) == {"loss", "lengths", "judge_health", "judge_score_histogram"}
    assert panels["judge_score_histogram"]["series"] == {
        "train/judge_score_hist_1": {"step": [1, 3], "value": [0.5, 0.1]},
        "train/judge_score_hist_5": {"step": [1, 3], "value": [0.25, 0.9]},
    }
    assert panels["judge_health"]["series"]["train/meta_pairs_per_GBS"] == {"step": [1, 2, 3], "value": [1, 0, 2]}
    assert panels["lengths"]["series"]["train/reject_lengths"]["value"] == [9.0, 9.5, 9.0]
    _check_pngs(tmp_path / "plots", summary)


def test_unknown_metric_and_missing_logs_are_errors(tmp_path):
    with pytest.raises(SystemExit, match="no csv/metrics.csv and no tensorboard"):
        plot_main([str(tmp_path)])
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "metrics.csv").write_text("step,train/loss\n1,0.5\n")
    with pytest.raises(SystemExit, match="--metrics acc: not logged by this run; logged: train/loss"):
        plot_main([str(tmp_path), "--metrics", "acc"])
