"""NeMo-Aligner's ``train_script_utils`` names, for pipelines written against NeMo-Aligner.

Run assembly lives in ``nemo_aligner/recipes/`` (one module per algorithm and ``common``); this module gives those
functions their NeMo-Aligner import path, and gives the calls NeMo-Aligner's scripts make in their own order
(``init_distributed``, ``init_using_ptl``, ``extract_optimizer_scheduler_from_ptl_model``,
``add_custom_checkpoint_callback``, ``retrieve_custom_trainer_state_dict``) thin entries to the same steps
(``docs/coming_from_nemo_aligner.md`` has the table). It is the one module of ``utils/`` that imports upward (the
import-graph test lists it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from nemo_aligner.algorithms.base import RESUME_PATH_KEY, epoch_steps, planned_max_steps
from nemo_aligner.checkpoint.trainer_checkpoint import read_trainer_state
from nemo_aligner.recipes import common as _recipe
from nemo_aligner.recipes.common import (
    LIGHTNING_TRAINER_KEYS,
    TrainingData,
    build_model,
    config_view,
    configure_peft,
    export_lora_run,
    merge_lora_and_save,
    model_config_for_training,
    override_model_config_from_checkpoint,
    set_model_parallel_from_config,
    to_plain,
    uses_lora,
    validate_common,
)
from nemo_aligner.recipes.dpo import build_dpo_data, validate_dpo_config
from nemo_aligner.recipes.sft import build_sft_data, validate_sft_config
from nemo_aligner.recipes.spin import build_spin_data, validate_spin_config
from nemo_aligner.utils.distributed import require_model_parallel
from nemo_aligner.utils.exp_manager import CheckpointCallback, CustomLoggerWrapper

__all__ = [
    "LIGHTNING_TRAINER_KEYS",
    "CustomLoggerWrapper",
    "TrainingData",
    "add_custom_checkpoint_callback",
    "build_dpo_data",
    "build_model",
    "build_sft_data",
    "build_spin_data",
    "config_view",
    "configure_peft",
    "export_lora_run",
    "extract_optimizer_scheduler_from_ptl_model",
    "init_distributed",
    "init_peft",
    "init_using_ptl",
    "merge_lora_and_save",
    "model_config_for_training",
    "override_model_config_from_checkpoint",
    "resolve_and_create_trainer",
    "retrieve_custom_trainer_state_dict",
    "set_model_parallel_from_config",
    "to_plain",
    "uses_lora",
    "validate_common",
    "validate_dpo_config",
    "validate_sft_config",
    "validate_spin_config",
]


def _run_cfg(trainer) -> DictConfig:
    cfg = getattr(trainer, "aligner_run_cfg", None)
    if cfg is None:
        raise ValueError("this trainer was not made by resolve_and_create_trainer(cfg, key): create it with that")
    return cfg


def init_peft(model, model_cfg: DictConfig) -> None:
    """NeMo-Aligner's name for :func:`~nemo_aligner.recipes.dpo.configure_peft` (adapters are built with the model
    from ``model.peft``; this loads ``model.peft.restore_from_path`` when set)."""
    configure_peft(model, model_cfg)


def resolve_and_create_trainer(cfg: DictConfig, pop_trainer_key: str):
    """NeMo-Aligner's launcher: :func:`nemo_aligner.recipes.common.resolve_and_create_trainer` (processes, process
    group), then megatron-core's parallel state from ``cfg.model``.

    The one compatibility path for NeMo-Aligner's call order: its scripts build the model right after this
    (``load_from_nemo``) and call ``init_distributed`` only afterwards, while a model is built inside parallel state
    its launcher set up. Our recipes initialise it after checking the config (``data_parallel_layout``);
    NeMo-Aligner's scripts have no check step, so the trainer's launch does it, from the model config they already
    merged (``load_and_override_model_config`` comes first in each of their scripts).
    """
    trainer = _recipe.resolve_and_create_trainer(cfg, pop_trainer_key)
    set_model_parallel_from_config(cfg.model)
    return trainer


def init_distributed(trainer, model, transformer_engine: bool = False) -> None:
    """NeMo-Aligner's step after building the model: here parallel state is already set (by
    :func:`resolve_and_create_trainer`), so this checks that the model was built at its ``model.cfg`` sizes and
    re-seeds the model-parallel RNG streams. ``transformer_engine`` comes from the model config; it is accepted."""
    require_model_parallel(model.cfg)
    set_model_parallel_from_config(model.cfg)


def init_using_ptl(trainer, model, train_dataloader, train_ds=None) -> None:
    """The optimizer and LR schedule for the run, over the loop's number of steps: the same number the trainer
    will compute (``trainer.<algorithm>`` settings over ``train_dataloader``'s sampler; ``planned_max_steps``).
    Lightning never runs a loop here; ``train_ds`` is accepted and unused."""
    cfg = _run_cfg(trainer)
    loop_cfg = cfg.trainer[trainer.aligner_loop_key]
    sampler = train_dataloader.batch_sampler
    max_steps = planned_max_steps(loop_cfg, epoch_steps(loop_cfg, sampler.steps_per_epoch))
    model.setup_optimization(model.cfg.optim, max_steps, loop_cfg.get("gradient_clip_val", 0.0))


def extract_optimizer_scheduler_from_ptl_model(model) -> tuple[Any, Any]:
    """``(optimizer, scheduler)`` built by :func:`init_using_ptl` (``model.setup_optimization``)."""
    if getattr(model, "optimizer", None) is None:
        raise ValueError("the model has no optimizer yet: call init_using_ptl(trainer, model, train_dataloader) first")
    return model.optimizer, model.lr_scheduler


def add_custom_checkpoint_callback(trainer, model) -> CheckpointCallback:
    """The checkpoint callback of the experiment ``exp_manager(trainer, cfg.exp_manager)`` set up, with
    ``exp_manager.checkpoint_callback_params``; the trainer it is passed to supplies the checkpoint's state, and the
    final ``.nemo`` is ``model.save_to``."""
    experiment = getattr(trainer, "aligner_experiment", None)
    if experiment is None:
        raise ValueError("call exp_manager(trainer, cfg.exp_manager) before add_custom_checkpoint_callback")
    params = (_run_cfg(trainer).get("exp_manager") or {}).get("checkpoint_callback_params")
    return CheckpointCallback(experiment, params, None, model.save_to)


def retrieve_custom_trainer_state_dict(trainer) -> dict[str, Any]:
    """The loop state of the checkpoint ``exp_manager`` found (``trainer.ckpt_path``): ``step``,
    ``consumed_samples``, ... and the checkpoint's path; the trainer's ``load_state_dict`` of it restores the
    whole checkpoint (weights, optimizer, schedule, counters)."""
    path = Path(trainer.ckpt_path)
    return {**read_trainer_state(path), RESUME_PATH_KEY: str(path)}
