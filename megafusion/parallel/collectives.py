"""The trainer's own collectives: the stop flag, the finite-loss decision, metric and
validation sums, the frozen check's verdict.

Every tensor is made on the engine's device. The process group serves CUDA tensors
through NCCL and CPU tensors through gloo (launch.process_group_backend), so a CPU
tensor would also work, but through a second, slower backend and with a host copy on
the hot path; an NCCL-only group would reject it outright ("No backend type associated
with device type cpu"). Without a process group (one rank, no init) the values are
returned as they are.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def _reduce(t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=op)
    return t


def any_rank(flag: bool, device) -> bool:
    """True on every rank when it is true on any rank."""
    return bool(_reduce(torch.tensor([1.0 if flag else 0.0], device=device), dist.ReduceOp.MAX).item())


def any_rank_tensor(flag: torch.Tensor) -> bool:
    """any_rank for a flag still on the device (no host sync before the reduction)."""
    return bool(_reduce(flag.detach().float().reshape(1).clone(), dist.ReduceOp.MAX).item())


def ranks_where(flag: bool, device) -> list[int]:
    """The ranks on which flag is true, the same list on every rank (one all-reduce of
    a world-sized one-hot vector), so that all of them can stop with one message."""
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    hot = torch.zeros(world, device=device)
    hot[rank] = 1.0 if flag else 0.0
    return [r for r, v in enumerate(_reduce(hot).tolist()) if v]


def sum_over_ranks(values: list[float], device) -> list[float]:
    return _reduce(torch.tensor(values, dtype=torch.float64, device=device)).tolist()


def mean_over_ranks(values: list[float], device) -> list[float]:
    world = dist.get_world_size() if dist.is_initialized() else 1
    return [v / world for v in sum_over_ranks(values, device)]
