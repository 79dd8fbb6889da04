"""Inference over the fused model with a KV cache: prefill, text decoding, diffusion
sampling with classifier-free guidance, and interleaved generation.

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
from typing import Callable, Optional, Sequence

import torch

from .batch import IMAGE
from .diffusion import denoise_step, make_sampler_scheduler
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


# --------------------------------------------------------------------------- diffusion

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cached_denoiser(model, cache: KVCache) -> Denoiser:
    """A denoising step costs only the image tokens: they attend to the cached prompt."""

    def denoise(x_t, t):
        out = forward_tokens(model, image_batch(x_t, t, model.tokens_per_image), cache, store=False)
        return model.objective.velocity(image_predictions(model, out, cache), x_t,
                                        torch.as_tensor(t, device=x_t.device))

    return denoise


def uncached_denoiser(model, rows: Sequence[Sequence]) -> Denoiser:
    """The reference: every step runs prompt and image tokens from scratch."""

    def denoise(x_t, t):
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1).expand(x_t.shape[0])
        full = [list(row) + [(x_t[i], float(t[i]))] for i, row in enumerate(rows)]
        batch = encode_rows(full, model.tokens_per_image, model.image_tokenizer.latent_shape)
        return model.objective.velocity(image_predictions(model, forward_tokens(model, batch, None, store=False)),
                                        x_t, t)

    return denoise


@torch.no_grad()
def sample_latents(model, denoiser: Denoiser, n: int, steps: int = 50, guidance_scale: float = 1.0,
                   generator: Optional[torch.Generator] = None, noise: Optional[torch.Tensor] = None,
                   progress: Callable = lambda it: it) -> torch.Tensor:
    """n clean latents [n, C, h, w] by the model's sampler (make_sampler_scheduler: DPM-Solver++
    for the epsilon objective, Euler for rectified flow).

    With guidance_scale != 1 the denoiser's rows are n conditional then n unconditional
    ones, run in one forward per step; prediction = uncond + s * (cond - uncond)."""
    sched = make_sampler_scheduler(model.cfg, steps)
    shape = (n, *model.image_tokenizer.latent_shape)
    x = noise.float().clone() if noise is not None else torch.randn(shape, generator=generator, dtype=torch.float32)
    x = x.to(model.image_token_embed.device) * float(getattr(sched, "init_noise_sigma", 1.0))
    guided = guidance_scale != 1.0
    for t in progress(sched.timesteps):
        t_rows = torch.full((2 * n if guided else n,), float(t), dtype=torch.float32, device=x.device)
        x_in = torch.cat([x, x]) if guided else x
        pred = denoiser(x_in, t_rows).float()
        if guided:
            cond, uncond = pred.chunk(2)
            pred = uncond + guidance_scale * (cond - uncond)
        x = denoise_step(sched, pred, t, x)
    return x


# -------------------------------------------------------------------------------- text

def pick_tokens(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Greedy (temperature 0) or nucleus sampling; logits [B, V] -> ids [B]."""
    logits = logits.float()
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, -1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


def _ban(logits: torch.Tensor, banned) -> torch.Tensor:
    banned = [b for b in banned if b is not None]
    if banned:
        logits = logits.clone()
        logits[:, banned] = float("-inf")
    return logits


@torch.no_grad()
def decode_text(model, cache: KVCache, logits: torch.Tensor, *, max_new_tokens: int, eos_token_id: int,
                banned: Sequence[int] = (), temperature: float = 0.0, top_p: float = 1.0,
                generator: Optional[torch.Generator] = None, logits_processor: Optional[Callable] = None,
                min_new_tokens: int = 0):
    """Continue every row until it emits EOS or max_new_tokens; returns the new ids of
    each row (EOS not included) and the final cache. logits_processor(new_ids, logits)
    may rewrite the [B, V + 2] logits before a token is picked. EOS cannot be picked
    before min_new_tokens (as transformers' min_new_tokens)."""
    B = logits.shape[0]
    out = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool)
    for step in range(max_new_tokens):
        lg = logits.float()
        if logits_processor is not None:
            lg = logits_processor(out, lg)
        ban = tuple(banned) + ((eos_token_id,) if step < min_new_tokens and 0 <= eos_token_id < lg.shape[-1] else ())
        nxt = pick_tokens(_ban(lg, ban), temperature, top_p, generator).cpu()
        nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
        for b in range(B):
            if not done[b] and int(nxt[b]) != eos_token_id:
                out[b].append(int(nxt[b]))
        done |= nxt == eos_token_id
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        cache, logits = extend(model, cache, nxt.to(cache.valid.device))
    return out, cache


