"""Splitting a global-batch share into micro batches, and reducing per-micro-batch metric sums."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.distributed as dist
from megatron.core import parallel_state

COMPUTE_WIDTH_MULTIPLE = 16
"""Trimmed and packed widths round up to this many tokens where the data sets no ``pad_length_to_multiple_of``.
Every distinct width of a matrix product gets its own compiled CPU kernels (oneDNN caches them per shape, never
freed): a width per batch cost ~2 MiB of resident memory each, ~130 MiB over the first 25 steps of a tiny DPO run
(with 16: none after the first few steps, and the steps ~5% faster). GPUs' tensor cores prefer such widths too. At
most 15 padding tokens per row, which no real token attends to."""


def split_into_micro_batches(batch: Mapping[str, torch.Tensor], micro_batch_size: int) -> list[dict]:
    """Cut every tensor of ``batch`` (leading dimension = samples) into chunks of ``micro_batch_size``."""
    sizes = {key: value.shape[0] for key, value in batch.items() if isinstance(value, torch.Tensor)}
    total = next(iter(sizes.values()))
    if any(size != total for size in sizes.values()):
        raise ValueError(f"batch tensors disagree on the number of samples: {sizes}")
    if total % micro_batch_size != 0:
        raise ValueError(f"{total} samples on this rank do not split into micro batches of {micro_batch_size}")
    return [
        {k: (v[start : start + micro_batch_size] if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        for start in range(0, total, micro_batch_size)
    ]


def reduce_metric_sums(per_micro_batch: Iterable[Mapping[str, torch.Tensor]], keys: Iterable[str]) -> dict[str, float]:
    """Sum ``keys`` over micro batches and over data-parallel ranks; every rank gets the totals.

    Loss functions report sums (and counts), never means, so a mean over the global batch is
    ``total / count`` whatever the micro batch size or data-parallel size. Metrics exist only on the last pipeline
    stage; they are broadcast to the other stages.
    """
    keys = list(keys)
    # torch.cuda.current_device() is the GPU for NCCL, and "cpu" under the CPU support (gloo).
    totals = torch.zeros(len(keys), dtype=torch.float64, device=torch.cuda.current_device())
    for metrics in per_micro_batch:
        totals += torch.stack(
            [torch.as_tensor(metrics[k], dtype=torch.float64, device=totals.device).sum() for k in keys]
        )
    if dist.is_initialized():
        dist.all_reduce(totals, group=parallel_state.get_data_parallel_group())
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            last = parallel_state.get_pipeline_model_parallel_last_rank()
            dist.broadcast(totals, src=last, group=parallel_state.get_pipeline_model_parallel_group())
    return dict(zip(keys, totals.cpu().tolist()))


def sequence_ends(mask: torch.Tensor) -> torch.Tensor:
    """One past the last nonzero column of each row of ``mask`` ``[N, S]`` (1 for an all-zero row): where a
    sequence's scored tokens end, i.e. the width it needs. ``[N]`` long."""
    columns = torch.arange(1, mask.shape[1] + 1, device=mask.device)
    return ((mask > 0) * columns).amax(dim=1).clamp(min=1)


def length_bucketed_micro_batches(
    batch: Mapping[str, torch.Tensor],
    micro_batch_size: int,
    lengths: torch.Tensor,
    sequence_keys: Iterable[str],
    multiple_of: int | None = None,
) -> tuple[list[dict], torch.Tensor]:
    """Micro batches of samples of similar length, each trimmed to its own longest sample; and the sample order.

    A collated batch is padded to its longest sample, so every micro batch would compute on that width. Sorting
    this rank's samples by ``lengths`` (stable) before cutting puts short samples together, and each micro
    batch's ``sequence_keys`` tensors (``[samples, S]``, right-padded) are cut to its longest sample (rounded up to
    ``multiple_of``, the data's ``pad_length_to_multiple_of``): no compute on columns that are padding for all
    its rows. Per-sample results are those of the unsorted batch (causal
    attention: real tokens never see right padding); sums over micro batches only change summation order.
    ``order[k]`` is the original index of sorted sample ``k`` (to put per-sample outputs back in place).

    Under pipeline parallelism the stages exchange activations of one fixed shape, so micro batches keep the full
    width there (they are still sorted).
    """
    order = torch.sort(lengths, stable=True).indices
    sorted_batch = {k: (v[order] if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    micro_batches = split_into_micro_batches(sorted_batch, micro_batch_size)
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        return micro_batches, order
    keys = list(sequence_keys)
    full_width = batch[keys[0]].shape[1]
    for micro_batch, micro_lengths in zip(micro_batches, lengths[order].split(micro_batch_size)):
        width = int(micro_lengths.max())
        if multiple_of:
            width = min(-(-width // multiple_of) * multiple_of, full_width)
        for key in keys:
            micro_batch[key] = micro_batch[key][:, :width]
    return micro_batches, order
