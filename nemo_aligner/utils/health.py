"""The non-finite guard: a NaN or inf loss, gradient norm or weight never becomes an update or a checkpoint.

Policy, per trainer (``trainer.<algorithm>.non_finite`` in the YAML; see docs/run_health.md):

* ``policy: stop`` (default): the run ends with :class:`NonFiniteError` naming the step, the quantity and the
  likely causes. Nothing is saved after the bad step, so the last checkpoint on disk is the last good one.
* ``policy: skip``: the step's update is dropped (no optimizer step, no LR-schedule step: what megatron-core's
  loss scaler does for fp16 overflow), the batch counts as consumed, and the run stops with
  :class:`NonFiniteError` once ``max_consecutive_skips`` steps in a row were skipped.

Detection uses megatron-core's own machinery: :meth:`MegatronOptimizer.prepare_grads` (the fp16 loss scaler's
found-inf check, all-reduced over the model-parallel group) and :meth:`MegatronOptimizer.get_grad_norm` (the global
gradient norm, all-reduced over the group that shares gradient statistics). The loss and the verdict are then
agreed across all ranks, so every rank skips or stops at the same step. megatron's DDP option
``check_for_nan_in_grad`` is not used: it aborts inside the gradient all-reduce (through its rerun state machine),
on the ranks that see the NaN only, which allows neither the skip policy nor a named error. Before every checkpoint
or ``.nemo`` the tensors about to be written are checked (:func:`require_finite`), so a weight that went non-finite
is caught even when no loss or norm showed it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from nemo_aligner.utils.device import current_device

LIKELY_CAUSES = (
    "a learning rate too high for the model or batch size, bf16/fp16 overflow in long sequences, a loss weight or "
    "KL penalty out of range, or a data sample that breaks the loss"
)


class NonFiniteError(RuntimeError):
    """Training produced a NaN or inf (loss, gradient norm or weight); the message names step and quantity."""


def agree_each(flags: list[bool]) -> list[bool]:
    """Each flag true on every rank when it is true on any rank (each rank checks what it holds; all act alike)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return list(flags)
    tensor = torch.tensor([1.0 if flag else 0.0 for flag in flags], device=current_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return [bool(value) for value in tensor.tolist()]


def agree_any(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any rank (stop decisions must agree across ranks)."""
    return agree_each([flag])[0]


def is_finite(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, torch.Tensor):
        return bool(torch.isfinite(value).all())
    return math.isfinite(float(value))


@dataclass
class NonFiniteGuard:
    """One trainer's guard; ``consecutive`` and ``skipped`` are part of the trainer state (resumed exactly)."""

    policy: str = "stop"
    max_consecutive_skips: int = 3
    loop: str = "trainer"
    consecutive: int = 0
    skipped: int = 0

    @classmethod
    def from_config(cls, loop_cfg: Mapping[str, Any]) -> NonFiniteGuard:
        """From ``trainer.<algorithm>`` (its ``non_finite`` section; absent: stop at the first non-finite step)."""
        cfg = loop_cfg.get("non_finite") or {}
        section = getattr(loop_cfg, "_key", lambda: None)() or "<algorithm>"  # "sft", "dpo": for messages
        return cls(
            policy=str(cfg.get("policy", "stop")),
            max_consecutive_skips=int(cfg.get("max_consecutive_skips", 3)),
            loop=str(section),
        )

    def state_dict(self) -> dict[str, int]:
        return {"non_finite_consecutive": self.consecutive, "non_finite_skipped": self.skipped}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.consecutive = int(state.get("non_finite_consecutive", 0))
        self.skipped = int(state.get("non_finite_skipped", 0))

    def optimizer_step(self, optimizer, loss: Any, step: int) -> tuple[bool, float | None]:
        """megatron-core's ``optimizer.step()``, with the update dropped when the loss or gradient norm is not
        finite on any rank. Returns (whether the weights were updated, gradient norm). ``step`` is 1-based."""
        found_inf = optimizer.prepare_grads()  # copies grads to main grads; fp16: the loss scaler's overflow check
        if found_inf:  # fp16 overflow: megatron already lowered the loss scale; its usual skipped step
            return False, None
        grad_norm = optimizer.get_grad_norm()
        values = {"loss": loss, "gradient norm": grad_norm}
        verdicts = agree_each([not is_finite(value) for value in values.values()])  # one all-reduce for both
        bad = [name for name, non_finite in zip(values, verdicts) if non_finite]
        if bad:
            self._non_finite(step, bad, values)
            return False, float(grad_norm) if grad_norm is not None else None
        self.consecutive = 0
        _clip_by_total_norm(optimizer, grad_norm)
        return optimizer.step_with_ready_grads(), grad_norm

    def _non_finite(self, step: int, quantities: list[str], values: Mapping[str, Any]) -> None:
        shown = ", ".join(f"{name} = {_scalar(values[name])}" for name in quantities)
        where = f"step {step}: non-finite {' and '.join(quantities)} ({shown})"
        key = f"trainer.{self.loop}.non_finite"
        if self.policy == "stop":
            raise NonFiniteError(
                f"{where}. Likely causes: {LIKELY_CAUSES}. The run stopped before updating the weights ({key}.policy="
                f"stop); the last checkpoint on disk is the last good one. Lower the learning rate or check the data, "
                f"or set {key}.policy=skip to drop such steps."
            )
        self.consecutive += 1
        self.skipped += 1
        if self.consecutive >= self.max_consecutive_skips:
            raise NonFiniteError(
                f"{where}: {self.consecutive} consecutive steps skipped ({key}.max_consecutive_skips="
                f"{self.max_consecutive_skips}). Likely causes: {LIKELY_CAUSES}. The last checkpoint on disk is the "
                "last good one."
            )


def _scalar(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        value = value.float().reshape(-1)[0].item() if value.numel() else float("nan")
    return f"{float(value):g}" if value is not None else "n/a"


def _clip_by_total_norm(optimizer, grad_norm: float) -> None:
    """Clip with the norm already computed, as megatron-core's ``ChainedOptimizer.step`` does."""
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    for one in getattr(optimizer, "chained_optimizers", [optimizer]):
        if getattr(one, "is_stub_optimizer", False) or one.config.clip_grad <= 0.0:
            continue
        parameters = one.get_parameters()
        if parameters:
            decoupled = getattr(one.config, "use_precision_aware_optimizer_no_fp8_or_ds_fp8", False)
            clip_grad_by_total_norm_fp32(parameters, one.config.clip_grad, grad_norm, decoupled)


def _tensors(node: Any, key: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor in a (megatron sharded) state dict, with its key path; sharded tensors give their local data."""
    if isinstance(node, torch.Tensor):
        yield key, node
    elif isinstance(node, Mapping):
        for name, value in node.items():
            yield from _tensors(value, f"{key}.{name}" if key else str(name))
    elif isinstance(node, (list, tuple)):
        for index, value in enumerate(node):
            yield from _tensors(value, f"{key}.{index}")
    elif isinstance(getattr(node, "data", None), torch.Tensor):
        yield key, node.data


def non_finite_keys(state: Any) -> list[str]:
    """Key paths of the floating-point tensors in ``state`` that hold a NaN or inf (on this rank)."""
    return [key for key, tensor in _tensors(state) if tensor.is_floating_point() and not is_finite(tensor)]


def require_finite(state: Any, what: str, step: int) -> None:
    """Refuse to write ``what`` when any rank's share of ``state`` holds a non-finite tensor."""
    bad = non_finite_keys(state)
    if agree_any(bool(bad)):
        named = f": {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}" if bad else " (on another rank)"
        raise NonFiniteError(
            f"step {step}: refusing to write {what}: non-finite weights or optimizer state{named}. Likely causes: "
            f"{LIKELY_CAUSES}. The last checkpoint on disk is the last good one."
        )


def step_health_metrics(guard: NonFiniteGuard, batch: Mapping[str, Any]) -> dict[str, float]:
    """Metrics of a training step's health, logged only when non-zero: ``skipped_steps`` (non-finite steps dropped
    so far) and ``excluded_pairs`` (pairs of this global batch outside the loss: identical chosen and rejected, or
    marked by the algorithm; fillers not counted)."""
    from nemo_aligner.data.nlp.samplers import FILLER_INDEX
    from nemo_aligner.utils.distributed import all_gather_data_parallel

    metrics = {"skipped_steps": float(guard.skipped)} if guard.skipped else {}
    if isinstance(batch.get("valid"), torch.Tensor) and isinstance(batch.get("sample_index"), torch.Tensor):
        excluded = ((batch["sample_index"] != FILLER_INDEX) & (batch["valid"] == 0)).sum().reshape(1)
        total = float(all_gather_data_parallel(excluded).sum())
        if total:
            metrics["excluded_pairs"] = total
    return metrics
