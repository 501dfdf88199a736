"""The parallel matrix: SFT, DPO, SPIN and Self-Rewarding at TP=2, PP=2, DP=2 and TP2xPP2 equal one process.

Every run is the algorithm's entry script (``main(cfg)``: config checks, data, model restore, rollouts with
generation, validation, trainer checkpoints, the final ``.nemo``) from the same starting ``.nemo``. Checked:

* each layout's final weights and every logged training metric equal the single-process run's;
* a run resumed from a trainer checkpoint saved at another layout equals the uninterrupted run (the checkpoint
  is resharded on load; SPIN/SR regenerate the next rollout): one process -> TP2, PP2, DP2; PP2 -> TP2xPP2 and
  PP2 -> one process;
* generation at PP=2 and TP2xPP2 (NeMo-written checkpoints, tied embeddings and learned positions among them)
  gives the tokens and log-probs of one process;
* layouts that cannot run are refused by the config checks, before any model is built.

Tolerance: ``1e-5 * max(1, |value|)`` (``5e-5`` for the logged pre-clipping ``grad_norm``, see
``GRAD_NORM_TOLERANCE``). fp32 has a relative precision of 1.2e-7; TP and DP sum partial matrix
products and gradients in a different order than one process (a few ulps per reduction), and four optimizer
steps carry those differences forward. Adam's update ``lr * m / (sqrt(v) + eps)`` turns the rounding noise of a
near-zero gradient into a step of up to ``lr`` (1e-3 here) when ``eps`` is tiny, so the runs use ``eps=1e-4``,
which bounds that amplification by ``lr / eps`` = 10 x the gradient difference.

Cost: starting processes and importing megatron-core dominates, so all 2-process layouts of all four algorithms
run in one gloo world (megatron's TP/PP groups are rebuilt between runs), and TP2xPP2 in one 4-process world.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from nemo_aligner.checkpoint.nemo_file import open_nemo, read_torch_dist_tensors
from nemo_aligner.checkpoint.trainer_checkpoint import (
    list_checkpoints,
    read_trainer_state,
)
from nemo_aligner.utils.config import compose_config
from nemo_aligner.utils.config_validation import ConfigChecker, check_model_parallel
from tests.conftest import NEMO_FIXTURE_NAMES, NEMO_FIXTURES
from tests.cpu_fp32 import FP32
from tests.distributed.multiprocess import restore_at_layout, run_distributed
from tests.functional.sft_runs import SCRIPTS
from tests.generation.test_generate import GREEDY, SAMPLING, random_prompts

# Adam with a large eps (see the module docstring) and a constant rate: weights move by ~1e-3 per step. adamw,
# not DPO's default distributed_fused_adam: megatron-core 0.16 without Apex/TE cannot load that optimizer's
# checkpoint into a fresh process (DistributedOptimizer.state_dict asserts on its empty state), at any layout.
OPTIM = [
    "model.optim.name=adamw",
    "model.optim.lr=1e-3",
    "++model.optim.eps=1e-4",
    "model.optim.weight_decay=0.0",
    "model.optim.sched.name=Constant",
]
SMALL_BATCHES = ["model.global_batch_size=8", "model.micro_batch_size=2"]
# Two iterations of two steps; short generations; unfinished generations still train (an untrained model
# rarely ends a response, and masking them all would leave nothing to compare).
ROLLOUT = [
    "model.spin.rollout_micro_batch_size=8",
    "model.spin.log_prob_forward_micro_batch_size=2",
    "model.spin.length_params.max_length=6",
]
ALGORITHMS = {
    "sft": (
        "train_gpt_sft",
        "gpt_sft_tiny",
        "sft",
        [
            "trainer.sft.max_steps=4",
            "trainer.sft.val_check_interval=2",
            "trainer.sft.limit_val_batches=1",
            "model.data.train_ds.global_batch_size=8",
            "model.data.train_ds.micro_batch_size=2",
        ],
    ),
    "dpo": (
        "train_gpt_dpo",
        "gpt_dpo",
        "dpo",
        [
            *SMALL_BATCHES,
            "trainer.dpo.max_steps=4",
            "trainer.dpo.val_check_interval=2",
            "trainer.dpo.limit_val_batches=1",
            "model.dpo.log_prob_forward_micro_batch_size=2",
            *FP32,
        ],
    ),
    "spin": (
        "train_gpt_spin",
        "gpt_spin_tiny",
        "spin",
        [
            *SMALL_BATCHES,
            *ROLLOUT,
            "trainer.spin.max_iterations=2",
            "trainer.spin.limit_train_batches=2",
            "trainer.spin.val_check_interval=2",
            "trainer.spin.limit_val_batches=1",
            "trainer.spin.mask_unfinished_generations=false",
            "model.spin.ref_policy_kl_penalty=[1.0,2.0]",
        ],
    ),
    # Iteration 0 trains the SFT loss (first_iteration_sft); iteration 1 generates, judges (an untrained judge
    # never gives a parseable score, so its pairs are all bad samples) and trains nothing but counts them.
    "self_rewarding": (
        "train_gpt_self_rewarding",
        "gpt_self_rewarding_tiny",
        "self_rewarding",
        [
            *SMALL_BATCHES,
            *ROLLOUT,
            "trainer.self_rewarding.limit_train_batches=2",
            "trainer.self_rewarding.val_check_interval=2",
            "model.spin.first_iteration_sft=true",
            "model.spin.num_responses_to_gen=2",
            "model.spin.num_evals_to_average=1",
            "model.spin.use_meta_judge=false",
            "model.spin.judge_length_params.max_length=4",
            "model.spin.length_control=0.0",
        ],
    ),
}
# Generation checks: the NeMo-written fixtures (tied embeddings and learned positions among them) and the start.
GREEDY_ALL_PROBS = {**GREEDY, "compute_logprob": True, "all_probs": True}
GENERATION_LENGTH = {"max_length": 12, "min_length": 0}
PROMPT_LENGTHS = [9, 3, 14]
SEEDS = [71, 72, 73]
EMBEDDED = SCRIPTS.parents[2] / "nemo_aligner" / "data" / "embedded"
DATA_FILES = {"chat_train.jsonl": 48, "chat_validation.jsonl": 8, "dpo_train.jsonl": 48, "dpo_validation.jsonl": 8}
TOLERANCE = 1e-5
# The pre-clipping gradient norm of a preference loss: rewards are differences of long log-prob sums (cancellation),
# so its fp32 rounding is ~10x that of the weights; SPIN at TP2 measured 1.03e-5 relative (weights: 3e-7).
GRAD_NORM_TOLERANCE = 5e-5
# Every run saves a trainer checkpoint every CHECKPOINT_STEPS steps (step 2 is the SPIN/SR iteration boundary).
# Self-Rewarding resumes from step 1: its iteration 1 trains nothing here (all bad samples), step 2 does.
CHECKPOINT_STEPS = {"sft": 2, "dpo": 2, "spin": 2, "self_rewarding": 1}
LAYOUTS = {"tp2": (2, 1), "pp2": (1, 2), "dp2": (1, 1)}
# Resumed runs: (algorithm, layout it resumes at, run whose step-2 checkpoint it starts from).
RESUMED_2 = [
    ("sft", "pp2", "single"),
    ("dpo", "tp2", "single"),
    ("spin", "pp2", "single"),
    ("self_rewarding", "dp2", "single"),
]


def small_data(directory: Path) -> Path:
    """The first lines of the embedded data files (reading and checking all 3000 samples per run costs more than
    the steps)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, lines in DATA_FILES.items():
        with (EMBEDDED / name).open() as source:
            (directory / name).write_text("".join(line for _, line in zip(range(lines), source)))
    return directory


