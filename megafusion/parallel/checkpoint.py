"""Checkpoints in DeepSpeed's layout under <run.dir>/checkpoints/.

- The frozen text tower is not stored (exclude_frozen_parameters): it is reloaded from
  the base model at every start, which halves a checkpoint.
- Every rank writes its own client file (step, data-loader state, its RNG states) into
  the tag directory; DeepSpeed's client_state lives in one file per model-parallel rank
  and would keep only one rank's RNG.
- `latest` is written by us, not by DeepSpeed: DeepSpeed's rank 0 writes it before the
  other ranks have finished, so a crash at that moment leaves a `latest` that names a
  half-written checkpoint. Here it moves (atomic rename) only after a barrier that every
  rank reaches once its files are on disk.
- "On disk" means fsynced: each rank fsyncs the files it wrote (DeepSpeed's, through its
  checkpoint engine, and its client file), rank 0 the tag directory, then `latest` moves
  and the checkpoints directory is fsynced. Without that a power loss or node crash can
  leave a durable `latest` naming files whose data never reached the disk.
- A tag directory newer than `latest` is a save that never finished (every rank killed
  mid-save): it is removed at the next start and never counted towards keep_last. A
  save never removes a checkpoint that `latest` covered before it moved, whatever its
  step: only the torn ones are newer than the `latest` a save replaces.
- A `latest` that names a checkpoint that is not there (deleted by hand, a partial copy
  of a run directory) is a one-line error at the start, never a fresh start (whose first
  save would move `latest` back to a low step). So is a missing `latest` beside a
  complete checkpoint (every rank's client file, the count in rank 0's): `latest` was
  removed by hand, and the directories are not a first save that every rank died in.
- The client file records the trainable parameters' names and shapes: a run restarted
  in the same run.dir with a config that builds another model is refused in one line
  before DeepSpeed meets a tensor of the wrong size.
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megafusion.parallel import elastic

LATEST = "latest"
TAG_RE = re.compile(r"^global_step(\d+)$")


def tag_for(step: int) -> str:
    return f"global_step{step}"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore rng_state()'s result, or seed every generator from {"seed": n} (a resume
    at another world size, megafusion/parallel/elastic.py)."""
    if "seed" in state:
        n = int(state["seed"])
        random.seed(n)
        np.random.seed(n % 2**32)
        torch.manual_seed(n)  # and every CUDA device's
        return
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def read_latest(ckpt_dir: Path) -> str | None:
    """The tag named by `latest`, if it names a directory that exists."""
    path = Path(ckpt_dir) / LATEST
    if not path.is_file():
        return None
    tag = path.read_text().strip()
    return tag if tag and (Path(ckpt_dir) / tag).is_dir() else None


def latest_tag(ckpt_dir: Path) -> str | None:
    """The tag `latest` names; None when there is no `latest` (nothing to resume). Exits
    with one line when `latest` is there but unreadable, or names a directory that is
    missing or holds no client file (not a complete checkpoint of this trainer)."""
    ckpt_dir = Path(ckpt_dir)
    path = ckpt_dir / LATEST
    if not path.exists():
        complete = [name for _, name in _tags(ckpt_dir)] if ckpt_dir.is_dir() else []
        complete = [name for name in complete if _complete(ckpt_dir / name)]
        if complete:
            raise SystemExit(f"error: {ckpt_dir} has no {LATEST} file but holds complete checkpoints (the newest "
                             f"{complete[-1]}); if {LATEST} was removed, write the tag to resume from into {path}, "
                             "or give this run a new run.dir")
        return None
    names = [name for _, name in _tags(ckpt_dir)]
    present = ", ".join(names[-4:]) or "none"
    if len(names) > 4:
        present = f"{len(names)}, the newest {present}"
    fix = (f"point {path} at a complete checkpoint (global_step* directories there: {present}), "
           "or give this run a new run.dir")
    try:
        tag = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise SystemExit(f"error: cannot read {path} ({getattr(exc, 'strerror', None) or type(exc).__name__}); "
                         f"{fix}") from None
    if _step_of(tag) is None:
        raise SystemExit(f"error: {path} holds {tag[:80]!r}, not a global_step<N> tag; {fix}")
    if not (ckpt_dir / tag).is_dir():
        raise SystemExit(f"error: {path} names {tag}, but {ckpt_dir / tag} does not exist; restore it, or {fix}")
    if not client_path(ckpt_dir, tag, 0).is_file():
        raise SystemExit(f"error: {path} names {tag}, but {ckpt_dir / tag} has no {client_path(ckpt_dir, tag, 0).name} "
                         f"(not a complete checkpoint); restore it, or {fix}")
    return tag


