"""Can the embedded default's tiny model judge? Judge and meta-judge accuracy of the Self-Rewarding start model
against the number of SFT steps it was trained for.

    python benchmarks/judge_study.py --steps 80 300 600 1200 --out benchmarks/results/judge_study.json
    python benchmarks/judge_study.py --steps 80 --max_samples 100      # a smoke run

Each start model is ``scripts/build_tiny_base_model.py --with_judge --steps N`` (SFT from scratch on the chat tasks
plus the judge and meta-judge conversations of ``chat_judge_train.jsonl``; cached in ``--cache_dir``). It is
evaluated greedily on the held-out ``chat_judge_validation.jsonl`` (judge prompts for answers to validation
questions, half of them wrong, and meta-judge comparisons of a right and a wrong judgement) by
:func:`nemo_aligner.evaluation.judge_accuracy`, which parses the outputs with ``gpt_self_rewarding_tiny.yaml``'s
regexes and score range exactly as the trainer does. Alongside: the model's own exact-match accuracy on
``chat_test.jsonl`` (how well it answers), since judging an arithmetic answer needs the arithmetic.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "examples" / "nlp" / "gpt" / "conf"


def evaluate(steps: int, cache_dir: Path | None, max_samples: int | None) -> dict:
    from nemo_aligner.evaluation import exact_match_accuracy, judge_accuracy
    from nemo_aligner.models.nlp.gpt.megatron_gpt_model import MegatronGPTModel
    from nemo_aligner.utils.config import compose_config
    from scripts.build_tiny_base_model import build_tiny_base_model

    started = time.perf_counter()
    path = build_tiny_base_model(steps, cache_dir, with_judge=True)
    built = time.perf_counter() - started
    cfg = compose_config(CONF_DIR, "gpt_self_rewarding_tiny", [])
    model = MegatronGPTModel.restore_from(str(path)).eval()
    embedded = REPO / "nemo_aligner" / "data" / "embedded"
    judge = judge_accuracy(
        model,
        str(embedded / "chat_judge_validation.jsonl"),
        cfg.model.data,
        cfg.model.spin,
        max_samples=max_samples,
        max_new_tokens=int(cfg.model.spin.judge_length_params.max_length),
    )
    answers = exact_match_accuracy(model, str(embedded / "chat_test.jsonl"), cfg.model.data, max_samples=max_samples)
    return {"steps": steps, "answer_exact_match": answers["accuracy"], **judge, "build_s": round(built, 1)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs="+", default=[80, 300, 600, 1200])
    parser.add_argument("--max_samples", type=int, default=None, help="first N lines of each file (all by default)")
    parser.add_argument("--cache_dir", type=Path, default=None, help="where start models are cached")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    import torch

    torch.set_num_threads(args.threads)
    rows = [evaluate(steps, args.cache_dir, args.max_samples) for steps in args.steps]
    result = {"benchmark": "judge_study", "threads": args.threads, "rows": rows}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
