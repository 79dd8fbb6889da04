"""Model FLOPs of one training step (forward + backward), for MFU.

Counted: the matmuls of the decoder layers (q/k/v/o projections and the MLP), the LM
head at the positions where logits are computed, attention over the (query, key) pairs
the mask allows, and whatever image in/out FLOPs the caller passes (e.g.
linear_patcher_flops). Not counted:
norms, RoPE, softmax, embedding lookups, the per-image timestep MLPs and the two BOI/EOI
logit columns (together well under 0.1% of a 1B model's step).

A linear layer with W weights costs 2W FLOPs per token forward; backward costs 2W for the
input gradient and 2W for the weight gradient. A token through a trainable tower costs
6W, through a frozen one 4W: autograd still propagates the input gradient through the
frozen text tower (image tokens downstream need it) but computes no weight gradient. That
is the frozen tower's saving, and why a dense 6N count would overstate the fused model's
work on text tokens by half.

Attention, per allowed pair and query head of dimension d: 2d for Q.K and 2d for P.V
forward, twice that backward (dP and dV, then dQ and dK): 12d. Kernels that recompute
scores in the backward pass (flash) do more hardware FLOPs; MFU counts model FLOPs.

The decoder-layer design (model.tower_mode, megafusion/model/layer_*.py) adds to that:
dual_tower runs the other tower's q/k/v on every token (the trainable one on text tokens,
6 x; the text one on image tokens, w_text x) and two attentions; xfuse and gated_tower
also run the text block's o_proj and MLP on image tokens (w_text x); single_tower is the
dense count with the text tower trainable.
"""
from __future__ import annotations

import torch

from megafusion.model.attention import hybrid_mask

FORMULA = (
    "flops = L*P*(w_text*text_tokens + 6*image_tokens) + w_text*hidden*vocab*logit_tokens "
    "+ 12*L*heads*head_dim*attention_pairs + image_io; "
    "P = matmul weights of one decoder layer (q,k,v,o + gate,up,down), L = layers; "
    "w_text = 4 when the text tower is frozen (forward 2 + input gradient 2, no weight gradient), "
    "else 6; attention_pairs = (query, key) pairs the mask allows, summed over rows; "
    "image_io = linear patcher 10*patch_dim*hidden per image token (in: 4, its input is data; out: 6); "
    "MFU = flops / (step seconds * peak FLOP/s); "
    "dual_tower adds L*Pqkv*(6*text_tokens + w_text*image_tokens) and doubles attention; "
    "xfuse and gated_tower add L*(P - Pqkv)*w_text*image_tokens on top"
)
TWO_STREAMS = ("dual_tower", "xfuse", "gated_tower")


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def layer_matmul_params(config) -> int:
    """Weights of one Llama decoder layer's matmuls (biases and norms excluded)."""
    h, d = config.hidden_size, head_dim(config)
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    return h * q + 2 * h * kv + q * h + 3 * h * config.intermediate_size


def layer_qkv_params(config) -> int:
    """Weights of one decoder layer's q, k and v projections."""
    h, d = config.hidden_size, head_dim(config)
    return h * (config.num_attention_heads + 2 * config.num_key_value_heads) * d


def causal_pairs(batch: int, seq_len: int) -> int:
    """Pairs of plain causal attention over `batch` rows of `seq_len` tokens."""
    return batch * seq_len * (seq_len + 1) // 2


def attention_pairs(document_ids: torch.Tensor, image_ids: torch.Tensor) -> int:
    """Pairs the hybrid mask allows (causal text, bidirectional images, per document)."""
    return int(sum(hybrid_mask(document_ids[b:b + 1], image_ids[b:b + 1]).sum() for b in range(document_ids.shape[0])))


