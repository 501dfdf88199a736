"""Supervised fine-tuning of a GPT model.

    python examples/nlp/gpt/train_gpt_sft.py                      # the embedded default (tiny model, bundled data)
    python examples/nlp/gpt/train_gpt_sft.py model.restore_from_path=/path/to/base.nemo \\
        model.data.train_ds.file_path=train.jsonl model.data.validation_ds.file_path=val.jsonl

Any key of conf/gpt_sft.yaml can be overridden (Hydra syntax). ``main(cfg)`` runs in-process with a config.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, open_dict

from nemo_aligner.algorithms.supervised import SupervisedTrainer
from nemo_aligner.models.nlp.gpt.gpt_sft_model import GPTSFTModel
from nemo_aligner.utils.config import hydra_runner
from nemo_aligner.utils.exp_manager import CustomLoggerWrapper, exp_manager
from nemo_aligner.utils.train_script_utils import (
    build_sft_data,
    model_config_for_training,
    resolve_and_create_trainer,
    setup_model_and_trainer_state,
    validate_sft_config,
)
from nemo_aligner.utils.utils import load_checkpoint_model_config

logger = logging.getLogger(__name__)

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


@hydra_runner(config_path="conf", config_name="gpt_sft")
def main(cfg: DictConfig) -> None:
    trainer = resolve_and_create_trainer(cfg, "sft")
    restore_path = cfg.model.get("restore_from_path")
    if restore_path and Path(restore_path).exists():
        use_checkpoint_architecture(cfg, restore_path)
    model_cfg = model_config_for_training(cfg, restore_path)
    with open_dict(model_cfg):
        model_cfg.micro_batch_size = cfg.model.data.train_ds.micro_batch_size
        model_cfg.global_batch_size = cfg.model.data.train_ds.global_batch_size
    validate_sft_config(cfg, model_cfg, trainer.world_size)

    experiment = exp_manager(trainer, cfg.exp_manager)
    log = CustomLoggerWrapper(trainer.loggers)
    data = build_sft_data(cfg, model_cfg, restore_path, max_steps=cfg.trainer.sft.max_steps)

    sft_trainer = setup_model_and_trainer_state(
        SupervisedTrainer, GPTSFTModel, cfg, cfg.trainer.sft, model_cfg, restore_path, trainer, experiment, log, data
    )
    sft_trainer.fit()


if __name__ == "__main__":
    main()
