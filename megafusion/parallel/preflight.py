"""Checks that fail fast with one line, before any rank loads a model or joins a
process group: a bad base model, missing data, impossible parallelism."""
from __future__ import annotations

import sys
from pathlib import Path

from megafusion.config import RunConfig


def _fail(msg: str):
    print(f"error: {msg}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def _is_url(loc: str) -> bool:
    return "://" in loc


def _stream_locations(value, what: str = "train") -> list[str]:
    from megafusion.data.config import _as_streams

    return [s.remote for s in _as_streams(value, what)]


def _launch_world_size(cfg: RunConfig) -> int:
    """The number of ranks before setup_environment: the launchers' WORLD_SIZE, or srun's
    task count (megafusion/data/dist_env.py resolves them in the same order). A value
    that is not a number is left to setup_environment, which names it."""
    import os

    try:
        return int(os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or 1)
    except ValueError:
        return cfg.parallel.pipeline_stages


def _check_ds_config(cfg: RunConfig) -> None:
    """The DeepSpeed dict the trainer will build (megafusion/parallel/ds_config.py): an
    invalid JSON, a key the run config owns, a world size that is not a multiple of
    parallel.pipeline_stages."""
    from megafusion.config import ConfigError
    from megafusion.parallel.ds_config import deepspeed_config

    try:
        deepspeed_config(cfg, _launch_world_size(cfg))
    except ConfigError as exc:
        _fail(str(exc).splitlines()[0])


def _check_shards(cfg: RunConfig, what: str) -> None:
    try:
        locations = _stream_locations(getattr(cfg.data, what), what)
    except ValueError as exc:
        _fail(str(exc).splitlines()[0])
    if what == "train" and not locations:
        _fail("data.train is empty: give a shard directory or URL (python tools/prepare_data.py ... --out DIR)")
    for loc in locations:
        if _is_url(loc):
            continue
        if not (Path(loc).expanduser() / "index.json").is_file():
            _fail(f"data.{what}={loc}: no MDS shards there (no index.json); write them with tools/prepare_data.py")


def _reads_val(cfg: RunConfig) -> bool:
    """Whether the run will read data.val: validation (not run with pipeline stages), or
    the held-out captions and shape scores of training samples."""
    lg = cfg.log
    if cfg.parallel.pipeline_stages > 1:
        return False
    return bool(lg.val_every) or bool(lg.sample_every and (lg.sample_captions or lg.sample_eval_n))


def preflight(cfg: RunConfig) -> None:
    p = cfg.parallel
    if p.pipeline_stages > 1 and p.zero_stage >= 2:
        _fail(f"parallel.pipeline_stages={p.pipeline_stages} with parallel.zero_stage={p.zero_stage}: DeepSpeed's "
              "pipeline engine supports ZeRO-1 only; set parallel.zero_stage=1 (ds_configs/pipeline_zero1.json) "
              "or parallel.pipeline_stages=1 for ZeRO-3")
    _check_ds_config(cfg)
    _check_zero_plus_plus(cfg)
    if cfg.model.fused_rmsnorm == "apex":
        from megafusion.model.fused_norm import apex_rmsnorm_class

        try:
            apex_rmsnorm_class()
        except ValueError as exc:
            _fail(str(exc))
    from megafusion.model.loading import BaseModelError, is_vlm_base

    try:
        is_vlm_base(cfg.model.base)  # reads and checks the base's config (a Llama, or a LLaVA with its processor)
    except BaseModelError as exc:
        _fail(str(exc))

    _check_shards(cfg, "train")
    if _reads_val(cfg):  # else noticed only at the first validation, hours into a run
        _check_shards(cfg, "val")


QUANTIZED_KEYS = ("zero_quantized_weights", "zero_quantized_nontrainable_weights", "zero_quantized_gradients")


def _check_zero_plus_plus(cfg: RunConfig) -> None:
    """ZeRO++'s quantized collectives run on DeepSpeed's CUDAQuantizer: refuse them where
    the run will not have CUDA (DS_ACCELERATOR=cpu, or no GPU visible), rather than let
    the first gather fail inside DeepSpeed. Refuse zero_quantized_nontrainable_weights
    everywhere: it would do nothing to this model (tests/parallel/test_quantized_frozen.py)."""
    import json
    import os

    from megafusion.config import ds_config_path

    path = ds_config_path(cfg)
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:  # _check_ds_config has named a bad JSON already
        _fail(f"{path}: cannot read the DeepSpeed JSON ({str(exc).splitlines()[0]})")
    zero = raw.get("zero_optimization", {}) if isinstance(raw, dict) else {}
    zero = zero if isinstance(zero, dict) else {}
    if zero.get("zero_quantized_nontrainable_weights"):
        # DeepSpeed (0.19) quantizes a frozen weight only when its partition is made, i.e.
        # when it is born frozen inside zero.Init; the text tower is frozen after it is
        # built, so no partition would be int8 and no memory or traffic saved.
        _fail(f"parallel.ds_config={cfg.parallel.ds_config}: zero_quantized_nontrainable_weights quantizes nothing "
              "of megafusion's frozen text tower (DeepSpeed quantizes only weights frozen as their module is built "
              "under zero.Init; the tower is frozen afterwards); remove it, and use zero_quantized_weights (qwZ) "
              "to gather weights as int8")
    _check_hpz(cfg, zero)
    on = [k for k in QUANTIZED_KEYS if zero.get(k)]
    if not on:
        return
    if zero.get("zero_quantized_weights") and cfg.parallel.zero_stage == 3:
        _check_quantized_gathers(cfg, zero)
    import torch

    if os.environ.get("DS_ACCELERATOR", "cuda") == "cpu" or not torch.cuda.is_available():
        _fail(f"parallel.ds_config={cfg.parallel.ds_config}: {', '.join(on)} (ZeRO++) needs CUDA GPUs (DeepSpeed's "
              "CUDAQuantizer); on the CPU use ds_configs/zero3.json")


def _check_hpz(cfg: RunConfig, zero: dict) -> None:
    """ZeRO++ hpZ splits the ranks into groups of zero_hpz_partition_size consecutive
    ranks (a node's GPUs); DeepSpeed asserts at start-up when that does not divide the
    world size."""
    try:
        size = int(zero.get("zero_hpz_partition_size", 1))
    except (TypeError, ValueError):
        _fail(f"parallel.ds_config={cfg.parallel.ds_config}: zero_hpz_partition_size must be a whole number, "
              f"not {zero.get('zero_hpz_partition_size')!r}")
    ranks = _launch_world_size(cfg)
    if cfg.parallel.zero_stage == 3 and size > 1 and ranks % min(size, ranks):
        _fail(f"parallel.ds_config={cfg.parallel.ds_config}: zero_hpz_partition_size {size} (hpZ) does not divide "
              f"the {ranks} ranks; set it to the GPUs per node, or remove it")


def _check_quantized_gathers(cfg: RunConfig, zero: dict) -> None:
    """qwZ fails at the first gather when a rank's share of a parameter is not a multiple
    of 8 elements (megafusion/plan/quantized.py): refuse before the base is loaded."""
    import os

    from megafusion.plan.quantized import qwz_refusal
    from megafusion.plan.shapes import PlanError, model_shape

    # Before setup_environment: the launchers' WORLD_SIZE, or srun's task count
    # (megafusion/data/dist_env.py resolves them in the same order). ZeRO-3 has no
    # pipeline stages: every rank holds a share.
    ranks = int(os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or 1)
    try:
        shape = model_shape(cfg)
    except (PlanError, ValueError, OSError):
        return  # no readable base or VAE config: the checks below say so in their own words
    why = qwz_refusal(shape, ranks, int(zero.get("stage3_param_persistence_threshold", 100_000)))
    if why:
        _fail(f"parallel.ds_config={cfg.parallel.ds_config}: {why}; or remove zero_quantized_weights "
              "(tools/plan.py weighs the settings for a cluster)")

