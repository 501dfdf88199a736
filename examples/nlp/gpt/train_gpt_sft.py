"""Supervised fine-tuning of a GPT model.

    python examples/nlp/gpt/train_gpt_sft.py                      # the embedded default (tiny model, bundled data)
    python examples/nlp/gpt/train_gpt_sft.py model.restore_from_path=/path/to/base.nemo \\
        model.data.train_ds.file_path=train.jsonl model.data.validation_ds.file_path=val.jsonl

Any key of conf/gpt_sft.yaml can be overridden (Hydra syntax). ``main(cfg)`` runs in-process with a config.
"""

from __future__ import annotations

import logging

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

logger = logging.getLogger(__name__)


@hydra_runner(config_path="conf", config_name="gpt_sft")
def main(cfg: DictConfig) -> None:
    trainer = resolve_and_create_trainer(cfg, "sft")
    restore_path = cfg.model.get("restore_from_path")
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
