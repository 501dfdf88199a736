"""Helpers NeMo-Aligner users call from their own pipelines (same names and arguments as NeMo-Aligner)."""

from __future__ import annotations

import contextlib
import ctypes
import functools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from nemo_aligner.checkpoint import nemo_file

# Keys NeMo adds when saving; they describe the file, not the model, and are dropped before merging overrides.
_META_KEYS = ("target", "nemo_version")


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):  # not glibc
        return None


def release_freed_memory() -> None:
    """Hand the pages that the C heap holds free back to the OS (glibc's ``malloc_trim``) between the phases of a
    run (after the reference pass, after the last step). Freed tensors' memory otherwise stays resident, and the
    next phase's allocations (the training loop; the final checkpoint, plots and summary) come on top of it: the
    process's peak RSS. Host memory only; nothing to do where the C library is not glibc."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def load_checkpoint_model_config(restore_path: str | Path) -> DictConfig:
    """The model config stored in a ``.nemo`` file or directory."""
    with nemo_file.open_nemo(restore_path, with_weights=False) as unpacked:
        return nemo_file.read_model_config(unpacked)


def load_and_override_model_config(
    restore_path: str | Path, model_cfg_to_overwrite: DictConfig | dict, remove_meta_info: bool = True
) -> DictConfig:
    """The checkpoint's model config with the user's config merged on top (user keys win).

    Architecture keys the user leaves out (``num_layers``, ``tokenizer``, ...) come from the checkpoint, so an
    algorithm config only needs to name what it changes; ``encoder_seq_length`` always comes from the checkpoint
    (the algorithm configs' value is a placeholder), as in the recipes. Interpolations such as
    ``precision: ${trainer.precision}`` stay unresolved: assign the result back to ``cfg.model`` (NeMo-Aligner's
    scripts do) and they resolve against the whole config; :func:`load_from_nemo` resolves them too.
    """
    checkpoint_cfg = load_checkpoint_model_config(restore_path)
    if remove_meta_info:
        with open_dict(checkpoint_cfg):
            for key in _META_KEYS:
                checkpoint_cfg.pop(key, None)
    merged = merge_over_checkpoint_config(checkpoint_cfg, model_cfg_to_overwrite)
    if "encoder_seq_length" in checkpoint_cfg:
        merged.encoder_seq_length = checkpoint_cfg.encoder_seq_length
    return merged


def merge_over_checkpoint_config(checkpoint_cfg: DictConfig, user_cfg: DictConfig | dict) -> DictConfig:
    """``user_cfg`` merged over ``checkpoint_cfg``: nested mappings merge key by key, and wherever the two disagree
    on the kind of value (e.g. a checkpoint's pretraining ``data.data_prefix`` list against a DPO
    ``{train: [...], ...}`` mapping) the user's value replaces the checkpoint's instead of failing. The checkpoint's
    ``peft`` section is left out: a ``.nemo`` holds plain weights, so only the run's own ``model.peft`` adds
    adapters."""
    merged = OmegaConf.to_container(checkpoint_cfg, resolve=False)
    merged.pop("peft", None)
    _merge_into(merged, OmegaConf.to_container(OmegaConf.create(user_cfg), resolve=False))
    return OmegaConf.create(merged)


def _merge_into(base: dict, override: dict) -> None:
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge_into(base[key], value)
        else:
            base[key] = value


def load_from_nemo(
    cls,
    model_cfg: DictConfig | dict,
    trainer: Any = None,
    strict: bool = True,
    modify_config_fn: Callable[[DictConfig, DictConfig], DictConfig] | None = None,
    restore_path: str | Path | None = None,
    return_updated_cfg: bool = False,
    load_base_model_only: bool = False,
    **model_kwargs: Any,
):
    """Restore ``cls`` from ``restore_path`` using ``model_cfg`` as the model config.

    With ``modify_config_fn(checkpoint_cfg, model_cfg)`` the config used is what that function returns (e.g.
    :func:`load_and_override_model_config`-style merging). Returns the model, or ``(model, cfg)`` with
    ``return_updated_cfg=True``. ``model_cfg`` may be the whole run config (its ``model`` is used) or ``cfg.model``
    of one: its interpolations
    (``${trainer.precision}``) are resolved against that config first. ``load_base_model_only`` (NeMo-Aligner's
    flag to skip a checkpoint's LoRA adapters) changes nothing here: a ``.nemo`` never brings adapters.
    """
    del load_base_model_only  # always the base model: adapters come only from the run's own model.peft
    if restore_path is None:
        raise ValueError("load_from_nemo: restore_path must name a .nemo file or directory")
    if not Path(restore_path).exists():
        raise FileNotFoundError(f"load_from_nemo: checkpoint not found: {restore_path}")
    if "model" in model_cfg and "trainer" in model_cfg:  # the whole run config (NeMo-Aligner's SFT script)
        model_cfg = model_cfg["model"]
    if isinstance(model_cfg, DictConfig) and model_cfg._get_parent() is not None:
        model_cfg = OmegaConf.create(OmegaConf.to_container(model_cfg, resolve=True))
    if modify_config_fn is not None:
        model_cfg = modify_config_fn(load_checkpoint_model_config(restore_path), model_cfg)
    model = cls.restore_from(
        restore_path, override_config_path=model_cfg, trainer=trainer, strict=strict, **model_kwargs
    )
    return (model, model_cfg) if return_updated_cfg else model


def build_tokenizer_for(model_cfg: DictConfig, restore_path: str | Path | None = None):
    """The model's tokenizer, built before the model (cheap: a ``.nemo`` gives only its config and artifacts)."""
    from nemo_aligner.tokenizers import build_tokenizer

    if restore_path is None:
        return build_tokenizer(model_cfg.tokenizer)
    with nemo_file.open_nemo(restore_path, with_weights=False) as unpacked:
        return build_tokenizer(model_cfg.tokenizer, artifact_dir=unpacked)


def retrieve_model_state_dict_in_cpu(model, megatron_amp_O2: bool = False) -> dict:
    """A CPU copy of the model's weights (NeMo-Aligner's name; ``megatron_amp_O2`` is accepted for compatibility:
    our weight names never carry the O2 ``module.`` prefix)."""
    return model.model_state_dict_in_cpu()


@contextlib.contextmanager
def cpu_weight_swap(model, cpu_state_dict: dict, megatron_amp_O2: bool = False) -> Iterator[None]:
    """Run the enclosed code with ``cpu_state_dict``'s weights in ``model``; its own weights come back after.

    ``cpu_state_dict`` holds ``model.*`` names (as :func:`retrieve_model_state_dict_in_cpu` returns). Weights are
    copied in place, so optimizer and DDP references to the parameters stay valid. ``megatron_amp_O2`` is accepted
    for NeMo-Aligner compatibility (our names never carry O2's ``module.`` prefix).
    """
    tensors = _named_model_tensors(model)
    missing = sorted(set(tensors) - set(cpu_state_dict))
    if missing:
        raise KeyError(f"cpu_weight_swap: the state dict lacks {len(missing)} weights, e.g. {missing[:3]}")
    own = {name: tensor.detach().to("cpu", copy=True) for name, tensor in tensors.items()}
    with torch.no_grad():
        for name, tensor in tensors.items():
            tensor.copy_(cpu_state_dict[name])
    try:
        yield
    finally:
        with torch.no_grad():
            for name, tensor in tensors.items():
                tensor.copy_(own[name])


def _named_model_tensors(model) -> dict:
    """Parameters and persistent buffers of ``model.model`` under their ``model.*`` names."""
    return {
        k: v for k, v in model.model.state_dict(prefix="model.", keep_vars=True).items() if isinstance(v, torch.Tensor)
    }
