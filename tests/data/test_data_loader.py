"""Loader construction: latents or pixels, resizing, clear errors, throughput."""
from __future__ import annotations

import pytest
from mf_data_helpers import IMAGE_SIZE, SINGLE, TOKENS_PER_IMAGE

from megafusion.data import build_train_loader
from megafusion.data.prepare import write_synthetic
from megafusion.model.config import FusionConfig


@pytest.fixture(scope="module")
def latent_shards(tmp_path_factory):
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=8)
    root = tmp_path_factory.mktemp("latents")
    vae.save_pretrained(root / "vae")
    write_synthetic(str(root / "shards"), 24, IMAGE_SIZE, seed=1, vae_path=str(root / "vae"))
    return root


def test_latents_when_model_is_in_vae_space(tokenizer, latent_shards, make_cfg):
    import numpy as np
    import torch

    fusion = FusionConfig(image_size=IMAGE_SIZE, image_mode="vae", vae_path=str(latent_shards / "vae"))
    cfg = make_cfg(str(latent_shards / "shards"), seq_len=64, batch_size=2, samples_per_step=2, shuffle=False)
    loader = build_train_loader(cfg, fusion, tokenizer, 16, SINGLE)
    batch = next(iter(loader))
    assert batch.images_are_latents and batch.images.shape == (2, 4, 8, 8)
    assert batch.images.dtype == torch.float32
    expect = torch.from_numpy(np.asarray(loader.dataset.get_item(0)["latents"], dtype=np.float32))
    assert torch.equal(batch.images[0], expect)


def test_latents_of_another_image_size_get_a_clear_error(tokenizer, latent_shards, make_cfg):
    """Shards encoded at IMAGE_SIZE for a model at twice that size: the latents are half
    the model's (8x8 against 16x16), so an image would take a quarter of the tokens the
    packer reserves. Before, the loader yielded them as if they fit. With data.use_latents
    off the stored images are read and resized instead."""
    fusion = FusionConfig(image_size=2 * IMAGE_SIZE, image_mode="vae", vae_path=str(latent_shards / "vae"))
    cfg = make_cfg(str(latent_shards / "shards"), seq_len=512, batch_size=1, samples_per_step=1)
    with pytest.raises(ValueError, match=r"latents of shape \(4, 8, 8\).*reads \(4, 16, 16\).*use_latents=false"):
        build_train_loader(cfg, fusion, tokenizer, 64, SINGLE)
    cfg.use_latents = False
    batch = next(iter(build_train_loader(cfg, fusion, tokenizer, 64, SINGLE)))
    assert not batch.images_are_latents and batch.images.shape == (1, 3, 2 * IMAGE_SIZE, 2 * IMAGE_SIZE)


def test_pixels_when_model_is_in_pixel_space(tokenizer, latent_shards, make_cfg):
    fusion = FusionConfig(image_size=IMAGE_SIZE)
    cfg = make_cfg(str(latent_shards / "shards"), seq_len=128, batch_size=1, samples_per_step=1)
    batch = next(iter(build_train_loader(cfg, fusion, tokenizer, TOKENS_PER_IMAGE, SINGLE)))
    assert not batch.images_are_latents and batch.images.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert batch.images.min() >= -1 and batch.images.max() <= 1


def test_resized_when_shards_differ_from_model_size(tokenizer, latent_shards, make_cfg):
    fusion = FusionConfig(image_size=8)
    cfg = make_cfg(str(latent_shards / "shards"), seq_len=64, batch_size=1, samples_per_step=1)
    batch = next(iter(build_train_loader(cfg, fusion, tokenizer, 16, SINGLE)))
    assert batch.images.shape == (1, 3, 8, 8)


def test_missing_shards_get_a_clear_error(tokenizer, tmp_path, make_cfg, fusion_cfg):
    with pytest.raises(ValueError, match="no index.json"):
        build_train_loader(make_cfg(str(tmp_path / "nowhere")), fusion_cfg, tokenizer, 16, SINGLE)


def test_loader_throughput_is_measured(tokenizer):
    from megafusion.data.bench_loader import loader_samples_per_s

    rate = loader_samples_per_s(num_samples=128, image_size=16, seq_len=512, warmup_steps=1, tokenizer=tokenizer)
    assert rate > 0


def test_several_ranks_need_a_process_group(tokenizer, synthetic_dir, make_cfg, fusion_cfg):
    from megafusion.data import DistEnv

    with pytest.raises(ValueError, match="torch.distributed is not initialised"):
        build_train_loader(make_cfg(synthetic_dir), fusion_cfg, tokenizer, 16, DistEnv(0, 2, 0, 2))


def test_a_stop_signal_sent_to_the_workers_is_left_to_the_rank(tokenizer, synthetic_dir, make_cfg, fusion_cfg):
    """SIGTERM and SIGUSR1 reach the DataLoader workers when a stop is sent to the whole
    process group; the rank checkpoints and stops (step_control.StopSignal), so the workers
    must outlive the signal and keep serving the step in flight. Before, the worker died
    of it and the rank failed with "DataLoader worker ... is killed by signal"."""
    import os
    import signal
    import time

    import psutil

    cfg = make_cfg(synthetic_dir, seq_len=128, batch_size=1, samples_per_step=2, num_workers=1, shuffle=False)
    loader = build_train_loader(cfg, fusion_cfg, tokenizer, TOKENS_PER_IMAGE, SINGLE)
    before = {c.pid for c in psutil.Process().children()}
    batches = iter(loader)
    next(batches)
    workers = [c.pid for c in psutil.Process().children() if c.pid not in before]
    assert len(workers) == 1
    for pid in workers:
        os.kill(pid, signal.SIGTERM)
        os.kill(pid, signal.SIGUSR1)
    time.sleep(1.0)
    assert all(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in workers)
    for _ in range(3):
        assert next(batches).num_samples == 2
    del batches


def test_idle_workers_do_not_poll_away_the_ranks_cpu(tokenizer, synthetic_dir, make_cfg, fusion_cfg):
    """While a rank computes a step, its DataLoader worker sits `predownload` samples
    ahead and streaming's threads wait. They polled every 7 ms: ~2% of a core per worker,
    taken from the ranks on a CPU run (megafusion/data/dataset.py). An idle worker must
    now use under 1.2% of a core over three seconds (3.0% before)."""
    import time

    import psutil

    cfg = make_cfg(synthetic_dir, seq_len=128, batch_size=1, samples_per_step=2, num_workers=1, shuffle=False)
    loader = build_train_loader(cfg, fusion_cfg, tokenizer, TOKENS_PER_IMAGE, SINGLE)
    before = {c.pid for c in psutil.Process().children()}
    batches = iter(loader)
    next(batches)
    (worker,) = [psutil.Process(c.pid) for c in psutil.Process().children() if c.pid not in before]
    time.sleep(1.0)  # the worker fills its prefetch queue
    cpu = lambda: sum(worker.cpu_times()[:2])  # noqa: E731
    c0, t0 = cpu(), time.monotonic()
    time.sleep(3.0)
    share = (cpu() - c0) / (time.monotonic() - t0)
    assert share < 0.012, f"an idle DataLoader worker used {share:.1%} of a core"
    assert next(batches).num_samples == 2
    del batches
