"""Feature alignment (model.align_encoder, megafusion/model/align.py) against references
that do not share its code: each encoder family's own Hugging Face image processor and
forward pass on tiny randomly initialised encoders saved to disk, average pooling for
the grid resize, the cosine's closed form, and autograd's view of where the loss reaches."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers

from megafusion.model.align import AlignEncoderError, FeatureAligner
from megafusion.model.config import FusionConfig
from megafusion.model.fusion import LMFusionModel
from megafusion.model.loading import load_base_model

from test_fusion import mixed_batch, pixel_cfg, text_batch

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=16, patch_size=4)
FAMILIES = {
    # name: (model class, config class, image processor class, feature layer X-Fusion/REPA use, leading tokens)
    "clip": ("CLIPVisionModel", "CLIPVisionConfig", "CLIPImageProcessor", -2, 1),
    "siglip": ("SiglipVisionModel", "SiglipVisionConfig", "SiglipImageProcessor", -1, 0),
    "dinov2": ("Dinov2Model", "Dinov2Config", "BitImageProcessor", -1, 1),
}


def save_encoder(family, path):
    model_cls, config_cls, _, _, _ = FAMILIES[family]
    kw = dict(SMALL)
    if family == "dinov2":
        kw.pop("intermediate_size")
        kw["mlp_ratio"] = 2
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kw)).eval()
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module", params=list(FAMILIES))
def encoder(request, tmp_path_factory):
    return request.param, save_encoder(request.param, tmp_path_factory.mktemp(request.param))


def reference_features(family, path, u8):
    """The family's own processor (no resize or crop: the images are the encoder's size)
    and forward pass; patch tokens of the layer X-Fusion (CLIP) or REPA (others) use."""
    from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    model_cls, _, proc_cls, layer, skip = FAMILIES[family]
    model = getattr(transformers, model_cls).from_pretrained(path).eval()
    # facebook/dinov2-*'s preprocessor_config.json: BitImageProcessor with ImageNet's statistics.
    stats = dict(image_mean=IMAGENET_DEFAULT_MEAN, image_std=IMAGENET_DEFAULT_STD) if family == "dinov2" else {}
    proc = getattr(transformers, proc_cls)(**stats)
    crop = {} if family == "siglip" else dict(do_center_crop=False)
    x = proc(images=list(u8), do_resize=False, return_tensors="pt", **crop).pixel_values
    with torch.no_grad():
        return model(pixel_values=x, output_hidden_states=True).hidden_states[layer][:, skip:]


@torch.no_grad()
def test_targets_are_the_encoders_patch_features(encoder):
    family, path = encoder
    aligner = FeatureAligner(FusionConfig(align_encoder=path), hidden_size=64)
    u8 = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    pixels = torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 127.5 - 1
    want = reference_features(family, path, u8)  # [2, 16 patches, 32]
    got = aligner.targets(pixels, (4, 4))
    assert got.shape == want.shape == (2, 16, 32)
    assert (got - want).abs().max().item() <= 1e-4 * max(1.0, want.abs().max().item())
    # A 2x2 token grid: bilinear halving is 2x2 average pooling of the patch grid.
    small = aligner.targets(pixels, (2, 2))
    pooled = F.avg_pool2d(want.transpose(1, 2).reshape(2, 32, 4, 4), 2).flatten(2).transpose(1, 2)
    assert (small - pooled).abs().max().item() <= 1e-4 * max(1.0, want.abs().max().item())


@torch.no_grad()
def test_a_saved_image_processor_sets_the_normalisation(tmp_path):
    path = save_encoder("clip", tmp_path / "clip")
    transformers.CLIPImageProcessor(image_mean=[0.1, 0.2, 0.3], image_std=[0.9, 0.8, 0.7]).save_pretrained(path)
    aligner = FeatureAligner(FusionConfig(align_encoder=path), hidden_size=64)
    u8 = np.random.default_rng(1).integers(0, 256, (1, 16, 16, 3), dtype=np.uint8)
    pixels = torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 127.5 - 1
    proc = transformers.CLIPImageProcessor.from_pretrained(path)
    x = proc(images=list(u8), do_resize=False, do_center_crop=False, return_tensors="pt").pixel_values
    want = aligner.encoder.encoder(pixel_values=x, output_hidden_states=True).hidden_states[-2][:, 1:]
    assert (aligner.targets(pixels, (4, 4)) - want).abs().max().item() <= 1e-4


def test_loss_is_one_minus_cosine():
    torch.manual_seed(0)
    aligner = FeatureAligner.__new__(FeatureAligner)
    torch.nn.Module.__init__(aligner)
    aligner.proj = torch.nn.Linear(8, 8)
    with torch.no_grad():
        aligner.proj.weight.copy_(torch.eye(8))
        aligner.proj.bias.zero_()
    h = torch.randn(2, 5, 8)
    assert aligner.loss(h, h.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert aligner.loss(h, -h).item() == pytest.approx(2.0, abs=1e-6)
    orth = torch.zeros(2, 5, 8)
    orth[..., 0], h2 = 1.0, torch.zeros(2, 5, 8)
    h2[..., 1] = 3.0
    assert aligner.loss(h2, orth).item() == pytest.approx(1.0, abs=1e-6)


def test_align_loss_reaches_the_layers_up_to_its_own_only(tiny_base_dir, tmp_path):
    """With the alignment loss alone: gradients in the projection and in the image tower of
    layer 1 (align_layer=1), none in layer 2's, none in the frozen encoder or text tower;
    text-only input still gives the base's logits."""
    path = save_encoder("clip", tmp_path / "clip")
    cfg = pixel_cfg(align_encoder=path, align_layer=1, lm_loss_weight=0.0, diffusion_loss_weight=0.0)
    base = load_base_model(tiny_base_dir)
    model = LMFusionModel(copy.deepcopy(base), cfg)
    out = model(mixed_batch(model))
    assert out.align_loss is not None and 0 < out.align_loss.item() < 2
    out.loss.backward()
    grad = lambda ps: sum(float(p.grad.abs().sum()) for p in ps if p.grad is not None)  # noqa: E731
    assert grad(model.aligner.proj.parameters()) > 0
    assert grad(model.layers[0].image.parameters()) > 0
    assert grad(model.layers[1].image.parameters()) == 0
    assert all(p.grad is None and not p.requires_grad for p in model.aligner.encoder.parameters())
    assert all(p.grad is None for p in model.layers[0].text.parameters())
    with torch.no_grad():
        ids = list(range(3, 20))
        got = model.eval()(text_batch([ids]), return_logits=True).logits[..., :base.config.vocab_size]
        want = base.eval()(torch.tensor([ids])).logits
    assert (got - want).abs().max().item() <= 1e-5


