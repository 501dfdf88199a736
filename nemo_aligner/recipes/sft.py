"""Supervised fine-tuning, assembled: config checks, data, model, loop, optimizer (``run``)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, open_dict

from nemo_aligner.algorithms.supervised import SupervisedTrainer
from nemo_aligner.data.nlp.builders import (
    build_collate,
    build_dataloader,
    build_sft_dataset,
    build_train_sampler,
    build_validation_sampler,
    num_samples_for,
)
from nemo_aligner.data.nlp.jsonl import check_global_batch_fits
from nemo_aligner.models.nlp.gpt.gpt_sft_model import GPTSFTModel
from nemo_aligner.recipes.common import (
    TrainingData,
    assemble,
    config_view,
    data_parallel_layout,
    model_config_for_training,
    resolve_and_create_trainer,
    start_experiment,
    train,
    validate_common,
)
from nemo_aligner.utils.config import model_seed
from nemo_aligner.utils.config_validation import ConfigChecker, check_batch_sizes, clamp_lengths_to_context
from nemo_aligner.utils.utils import load_checkpoint_model_config

# The from-scratch architecture of gpt_sft.yaml (the embedded default's); a restored .nemo brings its own.
ARCHITECTURE_KEYS = (
    "mcore_gpt",
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "encoder_seq_length",
    "max_position_embeddings",
    "position_embedding_type",
    "rotary_base",
    "normalization",
    "layernorm_epsilon",
    "activation",
    "bias",
    "share_embeddings_and_output_weights",
    "make_vocab_size_divisible_by",
    "init_method_std",
    "tokenizer",
)


def run(cfg: DictConfig) -> None:
    """Train ``cfg`` (``conf/gpt_sft.yaml``): from ``model.restore_from_path`` or from scratch."""
    trainer = resolve_and_create_trainer(cfg, "sft")
    restore_path = cfg.model.get("restore_from_path")
    if restore_path and Path(restore_path).exists():
        use_checkpoint_architecture(cfg, restore_path)
    model_cfg = model_config_for_training(cfg, restore_path)
    with open_dict(model_cfg):  # SFT's batch sizes live under model.data.train_ds
        model_cfg.micro_batch_size = cfg.model.data.train_ds.micro_batch_size
        model_cfg.global_batch_size = cfg.model.data.train_ds.global_batch_size
    validate_sft_config(cfg, model_cfg, trainer.world_size)
    started = start_experiment(cfg, "sft", trainer, restore_path, model_cfg)

    data = build_sft_data(cfg, model_cfg, restore_path, max_steps=cfg.trainer.sft.max_steps)
    train(started, assemble(started, SupervisedTrainer, GPTSFTModel, data))


def use_checkpoint_architecture(cfg: DictConfig, restore_path: str) -> None:
    """Replace gpt_sft.yaml's architecture keys with the checkpoint's (absent ones take NeMo's defaults), so
    fine-tuning a model of another shape or tokenizer loads it as it was trained, and data lengths that
    interpolate ``model.encoder_seq_length`` follow the checkpoint's context."""
    stored = load_checkpoint_model_config(restore_path)
    with open_dict(cfg.model):
        for key in ARCHITECTURE_KEYS:
            if key in stored:
                cfg.model[key] = stored[key]
            else:
                cfg.model.pop(key, None)


def validate_sft_config(cfg: DictConfig, model_cfg: DictConfig, world_size: int) -> None:
    """Every SFT config problem at once, before anything expensive; over-long lengths are clamped."""
    view = config_view(cfg, model_cfg)
    checker = ConfigChecker(view)
    data_parallel_size = validate_common(checker, "sft", world_size)
    for split in ("train_ds", "validation_ds"):
        prefix = f"model.data.{split}"
        check_batch_sizes(checker, f"{prefix}.micro_batch_size", f"{prefix}.global_batch_size", data_parallel_size)
        checker.existing_files(f"{prefix}.file_path")
        checker.integer(f"{prefix}.max_seq_length", minimum=2)
        checker.choice(f"{prefix}.truncation_method", ("left", "right"), required=False)
    checker.boolean("model.data.chat")
    if checker.get("model.data.sample") and (checker.get("trainer.sft.max_steps", -1) or -1) <= 0:
        checker.add("model.data.sample", "needs trainer.sft.max_steps > 0 (the number of samples is max_steps x GBS)")
    checker.raise_if_any()
    context = int(model_cfg.encoder_seq_length)
    clamp_lengths_to_context(
        cfg, ("model.data.train_ds.max_seq_length", "model.data.validation_ds.max_seq_length"), context
    )


def build_sft_data(cfg: DictConfig, model_cfg: DictConfig, restore_path: str | None, max_steps: int) -> TrainingData:
    """Tokenizer, datasets (read and validated in full) and dataloaders; no model is built yet."""
    tokenizer, layout = data_parallel_layout(model_cfg, restore_path)
    data_cfg = cfg.model.data
    train_cfg, val_cfg = data_cfg.train_ds, data_cfg.validation_ds
    seed = model_seed(model_cfg)
    train_ds = build_sft_dataset(
        data_cfg, train_cfg, tokenizer, seed, num_samples_for(data_cfg, max_steps, train_cfg.global_batch_size)
    )
    val_ds = build_sft_dataset(data_cfg, val_cfg, tokenizer, seed)
    if train_cfg.get("drop_last", True):
        check_global_batch_fits(train_cfg.file_path, len(train_ds), train_cfg.global_batch_size)
    if val_cfg.get("drop_last", False):
        check_global_batch_fits(val_cfg.file_path, len(val_ds), val_cfg.global_batch_size)
    train_sampler = build_train_sampler(train_cfg, train_ds, train_cfg.global_batch_size, seed=seed, **layout)
    val_sampler = build_validation_sampler(val_cfg, val_ds, val_cfg.global_batch_size, **layout)
    return TrainingData(
        tokenizer=tokenizer,
        train_dataloader=build_dataloader(train_ds, train_sampler, build_collate(train_cfg, tokenizer), data_cfg),
        val_dataloader=build_dataloader(val_ds, val_sampler, build_collate(val_cfg, tokenizer), data_cfg),
    )
