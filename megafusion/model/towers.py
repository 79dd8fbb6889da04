"""What every decoder-layer design shares (megafusion/model/layer_*.py, one file per
model.tower_mode): a tower (one set of a Llama layer's norms, q/k/v/o and MLP), RoPE,
and attention over one or more streams.

A stream is one tower's queries, keys and values for every token, in sequence order
[B, H, L, d]. A design that runs one attention (lmfusion, single_tower) has one stream;
one whose towers attend separately (dual_tower, xfuse, gated_tower) has two, each under
the same hybrid mask. A design says what it does with its towers in `mix`; training
(forward) and inference with a KV cache (forward_cached) run the same mix with the
matching attention, so no design can train one computation and sample another.

The residual stream h is in modality-sorted order (megafusion/model/routing.py): the
text tokens h[:n_text], then the image tokens. Per-token modules run on those slices
directly; only attention needs sequence order.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import AttentionLayout, hybrid_attention
from .routing import Routing


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, L, d]; cos/sin [B, L, d] (from transformers' LlamaRotaryEmbedding, which
    already applies Llama-3 rope scaling)."""
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


class Tower(nn.Module):
    """One set of a decoder layer's modules: norms, q/k/v/o and the MLP."""

    def __init__(self, input_layernorm, q_proj, k_proj, v_proj, o_proj, post_attention_layernorm, mlp):
        super().__init__()
        self.input_layernorm = input_layernorm
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = q_proj, k_proj, v_proj, o_proj
        self.post_attention_layernorm = post_attention_layernorm
        self.mlp = mlp

    @classmethod
    def from_llama_layer(cls, layer) -> "Tower":
        a = layer.self_attn
        return cls(layer.input_layernorm, a.q_proj, a.k_proj, a.v_proj, a.o_proj, layer.post_attention_layernorm, layer.mlp)

    def qkv(self, x):
        x = self.input_layernorm(x)
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def ffn(self, h):
        return h + self.mlp(self.post_attention_layernorm(h))

    def finish(self, h, o):
        """The rest of the block after attention: o [N, H*d] for the rows h [N, hidden]."""
        return self.ffn(h + self.o_proj(o))


def image_twin(text: Tower, clone, image_norm) -> Tower:
    """The trainable copy of a text tower; image_norm(norm) gives the module its norms
    use (megafusion/model/fused_norm.py)."""
    twin = clone(text)
    twin.input_layernorm = image_norm(twin.input_layernorm)
    twin.post_attention_layernorm = image_norm(twin.post_attention_layernorm)
    return twin


# ---------------------------------------------------------------------------- attention

class LayoutAttention:
    """Training: each stream over this batch's tokens with the hybrid layout."""

    def __init__(self, layout: AttentionLayout, scale: float):
        self.layout, self.scale = layout, scale

    def __call__(self, streams):
        return [hybrid_attention(q, k, v, self.layout, scale=self.scale) for q, k, v in streams]


class CachedAttention:
    """Inference over new tokens given the keys and values of earlier ones.

    kv_update(k, v) receives the new tokens' keys and values after RoPE, [B, Hkv, Lq, d],
    and returns those to attend over, [B, Hkv, Lk, d] (the cached ones, then these);
    attn_mask [B, 1, Lq, Lk] bool. Several streams are cached as one: their keys and
    values stacked along the head axis, so the caches (megafusion/model/inference.py,
    transformers' DynamicCache) keep one entry per layer whatever the design."""

    def __init__(self, attn_mask: torch.Tensor, kv_update, scale: float):
        self.mask, self.kv_update, self.scale = attn_mask, kv_update, scale

    def __call__(self, streams):
        if len(streams) == 1:
            (q, k, v), = streams
            k, v = self.kv_update(k, v)
            pairs = [(k, v)]
        else:
            h_kv = streams[0][1].shape[1]
            k, v = self.kv_update(torch.cat([s[1] for s in streams], 1), torch.cat([s[2] for s in streams], 1))
            pairs = list(zip(k.split(h_kv, 1), v.split(h_kv, 1)))
        return [F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, scale=self.scale, enable_gqa=True)
                for (q, _, _), (k, v) in zip(streams, pairs)]


