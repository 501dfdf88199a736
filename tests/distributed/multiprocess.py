"""Run a test function in N gloo processes (one "world") and collect each rank's result.

Each rank is a fresh ``python -m tests.distributed.worker`` process with torchrun-style environment variables,
so the code under test initialises torch.distributed exactly as it does under ``torchrun``. Group several
checks into one world: starting processes and importing megatron-core is the expensive part.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_distributed(target: str, nprocs: int, out_dir: Path, timeout: float = 300, **kwargs: Any) -> list[Any]:
    """Call ``target`` (``"package.module:function"``) with ``kwargs`` on ``nprocs`` ranks; return their results.

    A rank that fails makes this raise with that rank's stderr.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    procs = []
    for rank in range(nprocs):
        env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": str(nprocs),
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
        }
        if torch.cuda.device_count() < nprocs:
            env["NEMO_ALIGNER_DEVICE"] = "cpu"  # fewer GPUs than ranks: every rank on the CPU over gloo
        cmd = [sys.executable, "-m", "tests.distributed.worker", target, json.dumps(kwargs), str(out_dir)]
        procs.append(
            subprocess.Popen(cmd, env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    failures = []
    for rank, proc in enumerate(procs):
        try:
            _, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired as err:
            for p in procs:
                p.kill()
            raise TimeoutError(f"{target}: rank {rank} did not finish within {timeout} s") from err
        if proc.returncode != 0:
            failures.append(f"--- rank {rank} exited with {proc.returncode}:\n{stderr[-6000:]}")
    if failures:
        raise RuntimeError(f"{target} failed on {len(failures)} rank(s)\n" + "\n".join(failures))
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(nprocs)]


def restore_at_layout(model_cls, cfg, restore_path):
    """On a rank: what a launcher does before building a model (megatron-core's parallel state from ``cfg``'s
    TP/PP sizes), then ``load_from_nemo(model_cls, cfg, restore_path=...)``."""
    from nemo_aligner.utils.distributed import set_model_parallel_from_config
    from nemo_aligner.utils.utils import load_from_nemo

    set_model_parallel_from_config(cfg)
    return load_from_nemo(model_cls, cfg, restore_path=restore_path)
