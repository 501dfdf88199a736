"""The reference policy of DPO, SPIN and Self-Rewarding: one interface, three implementations.

A preference loss compares the policy's log-probs of a response with the reference policy's (Rafailov et al. 2023,
arXiv 2305.18290). Where the reference comes from is chosen once, when the model is built, from
``model.<algorithm>.reference`` and ``model.peft`` (:func:`build_reference_policy`):

=====================  ===============================  ==========================================
``reference``          full-parameter model             LoRA (``model.peft.peft_scheme=lora``)
=====================  ===============================  ==========================================
``precomputed``        :class:`PrecomputedReference`:   :class:`PrecomputedReference` scored with
                       a table scored once with the     the adapters off
                       initial weights
``cpu_weight_swap``    :class:`CPUWeightSwapReference`  :class:`AdaptersOffReference`
=====================  ===============================  ==========================================

Every implementation answers the same questions: the reference's log-prob sums of a batch of pairs
(:meth:`ReferencePolicy.logprob_sums`, computed inside :meth:`ReferencePolicy.scoring`), what becomes the reference
at an iteration boundary (:meth:`ReferencePolicy.refresh`: SPIN and Self-Rewarding), what identifies its values
in a cache (:meth:`ReferencePolicy.fingerprint`), what a trainer checkpoint holds of it
(:meth:`ReferencePolicy.sharded_state_dict`) and where its tensors live (:meth:`ReferencePolicy.to`).

Devices (``nemo_aligner/utils/device.py``): tables and the values they attach to batches live on the model's
device; the CPU-swapped weights stay in host memory (that is their point) and are copied into the parameters on
their device; tables come back to the CPU only to be gathered across ranks or saved.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

from nemo_aligner.models.nlp.gpt.lora import lora_adapters
from nemo_aligner.utils.device import model_device
from nemo_aligner.utils.distributed import gather_data_parallel_objects
from nemo_aligner.utils.kill_points import kill_point
from nemo_aligner.utils.timers import mark_event
from nemo_aligner.utils.utils import _named_model_tensors, cpu_weight_swap

logger = logging.getLogger(__name__)

REFERENCE_STRATEGIES = ("precomputed", "cpu_weight_swap")
REFERENCE_PREFIX = "reference_policy."
"""Key prefix of the CPU-held reference weights in trainer checkpoints (SPIN, Self-Rewarding)."""
CACHE_FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------------------- the table
class ReferenceLogprobs:
    """Reference log-prob sums of chosen and rejected responses, looked up by dataset sample index."""

    def __init__(self, sample_index: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor):
        self.position = {int(i): n for n, i in enumerate(sample_index.tolist())}
        self.sample_index, self.chosen, self.rejected = sample_index, chosen, rejected

    def to(self, device: torch.device | str) -> ReferenceLogprobs:
        """The table with its values on ``device`` (the sample index stays where it is: it is only read)."""
        return ReferenceLogprobs(self.sample_index, self.chosen.to(device), self.rejected.to(device))

    def attach(self, batch: Mapping[str, Any]) -> dict:
        """``batch`` plus ``ref_chosen_logps``/``ref_rejected_logps`` on the table's device (fillers and unscored
        masked pairs get 0)."""
        rows = []
        valid = batch["valid"].tolist() if "valid" in batch else [1.0] * len(batch["sample_index"])
        for index, is_valid in zip(batch["sample_index"].tolist(), valid):
            if index < 0 or (not is_valid and index not in self.position):
                rows.append(-1)  # fillers and masked pairs without a value contribute nothing
            elif index not in self.position:
                raise KeyError(f"no precomputed reference log-probs for sample {index}; delete the cache to rebuild")
            else:
                rows.append(self.position[index])
        device = self.chosen.device
        rows_t = torch.tensor(rows, device=device)
        zero = torch.zeros(len(rows), dtype=self.chosen.dtype, device=device)
        chosen = torch.where(rows_t >= 0, self.chosen[rows_t.clamp(min=0)], zero)
        rejected = torch.where(rows_t >= 0, self.rejected[rows_t.clamp(min=0)], zero)
        return {**batch, "ref_chosen_logps": chosen, "ref_rejected_logps": rejected}

    def state(self) -> dict[str, torch.Tensor]:
        """The table as CPU tensors (what rollouts and the cache file store)."""
        return {"sample_index": self.sample_index.cpu(), "chosen": self.chosen.cpu(), "rejected": self.rejected.cpu()}

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor]) -> ReferenceLogprobs:
        return cls(state["sample_index"], state["chosen"], state["rejected"])

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(self.state(), tmp)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> ReferenceLogprobs:
        return cls.from_state(torch.load(path, map_location="cpu", weights_only=True))


def gather_reference_logprobs(
    sample_index: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor
) -> ReferenceLogprobs:
    """This rank's reference values joined with every other data-parallel rank's (a collective call); CPU tensors
    (objects travel between ranks through host memory)."""
    parts = gather_data_parallel_objects((sample_index.cpu(), chosen.cpu(), rejected.cpu()))
    local = tuple(torch.cat([part[i] for part in parts]) for i in range(3))
    return ReferenceLogprobs(local[0].long(), local[1], local[2])


@torch.no_grad()
def compute_reference_logprobs(model, batches: Iterable[Mapping[str, Any]]) -> ReferenceLogprobs:
    """Score every batch with the model's reference policy; gather the results of all data-parallel ranks."""
    mark_event("reference_pass")
    indices, chosen, rejected = [], [], []
    for batch in batches:
        c, r = model.reference.logprob_sums(model, batch)
        keep = batch["sample_index"] >= 0
        indices.append(batch["sample_index"][keep])
        chosen.append(c[keep.to(c.device)].float())
        rejected.append(r[keep.to(r.device)].float())
        kill_point("reference_logprobs")
    if not indices:
        return gather_reference_logprobs(*(torch.empty(0, device="cpu") for _ in range(3)))
    return gather_reference_logprobs(torch.cat(indices), torch.cat(chosen), torch.cat(rejected))


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


