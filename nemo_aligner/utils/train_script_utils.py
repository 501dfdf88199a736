"""NeMo-Aligner's ``train_script_utils`` names, for pipelines written against NeMo-Aligner.

Run assembly lives in ``nemo_aligner/recipes/`` (one module per algorithm and ``common``); this module only gives
those functions their NeMo-Aligner import path. It is the one module of ``utils/`` that imports upward (the
import-graph test lists it).
"""

from __future__ import annotations

from nemo_aligner.recipes.common import (
    LIGHTNING_TRAINER_KEYS,
    TrainingData,
    build_model,
    config_view,
    model_config_for_training,
    override_model_config_from_checkpoint,
    resolve_and_create_trainer,
    set_model_parallel_from_config,
    to_plain,
    validate_common,
)
from nemo_aligner.recipes.dpo import (
    build_dpo_data,
    configure_peft,
    export_lora_run,
    merge_lora_and_save,
    uses_lora,
    validate_dpo_config,
)
from nemo_aligner.recipes.sft import build_sft_data, validate_sft_config
from nemo_aligner.recipes.spin import build_spin_data, validate_spin_config

__all__ = [
    "LIGHTNING_TRAINER_KEYS",
    "TrainingData",
    "build_dpo_data",
    "build_model",
    "build_sft_data",
    "build_spin_data",
    "config_view",
    "configure_peft",
    "export_lora_run",
    "merge_lora_and_save",
    "model_config_for_training",
    "override_model_config_from_checkpoint",
    "resolve_and_create_trainer",
    "set_model_parallel_from_config",
    "to_plain",
    "uses_lora",
    "validate_common",
    "validate_dpo_config",
    "validate_sft_config",
    "validate_spin_config",
]
