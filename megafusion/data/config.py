"""Configuration of the data pipeline (the `data` section of a run config).

Standard library only, like megafusion/model/config.py, so the run-config loader can
build it from YAML: `train` and `val` are a shard location (local directory or an
object-store URL streaming understands: s3://, gs://, oci://, ...) or a list of streams
`{remote: ..., proportion: ...}` mixed by proportion.
"""
from __future__ import annotations

import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from typing import Any


@dataclass
class StreamSpec:
    # Shard location: a local directory or a URL (s3://bucket/path, gs://...).
    remote: str
    # Share of each epoch drawn from this stream (streaming's Stream(proportion=...));
    # None: its natural size. Proportions of all streams need not sum to 1.
    proportion: float | None = None
    # Name of its cache subdirectory; default: derived from `remote`.
    name: str | None = None


def _as_streams(value: Any, what: str) -> list[StreamSpec]:
    if value is None or value == "":
        return []
    if isinstance(value, (str, os.PathLike)):
        return [StreamSpec(remote=str(value))]
    if isinstance(value, StreamSpec):
        return [value]
    if isinstance(value, dict):
        value = [value]
    out = []
    for i, item in enumerate(value):
        if isinstance(item, StreamSpec):
            out.append(item)
        elif isinstance(item, (str, os.PathLike)):
            out.append(StreamSpec(remote=str(item)))
        elif isinstance(item, dict):
            unknown = set(item) - {"remote", "proportion", "name"}
            if unknown or "remote" not in item:
                raise ValueError(f"data.{what}[{i}]: expected keys remote, proportion, name; got {sorted(item)}")
            out.append(StreamSpec(**item))
        else:
            raise ValueError(f"data.{what}[{i}]: expected a location or a {{remote, proportion}} mapping, got {type(item).__name__}")
    return out


def _check_proportions(streams: list[StreamSpec], what: str) -> None:
    """Proportions are numbers > 0, given for every stream or for none (streaming's rule)."""
    for i, s in enumerate(streams):
        p = s.proportion
        if p is None:
            continue
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or p <= 0:
            raise ValueError(f"data.{what}[{i}].proportion={p!r} must be a number > 0 (or left out)")
    given = [i for i, s in enumerate(streams) if s.proportion is not None]
    if given and len(given) < len(streams):
        missing = next(i for i, s in enumerate(streams) if s.proportion is None)
        raise ValueError(f"data.{what}[{missing}].proportion is missing while data.{what}[{given[0]}] has one: "
                         "give every stream a proportion or none")


