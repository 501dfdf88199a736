"""Self-Rewarding (Yuan et al. 2024, arXiv 2401.10020) and Meta-Rewarding (Wu et al. 2024, arXiv 2407.19594) of a
GPT model: SPIN's iterations with responses judged by the model itself.

    python examples/nlp/gpt/train_gpt_self_rewarding.py pretrained_checkpoint.restore_from_path=/path/to/sft.nemo \\
        model.data.train_ds.file_path=train.jsonl model.data.validation_ds.file_path=val.jsonl \\
        trainer.self_rewarding.max_iterations=3 model.spin.ref_policy_kl_penalty=0.1 model.spin.use_meta_judge=true
    # the embedded default's tiny judge model (scripts/build_tiny_base_model.py --with_judge):
    #   --config-name gpt_self_rewarding_tiny pretrained_checkpoint.restore_from_path=...

Any key of conf/gpt_self_rewarding.yaml can be overridden (Hydra syntax). ``main(cfg)`` runs in-process.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, ListConfig

from nemo_aligner.algorithms.self_rewarding import SelfRewardingPairsDataset, SelfRewardingTrainer
from nemo_aligner.data.nlp.builders import build_dataloader
from nemo_aligner.models.nlp.gpt.megatron_gpt_spin_model import MegatronGPTSPINModel
from nemo_aligner.utils.config import hydra_runner
from nemo_aligner.utils.config_validation import ConfigChecker, ConfigError
from nemo_aligner.utils.exp_manager import CustomLoggerWrapper, exp_manager
from nemo_aligner.utils.train_script_utils import (
    build_spin_data,
    config_view,
    model_config_for_training,
    planned_iteration_steps,
    resolve_and_create_trainer,
    setup_model_and_trainer_state,
    validate_spin_config,
)
from nemo_aligner.utils.utils import retrieve_model_state_dict_in_cpu

TRT_LLM_MODEL_TYPES = ("gptnext", "llama")


def validate_self_rewarding_config(cfg: DictConfig, model_cfg: DictConfig, world_size: int) -> None:
    """SPIN's checks under ``trainer.self_rewarding`` and the judge settings, all problems in one ConfigError."""
    from nemo_aligner.judges import (
        judge_prompt_template,
        judge_reward_regex,
        length_control_for_iteration,
        meta_judge_prompt_template,
        meta_judge_reward_regex,
    )

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


@hydra_runner(config_path="conf", config_name="gpt_self_rewarding")
def main(cfg: DictConfig) -> None:
    trainer = resolve_and_create_trainer(cfg, "self_rewarding")
    restore_path = cfg.pretrained_checkpoint.restore_from_path
    model_cfg = model_config_for_training(cfg, restore_path)
    validate_self_rewarding_config(cfg, model_cfg, trainer.world_size)

    experiment = exp_manager(trainer, cfg.exp_manager)
    log = CustomLoggerWrapper(trainer.loggers)
    loop_cfg = cfg.trainer.self_rewarding
    data = build_spin_data(cfg, model_cfg, restore_path, max_steps=loop_cfg.max_steps)
    spin_loader = data.train_dataloader
    pairs = SelfRewardingPairsDataset(data.sft_train_dataset, spin_loader.dataset.pad_id)
    data.train_dataloader = build_dataloader(pairs, spin_loader.batch_sampler, spin_loader.collate_fn)

    def configure_model(model: MegatronGPTSPINModel) -> None:
        if model.reference_strategy == "cpu_weight_swap":
            model.ref_policy_state_dict = retrieve_model_state_dict_in_cpu(
                model, megatron_amp_O2=model_cfg.get("megatron_amp_O2", False)
            )

    loop = setup_model_and_trainer_state(
        SelfRewardingTrainer,
        MegatronGPTSPINModel,
        cfg,
        loop_cfg,
        model_cfg,
        restore_path,
        trainer,
        experiment,
        log,
        data,
        total_steps=planned_iteration_steps(loop_cfg, data.train_dataloader.batch_sampler.steps_per_epoch),
        configure_model=configure_model,
        sft_dataset=data.sft_train_dataset,
        rollout_dir=Path(experiment.log_dir) / "self_rewarding_rollouts",
        seed=int(model_cfg.get("seed", 1234)),
        chat_prompt_tokens=dict(model_cfg.data.get("chat_prompt_tokens") or {}),
    )
    loop.fit()


if __name__ == "__main__":
    main()
