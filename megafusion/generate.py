"""Sampling from a megafusion model: text to image, image to text, text to text, and
interleaved text and images.

    python tools/generate.py --model DIR image --prompt "a red circle" [--steps 50] [--cfg 3] [--seed 0] [--n 4] --out x.png
    python tools/generate.py --model DIR caption --image x.png [--max-new-tokens 64]
    python tools/generate.py --model DIR text --prompt "The capital of France is"
    python tools/generate.py --model DIR interleave --prompt "..." --out story.md

DIR is a directory written by tools/convert_to_hf.py, or a training run / checkpoint
directory (consolidated on the fly, as the exporter does). From Python:

    from megafusion import generate as G
    gen = G.load("runs/demo")
    images = G.generate_image(gen, ["a red circle in the center"], n=4, seed=0)   # PIL images
    G.caption(gen, images)                     # ["a red circle in the center"]
    G.generate_text(gen, ["The capital of France is"])
    G.interleave(gen, "Draw a red circle:")    # ["text", <PIL image>, "text", ...]

How the model is asked (megafusion/model/tasks.py does the work over inference.py's KV cache):
- image: [BOS] caption [BOI] then the image, as the data pipeline lays out a generation
  sample; classifier-free guidance against the dropped caption [BOS][BOI] (what the
  data pipeline's caption_drop trains), conditional and unconditional rows in one
  forward; the prompts' keys and values are computed once and every denoising step runs
  the image tokens only. DPM-Solver++(2M) (epsilon objective) or Euler (rectified flow) through
  megafusion.model.diffusion.make_sampler_scheduler.
- caption: [BOS][BOI] clean image [EOI], then greedy (or sampled) text until the EOS the
  data pipeline closes documents with (megafusion.data.sequence.text_special_ids).
- text: [BOS] prompt, BOI/EOI never sampled: greedy decoding is the base model's own.
- interleave: text until the model emits BOI, an image by diffusion, the image and EOI
  into the context, text again.
"""
from __future__ import annotations

import argparse
import html
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch

from megafusion.model import tasks

ImageLike = Union[str, os.PathLike, "PIL.Image.Image", torch.Tensor]  # noqa: F821


class GenerateError(ValueError):
    """A bad model path, input file or option (one line)."""


@dataclass
class Generator:
    model: object  # LMFusionModel, eval mode
    tokenizer: object
    bos: Optional[int]
    eos: int
    boi: int
    eoi: int
    steps: int = 50
    guidance_scale: float = 3.0
    source: str = ""
    # A LLaVA base's AutoProcessor (LLaVAFusion): captions then take the VLM's own path.
    processor: object = None

    @property
    def device(self) -> torch.device:
        return self.model.image_token_embed.device

    def tokenize(self, text: str) -> list[int]:
        # As the data pipeline does (megafusion/data/dataset.py): no special tokens.
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([i for i in ids if i < self.model.vocab_size], skip_special_tokens=True)

    # The API under the same names as the module functions.
    def generate_image(self, prompts, **kw):
        return generate_image(self, prompts, **kw)

    def caption(self, images, **kw):
        return caption(self, images, **kw)

    def generate_text(self, prompts, **kw):
        return generate_text(self, prompts, **kw)

    def interleave(self, prompt, **kw):
        return interleave(self, prompt, **kw)


# ------------------------------------------------------------------------------ loading

def check_device(device: str | torch.device) -> None:
    """Refuse a --device that torch cannot place a tensor on (a misspelt name, CUDA
    without a GPU, an index past the last GPU), before a model is loaded."""
    try:
        torch.empty(0, device=torch.device(device))
    except (RuntimeError, AssertionError, ValueError, TypeError) as exc:
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise GenerateError(f"--device {device}: not a usable device ({why})") from None


def check_decoding(temperature: float, top_p: float) -> None:
    """Text sampling settings: temperature >= 0 (0 = greedy), 0 < top_p <= 1 (top_p 0 keeps
    no token at all)."""
    if not (math.isfinite(float(temperature)) and temperature >= 0):
        raise GenerateError(f"--temperature {temperature}: must be a number >= 0 (0 = greedy)")
    if not 0 < top_p <= 1:
        raise GenerateError(f"--top-p {top_p}: must be in (0, 1]")


