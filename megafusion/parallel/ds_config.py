"""The DeepSpeed config dict of a run: parallel.ds_config with the run config's values filled in.

The JSON holds only engine tuning (bucket sizes, prefetching, offload devices). Values the
run config owns (DS_OWNED) are filled in here and refused in the JSON; so are an optimizer
and a scheduler, which the trainer builds (separate learning rates for the two towers).
"""
from __future__ import annotations

import copy
import json

from megafusion.config import ConfigError, RunConfig, ds_config_path

# JSON keys (dotted paths) the run config owns: {path: run-config key that sets it}.
DS_OWNED = {
    "train_batch_size": "train.micro_batch_size x train.gradient_accumulation x data-parallel size",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.gradient_accumulation",
    "gradient_clipping": "train.grad_clip",
    "bf16.enabled": "train.dtype",
    "bfloat16.enabled": "train.dtype",
    "fp16.enabled": "train.dtype",
    "zero_optimization.stage": "parallel.zero_stage",
    "optimizer": "train.lr/betas/eps/weight_decay (the trainer builds the optimizer)",
    "scheduler": "train.warmup_steps/schedule/min_lr (the trainer builds the schedule)",
}


def _get_path(d: dict, dotted: str):
    node = d
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _strip_comments(value):
    if isinstance(value, dict):
        return {k: _strip_comments(v) for k, v in value.items() if not str(k).startswith("_")}
    if isinstance(value, list):
        return [_strip_comments(v) for v in value]
    return value


def deepspeed_config(cfg: RunConfig, world_size: int) -> dict:
    """The DeepSpeed config dict: parallel.ds_config with the run config's values filled in.

    `world_size` is the total number of ranks; the data-parallel size is world_size /
    parallel.pipeline_stages. Keys starting with "_" (comments) are dropped.
    """
    path = ds_config_path(cfg)
    try:
        raw = json.loads(path.read_text(), object_pairs_hook=_no_duplicates)
    except (json.JSONDecodeError, ValueError) as exc:
        raise ConfigError(f"{path}: invalid DeepSpeed JSON ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a DeepSpeed config must be a JSON object")
    for key, owner in DS_OWNED.items():
        if _get_path(raw, key) is not None:
            raise ConfigError(f"{path}: {key} is filled in from the run config ({owner}); remove it from the JSON")

    p, t = cfg.parallel, cfg.train
    if world_size < 1 or world_size % p.pipeline_stages:
        raise ConfigError(f"world size {world_size} is not a multiple of parallel.pipeline_stages={p.pipeline_stages}")
    data_parallel = world_size // p.pipeline_stages

    ds = _strip_comments(copy.deepcopy(raw))
    ds["train_micro_batch_size_per_gpu"] = t.micro_batch_size
    ds["gradient_accumulation_steps"] = t.gradient_accumulation
    ds["train_batch_size"] = t.micro_batch_size * t.gradient_accumulation * data_parallel
    ds["gradient_clipping"] = t.grad_clip
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": t.dtype == "bf16"}
    ds["fp16"] = {**ds.get("fp16", {}), "enabled": False}
    ds["zero_optimization"] = {**ds.get("zero_optimization", {}), "stage": p.zero_stage}
    # The trainer logs; DeepSpeed's own per-step prints would only duplicate it.
    ds.setdefault("steps_per_print", 2**31 - 1)
    return ds


def optimizer_offloaded(ds: dict) -> bool:
    """Whether a (filled-in) DeepSpeed config keeps optimizer states on the CPU; the
    trainer then builds DeepSpeedCPUAdam rather than torch.optim.AdamW."""
    device = _get_path(ds, "zero_optimization.offload_optimizer.device")
    return device not in (None, "none")


def _no_duplicates(pairs):
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {key!r}")
        seen[key] = value
    return seen