def attention_pairs_packed(document_ids: torch.Tensor, image_ids: torch.Tensor) -> int:
    """attention_pairs in O(tokens), for the trainer's per-step MFU: a text token sees
    the tokens of its document up to itself; an image token sees its document's tokens
    before the image and the whole image. Assumes documents and images are contiguous
    runs of positions (what the packer writes); equal to the mask count then."""
    b, length = document_ids.shape
    pos = torch.arange(length, device=document_ids.device).expand(b, length)
    new_doc = torch.ones_like(document_ids, dtype=torch.bool)
    new_doc[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    doc_start = torch.cummax(torch.where(new_doc, pos, torch.zeros_like(pos)), dim=1).values
    is_image = image_ids >= 0
    new_img = is_image.clone()
    new_img[:, 1:] &= image_ids[:, 1:] != image_ids[:, :-1]
    img_start = torch.cummax(torch.where(new_img, pos, torch.zeros_like(pos)), dim=1).values
    # Image length: count of positions sharing the row's image id (ids are unique per batch).
    flat = torch.where(is_image, image_ids, torch.full_like(image_ids, -1)).flatten()
    counts = torch.bincount(flat[flat >= 0], minlength=int(flat.max().item()) + 1 if is_image.any() else 1)
    img_len = torch.where(is_image, counts[image_ids.clamp(min=0)], torch.zeros_like(image_ids))
    text_keys = pos - doc_start + 1
    image_keys = img_start - doc_start + img_len
    return int(torch.where(is_image, image_keys, text_keys).sum())


def patcher_forward_flops_per_image(shapes, latent_hw: tuple[int, int], tokens_per_image: int) -> int:
    """Forward FLOPs of the image tokenizer's trainable sides for one image, from its
    parameters' (name, shape): a convolution runs at every latent position (the U-Net
    patcher keeps the latent resolution), a patch projection (name ending proj.weight)
    at every image token; time-embedding MLPs run once per image and are left out. The
    VAE is not run in training (tools/prepare_data.py --vae stores latents)."""
    h, w = latent_hw
    total = 0
    for name, shape in shapes:
        numel = 1
        for d in shape:
            numel *= int(d)
        if ".vae." in f".{name}":
            continue
        if len(shape) == 4:
            total += 2 * numel * h * w
        elif len(shape) == 2 and name.endswith("proj.weight"):
            total += 2 * numel * tokens_per_image
    return total


def linear_patcher_flops(patch_dim: int, hidden: int, image_tokens: int) -> int:
    """The linear patcher's in and out projections (patch_dim <-> hidden) over image_tokens:
    the input projection has no input gradient (its input is the noisy image), so 4 x its
    weights; the output projection 6 x."""
    return 10 * patch_dim * hidden * image_tokens


def train_step_flops(config, *, text_tokens: int, logit_tokens: int, attention_pairs: int,
                     image_tokens: int = 0, frozen_text: bool = False, image_io: int = 0,
                     tower_mode: str = "lmfusion") -> dict:
    """FLOPs of one forward + backward pass, by part (see FORMULA).

    A dense Llama step: text_tokens = logit_tokens = B * L, image_tokens = 0,
    frozen_text False, attention_pairs = causal_pairs(B, L). The fused model with its
    frozen text tower: frozen_text True, logit_tokens = text targets (it computes logits
    there only), attention_pairs from the hybrid mask.
    """
    w_text = 4 if frozen_text else 6
    layers = config.num_hidden_layers
    P, qkv = layer_matmul_params(config), layer_qkv_params(config)
    matmuls = P * (w_text * text_tokens + 6 * image_tokens)
    if tower_mode in TWO_STREAMS:
        matmuls += qkv * (6 * text_tokens + w_text * image_tokens)
    if tower_mode in ("xfuse", "gated_tower"):
        matmuls += (P - qkv) * w_text * image_tokens
    streams = 2 if tower_mode in TWO_STREAMS else 1
    parts = {
        "layers": layers * matmuls,
        "lm_head": w_text * config.hidden_size * config.vocab_size * logit_tokens,
        "attention": streams * 12 * layers * config.num_attention_heads * head_dim(config) * attention_pairs,
        "image_io": image_io,
    }
    parts["total"] = sum(parts.values())
    return parts