def check_steps(steps: int, gen: "Generator | None" = None) -> None:
    """Denoising steps: >= 1 and, given the model, no more than its sampler allows (its
    training timesteps), as generate_image requires."""
    if int(steps) < 1:
        raise GenerateError(f"--steps {steps}: must be >= 1")
    if gen is not None:
        from megafusion.model.diffusion import make_sampler_scheduler

        try:
            make_sampler_scheduler(gen.model.cfg, int(steps))
        except ValueError as exc:
            raise GenerateError(f"--steps {steps}: {str(exc).splitlines()[0]}") from None


def _is_export(path: Path) -> bool:
    try:
        return json.loads((path / "config.json").read_text()).get("model_type") == "megafusion"
    except (OSError, ValueError):
        return False


def load(path: str | os.PathLike, tag: str | None = None, device: str | torch.device = "cpu",
         dtype: torch.dtype | None = None) -> Generator:
    """A Generator for an exported model directory or a run / checkpoint directory."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise GenerateError(f"--model {path}: no such directory")
    if _is_export(p):
        from safetensors import SafetensorError

        from megafusion.model.hf import LMFusionForCausalLM
        from megafusion.model.loading import tokenizer_from_dir

        try:
            hf = LMFusionForCausalLM.from_pretrained(str(p), dtype=dtype)
            tokenizer = tokenizer_from_dir(p)  # not AutoTokenizer: see tokenizer_from_dir (transformers 5)
            processor = None
            if hf.model.understanding is not None:  # a LLaVA base's processor, saved with the export
                from transformers import AutoProcessor

                processor = AutoProcessor.from_pretrained(str(p), use_fast=False)
        except (OSError, ValueError, RuntimeError, KeyError, EOFError, SafetensorError) as exc:
            # a partial or damaged export: missing or truncated files, bad JSON, wrong shapes
            raise GenerateError(f"--model {path}: cannot load the exported model ({type(exc).__name__}: "
                                f"{str(exc).strip().splitlines()[0] if str(exc).strip() else 'no details'})") from None
        c, g = hf.config, hf.generation_config
        steps, scale = getattr(g, "image_num_inference_steps", None), getattr(g, "image_guidance_scale", None)
        gen = Generator(hf.model.eval(), tokenizer, c.bos_token_id, c.eos_token_id, c.boi_token_id, c.eoi_token_id,
                        steps=50 if steps is None else int(steps), guidance_scale=3.0 if scale is None else float(scale),
                        source=str(p), processor=processor)
    else:
        from megafusion.checkpoint_reader import ExportError, find_checkpoint, load_checkpoint_model
        from megafusion.export import special_ids
        from megafusion.model.loading import load_tokenizer

        try:
            find_checkpoint(p, tag)
        except ExportError as exc:
            raise GenerateError(f"--model {path}: not an exported model (no config.json with model_type "
                                f"megafusion) nor a checkpoint ({exc})") from None
        try:
            fused, cfg, _ = load_checkpoint_model(p, tag)
        except ExportError as exc:
            raise GenerateError(str(exc)) from None
        tokenizer = load_tokenizer(cfg.model.base)
        bos, eos = special_ids(tokenizer, cfg.data)
        if dtype is not None:
            # Parameters only, as from_pretrained(dtype=) does for an export: module.to()
            # would cast fp32 buffers too, and RoPE's inv_freq in bf16 puts the angle at
            # position 4095 off by radians.
            for param in fused.parameters():
                param.data = param.data.to(dtype)
        gen = Generator(fused, tokenizer, bos, eos, fused.boi_id, fused.eoi_id,
                        steps=cfg.log.sample_diffusion_steps, guidance_scale=cfg.log.sample_guidance, source=str(p),
                        processor=vlm_processor(fused, cfg.model.base))
    gen.model.to(device)
    return gen


def vlm_processor(fused, base: str):
    """The base's processor when the model understands through a LLaVA base, else None."""
    if getattr(fused, "understanding", None) is None:
        return None
    from transformers import AutoProcessor

    from megafusion.model.loading import resolve_base

    return AutoProcessor.from_pretrained(str(resolve_base(base)), use_fast=False)


# ------------------------------------------------------------------------------- images

def _progress(enabled: bool, desc: str) -> Callable:
    if not enabled:
        return lambda it: it
    from tqdm import tqdm

    return lambda it: tqdm(it, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)


