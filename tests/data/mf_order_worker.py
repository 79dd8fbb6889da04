"""One rank of the sample-order test (run as a subprocess with RANK/WORLD_SIZE/... set).

    python mf_order_worker.py DATA CACHE RUN_ID OUT --steps N [--simulated-node]

Writes, per step, the global indices of the samples this rank's loader consumed (the
samples handed to its packer) to OUT with torch.save.

--simulated-node: this process stands for a node of its own although all run on one
machine. streaming keys its shared memory by machine, so two local leaders on one
machine would pick the same prefix; here each simulated node searches its own range of
prefixes and takes its own construction lock, as separate machines would.
"""
import argparse
import itertools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from megafusion.data import DataConfig, build_train_loader, init_dist_env  # noqa: E402
from megafusion.model.config import FusionConfig  # noqa: E402
from megafusion.model.loading import load_tokenizer  # noqa: E402


def main():
    import faulthandler

    faulthandler.dump_traceback_later(600, exit=True)  # a hang fails the test with a traceback
    p = argparse.ArgumentParser()
    p.add_argument("data")
    p.add_argument("cache")
    p.add_argument("run_id")
    p.add_argument("out")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--simulated-node", action="store_true")
    a = p.parse_args()
    env = init_dist_env()
    if a.simulated_node:
        import streaming.base.shared.prefix as prefix

        base = 700_000 + 10_000 * env.node + os.getpid() % 1000 * 10
        prefix._each_prefix_int = lambda: itertools.count(base)
        try:
            from megafusion.data import shm

            shm.LOCK_PATH = os.path.join(a.cache, f"construction-node{env.node}.lock")
        except ImportError:  # a megafusion before the lock
            pass
    torch.distributed.init_process_group("gloo")
    cfg = DataConfig(train=a.data, cache_root=a.cache, run_id=a.run_id, seq_len=256, batch_size=1,
                     samples_per_step=4, num_workers=0, seed=11, shuffle=True)
    loader = build_train_loader(cfg, FusionConfig(image_size=16), load_tokenizer("smollm2"), 64, env)
    seen = []
    packer = loader.packer if hasattr(loader, "packer") else None

    def record(samples):
        seen.append([s["index"] for s in samples])
        return samples

    if packer is not None:  # the loader packs in its main process: watch what it is given
        loader.packer = lambda samples: packer(record(samples))
    else:  # a megafusion that packed in the collate
        collate = loader.collate_fn
        loader.collate_fn = lambda samples: collate(record(samples))
    for step, _ in enumerate(loader):
        if step + 1 == a.steps:
            break
    torch.distributed.barrier()
    torch.save({"steps": seen, "env": (env.rank, env.world_size, env.local_rank, env.local_world_size)}, a.out)
    faulthandler.cancel_dump_traceback_later()


if __name__ == "__main__":
    main()
