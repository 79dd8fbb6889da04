"""RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE under the launchers we support."""
from __future__ import annotations

import pytest

from megafusion.data.dist_env import DistEnv, DistEnvError, init_dist_env, parse_slurm_tasks_per_node


def test_single_process_defaults():
    env = {}
    assert init_dist_env(env) == DistEnv(0, 1, 0, 1)
    assert env == {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}


def test_torchrun_is_checked_not_changed():
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"}
    before = dict(env)
    d = init_dist_env(env)
    assert env == before and d.node == 1 and d.num_nodes == 2


def test_deepspeed_launcher_local_size():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_SIZE": "2"}
    assert init_dist_env(env) == DistEnv(3, 4, 1, 2)
    assert env["LOCAL_WORLD_SIZE"] == "2"


def test_srun_ntasks_per_node():
    env = {"SLURM_PROCID": "6", "SLURM_NTASKS": "8", "SLURM_LOCALID": "2", "SLURM_NTASKS_PER_NODE": "4"}
    assert init_dist_env(env) == DistEnv(6, 8, 2, 4)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"]) == ("6", "8", "2", "4")


def test_srun_tasks_per_node_string():
    assert parse_slurm_tasks_per_node("2(x3),1", 2) == 2
    assert parse_slurm_tasks_per_node("2(x3),1", 3) == 1
    assert parse_slurm_tasks_per_node("4", 0) == 4
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_TASKS_PER_NODE": "2(x2)",
           "SLURM_NODEID": "1"}
    assert init_dist_env(env) == DistEnv(3, 4, 1, 2)


@pytest.mark.parametrize("env,needle", [
    ({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}, "LOCAL_WORLD_SIZE"),
    ({"RANK": "4", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}, "out of range"),
    ({"RANK": "1", "WORLD_SIZE": "6", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"}, "same number"),
    ({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}, "node by node"),
    ({"RANK": "x"}, "not an integer"),
])
def test_inconsistent_layouts_get_one_line_errors(env, needle):
    with pytest.raises(DistEnvError) as e:
        init_dist_env(env)
    assert needle in str(e.value) and "\n" not in str(e.value)