def to_pil(pixels: torch.Tensor):
    """[3, H, W] in [-1, 1] -> PIL RGB."""
    from PIL import Image

    a = ((pixels.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(a, "RGB")


def image_grid(images: Sequence, cols: int | None = None):
    """PIL images in a grid (as square as possible)."""
    from PIL import Image

    n = len(images)
    cols = cols or max(1, int(n ** 0.5 + 0.999999))
    rows = (n + cols - 1) // cols
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), (255, 255, 255))
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid


def _pixels(gen: Generator, image: ImageLike) -> torch.Tensor:
    """An image (path, PIL or [3, H, W] tensor in [-1, 1]) -> [3, S, S] in [-1, 1] at the
    model's image size, resized and centre-cropped as the data pipeline does."""
    from megafusion.data.images import resize_center_crop, to_rgb, to_tensor

    size = gen.model.cfg.image_size
    if isinstance(image, torch.Tensor):
        if tuple(image.shape) != (3, size, size):
            raise GenerateError(f"image tensor of shape {tuple(image.shape)}: expected (3, {size}, {size})")
        return image.float()
    return to_tensor(resize_center_crop(to_rgb(_open_image(image)), size))


def _open_image(image):
    """A PIL image as it is, or the image file at a path, loaded (one-line errors)."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, Image.Image):
        return image
    path = Path(image)
    if not path.is_file():
        raise GenerateError(f"--image {image}: no such file")
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except (UnidentifiedImageError, OSError) as exc:
        raise GenerateError(f"--image {path}: not a readable image ({type(exc).__name__})") from None


def _decode(gen: Generator, latents: torch.Tensor) -> list:
    m = gen.model
    pixels = m.image_tokenizer.decode_latents(latents.to(m.image_token_embed.dtype)).float()
    return [to_pil(x) for x in pixels]


# ---------------------------------------------------------------------------------- API

def _as_list(x) -> list:
    return [x] if isinstance(x, (str, os.PathLike)) or not isinstance(x, (list, tuple)) else list(x)


@torch.no_grad()
def generate_image(gen: Generator, prompts: str | Sequence[str], *, n: int = 1, steps: int | None = None,
                   cfg: float | None = None, seed: int = 0, progress: bool = True, use_cache: bool = True,
                   return_latents: bool = False):
    """Text to image: n images per prompt (prompt-major), PIL RGB (or latents)."""
    prompts = _as_list(prompts)
    steps = gen.steps if steps is None else int(steps)
    cfg = gen.guidance_scale if cfg is None else float(cfg)
    if steps < 1 or n < 1:
        raise GenerateError(f"--steps {steps} / --n {n}: must be >= 1")
    g = torch.Generator().manual_seed(int(seed))
    try:
        latents = tasks.text_to_image(gen.model, [gen.tokenize(p) for p in prompts], bos=gen.bos, boi=gen.boi,
                                    num_images=n, steps=steps, guidance_scale=cfg, generator=g, use_cache=use_cache,
                                    progress=_progress(progress, "denoise"))
    except ValueError as exc:  # e.g. more steps than the schedule has
        raise GenerateError(str(exc).splitlines()[0]) from None
    return latents if return_latents else _decode(gen, latents)


@torch.no_grad()
def caption(gen: Generator, images: ImageLike | Sequence[ImageLike], *, max_new_tokens: int = 64,
            temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, prompt: str = "",
            min_new_tokens: int = 1) -> list[str]:
    """Image to text: one caption per image. min_new_tokens=1 keeps EOS from being the
    first token: in training, EOS follows the end-of-image token of every generation
    sample (caption, then image), so an early model's greedy first token after an image
    is often EOS, an empty caption."""
    check_decoding(temperature, top_p)
    images = _as_list(images)
    m = gen.model
    if gen.processor is not None:
        return _caption_through_vlm(gen, images, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                    seed=seed, prompt=prompt, min_new_tokens=min_new_tokens)
    pixels = torch.stack([_pixels(gen, im) for im in images]).to(device=gen.device, dtype=m.image_token_embed.dtype)
    latents = m.image_tokenizer.encode_images(pixels)
    ids = tasks.image_to_text(m, latents, bos=gen.bos, boi=gen.boi, eoi=gen.eoi, eos=gen.eos,
                            prompt=gen.tokenize(prompt) if prompt else (), max_new_tokens=max_new_tokens,
                            temperature=temperature, top_p=top_p, generator=torch.Generator().manual_seed(int(seed)),
                            min_new_tokens=min_new_tokens)
    return [gen.detokenize(x) for x in ids]


def _caption_through_vlm(gen: Generator, images: list, *, max_new_tokens: int, temperature: float, top_p: float,
                        seed: int, prompt: str, min_new_tokens: int) -> list[str]:
    """LLaVAFusion's captions: the layout of the data pipeline's understanding rows
    ([BOS], the image's placeholders as the VLM's processor writes them, a newline, then
    `prompt`), decoded by the frozen VLM path."""
    pil = [to_pil(im.float()) if isinstance(im, torch.Tensor) else _open_image(im).convert("RGB") for im in images]
    proc = gen.processor
    inputs = proc(images=pil, text=[proc.image_token + "\n" + prompt] * len(pil), return_tensors="pt",
                  add_special_tokens=False, padding=True)
    head = [gen.bos] if gen.bos is not None else []
    prompts = [head + ids[mask.bool()].tolist() for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"])]
    ids = tasks.vlm_image_to_text(gen.model, prompts, inputs["pixel_values"], inputs.get("image_sizes"), eos=gen.eos, max_new_tokens=max_new_tokens,
                                banned=(gen.boi, gen.eoi), temperature=temperature, top_p=top_p,
                                generator=torch.Generator().manual_seed(int(seed)), min_new_tokens=min_new_tokens)
    return [gen.detokenize(x) for x in ids]


@torch.no_grad()
def generate_text(gen: Generator, prompts: str | Sequence[str], *, max_new_tokens: int = 64,
                  temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, return_ids: bool = False) -> list:
    """Text to text (BOI/EOI never sampled): greedy output is the base model's."""
    check_decoding(temperature, top_p)
    prompts = _as_list(prompts)
    ids = tasks.text_to_text(gen.model, [gen.tokenize(p) for p in prompts], bos=gen.bos, eos=gen.eos,
                           banned=(gen.boi, gen.eoi), max_new_tokens=max_new_tokens, temperature=temperature,
                           top_p=top_p, generator=torch.Generator().manual_seed(int(seed)))
    return ids if return_ids else [gen.detokenize(x) for x in ids]


