"""Shared pieces of the performance benchmarks: the tiny Llama both sides run, subprocess workers, statistics.

The machine these run on is shared and noisy, so every comparison is made of *rounds*: one run of each arm, one
after another, in a fresh subprocess each (so peak RSS is the arm's own), arms rotated from round to round. The
JSON reports each arm's median and, per round, the ratio of the arms measured in that round; the median of those
ratios is the headline number.

Weights: a Hugging Face ``LlamaForCausalLM`` with random weights (seeded), saved locally with a character-level
tokenizer built from the embedded DPO data (every character one id, the ``<extra_id_*>`` chat tokens single
ids), then converted to ``.nemo`` with ``scripts/checkpoint_converters/convert_llama_hf_to_nemo.py``. A
character-level tokenizer tokenizes ``prompt + response`` exactly as ``prompt`` then ``response``, so TRL (which
splits at the first differing token) and nemo_aligner (which requires the prompt's ids to be a prefix) train on
the same token ids; the DPO benchmark checks that the token counts agree.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
EMBEDDED = REPO / "nemo_aligner" / "data" / "embedded"
SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<extra_id_0>", "<extra_id_1>", "<extra_id_2>"]


@dataclass(frozen=True)
class LlamaShape:
    """The architecture of a benchmark model (Hugging Face ``LlamaConfig`` keys)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int = 512

    def num_parameters(self) -> int:
        head_dim = self.hidden_size // self.num_attention_heads
        attention = self.hidden_size * head_dim * (2 * self.num_attention_heads + 2 * self.num_key_value_heads)
        mlp = 3 * self.hidden_size * self.intermediate_size
        per_layer = attention + mlp + 2 * self.hidden_size
        return self.num_hidden_layers * per_layer + 2 * self.vocab_size * self.hidden_size + self.hidden_size


SHAPES = {
    # ~0.8M parameters: the "tiny Llama" of the issue.
    "tiny": LlamaShape(128, 4, 4, 2, 352, 128),
    # ~58M parameters with a 32k vocabulary (only the first ~70 ids occur in the data, but every position still
    # computes full-vocabulary logits, as a real tokenizer's model does).
    "58m": LlamaShape(512, 8, 8, 8, 1408, 32000),
    # ~0.63B parameters, Qwen2.5-0.5B's shape as a Llama (GQA 14/2, untied 152k vocabulary): the GPU benchmark.
    "0.5b": LlamaShape(896, 24, 14, 2, 4864, 151936, max_position_embeddings=1024),
}
# H200 (and H100 SXM) dense bf16 peak, for MFU.
PEAK_TFLOPS = {"cuda": 989.0}


def mfu(tokens_per_s: float, parameters: int, flops_per_token_per_param: float, peak_tflops: float) -> float:
    """Model FLOPs utilisation: ``k N`` FLOPs per token (6N forward+backward, 8N with a reference forward too)."""
    return tokens_per_s * flops_per_token_per_param * parameters / (peak_tflops * 1e12)


def read_jsonl(path: Path, limit: int | None = None) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        lines = [json.loads(line) for line in f if line.strip()]
    return lines[:limit] if limit else lines


def build_char_tokenizer(texts: Sequence[str], vocab_size: int):
    """A character-level ``PreTrainedTokenizerFast``: special tokens, every character of ``texts``, then unused
    tokens up to ``vocab_size`` (so the model has no padded vocabulary rows, which our generation masks out and
    Hugging Face's does not)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted({c for text in texts for c in text})
    tokens = SPECIAL_TOKENS + chars
    if len(tokens) > vocab_size:
        raise ValueError(f"the data has {len(tokens)} distinct tokens, more than the model's {vocab_size}")
    tokens += [f"<unused_{i}>" for i in range(vocab_size - len(tokens))]
    vocab = {token: i for i, token in enumerate(tokens)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[4:]})
    return tokenizer


def build_models(out_dir: Path, shape_name: str, seed: int = 0) -> tuple[Path, Path]:
    """``(hf_dir, nemo_path)`` of a randomly initialised Llama of ``SHAPES[shape_name]`` (built once, then reused)."""
    hf_dir, nemo_path = out_dir / f"hf_{shape_name}", out_dir / f"llama_{shape_name}.nemo"
    if nemo_path.exists():
        return hf_dir, nemo_path
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    texts = [r[k] for name in ("dpo_train.jsonl", "sft_train.jsonl") for r in read_jsonl(EMBEDDED / name) for k in r]
    shape = SHAPES[shape_name]
    tokenizer = build_char_tokenizer([t for t in texts if isinstance(t, str)], shape.vocab_size)
    torch.manual_seed(seed)
    config = LlamaConfig(
        **shape.__dict__,
        rms_norm_eps=1e-5,
        # Larger than the usual 0.02 so that logits are peaked: greedy decoding then has no near-ties, and the
        # generation benchmark can check that ours and HF's continuations are identical.
        initializer_range=0.2,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(hf_dir)
    tokenizer.save_pretrained(hf_dir)
    run_checked(
        [
            sys.executable,
            str(REPO / "scripts" / "checkpoint_converters" / "convert_llama_hf_to_nemo.py"),
            "--input_name_or_path",
            str(hf_dir),
            "--output_path",
            str(nemo_path),
        ]
    )
    return hf_dir, nemo_path


def subprocess_env(threads: int) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    return env


def run_checked(cmd: list[str], threads: int = 1) -> str:
    result = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(threads), cwd=REPO)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed:\n{result.stderr[-4000:]}")
    return result.stdout


def default_trl_python() -> str:
    """The python the TRL arms run with: ``$NEMO_ALIGNER_TRL_PYTHON``, else ``/work/venv_trl/bin/python`` when it
    exists, else this one. TRL, datasets and pyarrow live in their own environment (``docs/performance.md``): this
    project's environment does not hold them, and a TRL arm run with its python fails importing ``datasets``."""
    if os.environ.get("NEMO_ALIGNER_TRL_PYTHON"):
        return os.environ["NEMO_ALIGNER_TRL_PYTHON"]
    return "/work/venv_trl/bin/python" if Path("/work/venv_trl/bin/python").exists() else sys.executable


