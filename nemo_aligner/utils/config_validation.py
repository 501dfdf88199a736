"""Config checks that run before any model is built, reporting every problem at once with its key path."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from numbers import Number
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

logger = logging.getLogger(__name__)

NON_FINITE_POLICIES = ("stop", "skip")  # trainer.<algorithm>.non_finite.policy (nemo_aligner.utils.health)


class ConfigError(ValueError):
    """One or more config values are wrong; the message lists each with its key path."""


class ConfigChecker:
    """Collects problems; :meth:`raise_if_any` raises one :class:`ConfigError` listing them all."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.problems: list[str] = []

    def get(self, key: str, default: Any = None) -> Any:
        value = OmegaConf.select(self.cfg, key, default=default)
        return default if value is None else value

    def add(self, key: str, message: str) -> None:
        self.problems.append(f"{key}: {message}")

    def integer(self, key: str, minimum: int | None = None, required: bool = True) -> int | None:
        value = OmegaConf.select(self.cfg, key)
        if value is None:
            if required:
                self.add(key, "is missing")
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            self.add(key, f"must be an integer, got {value!r} ({type(value).__name__})")
            return None
        if minimum is not None and value < minimum:
            self.add(key, f"must be >= {minimum}, got {value}")
            return None
        return value

    def number(self, key: str, minimum: float | None = None, required: bool = True) -> float | None:
        value = OmegaConf.select(self.cfg, key)
        if value is None:
            if required:
                self.add(key, "is missing")
            return None
        if isinstance(value, bool) or not isinstance(value, Number):
            self.add(key, f"must be a number, got {value!r} ({type(value).__name__})")
            return None
        if minimum is not None and value < minimum:
            self.add(key, f"must be >= {minimum}, got {value}")
            return None
        return float(value)

    def boolean(self, key: str, required: bool = False) -> bool | None:
        value = OmegaConf.select(self.cfg, key)
        if value is None:
            if required:
                self.add(key, "is missing")
            return None
        if not isinstance(value, bool):
            self.add(key, f"must be true or false, got {value!r} ({type(value).__name__})")
            return None
        return value

    def choice(self, key: str, allowed: Iterable[Any], required: bool = True) -> Any:
        value = OmegaConf.select(self.cfg, key)
        allowed = tuple(allowed)
        if value is None and not required:
            return None
        if value not in allowed:
            self.add(key, f"{value!r} is not one of {', '.join(map(repr, allowed))}")
            return None
        return value

    def existing_files(self, key: str) -> list[str]:
        """A file path or a list of them; each must exist."""
        value = OmegaConf.select(self.cfg, key)
        if value is None or value == "???" or value == "":
            self.add(key, "is missing: set it to a data file")
            return []
        paths = list(value) if isinstance(value, (list, ListConfig)) else [value]
        for path in paths:
            if not isinstance(path, str) or not Path(path).is_file():
                self.add(key, f"file not found: {path}")
        return [str(p) for p in paths]

    def raise_if_any(self) -> None:
        if self.problems:
            lines = "\n  ".join(self.problems)
            raise ConfigError(f"{len(self.problems)} config problem(s):\n  {lines}")


def check_finite_numbers(checker: ConfigChecker, roots: Iterable[str] = ("trainer", "model", "exp_manager")) -> None:
    """Every float under ``roots`` is finite: a NaN or inf learning rate, penalty or limit is named here, not by
    torch mid-run (YAML spells them ``.nan`` and ``.inf``)."""

    def walk(node: Any, key: str) -> None:
        if isinstance(node, dict):
            for name, child in node.items():
                walk(child, f"{key}.{name}")
        elif isinstance(node, list):
            for index, child in enumerate(node):
                walk(child, f"{key}[{index}]")
        elif isinstance(node, float) and not math.isfinite(node):
            checker.add(key, f"must be a finite number, got {node}")

    for root in roots:
        node = OmegaConf.select(checker.cfg, root)
        if isinstance(node, (DictConfig, ListConfig)):
            walk(OmegaConf.to_container(node, resolve=False), root)


