"""What a step means, stored with the trainer state and checked on resume.

A trainer checkpoint records the settings that give its ``step`` and ``consumed_samples`` their meaning: the
training data (a hash of the files' contents), the global batch size, the loss and the model's shape, and the
settings a user may legitimately change between runs (learning rate and schedule, step and epoch limits, seed,
loss weights). On resume :func:`compare` names every difference: a change of the first kind is refused (the
sample offset would point into other data, the weights would not fit, the loss would not be the one the optimizer
state was built for), a change of the second kind is logged as a warning and the run continues with the new value.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

logger = logging.getLogger(__name__)

TRAINER_STATE_KEY = "run_identity"
SHAPE_KEYS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "kv_channels")
# Per algorithm (the trainer.<loop> section): where its data, batch size and loss live.
_DATA_KEYS = {"dpo": "model.data.data_prefix.train"}
_BATCH_KEYS = {"sft": "model.data.train_ds.global_batch_size"}
_LOSS_KEYS = {"dpo": "model.dpo.preference_loss", "spin": "model.spin.preference_loss"}
_LOSS_KEYS["self_rewarding"] = _LOSS_KEYS["spin"]
_CHANGEABLE = (
    "model.optim.lr",
    "model.optim.weight_decay",
    "model.optim.sched.name",
    "model.optim.sched.warmup_steps",
    "model.optim.sched.min_lr",
    "model.seed",
    "model.dpo.ref_policy_kl_penalty",
    "model.dpo.preference_loss_weight",
    "model.dpo.sft_loss_weight",
    "model.spin.ref_policy_kl_penalty",
)

_current: dict[str, Any] | None = None


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


FULL_HASH_LIMIT = 256 << 20  # bytes; larger files are sampled, so every rank's check stays a few seconds
_SAMPLES, _SAMPLE_SIZE = 256, 1 << 16


def data_fingerprint(files: Any) -> str | None:
    """A hash of the data files' contents (a file moved elsewhere keeps its fingerprint): the whole content up to
    ``FULL_HASH_LIMIT``, above it the size and 256 evenly spaced 64 KiB blocks (any edit that changes the size or
    touches a sampled block is caught; an equal-size edit elsewhere in a huge file is not)."""
    paths = [files] if isinstance(files, str) else list(files or [])
    if not paths or not all(isinstance(p, str) and Path(p).is_file() for p in paths):
        return None
    digest = hashlib.sha256()
    for path in paths:
        size = Path(path).stat().st_size
        digest.update(str(size).encode())
        with open(path, "rb") as file:
            if size <= FULL_HASH_LIMIT:
                for block in iter(lambda: file.read(1 << 20), b""):
                    digest.update(block)
                continue
            for index in range(_SAMPLES):
                file.seek(index * (size - _SAMPLE_SIZE) // (_SAMPLES - 1))
                digest.update(file.read(_SAMPLE_SIZE))
    return digest.hexdigest()[:20]


def identity_of(view: DictConfig, loop: str) -> dict[str, dict[str, Any]]:
    """``{"refuse": {key: value}, "warn": {key: value}}`` of a run's effective config (``config_view``)."""

    def get(key: str) -> Any:
        return _plain(OmegaConf.select(view, key, default=None))

    data_key = _DATA_KEYS.get(loop, "model.data.train_ds.file_path")
    batch_key = _BATCH_KEYS.get(loop, "model.global_batch_size")
    refuse: dict[str, Any] = {data_key: data_fingerprint(get(data_key)), batch_key: get(batch_key)}
    if loop in _LOSS_KEYS:
        refuse[_LOSS_KEYS[loop]] = get(_LOSS_KEYS[loop])
    for key in SHAPE_KEYS:
        refuse[f"model.{key}"] = get(f"model.{key}")
    warn = {key: get(key) for key in (f"trainer.{loop}.max_steps", f"trainer.{loop}.max_epochs", *_CHANGEABLE)}
    return {"refuse": refuse, "warn": {k: v for k, v in warn.items() if v is not None}}


def remember(identity: dict[str, Any] | None) -> None:
    """The identity of the run whose config was just checked; its experiment takes it (:func:`take`)."""
    global _current
    _current = identity


def take() -> dict[str, Any] | None:
    """The remembered identity, once (a later experiment set up without a config check stores none)."""
    global _current
    identity, _current = _current, None
    return identity


def compare(stored: Mapping[str, Any] | None, now: Mapping[str, Any], checkpoint: Path) -> list[tuple[str, str]]:
    """(key, problem) for each refused difference; each allowed difference is logged as a warning."""
    if not isinstance(stored, Mapping):
        return []  # a checkpoint from before identities were stored
    problems = []
    for key, old in (stored.get("refuse") or {}).items():
        new = now["refuse"].get(key)
        if key in now["refuse"] and old is not None and new is not None and old != new:
            what = "the data files' contents changed" if key.endswith(("file_path", "data_prefix.train")) else None
            problems.append(
                (
                    key,
                    f"{what or f'{old!r} in the checkpoint, {new!r} now'}: {checkpoint} cannot continue with it "
                    "(its step and sample offset, weights or optimizer state belong to the old value); restore the "
                    "old value or start a new run in another exp_manager.explicit_log_dir",
                )
            )
    for key, old in (stored.get("warn") or {}).items():
        new = now["warn"].get(key)
        if new is not None and old != new:
            logger.warning("Resuming %s with %s=%r (it was trained with %r)", checkpoint, key, new, old)
    return problems
