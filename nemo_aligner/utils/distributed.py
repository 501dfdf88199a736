"""Process-group and model-parallel set-up shared by every entry point.

The launcher (``nemo_aligner.recipes.common``, a standalone tool, a test fixture) initialises megatron-core's
parallel state before any model is built, as megatron-core expects; a model's constructor only checks that it was
(:func:`require_model_parallel`). :func:`start_process_group` covers the four ways a job starts:
a plain ``python`` process (world size 1, no launcher), ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``),
Lightning's launcher for ``trainer.devices=N`` (it exports the same variables), and Slurm ``srun``
(``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``). The backend is NCCL when CUDA is available, else gloo.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from nemo_aligner.utils.cpu_support import apply_cpu_support, bind_local_device, process_group_backend
from nemo_aligner.utils.seeds import NEMO_DEFAULT_SEED, model_seed
from nemo_aligner.utils.timers import RunTimer

# NeMo-Aligner's name for the run's time limit (``Timer(cfg.exp_manager.max_time_per_run)``).
Timer = RunTimer

logger = logging.getLogger(__name__)

DEFAULT_MASTER_PORT = 29500


@dataclass(frozen=True)
class RankInfo:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str  # "torchrun", "slurm" or "single"


def first_host_of_slurm_nodelist(nodelist: str) -> str:
    """First host name of a compressed Slurm node list, e.g. ``"gpu[003-007,010],cpu1" -> "gpu003"`` (the list may
    also be separated by spaces)."""
    nodelist = (nodelist.split() or [nodelist])[0]
    first = nodelist.split(",")[0] if "[" not in nodelist.split(",")[0] else nodelist
    match = re.match(r"^([^\[,]+)(?:\[([^\]]+)\])?", first)
    if match is None:
        raise ValueError(f"Cannot parse SLURM_NODELIST={nodelist!r}")
    prefix, ranges = match.group(1), match.group(2)
    if ranges is None:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def _slurm_port(job_id: str) -> int:
    # Every task of a job derives the same port from the job id, and concurrent jobs on a node rarely collide.
    return 20000 + int(job_id) % 20000 if job_id.isdigit() else DEFAULT_MASTER_PORT


def resolve_rank_info(env: Mapping[str, str] | None = None) -> RankInfo:
    """Read rank, world size and rendezvous address from the launcher's environment variables.

    ``torchrun``/Lightning variables win over Slurm's, so ``srun torchrun ...`` and Lightning under Slurm work.
    """
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return RankInfo(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", DEFAULT_MASTER_PORT)),
            source="torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        rank, world_size = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        if not 0 <= rank < world_size:
            raise ValueError(
                f"SLURM_PROCID={rank} is outside SLURM_NTASKS={world_size}: start one task per GPU with srun"
            )
        return RankInfo(
            rank=rank,
            world_size=world_size,
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            master_addr=env.get("MASTER_ADDR") or (first_host_of_slurm_nodelist(nodelist) if nodelist else "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT") or _slurm_port(env.get("SLURM_JOB_ID", ""))),
            source="slurm",
        )
    return RankInfo(0, 1, 0, env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 0) or 0), "single")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def initialize_distributed(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    seed: int = NEMO_DEFAULT_SEED,
    timeout_minutes: int = 30,
    rank_info: RankInfo | None = None,
) -> RankInfo:
    """Start torch.distributed and megatron-core's ``parallel_state`` for this process (a one-process tool or
    test: TP 1, PP 1 by default; a run's sizes and seed come from its model config).

    Safe to call again: an existing process group is reused, and model parallelism is re-initialised only
    when the requested TP/PP sizes differ from the current ones.
    """
    info = start_process_group(timeout_minutes, rank_info)
    initialize_model_parallel(tensor_model_parallel_size, pipeline_model_parallel_size, seed)
    return info


def start_process_group(timeout_minutes: int = 30, rank_info: RankInfo | None = None) -> RankInfo:
    """Start torch.distributed for this process (reused when already started); no model-parallel groups yet.

    ``rank_info`` comes from the launcher (Lightning's cluster environment); by default it is read from the
    environment variables.
    """
    apply_cpu_support()
    info = rank_info or resolve_rank_info()
    if not dist.is_initialized():
        port = info.master_port or _free_port()
        backend = process_group_backend()
        bind_local_device(info.local_rank)
        dist.init_process_group(
            backend=backend,
            init_method=f"tcp://{info.master_addr}:{port}",
            rank=info.rank,
            world_size=info.world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
        logger.info("torch.distributed: %s rank %d/%d (%s)", backend, info.rank, info.world_size, info.source)
    return info


def model_parallel_sizes(model_cfg: Mapping[str, Any]) -> tuple[int, int]:
    """``(tensor_model_parallel_size, pipeline_model_parallel_size)`` of a model config (absent or null: 1)."""
    keys = ("tensor_model_parallel_size", "pipeline_model_parallel_size")
    return tuple(int(model_cfg.get(key, 1) or 1) for key in keys)


def set_model_parallel_from_config(model_cfg: Mapping[str, Any]) -> None:
    """Initialise megatron-core's parallel state (TP/PP/DP groups, RNG streams) for a model config: the launcher's
    step before anything needs it (data sharding, building the model). Again with the same sizes: re-seeds only."""
    initialize_distributed(*model_parallel_sizes(model_cfg), seed=model_seed(model_cfg))


def initialize_model_parallel(tensor_model_parallel_size: int, pipeline_model_parallel_size: int, seed: int) -> None:
    """(Re-)initialise megatron's TP/PP/DP groups, and (always) re-seed its model-parallel RNG streams."""
    from megatron.core import parallel_state, tensor_parallel

    world_size = dist.get_world_size()
    model_parallel = tensor_model_parallel_size * pipeline_model_parallel_size
    if world_size % model_parallel != 0:
        raise ValueError(
            f"world size {world_size} is not divisible by tensor_model_parallel_size ({tensor_model_parallel_size})"
            f" x pipeline_model_parallel_size ({pipeline_model_parallel_size}); set model.tensor_model_parallel_size"
            " and model.pipeline_model_parallel_size to fit the number of processes"
        )
    if parallel_state.model_parallel_is_initialized():
        same = (
            parallel_state.get_tensor_model_parallel_world_size() == tensor_model_parallel_size
            and parallel_state.get_pipeline_model_parallel_world_size() == pipeline_model_parallel_size
        )
        if same:
            tensor_parallel.model_parallel_cuda_manual_seed(seed)
            return
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def require_model_parallel(model_cfg: Mapping[str, Any]) -> None:
    """Raise unless megatron-core's parallel state is initialised at the model config's TP/PP sizes (a model is
    built inside the parallel state its launcher set up; it never sets it up itself)."""
    from megatron.core import parallel_state

    wanted = model_parallel_sizes(model_cfg)
    if not (dist.is_initialized() and parallel_state.model_parallel_is_initialized()):
        raise RuntimeError(
            f"megatron-core's parallel state is not initialised: the launcher sets it up before a model is built "
            f"(a run does; a script or notebook calls nemo_aligner.utils.distributed.initialize_distributed"
            f"{wanted} first)"
        )
    current = (
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_pipeline_model_parallel_world_size(),
    )
    if current != wanted:
        raise RuntimeError(
            f"the model config asks for tensor/pipeline parallel sizes {wanted} but megatron-core's parallel state "
            f"was initialised with {current}: initialise it from this model config (initialize_distributed"
            f"{wanted}) before building the model"
        )


def seed_everything(seed: int) -> None:
    """Seed torch, python, numpy and megatron-core's model-parallel RNG streams (dropout, TP-sharded weights);
    the same seed on every rank, so weights are initialised identically."""
    import random

    import numpy as np
    import torch
    from megatron.core import parallel_state, tensor_parallel

    if parallel_state.model_parallel_is_initialized():
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def is_global_rank_zero() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


# Pipeline-parallel point-to-point and broadcast helpers. ``torch.cuda.current_device()`` is this rank's GPU, or
# "cpu" under the CPU support (gloo).


def send_to_next_pipeline_stage(tensor: torch.Tensor) -> None:
    """Send ``tensor`` to the next pipeline stage of this rank's pipeline (blocking)."""
    from megatron.core import parallel_state

    dist.send(tensor.contiguous(), dst=parallel_state.get_pipeline_model_parallel_next_rank())


def receive_from_previous_pipeline_stage(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The tensor that the previous pipeline stage sent with :func:`send_to_next_pipeline_stage`."""
    from megatron.core import parallel_state

    tensor = torch.empty(shape, dtype=dtype, device=torch.cuda.current_device())
    dist.recv(tensor, src=parallel_state.get_pipeline_model_parallel_prev_rank())
    return tensor


def broadcast_from_last_pipeline_stage(
    tensor: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The last pipeline stage's ``tensor`` (``shape``, ``dtype``) on every stage of this rank's pipeline.

    Losses, logits and metrics exist only on the last stage; the trainer and generation need them everywhere.
    Other stages pass ``None``. Without pipeline parallelism ``tensor`` is returned as is.
    """
    from megatron.core import parallel_state

    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return tensor
    if parallel_state.is_pipeline_last_stage():
        tensor = tensor.to(device=torch.cuda.current_device(), dtype=dtype).contiguous()
    else:
        tensor = torch.empty(shape, dtype=dtype, device=torch.cuda.current_device())
    dist.broadcast(
        tensor,
        src=parallel_state.get_pipeline_model_parallel_last_rank(),
        group=parallel_state.get_pipeline_model_parallel_group(),
    )
    return tensor


def all_gather_data_parallel(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` (same shape on every rank) of all data-parallel ranks, concatenated in rank order along dim 0.

    Per-batch statistics a trainer logs describe the global batch, not this rank's share. Without data
    parallelism ``tensor`` is returned as is.
    """
    from megatron.core import parallel_state

    if not dist.is_initialized() or parallel_state.get_data_parallel_world_size() == 1:
        return tensor
    local = tensor.to(torch.cuda.current_device()).contiguous()
    parts = [torch.empty_like(local) for _ in range(parallel_state.get_data_parallel_world_size())]
    dist.all_gather(parts, local, group=parallel_state.get_data_parallel_group())
    return torch.cat(parts).to(tensor.device)


def gather_data_parallel_objects(local: Any) -> list[Any]:
    """Every data-parallel rank's ``local`` (any picklable object), in rank order; ``[local]`` without data
    parallelism. Tensors inside travel through host memory: pass CPU tensors."""
    from megatron.core import parallel_state

    if not dist.is_initialized() or parallel_state.get_data_parallel_world_size() == 1:
        return [local]
    gathered = [None] * parallel_state.get_data_parallel_world_size()
    dist.all_gather_object(gathered, local, group=parallel_state.get_data_parallel_group(with_context_parallel=False))
    return gathered


def union_over_data_parallel(local: dict) -> dict:
    """Every data-parallel rank's dict merged into one (each rank holds different keys)."""
    merged: dict = {}
    for part in gather_data_parallel_objects(local):
        merged.update(part)
    return merged
