"""Hybrid attention: every backend against a brute-force reference on random packings."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import megafusion.model.attention as attention
from megafusion.model.attention import (
    AttentionLayout,
    choose_backend,
    flash_attn_primitive,
    hybrid_attention,
    hybrid_mask,
    sdpa_varlen_primitive,
    select_backend,
)
from megafusion.model.batch import ImageSegment, PackedBatch, TextSegment

HQ, HKV, D = 4, 2, 8
FAST = settings(deadline=None, max_examples=25, database=None)


# ------------------------------------------------------------------ random packings

segment = st.one_of(
    st.tuples(st.just("text"), st.integers(1, 3)),
    st.tuples(st.just("image"), st.integers(1, 4)),  # adjacent images can happen
)
document = st.lists(segment, min_size=1, max_size=4)
row = st.lists(document, min_size=1, max_size=3)


@st.composite
def packings(draw, num_rows=None, seq_len=None):
    """(rows, L): rows are lists of documents of ("text"|"image", length) segments."""
    n = num_rows or draw(st.integers(1, 2))
    rows = [draw(row) for _ in range(n)]
    longest = max(sum(length for doc in r for _, length in doc) for r in rows)
    L = seq_len or longest + draw(st.integers(0, 3))  # padding at the end
    return rows, L


def ids_and_structure(rows, L):
    """document_ids / image_ids as PackedBatch lays them out, plus, independently, an
    explicit (document, image) label per position for the brute-force reference."""
    B = len(rows)
    document_ids = torch.zeros(B, L, dtype=torch.long)
    image_ids = torch.full((B, L), -1, dtype=torch.long)
    labels = [[None] * L for _ in range(B)]
    num_images = 0
    for b, docs in enumerate(rows):
        pos = 0
        for d, doc in enumerate(docs):
            for kind, length in doc:
                image = None
                if kind == "image":
                    image, num_images = num_images, num_images + 1
                for p in range(pos, pos + length):
                    labels[b][p] = ((b, d), image)
                    document_ids[b, p] = d
                    if image is not None:
                        image_ids[b, p] = image
                pos += length
        for p in range(pos, L):
            labels[b][p] = ((b, "padding"), None)
            document_ids[b, p] = len(docs)
    return document_ids, image_ids, labels


def brute_force_mask(labels):
    B, L = len(labels), len(labels[0])
    mask = torch.zeros(B, L, L, dtype=torch.bool)
    for b in range(B):
        for i in range(L):
            doc_i, img_i = labels[b][i]
            for j in range(L):
                doc_j, img_j = labels[b][j]
                same_image = img_i is not None and img_i == img_j
                mask[b, i, j] = doc_i == doc_j and (j <= i or same_image)
    return mask


def naive_attention(q, k, v, mask, scale=None):
    scale = scale if scale is not None else 1 / math.sqrt(q.shape[-1])
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    return scores.softmax(-1) @ v


def random_qkv(B, L, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, HQ, L, D, generator=g, dtype=dtype)
    k = torch.randn(B, HKV, L, D, generator=g, dtype=dtype)
    v = torch.randn(B, HKV, L, D, generator=g, dtype=dtype)
    return q, k, v


def build(document_ids, image_ids, backend):
    """backend "sdpa_blocked": the sdpa backend cut into blocks of 5 queries (its long
    sequence path; 256 in production), so the small random packings exercise it."""
    if backend == "sdpa_blocked":
        layout = AttentionLayout.build(document_ids, image_ids, "sdpa", query_block=5)
        assert layout.query_blocks or document_ids.shape[1] <= 5
        return layout
    primitive = sdpa_varlen_primitive if backend == "flash" else None
    return AttentionLayout.build(document_ids, image_ids, backend, primitive=primitive)


def outputs_and_grads(fn, q, k, v):
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    grads = torch.autograd.grad((out * upstream).sum(), (q, k, v))
    return out.detach(), grads


# ----------------------------------------------------------------------------- tests

@settings(deadline=None, max_examples=50, database=None)
@given(packings())
def test_hybrid_mask_matches_brute_force(packing):
    document_ids, image_ids, labels = ids_and_structure(*packing)
    assert torch.equal(hybrid_mask(document_ids, image_ids), brute_force_mask(labels))


@pytest.mark.parametrize("backend", ["sdpa", "sdpa_blocked", "flash"])
@FAST
@given(packing=packings(), scale=st.sampled_from([None, 0.3]))
def test_backend_matches_reference_outputs_and_grads(backend, packing, scale):
    rows, L = packing
    document_ids, image_ids, labels = ids_and_structure(rows, L)
    mask = brute_force_mask(labels)
    layout = build(document_ids, image_ids, backend)
    assert layout.backend == backend.removesuffix("_blocked")
    q, k, v = random_qkv(len(rows), L)

    ref_out, ref_grads = outputs_and_grads(lambda q, k, v: naive_attention(q, k, v, mask, scale), q, k, v)
    out, grads = outputs_and_grads(lambda q, k, v: hybrid_attention(q, k, v, layout, scale), q, k, v)

    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    for name, got, want in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=lambda m: f"d{name}: {m}")


def _flex_runs_on_cpu() -> str | None:
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError as e:
        return f"flex_attention not importable: {e}"
    return None


# One shape for every flex example: compiled flex (static shapes) recompiles per shape,
# seconds each on the CPU.
FLEX_B, FLEX_L = 2, 48


@pytest.mark.skipif(_flex_runs_on_cpu() is not None, reason=str(_flex_runs_on_cpu()))
@settings(deadline=None, max_examples=6, database=None)
@given(packings(num_rows=FLEX_B, seq_len=FLEX_L))
def test_flex_forward_matches_reference_on_cpu(packing):
    # flex on the CPU: forward only, float32 only (torch 2.14.1).
    rows, L = packing
    document_ids, image_ids, labels = ids_and_structure(rows, L)
    layout = build(document_ids, image_ids, "flex")
    q, k, v = random_qkv(FLEX_B, L, dtype=torch.float32)
    with torch.no_grad():
        out = hybrid_attention(q, k, v, layout)
    ref = naive_attention(q.double(), k.double(), v.double(), brute_force_mask(labels))
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(_flex_runs_on_cpu() is not None, reason=str(_flex_runs_on_cpu()))
def test_flex_on_cpu_refuses_backward_with_clear_error():
    document_ids = torch.zeros(1, 8, dtype=torch.long)
    image_ids = torch.full((1, 8), -1, dtype=torch.long)
    layout = build(document_ids, image_ids, "flex")
    q, k, v = (t.requires_grad_() for t in random_qkv(1, 8, dtype=torch.float32))
    with pytest.raises(ValueError, match="flex.*backward.*CPU"):
        hybrid_attention(q, k, v, layout)


def test_flash_layout_indices():
    # Row: doc 0 = text 2, image 0 (3 tokens), image 1 (2 tokens, touching), text 1;
    #      doc 1 = image 2 (2 tokens); 2 padding positions.        L = 12
    rows = [[[("text", 2), ("image", 3), ("image", 2), ("text", 1)], [("image", 2)]]]
    document_ids, image_ids, _ = ids_and_structure(rows, 12)
    layout = build(document_ids, image_ids, "flash")
    assert layout.cu_seqlens.tolist() == [0, 8, 10, 12]
    assert layout.max_seqlen == 8
    assert layout.image_query_index.tolist() == [2, 3, 4, 5, 6, 8, 9]
    assert layout.image_cu_seqlens_q.tolist() == [0, 3, 5, 7]
    # Keys: document prefix through each image's last token.
    assert layout.image_key_index.tolist() == [0, 1, 2, 3, 4] + [0, 1, 2, 3, 4, 5, 6] + [8, 9]
    assert layout.image_cu_seqlens_k.tolist() == [0, 5, 12, 14]
    assert (layout.image_max_seqlen_q, layout.image_max_seqlen_k) == (3, 7)


def test_flash_documents_never_cross_rows():
    # Same document id at the end of row 0 and the start of row 1 (one document per row).
    document_ids = torch.zeros(2, 5, dtype=torch.long)
    image_ids = torch.full((2, 5), -1, dtype=torch.long)
    image_ids[1, :2] = 0
    layout = build(document_ids, image_ids, "flash")
    assert layout.cu_seqlens.tolist() == [0, 5, 10]
    assert layout.image_key_index.tolist() == [5, 6]


def test_packed_batch_ids_through_all_cpu_backends():
    img = torch.zeros(1, 2, 2)
    docs0 = [
        [TextSegment([5, 6]), ImageSegment(img), TextSegment([7])],
        [ImageSegment(img), ImageSegment(img), TextSegment([8, 9, 10])],
    ]
    docs1 = [[TextSegment([1, 2, 3, 4, 5])]]
    batch = PackedBatch.from_rows([docs0, docs1], seq_len=24, tokens_per_image=4)
    rows = [
        [[("text", 2), ("image", 4), ("text", 1)], [("image", 4), ("image", 4), ("text", 3)]],
        [[("text", 5)]],
    ]
    document_ids, image_ids, labels = ids_and_structure(rows, 24)
    assert torch.equal(batch.document_ids, document_ids) and torch.equal(batch.image_ids, image_ids)

    mask = brute_force_mask(labels)
    assert torch.equal(hybrid_mask(batch.document_ids, batch.image_ids), mask)
    q, k, v = random_qkv(2, 24)
    ref = naive_attention(q, k, v, mask)
    for backend in ("sdpa", "flash"):
        layout = build(batch.document_ids, batch.image_ids, backend)
        torch.testing.assert_close(hybrid_attention(q, k, v, layout), ref, rtol=1e-10, atol=1e-10)


def test_text_only_is_plain_causal():
    q, k, v = random_qkv(1, 10)
    document_ids = torch.zeros(1, 10, dtype=torch.long)
    image_ids = torch.full((1, 10), -1, dtype=torch.long)
    causal = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    for backend in ("sdpa", "flash"):
        out = hybrid_attention(q, k, v, build(document_ids, image_ids, backend))
        torch.testing.assert_close(out, causal, rtol=1e-10, atol=1e-10)


def test_select_backend():
    assert select_backend("auto", "cpu") == "sdpa"
    assert select_backend("auto", torch.device("cpu")) == "sdpa"
    assert select_backend("sdpa", "cpu") == "sdpa"
    assert select_backend("flash", "cpu", primitive=sdpa_varlen_primitive) == "flash"
    with pytest.raises(ValueError, match="'flash'.*CUDA"):
        select_backend("flash", "cpu")
    with pytest.raises(ValueError, match="unknown attention backend 'xformers'"):
        select_backend("xformers", "cpu")


def test_select_backend_on_cuda_without_flash_attn(monkeypatch):
    # Pure logic: no CUDA needed to ask about a cuda device.
    monkeypatch.setattr(attention, "_flash_attn_error", lambda: "flash-attn is not importable (ImportError)")
    with pytest.raises(ValueError, match="'flash'.*flash-attn") as info:
        select_backend("flash", "cuda")
    assert "\n" not in str(info.value)
    assert select_backend("auto", "cuda", dtype=torch.bfloat16) == "flex"
    monkeypatch.setattr(attention, "_flash_attn_error", lambda: None)
    assert select_backend("auto", "cuda", dtype=torch.bfloat16) == "flash"
    assert select_backend("auto", "cuda", dtype=torch.float32) == "flex"  # flash-attn has no fp32 kernels


BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
MISSING = "not importable (ImportError)"


@pytest.mark.parametrize("device, dtype, flash_error, flex_error, expect", [
    ("cuda", BF16, None, None, "flash"),
    ("cuda", FP16, None, None, "flash"),
    ("cuda", FP32, None, None, "flex"),        # flash-attn takes fp16/bf16 only
    ("cuda", FP32, None, MISSING, "sdpa"),
    ("cuda", BF16, MISSING, None, "flex"),
    ("cuda", BF16, MISSING, MISSING, "sdpa"),
    ("cuda", None, None, None, "flex"),        # dtype unknown: never guess flash
    ("cpu", BF16, None, None, "sdpa"),
    ("cpu", FP32, None, None, "sdpa"),
])
def test_auto_picks_by_device_and_dtype(device, dtype, flash_error, flex_error, expect):
    assert choose_backend("auto", device, dtype, flash_error, flex_error) == expect


def test_explicit_flash_with_fp32_is_a_one_line_error():
    with pytest.raises(ValueError) as info:
        choose_backend("flash", "cuda", FP32, None, None)
    msg = str(info.value)
    assert "\n" not in msg and "model.attention_backend" in msg and "float32" in msg
    assert choose_backend("flash", "cuda", BF16, None, None) == "flash"
    assert choose_backend("flash", "cuda", None, None, None) == "flash"  # dtype unknown: the primitive checks
    assert choose_backend("flash", "cpu", FP32, None, None, stand_in=True) == "flash"  # SDPA stand-in: any dtype
    # A caller that chose flash without knowing the dtype gets the same error from the
    # real primitive, before flash-attn is imported (so this runs on the CPU).
    q = k = v = torch.zeros(2, 1, 4)
    cu = torch.tensor([0, 2], dtype=torch.int32)
    with pytest.raises(ValueError, match="model.attention_backend.*float32"):
        flash_attn_primitive(q, k, v, cu, cu, 2, 2, causal=True)


@pytest.mark.parametrize("dtype", [FP32, BF16])
def test_forward_resolves_the_backend_with_the_models_dtype(dtype, tiny_base_dir, monkeypatch):
    """The model asks for its backend knowing the dtype of its activations (and
    autocast's, where autocast is on)."""
    from megafusion.model.config import FusionConfig
    from megafusion.model.fusion import LMFusionModel
    from megafusion.model.loading import load_base_model

    asked = []
    real = attention.choose_backend
    monkeypatch.setattr(attention, "choose_backend", lambda *a, **kw: asked.append(a[:3]) or real(*a, **kw))
    cfg = FusionConfig(image_mode="pixel", image_size=8, patch_size=4, patcher="linear", attention_backend="auto")
    model = LMFusionModel(load_base_model(tiny_base_dir), cfg).to(dtype)
    doc = [TextSegment([1, 5, model.boi_id]), ImageSegment(torch.zeros(3, 8, 8), timestep=10.0),
           TextSegment([model.eoi_id])]
    batch = PackedBatch.from_rows([[doc]], seq_len=8, tokens_per_image=4).to(dtype=dtype)
    with torch.no_grad():
        model(batch)
        assert ("auto", "cpu", dtype) in asked
        asked.clear()
        with torch.autocast("cpu", dtype=BF16):
            model(batch)
        assert ("auto", "cpu", BF16) in asked


@pytest.mark.parametrize("image_ids", [
    [[0, 0, -1, 0, -1, -1]],  # interrupted by text
    [[0, 1, 0, -1, -1, -1]],  # interrupted by another image
])
def test_flash_rejects_split_image_in_row(image_ids):
    with pytest.raises(ValueError, match="contiguous"):
        build(torch.zeros(1, 6, dtype=torch.long), torch.tensor(image_ids), "flash")


def test_flash_rejects_image_across_documents():
    document_ids = torch.tensor([[0, 0, 0, 1, 1, 1]])
    image_ids = torch.tensor([[-1, 0, 0, 0, -1, -1]])
    with pytest.raises(ValueError, match="one document"):
        build(document_ids, image_ids, "flash")