def check_loop(checker: ConfigChecker, loop: str) -> None:
    """``trainer.<loop>.*``: the limits every trainer understands. A limit of 0 would mean "train nothing" and is
    refused (NeMo's trainer read some of them as "no limit"); ``max_steps=-1`` means no step limit and
    ``limit_val_batches=0`` no validation (docs/run_health.md)."""
    prefix = f"trainer.{loop}"
    checker.integer(f"{prefix}.max_epochs", minimum=1)
    max_steps = checker.integer(f"{prefix}.max_steps", minimum=-1)
    if max_steps == 0:
        checker.add(f"{prefix}.max_steps", "0 would train nothing: give a positive number, or -1 for no step limit")
    for key in ("val_check_interval", "limit_train_batches"):
        value = checker.number(f"{prefix}.{key}", minimum=0)
        if value == 0:
            checker.add(
                f"{prefix}.{key}", "0 would mean never (or nothing): give a fraction of an epoch in (0, 1] or a count"
            )
    checker.number(f"{prefix}.limit_val_batches", minimum=0)
    checker.integer(f"{prefix}.save_interval", minimum=0, required=False)
    checker.number(f"{prefix}.gradient_clip_val", minimum=0, required=False)
    checker.choice(f"{prefix}.non_finite.policy", NON_FINITE_POLICIES, required=False)
    checker.integer(f"{prefix}.non_finite.max_consecutive_skips", minimum=1, required=False)


def check_preference_loss(checker: ConfigChecker, prefix: str) -> None:
    """``model.dpo`` / ``model.spin`` loss numbers: loss weights of 0 and 0 train nothing while still saving
    checkpoints, and with a preference loss a KL penalty (beta) of 0 makes its gradient zero (IPO divides by it)."""
    weights = {}
    for name in ("preference_loss_weight", "sft_loss_weight"):
        weights[name] = checker.number(f"{prefix}.{name}", minimum=0, required=False)
    if weights["preference_loss_weight"] == 0:
        if not weights["sft_loss_weight"]:
            checker.add(
                f"{prefix}.preference_loss_weight",
                "0 with sft_loss_weight 0: the loss is zero and no step would change the model",
            )
        return
    penalty = checker.get(f"{prefix}.ref_policy_kl_penalty")
    listed = isinstance(penalty, ListConfig)
    for index, value in enumerate(penalty if listed else [penalty]):
        if isinstance(value, Number) and not isinstance(value, bool) and value <= 0:
            checker.add(
                f"{prefix}.ref_policy_kl_penalty" + (f"[{index}]" if listed else ""),
                f"must be > 0 with a preference loss (beta scales it; 0 gives zero gradients), got {value}",
            )


def check_batch_sizes(checker: ConfigChecker, mbs_key: str, gbs_key: str, data_parallel_size: int) -> None:
    mbs = checker.integer(mbs_key, minimum=1)
    gbs = checker.integer(gbs_key, minimum=1)
    if mbs and gbs and gbs % (mbs * data_parallel_size) != 0:
        checker.add(
            gbs_key,
            f"{gbs} is not divisible by {mbs_key} ({mbs}) x data-parallel size ({data_parallel_size})",
        )


