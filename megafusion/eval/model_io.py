"""Batched drawing and captioning for the evaluation commands, with a progress bar."""
from __future__ import annotations

from megafusion.eval.rows import EvalError, progress as _progress


def load_model(path: str, tag: str | None = None, device: str = "cpu"):
    """megafusion.generate.load with its errors as EvalError (one line)."""
    from megafusion import generate as G

    try:
        return G.load(path, tag=tag, device=device)
    except G.GenerateError as exc:
        raise EvalError(str(exc).splitlines()[0]) from None


def _batched(items: list, batch: int, run, *, progress: bool, desc: str) -> list:
    """run(chunk, start) over consecutive chunks of `batch` items, results concatenated."""
    if batch < 1:
        raise EvalError(f"--batch {batch}: must be >= 1")
    out = []
    with _progress(total=len(items), desc=desc, enabled=progress) as bar:
        for i in range(0, len(items), batch):
            chunk = items[i:i + batch]
            out += run(chunk, i)
            bar.update(len(chunk))
    return out


def draw_images(gen, prompts: list[str], *, steps: int | None = None, cfg: float | None = None, seed: int = 0,
                batch: int = 16, progress: bool = True, desc: str = "draw") -> list:
    """One image per prompt, `batch` prompts per call; the batch starting at prompt i uses
    seed + i, so a prompt's image does not depend on how many prompts follow it."""
    from megafusion import generate as G

    def draw(chunk, i):
        try:
            return G.generate_image(gen, chunk, n=1, steps=steps, cfg=cfg, seed=seed + i, progress=False)
        except G.GenerateError as exc:
            raise EvalError(str(exc).splitlines()[0]) from None

    return _batched(prompts, batch, draw, progress=progress, desc=desc)


def caption_images(gen, images: list, *, max_new_tokens: int = 24, batch: int = 16, progress: bool = True,
                   desc: str = "caption") -> list[str]:
    """Greedy captions, `batch` images per call."""
    from megafusion import generate as G

    return _batched(images, batch, lambda chunk, i: G.caption(gen, chunk, max_new_tokens=max_new_tokens),
                    progress=progress, desc=desc)
