"""The RoPE positions of image tokens (model.image_rope).

    sequential  an image's tokens count on like text (Transfusion, LMFusion): token k of
                an image starting at position p sits at p + k, its raster index.
    shared      every token of the image at p (Qwen2-VL's M-RoPE t index alone): no
                token of an image is nearer than another to anything; its place in the
                grid is only what model.image_position gives it.
    2d          three position streams, t = p, row = p + k // w, column = p + k % w;
                each rotary frequency reads one of them, frequency f stream f % 3
                (Qwen3-VL's interleaved M-RoPE, so every stream spans high and low
                frequencies). Two tokens of an image are then as near as their rows and
                columns; text has t = row = column = its position, which is exactly
                the 1D RoPE the text tower was trained with.

Text positions never change, and text after an image counts on from p + tokens.
rope_positions gives [B, L] (sequential, shared) or [3, B, L] (2d); rope_cos_sin turns
either into the cos and sin [B, L, head_dim] that the attention layers apply.
"""
from __future__ import annotations

import torch

MODES = ("sequential", "shared", "2d")


def _first_positions(position_ids: torch.Tensor, image_ids: torch.Tensor) -> torch.Tensor:
    """[B, L]: each image token's smallest position among its image's tokens
    (image_ids >= 0, one id per image in the batch); text as given."""
    # Sized by the token count (an image id is below it) and scattered from every token
    # (text carries the dtype's maximum, which amin ignores): no boolean indexing, whose
    # output size the host would have to read back on every forward and sampler step.
    is_image = image_ids >= 0
    ids = image_ids.clamp_min(0).reshape(-1)
    none = torch.iinfo(position_ids.dtype).max
    first = torch.full((ids.numel(),), none, dtype=position_ids.dtype, device=position_ids.device)
    first = first.scatter_reduce(0, ids, position_ids.masked_fill(~is_image, none).reshape(-1), "amin")
    return torch.where(is_image, first[ids].view_as(position_ids), position_ids)


def rope_positions(position_ids: torch.Tensor, image_ids: torch.Tensor, mode: str,
                   grid_width: int | None = None) -> torch.Tensor:
    """The positions the layers' RoPE reads under `mode` (see the module's docstring);
    grid_width: tokens per grid row, for 2d."""
    if mode not in MODES:
        raise ValueError(f"model.image_rope={mode!r}: expected one of {', '.join(MODES)}")
    if mode == "sequential":
        return position_ids
    first = _first_positions(position_ids, image_ids)
    if mode == "shared":
        return first
    if not grid_width:
        raise ValueError("model.image_rope=2d needs the grid width")
    k = position_ids - first  # raster index inside the image, 0 for text
    return torch.stack([first, first + k // grid_width, first + k % grid_width])


def rope_cos_sin(rotary_emb, h: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, L, head_dim] of positions [B, L], or of [3, B, L] with frequency f
    read from stream f % 3 (rotate-half layout: index i and i + head_dim / 2 share a
    frequency)."""
    if positions.dim() == 2:
        return rotary_emb(h, positions)
    (c0, s0), (c1, s1), (c2, s2) = (rotary_emb(h, p) for p in positions)
    half = c0.shape[-1] // 2
    stream = (torch.arange(half, device=c0.device) % 3).repeat(2)
    cos = torch.where(stream == 0, c0, torch.where(stream == 1, c1, c2))
    sin = torch.where(stream == 0, s0, torch.where(stream == 1, s1, s2))
    return cos, sin
