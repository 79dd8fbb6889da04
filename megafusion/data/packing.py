"""Packing a fixed group of samples into the rows of one PackedBatch.

Rows are filled in sample order (next-fit): a document that does not fit in the current
row starts the next one, so no document, and therefore no image, is ever split across
rows. When the last row is reached, documents that do not fit in it are dropped and
counted ("dropped_overflow"); later, smaller ones may still fill it. A document longer
than seq_len keeps its head when its last image still fits (its trailing text is cut,
"truncated"), otherwise it is skipped ("too_long"). All of this is a pure function of the
group, which is what makes resumption exact (see megafusion/data/__init__.py).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, fields
from typing import Sequence

from megafusion.model.batch import Document, ImageSegment, PackedBatch, TextSegment, document_length

_PACKED_FIELDS = tuple(f.name for f in fields(PackedBatch))


@dataclass
class TrainBatch(PackedBatch):
    """A PackedBatch plus the bookkeeping of the step that produced it.

    num_samples: shard rows this rank consumed for the step (what the loader's state
      counts; constant except for a short last step of an epoch).
    stats: counts for logging: samples, image_samples, text_samples, documents, images,
      tokens (non-padding positions), dropped_overflow, truncated, too_long,
      skipped (total) and skipped/<reason>.
    as_dict() and to() keep the model-facing contract of PackedBatch.
    """
    num_samples: int = 0
    stats: dict = field(default_factory=dict)

    def packed(self) -> PackedBatch:
        return PackedBatch(**{name: getattr(self, name) for name in _PACKED_FIELDS})

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in _PACKED_FIELDS}

    def to(self, device=None, dtype=None) -> "TrainBatch":
        moved = self.packed().to(device=device, dtype=dtype)
        return TrainBatch(**moved.as_dict(), num_samples=self.num_samples, stats=dict(self.stats))


def fit_document(doc: Document, seq_len: int, tokens_per_image: int) -> Document | None:
    """doc if it fits; else doc cut after seq_len tokens when no image is cut; else None."""
    if document_length(doc, tokens_per_image) <= seq_len:
        return doc
    out, pos = [], 0
    for seg in doc:
        if isinstance(seg, ImageSegment):
            if pos + tokens_per_image > seq_len:
                return None
            out.append(seg)
            pos += tokens_per_image
        else:
            room = seq_len - pos
            if room <= 0:
                break
            ids = list(seg.ids)[:room]
            out.append(TextSegment(ids, seg.loss))
            pos += len(ids)
    return out


def pack_documents(docs: Sequence[Document], num_rows: int, seq_len: int, tokens_per_image: int,
                   stats: Counter | None = None) -> list[list[Document]]:
    stats = Counter() if stats is None else stats
    rows: list[list[Document]] = [[] for _ in range(num_rows)]
    used = [0] * num_rows
    r = 0
    for doc in docs:
        fitted = fit_document(doc, seq_len, tokens_per_image)
        if fitted is None:
            stats["too_long"] += 1
            continue
        if fitted is not doc:
            stats["truncated"] += 1
        n = document_length(fitted, tokens_per_image)
        if n == 0:
            continue
        if used[r] + n > seq_len and r + 1 < num_rows:
            r += 1
        if used[r] + n > seq_len:
            stats["dropped_overflow"] += 1
            continue
        rows[r].append(fitted)
        used[r] += n
    stats["documents"] += sum(len(row) for row in rows)
    stats["tokens"] += sum(used)
    return rows


class PackCollate:
    """DataLoader collate: a list of built samples (see FusionDataset) -> TrainBatch."""

    def __init__(self, num_rows: int, seq_len: int, tokens_per_image: int, image_shape: Sequence[int],
                 images_are_latents: bool):
        self.num_rows = num_rows
        self.seq_len = seq_len
        self.tokens_per_image = tokens_per_image
        self.image_shape = tuple(image_shape)
        self.images_are_latents = images_are_latents

    def __call__(self, samples: list[dict]) -> TrainBatch:
        stats: Counter = Counter()
        stats["samples"] = len(samples)
        docs = []
        for s in samples:
            if s.get("skip"):
                stats["skipped"] += 1
                stats[f"skipped/{s['skip']}"] += 1
                continue
            stats[f"{s['kind']}_samples"] += 1
            docs.extend(s["docs"])
        rows = pack_documents(docs, self.num_rows, self.seq_len, self.tokens_per_image, stats)
        batch = PackedBatch.from_rows(rows, self.seq_len, self.tokens_per_image, self.image_shape,
                                      self.images_are_latents)
        stats["images"] = batch.num_images
        for key in ("image_samples", "text_samples", "skipped", "dropped_overflow", "truncated", "too_long"):
            stats.setdefault(key, 0)
        return TrainBatch(**batch.as_dict(), num_samples=len(samples), stats=dict(stats))
