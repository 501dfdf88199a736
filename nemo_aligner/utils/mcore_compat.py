"""The one place for megatron-core version differences.

Written against megatron-core 0.16.1 (what Python 3.11 installs) and kept to APIs that NVIDIA's newer
containers still ship. Everything else in the project imports megatron names from here or from stable modules
(``parallel_state``, ``tensor_parallel``, ``dist_checkpointing``, ``optimizer``, ``pipeline_parallel``).
"""

from __future__ import annotations

import importlib.util
import queue
import warnings

from megatron.core import package_info
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

MCORE_VERSION: tuple[int, ...] = tuple(int(p) for p in package_info.__version__.split(".")[:2])

__all__ = [
    "GPTModel",
    "MCORE_VERSION",
    "StaticInferenceContext",
    "TransformerBlockSubmodules",
    "get_gpt_layer_local_spec",
    "get_num_layers_to_build",
    "have_transformer_engine",
    "te_layer_spec",
]


def have_transformer_engine() -> bool:
    """True when TransformerEngine is importable (an optional GPU accelerator)."""
    return importlib.util.find_spec("transformer_engine") is not None


def te_layer_spec():
    """megatron-core's TransformerEngine layer spec (GPU only)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return get_gpt_layer_with_transformer_engine_spec()


_write_results_queue = None


def _in_process_write_results_queue(*_args, **_kwargs):
    """An in-process queue for megatron's synchronous checkpoint writer.

    megatron-core creates this queue through a ``spawn``-started ``multiprocessing.Manager``, which costs
    several seconds per process (the child re-imports torch) and re-runs an unguarded ``__main__``. Our saves
    are synchronous: the writer's results are put and read by this process only (its forked workers report
    through their own queue), so a plain thread-safe queue, whose ``put`` is immediately visible, is enough.
    """
    global _write_results_queue
    if _write_results_queue is None:
        _write_results_queue = queue.Queue()
    return _write_results_queue


def _write_results_queue_name() -> str:
    """The queue factory's name: ``_get_write_results_queue()`` up to 0.16, ``get_write_results_queue(mp_mode)``
    from 0.17 on (read in the 0.19.2 source)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    return (
        "get_write_results_queue"
        if hasattr(filesystem_async, "get_write_results_queue")
        else "_get_write_results_queue"
    )


def _patch_checkpoint_writer() -> None:
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    setattr(filesystem_async, _write_results_queue_name(), _in_process_write_results_queue)


# megatron private names replaced here; tests/utils/test_cpu_support.py checks they still exist.
PATCHED_NAMES: tuple[tuple[str, str], ...] = (
    ("megatron.core.dist_checkpointing.strategies.filesystem_async", _write_results_queue_name()),
)
_patch_checkpoint_writer()


def distributed_optimizer_resumable() -> bool:
    """Whether megatron-core's distributed optimizer can be checkpointed and resumed here.

    megatron-core (0.16) runs its distributed optimizer on torch's Adam when neither Apex nor TransformerEngine is
    installed, but then cannot build the state dict to load a checkpoint into (a bare ``assert len(steps) == 1``
    on the fresh optimizer, then missing ``step`` tensors). With Apex or TE it uses their fused Adam, which works.
    """
    from megatron.core.optimizer import distrib_optimizer

    return bool(getattr(distrib_optimizer, "HAVE_APEX_OR_TE", True))