def run_worker(script: Path, args: dict[str, Any], threads: int, python: str | None = None) -> dict[str, Any]:
    """Run ``script --worker '<json args>'`` in a fresh process (``python``, default this one); its last stdout
    line is its JSON result."""
    stdout = run_checked([python or sys.executable, str(script), "--worker", json.dumps(args)], threads)
    return json.loads(stdout.strip().splitlines()[-1])


def peak_rss_mb() -> float:
    """This process's peak resident set size so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


class Stopwatch:
    """Accumulates wall time and this process's CPU time of wrapped callables by name.

    On a loaded machine wall time mostly measures the neighbours; with one torch thread the process's CPU time
    (user + system) is the steadier measure of the work done, so the benchmarks report both.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}

    def wrap(self, name: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            start, cpu_start = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
                self.cpu_seconds[name] = self.cpu_seconds.get(name, 0.0) + time.process_time() - cpu_start

        return timed


def interleaved_rounds(
    arms: dict[str, Callable[[], dict[str, Any]]], rounds: int, log: Callable[[str], None] = print
) -> list[dict[str, dict[str, Any]]]:
    """``rounds`` rounds of every arm, the order rotated each round; returns each round's results by arm."""
    names = list(arms)
    results = []
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        round_results = {}
        for name in order:
            round_results[name] = arms[name]()
            log(f"round {r} {name}: {json.dumps(round_results[name])}")
        results.append(round_results)
    return results


def summarize(rounds: list[dict[str, dict[str, Any]]], keys: Sequence[str], baseline_ratios: dict[str, str]):
    """Per arm the median of each key; per ``{label: 'a/b:key'}`` the median over rounds of a/b of that key."""
    arms = list(rounds[0])
    medians = {
        arm: {key: statistics.median(r[arm][key] for r in rounds) for key in keys if key in rounds[0][arm]}
        for arm in arms
    }
    ratios = {}
    for label, spec in baseline_ratios.items():
        pair, key = spec.split(":")
        a, b = pair.split("/")
        per_round = [r[a][key] / r[b][key] for r in rounds]
        ratios[label] = {"median": statistics.median(per_round), "per_round": per_round}
    return {"medians": medians, "ratios": ratios}


def marked(event: str, fn: Callable) -> Callable:
    """``fn`` recording ``event`` (``nemo_aligner.utils.timers.mark_event``) when first called: the peers' scripts
    report the same start-up events as our trainer."""
    from nemo_aligner.utils.timers import mark_event

    def wrapped(*args, **kwargs):
        mark_event(event)
        return fn(*args, **kwargs)

    return wrapped


def first_step_callback():
    """A Hugging Face ``TrainerCallback`` recording ``first_step`` when the first optimizer step begins."""
    from transformers import TrainerCallback

    from nemo_aligner.utils.timers import mark_event

    class FirstStepMarker(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            mark_event("first_step")

    return FirstStepMarker()


def machine_info(threads: int) -> dict[str, Any]:
    import platform

    import torch

    return {
        "cpu_count": os.cpu_count(),
        "torch_threads_per_run": threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average_at_start": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def write_json(result: dict[str, Any], out: str | None) -> None:
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
