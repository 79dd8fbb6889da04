"""One rank of tests/parallel/test_shared_sum.py: FlatGradients with its buffers shared
between the ranks in /dev/shm (shared_sum.py), filled by real backward passes of two
micro-batches, against references computed here: every rank's gradients rebuilt from
their seeds and summed in rank order, gloo's own all-reduce, and DeepSpeed's
clip_grad_norm_ on the averaged gradients (what the engine does without flat gradients).

argv: <out> <case>[,<case>...], each case one of
  shared         every rank maps every rank's buffer (two parameter layouts: one where
                 every rank sums a region, one where rank 0's region is empty);
  no_dir         rank 1's /dev/shm stand-in does not exist;
  not_shared     each rank has a directory of its own (ranks that share no /dev/shm);
  full           rank 1's posix_fallocate finds no room (ENOSPC);
in the last three every rank must fall back to torch.distributed's all-reduce, with the
same numbers. Several cases run one after another in one launch (each with the module
state it changed put back); writes <out>/<case>/rank<r>.json, with what the rank printed
to stderr in that case."""
import contextlib
import errno
import io
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megafusion.parallel import flat_grads, launch, shared_sum  # noqa: E402

LAYOUTS = {"regions": [(7, 5), (300,), (64, 33), (1,)],
           "empty_region": [(5000,), (3,)]}


def grads_of(shapes, rank: int, micro: int = 0) -> list[torch.Tensor]:
    """Rank `rank`'s gradients in micro-batch `micro`."""
    g = torch.Generator().manual_seed(1000 + 10 * rank + micro)
    return [torch.randn(s, generator=g) * (rank + 1) for s in shapes]


def backward(params, grads) -> None:
    """A real backward whose gradient for each parameter is exactly `grads` (d(p * g)/dp
    = 1 * g), so that autograd's own accumulation and FlatGradients' hooks run."""
    sum((p * g).sum() for p, g in zip(params, grads)).backward()


def step_grads(shapes, rank: int) -> list[torch.Tensor]:
    """What a rank accumulates over the two micro-batches of a step: autograd takes the
    first gradient as it is and adds the second to it."""
    return [a + b for a, b in zip(grads_of(shapes, rank, 0), grads_of(shapes, rank, 1))]


def ours() -> set[str]:
    return {p.name for p in shared_sum.SHM_DIR.glob(f"megafusion_grads_{os.getuid()}_*")}


def main(out: Path, cases: str) -> None:
    launch.init_distributed(launch.setup_environment())
    for case in cases.split(","):
        shm_dir, fallocate = shared_sum.SHM_DIR, os.posix_fallocate
        (out / case).mkdir(exist_ok=True)
        printed = io.StringIO()
        try:
            with contextlib.redirect_stderr(printed):
                result = run_case(out / case, case)
        finally:
            shared_sum.SHM_DIR, os.posix_fallocate = shm_dir, fallocate
        result["stderr"] = printed.getvalue()
        (out / case / f"rank{dist.get_rank()}.json").write_text(json.dumps(result))
        dist.barrier()


def run_case(out: Path, case: str) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    if case == "no_dir" and rank == 1:
        shared_sum.SHM_DIR = out / "missing"
    elif case == "not_shared":
        shared_sum.SHM_DIR = out / f"shm{rank}"
        shared_sum.SHM_DIR.mkdir()
    elif case == "full" and rank == 1:
        def no_room(fd, offset, length):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        os.posix_fallocate = no_room
    before = ours()
    dist.barrier()
    result = {"checks": {}}
    for name, shapes in LAYOUTS.items():
        summed = [sum(parts[1:], parts[0].clone()) for parts in zip(*(step_grads(shapes, r) for r in range(world)))]
        result["checks"][name] = check(shapes, rank, world, summed, result)
    dist.barrier()
    result["files_left"] = sorted(ours() - before)
    return result


def check(shapes, rank: int, world: int, summed: list[torch.Tensor], result: dict) -> dict:
    checks = {}
    for max_norm in (0.0, 1e-3, 1e6):
        params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
        flat = flat_grads.FlatGradients(params, max_norm=max_norm, shared=True)
        result["shared"] = flat.shared is not None
        flat.attach()
        for micro in (0, 1):
            backward(params, grads_of(shapes, rank, micro))
        norm = flat.all_reduce()
        # The engine's way: the average (sum, then 1 / world), then DeepSpeed's clipping.
        from deepspeed.runtime.utils import clip_grad_norm_

        ref = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
        for p, s in zip(ref, summed):
            p.grad = s.clone().mul_(1.0 / world)
        ref_norm = float(clip_grad_norm_(ref, max_norm)) if max_norm > 0 else None
        gloo = torch.cat([g.flatten() for g in step_grads(shapes, rank)])
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
                backward(params, grads_of(shapes, rank, micro))
            if flat.shared is not None:
                flat.shared.sum_region()
                flat.shared.share_regions()
            else:
                dist.all_reduce(flat.buffer)
            exact = torch.cat([s.flatten() for s in summed])
            checks["sum"] = {"equals_rank_order_sum": torch.equal(flat.buffer, exact),
                             "equals_gloo": torch.equal(flat.buffer, gloo)}
            # A next step in which no gradient reaches the second parameter: its slot,
            # which holds the step before's, counts as zero, and the rest are this step's.
            flat.attach()
            used = [p for i, p in enumerate(params) if i != 1]
            backward(used, [g for i, g in enumerate(grads_of(shapes, rank, 2)) if i != 1])
            flat.all_reduce()
            fresh = [sum(parts[1:], parts[0].clone()) * (1.0 / world)
                     for parts in zip(*(grads_of(shapes, r, 2) for r in range(world)))]
            checks["unused"] = {"zero": torch.equal(params[1].grad, torch.zeros(shapes[1])),
                                "others_equal": all(torch.equal(params[i].grad, fresh[i])
                                                    for i in range(len(shapes)) if i != 1)}
    return checks


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
