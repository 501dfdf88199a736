"""Trainer checkpoints: everything needed to resume a run exactly, written atomically.

A checkpoint is a directory ``<checkpoints>/<name>/`` holding

* ``state/``: a megatron-core distributed checkpoint of the model weights, the optimizer state (resharded on
  load, so a run can resume at another TP/PP layout), the LR schedule and the trainer state
  (``step``, ``consumed_samples``, ``epoch``, ``iteration``, ...; algorithms add their own keys);
* ``rng/rank_<r>.pt``: each rank's RNG states (torch CPU/CUDA, python, numpy), restored when the layout is the same;
* ``COMPLETE``: written last. A directory is renamed from ``.<name>.partial`` to ``<name>`` only after every rank
  finished writing, so a process killed mid-save never leaves anything that looks like a checkpoint.

The state lives inside the checkpoint, never in its file name (NeMo-Aligner parsed names; we do not).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing

from nemo_aligner.utils.distributed import is_global_rank_zero
from nemo_aligner.utils.kill_points import kill_point

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "COMPLETE"
STATE_DIR = "state"
RNG_DIR = "rng"
TRAINER_STATE_FILE = "trainer_state.json"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _broadcast_from_rank_zero(value: Any) -> Any:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def get_rng_state() -> dict[str, Any]:
    """This rank's RNG states as tensors and plain numbers (so it loads with ``weights_only=True``)."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    version, python_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": [version, list(python_state), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "tracker": {name: value.clone() for name, value in get_cuda_rng_tracker().get_states().items()},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    torch.set_rng_state(state["torch"])
    version, python_state, gauss = state["python"]
    random.setstate((version, tuple(python_state), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    get_cuda_rng_tracker().set_states(dict(state["tracker"]))


def is_complete(path: Path) -> bool:
    return path.is_dir() and not path.name.startswith(".") and (path / COMPLETE_MARKER).is_file()


def list_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first: by the step recorded inside, then the iteration (SPIN saves the last
    step of iteration t and, at the same step, the start of iteration t+1: the later one is the latest), then name.
    """
    if not checkpoint_dir.is_dir():
        return []

    def order(path: Path) -> tuple[int, int, str]:
        state = read_trainer_state(path)
        return state.get("step", 0), state.get("iteration", 0), path.name

    return sorted((p for p in checkpoint_dir.iterdir() if is_complete(p)), key=order)


class CheckpointError(ValueError):
    """A trainer checkpoint is damaged or unsafe to load; the message names the file."""


def read_trainer_state(path: Path) -> dict[str, Any]:
    """The trainer state stored in a checkpoint (a small JSON file, readable without torch)."""
    file = path / TRAINER_STATE_FILE
    try:
        state = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(
            f"{file}: unreadable trainer state ({exc}); move {path} away to resume from an earlier checkpoint"
        ) from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(state).__name__}")
    return state


def verify_checkpoint(path: Path) -> None:
    """Check a checkpoint before anything is built from it: complete, loadable and free of code to run.

    megatron-core loads ``state/`` through torch DCP, which unpickles ``.metadata`` and byte entries with no
    restriction: they are read here first through the allowlist unpickler and ``weights_only=True``
    (:func:`~nemo_aligner.checkpoint.nemo_file.verify_torch_dist`), every shard file must hold the bytes the
    metadata points at (a truncated copy fails here, not mid-load), and the RNG files must load weights-only.
    """
    from nemo_aligner.checkpoint.nemo_file import NemoFormatError, read_dcp_metadata, verify_torch_dist

    read_trainer_state(path)
    state_dir = path / STATE_DIR
    try:
        for info in read_dcp_metadata(state_dir).storage_data.values():
            shard = state_dir / info.relative_path
            needed = info.offset + info.length
            size = shard.stat().st_size if shard.is_file() else 0
            if size < needed:
                raise CheckpointError(f"{shard}: truncated ({size} bytes, the metadata needs {needed})")
        verify_torch_dist(state_dir)
        for rng_file in sorted((path / RNG_DIR).glob("rank_*.pt")):
            _verify_rng_file(rng_file)
    except (CheckpointError, NemoFormatError, EOFError, RuntimeError, OSError) as exc:
        raise CheckpointError(
            f"cannot resume from {path}: {_reason(exc)}; move it away to resume from an earlier checkpoint"
        ) from exc


def _verify_rng_file(rng_file: Path) -> None:
    """An RNG file loads weights-only and holds the states this module writes; every refusal says why."""
    if rng_file.stat().st_size == 0:
        raise CheckpointError(f"{rng_file}: empty file (0 bytes): the save was cut short")
    try:
        state = torch.load(rng_file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{rng_file}: refusing, it needs unrestricted unpickling ({_reason(exc)})") from exc
    except (EOFError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{rng_file}: not a readable torch file ({_reason(exc)})") from exc
    if not isinstance(state, dict) or not {"torch", "python", "numpy", "tracker"} <= set(state):
        raise CheckpointError(f"{rng_file}: not an RNG state file (expected torch, python, numpy and tracker states)")


def _reason(exc: BaseException) -> str:
    """An exception's message, or its type when it has none (EOFError() says nothing by itself)."""
    return str(exc) or type(exc).__name__


def save_checkpoint(
    checkpoint_dir: Path,
    name: str,
    sharded_state_dict: dict,
    trainer_state: dict[str, Any],
    extra_files: Callable[[Path], None] | None = None,
) -> Path:
    """Write a checkpoint collectively (every rank calls this); returns its final path.

    ``sharded_state_dict``: megatron-core sharded state (weights, optimizer, ...). ``trainer_state``: JSON-able
    loop state. ``extra_files(dir)``: rank 0 may add files (e.g. a ``.nemo`` export) before the rename.
    """
    final = checkpoint_dir / name
    partial = checkpoint_dir / f".{name}.partial-{_broadcast_from_rank_zero(uuid.uuid4().hex[:8])}"
    if is_global_rank_zero():
        partial.mkdir(parents=True)
    _barrier()
    if is_global_rank_zero():
        (partial / STATE_DIR).mkdir()
    _barrier()
    dist_checkpointing.save(sharded_state_dict, str(partial / STATE_DIR))
    kill_point("inside_save")
    rank = dist.get_rank() if dist.is_initialized() else 0
    (partial / RNG_DIR).mkdir(exist_ok=True)
    torch.save(get_rng_state(), partial / RNG_DIR / f"rank_{rank}.pt")
    _barrier()
    if is_global_rank_zero():
        (partial / TRAINER_STATE_FILE).write_text(json.dumps(trainer_state, indent=1, sort_keys=True))
        if extra_files is not None:
            extra_files(partial)
        (partial / COMPLETE_MARKER).write_text("ok\n")
        _fsync_dir(partial)
        kill_point("before_rename")
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        _fsync_dir(checkpoint_dir)
    _barrier()
    kill_point("after_save")
    logger.info("Saved checkpoint %s", final)
    return final


def load_checkpoint(path: Path, sharded_state_dict: dict) -> tuple[dict, dict[str, Any]]:
    """Load a checkpoint written by :func:`save_checkpoint` into the given sharded structure.

    Returns (loaded state, trainer state). RNG states are restored when this rank's file exists (same layout).
    """
    if not is_complete(path):
        raise FileNotFoundError(f"{path} is not a complete trainer checkpoint (no {COMPLETE_MARKER} marker)")
    verify_checkpoint(path)
    state = dist_checkpointing.load(sharded_state_dict, str(path / STATE_DIR))
    rank = dist.get_rank() if dist.is_initialized() else 0
    rng_file = path / RNG_DIR / f"rank_{rank}.pt"
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    saved_world_size = len(list((path / RNG_DIR).glob("rank_*.pt")))
    if rng_file.is_file() and saved_world_size == world_size:
        set_rng_state(torch.load(rng_file, weights_only=True))
    else:
        logger.warning(
            "%s: saved with %d ranks, resumed with %d: RNG states not restored", path, saved_world_size, world_size
        )
    return state, read_trainer_state(path)


def remove_partial_checkpoints(checkpoint_dir: Path) -> None:
    """Delete leftovers of saves that were killed before they completed (rank 0 only): trainer checkpoints
    (``.<name>.partial-*``) and ``.nemo`` exports (``.<name>.<uuid>.tmp`` staging directories and tar files)."""
    if not is_global_rank_zero() or not checkpoint_dir.is_dir():
        return
    for leftover in [*checkpoint_dir.glob(".*.partial-*"), *checkpoint_dir.glob(".*.tmp")]:
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