def data_overrides(algorithm: str, data: Path) -> list[str]:
    if algorithm == "dpo":
        train, validation = f"['{data}/dpo_train.jsonl']", f"['{data}/dpo_validation.jsonl']"
        return [f"model.data.data_prefix={{train:{train},validation:{validation},test:{validation}}}"]
    return [
        f"model.data.train_ds.file_path={data}/chat_train.jsonl",
        f"model.data.validation_ds.file_path={data}/chat_validation.jsonl",
    ]


def run_algorithm(algorithm: str, log_dir: str, start: str, tp: int, pp: int, world_size: int) -> None:
    """One run of the algorithm's entry script, in this process (one rank of a world, or a single process)."""
    import importlib

    script, config_name, loop, overrides = ALGORITHMS[algorithm]
    data = Path(start).parent / "data"
    checkpoint_key = "model.restore_from_path" if algorithm == "sft" else "pretrained_checkpoint.restore_from_path"
    cfg = compose_config(
        SCRIPTS / "conf",
        config_name,
        [
            *overrides,
            *OPTIM,
            *data_overrides(algorithm, data),
            f"exp_manager.explicit_log_dir={log_dir}",
            "exp_manager.create_tensorboard_logger=false",
            f"{checkpoint_key}={start}",
            f"trainer.devices={world_size}",
            f"model.tensor_model_parallel_size={tp}",
            f"model.pipeline_model_parallel_size={pp}",
            f"trainer.{loop}.save_interval={CHECKPOINT_STEPS[algorithm]}",
            "exp_manager.checkpoint_callback_params.save_top_k=5",
        ],
    )
    importlib.import_module(f"examples.nlp.gpt.{script}").main(cfg)


