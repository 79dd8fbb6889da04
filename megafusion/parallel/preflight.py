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


def _stream_locations(value) -> list[str]:
    from megafusion.data.config import _as_streams

    return [s.remote for s in _as_streams(value, "train")]


def preflight(cfg: RunConfig) -> None:
    p = cfg.parallel
    if p.pipeline_stages > 1 and p.zero_stage >= 2:
        _fail(f"parallel.pipeline_stages={p.pipeline_stages} with parallel.zero_stage={p.zero_stage}: DeepSpeed's "
              "pipeline engine supports ZeRO-1 only; set parallel.zero_stage=1 (ds_configs/pipeline_zero1.json) "
              "or parallel.pipeline_stages=1 for ZeRO-3")
    from megafusion.model.loading import BaseModelError, load_base_config

    try:
        load_base_config(cfg.model.base)
    except BaseModelError as exc:
        _fail(str(exc))
    try:
        locations = _stream_locations(cfg.data.train)
    except ValueError as exc:
        _fail(str(exc))
    if not locations:
        _fail("data.train is empty: give a shard directory or URL (python tools/prepare_data.py ... --out DIR)")
    for loc in locations:
        if _is_url(loc):
            continue
        if not (Path(loc).expanduser() / "index.json").is_file():
            _fail(f"data.train={loc}: no MDS shards there (no index.json); write them with tools/prepare_data.py")
