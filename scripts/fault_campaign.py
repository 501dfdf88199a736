"""Fault campaign: SIGKILL training at many points, resume, and check that nothing was lost or repeated.

    python scripts/fault_campaign.py                       # every kill point of SFT, DPO and SPIN
    python scripts/fault_campaign.py --algorithms sft --out campaign.json
    python scripts/fault_campaign.py --points spin:rollout:2 self_rewarding:before_iteration_end

For each algorithm it runs the tiny embedded-default job once uninterrupted, then once per kill point: the job
is started with ``NEMO_ALIGNER_KILL_AT=<point>`` (``nemo_aligner/utils/kill_points.py``), must die there, and is
restarted (with no kill) until it finishes. A kill point passes ("survives") when

* the final ``.nemo`` weights equal the uninterrupted run's bit for bit (same seed, same CPU, same batches: the
  float operations are the same, so no tolerance is needed; the deviation is reported anyway);
* the data order is the same: every training step appends (step, iteration, consumed_samples, sample indices)
  to a trace; steps a killed run did after its last checkpoint are rolled back when the resumed run repeats them,
  and what remains must equal the uninterrupted trace (no sample skipped, none trained on twice);
* ``metrics.csv`` equals the uninterrupted run's (determinism across resume);
* no half-written checkpoint or ``.nemo`` export is left in the checkpoint directory.

A kill spec is ``point[:n]`` (the n-th hit; for ``after_step`` the step), ``+TERM`` sends SIGTERM instead (a
preemption: the run must save and exit 0), and ``a,b`` kills twice in a row (first run at a, its resume at b).
It prints a JSON summary (kill points tried, survived, max weight deviation, the failures).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Steps of the tiny starting models, as the functional tests build them (so the cached files are shared).
STARTING_MODELS = {"sft": 150, "judge": 80}
SCRIPTS = REPO / "examples" / "nlp" / "gpt"


@dataclass(frozen=True)
class Job:
    """One training job of the campaign: its entry script, config and the kill points tried on it."""

    name: str
    module: str
    overrides: tuple[str, ...]
    nemo_name: str
    kill_specs: tuple[str, ...]
    config_name: str | None = None
    model: str | None = None  # the starting model: None (built from scratch), "sft" or "judge"


SFT = Job(
    "sft",
    "examples.nlp.gpt.train_gpt_sft",
    (
        "trainer.sft.max_steps=8",
        "trainer.sft.val_check_interval=3",
        "trainer.sft.save_interval=3",
        "trainer.sft.limit_val_batches=2",
        "model.data.train_ds.global_batch_size=8",
        "model.data.train_ds.micro_batch_size=4",
        "model.optim.sched.warmup_steps=2",
        "exp_manager.checkpoint_callback_params.save_top_k=1",
    ),
    "megatron_gpt_sft.nemo",
    (
        "after_backward:2",
        "after_optimizer_step:5",
        "after_step:5",
        "validation:3",
        "inside_save:2",
        "before_rename:2",
        "before_prune:2",
        "after_save:1",
        "inside_save:3",
        "nemo_export",
        "after_step:4+TERM",
    ),
    config_name="gpt_sft_tiny",
)

DPO = Job(
    "dpo",
    "examples.nlp.gpt.train_gpt_dpo",
    (
        "model.global_batch_size=8",
        "model.micro_batch_size=4",
        "trainer.dpo.max_steps=6",
        "trainer.dpo.val_check_interval=2",
        "trainer.dpo.save_interval=2",
        "trainer.dpo.limit_val_batches=2",
        "model.optim.name=adamw",
        "model.optim.lr=1e-4",
        "model.optim.sched.name=Constant",
        "exp_manager.checkpoint_callback_params.save_top_k=1",
        "trainer.precision=32",  # gpt_dpo.yaml is bf16 + megatron_amp_O2 (GPU); fp32 on the CPU
        "model.megatron_amp_O2=false",
    ),
    "megatron_gpt_dpo.nemo",
    (
        "reference_logprobs:2",
        "after_backward:3",
        "after_optimizer_step:3",
        "after_step:3",
        "validation:2",
        "inside_save:2",
        "before_rename:2",
        "before_prune:1",
        "after_save:2",
        "nemo_export",
        "after_step:3+TERM",
    ),
    model="sft",
)

SPIN = Job(
    "spin",
    "examples.nlp.gpt.train_gpt_spin",
    (
        "trainer.spin.max_iterations=2",
        "trainer.spin.limit_train_batches=3",
        "trainer.spin.val_check_interval=3",
        "trainer.spin.save_interval=2",
        "trainer.spin.limit_val_batches=1",
        "model.global_batch_size=16",
        "model.micro_batch_size=8",
        "model.spin.rollout_micro_batch_size=16",
        "exp_manager.checkpoint_callback_params.save_top_k=1",
    ),
    "megatron_gpt_spin.nemo",
    (
        "rollout:2",
        "rollout:5",
        "after_backward:2",
        "after_optimizer_step:4",
        "after_step:3",
        "after_step:5",
        "validation:1",
        "before_iteration_end",
        "inside_save:3",
        "before_rename:3",
        "before_prune:3",
        "after_save:2",
        "nemo_export",
        "after_step:4+TERM",
    ),
    config_name="gpt_spin_tiny",
    model="sft",
)

SELF_REWARDING = Job(
    "self_rewarding",
    "examples.nlp.gpt.train_gpt_self_rewarding",
    ("trainer.self_rewarding.save_interval=2", "exp_manager.checkpoint_callback_params.save_top_k=1"),
    "megatron_gpt_self_rewarding.nemo",
    ("rollout:2", "after_step:2", "before_iteration_end", "after_step:5", "inside_save:3", "nemo_export"),
    config_name="gpt_self_rewarding_tiny",
    model="judge",
)

JOBS = {job.name: job for job in (SFT, DPO, SPIN, SELF_REWARDING)}


# ---------------------------------------------------------------------------------------------------- child side
def run_child(module: str, trace_file: str, argv: Sequence[str]) -> None:
    """Run an entry script in this process with every training step traced (called by ``--child``)."""
    import importlib

    sys.path.insert(0, str(REPO))
    from nemo_aligner.algorithms.base import BaseTrainer

    original = BaseTrainer.train_single_step

    def traced(self, batch):
        metrics = original(self, batch)
        record = {
            "step": self.step + 1,
            "iteration": getattr(self, "iteration", 0),
            "consumed_samples": self.consumed_samples,
            "indices": [int(i) for i in batch["sample_index"].tolist()],
        }
        with open(trace_file, "a") as file:
            file.write(json.dumps(record) + "\n")
        return metrics

    BaseTrainer.train_single_step = traced
    entry = importlib.import_module(module)
    sys.argv = [entry.__file__, *argv]
    entry.main()


# ---------------------------------------------------------------------------------------------------- parent side
def run_job(job: Job, log_dir: Path, model: Path | None, kill: str | None = None) -> subprocess.CompletedProcess:
    """One process of ``job`` writing to ``log_dir`` (appending to its trace), killed at ``kill`` if given."""
    log_dir.mkdir(parents=True, exist_ok=True)
    argv = [*(["--config-name", job.config_name] if job.config_name else []), f"exp_manager.explicit_log_dir={log_dir}"]
    if model is not None:
        argv.append(f"pretrained_checkpoint.restore_from_path={model}")
    cmd = [sys.executable, __file__, "--child", job.module, str(log_dir / "trace.jsonl"), *argv, *job.overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("NEMO_ALIGNER_KILL_AT", None)
    env.pop("NEMO_ALIGNER_KILL_SIGNAL", None)
    if kill is not None:
        point, _, sig = kill.partition("+")
        env["NEMO_ALIGNER_KILL_AT"] = point
        if sig:
            env["NEMO_ALIGNER_KILL_SIGNAL"] = sig
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=1800)


def read_trace(log_dir: Path) -> list[dict]:
    path = log_dir / "trace.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def effective_history(trace: list[dict]) -> list[dict]:
    """The steps that count: a step number seen again (a resumed run) replaces it and every later step."""
    history: list[dict] = []
    for record in trace:
        while history and history[-1]["step"] >= record["step"]:
            history.pop()
        history.append(record)
    return history


def final_weights(log_dir: Path, job: Job) -> dict:
    from nemo_aligner.checkpoint.nemo_file import open_nemo, read_torch_dist_tensors

    with open_nemo(log_dir / "checkpoints" / job.nemo_name) as unpacked:
        return read_torch_dist_tensors(unpacked / "model_weights")


def metrics_rows(log_dir: Path) -> list[dict]:
    path = log_dir / "csv" / "metrics.csv"
    if not path.is_file():
        return []
    with path.open(newline="") as file:
        # Wall-clock values (train/timers/*_s, train/step_time, val/validation_step_time) differ between any two
        # runs: everything else must be equal.
        return [
            {k: v for k, v in row.items() if v not in ("", None) and "timers/" not in k and not k.endswith("_time")}
            for row in csv.DictReader(file)
        ]


def max_deviation(expected: dict, actual: dict) -> float:
    """Largest absolute difference over all weights (inf when the tensors do not match up)."""
    if expected.keys() != actual.keys():
        return float("inf")
    worst = 0.0
    for key, value in expected.items():
        if value.shape != actual[key].shape:
            return float("inf")
        worst = max(worst, (value.double() - actual[key].double()).abs().max().item() if value.numel() else 0.0)
    return worst


@dataclass
class Reference:
    """What the uninterrupted run produced."""

    weights: dict
    history: list[dict]
    metrics: list[dict]


def reference_run(job: Job, log_dir: Path, model: Path | None) -> Reference:
    shutil.rmtree(log_dir, ignore_errors=True)
    result = run_job(job, log_dir, model)
    if result.returncode != 0:
        raise RuntimeError(f"{job.name}: the uninterrupted run failed:\n{result.stderr[-3000:]}")
    return load_reference(job, log_dir)


def load_reference(job: Job, log_dir: Path) -> Reference:
    return Reference(final_weights(log_dir, job), read_trace(log_dir), metrics_rows(log_dir))


def kill_and_resume(job: Job, spec: str, log_dir: Path, model: Path | None) -> dict:
    """Kill the job at each point of ``spec`` in turn, then resume it to the end (checked later)."""
    shutil.rmtree(log_dir, ignore_errors=True)
    start = time.monotonic()
    outcome: dict = {"job": job.name, "kill": spec, "log_dir": str(log_dir), "problems": []}
    for kill in spec.split(","):
        result = run_job(job, log_dir, model, kill)
        expected = 0 if kill.endswith("+TERM") else -signal.SIGKILL
        if result.returncode != expected:
            outcome["problems"].append(f"{kill}: exit code {result.returncode}, expected {expected}")
            outcome["stderr"] = result.stderr[-2000:]
    resumed = run_job(job, log_dir, model)
    if resumed.returncode != 0:
        outcome["problems"].append(f"resume failed with exit code {resumed.returncode}")
        outcome["stderr"] = resumed.stderr[-2000:]
    outcome["seconds"] = round(time.monotonic() - start, 1)
    return outcome


def check_result(job: Job, log_dir: Path, reference: Reference) -> dict:
    """Compare a resumed run's weights, data order, metrics and leftovers with the uninterrupted run."""
    found: list[str] = []
    try:
        deviation = max_deviation(reference.weights, final_weights(log_dir, job))
    except Exception as err:  # a missing or unreadable .nemo is a finding, not a crash of the campaign
        found.append(f"final .nemo unreadable: {err}")
        deviation = float("inf")
    if deviation != 0.0:
        found.append(f"final weights differ (max abs deviation {deviation})")
    trace = read_trace(log_dir)
    history = effective_history(trace)
    if history != reference.history:
        found.append(f"data order differs: {describe_difference(reference.history, history)}")
    if metrics_rows(log_dir) != reference.metrics:
        found.append("metrics.csv differs from the uninterrupted run's")
    leftovers = sorted(p.name for p in (log_dir / "checkpoints").glob(".*"))
    if leftovers:
        found.append(f"leftovers in the checkpoint directory: {leftovers}")
    return {
        "max_abs_weight_deviation": deviation,
        "steps_run": len(trace),
        "steps_replayed": len(trace) - len(history),
        "found": found,
    }


