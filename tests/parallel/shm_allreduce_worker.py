"""One rank of tests/parallel/test_shm_allreduce.py: the trainer's process group with the
shared-memory all-reduce kept (launch.init_distributed(shm_allreduce=True)), then
FlatGradients through it, filled by real backward passes of two micro-batches, against
references computed here: every rank's gradients rebuilt from their seeds and summed in
rank order, gloo's own all-reduce, and
DeepSpeed's clip_grad_norm_ on the averaged gradients (what the engine does without
flat gradients). Writes <out>/rank<r>.json."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megafusion.parallel import flat_grads, launch  # noqa: E402

SHAPES = [(7, 5), (300,), (64, 33), (1,)]


def grads_of(rank: int, micro: int = 0) -> list[torch.Tensor]:
    """Rank `rank`'s gradients in micro-batch `micro`."""
    g = torch.Generator().manual_seed(1000 + 10 * rank + micro)
    return [torch.randn(s, generator=g) * (rank + 1) for s in SHAPES]


def backward(params, grads) -> None:
    """A real backward whose gradient for each parameter is exactly `grads` (d(p * g)/dp
    = 1 * g), so that autograd's own accumulation and FlatGradients' hooks run."""
    sum((p * g).sum() for p, g in zip(params, grads)).backward()


def step_grads(rank: int) -> list[torch.Tensor]:
    """What a rank accumulates over the two micro-batches of a step: autograd takes the
    first gradient as it is and adds the second to it."""
    return [a + b for a, b in zip(grads_of(rank, 0), grads_of(rank, 1))]


def main(out: Path) -> None:
    launch.init_distributed(launch.setup_environment(), shm_allreduce=True)
    rank, world = dist.get_rank(), dist.get_world_size()
    dist.barrier()
    result = {"ready": launch.SHM_ALLREDUCE_READY,
              "files_left": [str(launch.shm_buffer_path(r)) for r in range(world) if launch.shm_buffer_path(r).exists()]}
    summed = [sum(parts[1:], parts[0].clone()) for parts in zip(*(step_grads(r) for r in range(world)))]
    result["checks"] = {}
    # Whole (one slice), and in slices of 4 KiB: the path a message over 1 GiB takes.
    for slice_bytes in (1 << 30, 4096):
        flat_grads.SHM_SLICE_BYTES = slice_bytes
        result["checks"][str(slice_bytes)] = check(rank, world, summed)
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()


def check(rank: int, world: int, summed: list[torch.Tensor]) -> dict:
    checks = {}
    for max_norm in (0.0, 1e-3, 1e6):
        params = [torch.nn.Parameter(torch.zeros(s)) for s in SHAPES]
        flat = flat_grads.FlatGradients(params, max_norm=max_norm, shm=True)
        flat.attach()
        for micro in (0, 1):
            backward(params, grads_of(rank, micro))
        norm = flat.all_reduce()
        # The engine's way: the average (sum, then 1 / world), then DeepSpeed's clipping.
        from deepspeed.runtime.utils import clip_grad_norm_

        ref = [torch.nn.Parameter(torch.zeros(s)) for s in SHAPES]
        for p, s in zip(ref, summed):
            p.grad = s.clone().mul_(1.0 / world)
        ref_norm = float(clip_grad_norm_(ref, max_norm)) if max_norm > 0 else None
        gloo = torch.cat([g.flatten() for g in step_grads(rank)])
        dist.all_reduce(gloo)
        checks[str(max_norm)] = {
            "bitwise": all(torch.equal(p.grad, r.grad) for p, r in zip(params, ref)),
            "max_rel_err": max(((p.grad - r.grad).abs().max() / r.grad.abs().max()).item() for p, r in zip(params, ref)),
            "norm": norm, "ref_norm": ref_norm,
            "clipped": bool(ref_norm is not None and ref_norm > max_norm),
        }
        if max_norm == 0.0:
            # The plain sum, before any scaling.
            flat.attach()
            for micro in (0, 1):
                backward(params, grads_of(rank, micro))
            flat._sum()
            exact = torch.cat([s.flatten() for s in summed])
            checks["sum"] = {"equals_rank_order_sum": torch.equal(flat.buffer, exact),
                             "max_rel_err": ((flat.buffer - exact).abs().max() / exact.abs().max()).item(),
                             "equals_gloo": torch.equal(flat.buffer, gloo)}
            # A next step in which no gradient reaches the second parameter: its slot,
            # which holds the step before's, counts as zero, and the rest are this step's.
            flat.attach()
            used = [p for i, p in enumerate(params) if i != 1]
            backward(used, [g for i, g in enumerate(grads_of(rank, 2)) if i != 1])
            flat.all_reduce()
            fresh = [sum(parts[1:], parts[0].clone()) * (1.0 / world)
                     for parts in zip(*(grads_of(r, 2) for r in range(world)))]
            checks["unused"] = {"zero": torch.equal(params[1].grad, torch.zeros(SHAPES[1])),
                                "others_max_rel_err": max(((params[i].grad - fresh[i]).abs().max()
                                                           / fresh[i].abs().max()).item() for i in (0, 2, 3))}
    return checks


if __name__ == "__main__":
    main(Path(sys.argv[1]))