@dataclass(frozen=True)
class HeadShape:
    num_heads: int
    num_kv_heads: int
    head_dim: int


class DecoderLayer(nn.Module):
    """Base of the designs: the frozen text tower (the base layer's own modules) and the
    head shapes. A subclass adds its trainable modules and defines mix()."""

    # The design's learnable scalars and their starting values (shape [1], not 0-d: ZeRO-3
    # partitions every parameter and 0-d ones are a corner it handles badly). Pipeline
    # stages build them again from here (megafusion/parallel/pipeline.py).
    scalar_starts: dict[str, float] = {}

    def __init__(self, llama_layer, heads: HeadShape):
        super().__init__()
        self.text = Tower.from_llama_layer(llama_layer)
        self.num_heads, self.num_kv_heads, self.head_dim = heads.num_heads, heads.num_kv_heads, heads.head_dim
        self.scale = heads.head_dim ** -0.5

    def make_scalars(self, dtype=None, device=None) -> None:
        for name, start in self.scalar_starts.items():
            setattr(self, name, nn.Parameter(torch.full((1,), start, dtype=dtype, device=device)))

    def forward(self, h: torch.Tensor, routing: Routing, cos, sin, layout: AttentionLayout,
                recomputed: bool = False) -> torch.Tensor:
        """h: [B*L, hidden] in modality-sorted order. recomputed: the layer runs under
        activation checkpointing (FusedModel.run_layer)."""
        h = self.mix(h, routing, cos, sin, LayoutAttention(layout, self.scale))
        if recomputed and torch.is_grad_enabled():
            # The layer's backward pass starts with a saved tensor (a 0-d one: h x 1 is
            # exact), so its unpack runs the recompute while the innermost module in
            # backward is this layer. Otherwise the first saved tensor is in the last
            # projection's backward (the towers' outputs are concatenated and added,
            # which save nothing), and ZeRO-3 ties the frozen tower's weights gathered
            # by the recompute to that projection: they were released as soon as its
            # backward ended and gathered a third time for their own backward
            # (DeepSpeed 0.19's update_recompute_parameters; tests/parallel/test_qwz.py
            # counts the gathers).
            h = h * h.new_ones(())
        return h

    def forward_cached(self, h: torch.Tensor, routing: Routing, cos, sin, attn_mask: torch.Tensor, kv_update) -> torch.Tensor:
        """Inference over new tokens only (KV cache; megafusion/model/inference.py drives
        it): the same computation as forward with the sdpa backend, except that
        attention runs over [earlier; new] keys (CachedAttention). Caching is exact
        because no token's keys and values depend on later tokens: text is causal and an
        image, bidirectional only within itself, enters the cache whole."""
        return self.mix(h, routing, cos, sin, CachedAttention(attn_mask, kv_update, self.scale))

    def mix(self, h, routing: Routing, cos, sin, attend) -> torch.Tensor:
        raise NotImplementedError

    # -- helpers for mix ------------------------------------------------------------
    def heads(self, q, k, v, routing: Routing, cos, sin):
        """[B*L, H*d] projections in sorted order -> a stream: [B, H, L, d] in sequence
        order, RoPE applied to q and k."""
        B, L, d = routing.batch_size, routing.seq_len, self.head_dim
        q = routing.to_sequence(q).view(B, L, self.num_heads, d).transpose(1, 2)
        k = routing.to_sequence(k).view(B, L, self.num_kv_heads, d).transpose(1, 2)
        v = routing.to_sequence(v).view(B, L, self.num_kv_heads, d).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def stream(self, tower: Tower, h, routing: Routing, cos, sin):
        """One tower's stream over every token."""
        return self.heads(*tower.qkv(h), routing, cos, sin)

    @staticmethod
    def rows(o: torch.Tensor, routing: Routing, which: str | None = None) -> torch.Tensor:
        """Attention output [B, H, L, d] -> [N, H*d] in sorted order: every token, or only
        the text ("text") or image ("image") rows."""
        flat = o.transpose(1, 2).reshape(routing.n_tokens, -1)
        perm = {None: routing.perm, "text": routing.perm[: routing.n_text], "image": routing.perm[routing.n_text:]}[which]
        return flat.index_select(0, perm)
