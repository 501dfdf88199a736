"""Rank discovery for plain python, torchrun/Lightning and Slurm launches."""

from __future__ import annotations

import pytest

from nemo_aligner.utils.distributed import first_host_of_slurm_nodelist, resolve_rank_info


def test_single_process_without_launcher():
    info = resolve_rank_info({})
    assert (info.rank, info.world_size, info.local_rank, info.source) == (0, 1, 0, "single")


def test_torchrun_variables():
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "node7", "MASTER_PORT": "1234"}
    info = resolve_rank_info(env)
    assert (info.rank, info.world_size, info.local_rank, info.master_addr, info.master_port) == (5, 8, 1, "node7", 1234)
    assert info.source == "torchrun"


def test_slurm_srun_variables():
    env = {
        "SLURM_PROCID": "9",
        "SLURM_NTASKS": "16",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_NODELIST": "gpu[012-013,020]",
        "SLURM_JOB_ID": "4242",
    }
    info = resolve_rank_info(env)
    assert (info.rank, info.world_size, info.local_rank, info.master_addr) == (9, 16, 1, "gpu012")
    assert info.master_port == 20000 + 4242 % 20000 and info.source == "slurm"


def test_torchrun_variables_win_over_slurm():
    env = {"RANK": "0", "WORLD_SIZE": "2", "SLURM_PROCID": "3", "SLURM_NTASKS": "4"}
    assert resolve_rank_info(env).world_size == 2


@pytest.mark.parametrize(
    "nodelist, first",
    [("node1", "node1"), ("node1,node2", "node1"), ("gpu[003-007,010]", "gpu003"), ("a[7],b[1-2]", "a7")],
)
def test_first_host_of_slurm_nodelist(nodelist, first):
    assert first_host_of_slurm_nodelist(nodelist) == first
