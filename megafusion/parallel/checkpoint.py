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
"""
from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

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


def _write_latest(ckpt_dir: Path, tag: str) -> None:
    tmp = Path(ckpt_dir) / f".{LATEST}.tmp"
    tmp.write_text(tag)
    os.replace(tmp, Path(ckpt_dir) / LATEST)


def client_path(ckpt_dir: Path, tag: str, rank: int) -> Path:
    return Path(ckpt_dir) / tag / f"megafusion_client_rank{rank:05d}.pt"


def save(engine, ckpt_dir: Path, step: int, client: dict, keep_last: int) -> str:
    """Save on every rank; returns the tag. `client` is this rank's own state."""
    ckpt_dir = Path(ckpt_dir)
    tag = tag_for(step)
    rank = dist.get_rank() if dist.is_initialized() else 0
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step}, save_latest=False,
                           exclude_frozen_parameters=True)
    state = dict(client, step=step, rng=rng_state())
    tmp = client_path(ckpt_dir, tag, rank).with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, client_path(ckpt_dir, tag, rank))
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        _write_latest(ckpt_dir, tag)
        _prune(ckpt_dir, keep_last, keep=tag)
    if dist.is_initialized():
        dist.barrier()
    return tag


def _prune(ckpt_dir: Path, keep_last: int, keep: str) -> None:
    if keep_last <= 0:
        return
    tags = sorted((int(m.group(1)), p.name) for p in ckpt_dir.iterdir()
                  if p.is_dir() and (m := TAG_RE.match(p.name)))
    for _, name in tags[:-keep_last]:
        if name != keep:
            shutil.rmtree(ckpt_dir / name, ignore_errors=True)


def load_latest(engine, ckpt_dir: Path, world_size: int) -> dict | None:
    """Restore the newest complete checkpoint; returns this rank's client state."""
    ckpt_dir = Path(ckpt_dir)
    tag = read_latest(ckpt_dir)
    if tag is None:
        return None
    rank = dist.get_rank() if dist.is_initialized() else 0
    cpath = client_path(ckpt_dir, tag, rank)
    if not cpath.is_file():
        n = len(list((ckpt_dir / tag).glob("megafusion_client_rank*.pt")))
        raise SystemExit(f"error: checkpoint {ckpt_dir / tag} was written by {n} ranks, this run has {world_size}; "
                         "a ZeRO checkpoint resumes at the same world size (convert it with ds_to_universal to change it)")
    load_path, _ = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_module_strict=False,
                                          load_optimizer_states=True, load_lr_scheduler_states=True)
    if load_path is None:
        raise SystemExit(f"error: DeepSpeed could not load checkpoint {ckpt_dir / tag}")
    client = torch.load(cpath, weights_only=False)
    return client
