"""Building a StreamingDataset safely next to other jobs on the same machine.

streaming names the shared memory of a dataset /dev/shm/<prefix>_<name>, and a new
dataset takes the first prefix no other dataset uses: every rank scans /dev/shm, the
ranks meet at a barrier, then each node's local leader creates <prefix>_locals. Two jobs
that scan at the same moment pick the same prefix and the second fails with
FileExistsError: '/000NNN_locals'. construction_window() serializes that window across
jobs with a machine-wide flock:

    local leader: take LOCK_PATH -> barrier -> every rank builds the dataset -> barrier -> release

so the ranks of a node scan only while their leader holds the lock, and the next job's
scan starts after this one's prefix exists. The lock covers the construction only (its
prefix search, index download and shared-memory set-up), not the training that follows.
It lives in /dev/shm because shared-memory names are machine-wide, while /tmp may be
private to each job (Slurm's job_container/tmpfs). A leader that waits longer than
LOCK_TIMEOUT_S (another node's job holding its own machine's lock while it waits for
ours) goes ahead without it, with a warning, rather than deadlock.

streaming's own clean_stale_shared_memory() is never called: it unlinks the shared
memory of every dataset on the machine, the live ones of concurrently running jobs
included. What it was needed for, a killed run's record that claims its cache
directories ("Reused local directory" when the same run restarts and that prefix's /tmp
file locks are gone), is release_stale_locals(): inside the window the leader removes the
shared memory of records that name this dataset's own cache directories, and only while it
holds the node's cache lock (cache.py), which a live megafusion job using those
directories would hold: such a record is a dead job's. (Whether a process maps the memory
says nothing: streaming's prefix search attaches to every record it walks past and keeps
it mapped for the life of the process.)
"""
from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import struct
import time
import warnings

LOCK_PATH = "/dev/shm/megafusion-streaming-construction.lock"
LOCK_TIMEOUT_S = 300.0
SHM_DIR = "/dev/shm"
# streaming.base.constant.SHM_TO_CLEAN: every per-prefix name a dataset creates.
SHM_NAMES = ("locals", "barrier", "next_epoch", "cache_usage", "shard_states", "shard_access_times",
             "resume", "epoch_shape", "epoch_data")


def _open_lock(path: str) -> int:
    """A descriptor of the machine-wide lock file, creating it if needed. Read-only: flock
    needs no write access, so the file one user created serves every user."""
    try:
        return os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        pass
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
    except PermissionError:  # protected_regular: created by another user in between
        return os.open(path, os.O_RDONLY)
    with contextlib.suppress(OSError):
        os.fchmod(fd, 0o644)
    return fd


def _acquire(path: str, timeout_s: float) -> int | None:
    try:
        fd = _open_lock(path)
    except OSError as e:
        warnings.warn(f"cannot open {path} ({e.strerror}): streaming datasets are built without the "
                      "machine-wide lock", stacklevel=3)
        return None
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                warnings.warn(f"{path} held for over {timeout_s:.0f} s by another job: building the "
                              "streaming dataset without it", stacklevel=3)
                return None
            time.sleep(0.05)


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def construction_window(is_local_leader: bool, stale_dirs: list[str] = ()):
    """Build StreamingDatasets inside this (on every rank; see the module docstring).
    stale_dirs: cache directories whose node cache lock this process holds; records of
    dead datasets that name them are released first."""
    fd = _acquire(LOCK_PATH, LOCK_TIMEOUT_S) if is_local_leader else None
    try:
        if is_local_leader:
            release_stale_locals(stale_dirs)
        _barrier()
        yield
        _barrier()
    finally:
        if fd is not None:
            os.close(fd)


# ----------------------------------------------------------------- stale shared memory

def _read_locals(path: str) -> list[str]:
    """The directories a <prefix>_locals block registers (streaming's _pack_locals format:
    int32 total size, then the names and the prefix joined by NUL)."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 4:
        return []
    size = struct.unpack("<i", data[:4])[0]
    if size <= 4:  # 0: released by its dataset's destructor
        return []
    return data[4:size].decode("utf-8", errors="replace").split("\0")[:-1]


def release_stale_locals(local_dirs) -> list[str]:
    """Unlink the shared memory of records that name one of `local_dirs`. Call only while
    holding the node cache lock of those directories (see the module docstring).
    Returns the prefixes released."""
    mine = {os.path.abspath(d) for d in local_dirs}
    if not mine or not os.path.isdir(SHM_DIR):
        return []
    stale = []
    for path in glob.glob(os.path.join(SHM_DIR, "[0-9]" * 6 + "_locals")):
        try:
            if mine.intersection(_read_locals(path)):
                stale.append(os.path.basename(path)[:6])
        except OSError:
            continue
    for prefix in stale:
        for name in SHM_NAMES:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(SHM_DIR, f"{prefix}_{name}"))
    return stale