# ------------------------------------------------------------------------- interleaved

@torch.no_grad()
def interleave(model, prompt_ids: Sequence[int], *, boi: int, eoi: int, eos: int, uncond_ids: Sequence[int],
               max_new_tokens: int = 256, max_images: int = 4, steps: int = 50, guidance_scale: float = 1.0,
               temperature: float = 0.0, top_p: float = 1.0, generator: Optional[torch.Generator] = None,
               logits_processor: Optional[Callable] = None, progress: Callable = lambda it: it) -> list:
    """Free generation of one row: text until the model emits BOI, then an image by
    diffusion against everything so far (the unconditional rows for guidance are
    `uncond_ids`, the empty caption [BOS, BOI]), then the clean image and EOI enter the
    context and text continues; stops at EOS or after max_new_tokens text tokens.

    Returns segments: lists of text ids and [C, h, w] latents, in order."""
    cache, logits = prefill(model, [list(prompt_ids)])
    segments, text, new_ids, n_images = [], [], [], 0
    uncond = None
    for _ in range(max_new_tokens):
        lg = logits.float()
        if logits_processor is not None:
            lg = logits_processor([new_ids], lg)
        nxt = int(pick_tokens(_ban(lg, [eoi] + ([boi] if n_images >= max_images else [])),
                              temperature, top_p, generator)[0])
        new_ids.append(nxt)
        if nxt == eos:
            break
        cache, logits = extend(model, cache, torch.tensor([nxt], device=cache.valid.device))
        if nxt != boi:
            text.append(nxt)
            continue
        if text:
            segments.append(text)
            text = []
        context = cache
        if guidance_scale != 1.0:
            if uncond is None:
                uncond, _ = prefill(model, [list(uncond_ids)])
            context = KVCache.stack([cache, uncond])
        latent = sample_latents(model, cached_denoiser(model, context), 1, steps=steps,
                                guidance_scale=guidance_scale, generator=generator, progress=progress)[0]
        segments.append(latent)
        n_images += 1
        cache, logits = extend(model, cache, [[(latent, 0.0), eoi]])
    if text:
        segments.append(text)
    return segments


# ------------------------------------------------------------------------------ tasks

@torch.no_grad()
def text_to_image(model, prompts: Sequence[Sequence[int]], *, bos: Optional[int], boi: int, num_images: int = 1,
                  steps: int = 50, guidance_scale: float = 1.0, generator: Optional[torch.Generator] = None,
                  use_cache: bool = True, progress: Callable = lambda it: it) -> torch.Tensor:
    """Latents [len(prompts) * num_images, C, h, w] (prompt-major) for caption token ids.

    Each prompt is laid out as a generation sample of the data pipeline: [BOS] caption
    [BOI], then the image. The unconditional row for guidance is the dropped caption,
    [BOS][BOI]. All prompts (and the unconditional row) are prefilled once in one
    left-padded batch; use_cache=False re-runs them at every step (the reference)."""
    head = [bos] if bos is not None else []
    rows = [head + list(p) + [boi] for p in prompts]
    guided = guidance_scale != 1.0
    P, n = len(rows), num_images
    # Row order of the denoiser: n samples of prompt 0, of prompt 1, ..., then as many
    # unconditional rows.
    order = [i for i in range(P) for _ in range(n)]
    if guided:
        rows = rows + [head + [boi]]
        order = order + [P] * (P * n)
    if use_cache:
        cache, _ = prefill(model, rows)
        denoiser = cached_denoiser(model, cache.select(order))
    else:
        denoiser = uncached_denoiser(model, [rows[i] for i in order])
    return sample_latents(model, denoiser, P * n, steps=steps, guidance_scale=guidance_scale,
                          generator=generator, progress=progress)


