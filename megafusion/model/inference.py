"""The fused model's cached forward: token batches, the KV cache, prefill and extend.
megafusion/model/tasks.py builds sampling on it (diffusion with classifier-free
guidance, text decoding, interleaved generation, the four tasks).

Everything here works on token ids and latents (no tokenizer, no files), so that the
exported Hugging Face model (megafusion/model/hf.py) can offer it without megafusion
installed; megafusion/generate.py adds tokenizers, images on disk and the command line.

Why a cache is exact here: under the hybrid mask no token's keys and values depend on a
later token (text is causal; an image is bidirectional only within itself and enters the
cache whole), so the keys/values of a prompt computed once equal those computed with any
continuation. A denoising step therefore runs only the image tokens, attending to the
cached prompt; DecoderLayer.forward_cached (megafusion/model/towers.py) is the per-layer computation.

Batches are left-padded: every row ends at the same column, so one new token per row
appends at the same place. `valid` marks real tokens; padding is never attended to (a
padding query attends to itself only, so that it stays finite). RoPE positions count
the valid tokens of a row, so a row's numbers do not depend on its padding.

Rows are lists of items: an int or a list of ints is text, a tensor [C, h, w] is a clean
image latent (t = 0), a (latent, t) tuple a noisy one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .batch import IMAGE
from .image_rope import rope_cos_sin
from .routing import Routing, prompt_vectors


# ------------------------------------------------------------------------------ inputs

@dataclass
class TokenBatch:
    """New tokens of every row, [B, L] each; images in row-major order of appearance."""

    input_ids: torch.Tensor  # text ids, 0 at image positions and padding
    modality: torch.Tensor  # TEXT / IMAGE
    valid: torch.Tensor  # bool, False at (left) padding
    image_ids: torch.Tensor  # index into images, -1 for text
    images: torch.Tensor  # [N, C, h, w] latents (noisy at `timesteps`)
    timesteps: torch.Tensor  # [N] float, 0 = clean


def encode_rows(rows: Sequence[Sequence], tokens_per_image: int, latent_shape=None, device=None) -> TokenBatch:
    """Left-padded TokenBatch from rows of items (see the module docstring)."""
    seqs = []  # per row: list of (kind, payload)
    for row in rows:
        items = []
        for item in row:
            if isinstance(item, int):
                items.append(("text", [item]))
            elif isinstance(item, torch.Tensor) and item.dim() == 3:
                items.append(("image", (item, 0.0)))
            elif isinstance(item, tuple):
                items.append(("image", (item[0], float(item[1]))))
            else:
                items.append(("text", [int(x) for x in item]))
        seqs.append(items)

    def length(items):
        return sum(len(p) if k == "text" else tokens_per_image for k, p in items)

    B, L = len(seqs), max((length(s) for s in seqs), default=0)
    input_ids = torch.zeros(B, L, dtype=torch.long)
    modality = torch.zeros(B, L, dtype=torch.long)
    valid = torch.zeros(B, L, dtype=torch.bool)
    image_ids = torch.full((B, L), -1, dtype=torch.long)
    images, timesteps = [], []
    for b, items in enumerate(seqs):
        pos = L - length(items)
        valid[b, pos:] = True
        for kind, payload in items:
            if kind == "text":
                n = len(payload)
                input_ids[b, pos:pos + n] = torch.tensor(payload, dtype=torch.long)
            else:
                n = tokens_per_image
                modality[b, pos:pos + n] = IMAGE
                image_ids[b, pos:pos + n] = len(images)
                images.append(payload[0].float().cpu())
                timesteps.append(payload[1])
            pos += n
    if images:
        images_t = torch.stack(images)
    else:
        images_t = torch.zeros((0, *(latent_shape or (1, 1, 1))))
    out = TokenBatch(input_ids, modality, valid, image_ids, images_t, torch.tensor(timesteps, dtype=torch.float32))
    return _to(out, device)


def _to(batch: TokenBatch, device) -> TokenBatch:
    if device is None:
        return batch
    return TokenBatch(*(getattr(batch, f).to(device) for f in
                        ("input_ids", "modality", "valid", "image_ids", "images", "timesteps")))


def image_batch(latents: torch.Tensor, t, tokens_per_image: int) -> TokenBatch:
    """R rows of one (noisy) image each: what a cached denoising step feeds."""
    R = latents.shape[0]
    device = latents.device
    t = torch.as_tensor(t, dtype=torch.float32, device=device).reshape(-1).expand(R).contiguous()
    return TokenBatch(
        input_ids=torch.zeros(R, tokens_per_image, dtype=torch.long, device=device),
        modality=torch.full((R, tokens_per_image), IMAGE, dtype=torch.long, device=device),
        valid=torch.ones(R, tokens_per_image, dtype=torch.bool, device=device),
        image_ids=torch.arange(R, device=device)[:, None].expand(R, tokens_per_image).contiguous(),
        images=latents, timesteps=t)


def text_batch(ids: torch.Tensor) -> TokenBatch:
    """One new text token per row: ids [B] (or [B, L] for several)."""
    ids = ids.reshape(ids.shape[0], -1)
    B, L = ids.shape
    return TokenBatch(ids, torch.zeros_like(ids), torch.ones(B, L, dtype=torch.bool, device=ids.device),
                      torch.full_like(ids, -1), torch.zeros(0, 1, 1, 1, device=ids.device),
                      torch.zeros(0, device=ids.device))


# ------------------------------------------------------------------------------- cache

@dataclass
class KVCache:
    """Keys (after RoPE) and values of every layer for the tokens seen so far."""

    keys: list  # per layer [B, Hkv, P, d]
    values: list
    valid: torch.Tensor  # [B, P] bool
    next_position: torch.Tensor  # [B] long: RoPE position of each row's next token
    # [B, hidden] under model.prompt_context (None otherwise): the last layer's hidden
    # state at each row's last token where it is text (zeros where it is an image): an
    # image that opens the next step's tokens reads its prompt vector from it.
    last_text: Optional[torch.Tensor] = None

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    @property
    def length(self) -> int:
        return self.valid.shape[1]

    def select(self, rows) -> "KVCache":
        """Rows by index (repeats allowed: one prompt, several samples)."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.valid.device)
        return KVCache([k.index_select(0, rows) for k in self.keys], [v.index_select(0, rows) for v in self.values],
                       self.valid.index_select(0, rows), self.next_position.index_select(0, rows),
                       None if self.last_text is None else self.last_text.index_select(0, rows))

    @classmethod
    def stack(cls, caches: Sequence["KVCache"]) -> "KVCache":
        """Rows of several caches in one, left-padded to the longest."""
        P = max(c.length for c in caches)

        def pad(x, n):  # left-pad dim 2 ([B, H, P, d]) or dim 1 ([B, P])
            if n == 0:
                return x
            shape = list(x.shape)
            dim = 2 if x.dim() == 4 else 1
            shape[dim] = n
            return torch.cat([x.new_zeros(shape), x], dim)

        n_layers = len(caches[0].keys)
        keys = [torch.cat([pad(c.keys[i], P - c.length) for c in caches], 0) for i in range(n_layers)]
        values = [torch.cat([pad(c.values[i], P - c.length) for c in caches], 0) for i in range(n_layers)]
        valid = torch.cat([pad(c.valid, P - c.length) for c in caches], 0)
        last = [c.last_text for c in caches]
        last_text = None if any(x is None for x in last) else torch.cat(last, 0)
        return cls(keys, values, valid, torch.cat([c.next_position for c in caches], 0), last_text)


