"""tools/evaluate.py: quality metrics of a megafusion model, each printed as a table and
written as JSON (--out).

    shapes --model DIR [--data data/synthetic/train/val] [--n 64] [--steps S] [--cfg G] [--batch 16]
    probe  --model DIR [--data data/synthetic/train/val] [--n 64] [--levels 0.98,0.9,0.7,0.5]
    text   --model DIR --base BASE [--corpus FILE.jsonl]
    fid    --real SHARDS|DIR (--fake SHARDS|DIR | --model DIR) --inception-weights FILE [--dims 2048]
    clip   (--model DIR | --images SHARDS|DIR) [--data SHARDS | --captions FILE.jsonl] --clip-model DIR
    cider  (--model DIR --data SHARDS | --captions FILE.jsonl) [--tokenizer auto|ptb|simple]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from megafusion.eval.rows import EvalError

DEFAULT_SHAPES_DATA = "data/synthetic/train/val"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tools/evaluate.py", description="Quality metrics of a megafusion model.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{shapes,probe,text,fid,clip,cider}")

    def common(s, model_required=False, sampling=False):
        s.add_argument("--model", required=model_required,
                       help="exported model directory (tools/convert_to_hf.py) or run/checkpoint directory")
        s.add_argument("--tag", default=None, help="checkpoint tag for a run directory (default: latest)")
        s.add_argument("--device", default="cpu")
        s.add_argument("--out", default=None, help="JSON file for every number, the settings and the per-sample records")
        s.add_argument("--no-progress", action="store_true", help="no progress bars")
        s.add_argument("--batch", type=int, default=16, help="prompts or images per model call")
        s.add_argument("--n", type=int, default=None, help="use the first N rows / images")
        if sampling:
            s.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
            s.add_argument("--cfg", type=float, default=None, help="classifier-free guidance (default: the model's)")
            s.add_argument("--seed", type=int, default=0)

    s = sub.add_parser("shapes", help="GenEval-style accuracy on the synthetic shapes task's held-out split")
    common(s, model_required=True, sampling=True)
    s.set_defaults(n=64)
    s.add_argument("--data", default=DEFAULT_SHAPES_DATA, help="held-out synthetic shards (with a meta column)")
    s.add_argument("--max-new-tokens", type=int, default=24)
    s.add_argument("--only", choices=("generation", "captioning"), default=None, help="one direction only")
    s.add_argument("--save-images", default=None, metavar="DIR", help="also write the drawn images as PNGs")

    s = sub.add_parser("probe", help="which words of a prompt the image generator reads, and whether its image "
                                      "tokens know their place in the grid (seconds, no sampling)")
    common(s, model_required=True)
    s.set_defaults(n=64)
    s.add_argument("--data", default=DEFAULT_SHAPES_DATA, help="held-out synthetic shards (with a meta column)")
    s.add_argument("--levels", default="0.98,0.9,0.7,0.5", help="noise levels, as fractions of the timestep range")
    s.add_argument("--seed", type=int, default=0)

    s = sub.add_parser("text", help="text preservation against the base model (logits, perplexity)")
    common(s, model_required=True)
    s.add_argument("--base", required=True, help="the base model: Hugging Face directory, .gguf, or smollm2")
    s.add_argument("--corpus", default=None, help="JSONL with a `text` field (default: built-in sentences)")
    s.add_argument("--max-tokens", type=int, default=512, help="tokens per document")

    s = sub.add_parser("fid", help="FID of generated (or given) images against real ones")
    common(s, sampling=True)
    s.add_argument("--real", required=True, help="MDS shards with image (and caption) columns, or an image directory")
    s.add_argument("--fake", default=None, help="shards or image directory to compare (instead of --model)")
    s.add_argument("--inception-weights", default=None, help="torch-fidelity's pt_inception-2015-12-05 .pth file")
    s.add_argument("--dims", type=int, default=2048, help="Inception feature: 64, 192, 768 or 2048 (standard)")
    s.add_argument("--size", type=int, default=299, help="images are resized and centre-cropped to this side")

    s = sub.add_parser("clip", help="CLIP score of generated (or given) images against their captions")
    common(s, sampling=True)
    s.add_argument("--images", default=None, help="shards with image+caption, or an image directory (with --captions)")
    s.add_argument("--data", default=None, help="shards whose captions are the prompts (with --model)")
    s.add_argument("--captions", default=None, help="JSONL: `caption` (and `image`, a file name in --images)")
    s.add_argument("--clip-model", default=None, help="local CLIP directory (CLIPModel + CLIPProcessor)")

    s = sub.add_parser("cider", help="CIDEr of the model's captions against reference captions")
    common(s)
    s.add_argument("--data", default=None, help="shards with image and caption columns (with --model)")
    s.add_argument("--captions", default=None, help="JSONL of precomputed `caption` and `references` (instead of --model)")
    s.add_argument("--max-new-tokens", type=int, default=32)
    s.add_argument("--tokenizer", choices=("auto", "ptb", "simple"), default="auto",
                   help="auto: Stanford PTBTokenizer when java is on PATH, else simple")
    return p


def _check_out(path: str | None) -> None:
    """--out before any work: a .json file whose directory exists (created here) and can be
    written, so that a run is not lost at the end for want of a place to put it."""
    if path is None:
        return
    out = Path(path)
    if out.suffix.lower() != ".json":
        raise EvalError(f"--out {path}: expected a .json file")
    if out.is_dir():
        raise EvalError(f"--out {path}: is a directory")
    _writable_dir(out.parent, f"--out {path}")


def _writable_dir(folder: Path, what: str) -> None:
    import os

    existing = next((d for d in (folder, *folder.parents) if d.exists()), None)
    if existing is not None and not existing.is_dir():
        raise EvalError(f"{what}: {existing} is a file, not a directory")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EvalError(f"{what}: cannot create the directory {folder} "
                        f"({exc.strerror or type(exc).__name__})") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise EvalError(f"{what}: cannot write in the directory {folder}")


def _check_save_images(args) -> None:
    folder = getattr(args, "save_images", None)
    if folder is not None:
        if Path(folder).exists() and not Path(folder).is_dir():
            raise EvalError(f"--save-images {folder}: not a directory")
        _writable_dir(Path(folder), f"--save-images {folder}")


def _positive(args) -> None:
    for name in ("n", "batch", "steps", "max_new_tokens", "max_tokens", "size"):
        v = getattr(args, name, None)
        if v is not None and v < 1:
            raise EvalError(f"--{name.replace('_', '-')} {v}: must be >= 1")


def _check_device(args) -> None:
    from megafusion import generate as G

    try:
        G.check_device(args.device)
    except G.GenerateError as exc:
        raise EvalError(str(exc).splitlines()[0]) from None


def run_shapes(args) -> tuple[dict, str]:
    from megafusion.eval.model_io import load_model
    from megafusion.eval.rows import read_shards
    from megafusion.eval.run_shapes import evaluate_shapes, format_shapes

    rows = read_shards(args.data, args.n, "--data")
    gen = load_model(args.model, args.tag, args.device)
    result = evaluate_shapes(gen, rows, steps=args.steps, cfg=args.cfg, batch=args.batch, seed=args.seed,
                             max_new_tokens=args.max_new_tokens, progress=not args.no_progress,
                             generation=args.only != "captioning", captioning=args.only != "generation",
                             keep_images=bool(args.save_images))
    if args.save_images:
        folder = Path(args.save_images)
        folder.mkdir(parents=True, exist_ok=True)
        for rec, im in zip(result["samples"], result.pop("images")):
            im.save(folder / f"{rec['id']}.png")
    result.update(model=str(args.model), data=str(args.data))
    return result, format_shapes(result)


def run_probe(args) -> tuple[dict, str]:
    from megafusion.eval.model_io import load_model
    from megafusion.eval.probe import format_probe, probe_prompt_use, probe_token_place
    from megafusion.eval.rows import read_shards

    try:
        levels = tuple(float(x) for x in args.levels.split(","))
    except ValueError:
        raise EvalError(f"--levels {args.levels}: expected numbers separated by commas") from None
    if not all(0 < lv < 1 for lv in levels):
        raise EvalError(f"--levels {args.levels}: each must be in (0, 1)")
    rows = read_shards(args.data, args.n, "--data")
    gen = load_model(args.model, args.tag, args.device)
    result = probe_prompt_use(gen, rows, levels=levels, seed=args.seed, batch=args.batch, progress=not args.no_progress)
    result["place"] = probe_token_place(gen, rows, level=max(levels), seed=args.seed, batch=args.batch)
    result.update(model=str(args.model), data=str(args.data))
    return result, format_probe(result)


def run_text(args) -> tuple[dict, str]:
    from megafusion.eval.text import format_text, load_corpus, text_preservation

    texts = load_corpus(args.corpus, args.n)
    result = text_preservation(args.model, args.base, texts, max_tokens=args.max_tokens, tag=args.tag,
                               progress=not args.no_progress)
    result["corpus"] = args.corpus or "built-in"
    return result, format_text(result)


def _generated(args, prompts: list[str], desc: str) -> list:
    from megafusion.eval.model_io import draw_images, load_model

    gen = load_model(args.model, args.tag, args.device)
    return draw_images(gen, prompts, steps=args.steps, cfg=args.cfg, seed=args.seed, batch=args.batch,
                       progress=not args.no_progress, desc=desc)


def run_fid(args) -> tuple[dict, str]:
    from megafusion.eval.realdata import fid_score, inception
    from megafusion.eval.rows import image_source, table

    if (args.fake is None) == (args.model is None):
        raise EvalError("fid: give exactly one of --fake (images) and --model (draws from --real's captions)")
    extractor = inception(args.inception_weights, args.dims)
    real = image_source(args.real, "--real", args.n)
    if args.fake is not None:
        fake = [r["image"] for r in image_source(args.fake, "--fake", args.n)]
    else:
        prompts = [r["caption"] for r in real]
        if any(not p for p in prompts):
            raise EvalError(f"--real {args.real}: --model needs captions to draw from (MDS shards with a caption column)")
        fake = _generated(args, prompts, "fid: draw")
    result = fid_score([r["image"] for r in real], fake, extractor, size=args.size, batch=args.batch,
                       progress=not args.no_progress)
    result.update(real=str(args.real), fake=str(args.fake) if args.fake else None, model=args.model,
                  inception_weights=str(args.inception_weights), dims=args.dims)
    text = table([["FID", f"{max(result['fid'], 0.0):.4f}"], ["real images", result["n_real"]], ["generated images", result["n_fake"]],
                  ["Inception feature", args.dims]], ["metric", "value"])
    return result, text


def run_clip(args) -> tuple[dict, str]:
    from megafusion.eval.realdata import clip_loader, clip_score
    from megafusion.eval.rows import image_source, is_shard_dir, open_rgb, read_jsonl, read_shards, table

    clip_loader(args.clip_model)  # refuse a missing directory before any work
    if (args.images is None) == (args.model is None):
        raise EvalError("clip: give exactly one of --images and --model")
    names = None
    if args.model is not None:
        if (args.data is None) == (args.captions is None):
            raise EvalError("clip --model: give exactly one of --data (shards) and --captions (JSONL) for the prompts")
        if args.data is not None:
            captions = [str(r["caption"]) for r in read_shards(args.data, args.n, "--data") if r.get("caption")]
        else:
            captions = [str(r["caption"]) for r in read_jsonl(args.captions, "--captions", ("caption",))][:args.n]
        images = _generated(args, captions, "clip: draw")
    elif is_shard_dir(args.images):
        rows = image_source(args.images, "--images", args.n)
        if any(not r["caption"] for r in rows):
            raise EvalError(f"--images {args.images}: the shards have no caption column")
        images, captions, names = [r["image"] for r in rows], [str(r["caption"]) for r in rows], [r["id"] for r in rows]
    else:
        if args.captions is None:
            raise EvalError("clip --images DIR: give --captions (JSONL with `image` and `caption`)")
        recs = read_jsonl(args.captions, "--captions", ("image", "caption"))[:args.n]
        folder = Path(args.images)
        if not folder.is_dir():
            raise EvalError(f"--images {args.images}: no such directory")
        for r in recs:
            if not (folder / str(r["image"])).is_file():
                raise EvalError(f"--captions {args.captions}: image {r['image']} is not in --images {args.images}")
        images = [open_rgb(folder / str(r["image"]), "--images") for r in recs]
        captions, names = [str(r["caption"]) for r in recs], [str(r["image"]) for r in recs]
    result = clip_score(images, captions, args.clip_model, batch=args.batch, progress=not args.no_progress)
    result.update(model=args.model, images=args.images, data=args.data, captions=args.captions,
                  clip_model=str(args.clip_model), samples=[dict(id=k, caption=c) for k, c in
                                                            zip(names or range(len(captions)), captions)])
    return result, table([["CLIP score", f"{result['clip_score']:.4f}"], ["images", result["n"]]], ["metric", "value"])


def run_cider(args) -> tuple[dict, str]:
    from megafusion.eval.model_io import caption_images, load_model
    from megafusion.eval.realdata import cider_score
    from megafusion.eval.rows import image_source, read_jsonl, table

    if (args.captions is None) == (args.model is None):
        raise EvalError("cider: give exactly one of --model (with --data) and --captions")
    if args.model is not None:
        if args.data is None:
            raise EvalError("cider --model: give --data (shards with image and caption columns)")
        rows = image_source(args.data, "--data", args.n)
        if any(not r["caption"] for r in rows):
            raise EvalError(f"--data {args.data}: the shards have no caption column")
        gen = load_model(args.model, args.tag, args.device)
        predictions = caption_images(gen, [r["image"] for r in rows], max_new_tokens=args.max_new_tokens,
                                     batch=args.batch, progress=not args.no_progress, desc="cider: caption")
        ids, references = [r["id"] for r in rows], [[str(r["caption"])] for r in rows]
    else:
        recs = read_jsonl(args.captions, "--captions", ("caption", "references"))[:args.n]
        predictions = [str(r["caption"]) for r in recs]
        references = [[str(x) for x in r["references"]] if isinstance(r["references"], list) else [str(r["references"])]
                      for r in recs]
        ids = [str(r.get("id", i)) for i, r in enumerate(recs)]
    result = cider_score(predictions, references, tokenizer=args.tokenizer)
    result.update(model=args.model, data=args.data, captions=args.captions,
                  samples=[dict(id=i, caption=p, references=r, cider=s)
                           for i, p, r, s in zip(ids, predictions, references, result.pop("per_sample"))])
    text = table([["CIDEr", f"{result['cider']:.4f}"], ["captions", result["n"]], ["tokenizer", result["tokenizer"]]],
                 ["metric", "value"])
    return result, text


COMMANDS = dict(shapes=run_shapes, probe=run_probe, text=run_text, fid=run_fid, clip=run_clip, cider=run_cider)


def main(argv: Sequence[str] | None = None) -> int:
    import os

    from megafusion.eval.rows import write_json

    # transformers' advisories (slow image processor, ...) are not results.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = _parser().parse_args(argv)
    try:
        _check_out(args.out)
        _check_save_images(args)
        _positive(args)
        _check_device(args)
        result, text = COMMANDS[args.command](args)
        result["command"] = args.command
        print(text)
        out = write_json(result, args.out)
        if out is not None:
            print(f"wrote {out}")
    except EvalError as exc:
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0
