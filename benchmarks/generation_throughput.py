"""Generation throughput (new tokens/s): our KV-cached ``model.generate`` vs Hugging Face ``generate`` vs no cache.

    python benchmarks/generation_throughput.py --out benchmarks/results/generation_tiny.json
    python benchmarks/generation_throughput.py --model 58m --out benchmarks/results/generation_58m.json

Same converted weights on both sides (``benchmarks/common.py``), greedy decoding of exactly ``--new_tokens``
tokens (no early stop) after prompts of ``--prompt_length`` tokens (the start of embedded DPO prompts, all the
same length so the no-cache loop needs no padding), at batch 1 and batch 32, fp32, in one process (no memory is
measured here), with the arms interleaved and the order rotated every round. Arms:

* ``ours``: ``MegatronGPTModel.generate`` (megatron-core static KV cache, ``nemo_aligner/generation``), with its
  default fast decode step;
* ``ours_plain``: the same with ``fast_decode=False`` (every step through megatron-core's modules, under the
  CPU-support function mode): the code before the fast step, for a before/after in the same run;
* ``hf``: ``LlamaForCausalLM.generate(do_sample=False, use_cache=True)``;
* ``ours_no_cache``: the same model, a full forward over the whole sequence for every new token;
* ``hf_no_cache``: ``generate(use_cache=False)``.

Importing our model enters the CPU-support function mode (``nemo_aligner/utils/cpu_support.py``), which adds a
Python call to every torch operation; the HF and no-cache arms run outside it, as they would without our library
(so the no-cache baseline is not slowed by it either).

On a GPU (``docs/performance.md``, GPU section), bf16 weights on both sides (ours: ``trainer.precision=bf16`` +
``megatron_amp_O2``; HF: ``dtype=bfloat16``, sdpa attention), batch 1 and 64; times include a CUDA synchronize:

    python benchmarks/generation_throughput.py --device cuda --precision bf16 --model 0.5b --batches 1 64 \\
        --prompt_length 128 --new_tokens 128 --rounds 2 --arms ours hf \\
        --out benchmarks/results/generation_0.5b_<gpu>.json

The JSON also reports how many greedy continuations are identical between ours and HF (ties in float32 rounding
may legitimately differ late in a sequence).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import EMBEDDED, SHAPES, build_models, machine_info, read_jsonl, write_json  # noqa: E402
from nemo_aligner.evaluation import greedy_sampling_params  # noqa: E402

GREEDY = greedy_sampling_params(end_strings=())
ARMS = ["ours", "ours_plain", "hf", "ours_no_cache", "hf_no_cache"]


def prompts_of_length(tokenizer, count: int, length: int) -> list[list[int]]:
    ids = []
    for row in read_jsonl(EMBEDDED / "dpo_train.jsonl"):
        tokens = tokenizer.text_to_ids(row["prompt"])
        if len(tokens) >= length:
            ids.append(tokens[:length])
        if len(ids) == count:
            return ids
    raise ValueError(f"fewer than {count} embedded DPO prompts have {length} tokens")


def no_cache_greedy(model, prompts, new_tokens: int):
    """Greedy decoding by a full forward per new token; EOS is excluded, as ``min_length`` does in the others."""
    import torch

    tokens = torch.tensor(prompts, device=next(model.parameters()).device)
    for _ in range(new_tokens):
        logits = model(tokens)[:, -1]
        logits[:, model.tokenizer.eos_id] = float("-inf")
        tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
    return tokens[:, len(prompts[0]) :].tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--prompt_length", type=int, default=48)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=ARMS)
    parser.add_argument("--work_dir", default=str(Path(tempfile.gettempdir()) / "nemo_aligner_bench"))
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--precision", choices=("32", "bf16"), default="32")
    parser.add_argument("--out")
    cli = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from nemo_aligner.generation import generate
    from nemo_aligner.models.nlp.gpt.megatron_gpt_model import MegatronGPTModel
    from nemo_aligner.utils.cpu_support import device_rewrites_suspended

    torch.set_num_threads(cli.threads)
    work = Path(cli.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    hf_dir, nemo_path = build_models(work, cli.model)
    if cli.precision == "bf16":
        from nemo_aligner.utils.utils import load_and_override_model_config, load_from_nemo

        cfg = load_and_override_model_config(nemo_path, {"precision": "bf16", "megatron_amp_O2": True})
        ours = load_from_nemo(MegatronGPTModel, cfg, restore_path=nemo_path).eval()
    else:
        ours = MegatronGPTModel.restore_from(nemo_path).eval()  # on current_device(): the GPU when there is one
    dtype = torch.bfloat16 if cli.precision == "bf16" else torch.float32
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype, attn_implementation="sdpa").to(cli.device).eval()
    length = {"max_length": cli.new_tokens, "min_length": cli.new_tokens}

    def run_hf(prompts, use_cache: bool):
        with device_rewrites_suspended():
            out = hf.generate(
                torch.tensor(prompts, device=cli.device),
                attention_mask=torch.ones(len(prompts), len(prompts[0]), dtype=torch.long, device=cli.device),
                max_new_tokens=cli.new_tokens,
                min_new_tokens=cli.new_tokens,
                do_sample=False,
                use_cache=use_cache,
                pad_token_id=hf.config.pad_token_id,
            )
        return out[:, len(prompts[0]) :].tolist()

    def run_no_cache(prompts):
        with device_rewrites_suspended():
            return no_cache_greedy(ours, prompts, cli.new_tokens)

    arms = {
        "ours": lambda p: ours.generate(p, GREEDY, length).response_ids,
        "ours_plain": lambda p: generate(ours, p, GREEDY, length, fast_decode=False).response_ids,
        "hf": lambda p: run_hf(p, True),
        "ours_no_cache": run_no_cache,
        "hf_no_cache": lambda p: run_hf(p, False),
    }
    arms = {name: arms[name] for name in cli.arms}
    result: dict[str, Any] = {
        "benchmark": "generation_throughput",
        "model": {"name": cli.model, **SHAPES[cli.model].__dict__, "parameters": SHAPES[cli.model].num_parameters()},
        "settings": {k: v for k, v in vars(cli).items() if k not in ("out", "work_dir")},
        "machine": machine_info(cli.threads),
        "by_batch": {},
    }
    names = list(arms)

    def synchronize():
        if cli.device == "cuda":
            torch.cuda.synchronize()

    if cli.device == "cuda":
        result["machine"]["gpu"] = torch.cuda.get_device_name()
    with torch.no_grad():
        for batch in cli.batches:
            prompts = prompts_of_length(ours.tokenizer, batch, cli.prompt_length)
            outputs, times, cpu_times = {}, {name: [] for name in names}, {name: [] for name in names}
            for r in range(cli.rounds):
                for name in names[r % len(names) :] + names[: r % len(names)]:
                    synchronize()
                    start, cpu_start = time.perf_counter(), time.process_time()
                    outputs[name] = arms[name](prompts)
                    synchronize()
                    times[name].append(time.perf_counter() - start)
                    cpu_times[name].append(time.process_time() - cpu_start)
                    print(f"batch {batch} round {r} {name}: {times[name][-1]:.3f}s", file=sys.stderr)
            new = batch * cli.new_tokens
            assert all(len(o) == cli.new_tokens for out in outputs.values() for o in out)
            pairs = [("ours", "hf"), ("ours", "ours_plain"), ("ours_plain", "hf"), ("ours", "ours_no_cache")]
            pairs += [("hf", "hf_no_cache")]
            per_round = {  # speed of a over b: b's time over a's, round by round
                f"{a}/{b}": [tb / ta for ta, tb in zip(times[a], times[b])]
                for a, b in pairs
                if a in times and b in times
            }
            cpu_per_round = {
                f"{a}/{b}": [tb / ta for ta, tb in zip(cpu_times[a], cpu_times[b])]
                for a, b in pairs
                if a in times and b in times
            }
            result["by_batch"][str(batch)] = {
                "new_tokens_per_s": {name: new / statistics.median(t) for name, t in times.items()},
                "seconds_per_round": times,
                "speedup_median": {k: statistics.median(v) for k, v in per_round.items()},
                "speedup_per_round": per_round,
                "cpu_seconds_per_round": cpu_times,
                "cpu_speedup_median": {k: statistics.median(v) for k, v in cpu_per_round.items()},
                "cpu_speedup_per_round": cpu_per_round,
                "identical_continuations": {
                    f"ours_vs_{name}": sum(a == b for a, b in zip(outputs["ours"], outputs[name])) / batch
                    for name in outputs
                    if name != "ours" and "ours" in outputs
                },
            }
    result["machine"]["load_average_at_end"] = os.getloadavg()
    write_json(result, cli.out)


if __name__ == "__main__":
    main()