def generations(paths: dict[str, str], prompts: list[list[int]], seeds: list[int], tp: int, pp: int) -> dict:
    """Greedy (with every log-prob) and keyed sampling from each checkpoint, restored at this layout."""
    from nemo_aligner.models.nlp.gpt.megatron_gpt_model import MegatronGPTModel
    from nemo_aligner.utils.utils import load_and_override_model_config

    results = {}
    for name, path in paths.items():
        layout = {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp}
        model = restore_at_layout(MegatronGPTModel, load_and_override_model_config(path, layout), path)
        results[name] = {
            "greedy": model.generate(prompts, GREEDY_ALL_PROBS, GENERATION_LENGTH),
            "sampled": model.generate(prompts, SAMPLING, GENERATION_LENGTH, seeds),
        }
    return results


def runs_in_one_world(runs: list[dict], start: str, world_size: int, generation: dict) -> dict:
    """Each rank: generation at ``generation["layouts"]``, then the runs one after the other (``algorithm``,
    ``log_dir``, ``tp``, ``pp``). Returns the generations by layout name."""
    layouts = generation.pop("layouts")
    outputs = {name: generations(**generation, tp=tp, pp=pp) for name, (tp, pp) in layouts.items()}
    for run in runs:
        run_algorithm(run["algorithm"], run["log_dir"], start, run["tp"], run["pp"], world_size)
    return outputs


