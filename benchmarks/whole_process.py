"""Whole-process benchmark: every arm run as a user runs it, timed from process start to exit.

    python benchmarks/whole_process.py --quick --out benchmarks/results/whole_process_quick.json   # ~10 minutes
    python benchmarks/whole_process.py --out benchmarks/results/whole_process.json                 # everything
    python benchmarks/whole_process.py --trl_python /path/to/venv_with_trl/bin/python ...

Each arm is one fresh process started with the command line a user types (our entry scripts with Hydra
overrides; for TRL the script a TRL user writes: ``benchmarks/dpo_throughput.py --worker`` for ``DPOTrainer``,
``--sft_worker`` here for ``SFTTrainer``). Measured per process, by the parent (``os.wait4``): wall seconds, CPU
seconds (user + system of the process and the children it waited for) and peak RSS (``ru_maxrss``), plus two
start-up times from the events the process records (``NEMO_ALIGNER_EVENTS_FILE``,
``nemo_aligner.utils.timers.mark_event``; the TRL scripts record the same events with a callback):

* ``imports_s``: process start to the end of the script's imports (ours: ``main`` entered; TRL's: after
  ``from trl import ...``), with ``rss_after_imports_mb`` the peak RSS by then;
* ``setup_s``: process start to the start of the reference pass, or to the first step when there is none
  (imports, config, data, model loading: what a user waits for before any compute);
* ``startup_s``: process start to the first training step (``setup_s`` plus a precomputed reference pass), with
  ``rss_at_first_step_mb`` the peak RSS by then.

Arms, grouped; the arms of a group run in interleaved rounds (each arm once per round, order rotated), and the
headline ratios are medians over rounds of ratios measured within a round:

* ``dpo``: ``dpo_ours`` (``train_gpt_dpo.py`` with its defaults: precomputed reference, prefix sharing,
  TensorBoard + CSV logs, a trainer checkpoint and the ``.nemo`` at the end), ``dpo_trl_default`` (TRL's
  ``DPOTrainer`` defaults: a reference forward every step; the final model saved), ``dpo_trl_precompute``
  (``precompute_ref_log_probs=True``). Settings as in ``benchmarks/dpo_throughput.py`` (same weights, data,
  optimizer, beta; no validation).
* ``sft``: ``sft_ours`` (``train_gpt_sft.py`` restoring the same ``.nemo``, answer-only loss) against
  ``sft_trl`` (``SFTTrainer``, prompt-completion data: completion-only loss), the first ``--sft_examples`` lines of
  the embedded ``sft_train.jsonl`` (``"{input} {output}"`` + EOS), AdamW lr 1e-5 constant, no weight decay,
  clipping 1.0, one epoch, no validation.
* ``quickstart``: the README quick start's command 1 after its install, in a fresh directory:
  ``train_gpt_sft.py --config-name gpt_sft_tiny`` (the embedded default), ``train_gpt_spin.py --config-name
  gpt_spin_tiny`` on its ``.nemo`` (three SPIN iterations), then the before/after table
  (``python -m nemo_aligner.evaluation``). No peer; its rounds give the run-to-run spread.

Thread settings: ``default`` (nothing set: torch uses one thread per core) and ``1`` (``OMP_NUM_THREADS=1``).
Models: the ``tiny`` and ``58m`` Llamas of ``benchmarks/common.py`` (the quick start has its own tiny model).
The load average is recorded before every run: on a shared machine, read ratios, not absolute seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    EMBEDDED,
    REPO,
    SHAPES,
    default_trl_python,
    first_step_callback,
    read_jsonl,
    write_json,
)
from benchmarks.dpo_throughput import LR, SEED, TRL_OPTIMIZER_ARGS, our_dpo_overrides, write_pairs  # noqa: E402

GPT = REPO / "examples" / "nlp" / "gpt"
GROUPS = {
    "dpo": ("dpo_ours", "dpo_trl_default", "dpo_trl_precompute"),
    "sft": ("sft_ours", "sft_trl"),
    "quickstart": ("quickstart_sft", "quickstart_spin", "quickstart_table"),
}
KEYS = (
    "wall_s",
    "cpu_s",
    "peak_rss_mb",
    "imports_s",
    "setup_s",
    "startup_s",
    "rss_after_imports_mb",
    "rss_at_first_step_mb",
)
EVENTS_FILE_ENV = "NEMO_ALIGNER_EVENTS_FILE"  # nemo_aligner.utils.timers.EVENTS_FILE_ENV (not imported: no torch here)


# ---------------------------------------------------------------------------------------------- one process
def run_process(cmd: list[str], cwd: Path, threads: int | None, log_path: Path, repo: Path = REPO) -> dict[str, Any]:
    """Run ``cmd`` to completion (``repo`` first on its path); its wall and CPU seconds, peak RSS and start-up
    events."""
    env = {**os.environ, "PYTHONPATH": str(repo) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.pop(key, None)
        if threads:
            env[key] = str(threads)
    events_path = log_path.with_suffix(".events")
    events_path.unlink(missing_ok=True)
    env[EVENTS_FILE_ENV] = str(events_path)
    load = os.getloadavg()[0]
    with open(log_path, "w") as log:
        start = time.time()
        process = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.time() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... exited {process.returncode}:\n{log_path.read_text()[-4000:]}")
    events, peaks = {}, {}
    if events_path.exists():
        for line in events_path.read_text().splitlines():
            name, stamp, peak = line.split()
            events.setdefault(name, float(stamp) - start)
            peaks.setdefault(name, float(peak))
    row = {
        "wall_s": round(wall, 3),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "load_average": round(load, 2),
    }
    if "imports_done" in events:
        row["imports_s"] = round(events["imports_done"], 3)
        row["rss_after_imports_mb"] = peaks["imports_done"]
    if "first_step" in events:
        row["setup_s"] = round(events.get("reference_pass", events["first_step"]), 3)
        row["startup_s"] = round(events["first_step"], 3)
        row["rss_at_first_step_mb"] = peaks["first_step"]
    return row


# ---------------------------------------------------------------------------------------------- the arms
class Arms:
    """The command line of every arm for one model shape (data and weights built once under ``work``)."""

    def __init__(self, cli: argparse.Namespace, work: Path, shape: str):
        self.cli, self.work, self.shape = cli, work, shape
        self.hf_dir, self.nemo = build_models_in_a_child(work, shape)
        self.dpo_data = write_pairs(work / f"dpo_{cli.pairs}_0.jsonl", cli.pairs)
        self.sft_data = write_sft_examples(work / f"sft_{cli.sft_examples}.jsonl", cli.sft_examples)

    def command(self, arm: str, run_dir: Path, gpt: Path = GPT) -> tuple[list[str], Path]:
        """``(argv, cwd)`` of ``arm`` writing under ``run_dir`` (fresh per run); ``gpt``: our entry scripts."""
        cli = self.cli
        common = {"hf": str(self.hf_dir), "nemo": str(self.nemo), "batch": cli.batch, "epochs": 1}
        common.update(threads=None, device="cpu", precision="32", save=True)
        if arm == "dpo_ours":
            args = {**common, "data": str(self.dpo_data), "arm": "ours_prefix_sharing"}
            overrides = our_dpo_overrides(args, str(run_dir))
            # ours_prefix_sharing's arm settings are the defaults on the CPU: leave them out, as a user does.
            overrides = [o for o in overrides if "prefix_sharing" not in o and "local_core_attention" not in o]
            return [sys.executable, str(gpt / "train_gpt_dpo.py"), *overrides], REPO
        if arm in ("dpo_trl_default", "dpo_trl_precompute"):
            args = {**common, "data": str(self.dpo_data), "arm": arm.removeprefix("dpo_")}
            script = REPO / "benchmarks" / "dpo_throughput.py"
            return [cli.trl_python, str(script), "--worker", json.dumps(args)], REPO
        if arm == "sft_ours":
            return [sys.executable, str(gpt / "train_gpt_sft.py"), *our_sft_overrides(self, run_dir)], REPO
        if arm == "sft_trl":
            args = {**common, "data": str(self.sft_data), "out": str(run_dir)}
            return [cli.trl_python, str(Path(__file__).resolve()), "--sft_worker", json.dumps(args)], REPO
        raise ValueError(arm)


def build_models_in_a_child(work: Path, shape: str) -> tuple[Path, Path]:
    """:func:`build_models` in a child process, so that this one never holds torch or a model. On Linux a child's
    peak RSS (``ru_maxrss``) starts at the RSS of the process it was forked from (the high-water mark before
    ``exec`` is kept), so a parent that had built the 58M model (~620 MB) raised every smaller arm's peak to its own.
    """
    code = "import sys, pathlib, benchmarks.common as c; c.build_models(pathlib.Path(sys.argv[1]), sys.argv[2])"
    subprocess.run([sys.executable, "-c", code, str(work), shape], cwd=REPO, check=True)
    return work / f"hf_{shape}", work / f"llama_{shape}.nemo"


def quickstart_command(arm: str, run_dir: Path, gpt: Path = GPT) -> tuple[list[str], Path]:
    """The quick start's command 1 after its install, in its three parts (SFT, SPIN, the before/after table), run
    in ``run_dir`` (where they write and read ``results/``)."""
    if arm == "quickstart_sft":
        return [sys.executable, str(gpt / "train_gpt_sft.py"), "--config-name", "gpt_sft_tiny"], run_dir
    if arm == "quickstart_table":
        return [sys.executable, "-m", "nemo_aligner.evaluation", "results/megatron_gpt_spin"], run_dir
    sft_nemo = run_dir / "results" / "megatron_gpt_sft" / "checkpoints" / "megatron_gpt_sft.nemo"
    restore = f"pretrained_checkpoint.restore_from_path={sft_nemo}"
    return [sys.executable, str(gpt / "train_gpt_spin.py"), "--config-name", "gpt_spin_tiny", restore], run_dir


def write_sft_examples(path: Path, count: int) -> Path:
    lines = read_jsonl(EMBEDDED / "sft_train.jsonl", count)
    path.write_text("".join(json.dumps({"input": r["input"], "output": r["output"]}) + "\n" for r in lines))
    return path


def our_sft_overrides(arms: Arms, run_dir: Path) -> list[str]:
    cli, data = arms.cli, arms.sft_data
    return [
        f"model.restore_from_path={arms.nemo}",
        f"exp_manager.explicit_log_dir={run_dir}",
        "model.data.chat=false",
        f"model.data.train_ds.file_path={data}",
        f"model.data.validation_ds.file_path={data}",
        f"model.data.train_ds.global_batch_size={cli.batch}",
        f"model.data.train_ds.micro_batch_size={cli.batch}",
        "model.data.train_ds.add_eos=true",
        f"model.seed={SEED}",
        f"model.optim.lr={LR}",
        "model.optim.weight_decay=0.0",
        "model.optim.betas=[0.9,0.999]",
        "~model.optim.sched",
        "+model.optim.sched.name=Constant",
        "trainer.sft.max_epochs=1",
        "trainer.sft.max_steps=-1",
        "trainer.sft.limit_val_batches=0",
        "trainer.sft.gradient_clip_val=1.0",
    ]


def sft_worker(args: dict[str, Any]) -> None:
    """TRL's ``SFTTrainer`` as a user's script runs it (the settings of ``our_sft_overrides``)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from nemo_aligner.utils.timers import mark_event

    mark_event("imports_done")
    tokenizer = AutoTokenizer.from_pretrained(args["hf"])
    model = AutoModelForCausalLM.from_pretrained(args["hf"], dtype=torch.float32, attn_implementation="sdpa")
    rows = read_jsonl(Path(args["data"]))
    dataset = Dataset.from_list([{"prompt": r["input"] + " ", "completion": r["output"]} for r in rows])
    config = SFTConfig(
        output_dir=args["out"],
        per_device_train_batch_size=args["batch"],
        num_train_epochs=1,
        **TRL_OPTIMIZER_ARGS,
        max_length=512,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        logging_steps=10**6,
        disable_tqdm=True,
        use_cpu=True,
        seed=SEED,
        dataloader_drop_last=True,
    )
    trainer = SFTTrainer(
        model=model, args=config, train_dataset=dataset, processing_class=tokenizer, callbacks=[first_step_callback()]
    )
    trainer.train()
    trainer.save_model(args["out"])


