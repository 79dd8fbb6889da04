"""One rank of the resume test (run as a subprocess with RANK/WORLD_SIZE/... set).

    python mf_resume_worker.py DATA CACHE RUN_ID OUT --steps N [--load STATE] [--save-after K STATE]
        [--num-workers W]

STATE is a prefix: each rank saves and loads its own loader state, STATE.rank<R>.

Writes the batches it saw (all PackedBatch tensors + stats) to OUT with torch.save.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from megafusion.data import DataConfig, build_train_loader, init_dist_env  # noqa: E402
from megafusion.model.config import FusionConfig  # noqa: E402
from megafusion.model.loading import load_tokenizer  # noqa: E402


def main():
    import faulthandler

    faulthandler.dump_traceback_later(150, exit=True)  # a hang fails the test with a traceback
    p = argparse.ArgumentParser()
    p.add_argument("data")
    p.add_argument("cache")
    p.add_argument("run_id")
    p.add_argument("out")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--load")
    p.add_argument("--save-after", nargs=2)
    p.add_argument("--num-workers", type=int, default=0)
    a = p.parse_args()
    env = init_dist_env()
    # As the trainer does (deepspeed.init_distributed): one process group for the whole run.
    # Left to itself, streaming creates and destroys a gloo group twice (stale-memory
    # cleaning, then the dataset) on the same port, and a rank that joins the first
    # store while it is torn down waits forever.
    torch.distributed.init_process_group("gloo")
    cfg = DataConfig(train=a.data, cache_root=a.cache, run_id=a.run_id, seq_len=160, batch_size=2,
                     samples_per_step=5, num_workers=a.num_workers, seed=5, shuffle=True)
    fusion = FusionConfig(image_size=16)
    loader = build_train_loader(cfg, fusion, load_tokenizer("smollm2"), 64, env)
    if a.load:  # each rank its own state, as the trainer's per-rank client files hold it
        loader.load_state_dict(torch.load(f"{a.load}.rank{env.rank}"))
    seen = []
    for step, batch in enumerate(loader):
        seen.append({**batch.as_dict(), "stats": batch.stats, "num_samples": batch.num_samples})
        if a.save_after and step + 1 == int(a.save_after[0]):
            torch.save(loader.state_dict(), f"{a.save_after[1]}.rank{env.rank}")
        if step + 1 == a.steps:
            break
    torch.distributed.barrier()
    torch.save({"batches": seen, "env": (env.rank, env.world_size, env.local_rank, env.local_world_size)}, a.out)


if __name__ == "__main__":
    main()
