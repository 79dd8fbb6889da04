"""Evaluation inputs: rows of MDS shards, image directories, JSONL files, and the one-line
error every evaluation command reports for a bad one.

Shards are read directly (index.json, then each shard's bytes, decompressed in memory),
not through streaming's StreamingDataset or megafusion's loader: those set up shared
memory, and the loader clears other processes' stale shared memory first, which would
break a training run going on beside the evaluation.
"""
from __future__ import annotations

import json
from pathlib import Path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")


class EvalError(ValueError):
    """A bad input (path, shard, option): the message is one line naming it."""


def is_shard_dir(path: str | Path) -> bool:
    return Path(path, "index.json").is_file()


def read_shards(path: str | Path, n: int | None = None, option: str = "--data") -> list[dict]:
    """The first n rows (all when n is None) of the MDS shards in `path`, decoded
    (json columns as objects, bytes as bytes)."""
    import numpy as np
    from streaming.base.compression import decompress
    from streaming.base.format import reader_from_json

    root = Path(path)
    if not root.is_dir():
        raise EvalError(f"{option} {path}: no such directory")
    try:
        index = json.loads((root / "index.json").read_text())
    except FileNotFoundError:
        raise EvalError(f"{option} {path}: no index.json (not an MDS shard directory; "
                        "tools/prepare_data.py writes them)") from None
    except ValueError:
        raise EvalError(f"{option} {path}: index.json is not valid JSON") from None
    rows: list[dict] = []
    for shard in index.get("shards", []):
        if n is not None and len(rows) >= n:
            break
        if shard.get("format") != "mds":
            raise EvalError(f"{option} {path}: shard format {shard.get('format')!r}, expected mds")
        reader = reader_from_json(str(root), None, shard)
        raw_name = shard["raw_data"]["basename"]
        try:
            if (root / raw_name).is_file():
                data = (root / raw_name).read_bytes()
            else:
                zipped = (shard.get("zip_data") or {}).get("basename")
                data = decompress(shard["compression"], (root / str(zipped)).read_bytes())
        except (OSError, TypeError, ValueError) as exc:
            raise EvalError(f"{option} {path}: cannot read shard {raw_name} ({type(exc).__name__})") from None
        count = int(shard["samples"])
        offsets = np.frombuffer(data, np.uint32, count + 1, offset=4)
        for i in range(count):
            if n is not None and len(rows) >= n:
                break
            rows.append(reader.decode_sample(data[int(offsets[i]):int(offsets[i + 1])]))
    if not rows:
        raise EvalError(f"{option} {path}: the shards hold no rows")
    return rows


def image_files(path: str | Path, option: str) -> list[Path]:
    root = Path(path)
    if not root.is_dir():
        raise EvalError(f"{option} {path}: no such directory")
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise EvalError(f"{option} {path}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    return files


def open_rgb(path: Path, option: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise EvalError(f"{option}: {path} is not a readable image ({type(exc).__name__})") from None


def image_source(path: str | Path, option: str, n: int | None = None) -> list[dict]:
    """Rows {id, image (PIL RGB), caption (or None)} from MDS shards with an `image`
    column, or from a directory of image files (sorted by name)."""
    from megafusion.data.images import decode_image, to_rgb

    if is_shard_dir(path):
        out = []
        for i, row in enumerate(read_shards(path, n, option)):
            if "image" not in row:
                raise EvalError(f"{option} {path}: the shards have no image column")
            try:
                image = to_rgb(decode_image(row["image"]))
            except Exception as exc:  # a corrupt row: name it
                raise EvalError(f"{option} {path}: row {i} holds no readable image ({type(exc).__name__})") from None
            out.append(dict(id=str(row.get("id", i)), image=image, caption=row.get("caption")))
        return out
    files = image_files(path, option)[:n]
    return [dict(id=p.name, image=open_rgb(p, option), caption=None) for p in files]


def read_jsonl(path: str | Path, option: str, required: tuple[str, ...] = ()) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        raise EvalError(f"{option} {path}: no such file")
    out = []
    for k, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            raise EvalError(f"{option} {path}: line {k} is not JSON") from None
        missing = [f for f in required if not isinstance(rec, dict) or f not in rec]
        if missing:
            raise EvalError(f"{option} {path}: line {k} has no {missing[0]!r} field")
        out.append(rec)
    if not out:
        raise EvalError(f"{option} {path}: no records")
    return out


def write_json(result: dict, out: str | Path | None) -> Path | None:
    if not out:
        return None
    p = Path(out)
    text = json.dumps(result, indent=2, default=str) + "\n"
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    except OSError as exc:  # the CLI checks --out before any work; this is what changed since
        raise EvalError(f"--out {out}: cannot write it ({exc.strerror or type(exc).__name__})") from None
    return p


def progress(iterable=None, total: int | None = None, desc: str = "", enabled: bool = True):
    """tqdm on stderr (no bar when disabled)."""
    import sys

    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True,
                file=sys.stderr)


def table(rows: list[list], header: list[str]) -> str:
    """A plain-text table, columns padded to their widest cell."""
    cells = [[str(c) for c in header]] + [[f"{c:.3f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