def _complete(tag_dir: Path) -> bool:
    """Every rank that saved wrote its client file, the last file each rank writes
    before the barrier that precedes moving `latest`; rank 0's records how many ranks
    saved (a checkpoint from before that was recorded counts as complete when rank 0's
    is there: kept rather than removed)."""
    first = client_path(tag_dir.parent, tag_dir.name, 0)
    if not first.is_file():
        return False
    try:
        world = torch.load(first, weights_only=False).get("world_size")
    except Exception:  # noqa: BLE001 (written whole by a rename, so damaged later: kept for a person to look at)
        return True
    return world is None or all(client_path(tag_dir.parent, tag_dir.name, r).is_file() for r in range(world))


def check_resume(ckpt_dir: Path, resume: str) -> None:
    """Before anything is built: run.resume=never refuses a run directory that holds
    checkpoints (a fresh start there would overwrite and prune them); otherwise a
    `latest` that cannot be resumed from is refused (latest_tag)."""
    ckpt_dir = Path(ckpt_dir)
    if resume == "never" and (ckpt_dir / LATEST).exists():
        try:
            named = (ckpt_dir / LATEST).read_text().strip()[:80]
        except (OSError, UnicodeDecodeError):
            named = "?"
        raise SystemExit(f"error: run.resume=never, but {ckpt_dir} holds checkpoints ({LATEST}: {named!r}); "
                         "give this run a new run.dir, or resume it with run.resume=auto")
    latest_tag(ckpt_dir)


def _step_of(tag: str) -> int | None:
    m = TAG_RE.match(tag)
    return int(m.group(1)) if m else None


def _fsync(path: Path) -> None:
    """Flush a file's data, or a directory's entries, to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_latest(ckpt_dir: Path, tag: str) -> None:
    tmp = Path(ckpt_dir) / f".{LATEST}.tmp"
    with open(tmp, "w") as f:
        f.write(tag)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, Path(ckpt_dir) / LATEST)
    _fsync(Path(ckpt_dir))  # the rename itself survives a crash only once its directory is synced


@contextlib.contextmanager
def _recording_writes(engine):
    """Paths DeepSpeed writes on this rank while inside: every file of a save goes
    through engine.checkpoint_engine.save(state_dict, path)."""
    written: list[str] = []
    ce = getattr(engine, "checkpoint_engine", None)
    if ce is None or not hasattr(ce, "save"):
        yield None  # unknown engine: the caller syncs the whole tag directory
        return
    original, own = ce.save, "save" in vars(ce)

    def save(state_dict, path, *args, **kwargs):
        result = original(state_dict, path, *args, **kwargs)
        written.append(str(path))
        return result

    ce.save = save
    try:
        yield written
    finally:
        if own:
            ce.save = original
        else:
            del ce.save  # back to the class's method


def _hold_for_test(step: int, rank: int) -> None:
    """Test hook: MEGAFUSION_TEST_HOLD_SAVE=STEP:DIR makes the save of STEP stop after
    DeepSpeed's files and before this rank's client file (a torn checkpoint): the rank
    touches DIR/held.rank<R> and waits until DIR/release exists (tests kill it there)."""
    spec = os.environ.get("MEGAFUSION_TEST_HOLD_SAVE", "")
    if not spec:
        return
    at, _, where = spec.partition(":")
    if int(at) != step:
        return
    where = Path(where)
    (where / f"held.rank{rank}").touch()
    print(f"[rank {rank}] test hook: holding the save of step {step} open", file=sys.stderr, flush=True)
    while not (where / "release").exists():
        time.sleep(0.1)


def client_path(ckpt_dir: Path, tag: str, rank: int) -> Path:
    return Path(ckpt_dir) / tag / f"megafusion_client_rank{rank:05d}.pt"


def trainable_shapes(module) -> dict[str, list[int]]:
    """Name -> full shape of every trainable parameter (ZeRO-3's ds_shape where the
    parameter is partitioned)."""
    return {name: list(getattr(p, "ds_shape", p.shape)) for name, p in module.named_parameters() if p.requires_grad}


def check_same_model(engine, tag_dir: Path, rank: int) -> None:
    """Refuse, in one line, a checkpoint whose trainable parameters differ from this
    model's (checkpoints written before the shapes were recorded are not checked). A rank
    reads its own client file: a pipeline stage holds only its own layers. One written by
    another number of ranks (a ZeRO run, where every rank names the whole model) has
    rank 0's."""
    own = client_path(tag_dir.parent, tag_dir.name, rank)
    path = own if own.is_file() else client_path(tag_dir.parent, tag_dir.name, 0)
    saved = torch.load(path, weights_only=False).get("trainable_shapes")
    if saved is None:
        return
    here = trainable_shapes(engine.module)
    differ = sorted(n for n in saved.keys() | here.keys() if saved.get(n) != here.get(n))
    if differ:
        n = differ[0]
        there_s = "absent" if n not in saved else tuple(saved[n])
        here_s = "absent" if n not in here else tuple(here[n])
        raise SystemExit(f"error: checkpoint {tag_dir} holds another model: {n} is {there_s} there and {here_s} "
                         f"in this config ({len(differ)} trainable parameters differ); resume with the config it "
                         "was trained with, or give this run a new run.dir")