@torch.no_grad()
def interleave(gen: Generator, prompt: str, *, max_new_tokens: int = 256, max_images: int = 4,
               steps: int | None = None, cfg: float | None = None, seed: int = 0, temperature: float = 0.0,
               top_p: float = 1.0, progress: bool = True, logits_processor: Optional[Callable] = None) -> list:
    """Free generation: strings and PIL images in order. The model starts an image by
    emitting BOI (lm_loss_on_boi trains that); logits_processor(new_ids, logits) may
    steer it (new_ids: one list per row, logits [1, V + 2])."""
    check_decoding(temperature, top_p)
    steps = gen.steps if steps is None else int(steps)
    check_steps(steps, gen)  # now, not once the model emits BOI
    head = [gen.bos] if gen.bos is not None else []
    segments = tasks.interleave(
        gen.model, head + gen.tokenize(prompt), boi=gen.boi, eoi=gen.eoi, eos=gen.eos, uncond_ids=head + [gen.boi],
        max_new_tokens=max_new_tokens, max_images=max_images, steps=steps,
        guidance_scale=gen.guidance_scale if cfg is None else float(cfg), temperature=temperature, top_p=top_p,
        generator=torch.Generator().manual_seed(int(seed)), logits_processor=logits_processor,
        progress=_progress(progress, "denoise"))
    return [_decode(gen, s[None])[0] if isinstance(s, torch.Tensor) else gen.detokenize(s) for s in segments]


