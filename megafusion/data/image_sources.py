"""Reading image-caption sources for prepare_data.py images: folders and webdataset tars.

Each source yields RawItems in a stable order: the raw image bytes and caption as found,
or the reason the row cannot be used (skip). Nothing is decoded here, and nothing stops
a conversion: prepare.write_images counts the skips.

A folder holds images with captions in one of three layouts, tried in this order:
captions.jsonl ({"file": ..., "caption": ...} per line), captions.csv (file,caption), or
a caption file beside each image (a.jpg + a.txt). A .tar is read as a webdataset: members
key.ext grouped by key, the caption in key.txt or in key.json's "caption".

Row ids are LABEL/KEY: KEY the image's path in its folder or tar without the extension
(or where it is listed: line3), LABEL the source's label from source_labels, which
prepare.write_text uses too (LABEL/LINE for records without an "id").
"""
from __future__ import annotations

import csv
import io
import json
import os
import posixpath
import tarfile
import zlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

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


def source_labels(sources: Sequence[str]) -> list[str]:
    """A label per source for the ids of its rows: unique among the sources of one command
    and the same on every machine (never an absolute path). A source's short name (a
    folder's name; a file's name up to its first dot: corpus.jsonl -> corpus) where no
    other source has it, else its full name (c4-train.00000-of-01024.json), else the
    shortest trailing path that tells it apart (a/train and b/train). No label is a path
    prefix of another (a beside a/train), since image ids append a path inside the source.
    One source given twice (the same file or folder) gets one label, so its rows repeat."""
    keys = [os.path.realpath(src) for src in sources]
    shown: dict[str, str] = {}
    for key, src in zip(keys, sources):
        shown.setdefault(key, src)
    parts = {k: Path(os.path.abspath(src)).parts[1:] or ("source",) for k, src in shown.items()}

    def label(key: str, level: int) -> str:
        p = parts[key]
        name = p[-1]
        if level == 0:
            return name if os.path.isdir(key) else (name.split(".")[0] or name)
        return "/".join(p[-max(level, 1):])

    level = dict.fromkeys(shown, 0)
    while True:
        labels = {k: label(k, level[k]) for k in shown}
        owners: dict[str, list[str]] = defaultdict(list)
        for k, lab in labels.items():
            owners[lab].append(k)
        clash: set[str] = set()
        for lab, ks in owners.items():
            if len(ks) > 1:
                clash.update(ks)
            segs = lab.split("/")
            for i in range(1, len(segs)):
                prefix = owners.get("/".join(segs[:i]))
                if prefix:
                    clash.update(ks)
                    clash.update(prefix)
        # Level 1 is the full name; level n > 1 the last n path parts, up to the whole path.
        bump = [k for k in clash if level[k] < max(len(parts[k]), 1)]
        if not bump:
            return [labels[k] for k in keys]
        for k in bump:
            level[k] += 1


def folder_items(root: Path, name: str | None = None) -> Iterator[RawItem]:
    name = name or root.name or "source"
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


def tar_items(path: Path, summary, name: str | None = None) -> Iterator[RawItem]:
    """webdataset layout: members key.ext grouped by key (path up to the first dot). A
    damaged archive yields what was whole before the damage and counts
    summary.skip("unreadable_archive")."""
    name = name or path.name.split(".")[0] or "source"

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
    sources = list(sources)
    for src, name in zip(sources, source_labels(sources)):
        path = Path(src)
        if path.is_dir():
            yield from folder_items(path, name)
        else:
            yield from tar_items(path, summary, name)
