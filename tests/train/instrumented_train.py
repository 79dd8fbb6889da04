"""megafusion/train.py with two test hooks, for tests/train/test_train.py:

- every build of the base model is counted, whole (megafusion.model.loading.load_base)
  or born partitioned under ZeRO-3 (megafusion.parallel.base_weights.load_base_zero3,
  where rank 0 alone reads the files); each rank prints `BASE_LOADS rank=<rank> n=<calls>`
  when it exits normally;
- MEGAFUSION_TEST_SIGUSR1_AT_STEP=N: every rank sends itself SIGUSR1 as its N-th
  optimiser step starts (what a scheduler's preemption signal does, at a known step);
- MEGAFUSION_TEST_SAMPLES_DIR=DIR: every training sample a rank draws is appended, as
  "epoch index", to DIR/samples-<pid>.txt (the data a run saw, whatever its world size);
- MEGAFUSION_TEST_DUMP_RESUMED=FILE: right after a checkpoint is restored, rank 0 saves
  the trainable parameters, gathered whole, to FILE ({name: fp32 tensor}).
"""
import atexit
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import megafusion.model.loading as loading  # noqa: E402
import megafusion.parallel.base_weights as base_weights  # noqa: E402
import megafusion.parallel.model_setup as model_setup  # noqa: E402
from megafusion.parallel.trainer import Trainer  # noqa: E402

calls = 0


def counted(real):
    def counted_load(*args, **kwargs):
        global calls
        calls += 1
        return real(*args, **kwargs)

    return counted_load


loading.load_base = model_setup.load_base = counted(loading.load_base)
base_weights.load_base_zero3 = model_setup.load_base_zero3 = counted(base_weights.load_base_zero3)
atexit.register(lambda: print(f"BASE_LOADS rank={os.environ.get('RANK', '0')} n={calls}", flush=True))

signal_at = int(os.environ.get("MEGAFUSION_TEST_SIGUSR1_AT_STEP", "0"))
if signal_at:
    real_step = Trainer._zero_step
    steps_run = 0

    def signalled_step(self, *args, **kwargs):
        global steps_run
        steps_run += 1
        if steps_run == signal_at:
            os.kill(os.getpid(), signal.SIGUSR1)
        return real_step(self, *args, **kwargs)

    Trainer._zero_step = signalled_step

samples_dir = os.environ.get("MEGAFUSION_TEST_SAMPLES_DIR")
if samples_dir:
    from megafusion.data.dataset import FusionDataset

    real_getitem = FusionDataset.__getitem__

    def recorded_getitem(self, index):
        sample = real_getitem(self, index)
        with open(os.path.join(samples_dir, f"samples-{os.getpid()}.txt"), "a") as f:
            f.write(f"{sample['epoch']} {sample['index']}\n")
        return sample

    FusionDataset.__getitem__ = recorded_getitem

dump_resumed = os.environ.get("MEGAFUSION_TEST_DUMP_RESUMED")
if dump_resumed:
    import torch

    import megafusion.parallel.checkpoint as checkpoint
    from megafusion.parallel.gather import gathered

    real_load_latest = checkpoint.load_latest

    def dumping_load_latest(engine, *args, **kwargs):
        client = real_load_latest(engine, *args, **kwargs)
        if client is not None:
            out = {}
            for name, p in engine.module.named_parameters():
                if p.requires_grad:
                    with gathered([p]):
                        out[name] = p.detach().float().clone()
            if int(os.environ.get("RANK", "0")) == 0:
                torch.save(out, dump_resumed)
        return client

    checkpoint.load_latest = dumping_load_latest

from megafusion.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
