"""One rank (gloo, world size 1): a small model under a real ZeRO-3 DeepSpeed engine takes
one step and is saved with megafusion.parallel.checkpoint.save while os.fsync, os.replace
and os.rename are traced. Prints `EVENTS <json list>`: ["fsync", path] (the path the
file descriptor points at) and ["replace", src, dst], in order.

    python checkpoint_fsync_worker.py CKPT_DIR
"""
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main():
    ckpt_dir = Path(sys.argv[1])
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", DS_ACCELERATOR="cpu")
    from megafusion.parallel.launch import init_distributed, setup_environment

    init_distributed(setup_environment())
    import deepspeed
    import torch

    from megafusion.parallel import checkpoint

    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
        config={"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}, "steps_per_print": 10**9})
    loss = engine(torch.randn(1, 8)).sum()
    engine.backward(loss)
    engine.step()

    events = []
    real_fsync, real_replace, real_rename = os.fsync, os.replace, os.rename

    def fsync(fd):
        events.append(["fsync", os.readlink(f"/proc/self/fd/{fd}")])
        return real_fsync(fd)

    def replace(src, dst, *a, **k):
        events.append(["replace", str(src), str(dst)])
        return real_replace(src, dst, *a, **k)

    def rename(src, dst, *a, **k):
        events.append(["replace", str(src), str(dst)])
        return real_rename(src, dst, *a, **k)

    os.fsync, os.replace, os.rename = fsync, replace, rename
    try:
        checkpoint.save(engine, ckpt_dir, 1, {"loader": None}, keep_last=0)
    finally:
        os.fsync, os.replace, os.rename = real_fsync, real_replace, real_rename
    print("EVENTS " + json.dumps(events), flush=True)


if __name__ == "__main__":
    main()
