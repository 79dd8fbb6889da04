"""The bench entry hybrid_vs_causal_attention, registered in tools/bench.py.

    hybrid_vs_causal_attention   the hybrid mask (images non-causal, text causal) through
                                 the sdpa backend's bool mask / SDPA is_causal=True,
                                 forward + backward; other ways to apply the same mask
                                 are timed beside it (variants)

The sdpa backend cuts the mask into blocks of SDPA_QUERY_BLOCK query rows, each against
the keys it may attend; the variant whole_mask_sdpa is one SDPA call with the whole L x L
mask, what the blocks save. prefix_chunk_attention is a candidate for
megafusion.model.attention, kept here to be measured. tools/bench.py calls
register(itself) after its helpers are defined.
"""
from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F

from megafusion.model.attention import AttentionLayout, hybrid_attention, sdpa_varlen_primitive

_bench = None  # tools/bench.py's module, set by register()


def register(bench) -> None:
    global _bench
    _bench = bench
    bench.benchmark("hybrid_vs_causal_attention")(hybrid_vs_causal_attention)


def prefix_chunk_attention(q, k, v, document_ids, image_ids, scale=None):
    """The hybrid mask as one query chunk per text run / image, each against the keys of
    its document prefix up to the chunk's end: images non-causal, text runs causal
    aligned bottom-right. Every (query, key) pair is computed once, as in causal
    attention; only the diagonal block of a text chunk needs a (small) mask. On flash-attn
    this is two varlen calls (causal=True is bottom-right there). A candidate for
    megafusion.model.attention, kept here to measure it."""
    B, Hq, L, d = q.shape
    rows = []
    for b in range(B):
        doc, img = document_ids[b].tolist(), image_ids[b].tolist()
        outs, start, doc_start = [], 0, 0
        while start < L:
            if start == 0 or doc[start] != doc[start - 1]:
                doc_start = start
            end = start + 1
            while end < L and doc[end] == doc[start] and (img[end] >= 0) == (img[start] >= 0) \
                    and (img[start] < 0 or img[end] == img[start]):
                end += 1
            qs, ks, vs = q[b:b + 1, :, start:end], k[b:b + 1, :, doc_start:end], v[b:b + 1, :, doc_start:end]
            if img[start] >= 0:
                o = F.scaled_dot_product_attention(qs, ks, vs, scale=scale, enable_gqa=True)
            elif start == doc_start:
                o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=True)
            else:
                n_q, n_k = end - start, end - doc_start
                mask = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril(n_k - n_q)
                o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale, enable_gqa=True)
            outs.append(o)
            start = end
        rows.append(torch.cat(outs, dim=2))
    return torch.cat(rows, dim=0)


def hybrid_vs_causal_attention(ctx) -> dict:
    """hybrid_attention (sdpa backend: the bool mask, in blocks of query rows) / SDPA
    is_causal=True, forward + backward, one document of alternating 256-token text runs
    and 256-token images, SmolLM2's heads. Other ways to apply the same mask are timed
    beside it (variants). Not timed: a float additive mask instead of the bool one, which
    measured the same as the whole bool mask here (1.90-1.92 x causal, 2026-11): SDPA's
    CPU kernel skips no block for either, and computes every (query, key) pair of the
    L x L square."""
    config = _bench.llama_config(ctx)
    L, Hq, Hkv = ctx.sizes.attention_tokens, config.num_attention_heads, config.num_key_value_heads
    d = getattr(config, "head_dim", None) or config.hidden_size // Hq
    g = torch.Generator().manual_seed(0)
    document_ids = torch.zeros(1, L, dtype=torch.long)
    image_ids = torch.full((1, L), -1, dtype=torch.long)
    for n, s in enumerate(range(_bench.TEXT_RUN, L, _bench.TEXT_RUN + _bench.TOKENS_PER_IMAGE)):
        image_ids[0, s:s + _bench.TOKENS_PER_IMAGE] = n
    q = torch.randn(1, Hq, L, d, generator=g).requires_grad_()
    k = torch.randn(1, Hkv, L, d, generator=g).requires_grad_()
    v = torch.randn(1, Hkv, L, d, generator=g).requires_grad_()
    grad_out = torch.randn(1, Hq, L, d, generator=g)
    bool_layout = AttentionLayout.build(document_ids, image_ids, "sdpa")
    flash_layout = AttentionLayout.build(document_ids, image_ids, "flash", primitive=sdpa_varlen_primitive)
    whole_mask_layout = AttentionLayout.build(document_ids, image_ids, "sdpa", query_block=L)
    assert whole_mask_layout.query_blocks is None

    forwards = {
        "hybrid_sdpa_backend": lambda: hybrid_attention(q, k, v, bool_layout),
        "causal": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
        "flash_decomposition_sdpa": lambda: hybrid_attention(q, k, v, flash_layout),
        "prefix_chunks_sdpa": lambda: prefix_chunk_attention(q, k, v, document_ids, image_ids),
        "whole_mask_sdpa": lambda: hybrid_attention(q, k, v, whole_mask_layout),
    }
    with torch.no_grad():
        reference = forwards["hybrid_sdpa_backend"]()
        errors = {n: float((f() - reference).abs().max()) for n, f in forwards.items() if n != "causal"}

    def fwd_bwd(f):
        def run():
            f().backward(grad_out)
        return run

    def setup():
        for t in (q, k, v):
            t.grad = None

    times = _bench.interleaved({n: fwd_bwd(f) for n, f in forwards.items()}, ctx.repeats, setup=setup)
    causal = statistics.median(times.cpu["causal"])
    variants = {
        n: {"median_ms": _bench.median_ms(ts), "ratio_vs_causal": round(statistics.median(ts) / causal, 4),
            "median_wall_ms": _bench.median_ms(times.wall[n]), "max_abs_err_vs_bool_mask": errors[n]}
        for n, ts in times.cpu.items() if n not in ("causal", "hybrid_sdpa_backend")
    }
    core = times.only("hybrid_sdpa_backend", "causal")
    return _bench.ratio_entry(core, "hybrid_sdpa_backend", "causal", goal=1.3, tokens=L,
                              images=int(image_ids.max()) + 1, tokens_per_image=_bench.TOKENS_PER_IMAGE, heads=Hq,
                              kv_heads=Hkv, head_dim=d, what="attention alone, forward + backward, float32, enable_gqa",
                              variants=variants)
