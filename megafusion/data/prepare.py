"""Writing MDS shards: the library behind tools/prepare_data.py (its command line: prepare_cli.py).

    prepare_data.py synthetic --out DIR --n N [--size 32] [--seed S] [--val-n M] [--vae PATH] [--align-encoder PATH]
    prepare_data.py images SOURCE... --out DIR [--size 256] [--vae PATH] [--align-encoder PATH]
    prepare_data.py text SOURCE.jsonl... --out DIR

Image-caption shards: columns image (PNG, or JPEG above 128 px, bytes), caption (str),
id (str), plus latents with --vae (float16 [C, h, w] from megafusion.model.image_io's
vae_encode, the model's own encoder: posterior mean, shift_factor and scaling_factor
applied), align_features with --align-encoder (float16 [P, D]: the patch features of
megafusion.model.align's AlignEncoder, the feature-alignment targets the trainer would
otherwise compute; --align-feature-layer picks the encoder layer, as model.align_feature_layer
does), and meta (json ground truth) for synthetic data. Text shards: text, id. zstd
compression, xxh64 hashes. `out` may be a local directory or a URL streaming can write
to (s3://, gs://, ...).

synthetic also writes a held-out split to OUT/val (indices from VAL_INDEX_OFFSET, so
disjoint random streams), which evaluation reads.

Row ids: a text record's own "id", else LABEL/LINE (its line number); an image LABEL/KEY
(image_sources.py). LABEL tells the sources of one command apart without absolute paths
(image_sources.source_labels): corpus for a lone corpus.jsonl, the full file names for
c4-train.00000-of-01024.json and c4-train.00001-of-01024.json, a/train and b/train for two
folders named train. A repeated id is a duplicate_id skip.

A local --out is written into a hidden sibling directory (.NAME.partial-XXXX) and renamed
into place when complete; with --overwrite the old output is removed only then, so a
bad source, model path or a failure midway leaves it as it was.

Bad input never stops a conversion: each skipped row is counted under a reason and the
counts are printed and written to OUT/prepare_summary.json as
{"written": N, "skipped": {reason: count}, "converted": {mode: count}}. The exit status is
0 unless nothing was written. The sources of `images` (folders, webdataset tars) are read by
image_sources.py.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .image_sources import TAR_SUFFIXES, image_items, source_labels
from .images import ImageSkip, decode_image, encode_image, resize_center_crop, to_rgb

SUMMARY_NAME = "prepare_summary.json"
DEFAULT_SHARD_SIZE = 1 << 26
COMPRESSION = "zstd"
HASHES = ["xxh64"]


class PrepareError(Exception):
    """A fatal problem with the command line or an output location (one line)."""


# ------------------------------------------------------------------------ bookkeeping

@dataclass
class Summary:
    written: int = 0
    skipped: Counter = field(default_factory=Counter)
    converted: Counter = field(default_factory=Counter)  # source image modes turned into RGB

    def skip(self, reason: str) -> None:
        self.skipped[reason] += 1

    def as_dict(self) -> dict:
        out = {"written": self.written, "skipped": dict(sorted(self.skipped.items()))}
        if self.converted:
            out["converted"] = dict(sorted(self.converted.items()))
        return out

    def line(self, out: str) -> str:
        skipped = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())) or "none"
        return f"wrote {self.written} samples to {out}; skipped: {skipped}"


def is_url(out: str) -> bool:
    return urllib.parse.urlparse(str(out)).scheme not in ("", "file")


def join_out(out: str, sub: str) -> str:
    return out.rstrip("/") + "/" + sub if is_url(out) else os.path.join(out, sub)


def check_out(out: str, overwrite: bool) -> bool:
    """Refuse an --out that cannot take the output. True when a non-empty local directory
    is there (allowed with overwrite; replaced by Staging.install). Removes nothing."""
    if is_url(out):
        return False
    path = Path(out)
    try:
        if path.exists() and not path.is_dir():
            raise PrepareError(f"--out {out}: exists and is not a directory")
        if path.is_dir() and any(path.iterdir()):
            if not overwrite:
                raise PrepareError(f"--out {out}: directory is not empty (pass --overwrite to replace it)")
            return True
    except OSError as e:
        raise PrepareError(f"--out {out}: cannot read it ({e.strerror or type(e).__name__})") from None
    return False


class Staging:
    """A local output written in a hidden sibling directory and renamed into place at the
    end: a failure before install() leaves what was at `out` untouched."""

    def __init__(self, out: str):
        self.out = out
        self.final = Path(os.path.realpath(out))  # through a symlink: its target is replaced
        if not self.final.name:
            raise PrepareError(f"--out {out}: not a directory that can be written")
        try:
            self.final.parent.mkdir(parents=True, exist_ok=True)
            self.path = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.partial-", dir=self.final.parent))
        except OSError as e:
            blocker = next((p for p in self.final.parents if p.exists() and not p.is_dir()), None)
            why = f"{blocker} is not a directory" if blocker else e.strerror or type(e).__name__
            raise PrepareError(f"--out {out}: cannot write there ({why})") from None

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def install(self) -> None:
        """Move the finished output to `out`; the old contents are removed only then."""
        old = self.path.with_name(self.path.name.replace(".partial-", ".old-", 1))
        had_old = os.path.lexists(self.final)
        try:
            if had_old:
                os.rename(self.final, old)
            try:
                os.rename(self.path, self.final)
            except OSError:
                if had_old:
                    os.rename(old, self.final)
                raise
        except OSError as e:
            self.discard()
            raise PrepareError(f"--out {self.out}: cannot move the new output into place "
                               f"({e.strerror or type(e).__name__}); left as it was") from None
        if had_old:
            shutil.rmtree(old, ignore_errors=True)


def write_summary(out: str, summary: Summary) -> None:
    data = json.dumps(summary.as_dict(), indent=2) + "\n"
    if not is_url(out):
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, SUMMARY_NAME), "w") as f:
            f.write(data)
        return
    from streaming.base.storage.upload import CloudUploader

    tmp = tempfile.mkdtemp()
    try:
        with open(os.path.join(tmp, SUMMARY_NAME), "w") as f:
            f.write(data)
        CloudUploader.get((tmp, out), keep_local=False).upload_file(SUMMARY_NAME)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _progress(desc: str, total: int | None = None):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="sample", mininterval=0.5, file=sys.stderr)


def _mds_writer(out: str, columns: dict, shard_size: int):
    from streaming import MDSWriter

    return MDSWriter(out=out, columns=columns, compression=COMPRESSION, hashes=HASHES, size_limit=shard_size)


def clean_caption(value) -> str:
    """bytes/str/None -> stripped caption, or ImageSkip(reason)."""
    if value is None:
        raise ImageSkip("missing_caption")
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise ImageSkip("caption_not_utf8") from None
    if not isinstance(value, str):
        raise ImageSkip("bad_caption")
    try:
        value.encode("utf-8")  # surrogates left by errors="surrogateescape"
    except UnicodeEncodeError:
        raise ImageSkip("caption_not_utf8") from None
    value = value.replace("\x00", "").strip()
    if not value:
        raise ImageSkip("empty_caption")
    return value


# ---------------------------------------------------------------- image shard writer

class ImageShardWriter:
    """Buffers converted images so latents are encoded in batches, then writes rows."""

    def __init__(self, out: str, size: int, vae_path: str | None = None, image_format: str = "auto",
                 shard_size: int = DEFAULT_SHARD_SIZE, with_meta: bool = False, vae_batch: int = 16,
                 align_encoder: str | None = None, align_feature_layer: int | None = None):
        self.size = size
        self.image_format = ("png" if size <= 128 else "jpeg") if image_format == "auto" else image_format
        self.with_meta = with_meta
        self.vae = self.align = None
        self.vae_batch = vae_batch
        columns = {"image": "bytes", "caption": "str", "id": "str"}
        if with_meta:
            columns["meta"] = "json"
        if vae_path:
            self.vae = load_vae(vae_path)
            c, h, w = self._encode([_blank_image(size)])[0].shape
            columns["latents"] = f"ndarray:float16:{c},{h},{w}"
        if align_encoder:
            self.align = load_align(align_encoder, align_feature_layer)
            p, d = self._features([_blank_image(size)])[0].shape
            columns["align_features"] = f"ndarray:float16:{p},{d}"
        self.pending: list[dict] = []
        self.writer = _mds_writer(out, columns, shard_size)
        self.written = 0

    def _encode(self, images) -> list:
        import numpy as np
        import torch

        from megafusion.model.image_io import vae_encode

        from .images import to_tensor

        latent = vae_encode(self.vae, torch.stack([to_tensor(im) for im in images]))
        return [np.ascontiguousarray(t.float().cpu().numpy().astype(np.float16)) for t in latent]

    def _features(self, images) -> list:
        import numpy as np
        import torch

        from .images import to_tensor

        feats = self.align(torch.stack([to_tensor(im) for im in images]))
        return [np.ascontiguousarray(f.cpu().numpy().astype(np.float16)) for f in feats]

    def add(self, sample_id: str, image, caption: str, meta: dict | None = None) -> None:
        row = {"image": encode_image(image, self.image_format), "caption": caption, "id": sample_id}
        if self.with_meta:
            row["meta"] = meta or {}
        encoding = self.vae is not None or self.align is not None
        if encoding:
            row["_pil"] = image
        self.pending.append(row)
        if not encoding or len(self.pending) >= self.vae_batch:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        images = [r.pop("_pil") for r in self.pending if "_pil" in r]
        if self.vae is not None:
            for r, lat in zip(self.pending, self._encode(images)):
                r["latents"] = lat
        if self.align is not None:
            for r, f in zip(self.pending, self._features(images)):
                r["align_features"] = f
        for r in self.pending:
            self.writer.write(r)
            self.written += 1
        self.pending = []

    def close(self) -> None:
        self.flush()
        self.writer.finish()


def _blank_image(size: int):
    from PIL import Image

    return Image.new("RGB", (size, size), (128, 128, 128))


def load_align(path: str, feature_layer: int | None):
    from megafusion.model.align import AlignEncoder, AlignEncoderError

    try:
        return AlignEncoder(path, feature_layer)
    except AlignEncoderError as e:
        raise PrepareError(f"--align-encoder {path}: {str(e).split(': ', 1)[-1]}") from None
    except Exception as e:  # a directory that transformers cannot load
        raise PrepareError(f"--align-encoder {path}: cannot load ({type(e).__name__}: {str(e).splitlines()[0]})") from None


def load_vae(path: str):
    try:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(path)
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else ""
        raise PrepareError(f"--vae {path}: cannot load a diffusers AutoencoderKL ({type(e).__name__}: {msg})") from None
    import torch

    return vae.eval().float().to("cuda" if torch.cuda.is_available() else "cpu")


def check_image_sources(sources: list[str]) -> None:
    if not sources:
        raise PrepareError("images: give at least one SOURCE (a folder or a webdataset .tar)")
    for src in sources:
        path = Path(src)
        if not path.exists():
            raise PrepareError(f"source {src}: no such file or directory")
        if not (path.is_dir() or path.name.endswith(TAR_SUFFIXES) or tarfile.is_tarfile(path)):
            raise PrepareError(f"source {src}: not a folder or a .tar file")


def write_images(sources: list[str], out: str, size: int = 256, vae_path: str | None = None,
                 image_format: str = "auto", shard_size: int = DEFAULT_SHARD_SIZE, **align) -> Summary:
    """align: align_encoder, align_feature_layer (ImageShardWriter's)."""
    check_image_sources(sources)
    summary = Summary()
    writer = ImageShardWriter(out, size, vae_path, image_format, shard_size, **align)
    seen: set[str] = set()
    with _progress("images") as bar:
        for raw in image_items(sources, summary):
            bar.update(1)
            if raw.skip:
                summary.skip(raw.skip)
                continue
            if raw.id in seen:
                summary.skip("duplicate_id")
                continue
            try:
                caption = clean_caption(raw.caption)
                img = decode_image(raw.image)
                if img.mode != "RGB":
                    summary.converted[img.mode] += 1
                img = resize_center_crop(to_rgb(img), size)
            except ImageSkip as e:
                summary.skip(e.reason)
                continue
            seen.add(raw.id)
            writer.add(raw.id, img, caption)
    writer.close()
    summary.written = writer.written
    return summary


# ------------------------------------------------------------------------- synthetic

def write_synthetic(out: str, n: int, size: int = 32, seed: int = 0, split: str = "train",
                    vae_path: str | None = None, shard_size: int = DEFAULT_SHARD_SIZE, **align) -> Summary:
    from .synthetic import synthetic_samples

    summary = Summary()
    writer = ImageShardWriter(out, size, vae_path, "png", shard_size, with_meta=True, **align)
    with _progress(f"synthetic {split}", total=n) as bar:
        for s in synthetic_samples(seed, n, size, split):
            writer.add(s.id, s.image, s.caption, s.meta)
            bar.update(1)
    writer.close()
    summary.written = writer.written
    return summary


# ------------------------------------------------------------------------------ text

def check_text_sources(sources: list[str]) -> None:
    if not sources:
        raise PrepareError("text: give at least one SOURCE.jsonl")
    for src in sources:
        if not Path(src).is_file():
            raise PrepareError(f"source {src}: no such file")


def write_text(sources: list[str], out: str, shard_size: int = DEFAULT_SHARD_SIZE) -> Summary:
    check_text_sources(sources)
    summary = Summary()
    writer = _mds_writer(out, {"text": "str", "id": "str"}, shard_size)
    seen: set[str] = set()
    with _progress("text") as bar:
        for src, label in zip(sources, source_labels(sources)):
            with open(src, "rb") as f:
                for n, raw in enumerate(f, 1):
                    if not raw.strip():
                        continue
                    bar.update(1)
                    try:
                        rec = json.loads(raw.decode("utf-8"))
                    except UnicodeDecodeError:
                        summary.skip("text_not_utf8")
                        continue
                    except ValueError:
                        summary.skip("bad_record")
                        continue
                    if not isinstance(rec, dict):
                        summary.skip("bad_record")
                        continue
                    text = rec.get("text")
                    if not isinstance(text, str):
                        summary.skip("missing_text")
                        continue
                    if not text.strip():
                        summary.skip("empty_text")
                        continue
                    try:
                        text.encode("utf-8")
                    except UnicodeEncodeError:  # lone surrogates from \ud800 escapes
                        summary.skip("text_not_utf8")
                        continue
                    sample_id = str(rec["id"]) if rec.get("id") is not None else f"{label}/{n}"
                    if sample_id in seen:
                        summary.skip("duplicate_id")
                        continue
                    seen.add(sample_id)
                    writer.write({"text": text, "id": sample_id})
                    summary.written += 1
    writer.finish()
    return summary