# ---------------------------------------------------------------------------------------------- the interface
class ReferencePolicy:
    """Where a preference model's reference log-probs come from (module docstring).

    ``precomputed``: the values are scored once (before training, or in an iteration's rollout) into tables that
    :meth:`attach` adds to batches; otherwise the model calls :meth:`logprob_sums` in every step.
    """

    precomputed = False
    scores_current_weights = False
    """Whether scoring uses the model's weights as they are (so values recorded while generating with them are
    reference values too)."""

    def scoring(self, model) -> contextlib.AbstractContextManager:
        """A context inside which ``model`` computes the reference policy."""
        raise NotImplementedError

    def logprob_sums(self, model, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference log-prob sums ``([B], [B])`` of a batch's chosen and rejected responses, on the model's device."""
        with self.scoring(model):
            return model.get_logprob_sums(batch)

    def refresh(self, model) -> None:
        """At an iteration boundary (and when training starts): what becomes the reference from now on."""

    def fingerprint(self, model) -> dict[str, Any]:
        """What of ``model`` and this policy determines its values (part of a cache file's fingerprint)."""
        return {}

    def sharded_state_dict(self, model, prefix: str = "") -> dict:
        """What a trainer checkpoint holds of this policy (sharded like the model's weights); empty by default."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        """Restore what :meth:`sharded_state_dict` saved (``None``: the checkpoint held nothing)."""

    def to(self, device: torch.device | str) -> None:
        """Move the policy's device-side tensors to ``device``."""


# ---------------------------------------------------------------------------------------------- the three kinds
class AdaptersOffReference(ReferencePolicy):
    """LoRA: the reference is the base model, computed exactly by skipping the adapters."""

    def scoring(self, model) -> contextlib.AbstractContextManager:
        return lora_adapters_disabled(model)


@contextlib.contextmanager
def lora_adapters_disabled(model) -> Iterator[None]:
    """Inside, ``model`` computes its base model exactly (the LoRA adapters are skipped, not zeroed)."""
    adapters = list(lora_adapters(model).values())
    previous = [adapter.enabled for adapter in adapters]
    for adapter in adapters:
        adapter.enabled = False
    try:
        yield
    finally:
        for adapter, enabled in zip(adapters, previous):
            adapter.enabled = enabled


class CurrentWeights(ReferencePolicy):
    """The model as it is (the scorer of a precomputed table taken with the initial weights)."""

    scores_current_weights = True

    def scoring(self, model) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def logprob_sums(self, model, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        return model.get_logprob_sums(batch)


class CPUWeightSwapReference(ReferencePolicy):
    """Reference weights held in host memory and copied into the model's parameters for each reference pass.

    ``weights`` are ``model.*``-named CPU tensors (``model.model_state_dict_in_cpu()``); :meth:`refresh` takes them
    from the model. With ``in_checkpoints`` (SPIN, Self-Rewarding: the reference moves every iteration) they are
    saved in trainer checkpoints under ``reference_policy.`` keys, sharded like the model's weights.
    """

    def __init__(self, weights: dict[str, torch.Tensor] | None = None, in_checkpoints: bool = False):
        self.weights = weights
        self.in_checkpoints = in_checkpoints

    def scoring(self, model) -> contextlib.AbstractContextManager:
        if self.weights is None:
            raise RuntimeError("the CPU-swapped reference has no weights yet: call reference.refresh(model) first")
        return cpu_weight_swap(model, self.weights)

    def refresh(self, model) -> None:
        self.weights = model.model_state_dict_in_cpu()

    def sharded_state_dict(self, model, prefix: str = "") -> dict:
        """The model's sharding metadata with the reference tensors as data and ``reference_policy.`` keys."""
        if not self.in_checkpoints or self.weights is None:
            return {}
        name_of = {id(tensor): name for name, tensor in _named_model_tensors(model).items()}
        reference = model.weights_sharded_state_dict(prefix)

        def swap(item):
            if isinstance(item, (ShardedTensor, ShardedTensorFactory)) and id(item.data) in name_of:
                # A checkpoint is written from (and read into) tensors on the model's device.
                data = self.weights[name_of[id(item.data)]].to(item.data.device)
                return dataclasses.replace(item, key=REFERENCE_PREFIX + item.key, data=data)
            return None

        dict_list_map_inplace(swap, reference)
        return {REFERENCE_PREFIX: _drop_none(reference)}

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        if state is not None:
            self.weights = {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


class PrecomputedReference(ReferencePolicy):
    """The reference is frozen while its values are used: they are scored once by ``scorer`` (the initial weights,
    or the base model with LoRA adapters off) into per-split tables (``train``, ``validation``) that
    :meth:`attach` adds to batches. SPIN and Self-Rewarding score a new ``train`` table in every rollout.
    """

    precomputed = True

    def __init__(self, scorer: ReferencePolicy):
        self.scorer = scorer
        self.tables: dict[str, ReferenceLogprobs] = {}
        self.device: torch.device | None = None

    @property
    def scores_current_weights(self) -> bool:
        return self.scorer.scores_current_weights

    def scoring(self, model) -> contextlib.AbstractContextManager:
        return self.scorer.scoring(model)

    def logprob_sums(self, model, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.scorer.logprob_sums(model, batch)

    def set_table(self, split: str, table: ReferenceLogprobs | None) -> None:
        if table is None:
            self.tables.pop(split, None)
        else:
            self.tables[split] = table.to(self.device) if self.device is not None else table

    def attach(self, batch: Mapping[str, Any], split: str) -> Mapping[str, Any]:
        """``batch`` with the split's reference values (unchanged when the split has no table)."""
        table = self.tables.get(split)
        return batch if table is None else table.attach(batch)

    def refresh(self, model) -> None:
        self.tables.clear()  # the new reference's values come with the next rollout
        self.to(model_device(model.model))

    def fingerprint(self, model) -> dict[str, Any]:
        """Adapters (``peft``), batching, forward layout (these change the float rounding of the log-probs: a
        reused table would break the exact first loss) and parallel layout."""
        cfg = model.cfg
        return {
            "peft": cfg.get("peft"),
            "batching": [cfg.micro_batch_size, cfg.global_batch_size, model.log_prob_micro_batch_size],
            "forward": [model.prefix_sharing, cfg.get("local_core_attention"), model.packed_sequences],
            "parallel": [
                cfg.tensor_model_parallel_size,
                cfg.pipeline_model_parallel_size,
                torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1,
            ],
        }

    def to(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.tables = {split: table.to(device) for split, table in self.tables.items()}


def build_reference_policy(strategy: str, lora: bool, in_checkpoints: bool, key: str) -> ReferencePolicy:
    """The reference policy for ``model.<algorithm>.reference`` = ``strategy`` (``key`` names it in errors)."""
    if strategy not in REFERENCE_STRATEGIES:
        raise ValueError(f"{key}={strategy!r}; choose one of {REFERENCE_STRATEGIES}")
    if strategy == "precomputed":
        return PrecomputedReference(AdaptersOffReference() if lora else CurrentWeights())
    return AdaptersOffReference() if lora else CPUWeightSwapReference(in_checkpoints=in_checkpoints)


def _drop_none(tree: dict) -> dict:
    return {k: (_drop_none(v) if isinstance(v, dict) else v) for k, v in tree.items() if v is not None}
