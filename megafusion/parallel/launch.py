"""Process-group setup that works under the deepspeed launcher, torchrun, srun and a
plain `python megafusion/train.py` (one rank).

DeepSpeed picks its accelerator at import time, so DS_ACCELERATOR must be settled before
anything imports deepspeed: on a machine without a GPU it is set to "cpu" (gloo).
"""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

from megafusion.data.dist_env import DistEnv, init_dist_env


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def choose_accelerator() -> str:
    if "DS_ACCELERATOR" not in os.environ:
        os.environ["DS_ACCELERATOR"] = "cuda" if has_cuda() else "cpu"
    return os.environ["DS_ACCELERATOR"]


def free_port() -> int:
    """A TCP port free on this machine now (the kernel picks it), for a local rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_deepspeed_command(ranks: int, deepspeed: str = "deepspeed", port: int | None = None) -> list[str]:
    """The command prefix that starts `ranks` ranks of the script that follows on this
    machine through the deepspeed launcher, as the project's tools do (make demo,
    tools/ablate.py, tools/bench_demo.py): a free rendezvous port, and the launcher's own
    log level at error. At warning, every local launch begins with DeepSpeed's "Unable to
    find hostfile, will proceed with training with local resources only", which is what a
    local launch means; the level reaches only the launcher processes, not the ranks."""
    return [deepspeed, "--num_gpus", str(int(ranks)), "--master_port", str(port or free_port()), "--log_level", "error"]


def extensions_dir() -> Path:
    """Where DeepSpeed's JIT-built ops (CPU Adam, CUDA's fused kernels) are kept for this
    Python environment: one directory per virtual environment under megafusion's cache.
    torch's default, one directory per user, is shared by every checkout; its build files
    name the environment's include paths, so two checkouts (or a CI clone and a working
    copy) rebuild each op whenever the other ran last: measured here, CPU Adam 110 s,
    paid by whichever run came next."""
    import hashlib

    from megafusion.model.loading import cache_dir

    prefix = Path(os.path.abspath(sys.prefix))
    # Named for people (a checkout's .venv: "<checkout>-venv-<hash>"), unique by the hash.
    readable = "-".join(part.lstrip(".") for part in (prefix.parent.name, prefix.name) if part.lstrip("."))
    return cache_dir() / "torch_extensions" / f"{readable}-{hashlib.sha1(str(prefix).encode()).hexdigest()[:10]}"


def use_private_extensions_dir() -> None:
    """TORCH_EXTENSIONS_DIR for this process's JIT builds, unless the user set one."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(extensions_dir()))


def setup_environment() -> DistEnv:
    """Normalise the rank variables (see megafusion/data/dist_env.py) and the rendezvous
    address; returns the rank layout."""
    env = init_dist_env()
    use_private_extensions_dir()
    if env.world_size == 1:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    else:
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if not os.environ.get(name):
                raise SystemExit(f"error: {name} is not set; launch with deepspeed, torchrun or the slurm/ scripts")
    choose_accelerator()
    if os.environ["DS_ACCELERATOR"] == "cpu":
        # DeepSpeed's CPU accelerator JIT-builds its ops (CPU Adam) through torch's
        # cpp_extension, which warns once per rank that no CUDA runtime exists: true,
        # expected, and nothing a CPU user can act on.
        import logging

        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    # Keep the CPU's few cores for the ranks rather than oversubscribing them.
    if os.environ["DS_ACCELERATOR"] == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // env.local_world_size))
    return env


def process_group_backend(accelerator: str) -> str:
    """The torch.distributed backend for DS_ACCELERATOR's value. NCCL serves CUDA tensors
    only, and not everything a rank reduces lives on the GPU (a CPU-side flag, an
    offloaded optimizer's values, a library's own small collectives); with gloo
    registered for the CPU beside it, such a collective works instead of failing with
    "No backend type associated with device type cpu". The trainer's own collectives
    still put their tensors on the GPU (megafusion/parallel/collectives.py)."""
    if accelerator == "cuda":
        return "cpu:gloo,cuda:nccl"
    if accelerator == "cpu":
        return "gloo"
    raise ValueError(f"DS_ACCELERATOR={accelerator}: expected cuda or cpu")


def skip_shm_allreduce_buffer():
    """On the CPU accelerator DeepSpeed's process group builds its shared-memory all-reduce
    (the deepspeed_shm_comm op) and has every rank create a 69 MB
    /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank> that nothing ever
    unlinks: each run leaks ~70 MB of RAM per rank, and a machine that runs many (a test
    suite, a CPU cluster's jobs) fills its memory with them. Marking the op incompatible
    skips it (and its JIT build and "built successfully" print); DeepSpeed's own uses of
    it (inference's tensor-parallel all-reduce) then fall back to torch.distributed.
    The trainer's own gradient sum on one machine needs no library workspace: its
    buffers are shared between the ranks (shared_sum.py)."""
    from deepspeed.git_version_info import compatible_ops

    compatible_ops["deepspeed_shm_comm"] = False


def init_distributed(env: DistEnv, timeout_minutes: float | None = None):
    """timeout_minutes: how long a collective waits (parallel.collective_timeout_minutes;
    None: DeepSpeed's default, $DEEPSPEED_TIMEOUT or 10 minutes)."""
    import datetime

    import deepspeed
    import torch

    accelerator = os.environ.get("DS_ACCELERATOR") or choose_accelerator()
    backend = process_group_backend(accelerator)
    if accelerator == "cuda":
        torch.cuda.set_device(env.local_rank)  # before the group binds its device
    if accelerator == "cpu":
        skip_shm_allreduce_buffer()
    kwargs = {} if timeout_minutes is None else {"timeout": datetime.timedelta(minutes=timeout_minutes)}
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, **kwargs)
    return backend


def device_for(env: DistEnv):
    import torch

    if os.environ.get("DS_ACCELERATOR") == "cuda":
        return torch.device("cuda", env.local_rank)
    return torch.device("cpu")
