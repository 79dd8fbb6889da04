"""Shared attention over all tokens of a packed batch, with the hybrid mask.

Query i may attend key j iff both are in the same packed document AND (j <= i, or both
are in the same image): causal text, bidirectional images, nothing across documents.

Three backends sit behind one call, `hybrid_attention(q, k, v, layout)`:

  sdpa   torch SDPA with an explicit [B, 1, L, L] boolean mask. Runs everywhere, has a
         backward on the CPU, and is the reference the others are tested against.
  flex   FlexAttention with a BlockMask (CUDA; on the CPU forward only, torch 2.14).
  flash  flash-attn varlen (CUDA, fp16/bf16 only), which cannot express the mask in one
         call; two calls do (see `_flash_attention`). Written against a small `attend`
         primitive so the CPU tests check the decomposition with SDPA standing in.

"auto" is resolved by `choose_backend` from the device and the activations' dtype, once
per forward pass. The layout (masks, index tensors) depends only on document_ids /
image_ids, so it is built once per forward pass too and shared by every layer.

This file ships as Hugging Face remote code: it imports nothing from deepspeed or from
megafusion outside megafusion/model, and flash_attn / flex imports stay lazy.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "sdpa", "flex", "flash")
# flash-attn's kernels exist for these only; fp32 inputs raise inside flash-attn.
FLASH_DTYPES = (torch.float16, torch.bfloat16)

# attend(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale)
# in flash-attn's varlen layout: q [total_q, Hq, d], k/v [total_k, Hkv, d], cu_seqlens
# int32 [n + 1]; returns [total_q, Hq, d].
AttendFn = Callable[..., torch.Tensor]


def hybrid_mask(document_ids: torch.Tensor, image_ids: torch.Tensor) -> torch.Tensor:
    """[B, L, L] bool, True where query i (dim 1) may attend key j (dim 2)."""
    L = document_ids.shape[1]
    same_doc = document_ids[:, :, None] == document_ids[:, None, :]
    causal = torch.ones(L, L, dtype=torch.bool, device=document_ids.device).tril()
    same_image = (image_ids[:, :, None] >= 0) & (image_ids[:, :, None] == image_ids[:, None, :])
    return same_doc & (causal | same_image)


# ---------------------------------------------------------------------------- primitives

def sdpa_varlen_primitive(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                          causal, scale=None):
    """CPU stand-in for flash_attn_varlen_func: one SDPA call per segment.

    SDPA's is_causal aligns the mask top-left while flash-attn aligns it bottom-right;
    the decomposition only asks for causal when q and k lengths are equal, where the two
    agree.
    """
    outs = []
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for s_q, e_q, s_k, e_k in zip(bounds_q[:-1], bounds_q[1:], bounds_k[:-1], bounds_k[1:]):
        # [len, H, d] -> [1, H, len, d]
        qs, ks, vs = (t.transpose(0, 1).unsqueeze(0) for t in (q[s_q:e_q], k[s_k:e_k], v[s_k:e_k]))
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=scale, enable_gqa=True)
        outs.append(o.squeeze(0).transpose(0, 1))
    return torch.cat(outs, dim=0)


def flash_attn_primitive(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                         causal, scale=None):
    """The real thing (CUDA, fp16/bf16). flash-attn handles GQA natively."""
    if q.dtype not in FLASH_DTYPES:  # a caller that chose the backend without knowing the dtype
        raise ValueError(_flash_dtype_error(q.dtype))
    # In try/except: transformers' remote-code loader scans every import of this file
    # and refuses to load a Hub model whose imports are missing, unless they are guarded.
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError as e:
        raise ValueError(f"attention backend 'flash' needs flash-attn ({e})") from None

    return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                  softmax_scale=scale, causal=causal)


# ------------------------------------------------------------------- backend selection

def _flash_dtype_error(dtype) -> str:
    return (f"model.attention_backend=flash: flash-attn takes fp16 or bf16 inputs, got {dtype}; "
            "use auto (flex or sdpa for fp32), flex or sdpa")


# Whether a package imports does not change within a process: probe once (select_backend
# runs on every forward pass).
@functools.lru_cache(maxsize=None)
def _flash_attn_error() -> Optional[str]:
    try:
        import flash_attn  # noqa: F401
    except Exception as e:  # ImportError, or a broken CUDA build raising anything else
        return f"flash-attn is not importable ({type(e).__name__}: {e})".splitlines()[0]
    return None


@functools.lru_cache(maxsize=None)
def _flex_error() -> Optional[str]:
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except Exception as e:
        return f"torch.nn.attention.flex_attention is not importable ({type(e).__name__}: {e})".splitlines()[0]
    return None


def choose_backend(requested: str, device_type: str, dtype: Optional[torch.dtype],
                   flash_error: Optional[str], flex_error: Optional[str], stand_in: bool = False) -> str:
    """The backend for `requested` in a given environment; pure, so every case is
    testable on the CPU. flash_error / flex_error: why that kernel cannot be imported
    (None: it can). dtype: what q/k/v will be, None when the caller does not know.

    "auto": flash on CUDA for fp16/bf16 with flash-attn (it has no fp32 kernels), else
    flex on CUDA, else sdpa; with the dtype unknown it never guesses flash. "flash" is
    accepted anywhere with a `stand_in` primitive (CPU tests; the stand-in takes any
    dtype), else it needs CUDA and flash-attn and refuses a dtype known to be neither
    fp16 nor bf16. "flex" is accepted on the CPU, where it runs forward only (torch has
    no CPU backward for it).
    """
    cuda = device_type == "cuda"
    if requested == "auto":
        if cuda and dtype in FLASH_DTYPES and flash_error is None:
            return "flash"
        if cuda and flex_error is None:
            return "flex"
        return "sdpa"
    if requested == "sdpa":
        return "sdpa"
    if requested == "flash":
        if stand_in:
            return "flash"
        if not cuda:
            raise ValueError(f"attention backend 'flash' needs a CUDA device, got {device_type}; use 'sdpa' or 'auto'")
        if flash_error is not None:
            raise ValueError(f"attention backend 'flash' unavailable: {flash_error}; use 'sdpa', 'flex' or 'auto'")
        if dtype is not None and dtype not in FLASH_DTYPES:
            raise ValueError(_flash_dtype_error(dtype))
        return "flash"
    if requested == "flex":
        if flex_error is not None:
            raise ValueError(f"attention backend 'flex' unavailable: {flex_error}; use 'sdpa' or 'auto'")
        return "flex"
    raise ValueError(f"unknown attention backend {requested!r}: expected one of {', '.join(BACKENDS)}")


def _autocast_on(device_type: str) -> bool:
    # torch raises for device types autocast does not know (meta, a test's stand-in
    # accelerator); there is no autocast on them.
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


def select_backend(requested: str, device, primitive: Optional[AttendFn] = None,
                   dtype: Optional[torch.dtype] = None) -> str:
    """choose_backend in this process's environment. dtype: the activations' dtype
    (autocast's where autocast is on for the device, as that is what q/k/v will be)."""
    device = torch.device(device)
    if dtype is not None and _autocast_on(device.type):
        dtype = torch.get_autocast_dtype(device.type)
    cuda = device.type == "cuda"
    return choose_backend(requested, device.type, dtype,
                          flash_error=_flash_attn_error() if cuda else None,
                          flex_error=_flex_error() if cuda or requested == "flex" else None,
                          stand_in=primitive is not None)


# ------------------------------------------------------------------------------ layout

# SDPA's CPU kernel skips nothing when given a mask: one call computes the whole L x L
# square, twice the work of causal attention. Cut into blocks of queries, each against
# only the keys it may see, the hybrid mask costs about what causal attention costs
# (tools/bench.py, 4096 tokens: 1.1x causal instead of 1.95x).
SDPA_QUERY_BLOCK = 256


@dataclass
class AttentionLayout:
    """What one backend needs to apply the hybrid mask; built once per forward pass.

    Flash fields index the flattened [B * L] tokens (row-major). Documents are maximal
    runs of equal document_ids within a row, so they never cross rows.
    """
    backend: str
    # sdpa
    mask: Optional[torch.Tensor] = None  # [B, 1, L, L] bool
    # sdpa, query-blocked: (q0, q1, k0, k1, mask[..., q0:q1, k0:k1]) per block of queries
    query_blocks: Optional[list] = None
    # flex
    block_mask: object = None  # torch.nn.attention.flex_attention.BlockMask
    # flash, call 1: causal over each document
    cu_seqlens: Optional[torch.Tensor] = None  # int32 [num_docs + 1]
    max_seqlen: int = 0
    # flash, call 2: each image's queries against its document prefix
    image_query_index: Optional[torch.Tensor] = None  # long [num_image_tokens]
    image_key_index: Optional[torch.Tensor] = None  # long [sum of prefix lengths]
    image_cu_seqlens_q: Optional[torch.Tensor] = None  # int32 [num_images + 1]
    image_cu_seqlens_k: Optional[torch.Tensor] = None  # int32 [num_images + 1]
    image_max_seqlen_q: int = 0
    image_max_seqlen_k: int = 0
    primitive: Optional[AttendFn] = None

    @classmethod
    def build(cls, document_ids: torch.Tensor, image_ids: torch.Tensor, backend: str,
              primitive: Optional[AttendFn] = None, query_block: int = SDPA_QUERY_BLOCK) -> "AttentionLayout":
        backend = select_backend(backend, document_ids.device, primitive)
        if backend == "sdpa":
            mask = hybrid_mask(document_ids, image_ids)[:, None]
            blocks = _query_blocks(mask, query_block) if mask.shape[-1] > query_block else None
            return cls(backend, mask=mask, query_blocks=blocks)
        if backend == "flex":
            return cls(backend, block_mask=_flex_block_mask(document_ids, image_ids))
        return cls._build_flash(document_ids, image_ids, primitive or flash_attn_primitive)

    @classmethod
    def _build_flash(cls, document_ids, image_ids, primitive) -> "AttentionLayout":
        B, L = document_ids.shape
        device = document_ids.device
        doc = document_ids.reshape(-1)
        img = image_ids.reshape(-1)
        pos = torch.arange(B * L, device=device)

        def cu(lengths):
            return F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)

        # Documents: a new one starts at every row start and wherever the id changes.
        doc_start = torch.ones_like(doc, dtype=torch.bool)
        doc_start[1:] = doc[1:] != doc[:-1]
        doc_start[::L] = True
        starts = pos[doc_start]
        doc_lens = torch.diff(starts, append=pos.new_tensor([B * L]))
        # For every token, the flat index where its document begins.
        first_of_doc = torch.cummax(torch.where(doc_start, pos, 0), dim=0).values

        layout = cls("flash", cu_seqlens=cu(doc_lens), max_seqlen=int(doc_lens.max()), primitive=primitive)

        query_index = pos[img >= 0]
        if query_index.numel() == 0:
            return layout
        # Images: runs of equal image id (two images may touch). An image must be one
        # contiguous run inside one document, else "the document prefix up to its last
        # token" would not be its key set.
        run_ids, q_lens = torch.unique_consecutive(img[query_index], return_counts=True)
        ends = q_lens.cumsum(0)
        first, last = query_index[ends - q_lens], query_index[ends - 1]
        key_start = first_of_doc[last]
        if (run_ids.numel() != torch.unique(run_ids).numel()
                or not torch.equal(last + 1 - first, q_lens) or not torch.equal(first_of_doc[first], key_start)):
            raise ValueError("image_ids: every image must occupy one contiguous run of positions in one document")
        k_lens = last + 1 - key_start
        # Concatenated ranges [key_start, last] without a python loop.
        cu_k = cu(k_lens)
        offsets = torch.arange(int(cu_k[-1]), device=device) - torch.repeat_interleave(cu_k[:-1].long(), k_lens)
        layout.image_query_index = query_index
        layout.image_key_index = torch.repeat_interleave(key_start, k_lens) + offsets
        layout.image_cu_seqlens_q = cu(q_lens)
        layout.image_cu_seqlens_k = cu_k
        layout.image_max_seqlen_q = int(q_lens.max())
        layout.image_max_seqlen_k = int(k_lens.max())
        return layout


