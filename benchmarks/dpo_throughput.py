"""DPO training throughput and peak memory: nemo_aligner's ``train_gpt_dpo.py`` versus TRL's ``DPOTrainer``.

    python benchmarks/dpo_throughput.py --out benchmarks/results/dpo_tiny.json                 # tiny Llama
    python benchmarks/dpo_throughput.py --model 58m --pairs 64 --epochs 1 --rounds 2 \\
        --out benchmarks/results/dpo_58m.json                                                 # 58M parameters

On a GPU (``docs/performance.md``, GPU section):

    python benchmarks/dpo_throughput.py --device cuda --precision bf16 --model 0.5b --pair_tokens 512 \\
        --pairs 256 --batch 16 --epochs 1 --rounds 1 --out benchmarks/results/dpo_0.5b_<gpu>.json

bf16 means ours in ``trainer.precision=bf16`` + ``model.megatron_amp_O2=true`` (bf16 weights, fp32 master weights in
megatron's optimizer) and TRL with ``bf16=True`` (fp32 weights under bf16 autocast, sdpa attention). On CUDA each
row adds peak GPU memory, step time and MFU (6N FLOPs per trained token, 8N where a reference forward runs every step,
the precomputed pass counted as 2N per token once; ``--peak_tflops``, 989 for an H200's dense bf16).
(TRL: ``pip install -e ".[bench]"``.) Both sides train the same converted weights (``benchmarks/common.py``) on
the first ``--pairs`` pairs of the embedded ``dpo_train.jsonl`` with EOS appended, in fp32, with the same global
batch (one micro batch), AdamW (lr 1e-5, betas 0.9/0.999, no weight decay, constant schedule), gradient clipping
at 1.0 and beta 0.1, for 1 and for 3 epochs. No validation and no checkpoints on either side.

Arms (each run in its own process): ``ours`` (the entry script ``main(cfg)``, reference log-probs precomputed
before training, its default), ``trl_default`` (a reference-model forward every step, TRL's default),
``trl_precompute`` (``precompute_ref_log_probs=True``). TRL 1.16's ``padding_free=True`` is disabled by TRL itself
("temporarily unavailable after a refactor"), so it is not an arm. The reference strategies of nemo_aligner
(``--arms ours ours_cpu_weight_swap ours_lora``): precomputed (``ours``), reference weights kept on the CPU and
swapped in for a reference forward every step, and LoRA (rank 8 on the fused QKV; the reference is the base model
with the adapters switched off, precomputed). ``ours`` runs with ``model.local_core_attention=sdpa`` (PyTorch's fused
attention, ``nemo_aligner/models/nlp/gpt/attention.py``); ``ours_local_attention`` with the default, megatron-core's
own ``DotProductAttention``: the before/after of that optimization in the same run. ``ours`` and
``ours_local_attention`` run with ``model.dpo.prefix_sharing=false``; ``ours_prefix_sharing`` is ``ours`` with
``model.dpo.prefix_sharing=true`` (each pair one packed row, its prompt computed once; what the default ``auto``
does on the CPU).

Throughput = real tokens (prompt + response + EOS, of chosen and of rejected, no padding) x epochs / (reference
pass + training loop wall time); model loading and tokenization are excluded on both sides. ``tokens_per_cpu_s``
divides by the process's CPU time over the same sections instead (one torch thread per run, so on a shared,
loaded machine this is the steadier number). Peak RSS is the
process's ``ru_maxrss`` (imports included: that is the process a user runs); ``rss_before_train_mb`` is the RSS
once the model is loaded and data tokenized, so the difference is what training adds.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    EMBEDDED,
    PEAK_TFLOPS,
    SHAPES,
    Stopwatch,
    build_models,
    current_rss_mb,
    default_trl_python,
    first_step_callback,
    interleaved_rounds,
    machine_info,
    marked,
    mfu,
    peak_rss_mb,
    read_jsonl,
    run_worker,
    summarize,
    write_json,
)

ARMS = (
    "ours",
    "trl_default",
    "trl_precompute",
    "ours_prefix_sharing",
    "ours_local_attention",
    "ours_cpu_weight_swap",
    "ours_lora",
)
OUR_VARIANTS = {
    "ours": ["++model.local_core_attention=sdpa", "model.dpo.prefix_sharing=false"],
    "ours_prefix_sharing": ["++model.local_core_attention=sdpa", "model.dpo.prefix_sharing=true"],
    "ours_local_attention": ["model.dpo.prefix_sharing=false"],
    "ours_cpu_weight_swap": ["model.dpo.reference=cpu_weight_swap"],
    "ours_lora": ["model.peft.peft_scheme=lora", "model.peft.lora_tuning.adapter_dim=8"],
}
LR, BETA, SEED = 1e-5, 0.1, 1234
# TRL's side of the optimizer our arms configure (adamw, constant lr, no weight decay, clip 1.0).
TRL_OPTIMIZER_ARGS = dict(
    learning_rate=LR,
    lr_scheduler_type="constant",
    weight_decay=0.0,
    adam_beta1=0.9,
    adam_beta2=0.999,
    optim="adamw_torch",
    max_grad_norm=1.0,
)


def write_pairs(path: Path, pairs: int, pair_tokens: int = 0, tokenizer=None) -> Path:
    """The first ``pairs`` embedded pairs; with ``pair_tokens``, each text repeated until prompt + response is about
    that many tokens (half prompt, half response) under ``tokenizer``."""
    lines = read_jsonl(EMBEDDED / "dpo_train.jsonl", pairs)
    if pair_tokens:

        def stretch(text: str, tokens: int) -> str:
            out = text
            while len(tokenizer(out)["input_ids"]) < tokens:
                out += " " + text
            return out

        lines = [
            {
                **line,
                **{k: stretch(line[k], pair_tokens // 2) for k in ("prompt", "chosen_response", "rejected_response")},
            }
            for line in lines
        ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def _gpu_start(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def _gpu_row(device: str) -> dict[str, Any]:
    import torch

    if device != "cuda":
        return {}
    return {"peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20, "gpu": torch.cuda.get_device_name()}


def our_dpo_overrides(args: dict[str, Any], log_dir: str) -> list[str]:
    """The ``train_gpt_dpo.py`` overrides of an arm: the TRL-matched settings of the module docstring."""
    data = args["data"]
    precision = ["trainer.precision=bf16", "model.megatron_amp_O2=true"] if args["precision"] == "bf16" else []
    return [
        f"pretrained_checkpoint.restore_from_path={args['nemo']}",
        f"exp_manager.explicit_log_dir={log_dir}",
        f"model.data.data_prefix={{train: [{data}], validation: [{data}], test: [{data}]}}",
        "model.data.append_eod=true",
        f"model.global_batch_size={args['batch']}",
        f"model.micro_batch_size={args['batch']}",
        f"model.seed={SEED}",
        f"model.dpo.ref_policy_kl_penalty={BETA}",
        "model.optim.name=adamw",
        f"model.optim.lr={LR}",
        "model.optim.weight_decay=0.0",
        "model.optim.betas=[0.9,0.999]",
        "model.optim.sched.name=Constant",
        f"trainer.dpo.max_epochs={args['epochs']}",
        "trainer.dpo.limit_val_batches=0",
        "trainer.dpo.gradient_clip_val=1.0",
        *OUR_VARIANTS[args["arm"]],
        *precision,
        *args.get("overrides", []),
    ]


def run_ours(args: dict[str, Any]) -> dict[str, Any]:
    """The DPO entry script in-process, with the reference pass and the loop timed (saves switched off)."""
    import torch

    torch.set_num_threads(args["threads"])
    from examples.nlp.gpt import train_gpt_dpo
    from nemo_aligner.algorithms import dpo
    from nemo_aligner.utils.config import compose_config

    watch = Stopwatch()
    rss = {}
    original_compute = dpo.compute_reference_logprobs

    def compute_reference(model, batches):
        rss.setdefault("before", current_rss_mb())
        return watch.wrap(f"reference_{len(watch.seconds)}", original_compute)(model, batches)

    dpo.compute_reference_logprobs = compute_reference
    dpo.DPOTrainer.fit = watch.wrap("train", dpo.DPOTrainer.fit)
    dpo.DPOTrainer.save = lambda self, is_train_end=False: None
    sizes = {}
    original_step = dpo.DPOTrainer.train_single_step

    def counting_step(self, batch):
        sizes["tokens"] = sizes.get("tokens", 0) + int((batch["chosen_lengths"] + batch["rejected_lengths"]).sum())
        sizes["steps"] = sizes.get("steps", 0) + 1
        return original_step(self, batch)

    dpo.DPOTrainer.train_single_step = counting_step
    _gpu_start(args["device"])
    with tempfile.TemporaryDirectory() as log_dir:
        loggers_off = ["exp_manager.create_tensorboard_logger=false", "exp_manager.create_csv_logger=false"]
        overrides = [*our_dpo_overrides(args, log_dir), *loggers_off]
        train_gpt_dpo.main(compose_config(Path(train_gpt_dpo.__file__).parent / "conf", "gpt_dpo", overrides))
    # reference_0 is the training set's pass (reference_1 validation's, not counted); none without precomputation.
    seconds = {k: watch.seconds.get(f"{k}_0" if k == "reference" else k, 0.0) for k in ("reference", "train")}
    cpu = {k: watch.cpu_seconds.get(f"{k}_0" if k == "reference" else k, 0.0) for k in ("reference", "train")}
    row = result_row(sizes["tokens"], seconds, cpu, rss.get("before", current_rss_mb()))
    return {**row, **_gpu_row(args["device"]), "steps": sizes.get("steps", 0)}


def run_trl(args: dict[str, Any], precompute: bool) -> dict[str, Any]:
    """TRL's ``DPOTrainer`` as a user's script runs it; ``threads: null`` keeps torch's default thread count,
    ``save: true`` saves the final model (``benchmarks/whole_process.py``)."""
    import torch

    if args.get("threads"):
        torch.set_num_threads(args["threads"])
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from nemo_aligner.utils.timers import mark_event

    mark_event("imports_done")
    watch = Stopwatch()
    precompute_fn = marked("reference_pass", DPOTrainer._precompute_ref_logps)
    DPOTrainer._precompute_ref_logps = watch.wrap("reference", precompute_fn)
    tokenizer = AutoTokenizer.from_pretrained(args["hf"])
    model = AutoModelForCausalLM.from_pretrained(args["hf"], dtype=torch.float32, attn_implementation="sdpa")
    _gpu_start(args["device"])
    rows = read_jsonl(Path(args["data"]))
    dataset = Dataset.from_list(
        [{"prompt": r["prompt"], "chosen": r["chosen_response"], "rejected": r["rejected_response"]} for r in rows]
    )
    with tempfile.TemporaryDirectory() as out:
        config = DPOConfig(
            output_dir=out,
            per_device_train_batch_size=args["batch"],
            gradient_accumulation_steps=1,
            num_train_epochs=args["epochs"],
            **TRL_OPTIMIZER_ARGS,
            beta=BETA,
            precompute_ref_log_probs=precompute,
            save_strategy="no",
            eval_strategy="no",
            report_to=[],
            logging_steps=10**6,
            disable_tqdm=True,
            use_cpu=args["device"] == "cpu",
            bf16=args["precision"] == "bf16",
            seed=SEED,
            dataloader_drop_last=True,
        )
        trainer = DPOTrainer(
            model=model,
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[first_step_callback()],
        )
        before = current_rss_mb()
        watch.wrap("train", trainer.train)()
        if args.get("save"):
            trainer.save_model(out)
    tokens = sum(
        2 * len(x["prompt_ids"]) + len(x["chosen_ids"]) + len(x["rejected_ids"]) for x in trainer.train_dataset
    )
    tokens = tokens * args["epochs"] * (len(rows) // args["batch"]) * args["batch"] // len(rows)
    seconds = {k: watch.seconds.get(k, 0.0) for k in ("reference", "train")}
    row = result_row(tokens, seconds, {k: watch.cpu_seconds.get(k, 0.0) for k in seconds}, before)
    return {**row, **_gpu_row(args["device"]), "steps": trainer.state.global_step}


def result_row(tokens: int, seconds: dict[str, float], cpu: dict[str, float], rss_before: float) -> dict[str, Any]:
    return {
        "tokens": tokens,
        "reference_s": round(seconds["reference"], 3),
        "train_s": round(seconds["train"], 3),
        "tokens_per_s": tokens / sum(seconds.values()),
        "tokens_per_cpu_s": tokens / sum(cpu.values()),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "rss_before_train_mb": round(rss_before, 1),
    }


def ratio_specs(arms: list[str]) -> dict[str, str]:
    """``ours`` against every other arm, and ``ours_prefix_sharing`` against every other arm (``ours`` included:
    the before/after of prefix sharing); ``{label: 'a/b:key'}`` for :func:`summarize`."""
    ratios = {}
    for mine, skipped in (("ours", "ours_prefix_sharing"), ("ours_prefix_sharing", None)):
        for other in (a for a in arms if mine in arms and a not in (mine, skipped)):
            for key in ("tokens_per_s", "tokens_per_cpu_s", "peak_rss_mb"):
                ratios[f"{key} {mine}/{other}"] = f"{mine}/{other}:{key}"
    return ratios


def worker(args: dict[str, Any]) -> None:
    row = run_ours(args) if args["arm"] in OUR_VARIANTS else run_trl(args, precompute=args["arm"] == "trl_precompute")
    row["step_s"] = row["train_s"] / max(row.pop("steps") or 1, 1)
    if args["device"] == "cuda":
        # 6N per trained token; TRL's default also runs a reference forward each step (2N); a precomputed reference
        # costs 2N per token once (tokens counts every epoch).
        per_token = 8.0 if args["arm"] == "trl_default" else 6.0 + 2.0 / args["epochs"]
        row["mfu"] = mfu(row["tokens_per_s"], args["parameters"], per_token, args["peak_tflops"])
    print(json.dumps(row))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--pairs", type=int, default=512, help="first N pairs of dpo_train.jsonl")
    parser.add_argument("--batch", type=int, default=16, help="pairs per optimizer step (one micro batch)")
    parser.add_argument("--epochs", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--arms", nargs="+", default=list(ARMS[:3]), choices=ARMS)
    parser.add_argument("--ours_overrides", nargs="*", default=[], help="extra Hydra overrides for our arm")
    parser.add_argument("--work_dir", default=str(Path(tempfile.gettempdir()) / "nemo_aligner_bench"))
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--precision", choices=("32", "bf16"), default="32")
    parser.add_argument("--pair_tokens", type=int, default=0, help="stretch each pair to about this many tokens")
    parser.add_argument("--peak_tflops", type=float, help="accelerator peak for MFU (default: 989, H200 bf16 dense)")
    parser.add_argument("--trl_python", default=default_trl_python(), help="a python with trl and datasets")
    parser.add_argument("--out")
    cli = parser.parse_args()
    if cli.worker:
        worker(json.loads(cli.worker))
        return
    work = Path(cli.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    hf_dir, nemo_path = build_models(work, cli.model)
    tokenizer = None
    if cli.pair_tokens:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    data = write_pairs(work / f"dpo_{cli.pairs}_{cli.pair_tokens}.jsonl", cli.pairs, cli.pair_tokens, tokenizer)
    result: dict[str, Any] = {
        "benchmark": "dpo_throughput",
        "model": {"name": cli.model, **SHAPES[cli.model].__dict__, "parameters": SHAPES[cli.model].num_parameters()},
        "settings": {k: v for k, v in vars(cli).items() if k not in ("worker", "out", "work_dir")},
        "machine": machine_info(cli.threads),
        "by_epochs": {},
    }
    script = Path(__file__).resolve()
    for epochs in cli.epochs:
        common = {"hf": str(hf_dir), "nemo": str(nemo_path), "data": str(data), "batch": cli.batch}
        common.update(epochs=epochs, threads=cli.threads, overrides=cli.ours_overrides, device=cli.device)
        common.update(precision=cli.precision, parameters=SHAPES[cli.model].num_parameters())
        common.update(peak_tflops=cli.peak_tflops or PEAK_TFLOPS.get(cli.device, 0.0))
        arms = {
            arm: (
                lambda arm=arm, common=common: run_worker(
                    script, {**common, "arm": arm}, cli.threads, cli.trl_python if "trl" in arm else None
                )
            )
            for arm in cli.arms
        }
        rounds = interleaved_rounds(arms, cli.rounds, log=lambda m: print(m, file=sys.stderr))
        ratios = ratio_specs(cli.arms)
        keys = ("tokens", "reference_s", "train_s", "tokens_per_s", "tokens_per_cpu_s", "peak_rss_mb")
        keys += ("rss_before_train_mb", "step_s") + (("peak_gpu_mb", "mfu") if cli.device == "cuda" else ())
        result["by_epochs"][str(epochs)] = {"rounds": rounds, **summarize(rounds, keys, ratios)}
    write_json(result, cli.out)


if __name__ == "__main__":
    main()