# ----------------------------------------------------------------------------- forward

@dataclass
class StepOutput:
    h: torch.Tensor  # [B*L, hidden], last layer, modality-sorted order, before the final norms
    routing: Routing
    aux: Optional[torch.Tensor]  # the image tokenizer's aux (timesteps) for predict()
    cache: Optional[KVCache]  # the cache extended by these tokens (store=True)
    n_images: int


def _attention_mask(batch: TokenBatch, cache: Optional[KVCache]) -> torch.Tensor:
    """[B, 1, L, P + L] bool: every valid cached key; among the new tokens the hybrid mask
    (causal, bidirectional inside an image) over valid keys; every query sees itself."""
    valid, img = batch.valid, batch.image_ids
    B, L = valid.shape
    causal = torch.ones(L, L, dtype=torch.bool, device=valid.device).tril()
    same_image = (img[:, :, None] >= 0) & (img[:, :, None] == img[:, None, :])
    new = (causal | same_image) & valid[:, None, :]
    new |= torch.eye(L, dtype=torch.bool, device=valid.device)
    if cache is not None and cache.length:
        new = torch.cat([cache.valid[:, None, :].expand(B, L, cache.length), new], dim=2)
    return new[:, None]


def embed_tokens(model, batch: TokenBatch, understood: Optional[torch.Tensor] = None):
    """Modality-sorted input hidden states, as LMFusionModel.forward builds them;
    understood: a LLaVA base's features for the batch's image placeholder tokens."""
    dtype = model.image_token_embed.dtype
    routing = Routing.from_modality(batch.modality)
    parts, aux = [], None
    if routing.n_text:
        parts.append(model.embed(batch.input_ids.reshape(-1)[routing.text_positions], understood))
    n_images = batch.images.shape[0] if routing.n_image else 0
    if routing.n_image:
        if routing.n_image != n_images * model.tokens_per_image:
            raise ValueError(f"{routing.n_image} image positions but {n_images} images x {model.tokens_per_image} tokens")
        x = batch.images.to(device=model.image_token_embed.device, dtype=dtype)
        tokens, aux = model.image_tokenizer.embed(x, batch.timesteps.to(x.device))
        parts.append(tokens.reshape(-1, tokens.shape[-1]).to(parts[0].dtype if parts else dtype))
    h = parts[0] if len(parts) == 1 else torch.cat(parts, 0)
    return h, routing, aux, n_images


