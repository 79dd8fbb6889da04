"""Buffers of a ZeRO-3 model built with parallel.zero_init. deepspeed.zero.Init(module=...)
moves only parameters to the accelerator, and deepspeed.initialize does not move a model
that has partitioned ones, so the buffers of modules built outside zero.Init (the
alignment encoder's pixel mean and std, a CLIP's position ids) stayed on the CPU and the
first forward on a GPU mixed devices. On the stand-in accelerator (fake_accelerator.py)
the same placement fails the same way; model_setup.place_buffers mends it."""
import sys
from pathlib import Path

import pytest
import torch
from fake_accelerator import FAKE, fake_accelerator, move_to_fake

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


@pytest.fixture(scope="module")
def aligned_model(tiny_llama, tmp_path_factory):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from megafusion.config import load_config
    from megafusion.model.fusion import LMFusionModel

    enc = tmp_path_factory.mktemp("clip") / "clip"
    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     image_size=32, patch_size=8)).save_pretrained(enc)
    cfg = load_config(REPO / "configs/tiny.yaml", [f"model.align_encoder={enc}", "model.align_layer=1"])
    return LMFusionModel.from_base(tiny_llama, cfg.model)


def image_batch(model):
    from megafusion.model.batch import ImageSegment, PackedBatch, TextSegment

    g = torch.Generator().manual_seed(0)
    n = model.tokens_per_image
    doc = [TextSegment([5, 6, 7, model.boi_id]), ImageSegment(torch.randn(*model.image_tokenizer.latent_shape, generator=g),
                                                                timestep=500.0), TextSegment([model.eoi_id])]
    return PackedBatch.from_rows([[doc]], seq_len=n + 8, tokens_per_image=n)


def test_buffers_follow_the_parameters_onto_the_accelerator(aligned_model):
    from megafusion.parallel.model_setup import place_buffers

    model = aligned_model
    assert any(True for _ in model.aligner.buffers())
    batch = image_batch(model)
    with fake_accelerator():
        move_to_fake(model)
        for module in model.modules():  # as zero.Init(module=...) leaves them: parameters moved, buffers not
            for name, buf in module._buffers.items():
                if buf is not None and hasattr(buf, "elem"):
                    module._buffers[name] = buf.elem
        with pytest.raises(RuntimeError, match="device"):
            model(batch.to(FAKE))
        place_buffers(model, FAKE)
        assert all(b.device == FAKE for b in model.buffers())
        out = model(batch.to(FAKE))
    assert torch.isfinite(out.loss.elem)
    assert out.align_loss is not None