@dataclass
class DataConfig:
    # Training shards: a location, or a list of streams (see StreamSpec).
    train: Any = ""
    # Held-out shards for evaluation (same forms); None: no validation data.
    val: Any = None

    # Every stream, a URL or a local directory, is read through a node-local cache
    # directory: <cache_root>/<run_id>/node<N>/<stream name>. One directory per node and
    # run keeps concurrent runs and the ranks of other nodes (on a shared filesystem)
    # apart. Local directories are copied too: the shards are zstd-compressed and
    # streaming decompresses next to what it reads, and under cache_limit it evicts by
    # deleting files, which must never be the source's. At start-up each node removes the
    # cache directories of this host's finished jobs (megafusion/data/cache.py).
    cache_root: str = field(default_factory=lambda: os.path.join(tempfile.gettempdir(), "megafusion-streaming"))
    # Same on every rank of a run and stable across restarts of it (so a requeued job
    # reuses its cache). None: $MEGAFUSION_RUN_ID, else $SLURM_JOB_ID, else "default".
    run_id: str | None = None
    # Most disk one dataset's cache takes on a node (train and val have one each): a size
    # in streaming's units ("100gb", "500mb"; an integer is bytes), or null for no bound.
    # Beyond it streaming evicts the least recently used shards and downloads them again
    # when needed; it must hold at least 4 of the largest shards (raw + compressed), and
    # for speed the shards in use at once: about num_canonical_nodes / nodes + predownload
    # worth of them per node.
    cache_limit: str | int | None = "100gb"

    # Packed sequence length and packed rows per rank per step (PackedBatch's B, L).
    seq_len: int = 4096
    batch_size: int = 1
    # Samples each rank consumes per step (fixed, which is what makes resume exact). None:
    # as many as the step's token budget, batch_size * seq_len, holds: derived at start-up
    # from samples of the first shard of each stream, built as training builds them and
    # weighted by the streams' shares, then checked by simulating the packer (an image is
    # never split, so rows leave gaps), so that a text stream of long documents mixed with
    # short image-caption samples is packed, not mostly dropped (packing.py). (Before any
    # shard is read, tools that need a number assume image-caption samples of
    # tokens_per_image + 3 + text_tokens_estimate tokens.)
    samples_per_step: int | None = None
    text_tokens_estimate: int = 32
    # Documents that do not fit in their step wait for the next ones, up to this many
    # steps' worth of tokens (x batch_size x seq_len); beyond it they are dropped and
    # counted. 0: drop at once.
    overflow_carry_steps: int = 8

    # Image-caption samples: caption then image (generation) with this probability,
    # else image then caption (understanding, the image is a condition).
    generation_ratio: float = 0.8
    # Share of generation samples whose caption is replaced by the empty prompt
    # (classifier-free guidance).
    caption_drop: float = 0.1
    # Captions longer than this many tokens are cut (None: only seq_len limits them).
    max_caption_tokens: int | None = None

    # Token ids that open and close every document; None: from the tokenizer
    # (see megafusion.data.text_special_ids).
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    # Reading.
    num_workers: int = 2
    prefetch_factor: int | None = None
    seed: int = 0
    shuffle: bool = True
    shuffle_algo: str = "py1e"
    shuffle_block_size: int | None = None
    # streaming's canonical nodes: the sample order of an epoch is a function of this and
    # the seed, not of the number of nodes or ranks reading it, so a run restarted or
    # resumed on another number of nodes sees the same samples. Fixed here because
    # streaming's default is the node count of the first run. Every node count the run
    # will use must divide it or be a multiple of it: 64 serves 1, 2, 4, ... 64 nodes and
    # multiples of 64. A stream with fewer samples than this gets the largest divisor
    # that it can fill (toy data only). A checkpoint's loader state carries its own value,
    # which wins. null: streaming's default, the node count of the first run.
    num_canonical_nodes: int | None = 64
    predownload: int | None = None
    epoch_size: int | None = None
    # Use pre-encoded `latents` when every image stream has them and the model runs in
    # VAE space; otherwise images are decoded to pixels and the model encodes them.
    use_latents: bool = True

    def train_streams(self) -> list[StreamSpec]:
        return _as_streams(self.train, "train")

    def val_streams(self) -> list[StreamSpec]:
        return _as_streams(self.val, "val")

    def validate(self, require_train: bool = True) -> None:
        if require_train and not self.train_streams():
            raise ValueError("data.train is empty: give a shard location (directory or URL) or a list of streams")
        _check_proportions(self.train_streams(), "train")
        _check_proportions(self.val_streams(), "val")
        for name in ("seq_len", "batch_size", "text_tokens_estimate"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"data.{name}={getattr(self, name)} must be >= 1")
        if self.samples_per_step is not None and self.samples_per_step < 1:
            raise ValueError(f"data.samples_per_step={self.samples_per_step} must be >= 1 (or null for auto)")
        for name in ("generation_ratio", "caption_drop"):
            v = float(getattr(self, name))
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"data.{name}={v} outside [0, 1]")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers={self.num_workers} must be >= 0")
        if self.seed < 0:
            raise ValueError(f"data.seed={self.seed} must be >= 0")
        if self.max_caption_tokens is not None and self.max_caption_tokens < 0:
            raise ValueError(f"data.max_caption_tokens={self.max_caption_tokens} must be >= 0")
        if self.overflow_carry_steps < 0:
            raise ValueError(f"data.overflow_carry_steps={self.overflow_carry_steps} must be >= 0")
        if self.num_canonical_nodes is not None and self.num_canonical_nodes < 1:
            raise ValueError(f"data.num_canonical_nodes={self.num_canonical_nodes} must be >= 1 (or null)")
        if self.cache_limit is not None and parse_size(self.cache_limit) is None:
            raise ValueError(f"data.cache_limit={self.cache_limit!r}: expected a size such as 100gb or 500mb "
                             "(units b, kb, mb, gb, tb), a number of bytes, or null")


_UNITS = {"b": 1, "kb": 1 << 10, "mb": 1 << 20, "gb": 1 << 30, "tb": 1 << 40, "pb": 1 << 50}


def parse_size(value) -> int | None:
    """Bytes of a size in streaming's notation ("100gb": binary units), None if invalid."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value > 0 else None
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([kmgtp]?b)?\s*", str(value).lower())
    if not m:
        return None
    size = int(float(m.group(1)) * _UNITS[m.group(2) or "b"])
    return size if size > 0 else None
