"""Self-Rewarding and Meta-Rewarding, assembled: SPIN's checks plus the judge's, SPIN's data with judged pairs,
model, loop, optimizer (``run``)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, ListConfig

from nemo_aligner.algorithms.self_rewarding import SelfRewardingTrainer
from nemo_aligner.data.nlp.pairs import SelfRewardingPairsDataset
from nemo_aligner.judges import (
    judge_prompt_template,
    judge_reward_regex,
    length_control_for_iteration,
    meta_judge_prompt_template,
    meta_judge_reward_regex,
)
from nemo_aligner.models.nlp.gpt.megatron_gpt_spin_model import MegatronGPTSelfRewardingModel
from nemo_aligner.recipes.common import assemble, config_view, start_run, train
from nemo_aligner.recipes.spin import build_spin_data, start_reference, validate_spin_config
from nemo_aligner.utils.config import model_seed
from nemo_aligner.utils.config_validation import ConfigChecker, ConfigError


def run(cfg: DictConfig) -> None:
    """Self-Rewarding of ``pretrained_checkpoint.restore_from_path`` with ``cfg`` (``conf/gpt_self_rewarding.yaml``)."""
    restore_path = cfg.pretrained_checkpoint.restore_from_path
    started = start_run(cfg, "self_rewarding", restore_path, validate_self_rewarding_config)
    model_cfg = started.model_cfg
    data = build_spin_data(
        cfg, model_cfg, restore_path, max_steps=started.loop_cfg.max_steps, pairs_cls=SelfRewardingPairsDataset
    )
    loop = assemble(
        started,
        SelfRewardingTrainer,
        MegatronGPTSelfRewardingModel,
        data,
        configure_model=start_reference,
        sft_dataset=data.sft_train_dataset,
        rollout_dir=Path(started.experiment.log_dir) / "self_rewarding_rollouts",
        seed=model_seed(model_cfg),
        chat_prompt_tokens=dict(model_cfg.data.get("chat_prompt_tokens") or {}),
    )
    train(started, loop)


TRT_LLM_MODEL_TYPES = ("gptnext", "llama")


def validate_self_rewarding_config(cfg: DictConfig, model_cfg: DictConfig, world_size: int) -> None:
    """SPIN's checks under ``trainer.self_rewarding`` and the judge settings, all problems in one ConfigError."""
    checker = ConfigChecker(config_view(cfg, model_cfg))
    if checker.get("trainer.self_rewarding.trt_llm.enable"):
        checker.add(
            "trainer.self_rewarding.trt_llm.enable",
            "TensorRT-LLM is not installed in this build: set it to false (generation uses the KV-cached "
            "megatron-core path)",
        )
    checker.choice("trainer.self_rewarding.trt_llm.model_type", TRT_LLM_MODEL_TYPES, required=False)
    checker.integer("model.spin.num_responses_to_gen", minimum=2)
    checker.integer("model.spin.num_evals_to_average", minimum=1)
    for key in ("use_meta_judge", "first_iteration_sft", "normalise_prompt"):
        checker.boolean(f"model.spin.{key}")
    pcnt = checker.number("model.spin.meta_judge_pcnt")
    if pcnt is not None and pcnt > 1:
        checker.add("model.spin.meta_judge_pcnt", f"is a share of the global batch in [0, 1] (<= 0: none), got {pcnt}")
    relative = checker.number("model.spin.meta_max_relative_pcnt")
    if relative is not None and not 0 < relative <= 1:
        checker.add("model.spin.meta_max_relative_pcnt", f"must be in (0, 1], got {relative}")
    low, high = checker.get("model.spin.judge_score_low"), checker.get("model.spin.judge_score_high")
    checker.number("model.spin.judge_score_low")
    checker.number("model.spin.judge_score_high")
    if isinstance(low, (int, float)) and isinstance(high, (int, float)) and low >= high:
        checker.add("model.spin.judge_score_high", f"must be above judge_score_low ({low}), got {high}")
    if checker.get("model.spin.use_meta_judge") and (checker.get("model.spin.num_evals_to_average") or 0) < 2:
        checker.add("model.spin.num_evals_to_average", "the meta-judge compares judgements: needs at least 2")
    for key, build in (
        ("llm_judge_prompt", judge_prompt_template),
        ("llm_meta_judge_prompt", meta_judge_prompt_template),
        ("judge_reward_regex", judge_reward_regex),
        ("meta_judge_reward_regex", meta_judge_reward_regex),
    ):
        if checker.get(f"model.spin.{key}") is not None:
            try:
                build(checker.get(f"model.spin.{key}"))
            except ValueError as err:
                checker.add(f"model.spin.{key}", str(err))
    length_control = checker.get("model.spin.length_control")
    iterations = checker.get("trainer.self_rewarding.max_iterations")
    try:
        control = list(length_control) if isinstance(length_control, ListConfig) else length_control
        for iteration in range(iterations if isinstance(iterations, int) else 1):
            length_control_for_iteration(control, iteration, iterations)
    except ValueError as err:
        checker.add("model.spin.length_control", str(err))
    try:
        validate_spin_config(cfg, model_cfg, world_size, loop="self_rewarding")
    except ConfigError as err:  # one report with SPIN's problems and ours
        checker.problems[:0] = str(err).split("\n  ")[1:]
    checker.raise_if_any()
