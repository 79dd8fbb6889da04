"""Resuming a run on a different number of ranks (elastic resume).

A ZeRO checkpoint is cut into one optimizer partition per data-parallel rank, so it
loads only at the world size that wrote it. When the newest checkpoint was written by a
different number of ranks than this run has:

- rank 0 converts it once with DeepSpeed's own ds_to_universal (a subprocess; its log goes
  to <tag>.log beside the result) into <checkpoints>/universal/<tag>: one folder per
  parameter holding the whole fp32 master, Adam's two moments and the step; the engine is
  then built with checkpoint.load_universal and every rank slices its own partition out
  of that (DeepSpeed's load_hp_checkpoint_state). The frozen text tower is not in any
  checkpoint (exclude_frozen_parameters): it comes from the base, as at every start.
- the data position carries over: streaming's state holds the global sample count and
  data.num_canonical_nodes (fixed in the config), so the new ranks continue the same
  global sample order from the same place. The carried-over packing pieces of all the
  old ranks are dealt out to the new ones (piece i of the concatenation to rank
  i % world): each names its sample by global index, which any rank can rebuild, so no
  sample is lost or repeated.
- every rank's RNG is seeded afresh from (run.seed, step, rank): the old ranks' streams
  cannot be split or merged, and two ranks continuing one stream would draw the same
  noise.
- every optimizer parameter group keeps its own settings (keep_group_settings): DeepSpeed's
  ZeRO-3 universal load copies group 0's lr, weight_decay, betas, ... onto every group
  (deepspeed 0.19 stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3), which
  would decay the no-decay group (norms, biases) for the rest of the run and give the
  other towers the image tower's lr; ZeRO-1/2 restore each group from its own entry of
  the checkpoint, and so does megafusion under ZeRO-3 right after DeepSpeed's load.

The converted folder is removed by the next checkpoint save (checkpoint._prune): once the
run has saved at its new size it resumes from that exactly, as before.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist

UNIVERSAL = "universal"


def saved_world(tag_dir: Path) -> int:
    """The number of ranks that wrote a checkpoint (one client file each)."""
    return len(list(Path(tag_dir).glob("megafusion_client_rank*.pt")))


def universal_dir(ckpt_dir: Path, tag: str) -> Path:
    return Path(ckpt_dir) / UNIVERSAL / tag


def check_supported(zero_stage: int, pipeline_stages: int, tag_dir: Path, old: int, new: int) -> None:
    """One-line refusal where a universal checkpoint cannot carry the run over."""
    where = f"checkpoint {tag_dir} was written by {old} ranks, this run has {new}"
    if pipeline_stages > 1:
        raise SystemExit(f"error: {where}: a pipeline run resumes at the same world size only "
                         "(DeepSpeed's universal checkpoint needs Megatron's layer naming for pipeline stages)")
    if zero_stage not in (1, 2, 3):
        raise SystemExit(f"error: {where}: resuming at another world size needs ZeRO (parallel.zero_stage 1-3)")


def convert(ckpt_dir: Path, tag: str, rank: int, log=print) -> Path:
    """Rank 0 converts <ckpt_dir>/<tag> to a universal checkpoint (once: a finished
    conversion is reused); every rank returns its folder after a barrier."""
    out = universal_dir(ckpt_dir, tag)
    failure = [None]
    if rank == 0 and not converted(out):
        failure[0] = _run_conversion(Path(ckpt_dir) / tag, out, log)
    if dist.is_initialized():
        dist.broadcast_object_list(failure, src=0)
    if failure[0] is not None:
        raise SystemExit(failure[0])
    return out


def converted(out: Path) -> bool:
    """A finished conversion: ours appears whole (renamed from .partial), and one a person
    ran beforehand with ds_to_universal has its model-state files, written last."""
    return (out / "zero" / "optimizer_state.pt").is_file() and any(out.glob("*model_states.pt"))


def _run_conversion(src: Path, out: Path, log) -> str | None:
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    log_path = out.with_name(out.name + ".log")
    log(f"converting {src} ({saved_world(src)} ranks) to a universal checkpoint in {out} "
        f"(deepspeed.checkpoint.ds_to_universal; its log: {log_path})")
    workers = str(max(1, min(4, os.cpu_count() or 1)))
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(src),
           "--output_folder", str(tmp), "--num_extract_workers", workers, "--num_merge_workers", workers,
           "--inject_missing_state"]
    env = dict(os.environ)
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # a plain process, not a rank of this job
    with open(log_path, "w") as f:
        code = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if code != 0:
        return f"error: converting {src} to a universal checkpoint failed (exit {code}); see {log_path}"
    (tmp.parent / "latest_universal").unlink(missing_ok=True)  # ds_to_universal's; we name the folder ourselves
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return None


def resume_plan(ckpt_dir: Path, world: int, zero_stage: int, pipeline_stages: int) -> tuple[str, int] | None:
    """(tag, ranks that wrote it) when the newest checkpoint was written by another number
    of ranks than `world`, else None. Refuses (one line) where that cannot be resumed."""
    from megafusion.parallel.checkpoint import read_latest

    tag = read_latest(Path(ckpt_dir)) if Path(ckpt_dir).is_dir() else None
    if tag is None:
        return None
    old = saved_world(Path(ckpt_dir) / tag)
    if old in (0, world):
        return None
    check_supported(zero_stage, pipeline_stages, Path(ckpt_dir) / tag, old, world)
    return tag, old


def merged_client(tag_dir: Path, old_world: int, rank: int, world: int, seed: int) -> dict:
    """This rank's client state for a run of `world` ranks, from the `old_world` client
    files of a checkpoint (see the module docstring)."""
    from megafusion.parallel.checkpoint import client_path

    tag_dir = Path(tag_dir)
    olds = [torch.load(client_path(tag_dir.parent, tag_dir.name, r), weights_only=False) for r in range(old_world)]
    first = olds[0]
    loader = dict(first["loader"]) if first.get("loader") is not None else None
    if loader is not None:
        pieces = [p for old in olds for p in (old["loader"] or {}).get("carry", [])]
        loader["carry"] = pieces[rank::world]
    step = int(first["step"])
    return dict(first, loader=loader, rng={"seed": seed * 1_000_003 + step * 1_009 + rank}, resized_from=old_world)


def keep_group_settings(engine) -> None:
    """Make `engine.load_checkpoint` of a universal checkpoint restore every optimizer
    parameter group's own hyperparameters. Called where the engine is built with
    checkpoint.load_universal (the resize path only: a checkpoint loaded at the world size
    that wrote it goes through torch's Optimizer.load_state_dict, group by group)."""
    names = [g.get("name") for g in _base_optimizer(engine.optimizer).param_groups]
    real = engine.load_checkpoint

    def load_checkpoint(load_dir, tag=None, **kwargs):
        load_path, client = real(load_dir, tag=tag, **kwargs)
        if (load_path is not None and kwargs.get("load_optimizer_states", True)
                and not kwargs.get("load_module_only", False)):
            restore_group_settings(engine.optimizer, Path(load_path).parent, names)
        return load_path, client

    engine.load_checkpoint = load_checkpoint


def _base_optimizer(optimizer):
    """The torch optimizer inside DeepSpeed's ZeRO wrapper (or the optimizer itself)."""
    return getattr(optimizer, "optimizer", None) or optimizer


def restore_group_settings(optimizer, folder: Path, names: list) -> None:
    """Every key but 'params' of each parameter group from its own entry in the universal
    checkpoint `folder` (zero/optimizer_state.pt, which ds_to_universal writes with all
    the groups), as ZeRO-1/2's universal load does; the groups pair by position, which
    parameter_groups() keeps deterministic, and their names must agree. The lr restored
    is the one the scheduler set after the saved step, as at a same-size resume."""
    path = Path(folder) / "zero" / "optimizer_state.pt"
    try:  # mapped: only the small param_groups are read, not rank 0's moment partitions
        sd = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except RuntimeError:  # a file in torch's legacy (non-zip) format cannot be mapped
        sd = torch.load(path, map_location="cpu", weights_only=False)
    saved = sd.get("param_groups") or sd.get("optimizer_state_dict", {}).get("param_groups")
    groups = _base_optimizer(optimizer).param_groups
    saved_names = [g.get("name") for g in saved or []]
    if saved is None or saved_names != list(names) or len(saved) != len(groups):
        raise SystemExit(f"error: universal checkpoint {folder}: its optimizer parameter groups {saved_names} "
                         f"are not this run's {list(names)}")
    for group, own in zip(groups, saved):
        for key, value in own.items():
            if key != "params":
                group[key] = value
