"""CPU support for megatron-core: the one place that makes megatron-core run without a GPU.

megatron-core has no CPU switch; a few functions call CUDA unconditionally (facts in
``docs/megatron_cpu.md``). When ``torch.cuda.is_available()`` is false, :func:`apply_cpu_support` patches
exactly these things, and nothing else in the project branches on the device:

* the RNG-state tracker (``tensor_parallel.random``) keeps CPU generator states instead of CUDA ones;
* ``torch.cuda.current_device()`` answers ``"cpu"``, ``torch.cuda.synchronize()`` is a no-op, and
  ``Tensor.cuda()`` / ``Tensor.pin_memory()`` return the CPU tensor;
* the attention masks megatron's unfused softmax builds with ``device="cuda"`` (``get_default_causal_mask``,
  ``get_sliding_window_causal_mask``) are built on the CPU, so the model's forward makes no CUDA request and runs
  outside the function mode below (:func:`device_rewrites_suspended`: every torch call under the mode detours
  through Python);
* a :class:`torch.overrides.TorchFunctionMode` rewrites ``device="cuda"`` arguments of tensor factories
  (optimizer scalars, schedule counters) to the CPU and answers ``Tensor.type()`` with the
  CUDA type name that megatron's optimizers check for;

On a GPU machine the function returns without touching anything. ``PATCHED_NAMES`` lists every megatron
name patched here; ``tests/utils/test_cpu_support.py`` fails loudly if an upgrade moves one of them.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

logger = logging.getLogger(__name__)

# (module, attribute) pairs of megatron-core that this module replaces or relies on.
PATCHED_NAMES: tuple[tuple[str, str], ...] = (
    ("megatron.core.tensor_parallel.random", "CudaRNGStatesTracker"),
    ("megatron.core.tensor_parallel.random", "_get_cuda_rng_state"),
    ("megatron.core.tensor_parallel.random", "_set_cuda_rng_state"),
    ("megatron.core.transformer.utils", "get_default_causal_mask"),
    ("megatron.core.transformer.utils", "get_sliding_window_causal_mask"),
    ("megatron.core.fusions.fused_softmax", "get_default_causal_mask"),
    ("megatron.core.fusions.fused_softmax", "get_sliding_window_causal_mask"),
)

_FACTORIES = {
    torch.empty,
    torch.zeros,
    torch.ones,
    torch.full,
    torch.tensor,
    torch.arange,
    torch.rand,
    torch.randn,
    torch.randint,
    torch.empty_like,
    torch.zeros_like,
    torch.ones_like,
    torch.full_like,
    torch.as_tensor,
    torch.empty_strided,
}
_applied = False
_lock = threading.Lock()


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device requests to the CPU.

    It stays entered for the life of the process (on the thread that applied CPU support); the per-op cost
    is one Python call, small next to the matrix products of even a tiny model.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = {**kwargs, "device": "cpu"}
        if kwargs.get("pin_memory"):
            kwargs = {**kwargs, "pin_memory": False}
        if func is torch.Tensor.to:
            args = tuple("cpu" if _is_cuda_device(a) and not isinstance(a, int) else a for a in args)
        elif func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # megatron's optimizers only accept parameters whose type() names a CUDA tensor type.
            return func(*args).replace("torch.", "torch.cuda.", 1)
        return func(*args, **kwargs)


def _causal_mask(sq: int) -> torch.Tensor:
    """megatron's causal mask (True above the diagonal: masked), built on the CPU."""
    return torch.ones(sq, sq, dtype=torch.bool).triu(diagonal=1)


def _sliding_window_causal_mask(sq: int, skv: int, window_size: tuple[int, int]) -> torch.Tensor:
    """megatron's sliding-window mask (True outside the band of ``window_size`` (left, right) around the causal
    diagonal of an ``[sq, skv]`` score matrix: masked), built on the CPU."""
    band = torch.ones(sq, skv, dtype=torch.bool).triu(diagonal=skv - sq - window_size[0])
    return ~band.tril(diagonal=skv - sq + window_size[1])


