"""DPO (and IPO, RPO, scale) training of a GPT model; full-parameter or LoRA.

    python examples/nlp/gpt/train_gpt_dpo.py pretrained_checkpoint.restore_from_path=/path/to/sft.nemo \\
        "model.data.data_prefix={train: [train.jsonl], validation: [val.jsonl], test: [val.jsonl]}" \\
        ++model.dpo.ref_policy_kl_penalty=0.1
    # LoRA: add model.peft.peft_scheme=lora

Any key of conf/gpt_dpo.yaml can be overridden (Hydra syntax). ``main(cfg)`` runs in-process with a config.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from nemo_aligner.algorithms.dpo import (
    DPOTrainer,
    checkpoint_identity,
    fingerprint,
    load_or_compute_reference,
    training_order_batches,
)
from nemo_aligner.models.nlp.gpt.megatron_gpt_dpo_model import MegatronGPTDPOModel
from nemo_aligner.utils.config import hydra_runner
from nemo_aligner.utils.exp_manager import CustomLoggerWrapper, exp_manager
from nemo_aligner.utils.train_script_utils import (
    build_dpo_data,
    configure_peft,
    export_lora_run,
    merge_lora_and_save,
    model_config_for_training,
    resolve_and_create_trainer,
    setup_model_and_trainer_state,
    uses_lora,
    validate_dpo_config,
)
from nemo_aligner.utils.utils import retrieve_model_state_dict_in_cpu


@hydra_runner(config_path="conf", config_name="gpt_dpo")
def main(cfg: DictConfig) -> None:
    trainer = resolve_and_create_trainer(cfg, "dpo")
    restore_path = cfg.pretrained_checkpoint.restore_from_path
    model_cfg = model_config_for_training(cfg, restore_path)
    validate_dpo_config(cfg, model_cfg, trainer.world_size)

    experiment = exp_manager(trainer, cfg.exp_manager)
    log = CustomLoggerWrapper(trainer.loggers)
    data = build_dpo_data(cfg, model_cfg, restore_path)

    def configure_model(model: MegatronGPTDPOModel) -> None:
        configure_peft(model, model_cfg)
        if model.reference_strategy == "cpu_weight_swap" and not hasattr(model, "lora_adapters_disabled"):
            model.ref_policy_state_dict = retrieve_model_state_dict_in_cpu(model)

    def precompute_reference(loop: DPOTrainer) -> None:
        """Reference log-probs from the initial weights, before a resumed checkpoint replaces them."""
        if loop.model.reference_strategy != "precomputed":
            return
        settings = {
            "model": checkpoint_identity(restore_path),
            "tokenizer": model_cfg.get("tokenizer"),
            "data": model_cfg.data,
            "peft": model_cfg.get("peft"),
            "batching": [model_cfg.micro_batch_size, model_cfg.global_batch_size, loop.model.log_prob_micro_batch_size],
            # These change the float rounding of the log-probs (a reused table would break the exact first loss).
            "forward": [loop.model.prefix_sharing, model_cfg.get("local_core_attention"), loop.model.packed_sequences],
            "parallel": [
                model_cfg.tensor_model_parallel_size,
                model_cfg.pipeline_model_parallel_size,
                trainer.world_size,
            ],
        }
        cache = Path(experiment.log_dir) / "reference_logprobs"
        train_ds, val_ds = data.train_dataloader.dataset, data.val_dataloader.dataset
        first_epoch_steps = min(loop.max_steps, loop.steps_per_epoch)
        train_batches = training_order_batches(
            data.train_dataloader, first_epoch_steps, loop.max_steps > first_epoch_steps
        )
        loop.train_reference = load_or_compute_reference(
            loop.model,
            train_batches,
            cache / f"train-{fingerprint({**settings, 'steps': loop.max_steps}, train_ds.paths)}.pt",
        )
        loop.val_reference = load_or_compute_reference(
            loop.model, data.val_dataloader, cache / f"validation-{fingerprint(settings, val_ds.paths)}.pt"
        )

    dpo_trainer = setup_model_and_trainer_state(
        DPOTrainer,
        MegatronGPTDPOModel,
        cfg,
        cfg.trainer.dpo,
        model_cfg,
        restore_path,
        trainer,
        experiment,
        log,
        data,
        configure_model=configure_model,
        before_resume=precompute_reference,
        nemo_fn=export_lora_run if uses_lora(model_cfg) else None,
    )
    dpo_trainer.fit()
    if uses_lora(model_cfg) and dpo_trainer.step >= dpo_trainer.max_steps:
        # The adapters were exported beside the checkpoints; the final .nemo is the merged, full model.
        merge_lora_and_save(dpo_trainer.model, dpo_trainer.ckpt_callback.final_nemo_path)


if __name__ == "__main__":
    main()