@torch.no_grad()
def forward_tokens(model, batch: TokenBatch, cache: Optional[KVCache] = None, store: bool = True,
                   understood: Optional[torch.Tensor] = None, layer_outputs: Optional[list] = None) -> StepOutput:
    """Run new tokens through the decoder stack against `cache` (earlier tokens).

    store=True returns the cache extended by the new tokens; store=False leaves it alone
    (denoising steps: the noisy image changes every step). layer_outputs, a list, gets
    the input hidden states and those after each layer (modality-sorted), for probes."""
    device = model.image_token_embed.device
    batch = _to(batch, device)
    h, routing, aux, n_images = embed_tokens(model, batch, understood)
    B = batch.valid.shape[0]
    start = cache.next_position if cache is not None else torch.zeros(B, dtype=torch.long, device=device)
    n_valid = batch.valid.long().cumsum(1)
    positions = (start[:, None] + n_valid - 1).clamp_min(0)
    positions = model.rope_positions(positions, batch.image_ids)
    cos, sin = rope_cos_sin(model.rotary_emb, h, positions)
    mask = _attention_mask(batch, cache)
    if layer_outputs is not None:
        layer_outputs.append(h)
    new_keys, new_values = [], []
    for i, layer in enumerate(model.layers):
        def kv_update(k, v, i=i):
            if store:
                new_keys.append(k)
                new_values.append(v)
            if cache is None or cache.length == 0:
                return k, v
            return torch.cat([cache.keys[i], k], 2), torch.cat([cache.values[i], v], 2)

        h = layer.forward_cached(h, routing, cos, sin, mask, kv_update)
        if layer_outputs is not None:
            layer_outputs.append(h)
    new_cache = None
    if store:
        if cache is None or cache.length == 0:
            keys, values, valid = new_keys, new_values, batch.valid
        else:
            keys = [torch.cat([a, b], 2) for a, b in zip(cache.keys, new_keys)]
            values = [torch.cat([a, b], 2) for a, b in zip(cache.values, new_values)]
            valid = torch.cat([cache.valid, batch.valid], 1)
        last_text = None
        if model.cfg.prompt_context:
            last = routing.inv.view(B, -1)[:, -1]  # rows are left-padded: the last column is valid
            last_text = torch.where((last < routing.n_text)[:, None], h.index_select(0, last), 0.0)
        new_cache = KVCache(keys, values, valid, start + n_valid[:, -1], last_text)
    return StepOutput(h, routing, aux, new_cache, n_images)


def last_logits(model, out: StepOutput) -> Optional[torch.Tensor]:
    """[B, V + 2] logits at each row's last position (None if one of them is an image)."""
    R = out.routing
    idx = R.inv.view(R.batch_size, R.seq_len)[:, -1]
    if bool((idx >= R.n_text).any()):
        return None
    return model.logits(model.text_norm(out.h.index_select(0, idx)))


def all_logits(model, out: StepOutput) -> torch.Tensor:
    """[B, L, V + 2] logits at every text position (0 at image positions)."""
    R = out.routing
    full = model.logits(model.text_norm(out.h[:R.n_text]))
    logits = full.new_zeros(R.n_tokens, full.shape[-1])
    logits[R.text_positions] = full
    return logits.view(R.batch_size, R.seq_len, -1)


def image_predictions(model, out: StepOutput, cache: Optional[KVCache] = None) -> torch.Tensor:
    """[N, C, h, w]: the objective's prediction (epsilon or velocity) for each image.
    cache: the one `out` ran against, for the prompt vector of an image that opens the
    new tokens (model.prompt_context; the training forward's prompt_vectors otherwise)."""
    h = model.image_norm(out.h[out.routing.n_text:]).view(out.n_images, model.tokens_per_image, -1)
    context = None
    if model.cfg.prompt_context:
        context = prompt_vectors(out.h, out.routing, out.n_images, model.tokens_per_image, model.text_norm,
                                 None if cache is None else cache.last_text)
    return model.image_tokenizer.predict(h, out.aux, context)


def prefill(model, rows: Sequence[Sequence]) -> tuple[KVCache, Optional[torch.Tensor]]:
    """Cache for left-padded rows, and the logits at their last positions."""
    batch = encode_rows(rows, model.tokens_per_image, model.image_tokenizer.latent_shape)
    out = forward_tokens(model, batch)
    return out.cache, last_logits(model, out)


def extend(model, cache: KVCache, rows_or_ids) -> tuple[KVCache, Optional[torch.Tensor]]:
    """Append tokens to every row: a [B] tensor of ids (one text token per row), or rows
    of items of equal length (e.g. [[(latent, 0.0), eoi]])."""
    if isinstance(rows_or_ids, torch.Tensor):
        batch = text_batch(rows_or_ids)
    else:
        batch = encode_rows(rows_or_ids, model.tokens_per_image, model.image_tokenizer.latent_shape)
        if not bool(batch.valid.all()):
            raise ValueError("extend: rows must have equal lengths")
    out = forward_tokens(model, batch, cache)
    return out.cache, last_logits(model, out)
