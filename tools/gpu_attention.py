"""tools/gpu_check.py's `attention` check: sdpa, flex and the flash decomposition
against float64 attention under a mask built from explicit spans, on random packed
layouts; outputs and q/k/v gradients in bf16 within bf16 tolerances."""
from __future__ import annotations

import importlib.util
import math

import torch

# bf16 keeps 8 significant bits: unit roundoff u = 2^-9. Kernels accumulate in fp32 but
# round P (softmax) and the outputs to bf16, so errors are a few u.
U = 2.0 ** -9
TOLERANCE = {"out": {"rel_l2": 8 * U, "max_rel": 32 * U}, "grad": {"rel_l2": 16 * U, "max_rel": 32 * U}}


def random_layout(B: int, L: int, g: torch.Generator):
    """document_ids / image_ids [B, L] as PackedBatch lays them out, and the mask from
    explicit spans: a query sees its document's keys up to itself, plus its whole image."""
    rand = lambda lo, hi: int(torch.randint(lo, hi + 1, (), generator=g))
    document_ids = torch.zeros(B, L, dtype=torch.long)
    image_ids = torch.full((B, L), -1, dtype=torch.long)
    mask = torch.zeros(B, L, L, dtype=torch.bool)
    n_images = 0
    for b in range(B):
        pos, doc = 0, 0
        while pos < L:
            start, end = pos, min(L, pos + rand(L // 6, L // 2))
            while pos < end:
                n = rand(2, max(2, min(L // 6, end - pos))) if end - pos >= 2 else 1
                if n >= 2 and rand(0, 2) == 0:  # an image; two may touch
                    image_ids[b, pos:pos + n] = n_images
                    mask[b, pos:pos + n, pos:pos + n] = True
                    n_images += 1
                pos += n
            document_ids[b, start:end] = doc
            for i in range(start, end):
                mask[b, i, start:i + 1] = True
            doc += 1
    return document_ids, image_ids, mask


def naive_attention(q, k, v, mask):
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return scores.masked_fill(~mask[:, None], float("-inf")).softmax(-1) @ v


def forward_backward(fn, q, k, v, upstream):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), upstream.to(out.dtype))
    return [t.detach().double() for t in (out, *grads)]


def errors(got: torch.Tensor, want: torch.Tensor) -> dict:
    diff = (got - want).abs()
    return {"rel_l2": (diff.norm() / want.norm()).item(), "max_rel": (diff.max() / want.abs().max()).item()}


def check_attention(device, s) -> dict:
    from megafusion.model.attention import AttentionLayout, hybrid_attention, sdpa_varlen_primitive

    cuda = device.type == "cuda"
    real_flash = cuda and importlib.util.find_spec("flash_attn") is not None
    backends = {"sdpa": {}, "flash": {"primitive": "flash_attn" if real_flash else "SDPA standing in for flash-attn"},
                "flex": {} if cuda else {"skipped": "flex_attention has no backward on the CPU"}}
    active = [name for name, info in backends.items() if "skipped" not in info]
    (hq, hkv), d, B, L = s["att_heads"], s["att_dim"], s["att_batch"], s["att_len"]
    g = torch.Generator().manual_seed(0)
    layouts = []
    for _ in range(s["att_layouts"]):
        document_ids, image_ids, mask = random_layout(B, L, g)
        q, k, v, up = (torch.randn(B, h, L, d, generator=g).to(device, torch.bfloat16) for h in (hq, hkv, hkv, hq))
        mask = mask.to(device)
        q64, k64, v64 = q.double(), k.double(), v.double()
        ref = forward_backward(lambda q, k, v: naive_attention(q, k, v, mask), q64, k64, v64, up)
        # Sensitivity: plain causal attention (images not bidirectional) must fail the
        # output tolerance at least 4x over, or the check could not see a mask error.
        control = errors(naive_attention(q64, k64, v64, mask & mask.new_ones(L, L).tril()), ref[0])
        entry = {"documents": int(sum(len(r.unique()) for r in document_ids)), "images": int(image_ids.max()) + 1,
                 "image_tokens": int((image_ids >= 0).sum()), "causal_control": control,
                 "causal_control_fails_by": max(control[m] / TOLERANCE["out"][m] for m in control)}
        for name in active:
            primitive = sdpa_varlen_primitive if name == "flash" and not real_flash else None
            layout = AttentionLayout.build(document_ids.to(device), image_ids.to(device), name, primitive=primitive)
            got = forward_backward(lambda q, k, v: hybrid_attention(q, k, v, layout), q, k, v, up)
            entry[name] = {t: errors(a, b) for t, a, b in zip(("out", "dq", "dk", "dv"), got, ref)}
        layouts.append(entry)
    ok = all(e["causal_control_fails_by"] >= 4 for e in layouts)
    for name in active:
        worst = {t: {m: max(e[name][t][m] for e in layouts) for m in ("rel_l2", "max_rel")} for t in ("out", "dq", "dk", "dv")}
        backends[name].update(worst=worst, ok=all(worst[t][m] <= TOLERANCE["out" if t == "out" else "grad"][m]
                                                  for t in worst for m in worst[t]))
        ok &= backends[name]["ok"]
    return {"ok": ok, "dtype": "bfloat16", "reference": "float64 attention under a mask built from explicit spans",
            "shape": {"batch": B, "seq_len": L, "q_heads": hq, "kv_heads": hkv, "head_dim": d},
            "tolerance": TOLERANCE, "tolerance_note": "u = 2^-9 (bf16 unit roundoff); rel_l2 = |got-ref|/|ref|, "
            "max_rel = max|got-ref| / max|ref|, per tensor", "backends": backends, "layouts": layouts}