@torch.no_grad()
def image_to_text(model, latents: torch.Tensor, *, bos: Optional[int], boi: int, eoi: int, eos: int,
                  prompt: Sequence[int] = (), max_new_tokens: int = 64, temperature: float = 0.0,
                  top_p: float = 1.0, generator: Optional[torch.Generator] = None,
                  logits_processor: Optional[Callable] = None, min_new_tokens: int = 0) -> list:
    """Caption ids for each clean latent [N, C, h, w]: the understanding layout of the data
    pipeline, [BOS][BOI] image [EOI] (then `prompt`, if any), decoded with the KV cache
    until EOS. BOI and EOI are never sampled."""
    head = [bos] if bos is not None else []
    rows = [head + [boi, latents[i], eoi] + list(prompt) for i in range(latents.shape[0])]
    cache, logits = prefill(model, rows)
    out, _ = decode_text(model, cache, logits, max_new_tokens=max_new_tokens, eos_token_id=eos, banned=(boi, eoi),
                         temperature=temperature, top_p=top_p, generator=generator, logits_processor=logits_processor,
                         min_new_tokens=min_new_tokens)
    return out


@torch.no_grad()
def vlm_image_to_text(model, prompts: Sequence[Sequence[int]], pixel_values: torch.Tensor,
                      image_sizes: Optional[torch.Tensor] = None, *, eos: int, max_new_tokens: int = 64,
                      banned: Sequence[int] = (), temperature: float = 0.0, top_p: float = 1.0,
                      generator: Optional[torch.Generator] = None, logits_processor: Optional[Callable] = None,
                      min_new_tokens: int = 0) -> list:
    """Captioning through a LLaVA base's own understanding path (LLaVAFusion): prompts
    are token ids as the VLM's processor writes them (each image's placeholder token
    repeated once per feature), pixel_values (and image_sizes) its images in order. The
    features fill the placeholders and the frozen text tower decodes with the KV cache,
    so greedy decoding (banned = BOI, EOI) is the VLM's own greedy output."""
    if model.understanding is None:
        raise ValueError("vlm_image_to_text needs a model built on a LLaVA base (model.base)")
    device = model.image_token_embed.device
    sizes = image_sizes.to(device) if image_sizes is not None else None
    features = model.understanding(pixel_values.to(device), sizes)
    batch = encode_rows([list(p) for p in prompts], model.tokens_per_image, model.image_tokenizer.latent_shape)
    out = forward_tokens(model, batch, understood=features)
    new, _ = decode_text(model, out.cache, last_logits(model, out), max_new_tokens=max_new_tokens, eos_token_id=eos,
                         banned=banned, temperature=temperature, top_p=top_p, generator=generator,
                         logits_processor=logits_processor, min_new_tokens=min_new_tokens)
    return new


@torch.no_grad()
def text_to_text(model, prompts: Sequence[Sequence[int]], *, bos: Optional[int], eos: int, banned: Sequence[int] = (),
                 max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                 generator: Optional[torch.Generator] = None, logits_processor: Optional[Callable] = None) -> list:
    """Continuations of text prompts ([BOS] prompt), batched and left-padded. With
    banned = (BOI, EOI) and greedy decoding this is exactly the base model's greedy
    output: the first V logits are the base model's."""
    head = [bos] if bos is not None else []
    cache, logits = prefill(model, [head + list(p) for p in prompts])
    out, _ = decode_text(model, cache, logits, max_new_tokens=max_new_tokens, eos_token_id=eos, banned=banned,
                         temperature=temperature, top_p=top_p, generator=generator, logits_processor=logits_processor)
    return out
