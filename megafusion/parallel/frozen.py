"""Frozen means frozen, checked without the base model.

At start-up every rank hashes the bytes of its own share of each frozen parameter: the
local ZeRO-3 partition (ds_tensor) where parameters are partitioned, the whole tensor
where they are not (ZeRO-0/1/2, a pipeline stage's own layers). At the end of a run it
hashes them again; the ranks sum the number of tensors that differ. A byte hash is
exact (any changed bit changes it, short of a blake2b collision) and costs one pass
over what the rank already holds, where reloading the base model in fp32 on every rank
cost 282 GB per rank at 70B and outlived a preemption's signal window. The frozen
tower's agreement with the base checkpoint itself is checked where the model is built
(tests/parallel/test_zero_init.py), not at every stop.
"""
from __future__ import annotations

import hashlib

import torch

from megafusion.parallel.collectives import sum_over_ranks


def local_shard(p: torch.nn.Parameter) -> torch.Tensor:
    return p.ds_tensor if hasattr(p, "ds_tensor") else p.data


def _hash(t: torch.Tensor) -> str:
    raw = t.detach().contiguous().reshape(-1).view(torch.uint8).cpu()
    return hashlib.blake2b(raw.numpy(), digest_size=16).hexdigest()


def digest(module: torch.nn.Module) -> dict[str, str]:
    """{parameter name: hash of this rank's share} for every frozen parameter."""
    return {name: _hash(local_shard(p)) for name, p in module.named_parameters() if not p.requires_grad}


def changed(module: torch.nn.Module, before: dict[str, str]) -> list[str]:
    """Names of frozen parameters whose share on this rank differs from `before` (a
    parameter that became trainable or vanished counts as changed)."""
    now = digest(module)
    return sorted(name for name in before if now.get(name) != before[name])


def check_unchanged(module: torch.nn.Module, before: dict[str, str], device) -> int:
    """Raise SystemExit on every rank when any rank's frozen share changed; returns the
    number of tensors this rank checked. A collective: every rank must call it."""
    bad = changed(module, before)
    total = int(sum_over_ranks([float(len(bad))], device)[0])
    if total:
        raise SystemExit(f"error: frozen weights changed during training ({total} tensor shares over all ranks; "
                         f"on this rank: {bad[:5]})")
    return len(before)