def save(engine, ckpt_dir: Path, step: int, client: dict, keep_last: int) -> str:
    """Save on every rank; returns the tag. `client` is this rank's own state."""
    ckpt_dir = Path(ckpt_dir)
    tag = tag_for(step)
    rank = dist.get_rank() if dist.is_initialized() else 0
    with _recording_writes(engine) as written:
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step}, save_latest=False,
                               exclude_frozen_parameters=True)
    _hold_for_test(step, rank)
    state = dict(client, step=step, rng=rng_state(), trainable_shapes=trainable_shapes(engine.module),
                 world_size=dist.get_world_size() if dist.is_initialized() else 1)
    tmp = client_path(ckpt_dir, tag, rank).with_suffix(".tmp")
    torch.save(state, tmp)
    _fsync(tmp)
    os.replace(tmp, client_path(ckpt_dir, tag, rank))
    # Each rank syncs what it wrote: on a cluster filesystem a file's dirty pages live on
    # the node that wrote it, and another node's fsync does not reach them.
    if written is None:
        written = [p for p in (ckpt_dir / tag).rglob("*") if p.is_file()]
    for path in written:
        _fsync(Path(path))
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        _fsync(ckpt_dir / tag)  # the entries of every rank's files (created, renamed)
        previous = _previous_latest(ckpt_dir)
        _write_latest(ckpt_dir, tag)
        _prune(ckpt_dir, keep_last, keep=tag, previous=previous)
    if dist.is_initialized():
        dist.barrier()
    return tag


def _tags(ckpt_dir: Path) -> list[tuple[int, str]]:
    return sorted((int(m.group(1)), p.name) for p in ckpt_dir.iterdir()
                  if p.is_dir() and (m := TAG_RE.match(p.name)))


