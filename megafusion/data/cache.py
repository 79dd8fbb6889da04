"""Node cache directories: claimed by the job that uses them, removed once no job does.

Every stream is read through <cache_root>/<run_id>/node<N>/<stream> (loader.cache_dir).
Jobs end, crash or are requeued elsewhere, and their directories would stay behind on the
node's disk, so each directory carries a lock file beside it:

    <cache_root>/<run_id>/node<N>.lock    "<hostname> <pid>", flock()ed while the job lives

The local leader of a node claims its directory at start-up: it holds the lock for the
life of the process (DataLoader workers, forked, share the lock; the kernel drops it
when the last of them exits, however the job ends). In the same start-up it removes the
node directories of earlier jobs: those whose lock file names this host and whose lock it
can take, i.e. no live process holds. It never removes:
  - the current run's directories (a requeued job reuses its cache);
  - a directory whose lock is held (a concurrently running job);
  - a directory whose lock file names another host (a cache_root on a shared filesystem:
    flock may not reach across machines; that host cleans its own);
  - a directory without a lock file (written by an older megafusion, maybe by a job that
    is still running; delete those by hand).
Claiming and cleaning happen under one more lock, <cache_root>/.megafusion-cache.lock, so
that a job claiming a directory never meets a cleaner halfway through removing it.
Where the filesystem refuses flock, nothing is removed and a warning says so.

Standard library only.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import socket
import warnings
from pathlib import Path

ROOT_LOCK = ".megafusion-cache.lock"

# Lock files this process holds: path -> open file descriptor (kept for the process's life).
_HELD: dict[str, int] = {}


def lock_path(cache_root: str, run_id: str, node: int) -> Path:
    return Path(cache_root) / run_id / f"node{node}.lock"


@contextlib.contextmanager
def _root_lock(cache_root: Path):
    fd = os.open(cache_root / ROOT_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _holds(path: Path) -> bool:
    """This process already holds the lock file at `path` (and it is still that file)."""
    fd = _HELD.get(str(path))
    if fd is None:
        return False
    try:
        if os.fstat(fd).st_ino == os.stat(path).st_ino:
            return True
    except FileNotFoundError:
        pass
    os.close(fd)  # the file was removed behind our back: claim it anew
    del _HELD[str(path)]
    return False


def _claim(path: Path) -> None:
    """Hold the lock file at `path` for the life of this process."""
    if _holds(path):
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        owner = path.read_text().strip() or "unknown"
        raise ValueError(f"data cache {path.with_suffix('')} is in use by another running job ({owner}): "
                         "give concurrent runs different data.run_id values") from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.write(fd, f"{socket.gethostname()} {os.getpid()}\n".encode())
    _HELD[str(path)] = fd


def _stale(lock: Path, host: str) -> int | None:
    """An fd holding `lock` when it belongs to a finished job of this host, else None."""
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return None
    owner = os.read(fd, 4096).decode(errors="replace").split()
    if owner and owner[0] == host:  # another host's is not ours to judge
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:  # a live job holds it
            pass
    os.close(fd)
    return None


def clean_stale(cache_root: str, keep_run_id: str) -> list[str]:
    """Remove the node directories of finished jobs of this host (see the module docstring).
    Call with the root lock held. Returns the directories removed."""
    host = socket.gethostname()
    removed = []
    for lock in sorted(Path(cache_root).glob("*/node*.lock")):
        if lock.parent.name == keep_run_id or str(lock) in _HELD:
            continue
        fd = _stale(lock, host)
        if fd is None:
            continue
        try:
            node_dir = lock.with_suffix("")
            shutil.rmtree(node_dir, ignore_errors=True)
            if not node_dir.exists():
                lock.unlink(missing_ok=True)
                removed.append(str(node_dir))
        finally:
            os.close(fd)
        with contextlib.suppress(OSError):
            lock.parent.rmdir()  # the run's last node directory on this disk
    return removed


def holds_node_cache(cache_root: str, run_id: str, node: int) -> bool:
    """This process holds the lock of <cache_root>/<run_id>/node<node> (claim_node_cache)."""
    return _holds(lock_path(cache_root, run_id, node))


def claim_node_cache(cache_root: str, run_id: str, node: int) -> list[str]:
    """The local leader's start-up: hold <cache_root>/<run_id>/node<node>.lock for the life
    of this process and remove stale node directories of earlier jobs. Returns the
    directories removed. Raises ValueError (one line) when another live job holds this
    run's directory on this node."""
    root = Path(cache_root)
    root.mkdir(parents=True, exist_ok=True)
    try:
        with _root_lock(root):
            _claim(lock_path(cache_root, run_id, node))
            return clean_stale(cache_root, run_id)
    except OSError as e:
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.EACCES, errno.EROFS):
            raise
        warnings.warn(f"data.cache_root={cache_root}: cannot lock files there ({e.strerror}); stale cache "
                      "directories of earlier jobs are not removed", stacklevel=2)
        return []
