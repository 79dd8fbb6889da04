"""How the tests start several CPU ranks on one machine.

Most multi-rank tests use torchrun (torch.distributed.run): it imports torch alone,
while the deepspeed launcher imports all of DeepSpeed twice (its runner, then its
launch.py) before the first rank starts. On this 2-core machine that is several seconds
of every launch, and the suite launches some eighty times. The ranks see the same
environment either way (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT; init_dist_env
reads LOCAL_WORLD_SIZE from torchrun and LOCAL_SIZE from the deepspeed launcher), and
`deepspeed megafusion/train.py`, what users run, stays covered: the tests that pass
launcher="deepspeed" (the production-settings run and its SIGUSR1 stop, the signal
stop at a step boundary, the demo) and tests/data's launcher-environment tests. Kill a
launched job with kill_job, not os.killpg (see there).
"""
import os
import signal
import sys
from pathlib import Path

from megafusion.parallel.launch import free_port

DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")


def launcher_cmd(ranks: int, launcher: str = "torchrun", port: int | None = None) -> list[str]:
    """The command prefix that starts `ranks` local ranks of the script that follows."""
    port = port or free_port()
    if launcher == "deepspeed":
        return [DEEPSPEED, "--num_gpus", str(ranks), "--master_port", str(port)]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
                "--master_port", str(port)]
    raise ValueError(f"unknown launcher {launcher!r}")


def launcher_env(ranks: int, launcher: str = "torchrun", **extra: str) -> dict:
    """The environment for a CPU launch. Under torchrun OMP_NUM_THREADS is set to what
    megafusion's launch chooses when it is unset (cores / local ranks, which the
    deepspeed launcher leaves to it): torchrun would otherwise set 1 and print a banner."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    if launcher == "torchrun":
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // ranks)))
    env.update(extra)
    return env


RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE")


def rank_env(rank: int, world: int, port: int, local_world: int | None = None, **extra: str) -> dict:
    """The environment of one rank started directly, without a launcher: for tests that
    need each rank's own exit code and output (a launcher stops the other ranks when one
    fails) or that simulate nodes. os.environ less any rank variables it already had,
    the rank layout, a local rendezvous on `port`, then `extra`."""
    local_world = local_world or world
    env = {k: v for k, v in os.environ.items() if k not in RANK_VARIABLES}
    env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank % local_world),
               LOCAL_WORLD_SIZE=str(local_world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **extra)
    return env


def kill_job(launcher, sig=signal.SIGKILL) -> None:
    """Send `sig` to a launched job at once: its ranks (and their DataLoader workers) and
    the launcher. torchrun starts each rank in a session of its own, so a kill of the
    launcher's process group would leave the ranks running, holding the run's data-cache
    lock for every later run of the same data.run_id."""
    import psutil

    try:
        procs = psutil.Process(launcher.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        procs = []
    for proc in [*procs, psutil.Process(launcher.pid)] if launcher.poll() is None else procs:
        try:
            proc.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
    launcher.wait()
