"""Does SPIN beat continued SFT on the embedded default? Held-out exact match of SFT, continued SFT and SPIN.

    python benchmarks/spin_study.py --out benchmarks/results/spin_study.json    # the full study
    python benchmarks/spin_study.py --quick                                     # a smoke run (< 1 min)

On 2 shared CPU cores the full study took 17 minutes, 12 of them training the four SFT start models (cached in
``--cache_dir`` and reused by later runs, which then take about 5 minutes).

Every number is greedy exact-match accuracy on the held-out ``chat_test.jsonl`` (300 prompts never seen in
training; the first 60 with ``--quick``), computed by :func:`nemo_aligner.evaluation.exact_match_accuracy`.

Start models: the tiny byte-level GPT trained from scratch with ``gpt_sft_tiny.yaml`` (``build_tiny_base_model``,
cached), once under-trained and once at its plateau. The plateau is found by training SFT runs of increasing
length (each its own full cosine schedule) and taking the best; the JSON reports every length, so one can check
that the longest runs no longer gain.

From each start:

* ``sft``: the start model itself.
* ``spin[setting]``: ``train_gpt_spin.py`` composed as ``--config-name gpt_spin_tiny`` plus the setting's overrides,
  three iterations in one run. Every iteration's end is checkpointed with its ``.nemo``
  (``always_save_nemo=true``), so iteration k is evaluated from the same run.
* ``sft_continued[setting]``: the control. ``train_gpt_sft.py`` restored from the same start for the same number of
  optimizer steps as SPIN takes (evaluated after each iteration's worth of steps), with the same optimizer, learning
  rate, constant schedule, global batch size and training file, so the only difference from SPIN is the loss:
  cross-entropy on the ground truth instead of the preference loss against the model's own generations.
  Continuing from the start model (rather than a longer SFT run from scratch) starts both arms from the same
  weights, and a constant learning rate makes the control's step-k checkpoint equal to a k-step run.

Per SPIN iteration the JSON also gives the rollout statistics the trainer logs (``rollout_identical_fraction``:
the share of generated answers equal to the ground truth, which carry no gradient). Everything is deterministic
(seeded) for a given number of torch threads (``--threads``, default 1; float reductions, and so the trained
weights, change with it). Runs go to ``--work_dir`` (a temporary directory by default); SFT start models are cached
in ``--cache_dir``.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "examples" / "nlp" / "gpt" / "conf"
NO_PERIODIC_SAVES = 10**9
"""``save_interval`` that leaves only the checkpoints at iteration ends (and the end of training)."""


@dataclass(frozen=True)
class SpinSetting:
    """A named set of Hydra overrides on top of ``gpt_spin_tiny.yaml``."""

    name: str
    description: str
    overrides: tuple[str, ...] = ()


SETTINGS = {
    setting.name: setting
    for setting in (
        SpinSetting("tiny", "gpt_spin_tiny.yaml as is: beta [1, 2, 5], AdamW lr 1e-4 constant, 10% of the prompts"),
        SpinSetting("beta_0.1", "the paper's beta 0.1 in every iteration", ("model.spin.ref_policy_kl_penalty=0.1",)),
        SpinSetting("lr_3e-5", "a third of the learning rate", ("model.optim.lr=3e-5",)),
        SpinSetting(
            "mix_previous",
            "iteration t also trains on iteration t-1's generations (the paper's recipe)",
            ("trainer.spin.mix_previous_generations=true",),
        ),
        SpinSetting("lr_3e-4", "three times the learning rate", ("model.optim.lr=3e-4",)),
        SpinSetting(
            "prompts_30pct",
            "30% of the prompts per iteration (3x the steps)",
            ("trainer.spin.limit_train_batches=0.3",),
        ),
        SpinSetting(
            "prompts_100pct",
            "every prompt once per iteration (10x the steps)",
            ("trainer.spin.limit_train_batches=1.0",),
        ),
    )
}


@dataclass(frozen=True)
class Plan:
    """What one invocation runs."""

    under_trained_steps: int
    plateau_candidates: tuple[int, ...]
    eval_samples: int | None
    under_trained_settings: tuple[str, ...]
    plateau_settings: tuple[str, ...]


FULL = Plan(
    under_trained_steps=300,
    plateau_candidates=(1000, 2000, 3000),
    eval_samples=None,
    under_trained_settings=("tiny", "prompts_30pct"),
    plateau_settings=("tiny", "beta_0.1", "lr_3e-5", "lr_3e-4", "mix_previous", "prompts_100pct"),
)
QUICK = Plan(
    under_trained_steps=150,
    plateau_candidates=(),
    eval_samples=60,
    under_trained_settings=("tiny",),
    plateau_settings=(),
)


class Study:
    """Runs the training scripts in-process and evaluates their ``.nemo`` files (each evaluated once)."""

    def __init__(self, plan: Plan, work_dir: Path, cache_dir: Path | None) -> None:
        sys.path.insert(0, str(REPO))
        from nemo_aligner.data.embedded import EMBEDDED_DIR
        from nemo_aligner.utils.config import compose_config, register_resolvers

        register_resolvers()
        self.plan = plan
        self.work_dir = work_dir
        self.cache_dir = cache_dir
        self.test_file = EMBEDDED_DIR / "chat_test.jsonl"
        self.data_cfg = compose_config(CONF_DIR, "gpt_spin_tiny", []).model.data
        self.evaluations: dict[Path, dict[str, Any]] = {}
        self.runs = 0
        self.seconds = {"sft_start_models": 0.0, "spin": 0.0, "sft_continued": 0.0, "evaluation": 0.0}

    def evaluate(self, nemo_path: Path) -> dict[str, Any]:
        """Held-out exact match of a ``.nemo`` file: ``{"accuracy", "num_samples", "per_task"}``."""
        if nemo_path not in self.evaluations:
            from nemo_aligner.evaluation import exact_match_accuracy
            from nemo_aligner.models.nlp.gpt.megatron_gpt_model import MegatronGPTModel

            start = time.monotonic()
            model = MegatronGPTModel.restore_from(nemo_path)
            self.evaluations[nemo_path] = exact_match_accuracy(
                model, str(self.test_file), self.data_cfg, max_samples=self.plan.eval_samples
            )
            self.seconds["evaluation"] += time.monotonic() - start
        return self.evaluations[nemo_path]

    def sft_start_model(self, steps: int) -> Path:
        """The SFT model trained from scratch for ``steps`` steps (cached)."""
        from scripts.build_tiny_base_model import build_tiny_base_model

        start = time.monotonic()
        path = build_tiny_base_model(steps, self.cache_dir)
        self.seconds["sft_start_models"] += time.monotonic() - start
        return path

    def _log_dir(self, label: str) -> Path:
        self.runs += 1
        return self.work_dir / f"{self.runs:02d}_{label}"

    def spin_config(self, start_model: Path, setting: SpinSetting, log_dir: Path) -> DictConfig:
        """``gpt_spin_tiny`` with the setting's overrides, saving a ``.nemo`` at every iteration's end only."""
        from nemo_aligner.utils.config import compose_config

        return compose_config(
            CONF_DIR,
            "gpt_spin_tiny",
            [
                f"pretrained_checkpoint.restore_from_path={start_model}",
                f"exp_manager.explicit_log_dir={log_dir}",
                "exp_manager.create_tensorboard_logger=false",
                "exp_manager.checkpoint_callback_params.always_save_nemo=true",
                "exp_manager.checkpoint_callback_params.save_top_k=-1",
                f"trainer.spin.save_interval={NO_PERIODIC_SAVES}",
                *setting.overrides,
            ],
        )

    def run_spin(self, start_model: Path, setting: SpinSetting) -> tuple[DictConfig, list[dict[str, Any]]]:
        """One SPIN run: its config, and per iteration the end step, ``.nemo`` and rollout statistics."""
        from examples.nlp.gpt.train_gpt_spin import main as spin_main

        log_dir = self._log_dir(f"spin_{setting.name}")
        cfg = self.spin_config(start_model, setting, log_dir)
        start = time.monotonic()
        spin_main(copy.deepcopy(cfg))
        self.seconds["spin"] += time.monotonic() - start
        rollouts = rollout_statistics(log_dir / "csv" / "metrics.csv")
        iterations = [
            {"iteration": k + 1, **checkpoint, **(rollouts[k] if k < len(rollouts) else {})}
            for k, checkpoint in enumerate(checkpoints_with_nemo(log_dir))
        ]
        return cfg, iterations

    def evaluated(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """``items`` with each ``"nemo"`` path replaced by that model's accuracy and per-task accuracies."""
        return [
            {**{k: v for k, v in item.items() if k != "nemo"}, **summary(self.evaluate(Path(item["nemo"])))}
            for item in items
        ]

    def run_sft_continued(self, start_model: Path, spin_cfg: DictConfig, steps: Sequence[int]) -> list[dict[str, Any]]:
        """Continued SFT from ``start_model`` with SPIN's optimizer and batch; a ``.nemo`` at each of ``steps``."""
        from examples.nlp.gpt.train_gpt_sft import main as sft_main
        from nemo_aligner.utils.config import compose_config

        interval = steps[0]
        if any(s % interval for s in steps):
            raise ValueError(f"checkpoint steps {list(steps)} are not multiples of the first")
        optim = spin_cfg.model.optim
        log_dir = self._log_dir("sft_continued")
        cfg = compose_config(
            CONF_DIR,
            "gpt_sft_tiny",
            [
                f"model.restore_from_path={start_model}",
                f"exp_manager.explicit_log_dir={log_dir}",
                "exp_manager.create_tensorboard_logger=false",
                "exp_manager.checkpoint_callback_params.always_save_nemo=true",
                "exp_manager.checkpoint_callback_params.save_top_k=-1",
                f"trainer.sft.max_steps={steps[-1]}",
                "trainer.sft.max_epochs=100",
                f"trainer.sft.val_check_interval={interval}",
                f"trainer.sft.save_interval={interval}",
                "trainer.sft.limit_val_batches=1",
                f"model.data.train_ds.global_batch_size={spin_cfg.model.global_batch_size}",
                f"model.data.train_ds.micro_batch_size={spin_cfg.model.micro_batch_size}",
                f"model.optim.name={optim.name}",
                f"model.optim.lr={optim.lr}",
                f"model.optim.weight_decay={optim.weight_decay}",
                f"model.optim.betas=[{optim.betas[0]},{optim.betas[1]}]",
                "model.optim.sched.name=Constant",
            ],
        )
        start = time.monotonic()
        sft_main(cfg)
        self.seconds["sft_continued"] += time.monotonic() - start
        return checkpoints_with_nemo(log_dir)

    def study_start(self, label: str, start_model: Path, sft_steps: int, settings: Sequence[str]) -> dict[str, Any]:
        """The start model, then per SPIN setting: SPIN iterations 1-3 and the step-matched continued SFT."""
        controls: dict[tuple, list[dict[str, Any]]] = {}
        result: dict[str, Any] = {"sft_steps": sft_steps, "sft": summary(self.evaluate(start_model)), "settings": {}}
        for name in settings:
            setting = SETTINGS[name]
            spin_cfg, iterations = self.run_spin(start_model, setting)
            steps = [item["step"] for item in iterations]
            optim = spin_cfg.model.optim
            key = (tuple(steps), optim.name, optim.lr, optim.weight_decay, spin_cfg.model.global_batch_size)
            if key not in controls:
                controls[key] = self.evaluated(self.run_sft_continued(start_model, spin_cfg, steps))
            result["settings"][name] = {
                "description": setting.description,
                "overrides": list(setting.overrides),
                "spin": self.evaluated(iterations),
                "sft_continued": controls[key],
            }
            print(f"[spin_study] {label} / {name}: done", file=sys.stderr, flush=True)
        return result


