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
    [
        ("node1", "node1"),
        ("node1,node2", "node1"),
        ("gpu[003-007,010]", "gpu003"),
        ("a[7],b[1-2]", "a7"),
        ("node[001-004]", "node001"),
        ("rack-2-node[10-11]", "rack-2-node10"),
        ("host0 host1 host3", "host0"),
    ],
)
def test_first_host_of_slurm_nodelist(nodelist, first):
    assert first_host_of_slurm_nodelist(nodelist) == first


def srun_task_env(node: int, local: int, nodes: int, tasks_per_node: int, nodelist: str) -> dict[str, str]:
    """The variables srun sets for one task of ``sbatch -N nodes --ntasks-per-node tasks_per_node`` (block
    distribution: task ``node * tasks_per_node + local``)."""
    return {
        "SLURM_JOB_ID": "777123",
        "SLURM_JOB_NUM_NODES": str(nodes),
        "SLURM_NNODES": str(nodes),
        "SLURM_NODEID": str(node),
        "SLURM_PROCID": str(node * tasks_per_node + local),
        "SLURM_LOCALID": str(local),
        "SLURM_NTASKS": str(nodes * tasks_per_node),
        "SLURM_NTASKS_PER_NODE": str(tasks_per_node),
        "SLURM_JOB_NODELIST": nodelist,
        "SLURM_NODELIST": nodelist,
        "SLURM_STEP_NODELIST": nodelist,
    }


def test_multi_node_srun_gives_every_task_its_own_rank_and_one_rendezvous():
    nodes, per_node = 4, 8
    infos = [
        resolve_rank_info(srun_task_env(node, local, nodes, per_node, "node[001-004]"))
        for node in range(nodes)
        for local in range(per_node)
    ]
    assert sorted(info.rank for info in infos) == list(range(nodes * per_node))
    assert {info.world_size for info in infos} == {nodes * per_node}
    assert [(info.rank // per_node, info.local_rank) for info in infos] == [
        (node, local) for node in range(nodes) for local in range(per_node)
    ]
    assert {(info.master_addr, info.master_port, info.source) for info in infos} == {
        ("node001", 20000 + 777123 % 20000, "slurm")
    }


@pytest.mark.parametrize("nodelist", ["node[001-004]", "gpu[3-4,9],cpu1", "a1,a2", "host7 host8"])
def test_slurm_mapping_agrees_with_lightning(monkeypatch, nodelist):
    """Lightning's SLURMEnvironment (what resolve_and_create_trainer uses under srun) is an independent reader."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    monkeypatch.delenv("MASTER_ADDR", raising=False)
    for node, local in [(0, 0), (1, 3), (3, 7)]:
        env = srun_task_env(node, local, 4, 8, nodelist)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        ours, theirs = resolve_rank_info(env), SLURMEnvironment()
        assert (ours.rank, ours.world_size, ours.local_rank) == (
            theirs.global_rank(),
            theirs.world_size(),
            theirs.local_rank(),
        )
        assert ours.rank // 8 == theirs.node_rank()
        assert ours.master_addr == theirs.main_address
        monkeypatch.delenv("MASTER_ADDR", raising=False)  # Lightning caches the address it resolved there


def test_master_addr_and_port_from_the_environment_win():
    env = {**srun_task_env(1, 0, 2, 4, "node[1-2]"), "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "6000"}
    info = resolve_rank_info(env)
    assert (info.master_addr, info.master_port) == ("10.0.0.5", 6000)


def test_step_nodelist_wins_over_the_job_nodelist():
    """A step on part of the allocation rendezvouses on its own first node."""
    env = {**srun_task_env(0, 0, 2, 4, "node[1-4]"), "SLURM_STEP_NODELIST": "node[3-4]"}
    assert resolve_rank_info(env).master_addr == "node3"


def test_procid_outside_ntasks_is_an_error():
    env = {**srun_task_env(0, 0, 1, 4, "node1"), "SLURM_PROCID": "4"}
    with pytest.raises(ValueError, match="SLURM_PROCID=4 is outside SLURM_NTASKS=4"):
        resolve_rank_info(env)


def test_tensor_parallel_groups_stay_inside_a_node():
    """megatron-core's default order (tp-cp-ep-dp-pp) puts consecutive ranks in a TP group, so with TP equal to
    the tasks per node each TP group is one node (NVLink) and PP/DP cross nodes: the layout docs/multi_node.md shows."""
    from megatron.core.parallel_state import RankGenerator

    nodes, per_node, tp, pp = 4, 8, 8, 2
    node_of = {}
    for node in range(nodes):
        for local in range(per_node):
            node_of[resolve_rank_info(srun_task_env(node, local, nodes, per_node, "n[1-4]")).rank] = node
    groups = RankGenerator(tp=tp, ep=1, dp=nodes * per_node // (tp * pp), pp=pp, cp=1, order="tp-cp-ep-dp-pp")
    assert all(len({node_of[r] for r in group}) == 1 for group in groups.get_ranks("tp"))
    assert groups.get_ranks("pp")[0] == [0, 16] and groups.get_ranks("dp")[0] == [0, 8]
