"""The shapes evaluation of a model: draw the held-out captions, caption the held-out
images, score both with the deterministic analyser (megafusion.eval.shapes).

    from megafusion import generate as G
    from megafusion.eval.rows import read_shards
    from megafusion.eval.run_shapes import evaluate_shapes, format_shapes

    result = evaluate_shapes(G.load("runs/demo"), read_shards("data/synthetic/train/val", 64))
    print(format_shapes(result))

tools/evaluate.py shapes is this on the command line; the trainer's sampling hook scores
its grid and held-out captions with score_prompt / score_caption and logs
shapes_scalars of the result.
"""
from __future__ import annotations

import time

from megafusion.eval.model_io import caption_images, draw_images
from megafusion.eval.rows import EvalError
from megafusion.eval.shapes import CHANCE, parse_caption, score_caption, score_generation, summarise

# The attributes in table order, per kind of sample.
ATTRIBUTES = ("colour", "shape", "size", "position", "both_present", "relation")


def meta_from_caption(text: str) -> dict | None:
    """Ground truth for a prompt in the synthetic task's grammar: one object (its position
    None when the prompt names none) or two objects and their relation. None when the
    prompt says something else (no object, three objects, two without a relation)."""
    said = parse_caption(text)
    objects = [dict(colour=c, shape=s, size=z) for c, s, z in said["objects"]]
    if len(objects) == 1:
        return dict(kind="one", position=said["position"], objects=objects)
    if len(objects) == 2 and said["relation"] is not None:
        return dict(kind="two", relation=said["relation"], objects=objects)
    return None


def score_prompt(image, prompt: str) -> dict | None:
    """score_generation against the truth a prompt states; an attribute the prompt does not
    state (the position of "a red circle") is not scored. None for an unparseable prompt."""
    meta = meta_from_caption(prompt)
    if meta is None:
        return None
    scores = score_generation(image, meta)
    if meta["kind"] == "one" and meta["position"] is None:
        scores.pop("position")
    return scores


def _image(row):
    from megafusion.data.images import decode_image, to_rgb

    im = row["image"]
    return to_rgb(decode_image(im)) if isinstance(im, (bytes, bytearray)) else im


def evaluate_shapes(gen, rows: list[dict], *, steps: int | None = None, cfg: float | None = None, batch: int = 16,
                    seed: int = 0, max_new_tokens: int = 24, generation: bool = True, captioning: bool = True,
                    progress: bool = True, keep_images: bool = False) -> dict:
    """rows: held-out synthetic rows ({image (PNG bytes or PIL), caption, meta, id}).
    Generation draws one image per caption (batches of `batch` prompts; the batch starting
    at row i uses seed + i) and scores it against the row's meta; captioning captions each
    row's image (greedy) and scores the text. Returns n, steps, cfg, seed, the per-direction
    summaries (attribute -> accuracy, n, chance; "all": every attribute right), the table
    and one record per row (id, prompt, meta, generation scores, caption, caption scores;
    with keep_images, the drawn PIL images under "images", which JSON does not carry)."""
    rows = [r for r in rows if isinstance(r.get("meta"), dict) and "kind" in r["meta"]]
    if not rows:
        raise EvalError("shapes: no rows with synthetic ground truth (a `meta` column; tools/prepare_data.py synthetic writes it)")
    steps = gen.steps if steps is None else int(steps)
    cfg = gen.guidance_scale if cfg is None else float(cfg)
    records = [dict(id=str(r.get("id", i)), prompt=r["caption"], meta=r["meta"]) for i, r in enumerate(rows)]
    images, t0 = [], time.time()
    if generation:
        images = draw_images(gen, [r["caption"] for r in rows], steps=steps, cfg=cfg, seed=seed, batch=batch,
                             progress=progress, desc="shapes: draw")
        for rec, im in zip(records, images):
            rec["generation"] = score_generation(im, rec["meta"])
    t1 = time.time()
    if captioning:
        said = caption_images(gen, [_image(r) for r in rows], max_new_tokens=max_new_tokens, batch=batch,
                              progress=progress, desc="shapes: caption")
        for rec, text in zip(records, said):
            rec["caption"] = text
            rec["captioning"] = score_caption(text, rec["meta"])
    result = dict(task="shapes", n=len(rows), steps=steps, cfg=cfg, seed=seed, max_new_tokens=max_new_tokens,
                  chance=dict(CHANCE),
                  generation=summarise([r["generation"] for r in records]) if generation else None,
                  captioning=summarise([r["captioning"] for r in records]) if captioning else None,
                  seconds=dict(generation=round(t1 - t0, 2), captioning=round(time.time() - t1, 2)))
    result["table"] = shapes_table(result)
    result["samples"] = records
    if keep_images:
        result["images"] = images
    return result


def shapes_table(result: dict) -> list[dict]:
    """One row per attribute (and "all"): accuracy of each direction, n, chance."""
    out = []
    for key in ATTRIBUTES + ("all",):
        gen = (result.get("generation") or {}).get(key)
        cap = (result.get("captioning") or {}).get(key)
        if gen is None and cap is None:
            continue
        out.append(dict(attribute=key, generation=gen and gen["accuracy"], generation_n=gen and gen["n"],
                        captioning=cap and cap["accuracy"], captioning_n=cap and cap["n"],
                        chance=(gen or cap)["chance"] if key != "all" else None,
                        chance_generation=gen and gen["chance"], chance_captioning=cap and cap["chance"]))
    return out


def format_shapes(result: dict) -> str:
    from megafusion.eval.rows import table

    def cell(acc, n):
        return "-" if acc is None else f"{acc:.3f} ({n})"

    def chance(row):
        if row["attribute"] != "all":
            return f"{row['chance']:.3f}"
        values = [f"{c:.4f}" for c in (row["chance_generation"], row["chance_captioning"]) if c is not None]
        return " / ".join(dict.fromkeys(values))  # one number when both directions share it

    rows = [[r["attribute"] if r["attribute"] != "all" else "all (every attribute right)",
             cell(r["generation"], r["generation_n"]), cell(r["captioning"], r["captioning_n"]), chance(r)]
            for r in result["table"]]
    head = f"shapes: n={result['n']}, steps={result['steps']}, cfg={result['cfg']}, seed={result['seed']}"
    return head + "\n" + table(rows, ["attribute", "generation (n)", "captioning (n)", "chance"])


def shapes_scalars(result: dict, prefix: str = "shapes") -> dict[str, float]:
    """{"shapes/generation/colour": accuracy, ...} for tensorboard."""
    return {f"{prefix}/{direction}/{key}": float(v["accuracy"])
            for direction in ("generation", "captioning") for key, v in (result.get(direction) or {}).items()}