def checkpoints_with_nemo(log_dir: Path) -> list[dict[str, Any]]:
    """``{"step", "nemo"}`` of a run's trainer checkpoints (each holding a ``model.nemo``), in step order."""
    from nemo_aligner.checkpoint import trainer_checkpoint

    found = []
    for path in trainer_checkpoint.list_checkpoints(log_dir / "checkpoints"):
        nemo = path / "model.nemo"
        if nemo.exists():
            found.append({"step": int(trainer_checkpoint.read_trainer_state(path)["step"]), "nemo": str(nemo)})
    return found


def rollout_statistics(metrics_csv: Path) -> list[dict[str, float]]:
    """The ``train/rollout_*`` values the SPIN trainer logs once per iteration, in iteration order."""
    if not metrics_csv.is_file():
        return []
    with metrics_csv.open() as f:
        rows = list(csv.DictReader(f))
    stats = []
    for row in rows:
        values = {k.split("/")[-1]: float(v) for k, v in row.items() if "rollout_" in k and v not in ("", None)}
        if values:
            stats.append(values)
    return stats


def summary(evaluation: dict[str, Any]) -> dict[str, Any]:
    """Accuracy (rounded) and per-task accuracies of one evaluation."""
    return {
        "accuracy": round(evaluation["accuracy"], 4),
        "per_task": {task: round(v["accuracy"], 4) for task, v in evaluation["per_task"].items()},
    }