def test_a_batch_without_images_still_runs_the_aligner(tiny_base_dir, tmp_path):
    """A text-only batch calls the frozen encoder and the projection too (ZeRO-3 gathers
    their parameters collectively on every rank), with a zero loss."""
    path = save_encoder("dinov2", tmp_path / "dino")
    model = LMFusionModel(load_base_model(tiny_base_dir), pixel_cfg(align_encoder=path, align_layer=2))
    calls = []
    model.aligner.encoder.register_forward_hook(lambda *a: calls.append("encoder"))
    model.aligner.proj.register_forward_hook(lambda *a: calls.append("proj"))
    out = model(text_batch([list(range(3, 20))]))
    assert out.align_loss.item() == 0.0 and calls == ["encoder", "proj"]
    out.loss.backward()
    assert model.aligner.proj.weight.grad is not None


def test_bad_settings_are_one_line(tiny_base_dir, tmp_path):
    with pytest.raises(ValueError, match="align_layer=4 is for model.align_encoder"):
        FusionConfig(align_layer=4).validate()
    with pytest.raises(AlignEncoderError, match="no config.json") as e:
        FeatureAligner(FusionConfig(align_encoder=str(tmp_path / "missing")), 64)
    assert "\n" not in str(e.value)
    with pytest.raises(AlignEncoderError, match="model_type 'llama'"):
        FeatureAligner(FusionConfig(align_encoder=tiny_base_dir), 64)
    path = save_encoder("siglip", tmp_path / "siglip")
    with pytest.raises(ValueError, match="align_layer=3: the base has decoder layers 1..2"):
        LMFusionModel(load_base_model(tiny_base_dir), pixel_cfg(align_encoder=path, align_layer=3))
