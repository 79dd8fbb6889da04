"""Reading image-caption sources for prepare_data.py images: folders and webdataset tars.

Each source yields RawItems in a stable order: the raw image bytes and caption as found,
or the reason the row cannot be used (skip). Nothing is decoded here, and nothing stops
a conversion: prepare.write_images counts the skips.

A folder holds images with captions in one of three layouts, tried in this order:
captions.jsonl ({"file": ..., "caption": ...} per line), captions.csv (file,caption), or
a caption file beside each image (a.jpg + a.txt). A .tar is read as a webdataset: members
key.ext grouped by key, the caption in key.txt or in key.json's "caption".
"""
from __future__ import annotations

import csv
import io
import json
import os
import posixpath
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


@dataclass
class RawItem:
    id: str
    image: bytes | None = None
    caption: object = None  # bytes | str | None
    skip: str | None = None  # reason found while reading the source


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def folder_items(root: Path) -> Iterator[RawItem]:
    name = root.name or "source"
    jsonl, csv_path = root / "captions.jsonl", root / "captions.csv"

    def item(file: str, caption, where: str) -> RawItem:
        if not isinstance(file, str) or not file:
            return RawItem(id=f"{name}/{where}", skip="bad_record")
        sample_id = f"{name}/{posixpath.splitext(file)[0]}"
        path = root / file
        if not path.is_file():
            return RawItem(id=sample_id, skip="missing_image")
        data = _read(path)
        if data is None:
            return RawItem(id=sample_id, skip="unreadable_image")
        return RawItem(id=sample_id, image=data, caption=caption)

    if jsonl.is_file():
        for n, raw in enumerate(jsonl.read_bytes().splitlines(), 1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw.decode("utf-8", errors="surrogateescape"))
            except ValueError:
                yield RawItem(id=f"{name}/line{n}", skip="bad_record")
                continue
            if not isinstance(rec, dict):
                yield RawItem(id=f"{name}/line{n}", skip="bad_record")
                continue
            yield item(rec.get("file"), rec.get("caption"), f"line{n}")
        return
    if csv_path.is_file():
        text = csv_path.read_bytes().decode("utf-8-sig", errors="surrogateescape")
        for n, row in enumerate(csv.reader(io.StringIO(text)), 1):
            if not row or not any(c.strip() for c in row):
                continue
            if n == 1 and [c.strip().lower() for c in row[:2]] == ["file", "caption"]:
                continue
            if len(row) < 2:
                yield item(row[0], None, f"line{n}")
                continue
            yield item(row[0], ",".join(row[1:]), f"line{n}")
        return
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for fname in sorted(filenames):
            stem, ext = os.path.splitext(fname)
            if ext.lower() not in IMAGE_EXTENSIONS:
                continue
            path = Path(dirpath) / fname
            rel = path.relative_to(root).with_suffix("").as_posix()
            data = _read(path)
            if data is None:
                yield RawItem(id=f"{name}/{rel}", skip="unreadable_image")
                continue
            txt = Path(dirpath) / (stem + ".txt")
            yield RawItem(id=f"{name}/{rel}", image=data, caption=_read(txt) if txt.is_file() else None)


def tar_items(path: Path, summary) -> Iterator[RawItem]:
    """webdataset layout: members key.ext grouped by key (path up to the first dot). A
    damaged archive yields what was whole before the damage and counts
    summary.skip("unreadable_archive")."""
    name = path.name.split(".")[0] or "source"

    def emit(key: str, files: dict) -> RawItem:
        sample_id = f"{name}/{key}"
        image = next((files[e] for e in ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif") if e in files), None)
        if image is None:
            return RawItem(id=sample_id, skip="missing_image")
        caption = files.get("txt")
        if caption is None and "json" in files:
            try:
                rec = json.loads(files["json"].decode("utf-8", errors="surrogateescape"))
                caption = rec.get("caption") if isinstance(rec, dict) else None
            except ValueError:
                return RawItem(id=sample_id, skip="bad_record")
        return RawItem(id=sample_id, image=image, caption=caption)

    key, files = None, {}
    try:
        with tarfile.open(path, "r:*") as tf:
            for member in tf:
                if not member.isfile():
                    continue
                dirname, base = posixpath.split(member.name)
                if "." not in base or base.startswith("."):
                    continue
                stem, ext = base.split(".", 1)
                k = posixpath.join(dirname, stem)
                data = tf.extractfile(member).read()  # ReadError when the data is cut short
                if k != key and key is not None:
                    yield emit(key, files)
                    files = {}
                key = k
                files[ext.lower()] = data
            # tarfile ends quietly at a header cut short; a sound archive ends in zero blocks.
            tf.fileobj.seek(tf.offset)
            damaged = any(tf.fileobj.read(1 << 16).strip(b"\0"))
    except (tarfile.TarError, OSError, EOFError, zlib.error):
        damaged = True
        files = {}  # the group being read when the damage was found is incomplete
    if key is not None and files:
        yield emit(key, files)
    if damaged:
        summary.skip("unreadable_archive")


def image_items(sources: Iterable[str], summary) -> Iterator[RawItem]:
    for src in sources:
        path = Path(src)
        if path.is_dir():
            yield from folder_items(path)
        else:
            yield from tar_items(path, summary)
