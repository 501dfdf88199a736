"""A DPO pipeline written against NeMo-Aligner's Python API, the way its users write theirs: the same imports from
``nemo_aligner`` and the same calls, in the same order, as NeMo-Aligner's ``examples/nlp/gpt/train_gpt_dpo.py``
(not its code: this file exercises the names ``docs/coming_from_nemo_aligner.md`` lists). Its three ``nemo.*``
imports are the ones that doc says to change: ``hydra_runner``, ``logging`` and ``exp_manager``.
"""

from __future__ import annotations

import logging
from functools import partial

from omegaconf import OmegaConf

from nemo_aligner.algorithms.dpo import DPOTrainer, dpo_custom_collate
from nemo_aligner.data.nlp.builders import (
    build_dataloader,
    build_train_valid_test_dpo_datasets,
    build_train_valid_test_dpo_packed_datasets,
    identity_collate,
)
from nemo_aligner.models.nlp.gpt.megatron_gpt_dpo_model import MegatronGPTDPOModel
from nemo_aligner.utils.config import hydra_runner
from nemo_aligner.utils.distributed import Timer
from nemo_aligner.utils.exp_manager import exp_manager
from nemo_aligner.utils.train_script_utils import (
    CustomLoggerWrapper,
    add_custom_checkpoint_callback,
    extract_optimizer_scheduler_from_ptl_model,
    init_distributed,
    init_peft,
    init_using_ptl,
    resolve_and_create_trainer,
    retrieve_custom_trainer_state_dict,
)
from nemo_aligner.utils.utils import load_and_override_model_config, load_from_nemo, retrieve_model_state_dict_in_cpu

log = logging.getLogger(__name__)


@hydra_runner(config_path="../../examples/nlp/gpt/conf", config_name="gpt_dpo")
def main(cfg) -> None:
    restore_path = cfg.pretrained_checkpoint.restore_from_path
    cfg.model = load_and_override_model_config(restore_path, cfg.model)
    log.info("config:\n%s", OmegaConf.to_yaml(cfg))

    trainer = resolve_and_create_trainer(cfg, "dpo")
    exp_manager(trainer, cfg.exp_manager)
    logger = CustomLoggerWrapper(trainer.loggers)

    model = load_from_nemo(
        MegatronGPTDPOModel, cfg.model, trainer, strict=True, load_base_model_only=False, restore_path=restore_path
    )
    init_peft(model, cfg.model)
    if cfg.model.peft.peft_scheme == "none":
        model.ref_policy_state_dict = retrieve_model_state_dict_in_cpu(
            model, megatron_amp_O2=cfg.model.get("megatron_amp_O2", False)
        )

    state = retrieve_custom_trainer_state_dict(trainer) if trainer.ckpt_path is not None else None
    consumed_samples = state["consumed_samples"] if state is not None else 0
    init_distributed(trainer, model, cfg.model.get("transformer_engine", False))

    data = cfg.model.data
    packed = data.data_impl == "packed_jsonl"
    build_datasets = build_train_valid_test_dpo_packed_datasets if packed else build_train_valid_test_dpo_datasets
    train_ds, validation_ds, _ = build_datasets(
        cfg=cfg.model,
        data_prefix=data.data_prefix,
        data_impl=data.data_impl,
        splits_string=data.splits_string,
        train_valid_test_num_samples=[-1 * cfg.model.global_batch_size] * 3,
        seq_length=data.seq_length,
        seed=cfg.model.seed,
        tokenizer=model.tokenizer,
    )
    loader_args = dict(
        cfg=cfg,
        mbs=cfg.model.micro_batch_size,
        gbs=cfg.model.global_batch_size,
        load_gbs=True,
        pad_samples_to_global_batch_size=False,
        collate_fn=identity_collate,
    )
    train_dataloader = build_dataloader(dataset=train_ds, consumed_samples=consumed_samples, **loader_args)
    val_dataloader = build_dataloader(
        dataset=validation_ds, consumed_samples=0, use_random_sampler=False, **loader_args
    )

    init_using_ptl(trainer, model, train_dataloader, train_ds)
    optimizer, scheduler = extract_optimizer_scheduler_from_ptl_model(model)
    ckpt_callback = add_custom_checkpoint_callback(trainer, model)
    logger.log_hyperparams(OmegaConf.to_container(cfg))

    dpo_trainer = DPOTrainer(
        cfg=cfg.trainer.dpo,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        train_dataloader=train_dataloader,
        val_dataloader=val_dataloader,
        test_dataloader=None,
        collate_fn=partial(
            dpo_custom_collate,
            eos_id=model.tokenizer.eos_id,
            reset_position_ids=data.get("reset_position_ids", False),
            reset_attention_mask=data.get("reset_attention_mask", False),
            eod_mask_loss=data.get("eod_mask_loss", False),
            pad_length_to_multiple_of=data.get("pad_length_to_multiple_of", None),
        ),
        logger=logger,
        ckpt_callback=ckpt_callback,
        run_timer=Timer(cfg.exp_manager.get("max_time_per_run") if cfg.exp_manager else None),
    )
    if state is not None:
        dpo_trainer.load_state_dict(state)
    dpo_trainer.fit()


if __name__ == "__main__":
    main()