def pick_plateau(sweep: list[dict[str, Any]], tolerance: float) -> dict[str, Any]:
    """The best of the longer SFT runs, and whether the longest run gained less than ``tolerance`` over the one
    before (more epochs no longer help)."""
    best = max(sweep, key=lambda item: (item["accuracy"], -item["steps"]))
    last_gain = sweep[-1]["accuracy"] - sweep[-2]["accuracy"] if len(sweep) > 1 else None
    return {
        "steps": best["steps"],
        "accuracy": best["accuracy"],
        "last_gain": None if last_gain is None else round(last_gain, 4),
        "plateau_reached": last_gain is not None and last_gain < tolerance,
        "rule": f"best of the SFT lengths; a plateau when the longest run gains < {tolerance:.0%} over the previous",
    }


def table(starts: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Flat rows ``{start, condition, optimizer_steps, accuracy}`` for reading the results at a glance."""
    rows = []
    for label, start in starts.items():
        name = f"{label} (SFT {start['sft_steps']} steps)"
        rows.append({"start": name, "condition": "sft", "optimizer_steps": 0, "accuracy": start["sft"]["accuracy"]})
        for setting, arms in start["settings"].items():
            for item in arms["sft_continued"]:
                condition = f"sft_continued[{setting}] +{item['step']} steps"
                rows.append({"start": name, "condition": condition, "optimizer_steps": item["step"]})
                rows[-1]["accuracy"] = item["accuracy"]
            for item in arms["spin"]:
                condition = f"spin[{setting}] iteration {item['iteration']}"
                rows.append({"start": name, "condition": condition, "optimizer_steps": item["step"]})
                rows[-1]["accuracy"] = item["accuracy"]
    return rows


def run_study(plan: Plan, work_dir: Path, cache_dir: Path | None) -> dict[str, Any]:
    """The whole study; returns the JSON-ready results."""
    began = time.monotonic()
    study = Study(plan, work_dir, cache_dir)
    under_model = study.sft_start_model(plan.under_trained_steps)
    sweep = [{"steps": plan.under_trained_steps, **summary(study.evaluate(under_model))}]
    models = {plan.under_trained_steps: under_model}
    for steps in plan.plateau_candidates:
        models[steps] = study.sft_start_model(steps)
        sweep.append({"steps": steps, **summary(study.evaluate(models[steps]))})
    starts = {
        "under_trained": study.study_start(
            "under_trained", under_model, plan.under_trained_steps, plan.under_trained_settings
        )
    }
    plateau = None
    if plan.plateau_candidates:
        plateau = pick_plateau(sweep[1:], tolerance=0.02)
        starts["plateau"] = study.study_start(
            "plateau", models[plateau["steps"]], plateau["steps"], plan.plateau_settings
        )
    study.seconds["total"] = time.monotonic() - began
    return {
        "description": "held-out greedy exact match on chat_test.jsonl; see benchmarks/spin_study.py",
        "eval_file": "nemo_aligner/data/embedded/chat_test.jsonl",
        "eval_samples": plan.eval_samples or 300,
        "sft_sweep": sweep,
        "plateau": plateau,
        "table": table(starts),
        "starts": starts,
        "runtime_seconds": {k: round(v, 1) for k, v in study.seconds.items()},
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    parser.add_argument("--quick", action="store_true", help="a short smoke run (150-step start, 60 prompts)")
    parser.add_argument("--work_dir", type=Path, default=None, help="keep the runs here (default: a temp dir)")
    parser.add_argument("--cache_dir", type=Path, default=None, help="SFT start model cache (build_tiny_base_model)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids oversubscribing shared cores)")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="spin_study_"))
    try:
        results = run_study(QUICK if args.quick else FULL, work_dir, args.cache_dir)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work_dir, ignore_errors=True)
    results["quick"] = args.quick
    text = json.dumps(results, indent=2)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
