"""Process-group setup that works under the deepspeed launcher, torchrun, srun and a
plain `python megafusion/train.py` (one rank).

DeepSpeed picks its accelerator at import time, so DS_ACCELERATOR must be settled before
anything imports deepspeed: on a machine without a GPU it is set to "cpu" (gloo).
"""
from __future__ import annotations

import contextlib
import io
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


def _free_port() -> int:
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
    return [deepspeed, "--num_gpus", str(int(ranks)), "--master_port", str(port or _free_port()), "--log_level", "error"]


def extensions_dir() -> Path:
    """Where DeepSpeed's JIT-built ops (the CPU's shared-memory all-reduce and CPU Adam,
    CUDA's fused kernels) are kept for this Python environment: one directory per
    virtual environment under megafusion's cache. torch's default, one directory per
    user, is shared by every checkout; its build files name the environment's include
    paths, so two checkouts (or a CI clone and a working copy) rebuild each op whenever
    the other ran last: measured here, CPU Adam 110 s and the all-reduce 55 s, paid by
    whichever run came next."""
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
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
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
    init_distributed keeps it where the trainer asks for it, and unlinks the files."""
    from deepspeed.git_version_info import compatible_ops

    compatible_ops["deepspeed_shm_comm"] = False


# True once init_distributed has set up DeepSpeed's shared-memory all-reduce on this rank
# (every rank of the world on this machine); flat_grads.py reduces through it then.
SHM_ALLREDUCE_READY = False


def _shm_allreduce_buildable() -> bool:
    """DeepSpeed's shared-memory all-reduce op, JIT-built on first use (~45 s on 2 cores,
    then cached in torch's extensions directory); False, with one line, where it cannot be
    built (no compiler), so the run reduces through gloo instead of failing."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import compatible_ops

    if not compatible_ops.get("deepspeed_shm_comm", False):
        return False
    try:
        get_accelerator().create_op_builder("ShareMemCommBuilder").load(verbose=False)
        return True
    except Exception as exc:  # a failed build: fall back, say why
        print(f"warning: DeepSpeed's shared-memory all-reduce unavailable ({str(exc).splitlines()[0][:200]}); "
              "gradients are all-reduced through gloo", file=sys.stderr, flush=True)
        return False


def prebuild_cpu_ops() -> None:
    """`make setup` on a machine without a GPU: JIT-build the shared-memory all-reduce now
    (~45 s), so that the first `make demo` does not spend its own minutes on it."""
    if has_cuda():
        return
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    use_private_extensions_dir()  # where the ranks will look for it
    import logging

    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    if _shm_allreduce_buildable():
        print("DeepSpeed's shared-memory all-reduce (CPU runs) is built")


def shm_buffer_path(rank: int) -> Path:
    """The /dev/shm file of a rank's all-reduce workspace (shm.cpp's shm_initialize)."""
    return Path("/dev/shm") / (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
                               f"{os.environ.get('MASTER_PORT', '')}_{rank}")


def init_distributed(env: DistEnv, timeout_minutes: float | None = None, shm_allreduce: bool = False):
    """timeout_minutes: how long a collective waits (parallel.collective_timeout_minutes;
    None: DeepSpeed's default, $DEEPSPEED_TIMEOUT or 10 minutes).

    shm_allreduce: on the CPU, with every rank on this machine, keep DeepSpeed's
    shared-memory all-reduce (the trainer's flat gradients use it: 115.5M fp32 values in
    0.40 s against gloo's 0.85 s on two ranks here). Its /dev/shm files are unlinked as
    soon as every rank has mapped them all, so they vanish with the processes."""
    import datetime

    import deepspeed
    import torch
    import torch.distributed as dist

    global SHM_ALLREDUCE_READY
    accelerator = os.environ.get("DS_ACCELERATOR") or choose_accelerator()
    backend = process_group_backend(accelerator)
    if accelerator == "cuda":
        torch.cuda.set_device(env.local_rank)  # before the group binds its device
    shm = (accelerator == "cpu" and shm_allreduce and env.world_size > 1
           and env.local_world_size == env.world_size and _shm_allreduce_buildable())
    if accelerator == "cpu" and not shm:
        skip_shm_allreduce_buffer()
    if shm:
        # The op maps the other ranks' workspaces only where it is told that all ranks are
        # local; the deepspeed launcher sets LOCAL_SIZE, torchrun and srun do not.
        os.environ["LOCAL_SIZE"] = str(env.local_world_size)
    kwargs = {} if timeout_minutes is None else {"timeout": datetime.timedelta(minutes=timeout_minutes)}
    # DeepSpeed prints "... deepspeed_shm_comm_op built successfully" on every rank as it
    # loads the op; the rest of what init prints passes through.
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, **kwargs)
    finally:  # what init printed before a failure is part of its story
        sys.stdout.write("".join(line for line in printed.getvalue().splitlines(keepends=True)
                                 if "built successfully" not in line))
    if shm:
        # Every rank has opened every workspace once it is past init (shm_initialize
        # waits for each file): the names can go, the mappings stay.
        dist.barrier()
        shm_buffer_path(dist.get_rank()).unlink(missing_ok=True)
        SHM_ALLREDUCE_READY = True
    return backend


def device_for(env: DistEnv):
    import torch

    if os.environ.get("DS_ACCELERATOR") == "cuda":
        return torch.device("cuda", env.local_rank)
    return torch.device("cpu")