def describe_difference(expected: list[dict], actual: list[dict]) -> str:
    for a, b in zip(expected, actual):
        if a != b:
            return f"step {a['step']}: expected {a}, got {b}"
    return f"{len(expected)} steps expected, {len(actual)} run"


def starting_model(kind: str) -> Path:
    """The tiny model DPO and SPIN ("sft") or Self-Rewarding ("judge") start from (cached; built on first use)."""
    cmd = [sys.executable, str(REPO / "scripts" / "build_tiny_base_model.py"), "--steps", str(STARTING_MODELS[kind])]
    cmd += ["--with_judge"] if kind == "judge" else []
    result = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"building the starting model failed:\n{result.stderr[-3000:]}")
    return Path(result.stdout.strip().splitlines()[-1])


def run_campaign(
    jobs: Sequence[Job],
    work_dir: Path,
    models: dict[str, Path] | None = None,
    specs: dict | None = None,
    workers: int = 2,
    record: Path | None = None,
) -> dict:
    """Every kill spec of every job (or ``specs[job.name]``), ``workers`` processes at a time; the summary.

    Starting models not given in ``models`` are built first, while the jobs that need none run. Each checked
    outcome is also appended to ``record`` (JSON lines) as soon as it is known.
    """
    jobs = sorted(jobs, key=lambda job: job.model is not None)
    outcomes = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        kinds = {job.model for job in jobs if job.model is not None} - set(models or {})
        built = {**(models or {}), **{kind: pool.submit(starting_model, kind) for kind in sorted(kinds)}}

        def model_for(job: Job) -> Path | None:
            found = built.get(job.model)
            return found.result() if hasattr(found, "result") else found

        def reference(job: Job) -> Reference:
            return reference_run(job, work_dir / job.name / "uninterrupted", model_for(job))

        def kill(job: Job, n: int, spec: str) -> dict:
            return kill_and_resume(job, spec, work_dir / job.name / f"kill{n}", model_for(job))

        submitted = []
        for job in jobs:
            expected = pool.submit(reference, job)
            tried = (specs or {}).get(job.name, job.kill_specs)
            submitted += [(job, expected, pool.submit(kill, job, n, spec)) for n, spec in enumerate(tried)]
        for job, expected, run in submitted:
            outcome = run.result()
            outcome.update(check_result(job, Path(outcome["log_dir"]), expected.result()))
            outcome["problems"] += outcome.pop("found")
            outcome["survived"] = not outcome["problems"]
            outcomes.append(outcome)
            if record is not None:
                with record.open("a") as file:
                    file.write(json.dumps(outcome) + "\n")
    return summarize(outcomes)