def remove_torn(ckpt_dir: Path) -> list[str]:
    """Remove tag directories whose save never finished: those newer than `latest` (or,
    when no `latest` was ever written, the incomplete ones: a complete one there means
    `latest` was removed, which latest_tag refuses). Rank 0 only, before anything reads
    them. Returns the removed tags. A `latest` naming a missing directory is left for
    a person to look at: nothing is removed then."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    if (ckpt_dir / LATEST).is_file():
        tag = read_latest(ckpt_dir)
        if tag is None or _step_of(tag) is None:
            return []
        newest = _step_of(tag)
    else:
        newest = -1
    torn = [name for step, name in _tags(ckpt_dir) if step > newest and (newest >= 0 or not _complete(ckpt_dir / name))]
    for name in torn:
        shutil.rmtree(ckpt_dir / name, ignore_errors=True)
    if torn:
        _fsync(ckpt_dir)
    return torn


def _previous_latest(ckpt_dir: Path) -> float:
    """The step `latest` names before a save moves it: -1 without a `latest` (every tag
    directory there is a torn first save), infinity when it cannot be read (then no
    newer directory counts as torn)."""
    path = Path(ckpt_dir) / LATEST
    if not path.exists():
        return -1
    try:
        step = _step_of(path.read_text().strip())
    except (OSError, UnicodeDecodeError):
        step = None
    return math.inf if step is None else step


def _prune(ckpt_dir: Path, keep_last: int, keep: str, *, previous: float) -> None:
    """Called right after `latest` moved to `keep`. previous: the step `latest` named
    before (_previous_latest). A directory newer than both is a torn leftover, removed
    and not counted; one newer than `keep` but covered by the previous `latest` is a
    complete checkpoint and is never removed here (a run must not go back to a lower
    step in its directory; the trainer refuses to, this is the last guard). Of the
    complete ones up to `keep`, the keep_last newest stay."""
    newest = _step_of(keep)
    tags = _tags(ckpt_dir)
    complete = [name for step, name in tags if step <= newest]
    doomed = [name for step, name in tags if step > newest and step > previous]
    spared = [name for step, name in tags if newest < step <= previous]
    if spared:
        print(f"warning: {ckpt_dir} holds complete checkpoints newer than {keep}, which {LATEST} now names: "
              f"{', '.join(spared)}; they are kept", file=sys.stderr, flush=True)
    if keep_last > 0:
        doomed += [name for name in complete[:-keep_last] if name != keep]
    for name in doomed:
        shutil.rmtree(ckpt_dir / name, ignore_errors=True)
    # A universal conversion served one resume at a new world size; this save replaces it.
    shutil.rmtree(ckpt_dir / elastic.UNIVERSAL, ignore_errors=True)


def load_latest(engine, ckpt_dir: Path, world_size: int, resize: tuple[str, int] | None = None,
                seed: int = 0) -> dict | None:
    """Restore the newest complete checkpoint; returns this rank's client state.
    resize: elastic.resume_plan's (tag, old world size) when that checkpoint was written
    by another number of ranks: it is loaded through a universal checkpoint (the engine
    was built with checkpoint.load_universal)."""
    ckpt_dir = Path(ckpt_dir)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        for name in remove_torn(ckpt_dir):
            print(f"removed incomplete checkpoint {ckpt_dir / name} (newer than {LATEST}: its save never finished)",
                  flush=True)
    if dist.is_initialized():
        dist.barrier()
    tag = latest_tag(ckpt_dir)  # one line, not a fresh start, when `latest` names nothing loadable
    if tag is None:
        return None
    check_same_model(engine, ckpt_dir / tag, rank)
    load_dir, load_tag = ckpt_dir, tag
    if resize is not None:
        assert resize[0] == tag, (resize, tag)
        folder = elastic.convert(ckpt_dir, tag, rank)
        load_dir, load_tag = folder.parent, folder.name
    else:
        cpath = client_path(ckpt_dir, tag, rank)
        if not cpath.is_file():
            raise SystemExit(f"error: checkpoint {ckpt_dir / tag} was written by {elastic.saved_world(ckpt_dir / tag)} "
                             f"ranks, this run has {world_size}")
    load_path, _ = engine.load_checkpoint(str(load_dir), tag=load_tag, load_module_strict=False,
                                          load_optimizer_states=True, load_lr_scheduler_states=True)
    if load_path is None:
        raise SystemExit(f"error: DeepSpeed could not load checkpoint {Path(load_dir) / load_tag}")
    if resize is not None:
        return elastic.merged_client(ckpt_dir / tag, resize[1], rank, world_size, seed)
    client = torch.load(cpath, weights_only=False)
    return client