def _query_blocks(mask: torch.Tensor, block: int) -> list:
    """Per block of `block` query rows: the key columns [k0, k1) that any row may
    attend (over the batch) and the mask cut down to them."""
    L = mask.shape[-1]
    seen = mask.any(dim=1)  # [B, L, L] -> over heads (one)
    plan = []
    for q0 in range(0, L, block):
        q1 = min(L, q0 + block)
        cols = seen[:, q0:q1].any(dim=1).any(dim=0).nonzero().flatten()
        # Every query sees at least itself, so cols is never empty.
        k0, k1 = int(cols.min()), int(cols.max()) + 1
        plan.append((q0, q1, k0, k1, mask[:, :, q0:q1, k0:k1].contiguous()))
    return plan


def _flex_block_mask(document_ids, image_ids):
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):
        same_doc = document_ids[b, q_idx] == document_ids[b, kv_idx]
        q_img = image_ids[b, q_idx]
        same_image = (q_img >= 0) & (q_img == image_ids[b, kv_idx])
        return same_doc & ((kv_idx <= q_idx) | same_image)

    B, L = document_ids.shape
    return create_block_mask(mask_mod, B, None, L, L, device=document_ids.device)


@functools.lru_cache(maxsize=None)
def _compiled_flex_attention():
    # Compiled once per process: eager flex materialises the full score matrix.
    # dynamic=False: packed batches have one fixed shape, and on the CPU (torch 2.14.1)
    # inductor's dynamic-shape flex kernel does not compile (undeclared cur_kvSplitSize8).
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


