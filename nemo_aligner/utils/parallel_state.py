"""NeMo-Aligner's ``nemo_aligner.utils.parallel_state``: its scripts call ``parallel_state.get_data_parallel_*``.

Every name is megatron-core's own ``megatron.core.parallel_state`` function (thin entry: nothing here keeps state
of its own), so ``from nemo_aligner.utils import parallel_state`` and megatron-core agree by construction.
"""

from __future__ import annotations

from megatron.core import parallel_state as _megatron_parallel_state


def __getattr__(name: str):
    try:
        return getattr(_megatron_parallel_state, name)
    except AttributeError:
        raise AttributeError(
            f"nemo_aligner.utils.parallel_state.{name} does not exist: this module forwards to "
            "megatron.core.parallel_state, which has no such name"
        ) from None
