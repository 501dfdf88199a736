"""DPO training loop and the precomputed reference policy.

The reference policy of DPO is frozen, so by default its log-probs are computed once, before training, with the
same batching and padding as the training steps (the first step then sees bit-identical policy and reference
values: loss exactly log 2, every reward 0). They are stored per sample beside the experiment and reused across
epochs and on resume; a fingerprint of data, model, tokenizer and batching invalidates them when any changes.
The other two reference strategies (CPU-swapped weights, LoRA adapters off) compute them per step in the model.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from nemo_aligner.algorithms.base import BaseTrainer
from nemo_aligner.utils.distributed import is_global_rank_zero
from nemo_aligner.utils.kill_points import kill_point

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1


class ReferenceLogprobs:
    """Reference log-prob sums of chosen and rejected responses, looked up by dataset sample index."""

    def __init__(self, sample_index: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor):
        self.position = {int(i): n for n, i in enumerate(sample_index.tolist())}
        self.sample_index, self.chosen, self.rejected = sample_index, chosen, rejected

    def attach(self, batch: Mapping[str, Any]) -> dict:
        """``batch`` plus ``ref_chosen_logps``/``ref_rejected_logps`` (fillers and unscored masked pairs get 0)."""
        rows = []
        valid = batch["valid"].tolist() if "valid" in batch else [1.0] * len(batch["sample_index"])
        for index, is_valid in zip(batch["sample_index"].tolist(), valid):
            if index < 0 or (not is_valid and index not in self.position):
                rows.append(-1)  # fillers and masked pairs without a value contribute nothing
            elif index not in self.position:
                raise KeyError(f"no precomputed reference log-probs for sample {index}; delete the cache to rebuild")
            else:
                rows.append(self.position[index])
        rows_t = torch.tensor(rows, device="cpu")  # the reference table is host-side
        zero = torch.zeros(len(rows), device="cpu")
        chosen = torch.where(rows_t >= 0, self.chosen[rows_t.clamp(min=0)], zero)
        rejected = torch.where(rows_t >= 0, self.rejected[rows_t.clamp(min=0)], zero)
        return {**batch, "ref_chosen_logps": chosen, "ref_rejected_logps": rejected}

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"sample_index": self.sample_index, "chosen": self.chosen, "rejected": self.rejected}, tmp)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> ReferenceLogprobs:
        data = torch.load(path, map_location="cpu", weights_only=True)
        return cls(data["sample_index"], data["chosen"], data["rejected"])


def fingerprint(parts: Mapping[str, Any], files: Iterable[str | Path]) -> str:
    """A hash of the settings that determine reference log-probs and of the data files' contents."""
    digest = hashlib.sha256(json.dumps({"v": CACHE_FORMAT_VERSION, **parts}, sort_keys=True, default=str).encode())
    for file in files:
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:20]


def checkpoint_identity(path: str | Path | None) -> dict[str, Any]:
    """Cheap identity of a checkpoint file or directory (path, size, modification time)."""
    if not path:
        return {"checkpoint": None}
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {
        "checkpoint": str(path.resolve()),
        "stat": [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files],
    }


@torch.no_grad()
def compute_reference_logprobs(model, batches: Iterable[Mapping[str, Any]]) -> ReferenceLogprobs:
    """Score every batch with the model's reference policy; gather the results of all data-parallel ranks."""
    indices, chosen, rejected = [], [], []
    for batch in batches:
        if model.reference_strategy == "precomputed" and getattr(model, "lora_adapters_disabled", None) is None:
            c, r = model.get_logprob_sums(batch)  # the model's current weights are the reference
        else:
            c, r = model.get_ref_policy_logprob_sums(batch)
        keep = batch["sample_index"] >= 0
        indices.append(batch["sample_index"][keep])
        chosen.append(c[keep].float())
        rejected.append(r[keep].float())
        kill_point("reference_logprobs")
    if not indices:
        return gather_reference_logprobs(*(torch.empty(0, device="cpu") for _ in range(3)))
    return gather_reference_logprobs(torch.cat(indices), torch.cat(chosen), torch.cat(rejected))


def gather_reference_logprobs(
    sample_index: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor
) -> ReferenceLogprobs:
    """This rank's reference values joined with every other data-parallel rank's (a collective call)."""
    local = (sample_index, chosen, rejected)
    if dist.is_initialized() and parallel_state.get_data_parallel_world_size() > 1:
        gathered = [None] * parallel_state.get_data_parallel_world_size()
        dist.all_gather_object(
            gathered, local, group=parallel_state.get_data_parallel_group(with_context_parallel=False)
        )
        local = tuple(torch.cat([g[i] for g in gathered]) for i in range(3))
    return ReferenceLogprobs(local[0].long(), local[1], local[2])


def training_order_batches(dataloader, first_epoch_steps: int, need_all: bool) -> Iterable[Mapping[str, Any]]:
    """The batches of the first ``first_epoch_steps`` steps exactly as training will see them (epoch 0 order).

    With ``need_all`` (training goes past those steps), samples not yet scored are added in further batches of
    the same size, so every sample a later epoch may draw has a value.
    """
    sampler = dataloader.batch_sampler
    sampler.consumed_samples = 0
    seen: set[int] = set()
    for step, batch in enumerate(dataloader):
        if step >= first_epoch_steps:
            break
        seen.update(i for i in batch["sample_index"].tolist() if i >= 0)
        yield batch
    if need_all:
        yield from _remaining_batches(dataloader, seen)


def _remaining_batches(dataloader, seen: set[int]):
    sampler = dataloader.batch_sampler
    share = sampler.rank_batch_size
    everything = sorted(set(range(len(dataloader.dataset))) - _all_ranks_seen(seen))
    per_step = sampler.global_batch_size
    start = sampler.data_parallel_rank * share
    for offset in range(0, len(everything), per_step):
        chunk = everything[offset : offset + per_step]
        chunk = chunk + [-1] * (per_step - len(chunk))
        yield dataloader.collate_fn([dataloader.dataset[i] for i in chunk[start : start + share]])


def _all_ranks_seen(seen: set[int]) -> set[int]:
    if not dist.is_initialized() or parallel_state.get_data_parallel_world_size() == 1:
        return seen
    gathered = [None] * parallel_state.get_data_parallel_world_size()
    dist.all_gather_object(gathered, seen, group=parallel_state.get_data_parallel_group(with_context_parallel=False))
    return set().union(*gathered)


def load_or_compute_reference(
    model, batches: Iterable[Mapping[str, Any]], cache_path: Path | None
) -> ReferenceLogprobs:
    """The cached table when its fingerprinted file exists, else computed from ``batches`` (cached by rank 0)."""
    if cache_path is not None and cache_path.is_file():
        logger.info("Reusing precomputed reference log-probs %s", cache_path)
        return ReferenceLogprobs.load(cache_path)
    logger.info("Precomputing reference log-probs (%s)", cache_path or "not cached")
    table = compute_reference_logprobs(model, batches)
    if cache_path is not None and is_global_rank_zero():
        table.save(cache_path)
    if dist.is_initialized():
        dist.barrier()
    return table


class DPOTrainer(BaseTrainer):
    """The shared loop with reference log-probs attached to every batch (precomputed strategy)."""

    def __init__(self, *args, train_reference: ReferenceLogprobs | None = None, val_reference=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.train_reference = train_reference
        self.val_reference = val_reference

    def prepare_batch(self, batch: Mapping[str, Any], training: bool) -> Mapping[str, Any]:
        table = self.train_reference if training else self.val_reference
        return batch if table is None else table.attach(batch)
