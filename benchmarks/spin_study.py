"""Does SPIN (or DPO) beat continued SFT on the embedded default? Held-out exact match of SFT, continued SFT, SPIN
and DPO.

    python benchmarks/spin_study.py --seeds 3 --out benchmarks/results/spin_study.json   # the multi-seed study
    python benchmarks/spin_study.py --seeds 2 --quick                                    # its smoke run
    python benchmarks/spin_study.py --out benchmarks/results/spin_study_single_seed.json  # the single-seed sweep
    python benchmarks/spin_study.py --quick                                              # its smoke run (< 1 min)

**The multi-seed study** (``--seeds N``; ``SEEDS_FULL``): one SFT start model at the plateau (2000 steps of
``gpt_sft_tiny``, the best length of the single-seed sweep below; seed 1234; cached). For each seed
``1234 + i`` (``model.seed``, which keys SPIN's sampling and every run's data order), each SPIN setting of
``SEEDS_FULL.spin_settings`` (three iterations) and its step-matched continued SFT (defined below), then DPO on the
bundled pairs ``dpo_train.jsonl`` in each setting of ``SEEDS_FULL.dpo_settings`` (``DPO_OVERRIDES``: docs/dpo.md's
embedded-default settings, checkpoints at 40, 80 and 120 steps) and its step-matched continued SFT on the chosen
responses: ``chat_train.jsonl`` holds the same
3000 prompts with the chosen responses as answers, so the control is SFT with DPO's optimizer, batch and steps on
that file. The seeds vary these runs, not the start model. Every checkpoint is scored on the 300 held-out prompts,
keeping per-prompt correctness. Per arm and checkpoint the JSON gives mean, sample standard deviation, min and max
over seeds (``table``), and per comparison and checkpoint (``comparisons``) two tests of "treatment = control":

* ``sign_flip_p``: exact paired permutation test over seeds (the 2^n sign flips of the per-seed accuracy
  differences). Honest about n = 3: its smallest possible p-value is 0.25.
* ``mcnemar``: exact two-sided McNemar test on per-prompt correctness pooled over prompts x seeds (900 pairs): the
  counts of pairs only the treatment got right (b) and only the control got right (c), and the binomial
  (b + c, 1/2) tail probability of a split at least as uneven (:func:`exact_mcnemar_p`). Pooling treats the three
  seeds' answers to one prompt as separate pairs; it tests the training recipe on these prompts, not on new tasks.

Decision rule, fixed before the run: a SPIN setting (or DPO) beats more SFT when at iteration 3 (DPO: step 120)
its McNemar p is below 0.05 / 8 (Bonferroni over the five SPIN and three DPO settings) with the treatment ahead, and
every seed's difference is positive. Other checkpoints' p-values are reported, not used to decide.

The JSON is rewritten after every run (a run cut short keeps its finished seeds). On 2 CPU cores shared with
other work (``--threads 1``) the 3-seed study took 18 minutes (``runtime_seconds``), plus 6 minutes to train the
2000-step start model once.

**The single-seed sweep** (no ``--seeds``): on 2 shared CPU cores it took 17 minutes, 12 of them training the four
SFT start models (cached in ``--cache_dir`` and reused by later runs, which then take about 5 minutes).

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
import itertools
import json
import math
import shutil
import statistics
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
        SpinSetting(
            "lr_3e-5_prompts_100pct",
            "every prompt once per iteration (10x the steps) at a third of the learning rate",
            ("trainer.spin.limit_train_batches=1.0", "model.optim.lr=3e-5"),
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


DPO_OVERRIDES = (
    "trainer.precision=32",
    "model.megatron_amp_O2=false",
    "model.global_batch_size=8",
    "model.micro_batch_size=4",
    "trainer.dpo.limit_val_batches=1",
    "model.optim.name=adamw",
    "model.optim.lr=1e-4",
    "model.optim.sched.name=Constant",
)
"""DPO as docs/dpo.md ran it on the embedded default when the study was made (fp32, batch 8, AdamW 1e-4 constant,
gpt_dpo.yaml's beta 0.2 and weight decay 0.1; the guide now uses the ``lr_3e-5`` setting, which tied with SFT), on
the bundled pairs ``dpo_train.jsonl``; a ``DPO_SETTINGS`` entry's overrides go on top."""

DPO_SETTINGS = {
    setting.name: setting
    for setting in (
        SpinSetting("docs", "docs/dpo.md's embedded-default settings (DPO_OVERRIDES): AdamW 1e-4, beta 0.2"),
        SpinSetting("lr_3e-5", "a third of the learning rate", ("model.optim.lr=3e-5",)),
        SpinSetting(
            "sft_term", "the preference loss plus the SFT loss on the chosen response", ("model.dpo.sft_loss_weight=1",)
        ),
    )
}

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
        self.seconds = {"sft_start_models": 0.0, "spin": 0.0, "dpo": 0.0, "sft_continued": 0.0, "evaluation": 0.0}

    def evaluate(self, nemo_path: Path) -> dict[str, Any]:
        """Held-out exact match of a ``.nemo`` file: ``{"accuracy", "num_samples", "per_task", "correct"}``."""
        if nemo_path not in self.evaluations:
            from nemo_aligner.evaluation import exact_match_accuracy
            from nemo_aligner.models.nlp.gpt.megatron_gpt_model import MegatronGPTModel
            from nemo_aligner.utils.distributed import initialize_distributed

            start = time.monotonic()
            initialize_distributed()  # a cached start model is scored before any run has set up parallel state
            model = MegatronGPTModel.restore_from(nemo_path)
            self.evaluations[nemo_path] = exact_match_accuracy(
                model, str(self.test_file), self.data_cfg, per_sample=True, max_samples=self.plan.eval_samples
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

    def spin_config(self, start_model: Path, setting: SpinSetting, log_dir: Path, seed: int | None) -> DictConfig:
        """``gpt_spin_tiny`` with the setting's overrides, saving a ``.nemo`` at every iteration's end only."""
        from nemo_aligner.utils.config import compose_config

        return compose_config(
            CONF_DIR,
            "gpt_spin_tiny",
            [
                f"pretrained_checkpoint.restore_from_path={start_model}",
                *run_overrides(log_dir, "spin", seed),
                f"trainer.spin.save_interval={NO_PERIODIC_SAVES}",
                *setting.overrides,
            ],
        )

    def run_spin(
        self, start_model: Path, setting: SpinSetting, seed: int | None = None
    ) -> tuple[DictConfig, list[dict[str, Any]]]:
        """One SPIN run: its config, and per iteration the end step, ``.nemo`` and rollout statistics."""
        from examples.nlp.gpt.train_gpt_spin import main as spin_main

        log_dir = self._log_dir(f"spin_{setting.name}" + seed_suffix(seed))
        cfg = self.spin_config(start_model, setting, log_dir, seed)
        start = time.monotonic()
        spin_main(copy.deepcopy(cfg))
        self.seconds["spin"] += time.monotonic() - start
        rollouts = rollout_statistics(log_dir / "csv" / "metrics.csv")
        iterations = [
            {"iteration": k + 1, **checkpoint, **(rollouts[k] if k < len(rollouts) else {})}
            for k, checkpoint in enumerate(checkpoints_with_nemo(log_dir))
        ]
        return cfg, iterations

    def evaluated(self, items: list[dict[str, Any]], per_sample: bool = False) -> list[dict[str, Any]]:
        """``items`` with each ``"nemo"`` path replaced by that model's accuracy and per-task accuracies (and, with
        ``per_sample``, per-prompt correctness)."""
        return [
            {
                **{k: v for k, v in item.items() if k != "nemo"},
                **summary(self.evaluate(Path(item["nemo"])), per_sample),
            }
            for item in items
        ]

    def run_dpo(
        self, start_model: Path, setting: SpinSetting, checkpoint_steps: Sequence[int], seed: int
    ) -> tuple[DictConfig, list]:
        """One DPO run on the embedded pairs (``DPO_OVERRIDES`` and the setting's): its config and ``{"step",
        "nemo"}`` at each of ``checkpoint_steps`` (equally spaced)."""
        from examples.nlp.gpt.train_gpt_dpo import main as dpo_main
        from nemo_aligner.utils.config import compose_config

        log_dir = self._log_dir(f"dpo_{setting.name}" + seed_suffix(seed))
        interval = checkpoint_steps[0]
        cfg = compose_config(
            CONF_DIR,
            "gpt_dpo",
            [
                f"pretrained_checkpoint.restore_from_path={start_model}",
                *run_overrides(log_dir, "dpo", seed),
                *DPO_OVERRIDES,
                *setting.overrides,
                f"trainer.dpo.max_steps={checkpoint_steps[-1]}",
                f"trainer.dpo.val_check_interval={interval}",
                f"trainer.dpo.save_interval={interval}",
            ],
        )
        start = time.monotonic()
        dpo_main(copy.deepcopy(cfg))
        self.seconds["dpo"] += time.monotonic() - start
        return cfg, checkpoints_with_nemo(log_dir)

    def run_sft_continued(
        self, start_model: Path, arm_cfg: DictConfig, steps: Sequence[int], seed: int | None = None
    ) -> list[dict[str, Any]]:
        """Continued SFT from ``start_model`` with the optimizer and batch of ``arm_cfg`` (a SPIN or DPO run's
        config) on ``chat_train.jsonl`` (SPIN's prompts and answers; DPO's prompts and chosen responses); a
        ``.nemo`` at each of ``steps``."""
        from examples.nlp.gpt.train_gpt_sft import main as sft_main
        from nemo_aligner.utils.config import compose_config

        interval = steps[0]
        if any(s % interval for s in steps):
            raise ValueError(f"checkpoint steps {list(steps)} are not multiples of the first")
        optim = arm_cfg.model.optim
        log_dir = self._log_dir("sft_continued" + seed_suffix(seed))
        cfg = compose_config(
            CONF_DIR,
            "gpt_sft_tiny",
            [
                f"model.restore_from_path={start_model}",
                *run_overrides(log_dir, "sft", seed),
                f"trainer.sft.max_steps={steps[-1]}",
                "trainer.sft.max_epochs=100",
                f"trainer.sft.val_check_interval={interval}",
                f"trainer.sft.save_interval={interval}",
                "trainer.sft.limit_val_batches=1",
                f"model.data.train_ds.global_batch_size={arm_cfg.model.global_batch_size}",
                f"model.data.train_ds.micro_batch_size={arm_cfg.model.micro_batch_size}",
                f"model.optim.name={optim.name}",
                f"model.optim.lr={optim.lr}",
                f"model.optim.weight_decay={optim.weight_decay}",
                f"model.optim.betas=[{optim.betas[0]},{optim.betas[1]}]",
                "model.optim.sched.name=Constant",
                "model.optim.sched.min_lr=0",  # gpt_sft_tiny's cosine floor, unused by Constant and above its lr
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


def run_overrides(log_dir: Path, loop: str, seed: int | None) -> list[str]:
    """Overrides every study run shares: its log dir, a ``.nemo`` kept at every checkpoint, no in-run held-out
    evaluation (the study scores the checkpoints itself, on the test split), and ``model.seed`` when given."""
    return [
        f"exp_manager.explicit_log_dir={log_dir}",
        "exp_manager.create_tensorboard_logger=false",
        "exp_manager.checkpoint_callback_params.always_save_nemo=true",
        "exp_manager.checkpoint_callback_params.save_top_k=-1",
        f"trainer.{loop}.evaluation.enabled=false",
        *([] if seed is None else [f"model.seed={seed}"]),
    ]


def seed_suffix(seed: int | None) -> str:
    return "" if seed is None else f"_seed{seed}"


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
        values = {  # not train/timers/rollout_s, the rollout's time
            k.split("/")[-1]: float(v) for k, v in row.items() if k.startswith("train/rollout_") and v not in ("", None)
        }
        if values:
            stats.append(values)
    return stats


def summary(evaluation: dict[str, Any], per_sample: bool = False) -> dict[str, Any]:
    """Accuracy (rounded) and per-task accuracies of one evaluation; with ``per_sample`` also ``"correct"``, the
    per-prompt correctness as a string of 0/1 in file order."""
    result = {
        "accuracy": round(evaluation["accuracy"], 4),
        "per_task": {task: round(v["accuracy"], 4) for task, v in evaluation["per_task"].items()},
    }
    if per_sample:
        result["correct"] = "".join("1" if hit else "0" for hit in evaluation["correct"])
    return result


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


# ---------------------------------------------------------------------------------------- the multi-seed study
@dataclass(frozen=True)
class SeedPlan:
    """What a ``--seeds`` invocation runs: one start model, per seed every SPIN setting, DPO, and their controls."""

    start_steps: int
    eval_samples: int | None
    spin_settings: tuple[str, ...]
    dpo_settings: tuple[str, ...]
    dpo_checkpoint_steps: tuple[int, ...]


SEEDS_FULL = SeedPlan(
    start_steps=2000,
    eval_samples=None,
    spin_settings=("tiny", "lr_3e-5", "mix_previous", "prompts_30pct", "lr_3e-5_prompts_100pct"),
    dpo_settings=("docs", "lr_3e-5", "sft_term"),
    dpo_checkpoint_steps=(40, 80, 120),
)
"""The plateau (2000 steps: the best SFT length of the single-seed sweep, longer runs lost accuracy); the default
SPIN settings, the one closest to its control in the single-seed sweep (lr 3e-5), the paper's recipe (iteration
t-1's generations mixed in), three times the SPIN prompts per iteration, and every prompt once per iteration at
lr 3e-5; DPO as documented, at lr 3e-5, and with an SFT term."""
SEEDS_QUICK = SeedPlan(
    start_steps=150, eval_samples=60, spin_settings=("tiny",), dpo_settings=("docs",), dpo_checkpoint_steps=(2, 4)
)
FIRST_SEED = 1234
"""Seed i of ``--seeds N`` is ``FIRST_SEED + i`` (``model.seed``; the configs' default is the first)."""


def exact_mcnemar_p(treatment_only: int, control_only: int) -> float:
    """Two-sided exact McNemar test (a sign test on the discordant pairs): the probability, if either model is as
    likely as the other to be the one right on a prompt where they disagree, of a split at least as uneven as
    ``treatment_only`` : ``control_only``. Binomial(n = both, 1/2), both tails, capped at 1 (McNemar 1947)."""
    n = treatment_only + control_only
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(treatment_only, control_only) + 1))
    return min(1.0, 2 * tail / 2**n)


def spread(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample standard deviation (0 for one value), min and max, rounded to 4 places."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    stats = (("mean", statistics.fmean(values)), ("std", std), ("min", min(values)), ("max", max(values)))
    return {k: round(v, 4) for k, v in stats}


def sign_flip_p(differences: Sequence[float]) -> float:
    """Two-sided exact paired permutation test over seeds: the share of the 2^n sign assignments of the per-seed
    differences whose mean is at least as far from 0 as the observed one. With 3 seeds the smallest possible value
    is 2/8 = 0.25, so it can never be significant at 5%: the pooled McNemar test is the one with power."""
    observed = abs(sum(differences))
    sums = [
        abs(sum(d if keep else -d for d, keep in zip(differences, signs)))
        for signs in itertools.product((True, False), repeat=len(differences))
    ]
    return sum(total >= observed - 1e-12 for total in sums) / len(sums)


def compare(treatment: dict[int, list[dict]], control: dict[int, list[dict]]) -> list[dict[str, Any]]:
    """Per checkpoint k (iteration k for SPIN): both arms' accuracy over the seeds both ran, the paired permutation
    test over seeds, and the exact McNemar test over every (prompt, seed) pair."""
    seeds = sorted(set(treatment) & set(control))
    rows = []
    for k in range(min((len(treatment[s]) for s in seeds), default=0)):
        t = [treatment[s][k] for s in seeds]
        c = [control[s][k] for s in seeds]
        pairs = [(a, b) for ti, ci in zip(t, c) for a, b in zip(ti["correct"], ci["correct"])]
        treatment_only = sum(a == "1" and b == "0" for a, b in pairs)
        control_only = sum(a == "0" and b == "1" for a, b in pairs)
        differences = [ti["accuracy"] - ci["accuracy"] for ti, ci in zip(t, c)]
        rows.append(
            {
                "checkpoint": k + 1,
                "steps": [ti["step"] for ti in t],
                "seeds": seeds,
                "treatment": spread([ti["accuracy"] for ti in t]),
                "control": spread([ci["accuracy"] for ci in c]),
                "difference": spread(differences),
                "sign_flip_p": round(sign_flip_p(differences), 4),
                "mcnemar": {
                    "pairs": len(pairs),
                    "treatment_only_correct": treatment_only,
                    "control_only_correct": control_only,
                    "p": float(f"{exact_mcnemar_p(treatment_only, control_only):.3g}"),
                },
            }
        )
    return rows


def seed_table(arms: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows ``{arm, checkpoint, steps, seeds, mean, std, min, max}`` of accuracy over seeds, for reading at a glance."""
    rows = []
    for arm, data in arms.items():
        runs = list(data["runs"].values())
        for k in range(min(len(run) for run in runs)):
            items = [run[k] for run in runs]
            rows.append(
                {
                    "arm": arm,
                    "checkpoint": k + 1,
                    "steps": sorted({item["step"] for item in items}),
                    "seeds": len(items),
                    **spread([item["accuracy"] for item in items]),
                }
            )
    return rows


def seed_report(
    plan: SeedPlan, start: dict[str, Any], arms: dict[str, dict[str, Any]], pairs: dict[str, tuple[str, str]]
) -> dict[str, Any]:
    """The JSON of the multi-seed study from what has run so far (written after every run)."""
    return {
        "description": "held-out greedy exact match on chat_test.jsonl, several seeds; see benchmarks/spin_study.py",
        "design": (
            f"one SFT start model ({plan.start_steps} steps of gpt_sft_tiny, seed {FIRST_SEED}); the seeds vary the "
            "SPIN/DPO runs and their step-matched continued-SFT controls (model.seed: SPIN's sampling and every "
            "run's data order), not the start model"
        ),
        "eval_file": "nemo_aligner/data/embedded/chat_test.jsonl",
        "eval_samples": plan.eval_samples or 300,
        "tests": (
            "sign_flip_p: two-sided exact paired permutation test of the per-seed accuracy differences (n = seeds, "
            "smallest possible p with 3 seeds: 0.25); mcnemar: "
            "two-sided exact McNemar test on per-prompt correctness pooled over prompts x seeds"
        ),
        "start": start,
        "table": seed_table(arms),
        "comparisons": {
            name: {
                "treatment": treatment,
                "control": control,
                "checkpoints": compare(arms[treatment]["runs"], arms[control]["runs"]),
            }
            for name, (treatment, control) in pairs.items()
            if treatment in arms and control in arms
        },
        "arms": arms,
    }


def run_seed_study(plan: SeedPlan, seeds: Sequence[int], work_dir: Path, cache_dir: Path | None, out: Path | None):
    """SPIN settings and DPO against their step-matched continued SFT, each seed in turn; the JSON is rewritten
    to ``out`` after every run, so a run cut short still leaves its finished seeds."""
    began = time.monotonic()
    study = Study(plan, work_dir, cache_dir)
    start_model = study.sft_start_model(plan.start_steps)
    start = {"sft_steps": plan.start_steps, **summary(study.evaluate(start_model), per_sample=True)}
    arms: dict[str, dict[str, Any]] = {}
    pairs: dict[str, tuple[str, str]] = {}

    def record(arm: str, description: str, seed: int, checkpoints: list[dict[str, Any]]) -> dict[str, Any]:
        arms.setdefault(arm, {"description": description, "runs": {}})["runs"][seed] = study.evaluated(
            checkpoints, per_sample=True
        )
        report = seed_report(plan, start, arms, pairs)
        report["runtime_seconds"] = {k: round(v, 1) for k, v in study.seconds.items()}
        report["runtime_seconds"]["total"] = round(time.monotonic() - began, 1)
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"[spin_study] seed {seed} / {arm}: done ({time.monotonic() - began:.0f} s)", file=sys.stderr, flush=True)
        return report

    controls: dict[tuple, list[dict[str, Any]]] = {}

    def control_run(arm_cfg: DictConfig, steps: list[int], seed: int) -> list[dict[str, Any]]:
        """The step-matched continued SFT of a run; arms that differ only in their loss or data share one."""
        optim = arm_cfg.model.optim
        key = (tuple(steps), optim.name, optim.lr, optim.weight_decay, arm_cfg.model.global_batch_size, seed)
        if key not in controls:
            controls[key] = study.run_sft_continued(start_model, arm_cfg, steps, seed)
        return controls[key]

    report = None
    for seed in seeds:
        for name in plan.spin_settings:
            setting = SETTINGS[name]
            spin, control = f"spin[{name}]", f"sft_continued[{name}]"
            pairs[f"spin[{name}] vs step-matched SFT"] = (spin, control)
            spin_cfg, iterations = study.run_spin(start_model, setting, seed)
            record(spin, f"SPIN, {setting.description}", seed, iterations)
            steps = [item["step"] for item in iterations]
            description = f"continued SFT with spin[{name}]'s optimizer, batch and steps on chat_train.jsonl"
            report = record(control, description, seed, control_run(spin_cfg, steps, seed))
        for name in plan.dpo_settings:
            setting = DPO_SETTINGS[name]
            dpo, control = f"dpo[{name}]", f"sft_chosen[{name}]"
            pairs[f"dpo[{name}] vs step-matched SFT on the chosen responses"] = (dpo, control)
            dpo_cfg, checkpoints = study.run_dpo(start_model, setting, plan.dpo_checkpoint_steps, seed)
            record(dpo, f"DPO on dpo_train.jsonl, {setting.description}", seed, checkpoints)
            steps = [item["step"] for item in checkpoints]
            description = f"continued SFT on the chosen responses (chat_train.jsonl) with dpo[{name}]'s optimizer"
            report = record(control, description, seed, control_run(dpo_cfg, steps, seed))
    return report


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    parser.add_argument("--quick", action="store_true", help="a short smoke run (150-step start, 60 prompts)")
    parser.add_argument("--work_dir", type=Path, default=None, help="keep the runs here (default: a temp dir)")
    parser.add_argument("--cache_dir", type=Path, default=None, help="SFT start model cache (build_tiny_base_model)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids oversubscribing shared cores)")
    parser.add_argument("--seeds", type=int, default=None, help="the multi-seed study with this many seeds per arm")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="spin_study_"))
    try:
        if args.seeds is not None:
            seeds = [FIRST_SEED + i for i in range(args.seeds)]
            plan = SEEDS_QUICK if args.quick else SEEDS_FULL
            results = run_seed_study(plan, seeds, work_dir, args.cache_dir, args.out)
        else:
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