def summarize(outcomes: list[dict]) -> dict:
    deviations = [o["max_abs_weight_deviation"] for o in outcomes]
    return {
        "kill_points_tried": len(outcomes),
        "survived": sum(o["survived"] for o in outcomes),
        "max_weight_deviation": max(deviations, default=0.0),
        "steps_replayed": sum(o["steps_replayed"] for o in outcomes),
        "failures": [o for o in outcomes if not o["survived"]],
        "runs": [{k: o[k] for k in ("job", "kill", "survived", "steps_replayed", "seconds")} for o in outcomes],
    }


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        run_child(argv[1], argv[2], argv[3:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algorithms", nargs="+", choices=sorted(JOBS), default=["sft", "dpo", "spin"])
    parser.add_argument(
        "--work-dir", type=Path, help="where the runs and outcomes.jsonl go (default: a temporary directory)"
    )
    parser.add_argument("--workers", type=int, default=2, help="kill runs in parallel (default 2)")
    parser.add_argument(
        "--points", nargs="+", metavar="JOB:SPEC", help="only these kill specs, e.g. spin:rollout:2 sft:after_step:5"
    )
    parser.add_argument("--out", type=Path, help="also write the JSON summary here")
    args = parser.parse_args(argv)
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="fault_campaign_"))
    start = time.monotonic()
    jobs = [JOBS[name] for name in args.algorithms]
    specs = None
    if args.points:
        specs = {}
        for entry in args.points:
            name, _, spec = entry.partition(":")
            specs.setdefault(name, []).append(spec)
        jobs = [JOBS[name] for name in specs]
    work_dir.mkdir(parents=True, exist_ok=True)
    summary = run_campaign(jobs, work_dir, specs=specs, workers=args.workers, record=work_dir / "outcomes.jsonl")
    summary["seconds"] = round(time.monotonic() - start, 1)
    text = json.dumps(summary, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0 if summary["survived"] == summary["kill_points_tried"] else 1


if __name__ == "__main__":
    sys.exit(main())
