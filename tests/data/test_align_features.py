"""Pre-encoded feature-alignment targets (tools/prepare_data.py --align-encoder): the
shards hold what the encoder gives each stored image, the loader hands them to the model
one per image, and the model's alignment loss from them equals the loss it computes by
running the encoder itself (fp16 storage apart)."""
from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mf_data_helpers import IMAGE_SIZE, SINGLE

from megafusion.data import build_train_loader
from megafusion.data.prepare import write_synthetic
from megafusion.model.config import FusionConfig

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def aligned(tmp_path_factory):
    import transformers

    root = tmp_path_factory.mktemp("aligned")
    torch.manual_seed(0)
    transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=16, patch_size=4)
    ).save_pretrained(root / "clip")
    write_synthetic(str(root / "shards"), 24, IMAGE_SIZE, seed=1, align_encoder=str(root / "clip"))
    return root


def test_shards_hold_the_encoders_features_of_each_image(aligned):
    from PIL import Image

    import transformers

    from megafusion.eval.rows import read_shards  # streaming's own decoder, no shared memory

    ds = read_shards(aligned / "shards", n=6)
    model = transformers.CLIPVisionModel.from_pretrained(aligned / "clip").eval()
    proc = transformers.CLIPImageProcessor()
    for i in (0, 5):
        row = ds[i]
        u8 = np.asarray(Image.open(io.BytesIO(row["image"])).convert("RGB"))
        x = proc(images=[u8], do_resize=False, do_center_crop=False, return_tensors="pt").pixel_values
        with torch.no_grad():
            want = model(pixel_values=x, output_hidden_states=True).hidden_states[-2][0, 1:]  # X-Fusion: penultimate
        got = torch.from_numpy(np.asarray(row["align_features"], dtype=np.float32))
        assert got.shape == (16, 32)
        assert (got - want).abs().max().item() <= 2e-3 * max(1.0, want.abs().max().item())  # fp16 storage


def test_loader_and_model_use_them(aligned, tokenizer, make_cfg, tiny_llama):
    from megafusion.model.fusion import LMFusionModel
    from megafusion.model.loading import load_base_model

    fusion = FusionConfig(image_size=IMAGE_SIZE, patch_size=4, align_encoder=str(aligned / "clip"), align_layer=1,
                          attention_backend="sdpa")
    cfg = make_cfg(str(aligned / "shards"), seq_len=64, batch_size=2, samples_per_step=2, shuffle=False)
    loader = build_train_loader(cfg, fusion, tokenizer, 16, SINGLE)
    batch = next(iter(loader))
    assert batch.align_features.shape == (batch.num_images, 16, 32)
    # Without an aligning model the loader leaves them out.
    plain = next(iter(build_train_loader(make_cfg(str(aligned / "shards"), seq_len=64, batch_size=2,
                                                  samples_per_step=2, shuffle=False),
                                         FusionConfig(image_size=IMAGE_SIZE), tokenizer, 16, SINGLE)))
    assert plain.align_features is None

    torch.manual_seed(0)
    model = LMFusionModel(load_base_model(tiny_llama), fusion)
    noise = torch.randn(batch.images.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        from_shards = model(batch.packed(), noise=noise).align_loss
        import dataclasses

        encoded = model(dataclasses.replace(batch.packed(), align_features=None), noise=noise).align_loss
    assert 0 < from_shards.item() < 2
    assert abs(from_shards.item() - encoded.item()) <= 1e-3


def test_cli_writes_them_and_refuses_a_bad_encoder(aligned, tmp_path):
    run = lambda *a: subprocess.run([sys.executable, str(REPO / "tools/prepare_data.py"), "synthetic",  # noqa: E731
                                     "--out", str(tmp_path / "s"), "--n", "4", "--size", "16", "--val-n", "2",
                                     *a], capture_output=True, text=True, timeout=300)
    p = run("--align-encoder", str(aligned / "clip"), "--align-feature-layer", "-1")
    assert p.returncode == 0, p.stderr[-2000:]
    import json

    index = json.loads((tmp_path / "s" / "val" / "index.json").read_text())
    cols = dict(zip(index["shards"][0]["column_names"], index["shards"][0]["column_encodings"]))
    assert cols["align_features"] == "ndarray:float16:16,32"
    p = run("--align-encoder", str(tmp_path / "nope"), "--overwrite")
    assert p.returncode == 2 and "--align-encoder" in p.stderr and "Traceback" not in p.stderr, p.stderr
    p = run("--align-feature-layer", "3", "--overwrite")
    assert p.returncode == 2 and "is for --align-encoder" in p.stderr, p.stderr
