"""megafusion/train.py with two test hooks, for tests/train/test_train.py:

- every build of the base model is counted, whole (megafusion.model.loading.load_base)
  or born partitioned under ZeRO-3 (megafusion.parallel.base_weights.load_base_zero3,
  where rank 0 alone reads the files); each rank prints `BASE_LOADS rank=<rank> n=<calls>`
  when it exits normally;
- MEGAFUSION_TEST_SIGUSR1_AT_STEP=N: every rank sends itself SIGUSR1 as its N-th
  optimiser step starts (what a scheduler's preemption signal does, at a known step);
- MEGAFUSION_TEST_SIGUSR1_IN_SETUP=R[,R...]: those ranks send themselves SIGUSR1 as
  the trainer starts building the model, during setup (minutes at 70B);
- MEGAFUSION_TEST_HOLD_SETUP=DIR: as the trainer starts building the model, each rank
  touches DIR/held.rank<R> and waits until DIR/release exists (a setup as long as the
  test needs, e.g. to signal a Slurm job whose ranks are all still starting);
- MEGAFUSION_TEST_SAMPLES_DIR=DIR: every training sample a rank draws is appended, as
  "epoch index", to DIR/samples-<pid>.txt (the data a run saw, whatever its world size);
- MEGAFUSION_TEST_DUMP_RESUMED=FILE: right after a checkpoint is restored, rank 0 saves
  the trainable parameters, gathered whole, to FILE ({name: fp32 tensor}), and the
  optimizer state to FILE.optim (see optimizer_state);
- MEGAFUSION_TEST_DUMP_SAVED=FILE: as each checkpoint is saved, rank 0 saves the
  optimizer state the run holds to FILE (the last save wins);
- MEGAFUSION_TEST_DEVICE_MEMORY=BYTES: the run's device reports this much memory, as a
  CUDA device's properties do (megafusion.plan.fit_check.device_memory_bytes).
"""
import atexit
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

import megafusion.model.loading as loading  # noqa: E402
import megafusion.parallel.checkpoint as checkpoint  # noqa: E402
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
# One write per line: the ranks share the launcher's stdout, unbuffered, where print's
# separate newline would let another rank's line land inside this one.
atexit.register(lambda: (sys.stdout.write(f"BASE_LOADS rank={os.environ.get('RANK', '0')} n={calls}\n"),
                         sys.stdout.flush()))

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

signal_in_setup = os.environ.get("MEGAFUSION_TEST_SIGUSR1_IN_SETUP")
if signal_in_setup is not None and os.environ.get("RANK", "0") in signal_in_setup.split(","):
    real_build = model_setup.build_model

    def signalled_build(*args, **kwargs):
        print(f"[rank {os.environ.get('RANK', '0')}] test hook: SIGUSR1 during setup", flush=True)
        os.kill(os.getpid(), signal.SIGUSR1)
        return real_build(*args, **kwargs)

    model_setup.build_model = signalled_build

hold_setup = os.environ.get("MEGAFUSION_TEST_HOLD_SETUP")
if hold_setup:
    import time

    real_build_held = model_setup.build_model

    def held_build(*args, **kwargs):
        where = Path(hold_setup)
        (where / f"held.rank{os.environ.get('RANK', '0')}").touch()
        while not (where / "release").exists():
            time.sleep(0.1)
        return real_build_held(*args, **kwargs)

    model_setup.build_model = held_build

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


def optimizer_state(engine) -> dict:
    """{"moments": {name: (exp_avg, exp_avg_sq) whole, fp32}, "steps": the Adam step
    counts held}. Every rank calls it: under ZeRO-3 gathering a moment is a collective."""
    from deepspeed.utils import safe_get_full_optimizer_state

    opt = engine.optimizer
    if hasattr(opt, "single_partition_of_fp32_groups"):
        # ZeRO-1/2 link each parameter to its slice of the optimizer state once, after the
        # first parameter group's first step, when the later groups have no state yet
        # (DeepSpeed 0.19): link them again now that every group has stepped.
        from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state

        for i, flat in enumerate(opt.single_partition_of_fp32_groups):
            lazy_init_hp_params_optimizer_state(opt.bit16_groups[i], flat, opt.optimizer.state)
    moments = {name: tuple(safe_get_full_optimizer_state(p, k).float().clone() for k in ("exp_avg", "exp_avg_sq"))
               for name, p in engine.module.named_parameters() if p.requires_grad}
    inner = getattr(opt, "optimizer", opt)
    steps = sorted({float(st["step"]) for st in inner.state.values() if "step" in st})
    return {"moments": moments, "steps": steps}


dump_saved = os.environ.get("MEGAFUSION_TEST_DUMP_SAVED")
if dump_saved:
    real_save = checkpoint.save

    def dumping_save(engine, *args, **kwargs):
        state = optimizer_state(engine)
        if int(os.environ.get("RANK", "0")) == 0:
            torch.save(state, dump_saved)
        return real_save(engine, *args, **kwargs)

    checkpoint.save = dumping_save

dump_resumed = os.environ.get("MEGAFUSION_TEST_DUMP_RESUMED")
if dump_resumed:
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
            state = optimizer_state(engine)
            if int(os.environ.get("RANK", "0")) == 0:
                torch.save(out, dump_resumed)
                torch.save(state, dump_resumed + ".optim")
        return client

    checkpoint.load_latest = dumping_load_latest

device_memory = os.environ.get("MEGAFUSION_TEST_DEVICE_MEMORY")
if device_memory:
    import megafusion.plan.fit_check as fit_check

    fit_check.device_memory_bytes = lambda device: float(device_memory)

from megafusion.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