# ---------------------------------------------------------------------------------------------- rounds
def run_group(
    arms: Arms | None, names: list[str], threads: int | None, rounds: int, work: Path, before: Path | None
) -> dict[str, Any]:
    """``rounds`` interleaved rounds of ``names``; the quick start's two commands run in order in one directory.
    With ``before`` (a checkout of an earlier commit), every arm of ours also runs from there as ``<arm>_before``."""
    if before is not None:
        names = [*names, *(f"{n}_before" for n in names if "trl" not in n)]
    results = []
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        if arms is None:  # the quick start: SFT then SPIN, each checkout in its own directory
            order = [n for n in names if n.endswith("_before") == (r % 2 == 1)]
            order += [n for n in names if n not in order]
        round_results = {}
        run_dir = Path(tempfile.mkdtemp(dir=work, prefix=f"run_{r}_"))
        for name in order:
            arm, is_before = name.removesuffix("_before"), name.endswith("_before")
            repo = before if is_before else REPO
            gpt = repo / "examples" / "nlp" / "gpt"
            arm_dir = run_dir / ("before" if is_before else "after") if arms is None else run_dir / name
            arm_dir.mkdir(exist_ok=True)
            cmd, cwd = quickstart_command(arm, arm_dir, gpt) if arms is None else arms.command(arm, arm_dir, gpt)
            row = run_process(cmd, cwd, threads, run_dir / f"{name}.log", repo)
            round_results[name] = row
            print(f"round {r} threads={threads or 'default'} {name}: {json.dumps(row)}", file=sys.stderr)
        results.append(round_results)
        subprocess.run(["rm", "-rf", str(run_dir)], check=False)
    return {"rounds": results, **summarize(results, list(results[0]))}


