"""Throughput of the whole reading path: shards -> decode -> tokenise -> pack -> TrainBatch.

loader_samples_per_s() measures image-caption rows per second on one rank over synthetic
shards (written to a temporary directory unless `data_dir` is given); tools/bench.py
reports it beside the model's step times.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time


def loader_samples_per_s(data_dir: str | None = None, *, num_samples: int = 2048, image_size: int = 32,
                         seq_len: int = 2048, batch_size: int = 1, tokens_per_image: int | None = None,
                         num_workers: int = 0, warmup_steps: int = 3, tokenizer=None) -> float:
    """Rows per second through build_train_loader over one epoch of num_samples rows.

    Synthetic shards of num_samples rows are written to a temporary directory unless
    data_dir is given (then the epoch is num_samples rows drawn from it). tokens_per_image
    defaults to the linear patcher's (image_size / 2) ** 2. The first warmup_steps batches
    (worker start, copying shards into the cache) are not timed. The epoch is read to its
    end so that streaming's download threads are done before the cache is deleted.
    """
    from megafusion.model.config import FusionConfig

    from .config import DataConfig
    from .dist_env import DistEnv
    from .loader import build_train_loader
    from .prepare import write_synthetic

    if tokenizer is None:
        from megafusion.model.loading import load_tokenizer

        tokenizer = load_tokenizer("smollm2")
    tokens_per_image = tokens_per_image or (image_size // 2) ** 2
    tmp = tempfile.mkdtemp(prefix="megafusion-bench-")
    try:
        if data_dir is None:
            data_dir = os.path.join(tmp, "shards")
            write_synthetic(data_dir, num_samples, image_size, seed=0)
        cfg = DataConfig(train=data_dir, cache_root=os.path.join(tmp, "cache"), run_id="bench",
                         seq_len=seq_len, batch_size=batch_size, num_workers=num_workers, seed=0,
                         epoch_size=num_samples)
        fusion = FusionConfig(image_size=image_size)
        loader = build_train_loader(cfg, fusion, tokenizer, tokens_per_image, DistEnv(0, 1, 0, 1))
        batches = iter(loader)
        for _ in range(warmup_steps):
            next(batches)
        rows, start = 0, time.perf_counter()
        for batch in batches:
            rows += batch.num_samples
        elapsed = time.perf_counter() - start
        del batches, loader
        return rows / elapsed if elapsed > 0 else float("inf")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