def write_interleaved(prompt: str, segments: Sequence, out: str | os.PathLike) -> Path:
    """Markdown (or HTML for .html/.htm) with the text and the images beside it as PNGs
    named <stem>_<k>.png."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    as_html = out.suffix.lower() in (".html", ".htm")
    parts, k = [], 0
    for s in segments:
        if isinstance(s, str):
            parts.append(f"<p>{html.escape(s)}</p>" if as_html else s)
        else:
            name = f"{out.stem}_{k}.png"
            s.save(out.parent / name)
            parts.append(f'<img src="{name}" alt="image {k}">' if as_html else f"\n\n![image {k}]({name})\n\n")
            k += 1
    if as_html:
        body = "\n".join(parts)
        text = f"<!doctype html>\n<html><body>\n<p><b>{html.escape(prompt)}</b></p>\n{body}\n</body></html>\n"
    else:
        text = f"**{prompt}**" + "".join(parts) + "\n"
    out.write_text(text)
    return out


# --------------------------------------------------------------------------------- CLI

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tools/generate.py", description="Sample from a megafusion model.")
    p.add_argument("--model", required=True, help="exported model directory (tools/convert_to_hf.py) or run/checkpoint directory")
    p.add_argument("--tag", default=None, help="checkpoint tag for a run directory (default: latest)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    sub = p.add_subparsers(dest="task", required=True)

    s = sub.add_parser("image", help="text to image")
    s.add_argument("--prompt", required=True)
    s.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's, 50)")
    s.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale (1 = none; default 3)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--n", type=int, default=1, help="images; more than one are written as a grid")
    s.add_argument("--out", required=True, help="PNG file")

    def decoding(s, max_new_tokens):
        s.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
        s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
        s.add_argument("--top-p", type=float, default=1.0)

    s = sub.add_parser("caption", help="image to text")
    s.add_argument("--image", required=True)
    decoding(s, 64)
    s.add_argument("--min-new-tokens", type=int, default=1, help="tokens before EOS may end the caption")
    s.add_argument("--seed", type=int, default=0)

    s = sub.add_parser("text", help="text to text")
    s.add_argument("--prompt", required=True)
    decoding(s, 64)
    s.add_argument("--seed", type=int, default=0)

    s = sub.add_parser("interleave", help="text and images")
    s.add_argument("--prompt", required=True)
    decoding(s, 256)
    s.add_argument("--max-images", type=int, default=4)
    s.add_argument("--steps", type=int, default=None)
    s.add_argument("--cfg", type=float, default=None)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True, help="markdown file (.md), or HTML (.html); images beside it")
    return p


def _check_out(path: str, suffixes: tuple[str, ...]) -> Path:
    out = Path(path)
    if out.suffix.lower() not in suffixes:
        raise GenerateError(f"--out {path}: expected a {' or '.join(suffixes)} file")
    if out.is_dir():
        raise GenerateError(f"--out {path}: is a directory")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GenerateError(f"--out {path}: cannot create its directory ({exc.strerror})") from None
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    progress = not args.no_progress
    try:
        # Bad numbers and devices before the model is loaded.
        if args.task in ("caption", "text", "interleave"):
            check_decoding(args.temperature, args.top_p)
        if args.task in ("image", "interleave") and args.steps is not None:
            check_steps(args.steps)
        if args.task == "image" and args.n < 1:
            raise GenerateError(f"--n {args.n}: must be >= 1")
        check_device(args.device)
        if args.task == "image":
            out = _check_out(args.out, (".png",))
        elif args.task == "interleave":
            out = _check_out(args.out, (".md", ".html", ".htm"))
        elif args.task == "caption" and not Path(args.image).is_file():
            raise GenerateError(f"--image {args.image}: no such file")
        gen = load(args.model, tag=args.tag, device=args.device)
        if args.task == "image":
            images = generate_image(gen, [args.prompt], n=args.n, steps=args.steps, cfg=args.cfg, seed=args.seed,
                                    progress=progress)
            (images[0] if len(images) == 1 else image_grid(images)).save(out)
            print(out)
        elif args.task == "caption":
            print(caption(gen, [args.image], max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens,
                          temperature=args.temperature,
                          top_p=args.top_p, seed=args.seed)[0])
        elif args.task == "text":
            print(generate_text(gen, [args.prompt], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                top_p=args.top_p, seed=args.seed)[0])
        else:
            segments = interleave(gen, args.prompt, max_new_tokens=args.max_new_tokens, max_images=args.max_images,
                                  steps=args.steps, cfg=args.cfg, seed=args.seed, temperature=args.temperature,
                                  top_p=args.top_p, progress=progress)
            print(write_interleaved(args.prompt, segments, out))
    except GenerateError as exc:
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