def check_model_parallel(checker: ConfigChecker, model_key: str, world_size: int) -> int:
    """TP/PP fit the job and the architecture; returns the data-parallel size (1 when the layout is invalid).

    The architecture checks run even when the layout does not fit this job, so a config written for a larger
    job (e.g. TP 8 tried on one process) reports every problem at once.
    """
    tp = checker.integer(f"{model_key}.tensor_model_parallel_size", minimum=1) or 1
    pp = checker.integer(f"{model_key}.pipeline_model_parallel_size", minimum=1) or 1
    fits = world_size % (tp * pp) == 0
    if not fits:
        checker.add(
            f"{model_key}.tensor_model_parallel_size", f"TP {tp} x PP {pp} does not divide {world_size} processes"
        )
    heads = checker.get(f"{model_key}.num_attention_heads")
    groups = checker.get(f"{model_key}.num_query_groups") or heads
    if isinstance(heads, int) and heads % tp != 0:
        checker.add(f"{model_key}.tensor_model_parallel_size", f"TP {tp} does not divide num_attention_heads ({heads})")
    if isinstance(groups, int) and groups % tp != 0:
        checker.add(f"{model_key}.tensor_model_parallel_size", f"TP {tp} does not divide num_query_groups ({groups})")
    layers = checker.get(f"{model_key}.num_layers")
    if isinstance(layers, int) and layers % pp != 0:
        checker.add(f"{model_key}.pipeline_model_parallel_size", f"PP {pp} does not divide num_layers ({layers})")
    if (checker.get(f"{model_key}.virtual_pipeline_model_parallel_size") or 1) != 1:
        checker.add(
            f"{model_key}.virtual_pipeline_model_parallel_size",
            "the interleaved pipeline schedule is not supported (one model chunk per stage); set it to null",
        )
    return world_size // (tp * pp) if fits else 1


def check_checkpoint_architecture(checker: ConfigChecker, model_key: str, restore_path: str) -> None:
    """The config's architecture matches the checkpoint's weights (read from their metadata, before any model).

    A mismatch comes from an architecture key overridden against the checkpoint (e.g. ``gpt_sft.yaml``'s
    embedded-default sizes left in place when restoring another model) or from a `.nemo` whose config and weights
    disagree; either way the weights could not load, so it is reported here instead of after the model is built.
    """
    from nemo_aligner.checkpoint.nemo_file import NemoFormatError, read_weight_shapes

    try:
        weights = _architecture_of_weights(read_weight_shapes(restore_path))
    except NemoFormatError as err:
        checker.add("restore_from_path", str(err))
        return
    hidden = checker.get(f"{model_key}.hidden_size")
    for key in ("hidden_size", "num_layers", "ffn_hidden_size"):
        value = checker.get(f"{model_key}.{key}")
        if key in weights and isinstance(value, int) and value != weights[key]:
            checker.add(
                f"{model_key}.{key}",
                f"{value} does not match the weights of {restore_path} ({key}={weights[key]}): remove the "
                "override, or fix a checkpoint whose model_config.yaml disagrees with its weights",
            )
    heads = checker.get(f"{model_key}.num_attention_heads")
    if "qkv_rows" in weights and isinstance(heads, int) and heads > 0 and hidden == weights.get("hidden_size"):
        groups = checker.get(f"{model_key}.num_query_groups") or heads
        kv_channels = checker.get(f"{model_key}.kv_channels") or hidden // heads
        rows = (heads + 2 * groups) * kv_channels
        if rows != weights["qkv_rows"]:
            checker.add(
                f"{model_key}.num_attention_heads",
                f"{heads} heads, {groups} query groups and kv_channels {kv_channels} give {rows} fused QKV rows, but "
                f"the weights of {restore_path} have {weights['qkv_rows']}: remove the override, or fix the checkpoint",
            )


