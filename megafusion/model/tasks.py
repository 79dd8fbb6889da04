"""Sampling over the cached forward (megafusion/model/inference.py): diffusion with
classifier-free guidance, text decoding, interleaved generation, and the four tasks
(text to image, image to text, text to text, a VLM base's image to text).

Like inference.py it works on token ids and latents only (no tokenizer, no files), so the
exported Hugging Face model (megafusion/model/hf.py) offers it without megafusion
installed; megafusion/generate.py adds tokenizers, images on disk and the command line.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from .diffusion import denoise_step, make_sampler_scheduler
from .inference import (KVCache, encode_rows, extend, forward_tokens, image_batch, image_predictions, last_logits,
                        prefill)

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
