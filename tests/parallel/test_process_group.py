"""Issue 11, blocker 2: on CUDA the process group was NCCL-only, and the trainer's own
collectives used CPU tensors ("No backend type associated with device type cpu" on the
first micro-batch). No GPU here, so both halves are checked with stand-ins."""
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import BackendConfig

from megafusion.parallel import collectives, launch


def no_accelerator_chosen(monkeypatch):
    """DS_ACCELERATOR unset for this test and restored after it: choose_accelerator()
    writes its choice into os.environ, which would otherwise leak "cuda" into every later
    test's launches (setenv first, so that monkeypatch records the variable's state)."""
    monkeypatch.setenv("DS_ACCELERATOR", "unset")
    monkeypatch.delenv("DS_ACCELERATOR")


@pytest.fixture
def fake_cuda(monkeypatch):
    """A machine whose torch sees a GPU and where nobody chose DS_ACCELERATOR."""
    no_accelerator_chosen(monkeypatch)
    monkeypatch.setattr(launch, "has_cuda", lambda: True)


def test_cuda_environment_gets_a_group_that_serves_cpu_tensors_too(fake_cuda):
    accelerator = launch.choose_accelerator()
    assert accelerator == "cuda"
    # torch's own parser of the backend string is the reference for what serves what.
    devices = BackendConfig(launch.process_group_backend(accelerator)).get_device_backend_map()
    assert devices == {"cpu": "gloo", "cuda": "nccl"}


def test_cpu_environment_stays_on_gloo(monkeypatch):
    no_accelerator_chosen(monkeypatch)
    monkeypatch.setattr(launch, "has_cuda", lambda: False)
    assert launch.process_group_backend(launch.choose_accelerator()) == "gloo"
    monkeypatch.setattr(launch, "has_cuda", lambda: True)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # an explicit choice wins over the GPU
    assert launch.process_group_backend(launch.choose_accelerator()) == "gloo"


def _cpu_collective_works(backend: str) -> bool:
    """A one-rank group built from `backend` with NCCL replaced by gloo (NCCL needs a
    GPU to exist; gloo registered for the cuda device only behaves as NCCL does towards
    CPU tensors): does an all_reduce of a CPU tensor run?"""
    devices = BackendConfig(backend).get_device_backend_map()
    stand_in = ",".join(f"{d}:{'gloo' if b == 'nccl' else b}" for d, b in devices.items())
    dist.init_process_group(stand_in, store=dist.HashStore(), rank=0, world_size=1)
    try:
        dist.all_reduce(torch.ones(2))
        return True
    except RuntimeError as exc:
        assert "No backend type associated with device type cpu" in str(exc)
        return False
    finally:
        dist.destroy_process_group()


def test_cuda_group_runs_a_cpu_collective_with_nccl_stood_in_by_gloo(fake_cuda):
    assert not _cpu_collective_works("nccl"), "the stand-in must reproduce NCCL's refusal"
    assert _cpu_collective_works(launch.process_group_backend(launch.choose_accelerator()))


class _Seen(Exception):
    pass


def test_trainer_collectives_put_their_tensors_on_the_engine_device(monkeypatch):
    """Each of the trainer's collectives hands dist.all_reduce a tensor on the device it
    is given (the meta device stands in for the GPU: nothing is computed there)."""
    seen = []

    def all_reduce(t, op=None, group=None):
        seen.append(t.device.type)
        raise _Seen

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    meta = torch.device("meta")
    from megafusion.parallel import frozen
    from megafusion.parallel.step_control import StopSignal, step_means

    stop = StopSignal.__new__(StopSignal)  # no signal handlers installed in pytest
    stop.received = 0
    calls = [
        lambda: collectives.any_rank(True, meta),
        lambda: collectives.any_rank_tensor(torch.zeros((), dtype=torch.bool, device=meta)),
        lambda: collectives.sum_over_ranks([1.0, 2.0], meta),
        lambda: collectives.mean_over_ranks([1.0, 2.0], meta),
        lambda: step_means([1.0, 2.0, 3.0, 1.0], meta),
        lambda: stop.anywhere(meta),
        lambda: frozen.check_unchanged(torch.nn.Linear(2, 2).requires_grad_(False), {}, meta),
    ]
    for call in calls:
        with pytest.raises(_Seen):
            call()
    assert seen == ["meta"] * len(calls)


def test_cpu_process_group_leaves_no_shared_memory_behind(tmp_path):
    """DeepSpeed's CPU backend had every rank create a 69 MB
    /dev/shm/deepspeed_allreduce_buffer_* that nothing unlinks: after a finished run its
    segment stayed, and a day of test runs held 10 GB of this machine's RAM. One rank
    that sets up the group the trainer's way and exits must leave /dev/shm as it was."""
    import glob
    import os
    import subprocess
    import sys

    port = launch.free_port()
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_SIZE="1", LOCAL_WORLD_SIZE="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu",
               PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    code = ("from megafusion.parallel import launch\n"
            "import torch.distributed as dist\n"
            "launch.init_distributed(launch.setup_environment())\n"
            "dist.all_reduce(__import__('torch').ones(1))\n"
            "dist.destroy_process_group()\n")
    pattern = f"/dev/shm/deepspeed_allreduce_buffer_*_127.0.0.1_{port}_*"
    try:
        done = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        assert glob.glob(pattern) == []
    finally:
        for path in glob.glob(pattern):
            os.unlink(path)