def summarize(rounds: list[dict[str, dict[str, Any]]], names: list[str]) -> dict[str, Any]:
    """Per arm the median of each key; the ratios other/ours (TRL's arms, and ``<arm>_before``) per round and
    their median: above 1, ours is faster (or smaller)."""
    medians = {
        arm: {key: statistics.median(r[arm][key] for r in rounds) for key in KEYS if key in rounds[0][arm]}
        for arm in names
    }
    ratios = {}
    pairs = [(n, f"{n}_before") for n in names if f"{n}_before" in names]
    if not names[0].startswith("quickstart"):
        pairs += [(names[0], other) for other in names[1:] if "trl" in other]
    for ours, other in pairs:
        for key in KEYS:
            if key in rounds[0][ours] and key in rounds[0][other]:
                per_round = [r[other][key] / r[ours][key] for r in rounds]
                ratios[f"{key} {other}/{ours}"] = {"median": statistics.median(per_round), "per_round": per_round}
    return {"medians": medians, "ratios": ratios}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sft_worker", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="DPO only, tiny at 256 pairs, default threads")
    parser.add_argument("--models", nargs="+", choices=("tiny", "58m"), default=["tiny", "58m"])
    parser.add_argument("--groups", nargs="+", choices=sorted(GROUPS), default=list(GROUPS))
    parser.add_argument("--threads", nargs="+", default=["default", "1"], help="'default' and/or counts")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=512, help="DPO: first N pairs of dpo_train.jsonl")
    parser.add_argument("--sft_examples", type=int, default=512, help="SFT: first N lines of sft_train.jsonl")
    parser.add_argument("--batch", type=int, default=8, help="pairs (DPO) or examples (SFT) per optimizer step")
    parser.add_argument("--pairs_58m", type=int, default=64, help="--pairs and --sft_examples for the 58m model")
    parser.add_argument("--trl_python", default=default_trl_python(), help="a python with trl and datasets")
    parser.add_argument("--work_dir", default=str(Path(tempfile.gettempdir()) / "nemo_aligner_bench"))
    parser.add_argument("--before_repo", help="a checkout of an earlier commit: its arms of ours run too")
    parser.add_argument("--out")
    cli = parser.parse_args()
    if cli.sft_worker:
        sft_worker(json.loads(cli.sft_worker))
        return
    if cli.quick:
        cli.groups, cli.threads, cli.pairs = ["dpo"], ["default"], min(cli.pairs, 256)
    work = Path(cli.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "benchmark": "whole_process",
        "settings": {k: v for k, v in vars(cli).items() if k not in ("sft_worker", "out", "work_dir")},
        "machine": {"cpu_count": os.cpu_count(), "load_average_at_start": os.getloadavg()},
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "results": {},
    }
    for threads_name in cli.threads:
        threads = None if threads_name == "default" else int(threads_name)
        for group in cli.groups:
            shapes = [None] if group == "quickstart" else cli.models
            for shape in shapes:
                arms = None
                if shape is not None:
                    size = cli.pairs if shape == "tiny" else cli.pairs_58m
                    shape_cli = argparse.Namespace(**{**vars(cli), "pairs": size, "sft_examples": size})
                    arms = Arms(shape_cli, work, shape)
                key = f"{group}/{shape or 'quickstart'}/threads={threads_name}"
                before = Path(cli.before_repo).resolve() if cli.before_repo else None
                result["results"][key] = run_group(arms, list(GROUPS[group]), threads, cli.rounds, work, before)
                result["results"][key]["model"] = shape and {
                    "name": shape,
                    "parameters": SHAPES[shape].num_parameters(),
                }
    result["machine"]["load_average_at_end"] = os.getloadavg()
    # Every arm's peak RSS is at least this (see build_models_in_a_child): it must stay far below them.
    result["machine"]["benchmark_process_peak_rss_mb"] = round(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1
    )
    write_json(result, cli.out)


if __name__ == "__main__":
    main()
