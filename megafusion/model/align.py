"""Feature alignment (X-Fusion's REPA-style loss, model.align_encoder).

A frozen vision encoder (CLIPVisionModel, SiglipVisionModel or Dinov2Model, loaded from a
local Hugging Face directory) encodes each clean image; a trainable linear map projects
the image tower's hidden states after decoder layer model.align_layer (X-Fusion: 8) to the
encoder's feature width, and the loss is 1 - cosine similarity between the projection and
the encoder's patch features, averaged over image tokens, weighted by model.align_weight.
The encoder's patch grid is resized to the image-token grid (bilinear), so any encoder
resolution fits any patching.

Which encoder layer: model.align_feature_layer, an index into the encoder's hidden states
(X-Fusion: CLIP's penultimate layer, -2, the default for CLIP; -1, the last, for SigLIP
and DINOv2, as REPA uses DINOv2's). Class and register tokens are dropped; only patches
are aligned.

Alignment is for training: exports leave the aligner out (megafusion/export.py).
"""
from __future__ import annotations

import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from .patchers import weight_dtype

# Encoder family -> (transformers class name, default feature layer, mean, std). CLIP's and
# SigLIP's normalisation are their image processors' defaults; DINOv2's are ImageNet's. A
# preprocessor_config.json beside the weights overrides them.
FAMILIES = {
    "clip": ("CLIPVisionModel", -2, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "siglip": ("SiglipVisionModel", -1, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "dinov2": ("Dinov2Model", -1, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
# config.json model_type -> family: a full CLIP/SigLIP checkpoint or its vision half.
ENCODERS = {"clip": "clip", "clip_vision_model": "clip", "siglip": "siglip", "siglip_vision_model": "siglip",
            "dinov2": "dinov2"}


class AlignEncoderError(ValueError):
    """A model.align_encoder that cannot be used (one line)."""


def _read_json(path):
    with open(path) as f:
        return json.load(f)


def load_align_encoder(path: str):
    """(frozen encoder in eval mode, its model_type, mean, std) from a local directory."""
    cfg_file = os.path.join(str(path), "config.json")
    if not os.path.isfile(cfg_file):
        raise AlignEncoderError(f"model.align_encoder={path}: no config.json there (a local Hugging Face "
                                "CLIPVisionModel, SiglipVisionModel or Dinov2Model directory)")
    kind = _read_json(cfg_file).get("model_type")
    if kind not in ENCODERS:
        raise AlignEncoderError(f"model.align_encoder={path}: model_type {kind!r} is not one of CLIP, SigLIP or "
                                "DINOv2 (clip, clip_vision_model, siglip, siglip_vision_model, dinov2)")
    import transformers

    cls_name, _, mean, std = FAMILIES[ENCODERS[kind]]
    encoder = getattr(transformers, cls_name).from_pretrained(str(path), dtype=torch.float32)
    pre = os.path.join(str(path), "preprocessor_config.json")
    if os.path.isfile(pre):
        p = _read_json(pre)
        mean, std = tuple(p.get("image_mean", mean)), tuple(p.get("image_std", std))
    return encoder.eval().requires_grad_(False), kind, mean, std


class AlignEncoder(nn.Module):
    """The frozen encoder with its preprocessing: pixels -> patch features at its own grid.
    tools/prepare_data.py --align-encoder writes these into shards; the model uses them
    from there, or runs this on the batch's images."""

    def __init__(self, path: str, feature_layer: int | None = None):
        super().__init__()
        encoder, kind, mean, std = load_align_encoder(path)
        self.encoder = encoder
        vc = encoder.config
        self.image_size = int(vc.image_size)
        self.dim = int(vc.hidden_size)
        self.feature_layer = feature_layer if feature_layer is not None else FAMILIES[ENCODERS[kind]][1]
        # Leading non-patch tokens: CLIP's and DINOv2's class token (and DINOv2's registers).
        self.skip = 0 if kind.startswith("siglip") else 1 + int(getattr(vc, "num_register_tokens", 0) or 0)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True):
        super().train(False)  # frozen: no dropout, whatever the model's mode
        return self

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [N, 3, H, W] in [-1, 1] -> patch features [N, P, D] (float32)."""
        dtype = weight_dtype(self.encoder)
        x = (pixels.float() + 1) / 2
        x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False,
                          antialias=True)
        x = ((x - self.mean) / self.std).to(dtype)
        hidden = self.encoder(pixel_values=x, output_hidden_states=True).hidden_states[self.feature_layer]
        return hidden[:, self.skip:].float()


def to_grid(features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Patch features [N, P, D] on a square grid -> [N, grid_h * grid_w, D] (bilinear)."""
    n, p, d = features.shape
    side = int(round(p ** 0.5))
    if side * side != p:
        raise ValueError(f"align features of {p} patches: not a square grid")
    f = features.float().transpose(1, 2).reshape(n, d, side, side)
    if (side, side) != tuple(grid):
        f = F.interpolate(f, size=tuple(grid), mode="bilinear", align_corners=False)
    return f.flatten(2).transpose(1, 2)


class FeatureAligner(nn.Module):
    def __init__(self, cfg, hidden_size: int):
        super().__init__()
        self.encoder = AlignEncoder(cfg.align_encoder, cfg.align_feature_layer)
        self.proj = nn.Linear(hidden_size, self.encoder.dim)

    def targets(self, pixels: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """pixels [N, 3, H, W] in [-1, 1] -> the encoder's patch features resized to the
        image-token grid, [N, grid_h * grid_w, D] (float32)."""
        return to_grid(self.encoder(pixels), grid)

    def loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """hidden [N, T, hidden] (image tower, the align layer), targets [N, T, D] ->
        mean over tokens of 1 - cos(proj(hidden), target)."""
        pred = self.proj(hidden).float()
        return (1 - F.cosine_similarity(pred, targets, dim=-1)).mean()
