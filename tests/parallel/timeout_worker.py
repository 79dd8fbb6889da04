"""One of two ranks started by test_collective_timeout.py (RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT in the environment): the group is created by the trainer's own
init_distributed with parallel.collective_timeout_minutes from the run config. Rank 1
joins and then stalls (a hung GPU, a dead peer); rank 0 all-reduces and prints how long
it took the collective to give up: `COLLECTIVE_FAILED_AFTER <seconds>` or
`COLLECTIVE_RETURNED_AFTER <seconds>`.

    python timeout_worker.py CONFIG.yaml STALL_SECONDS [section.key=value ...]
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megafusion.config import load_config  # noqa: E402
from megafusion.parallel.launch import init_distributed, setup_environment  # noqa: E402


def main():
    cfg = load_config(sys.argv[1], sys.argv[3:])
    stall = float(sys.argv[2])
    env = setup_environment()
    init_distributed(env, cfg.parallel.collective_timeout_minutes)
    import torch
    import torch.distributed as dist

    dist.barrier()  # both ranks are up: what follows measures the collective alone
    if env.rank == 1:
        time.sleep(stall)
        return
    t0 = time.time()
    try:
        dist.all_reduce(torch.ones(4))
        print(f"COLLECTIVE_RETURNED_AFTER {time.time() - t0:.1f}", flush=True)
    except Exception as exc:  # gloo raises on its timeout
        print(f"COLLECTIVE_FAILED_AFTER {time.time() - t0:.1f} {type(exc).__name__}", flush=True)


if __name__ == "__main__":
    main()
