"""A SPIN pipeline written against NeMo-Aligner's Python API, the way its users write theirs: the same imports from
``nemo_aligner`` and the same calls, in the same order, as NeMo-Aligner's ``examples/nlp/gpt/train_gpt_spin.py``
(not its code: this file exercises the names ``docs/coming_from_nemo_aligner.md`` lists). Its three ``nemo.*``
imports are the ones that doc says to change: ``hydra_runner``, ``logging`` and ``exp_manager``.
"""

from __future__ import annotations

import logging
from functools import partial

from omegaconf import OmegaConf, open_dict

from nemo_aligner.algorithms.spin import SPINTrainer, spin_custom_collate
from nemo_aligner.data.nlp.builders import build_dataloader, build_sft_dataset, collate_with_pad_to_max_batch  # noqa: F401
from nemo_aligner.models.nlp.gpt.megatron_gpt_spin_model import MegatronGPTSPINModel
from nemo_aligner.utils import parallel_state  # noqa: F401 (imported by NeMo-Aligner's script)
from nemo_aligner.utils.config import hydra_runner
from nemo_aligner.utils.distributed import Timer
from nemo_aligner.utils.exp_manager import exp_manager
from nemo_aligner.utils.train_script_utils import (
    CustomLoggerWrapper,
    add_custom_checkpoint_callback,
    extract_optimizer_scheduler_from_ptl_model,
    init_distributed,
    init_using_ptl,
    resolve_and_create_trainer,
    retrieve_custom_trainer_state_dict,
)
from nemo_aligner.utils.utils import load_and_override_model_config, load_from_nemo, retrieve_model_state_dict_in_cpu

log = logging.getLogger(__name__)


@hydra_runner(config_path="../../examples/nlp/gpt/conf", config_name="gpt_spin")
def main(cfg) -> None:
    restore_path = cfg.pretrained_checkpoint.restore_from_path
    cfg.model = load_and_override_model_config(restore_path, cfg.model)
    log.info("config:\n%s", OmegaConf.to_yaml(cfg))

    trainer = resolve_and_create_trainer(cfg, "spin")
    exp_manager(trainer, cfg.exp_manager)
    logger = CustomLoggerWrapper(trainer.loggers)

    model = load_from_nemo(MegatronGPTSPINModel, cfg.model, trainer, strict=True, restore_path=restore_path)
    with open_dict(cfg):
        cfg.model.encoder_seq_length = model.cfg.encoder_seq_length
    if model.ref_policy_state_dict is None:
        model.ref_policy_state_dict = retrieve_model_state_dict_in_cpu(
            model, megatron_amp_O2=cfg.model.get("megatron_amp_O2", False)
        )

    state = retrieve_custom_trainer_state_dict(trainer) if trainer.ckpt_path is not None else None
    consumed_samples = state["consumed_samples"] if state is not None else 0
    init_distributed(trainer, model, cfg.model.get("transformer_engine", False))

    data = cfg.model.data
    train_cfg, val_cfg = data.train_ds, data.validation_ds
    sampled = data.get("sample", False)
    steps = cfg.trainer.spin.max_steps
    train_samples = steps * cfg.model.global_batch_size if sampled and steps >= 0 else None
    dataset_args = dict(answer_only_loss=True, is_chat=data.chat, special_tokens=data.chat_prompt_tokens)
    train_ds = build_sft_dataset(train_cfg, model.tokenizer, train_samples, **dataset_args)
    val_samples = cfg.trainer.spin.limit_val_batches * val_cfg.global_batch_size if sampled else None
    validation_ds = build_sft_dataset(val_cfg, model.tokenizer, val_samples, **dataset_args)

    collate_fn = partial(
        spin_custom_collate,
        eos_id=model.tokenizer.eos_id,
        reset_position_ids=data.get("reset_position_ids", False),
        reset_attention_mask=data.get("reset_attention_mask", False),
        eod_mask_loss=data.get("eod_mask_loss", False),
    )
    train_dataloader = build_dataloader(
        cfg=cfg,
        dataset=train_ds,
        consumed_samples=consumed_samples,
        mbs=cfg.model.micro_batch_size,
        gbs=cfg.model.global_batch_size,
        collate_fn=collate_fn,
        drop_last=train_cfg.drop_last,
        pad_samples_to_global_batch_size=False,
        load_gbs=True,
    )
    val_dataloader = build_dataloader(
        cfg=cfg,
        dataset=validation_ds,
        consumed_samples=0,
        mbs=val_cfg.micro_batch_size,
        gbs=val_cfg.global_batch_size,
        collate_fn=validation_ds.collate_fn,
        drop_last=val_cfg.drop_last,
        pad_samples_to_global_batch_size=False,
        load_gbs=True,
    )

    init_using_ptl(trainer, model, train_dataloader, train_ds)
    optimizer, scheduler = extract_optimizer_scheduler_from_ptl_model(model)
    ckpt_callback = add_custom_checkpoint_callback(trainer, model)
    logger.log_hyperparams(OmegaConf.to_container(cfg))
    timer = Timer(cfg.exp_manager.get("max_time_per_run") if cfg.exp_manager else None)

    spin_trainer = SPINTrainer(
        cfg=cfg.trainer.spin,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        train_dataloader=train_dataloader,
        val_dataloader=val_dataloader,
        test_dataloader=None,
        logger=logger,
        ckpt_callback=ckpt_callback,
        run_timer=timer,
    )
    if state is not None:
        spin_trainer.load_state_dict(state)
    spin_trainer.fit()


if __name__ == "__main__":
    main()