def _make_cpu_tracker_class(base: type) -> type:
    class CpuRNGStatesTracker(base):
        """megatron's RNG tracker with CPU generator states (for dropout forks and seeding)."""

        def add(self, name: str, seed: int) -> None:
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            generator = torch.Generator().manual_seed(seed)
            self.states_[name] = generator.get_state()

        @contextlib.contextmanager
        def fork(self, name: str = "model-parallel-rng"):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            outer_state = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(outer_state)

    return CpuRNGStatesTracker


@contextlib.contextmanager
def device_rewrites_suspended():
    """Leave the CUDA-to-CPU function mode for a hot loop known to make no CUDA device request.

    With the mode entered every torch call, not just the factories it rewrites, detours through its Python
    ``__torch_function__``: ~30% of a one-token decode step of a small model (docs/performance.md). Exact:
    the mode only rewrites CUDA requests, and a CUDA request inside the block fails loudly on a machine
    without CUDA. Nothing to do where the mode is not entered (GPUs, or another thread).
    """
    stack_size = torch._C._len_torch_function_stack()
    if stack_size == 0 or not isinstance(torch._C._get_function_stack_at(stack_size - 1), _CudaToCpuMode):
        yield
        return
    with torch.overrides._pop_mode_temporarily():
        yield


def with_device_rewrites_suspended(function: Callable[..., Any]) -> Callable[..., Any]:
    """``function`` run inside :func:`device_rewrites_suspended` (a callback that megatron's schedule calls, such
    as a micro batch's loss function)."""

    @functools.wraps(function)
    def suspended(*args, **kwargs):
        with device_rewrites_suspended():
            return function(*args, **kwargs)

    return suspended


# NEMO_ALIGNER_DEVICE=cpu makes a process compute on the CPU even where CUDA exists: the multi-process tests set it
# when a machine has fewer GPUs than ranks (they then run over gloo, as on a machine without GPUs).
DEVICE_ENV = "NEMO_ALIGNER_DEVICE"


def uses_cuda() -> bool:
    """Whether this process computes on CUDA: a GPU is present and ``NEMO_ALIGNER_DEVICE`` is not ``cpu``."""
    return torch.cuda.is_available() and os.environ.get(DEVICE_ENV, "").lower() != "cpu"


def process_group_backend() -> str:
    """torch.distributed backend for this process: NCCL on CUDA (``trainer.devices=8``, torchrun, srun), else gloo."""
    return "nccl" if uses_cuda() else "gloo"


def bind_local_device(local_rank: int) -> None:
    """Give this process its own GPU (one rank per GPU, ``LOCAL_RANK``); nothing to do on the CPU."""
    if uses_cuda():
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"local rank {local_rank} has no GPU of its own ({torch.cuda.device_count()} visible): start one "
                f"process per GPU, or set {DEVICE_ENV}=cpu to run every rank on the CPU over gloo"
            )
        torch.cuda.set_device(local_rank)


def apply_cpu_support() -> bool:
    """Make megatron-core usable on the CPU. Returns True if patches were applied (CPU compute), else False."""
    global _applied
    if uses_cuda():
        return False
    with _lock:
        if _applied:
            return True
        from megatron.core.tensor_parallel import random as mcore_random

        mcore_random.CudaRNGStatesTracker = _make_cpu_tracker_class(mcore_random.CudaRNGStatesTracker)
        mcore_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
        mcore_random._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
        from megatron.core.fusions import fused_softmax
        from megatron.core.transformer import utils as mcore_transformer_utils

        for module in (mcore_transformer_utils, fused_softmax):
            module.get_default_causal_mask = _causal_mask
            module.get_sliding_window_causal_mask = _sliding_window_causal_mask

        torch.cuda.current_device = lambda: "cpu"
        torch.cuda.synchronize = lambda *args, **kwargs: None
        torch.Tensor.cuda = lambda self, *args, **kwargs: self
        torch.Tensor.pin_memory = lambda self, *args, **kwargs: self
        _CudaToCpuMode().__enter__()
        _applied = True
        logger.info("No CUDA device: megatron-core runs on the CPU with nemo_aligner's CPU support.")
    return True
