"""SPIN (Self-Play Fine-Tuning) of a GPT model.

    python examples/nlp/gpt/train_gpt_spin.py pretrained_checkpoint.restore_from_path=/path/to/sft.nemo \\
        model.data.train_ds.file_path=train.jsonl model.data.validation_ds.file_path=val.jsonl \\
        trainer.spin.max_iterations=1 model.spin.ref_policy_kl_penalty=0.1
    # the embedded default's tiny model: --config-name gpt_spin_tiny pretrained_checkpoint.restore_from_path=...

Any key of conf/gpt_spin.yaml can be overridden (Hydra syntax). ``main(cfg)`` runs in-process with a config.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from nemo_aligner.algorithms.spin import SPINTrainer
from nemo_aligner.models.nlp.gpt.megatron_gpt_spin_model import MegatronGPTSPINModel
from nemo_aligner.utils.config import hydra_runner
from nemo_aligner.utils.exp_manager import CustomLoggerWrapper, exp_manager
from nemo_aligner.utils.train_script_utils import (
    build_spin_data,
    model_config_for_training,
    planned_iteration_steps,
    resolve_and_create_trainer,
    setup_model_and_trainer_state,
    validate_spin_config,
)
from nemo_aligner.utils.utils import retrieve_model_state_dict_in_cpu


@hydra_runner(config_path="conf", config_name="gpt_spin")
def main(cfg: DictConfig) -> None:
    trainer = resolve_and_create_trainer(cfg, "spin")
    restore_path = cfg.pretrained_checkpoint.restore_from_path
    model_cfg = model_config_for_training(cfg, restore_path)
    validate_spin_config(cfg, model_cfg, trainer.world_size)

    experiment = exp_manager(trainer, cfg.exp_manager)
    log = CustomLoggerWrapper(trainer.loggers)
    data = build_spin_data(cfg, model_cfg, restore_path, max_steps=cfg.trainer.spin.max_steps)

    def configure_model(model: MegatronGPTSPINModel) -> None:
        if model.reference_strategy == "cpu_weight_swap":
            model.ref_policy_state_dict = retrieve_model_state_dict_in_cpu(
                model, megatron_amp_O2=model_cfg.get("megatron_amp_O2", False)
            )

    spin_trainer = setup_model_and_trainer_state(
        SPINTrainer,
        MegatronGPTSPINModel,
        cfg,
        cfg.trainer.spin,
        model_cfg,
        restore_path,
        trainer,
        experiment,
        log,
        data,
        total_steps=planned_iteration_steps(cfg.trainer.spin, data.train_dataloader.batch_sampler.steps_per_epoch),
        configure_model=configure_model,
        sft_dataset=data.sft_train_dataset,
        rollout_dir=Path(experiment.log_dir) / "spin_rollouts",
        seed=int(model_cfg.get("seed", 1234)),
    )
    spin_trainer.fit()


if __name__ == "__main__":
    main()
