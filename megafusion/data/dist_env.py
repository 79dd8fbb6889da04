"""Rank and node facts that mosaicml-streaming reads from the environment.

streaming reads RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE (defaulting to 0/1 when
absent) to decide which process on a node is the local leader of its shared memory.
Launchers disagree on what they export:

  torchrun            all four
  deepspeed launcher  RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_SIZE, but not
                      LOCAL_WORLD_SIZE (streaming then sees a node of one rank and
                      fails with FileExistsError on its shared-memory files)
  srun                SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_NTASKS_PER_NODE
                      (only with --ntasks-per-node) or SLURM_TASKS_PER_NODE ("4(x2),2")

`init_dist_env` fills in the missing variables from those, checks that they describe a
layout streaming supports (the same number of ranks on every node, ranks numbered node by
node), and returns them.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import MutableMapping


class DistEnvError(ValueError):
    """The launcher's environment does not describe a usable rank layout (one line)."""


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int

    @property
    def node(self) -> int:
        return self.rank // self.local_world_size

    @property
    def num_nodes(self) -> int:
        return self.world_size // self.local_world_size


def _int(env, name):
    value = env.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise DistEnvError(f"{name}={value!r} is not an integer") from None


def parse_slurm_tasks_per_node(value: str, node_id: int) -> int:
    """SLURM_TASKS_PER_NODE ("2(x3),1": 2 tasks on each of 3 nodes, then 1) for one node."""
    counts: list[int] = []
    for part in value.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            raise DistEnvError(f"SLURM_TASKS_PER_NODE={value!r}: cannot parse")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    if not 0 <= node_id < len(counts):
        raise DistEnvError(f"SLURM_TASKS_PER_NODE={value!r} has no entry for SLURM_NODEID={node_id}")
    return counts[node_id]


def init_dist_env(environ: MutableMapping[str, str] | None = None, set_missing: bool = True) -> DistEnv:
    """Resolve RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE; write the missing ones back.

    Raises DistEnvError (one line) when they are inconsistent.
    """
    env = os.environ if environ is None else environ
    rank = _int(env, "RANK")
    if rank is None:
        rank = _int(env, "SLURM_PROCID")
    world = _int(env, "WORLD_SIZE")
    if world is None:
        world = _int(env, "SLURM_NTASKS")
    local_rank = _int(env, "LOCAL_RANK")
    if local_rank is None:
        local_rank = _int(env, "SLURM_LOCALID")
    local_world = _int(env, "LOCAL_WORLD_SIZE")
    for name in ("LOCAL_SIZE", "SLURM_NTASKS_PER_NODE"):
        if local_world is None:
            local_world = _int(env, name)
    if local_world is None and env.get("SLURM_TASKS_PER_NODE"):
        local_world = parse_slurm_tasks_per_node(env["SLURM_TASKS_PER_NODE"], _int(env, "SLURM_NODEID") or 0)

    world = 1 if world is None else world
    rank = 0 if rank is None else rank
    if world == 1:
        local_rank = 0 if local_rank is None else local_rank
        local_world = 1 if local_world is None else local_world
    if local_world is None:
        raise DistEnvError(f"WORLD_SIZE={world} but LOCAL_WORLD_SIZE is unknown: set LOCAL_WORLD_SIZE (ranks per node)")
    if local_rank is None:
        if world == local_world:
            local_rank = rank
        else:
            raise DistEnvError(f"RANK={rank} of WORLD_SIZE={world} but LOCAL_RANK is unknown: set LOCAL_RANK")

    desc = f"RANK={rank} WORLD_SIZE={world} LOCAL_RANK={local_rank} LOCAL_WORLD_SIZE={local_world}"
    if world < 1 or local_world < 1 or not 0 <= rank < world or not 0 <= local_rank < local_world:
        raise DistEnvError(f"{desc}: out of range")
    if world % local_world:
        raise DistEnvError(f"{desc}: streaming needs the same number of ranks on every node")
    if rank % local_world != local_rank:
        raise DistEnvError(f"{desc}: ranks must be numbered node by node (rank % LOCAL_WORLD_SIZE == LOCAL_RANK); "
                           "with srun use --distribution=block")

    if set_missing:
        for name, value in (("RANK", rank), ("WORLD_SIZE", world), ("LOCAL_RANK", local_rank),
                            ("LOCAL_WORLD_SIZE", local_world)):
            current = env.get(name)
            if current in (None, ""):
                env[name] = str(value)
    return DistEnv(rank, world, local_rank, local_world)
