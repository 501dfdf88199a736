"""Where a SPIN and a Self-Rewarding iteration spend their time: rollout, judging, reference scoring, training.

    python benchmarks/iteration_phases.py --out benchmarks/results/iteration_phases.json

Runs ``train_gpt_spin.py --config-name gpt_spin_tiny`` and ``train_gpt_self_rewarding.py --config-name
gpt_self_rewarding_tiny`` (in this process, ``--iterations`` iterations each, validation off) from the embedded
tiny model (``scripts/build_tiny_base_model.py``, trained once and cached in ``--cache_dir``; Self-Rewarding's
with its judge data) and collects the ``timers/*_s`` metrics the trainers log after every iteration:

* ``timers/rollout_s``: the whole rollout phase (policy generation, and for Self-Rewarding the judge; reference
  log-probs of the pairs included);
* ``timers/judging_s``: judge and meta-judge generations and score parsing (Self-Rewarding; inside rollout_s);
* ``timers/reference_s``: the reference log-prob forward over the pairs (inside rollout_s);
* ``timers/train_s``: the iteration's optimizer steps;
* ``reference_forward_tokens``: token positions (padding included) the reference pass ran through the model.

Generation alone is ``rollout_s - judging_s - reference_s``; the JSON reports it as ``generation_s``.

SPIN runs in two arms, ``--rounds`` times, interleaved: ``spin`` (the default: the generated responses' reference
log-probs come from generation, only the ground truth is forwarded) and ``spin_reference_forward``
(``model.spin.reference_from_generation=false``: both sides forwarded). ``spin_median`` holds each arm's medians.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine_info, write_json  # noqa: E402

SFT_STEPS = 150
JUDGE_STEPS = 80  # the judge-capable model of the Self-Rewarding tests


def run_phases(
    script: str, config_name: str, loop: str, model: Path, iterations: int, *extra: str
) -> list[dict[str, float]]:
    """Per iteration, the ``timers/*`` metrics the trainer logged."""
    import importlib

    import torch

    from nemo_aligner.algorithms.base import BaseTrainer
    from nemo_aligner.models.nlp.gpt import megatron_gpt_dpo_model
    from nemo_aligner.utils.config import compose_config

    logged: list[dict[str, float]] = []
    originals = (BaseTrainer.log, megatron_gpt_dpo_model._forward, megatron_gpt_dpo_model.forward_packed)
    reference_tokens = [0]

    def capture(self, metrics, prefix):
        timers = {k.removeprefix("timers/"): v for k, v in metrics.items() if k.startswith("timers/")}
        if timers:
            timers["generation_s"] = timers["rollout_s"] - timers.get("judging_s", 0.0) - timers.get("reference_s", 0)
            logged.append({k: round(v, 3) for k, v in timers.items()})
            logged[-1]["reference_forward_tokens"] = reference_tokens[0]  # padding included: what was computed
            reference_tokens[0] = 0
        return originals[0](self, metrics, prefix)

    def counting_forward(chunk, tokens):  # two rows per pair
        if not torch.is_grad_enabled():  # reference scoring; training forwards need gradients
            reference_tokens[0] += tokens.numel()
        return originals[1](chunk, tokens)

    def counting_forward_packed(chunk, packed):  # one row per pair (prefix sharing)
        if not torch.is_grad_enabled():
            reference_tokens[0] += packed.tokens.numel()
        return originals[2](chunk, packed)

    BaseTrainer.log = capture
    megatron_gpt_dpo_model._forward = counting_forward
    megatron_gpt_dpo_model.forward_packed = counting_forward_packed
    try:
        main = importlib.import_module(f"examples.nlp.gpt.{script}").main
        conf = Path(__file__).resolve().parents[1] / "examples" / "nlp" / "gpt" / "conf"
        with tempfile.TemporaryDirectory() as log_dir:
            overrides = [
                f"exp_manager.explicit_log_dir={log_dir}",
                f"pretrained_checkpoint.restore_from_path={model}",
                f"trainer.{loop}.max_iterations={iterations}",
                f"trainer.{loop}.limit_val_batches=0",
                "exp_manager.checkpoint_callback_params.save_nemo_on_train_end=false",
                *extra,
            ]
            main(compose_config(conf, config_name, overrides))
    finally:
        BaseTrainer.log, megatron_gpt_dpo_model._forward, megatron_gpt_dpo_model.forward_packed = originals
    return logged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds of the two SPIN arms")
    parser.add_argument("--cache_dir", default=str(Path(tempfile.gettempdir()) / "nemo_aligner_bench" / "tiny_models"))
    parser.add_argument("--out")
    cli = parser.parse_args()

    import torch

    from scripts.build_tiny_base_model import build_tiny_base_model

    torch.set_num_threads(cli.threads)
    cache = Path(cli.cache_dir)
    result: dict[str, Any] = {
        "benchmark": "iteration_phases",
        "settings": vars(cli),
        "machine": machine_info(cli.threads),
    }
    spin_model = build_tiny_base_model(steps=SFT_STEPS, cache_dir=cache)
    arms = {"spin": [], "spin_reference_forward": ["model.spin.reference_from_generation=false"]}
    result["spin_rounds"] = {arm: [] for arm in arms}
    for _ in range(cli.rounds):
        for arm, extra in arms.items():
            phases = run_phases("train_gpt_spin", "gpt_spin_tiny", "spin", spin_model, cli.iterations, *extra)
            result["spin_rounds"][arm].append(phases)
    result["spin_median"] = {
        arm: {
            key: statistics.median(iteration[key] for phases in rounds for iteration in phases) for key in rounds[0][0]
        }
        for arm, rounds in result["spin_rounds"].items()
    }
    judge_model = build_tiny_base_model(steps=JUDGE_STEPS, cache_dir=cache, with_judge=True)
    result["self_rewarding"] = run_phases(
        "train_gpt_self_rewarding", "gpt_self_rewarding_tiny", "self_rewarding", judge_model, cli.iterations
    )
    write_json(result, cli.out)


if __name__ == "__main__":
    main()
