"""Shared fixtures of the data tests: the real SmolLM2 tokenizer and small synthetic shards."""
from __future__ import annotations

import pytest
from mf_data_helpers import IMAGE_SIZE, RUNS

from megafusion.data.config import DataConfig
from megafusion.data.prepare import write_synthetic
from megafusion.model.config import FusionConfig


@pytest.fixture(scope="session")
def tokenizer():
    from megafusion.model.loading import load_tokenizer

    return load_tokenizer("smollm2")


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "synthetic"
    write_synthetic(str(out), 400, IMAGE_SIZE, seed=7, shard_size=1 << 15)  # several shards
    return str(out)


@pytest.fixture
def fusion_cfg():
    return FusionConfig(image_size=IMAGE_SIZE)


@pytest.fixture
def make_cfg(tmp_path):
    """DataConfig with its own cache directory, so every loader has fresh local dirs."""

    def make(train, **kw):
        kw.setdefault("cache_root", str(tmp_path / "cache"))
        kw.setdefault("run_id", f"test{next(RUNS)}")
        kw.setdefault("num_workers", 0)
        return DataConfig(train=train, **kw)

    return make
