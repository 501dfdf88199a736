"""Optimizer and learning-rate schedule from a NeMo ``model.optim`` config, on megatron-core's optimizer.

``model.optim.name``: ``adam``/``adamw``/``fused_adam`` (megatron's Adam with decoupled weight decay) or
``distributed_fused_adam`` (the same, sharded across data-parallel ranks: megatron's distributed optimizer; only
with Apex or TransformerEngine, see ``uses_distributed_optimizer``). Under ``bf16``/``16`` precision megatron keeps
fp32 master weights (and fp32 gradients for the update) whether the model's weights are bf16 (``megatron_amp_O2``)
or fp32. Without Apex or TransformerEngine megatron-core steps with torch's AdamW.
Overlap and bucket keys: :func:`ddp_config_for`.
``model.optim.sched``: ``CosineAnnealing`` (warmup, cosine decay to ``min_lr``, then ``constant_steps`` at
``min_lr``, as NeMo defines it), ``Constant``/``null``.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from typing import Any

import torch
from megatron.core.distributed import DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer import TransformerConfig

from nemo_aligner.utils.mcore_compat import distributed_optimizer_resumable

logger = logging.getLogger(__name__)

ADAM_NAMES = ("adam", "adamw", "fused_adam")
DISTRIBUTED_NAMES = ("distributed_fused_adam", "mcore_distributed_optim")
SCHEDULES = ("CosineAnnealing", "Constant", None)


def uses_distributed_optimizer(optim_cfg: Mapping[str, Any]) -> bool:
    """Whether ``model.optim.name`` asks for megatron's distributed optimizer and it can be used here.

    Without Apex or TransformerEngine the distributed optimizer cannot resume from a checkpoint
    (``mcore_compat.distributed_optimizer_resumable``), so the plain optimizer is used instead: the same Adam
    updates, only the optimizer state is not sharded across data-parallel ranks.
    """
    if optim_cfg.get("name", "adam") not in DISTRIBUTED_NAMES:
        return False
    if not distributed_optimizer_resumable():
        _warn_once(
            f"model.optim.name={optim_cfg.get('name')}: megatron-core's distributed optimizer needs Apex or "
            "TransformerEngine to resume from checkpoints; using the non-distributed Adam (same updates, "
            "optimizer state not sharded across data-parallel ranks)."
        )
        return False
    return True


@functools.cache
def _warn_once(message: str) -> None:
    logger.warning(message)


def ddp_config_for(optim_cfg: Mapping[str, Any]) -> DistributedDataParallelConfig:
    """megatron DDP settings from NeMo's ``model.optim`` keys (fp32 gradient reduction always).

    * ``overlap_grad_sync``: reduce each gradient bucket while the backward pass goes on (``overlap_grad_reduce``).
    * ``overlap_param_sync``: gather the updated parameter shards during the next forward pass
      (``overlap_param_gather``); it only exists with the distributed optimizer, so it is refused by name otherwise.
    * ``bucket_cap_mb``: the size of a gradient bucket in MB of fp32 gradients (megatron's ``bucket_size`` counts
      elements: ``MB * 2**20 / 4``); megatron's default without it.
    * ``contiguous_grad_buffer``: megatron-core's DDP always keeps gradients in contiguous buffers, so ``true`` (or
      unset) is what runs and ``false`` is refused by name.
    """
    distributed = uses_distributed_optimizer(optim_cfg)
    if optim_cfg.get("contiguous_grad_buffer", True) is False:
        raise ValueError(
            "model.optim.contiguous_grad_buffer=false is not supported: megatron-core's DDP always keeps gradients "
            "in contiguous buffers; remove the key or set it to true"
        )
    overlap_param = bool(optim_cfg.get("overlap_param_sync", False))
    if overlap_param and optim_cfg.get("name", "adam") not in DISTRIBUTED_NAMES:
        raise ValueError(
            "model.optim.overlap_param_sync=true needs the distributed optimizer: set model.optim.name="
            f"distributed_fused_adam, or overlap_param_sync=false (model.optim.name={optim_cfg.get('name')!r})"
        )
    if overlap_param and not distributed:
        _warn_once("model.optim.overlap_param_sync: off, the non-distributed Adam has no parameter gather to overlap")
        overlap_param = False
    bucket_cap_mb = optim_cfg.get("bucket_cap_mb")
    if bucket_cap_mb is not None and not float(bucket_cap_mb) > 0:
        raise ValueError(f"model.optim.bucket_cap_mb must be > 0 (MB of fp32 gradients), got {bucket_cap_mb!r}")
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=bool(optim_cfg.get("overlap_grad_sync", False)),
        overlap_param_gather=overlap_param,
        use_distributed_optimizer=distributed,
        bucket_size=None if bucket_cap_mb is None else int(float(bucket_cap_mb) * 2**20 / 4),
    )


def build_optimizer(
    optim_cfg: Mapping[str, Any],
    transformer_config: TransformerConfig,
    ddp_model_chunks: list,
    gradient_clip_val: float = 0.0,
):
    """megatron-core optimizer over DDP-wrapped model chunks (mixed precision follows the model config).

    ``gradient_clip_val`` > 0 clips the global gradient norm (across all ranks) before each step.
    """
    name = optim_cfg.get("name", "adam")
    if name not in ADAM_NAMES + DISTRIBUTED_NAMES:
        raise ValueError(f"model.optim.name={name!r} is not supported; choose one of {ADAM_NAMES + DISTRIBUTED_NAMES}")
    betas = list(optim_cfg.get("betas", (0.9, 0.999)))
    sched = optim_cfg.get("sched") or {}
    config = OptimizerConfig(
        optimizer="adam",
        lr=float(optim_cfg["lr"]),
        min_lr=float(sched.get("min_lr", 0.0) or 0.0),
        weight_decay=float(optim_cfg.get("weight_decay", 0.0)),
        adam_beta1=float(betas[0]),
        adam_beta2=float(betas[1]),
        adam_eps=float(optim_cfg.get("eps", 1e-8)),
        clip_grad=float(gradient_clip_val or 0.0),
        # megatron's bf16/fp16 optimizer is for bf16/fp16 weights (megatron_amp_O2) and keeps fp32 master copies of
        # them. Mixed precision without O2 has fp32 weights already (autocast computes in bf16): the fp32
        # optimizer. (The float16 optimizer over fp32 weights trained, but could not write its checkpoint.)
        bf16=transformer_config.params_dtype == torch.bfloat16,
        fp16=transformer_config.params_dtype == torch.float16,
        params_dtype=transformer_config.params_dtype,
        use_distributed_optimizer=uses_distributed_optimizer(optim_cfg),
    )
    return get_megatron_optimizer(config, ddp_model_chunks)


def build_lr_scheduler(optimizer, optim_cfg: Mapping[str, Any], max_steps: int) -> OptimizerParamScheduler:
    """megatron's parameter scheduler configured to reproduce NeMo's ``CosineAnnealing`` / ``Constant``."""
    sched = optim_cfg.get("sched") or {}
    name = sched.get("name")
    if name not in SCHEDULES:
        raise ValueError(f"model.optim.sched.name={name!r} is not supported; choose one of {SCHEDULES}")
    lr = float(optim_cfg["lr"])
    weight_decay = float(optim_cfg.get("weight_decay", 0.0))
    if name == "CosineAnnealing":
        warmup = int(sched.get("warmup_steps", 0) or 0)
        decay_end = max(max_steps - int(sched.get("constant_steps", 0) or 0), warmup + 1)
        style, min_lr = "cosine", float(sched.get("min_lr", 0.0) or 0.0)
    else:
        warmup, decay_end, style, min_lr = 0, max(max_steps, 1), "constant", lr
    return OptimizerParamScheduler(
        optimizer,
        # NeMo's warmup gives step s the rate lr * (s + 1) / (warmup + 1): megatron's linear warmup from this value.
        init_lr=lr / (warmup + 1),
        max_lr=lr,
        min_lr=min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=decay_end,
        lr_decay_style=style,
        start_wd=weight_decay,
        end_wd=weight_decay,
        wd_incr_steps=max(max_steps, 1),
        wd_incr_style="constant",
    )