def _architecture_of_weights(shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """The sizes megatron-core's layer-stacked weights fix: hidden size, layers, FFN width and fused QKV rows."""
    found = {}
    for key, shape in shapes.items():
        if key.endswith(("embedding.word_embeddings.weight", "decoder.final_layernorm.weight")):
            found["hidden_size"] = shape[-1]
        elif len(shape) == 3 and key.endswith("decoder.layers.self_attention.linear_proj.weight"):
            found["num_layers"] = shape[0]
        elif len(shape) == 3 and key.endswith("decoder.layers.mlp.linear_fc2.weight"):
            found["ffn_hidden_size"] = shape[-1]
        elif len(shape) == 3 and key.endswith("decoder.layers.self_attention.linear_qkv.weight"):
            found["qkv_rows"] = shape[1]
    return found


def check_optimizer(checker: ConfigChecker, optim_key: str) -> None:
    from nemo_aligner.utils.optimization import ADAM_NAMES, DISTRIBUTED_NAMES, SCHEDULES

    checker.choice(f"{optim_key}.name", ADAM_NAMES + DISTRIBUTED_NAMES)
    lr = checker.number(f"{optim_key}.lr", minimum=0)  # 0 is allowed: a frozen run still validates and saves
    checker.number(f"{optim_key}.weight_decay", minimum=0, required=False)
    checker.number(f"{optim_key}.eps", minimum=0, required=False)
    betas = checker.get(f"{optim_key}.betas")
    if betas is not None and (
        not isinstance(betas, ListConfig)
        or len(betas) != 2
        or not all(isinstance(b, Number) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)
    ):
        checker.add(f"{optim_key}.betas", f"must be two numbers in [0, 1), got {betas}")
    checker.choice(f"{optim_key}.sched.name", SCHEDULES, required=False)
    for key in ("warmup_steps", "constant_steps"):
        checker.integer(f"{optim_key}.sched.{key}", minimum=0, required=False)
    min_lr = checker.number(f"{optim_key}.sched.min_lr", minimum=0, required=False)
    if min_lr is not None and lr and min_lr > lr:
        checker.add(f"{optim_key}.sched.min_lr", f"{min_lr} is above {optim_key}.lr ({lr})")


def check_resume_checkpoint(checker: ConfigChecker, loop: str | None = None) -> None:
    """The checkpoint a run would resume from is complete and safe, and was trained with a config it can continue
    with (same data, global batch size, loss and model shape; other changes are logged), checked before any model
    is built. The run's identity is remembered so its checkpoints store it."""
    from nemo_aligner.checkpoint import run_identity
    from nemo_aligner.checkpoint.trainer_checkpoint import (
        CheckpointError,
        list_checkpoints,
        read_trainer_state,
        verify_checkpoint,
    )
    from nemo_aligner.utils.exp_manager import resolve_log_dir

    identity = run_identity.identity_of(checker.cfg, loop) if loop else None
    run_identity.remember(identity)
    exp_cfg = checker.get("exp_manager")
    if exp_cfg is None or not exp_cfg.get("resume_if_exists", True):
        return
    try:
        existing = list_checkpoints(resolve_log_dir(exp_cfg) / "checkpoints")
        if existing:
            verify_checkpoint(existing[-1])
    except CheckpointError as err:
        checker.add("exp_manager.resume_if_exists", str(err))
        return
    if existing and identity is not None:
        stored = read_trainer_state(existing[-1]).get(run_identity.TRAINER_STATE_KEY)
        for key, problem in run_identity.compare(stored, identity, existing[-1]):
            checker.add(key, problem)


def clamp_lengths_to_context(
    cfg: DictConfig, keys: Iterable[str], context: int, placeholder: int | None = None
) -> None:
    """Lengths above the model's context are lowered to it, with a warning (documented scale-down behaviour).

    ``placeholder``: the YAML's ``model.encoder_seq_length``, which the checkpoint's value replaces; a length that
    equals it followed that placeholder (``${model.encoder_seq_length}``), so it follows the checkpoint quietly.
    """
    for key in keys:
        value = OmegaConf.select(cfg, key)
        if isinstance(value, int) and value > context:
            if value == placeholder:
                logger.debug("%s follows the checkpoint's context: %d", key, context)
            else:
                logger.warning("%s=%d exceeds the model context (%d); using %d", key, value, context, context)
            parent, _, leaf = key.rpartition(".")
            with open_dict(cfg):
                OmegaConf.select(cfg, parent)[leaf] = context
