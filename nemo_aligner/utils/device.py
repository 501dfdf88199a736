"""Where tensors live: the one place the project decides the device.

Parameters live on the current accelerator: ``torch.cuda.current_device()`` (this rank's GPU, bound by
:func:`nemo_aligner.utils.cpu_support.bind_local_device`), which the CPU-support module answers with the CPU on a
machine without CUDA. Every tensor that meets the parameters (batches, masks, position ids, reference tables,
KV caches, sampling generators, swapped-in weights) is created on, or moved to, :func:`model_device` of the
model it meets. Tensors come back to the CPU only where they must: data loading, the CPU weight swap, saving.

Code elsewhere never asks ``torch.cuda.is_available()``; it asks this module.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from nemo_aligner.utils.cpu_support import uses_cuda


def current_device() -> torch.device:
    """The accelerator this process computes on: its CUDA device, else the CPU (no CUDA, or NEMO_ALIGNER_DEVICE=cpu)."""
    if uses_cuda():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def model_device(model: Any) -> torch.device:
    """The device of ``model``'s parameters (a module, or a list of pipeline chunks); see :func:`current_device`.

    A model without parameters (a pipeline stage that holds none) computes on :func:`current_device`.
    """
    modules = model if isinstance(model, (list, tuple)) else [model]
    for module in modules:
        for parameter in module.parameters():
            return parameter.device
    return current_device()


def to_device(value: Any, device: torch.device | str, non_blocking: bool = False) -> Any:
    """``value`` with every tensor inside it (dicts, lists, tuples, nested) moved to ``device``.

    Tensors already there are returned as they are (no copy); other values are returned unchanged.
    """
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=non_blocking)
    if isinstance(value, Mapping):
        return type(value)({key: to_device(item, device, non_blocking) for key, item in value.items()})
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # namedtuple
        return type(value)(*(to_device(item, device, non_blocking) for item in value))
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(item, device, non_blocking) for item in value)
    return value