# --------------------------------------------------------------------------- attention

def hybrid_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: AttentionLayout,
                     scale: Optional[float] = None) -> torch.Tensor:
    """q [B, Hq, L, d], k/v [B, Hkv, L, d] (Hq a multiple of Hkv) -> [B, Hq, L, d]."""
    if layout.backend == "sdpa":
        if layout.query_blocks:
            return torch.cat([F.scaled_dot_product_attention(q[:, :, q0:q1], k[:, :, k0:k1], v[:, :, k0:k1],
                                                             attn_mask=m, scale=scale, enable_gqa=True)
                              for q0, q1, k0, k1, m in layout.query_blocks], dim=2)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=layout.mask, scale=scale, enable_gqa=True)
    if layout.backend == "flex":
        if q.device.type == "cpu" and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            raise ValueError("attention backend 'flex' has no backward on the CPU; use 'sdpa' or 'flash'")
        return _compiled_flex_attention()(q, k, v, block_mask=layout.block_mask, scale=scale, enable_gqa=True)
    if layout.backend == "flash":
        return _flash_attention(q, k, v, layout, scale)
    raise ValueError(f"unknown attention backend {layout.backend!r}")


def _flash_attention(q, k, v, layout: AttentionLayout, scale):
    """The hybrid mask as two varlen calls.

    Call 1, causal within each document, is right for every text query. An image query
    must also see the later tokens of its own image; its full key set is exactly the
    document prefix ending at the image's last token, so call 2 runs each image's queries
    non-causally against that prefix, and image rows take call 2's result.
    """
    B, Hq, L, d = q.shape
    # [B, H, L, d] -> [B * L, H, d], flash-attn's varlen layout.
    qf, kf, vf = (t.transpose(1, 2).reshape(B * L, t.shape[1], d) for t in (q, k, v))
    attend = layout.primitive
    out = attend(qf, kf, vf, layout.cu_seqlens, layout.cu_seqlens, layout.max_seqlen, layout.max_seqlen,
                 causal=True, scale=scale)
    if layout.image_query_index is not None:
        qi, ki = layout.image_query_index, layout.image_key_index
        image_out = attend(qf.index_select(0, qi), kf.index_select(0, ki), vf.index_select(0, ki),
                           layout.image_cu_seqlens_q, layout.image_cu_seqlens_k,
                           layout.image_max_seqlen_q, layout.image_max_seqlen_k, causal=False, scale=scale)
        out = out.index_copy(0, qi, image_out)
    return out.reshape(B, L, Hq, d).transpose(1, 2)