def prepare_resume(source: Path, target: Path, step: int) -> None:
    """``target`` = ``source``'s run as it was right after the (last) checkpoint of ``step``: later checkpoints,
    rollouts, the final ``.nemo`` and later metric rows removed, so the resumed run generates the next rollout."""
    shutil.copytree(source, target)
    checkpoints = target / "checkpoints"
    kept = [p for p in list_checkpoints(checkpoints) if read_trainer_state(p)["step"] <= step]
    saved_at = max(f.stat().st_mtime_ns for f in kept[-1].rglob("*"))
    for path in list_checkpoints(checkpoints):
        if path not in kept:
            shutil.rmtree(path)
    for nemo in checkpoints.glob("*.nemo"):
        nemo.unlink()
    for rollout in target.glob("*_rollouts/*.pt"):
        if rollout.stat().st_mtime_ns > saved_at:
            rollout.unlink()
    metrics = target / "csv" / "metrics.csv"
    with metrics.open() as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames, [r for r in reader if int(r["step"]) <= step]
    with metrics.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def outcome(log_dir: Path) -> dict:
    """Final weights and the training metrics of every step, by step."""
    (nemo,) = (log_dir / "checkpoints").glob("*.nemo")
    with open_nemo(nemo) as unpacked:
        weights = read_torch_dist_tensors(unpacked / "model_weights")
    with (log_dir / "csv" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    metrics: dict[int, dict[str, float]] = {}
    for row in rows:
        for key, value in row.items():
            # Every training metric except the wall-clock ones (train/timers/*_s, train/step_time), which no two
            # runs share.
            wall_clock = "timers/" in key or key.endswith("_time")
            if key.startswith("train/") and not wall_clock and value not in ("", None):
                metrics.setdefault(int(row["step"]), {})[key] = float(value)
    return {"weights": weights, "metrics": metrics}


# SPIN's first step of each iteration (steps 1 and 3) compares policy log-probs with reference values recorded by
# generation (model.spin.reference_from_generation): equal up to rounding, so every reward is ~1e-6 and the
# fraction of pairs with reward_actual > reward_generated (`acc`) is a coin flip per pair. The rewards themselves
# are still compared. Self-Rewarding's iteration 0 (first_iteration_sft, steps 1-2) trains pairs with chosen =
# rejected = ground truth: with prefix sharing (the default) the two copies are two branches of one packed row, whose
# log-probs differ by rounding, so its `acc` compares rewards of ~1e-7 too.
COIN_FLIPS = {"spin": {(1, "train/acc"), (3, "train/acc")}, "self_rewarding": {(1, "train/acc"), (2, "train/acc")}}


def deviations(a: dict, b: dict, coin_flips: set[tuple[int, str]] = frozenset()) -> dict[str, float]:
    """Largest difference of the weights, and largest ``|a - b| / max(1, |b|)`` of the logged metrics (the gradient
    norm apart; ``coin_flips``, (step, key) pairs, are not compared); both runs must hold the same keys."""
    assert a["weights"].keys() == b["weights"].keys()
    assert a["metrics"].keys() == b["metrics"].keys()
    worst = {"weights": 0.0, "metrics": 0.0, "grad_norm": 0.0}
    for key, value in b["weights"].items():
        worst["weights"] = max(worst["weights"], (a["weights"][key].double() - value.double()).abs().max().item())
    for step, row in b["metrics"].items():
        assert a["metrics"][step].keys() == row.keys(), step
        for key, value in row.items():
            if (step, key) in coin_flips:
                continue
            kind = "grad_norm" if key == "train/grad_norm" else "metrics"
            worst[kind] = max(worst[kind], abs(a["metrics"][step][key] - value) / max(1.0, abs(value)))
    return worst


def assert_within_tolerance(worst: dict[str, float], label: str) -> None:
    print(f"{label}: " + ", ".join(f"{kind} {value:.2e}" for kind, value in worst.items()))
    assert worst["weights"] < TOLERANCE and worst["metrics"] < TOLERANCE, label
    assert worst["grad_norm"] < GRAD_NORM_TOLERANCE, label


def weight_change(after: dict, start: dict) -> float:
    return max((after["weights"][k].double() - v.double()).abs().max().item() for k, v in start["weights"].items())


def world(out_dir: Path, runs: list[dict], start: Path, layouts: dict, generation: dict) -> dict:
    """One gloo world of ``tp x pp`` processes (the ``layouts`` size) for the generations and the runs; returns the
    generations as ``"<layout> rank <r>"``."""
    ((tp, pp),) = set(layouts.values())
    ranks = run_distributed(
        "tests.distributed.test_parallel_matrix:runs_in_one_world",
        nprocs=tp * pp,
        out_dir=out_dir,
        timeout=1200,
        runs=runs,
        start=str(start),
        world_size=tp * pp,
        generation={**generation, "layouts": layouts},
    )
    return {f"{name} rank {r}": out for r, rank in enumerate(ranks) for name, out in rank.items()}


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    """All runs: one process, a 2-process world (TP2, PP2, DP2 and resumed runs), a 4-process world (TP2xPP2)."""
    from nemo_aligner.models.nlp.gpt.megatron_gpt_model import MegatronGPTModel
    from tests.conftest import perturb_

    root = tmp_path_factory.mktemp("matrix")
    start = root / "start.nemo"
    model_cfg = compose_config(SCRIPTS / "conf", "gpt_sft_tiny").model
    model = MegatronGPTModel(model_cfg)
    perturb_(model, seed=11)
    model.save_to(start)
    small_data(root / "data")
    with open_nemo(start) as unpacked:
        start_weights = {"weights": read_torch_dist_tensors(unpacked / "model_weights")}

    paths = {
        "start": str(start),
        **{name: str(NEMO_FIXTURES / f"{name}.nemo") for name in NEMO_FIXTURE_NAMES},
    }
    generation = {
        "paths": paths,
        "prompts": random_prompts(PROMPT_LENGTHS, seed=3),
        "seeds": SEEDS,
    }
    outputs = {"single": generations(**generation, tp=1, pp=1)}
    for algorithm in ALGORITHMS:
        run_algorithm(algorithm, str(root / algorithm / "single"), str(start), 1, 1, 1)
    two = [
        {"algorithm": a, "log_dir": str(root / a / name), "tp": tp, "pp": pp}
        for a in ALGORITHMS
        for name, (tp, pp) in LAYOUTS.items()
    ]
    for algorithm, layout, source in RESUMED_2:
        target = root / algorithm / f"{layout}_resumed_from_{source}"
        prepare_resume(root / algorithm / source, target, CHECKPOINT_STEPS[algorithm])
        tp, pp = LAYOUTS[layout]
        two.append({"algorithm": algorithm, "log_dir": str(target), "tp": tp, "pp": pp})
    outputs.update(world(root / "out2", two, start, {"pp2": (1, 2)}, generation))
    four = [
        {
            "algorithm": "spin",
            "log_dir": str(root / "spin" / "tp2pp2"),
            "tp": 2,
            "pp": 2,
        }
    ]
    target = root / "spin" / "tp2pp2_resumed_from_pp2"
    prepare_resume(root / "spin" / "pp2", target, CHECKPOINT_STEPS["spin"])
    four.append({"algorithm": "spin", "log_dir": str(target), "tp": 2, "pp": 2})
    outputs.update(world(root / "out4", four, start, {"tp2pp2": (2, 2)}, generation))
    target = root / "dpo" / "single_resumed_from_pp2"
    prepare_resume(root / "dpo" / "pp2", target, CHECKPOINT_STEPS["dpo"])
    run_algorithm("dpo", str(target), str(start), 1, 1, 1)
    return root, start_weights, outputs


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_every_layout_equals_one_process(matrix, algorithm):
    root, start, _ = matrix
    single = outcome(root / algorithm / "single")
    assert sum("train/loss" in row for row in single["metrics"].values()) == 4
    # Not vacuous: the weights moved far more than the tolerance.
    assert weight_change(single, start) > 1e-3
    for layout in ("tp2", "pp2", "dp2") + (("tp2pp2",) if algorithm == "spin" else ()):
        worst = deviations(outcome(root / algorithm / layout), single, COIN_FLIPS.get(algorithm, set()))
        assert_within_tolerance(worst, f"{algorithm} {layout}")


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_resumed_at_another_layout_equals_uninterrupted(matrix, algorithm):
    root, _, _ = matrix
    single = outcome(root / algorithm / "single")
    resumed = [p for p in (root / algorithm).iterdir() if "_resumed_from_" in p.name]
    assert resumed
    for path in resumed:
        worst = deviations(outcome(path), single, COIN_FLIPS.get(algorithm, set()))
        assert_within_tolerance(worst, f"{algorithm} {path.name}")


@pytest.mark.slow
@pytest.mark.distributed
def test_generation_at_pp2_and_tp2pp2_equals_one_process(matrix):
    """Stage-by-stage decoding with per-stage KV caches: the same tokens for the same keyed seeds; the same
    log-probs (every rank of the pipeline returns the same result)."""
    _, _, outputs = matrix
    single = outputs.pop("single")
    assert len(outputs) == 2 + 4
    worst = 0.0
    for layout, by_checkpoint in outputs.items():
        for name, expected in single.items():
            got = by_checkpoint[name]
            assert got["sampled"].token_ids == expected["sampled"].token_ids, (
                layout,
                name,
            )
            assert got["greedy"].token_ids == expected["greedy"].token_ids, (
                layout,
                name,
            )
            for a, b in zip(got["greedy"].full_logprobs, expected["greedy"].full_logprobs):
                worst = max(worst, (a - b).abs().max().item())
    print(f"generation: largest log-prob deviation {worst:.2e}")
    assert worst < TOLERANCE


def test_layouts_that_cannot_run_are_refused_before_any_model_is_built():
    model = {
        "num_layers": 3,
        "num_attention_heads": 4,
        "tensor_model_parallel_size": 1,
        "pipeline_model_parallel_size": 2,
    }
    checker = ConfigChecker(OmegaConf.create({"model": {**model, "virtual_pipeline_model_parallel_size": 2}}))
    assert check_model_parallel(checker, "model", world_size=4) == 2
    virtual = "the interleaved pipeline schedule is not supported (one model chunk per stage); set it to null"
    assert checker.problems == [
        "model.pipeline_model_parallel_size: PP 2 does not divide num_layers (3)",
        f"model.virtual_pipeline_model_parallel_size: {virtual}",
    ]
    fine = ConfigChecker(
        OmegaConf.create({"model": {**model, "num_layers": 4, "virtual_pipeline_model_parallel_size": None}})
    )
    check_model_parallel(fine, "model", world_size=4)
    assert fine.problems == []
