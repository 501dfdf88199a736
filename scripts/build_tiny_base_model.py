"""Build (once) the embedded default's starting model: the tiny byte-level GPT after SFT on the bundled data.

    python scripts/build_tiny_base_model.py                    # prints the path of the cached .nemo
    python scripts/build_tiny_base_model.py --steps 300 --cache_dir /tmp/cache
    python scripts/build_tiny_base_model.py --with_judge   # Self-Rewarding's starting model (it can judge)

The model is trained from scratch with examples/nlp/gpt/conf/gpt_sft_tiny.yaml (random init, deterministic seed),
so the same code and data always give the same file. It is cached under ``--cache_dir`` (default
``$NEMO_ALIGNER_CACHE`` or ``~/.cache/nemo_aligner``) keyed by the steps, the config and the data, and reused.
DPO and SPIN on the embedded default start from it. ``--with_judge`` (``with_judge=True``) builds Self-Rewarding's
starting model instead: the SFT data is ``chat_train.jsonl`` plus ``chat_judge_train.jsonl`` (judge and meta-judge
conversations with the compact prompts of ``nemo_aligner.data.embedded``), the context is ``JUDGE_CONTEXT`` tokens
(a meta-judge prompt holds two judgements), so the same model answers, judges and meta-judges.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_STEPS = 500
DEFAULT_JUDGE_STEPS = 1000
"""Judging is learnt later than answering: 600 steps left the tiny judge at chance, 1000 do not
(``benchmarks/judge_study.py``)."""
JUDGE_CONTEXT = 320


def default_cache_dir() -> Path:
    return Path(os.environ.get("NEMO_ALIGNER_CACHE", Path.home() / ".cache" / "nemo_aligner"))


def build_tiny_base_model(
    steps: int | None = None, cache_dir: Path | None = None, extra_overrides=(), with_judge: bool = False
) -> Path:
    """Path of the cached SFT model for ``steps`` steps, training it first if needed (``with_judge``: see above).

    ``steps`` defaults to ``DEFAULT_STEPS``, or ``DEFAULT_JUDGE_STEPS`` with ``with_judge``.
    """
    if steps is None:
        steps = DEFAULT_JUDGE_STEPS if with_judge else DEFAULT_STEPS
    sys.path.insert(0, str(REPO))
    from examples.nlp.gpt.train_gpt_sft import main as sft_main
    from nemo_aligner.utils.config import compose_config

    conf_dir = REPO / "examples" / "nlp" / "gpt" / "conf"
    overrides = [
        f"trainer.sft.max_steps={steps}",
        "trainer.sft.max_epochs=100",
        f"trainer.sft.val_check_interval={steps}",
        f"trainer.sft.save_interval={steps}",
        "trainer.sft.limit_val_batches=4",
        "trainer.sft.evaluation.enabled=false",  # a base model for tests: its held-out score is not needed
        f"model.optim.sched.warmup_steps={max(steps // 20, 1)}",
        *extra_overrides,
    ]
    embedded = REPO / "nemo_aligner" / "data" / "embedded"
    names = ["chat_train.jsonl", "chat_validation.jsonl"] + (["chat_judge_train.jsonl"] if with_judge else [])
    cache_dir = Path(cache_dir or default_cache_dir())
    if with_judge:
        overrides.insert(0, f"model.encoder_seq_length={JUDGE_CONTEXT}")
    key = hashlib.sha256()
    for config in ("gpt_sft.yaml", "gpt_sft_tiny.yaml"):
        key.update((conf_dir / config).read_bytes())
    key.update(repr(overrides).encode())
    for name in names:
        key.update((embedded / name).read_bytes())
    if with_judge:  # the mixed file's path is not part of the key: only its content (hashed above) matters
        mixed = cache_dir / f"chat_with_judge_train_{key.hexdigest()[:12]}.jsonl"
        overrides.insert(0, f"model.data.train_ds.file_path={mixed}")
    prefix = "tiny_sft_judge" if with_judge else "tiny_sft"
    target = cache_dir / f"{prefix}_{steps}steps_{key.hexdigest()[:12]}.nemo"
    if target.is_file():
        return target
    if with_judge:
        cache_dir.mkdir(parents=True, exist_ok=True)
        mixed.write_bytes(b"".join((embedded / name).read_bytes() for name in ("chat_train.jsonl", names[-1])))
    work = cache_dir / f".build-{key.hexdigest()[:12]}"
    shutil.rmtree(work, ignore_errors=True)
    sft_main(compose_config(conf_dir, "gpt_sft_tiny", [f"exp_manager.explicit_log_dir={work}", *overrides]))
    cache_dir.mkdir(parents=True, exist_ok=True)
    os.replace(work / "checkpoints" / "megatron_gpt_sft.nemo", target)
    shutil.rmtree(work, ignore_errors=True)
    return target


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--steps", type=int, default=None, help=f"SFT optimizer steps ({DEFAULT_STEPS}, judge {DEFAULT_JUDGE_STEPS})"
    )
    parser.add_argument("--cache_dir", type=Path, default=None, help="where the .nemo is cached")
    parser.add_argument("--with_judge", action="store_true", help="also train the judge roles (Self-Rewarding)")
    args = parser.parse_args(argv)
    print(build_tiny_base_model(args.steps, args.cache_dir, with_judge=args.with_judge))


if __name__ == "__main__":
    main()
