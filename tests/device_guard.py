"""The device guard: catches, on a CPU-only machine, the tensors that would land on the wrong device on a GPU.

On a GPU the model lives on ``cuda:N`` while a tensor factory called without ``device=`` makes a CPU tensor, and
the first operation that mixes the two fails (``../docs/megatron_cpu.md``, "Catching device mistakes without a
GPU"). On the CPU both are the same device, so nothing fails. The guard makes the mistake visible there: while
it is installed (for the whole test session, from ``tests/conftest.py``), a tensor factory or ``torch.Generator``
called *from the project's compute code* without an explicit device raises :class:`DeviceMistake` naming the
file and line. Compute code is every ``nemo_aligner`` module except the host-side ones in
:data:`HOST_SIDE_MODULES` (data loading, checkpoint files, tokenizers, judges' text handling, configuration),
which build CPU tensors on purpose.

Factories that take their device from a tensor argument (``*_like``, ``as_tensor``/``tensor`` of a tensor,
``Tensor.new_*``) follow that tensor and are not flagged. The cost is one frame lookup per flagged-kind call
without ``device=``; every other torch call is untouched.
"""

from __future__ import annotations

import functools
import os
import sys

import torch

# Functions of ``torch`` that create a tensor on the default device unless given ``device=``.
FACTORIES = (
    "arange",
    "empty",
    "empty_strided",
    "eye",
    "full",
    "linspace",
    "ones",
    "rand",
    "randint",
    "randn",
    "randperm",
    "tensor",
    "as_tensor",
    "zeros",
)
# ``nemo_aligner`` modules (and packages) that make CPU tensors on purpose: they may call factories without a device.
HOST_SIDE_MODULES = (
    "nemo_aligner.data",
    "nemo_aligner.checkpoint",
    "nemo_aligner.tokenizers",
    "nemo_aligner.judges",
    "nemo_aligner.utils.config",
    "nemo_aligner.utils.config_validation",
    "nemo_aligner.utils.exp_manager",
    "nemo_aligner.utils.cpu_support",  # its CPU RNG tracker keeps CPU generator states by design
    "nemo_aligner.utils.timers",
)


# DEVICE_GUARD=collect records every offender (file:line) instead of failing, to survey a whole run at once; with
# DEVICE_GUARD_LOG=<file> each new one is also appended there as it happens (survives a run that is cut short).
COLLECT = os.environ.get("DEVICE_GUARD") == "collect"
collected: set[str] = set()


def _record(entry: str) -> None:
    if entry in collected:
        return
    collected.add(entry)
    if os.environ.get("DEVICE_GUARD_LOG"):
        with open(os.environ["DEVICE_GUARD_LOG"], "a", encoding="utf-8") as log:
            log.write(entry + "\n")


class DeviceMistake(AssertionError):
    """A tensor (or generator) made on the default device by compute code; fix: pass ``device=``."""


def is_compute_module(name: str) -> bool:
    """Whether module ``name`` is project compute code the guard checks."""
    if name != "nemo_aligner" and not name.startswith("nemo_aligner."):
        return False
    return not any(name == host or name.startswith(host + ".") for host in HOST_SIDE_MODULES)


def _check_caller(what: str) -> None:
    frame = sys._getframe(2)
    if is_compute_module(frame.f_globals.get("__name__", "")):
        if COLLECT:
            _record(f"{frame.f_code.co_filename}:{frame.f_lineno}: {what}")
            return
        raise DeviceMistake(
            f"{frame.f_code.co_filename}:{frame.f_lineno}: {what} without device=: on a GPU this makes a CPU "
            "tensor next to the model's CUDA tensors; pass device=model_device(...) (or device='cpu' on purpose)"
        )


def _guarded(name: str, factory):
    follows_data = name in ("tensor", "as_tensor")

    @functools.wraps(factory)
    def guarded(*args, **kwargs):
        if kwargs.get("device") is None and not (follows_data and args and isinstance(args[0], torch.Tensor)):
            _check_caller(f"torch.{name}()")
        return factory(*args, **kwargs)

    guarded.__wrapped_factory__ = factory
    return guarded


_REAL_GENERATOR = torch.Generator


class _GeneratorMeta(type(_REAL_GENERATOR)):
    # ``isinstance(torch.default_generator, torch.Generator)`` and the like stay true while the guard is installed.
    def __instancecheck__(cls, obj):
        return isinstance(obj, _REAL_GENERATOR)

    def __subclasscheck__(cls, sub):
        return issubclass(sub, _REAL_GENERATOR)


class _GuardedGenerator(_REAL_GENERATOR, metaclass=_GeneratorMeta):
    def __new__(cls, device=None):
        if device is None:
            _check_caller("torch.Generator()")
            return _REAL_GENERATOR()
        return _REAL_GENERATOR(device)


def install() -> None:
    """Guard the factories and ``torch.Generator`` (idempotent)."""
    # ``with torch.device(...)`` (used by transformers' from_pretrained) recognises factories by identity in a
    # cached set: fill that cache with the real functions first, or tensors made inside such a block would ignore
    # its device (seen: a Llama's RoPE buffer left uninitialised by from_pretrained).
    from torch.utils._device import _device_constructors

    _device_constructors()
    for name in FACTORIES:
        factory = getattr(torch, name)
        if not hasattr(factory, "__wrapped_factory__"):
            setattr(torch, name, _guarded(name, factory))
    torch.Generator = _GuardedGenerator


def uninstall() -> None:
    for name in FACTORIES:
        factory = getattr(torch, name)
        setattr(torch, name, getattr(factory, "__wrapped_factory__", factory))
    torch.Generator = _REAL_GENERATOR
