"""One rank of tests/parallel/test_shm_allreduce.py: the trainer's process group with the
shared-memory all-reduce kept (launch.init_distributed(shm_allreduce=True)), then
FlatGradients through it against references computed here: every rank's gradients
rebuilt from their seeds and summed in rank order, gloo's own all-reduce, and
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


def grads_of(rank: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + rank)
    return [torch.randn(s, generator=g) * (rank + 1) for s in SHAPES]


def main(out: Path) -> None:
    launch.init_distributed(launch.setup_environment(), shm_allreduce=True)
    rank, world = dist.get_rank(), dist.get_world_size()
    dist.barrier()
    result = {"ready": launch.SHM_ALLREDUCE_READY,
              "files_left": [str(launch.shm_buffer_path(r)) for r in range(world) if launch.shm_buffer_path(r).exists()]}
    summed = [sum(parts[1:], parts[0].clone()) for parts in zip(*(grads_of(r) for r in range(world)))]
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
        for p, g in zip(params, grads_of(rank)):
            p.grad += g  # what autograd's accumulation does
        norm = flat.all_reduce()
        # The engine's way: the average (sum, then 1 / world), then DeepSpeed's clipping.
        from deepspeed.runtime.utils import clip_grad_norm_

        ref = [torch.nn.Parameter(torch.zeros(s)) for s in SHAPES]
        for p, s in zip(ref, summed):
            p.grad = s.clone().mul_(1.0 / world)
        ref_norm = float(clip_grad_norm_(ref, max_norm)) if max_norm > 0 else None
        gloo = torch.cat([g.flatten() for g in grads_of(rank)])
        dist.all_reduce(gloo)
        checks[str(max_norm)] = {
            "bitwise": all(torch.equal(p.grad, r.grad) for p, r in zip(params, ref)),
            "max_rel_err": max(((p.grad - r.grad).abs().max() / r.grad.abs().max()).item() for p, r in zip(params, ref)),
            "norm": norm, "ref_norm": ref_norm,
            "clipped": bool(ref_norm is not None and ref_norm > max_norm),
        }
        if max_norm == 0.0:  # the plain sum, before any scaling
            flat.attach()
            for p, g in zip(params, grads_of(rank)):
                p.grad += g
            flat._sum()
            exact = torch.cat([s.flatten() for s in summed])
            checks["sum"] = {"equals_rank_order_sum": torch.equal(flat.buffer, exact),
                             "max_rel_err": ((flat.buffer - exact).abs().max() / exact.abs().max()).item(),
                             "equals_gloo": torch.equal(flat.buffer, gloo)}
    return checks


if __name__ == "__main__":
    main(Path(sys.argv[1]))
