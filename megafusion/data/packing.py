"""Packing each step's samples into the rows of one TrainBatch.

A step consumes a fixed number of samples (what makes resumption exact, see
megafusion/data/__init__.py), and their documents go into batch_size rows of seq_len:

  - A document that fits whole in some row goes into the first such row (first fit).
    A document with an image is never split, so no image is ever cut.
  - A text-only document that fits in no row whole is divisible: it fills the room rows
    have left, split where a row ends. Each piece is its own document (positions restart;
    the first token of a piece is never a target), as text_documents() already does at
    seq_len.
  - What does not fit in the step waits for the next step (the carry), ahead of that
    step's own samples, up to carry_tokens tokens; beyond that it is dropped and counted
    ("dropped_overflow" documents, "dropped_tokens").

A document with an image that is longer than seq_len keeps its head when its last image
still fits (its trailing text is cut, "truncated"), otherwise it is skipped ("too_long");
the tokens either loses are counted ("unfit_tokens").

The carry is part of the loader's state: each carried piece is named by (epoch, sample
index, document number, token offset), from which the resumed loader rebuilds the very
same piece (a sample's documents are a function of its row, index and epoch; see
sequence.py), so a resumed run packs the same batches as the uninterrupted one.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, fields
from typing import Callable, Sequence

from megafusion.model.batch import Document, PackedBatch, TextSegment, document_length

_PACKED_FIELDS = tuple(f.name for f in fields(PackedBatch))


@dataclass
class TrainBatch(PackedBatch):
    """A PackedBatch plus the bookkeeping of the step that produced it.

    num_samples: shard rows this rank consumed for the step (what the loader's state
      counts; constant except for a short last step of an epoch).
    stats: counts for logging: samples, image_samples, text_samples, documents, images,
      tokens (non-padding positions), carried_in (pieces from earlier steps), carried
      (pieces left for the next step), split, dropped_overflow, dropped_tokens,
      truncated, too_long, unfit_tokens, skipped (total) and skipped/<reason>.
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


def is_text_only(doc: Document) -> bool:
    return all(isinstance(seg, TextSegment) for seg in doc)


def split_text(doc: Document, k: int) -> tuple[Document, Document]:
    """A text-only document cut after its first k tokens: (head, tail)."""
    head, tail, pos = [], [], 0
    for seg in doc:
        n = len(seg.ids)
        if pos + n <= k:
            head.append(seg)
        elif pos >= k:
            tail.append(seg)
        else:
            ids = list(seg.ids)
            head.append(TextSegment(ids[:k - pos], seg.loss))
            tail.append(TextSegment(ids[k - pos:], seg.loss))
        pos += n
    return head, tail


def fit_document(doc: Document, seq_len: int, tokens_per_image: int) -> Document | None:
    """doc if it fits; else doc cut after seq_len tokens when no image (nor a LLaVA
    image's placeholder run) is cut; else None."""
    if document_length(doc, tokens_per_image) <= seq_len:
        return doc
    out, pos = [], 0
    for seg in doc:
        if not isinstance(seg, TextSegment):  # an image, or a LLaVA image's placeholders: never cut
            n = document_length([seg], tokens_per_image)
            if pos + n > seq_len:
                return None
            out.append(seg)
            pos += n
        else:
            room = seq_len - pos
            if room <= 0:
                break
            ids = list(seg.ids)[:room]
            out.append(TextSegment(ids, seg.loss))
            pos += len(ids)
    return out


def pack_documents(docs: Sequence[Document], num_rows: int, seq_len: int, tokens_per_image: int,
                   stats: Counter | None = None, leftover: list | None = None) -> list[list[Document]]:
    """Place docs, in order, into num_rows rows of seq_len (see the module docstring).

    leftover: when a list, what does not fit is appended to it as (i, part): the index in
    docs and the part not placed (a text document's unplaced tail, or the whole document);
    when None it is dropped and counted in stats ("dropped_overflow", "dropped_tokens").
    """
    stats = Counter() if stats is None else stats
    rows: list[list[Document]] = [[] for _ in range(num_rows)]
    used = [0] * num_rows
    for i, doc in enumerate(docs):
        fitted = doc if is_text_only(doc) else fit_document(doc, seq_len, tokens_per_image)
        if fitted is None:
            stats["too_long"] += 1
            stats["unfit_tokens"] += document_length(doc, tokens_per_image)
            continue
        if fitted is not doc:
            stats["truncated"] += 1
            stats["unfit_tokens"] += document_length(doc, tokens_per_image) - document_length(fitted, tokens_per_image)
        n = document_length(fitted, tokens_per_image)
        if n == 0:
            continue
        r = next((r for r in range(num_rows) if used[r] + n <= seq_len), None)
        if r is not None:
            rows[r].append(fitted)
            used[r] += n
            continue
        rest = fitted
        if is_text_only(fitted) and sum(used) < num_rows * seq_len:
            # Fill the rows' room in order; the rows may have more room in all than the
            # document needs (it fits in no one row), so its last piece may leave room
            # behind for the documents after it.
            for r in range(num_rows):
                take = min(seq_len - used[r], n)
                if take > 0:
                    head, rest = split_text(rest, take)
                    rows[r].append(head)
                    used[r] += take
                    n -= take
            stats["split"] += 1
            if n == 0:
                continue
        if leftover is not None:
            leftover.append((i, rest))
        else:
            stats["dropped_overflow"] += 1
            stats["dropped_tokens"] += n
    stats["documents"] += sum(len(row) for row in rows)
    stats["tokens"] += sum(used)
    return rows


@dataclass
class Piece:
    """A document waiting to be packed, and where it comes from:
    (epoch, sample index, document number in the sample, tokens already packed)."""
    doc: Document
    source: tuple[int, int, int, int]


class Packer:
    """Built samples of one step (see FusionDataset), after what earlier steps carried
    over -> TrainBatch. Runs in the loader's main process, step after step."""

    def __init__(self, num_rows: int, seq_len: int, tokens_per_image: int, image_shape: Sequence[int],
                 images_are_latents: bool, carry_tokens: int, feature_shape: Sequence[int] | None = None):
        self.num_rows = num_rows
        self.seq_len = seq_len
        self.tokens_per_image = tokens_per_image
        self.image_shape = tuple(image_shape)
        self.images_are_latents = images_are_latents
        self.carry_tokens = carry_tokens
        self.feature_shape = feature_shape
        self.carry: list[Piece] = []

    def place(self, pieces: list[Piece], stats: Counter) -> list[list[Document]]:
        """Rows for one step from pieces (the carry first); what does not fit becomes the
        carry, up to carry_tokens tokens, the rest is dropped and counted."""
        left: list = []
        rows = pack_documents([p.doc for p in pieces], self.num_rows, self.seq_len, self.tokens_per_image,
                              stats, leftover=left)
        self.carry, room = [], self.carry_tokens
        for i, part in left:
            n = document_length(part, self.tokens_per_image)
            if n > room:
                stats["dropped_overflow"] += 1
                stats["dropped_tokens"] += n
                continue
            epoch, index, j, offset = pieces[i].source
            if is_text_only(part):  # a tail: count what is already packed
                offset += document_length(pieces[i].doc, self.tokens_per_image) - n
            self.carry.append(Piece(part, (epoch, index, j, offset)))
            room -= n
        return rows

    def __call__(self, samples: list[dict]) -> TrainBatch:
        stats: Counter = Counter()
        stats["samples"] = len(samples)
        stats["carried_in"] = len(self.carry)
        pieces = list(self.carry)
        for s in samples:
            if s.get("skip"):
                stats["skipped"] += 1
                stats[f"skipped/{s['skip']}"] += 1
                continue
            stats[f"{s['kind']}_samples"] += 1
            pieces += [Piece(doc, (s["epoch"], s["index"], j, 0)) for j, doc in enumerate(s["docs"])]
        rows = self.place(pieces, stats)
        stats["carried"] = len(self.carry)
        batch = PackedBatch.from_rows(rows, self.seq_len, self.tokens_per_image, self.image_shape,
                                      self.images_are_latents, self.feature_shape)
        stats["images"] = batch.num_images
        for key in ("image_samples", "text_samples", "skipped", "dropped_overflow", "dropped_tokens", "split",
                    "truncated", "too_long", "unfit_tokens"):
            stats.setdefault(key, 0)
        return TrainBatch(**batch.as_dict(), num_samples=len(samples), stats=dict(stats))

    def carry_state(self) -> list[list[int]]:
        return [list(p.source) for p in self.carry]

    def restore_carry(self, state: list, build: Callable[[int, int], dict]) -> None:
        """Rebuild the carry from carry_state(); build(epoch, index) -> the built sample."""
        self.carry = []
        for epoch, index, j, offset in state:
            doc = build(int(epoch), int(index))["docs"][int(j)]
            if offset:
                doc = split_text(doc, int(offset))[1]
            self.carry.append(Piece(doc, (int(epoch), int(index), int(j), int(offset))))


def plan_samples_per_step(probe: Sequence[Sequence[Sequence[Document]]], shares: Sequence[float], num_rows: int,
                          seq_len: int, tokens_per_image: int, carry_tokens: int, *, max_drop: float = 0.02,
                          steps: int = 256, seed: int = 0, report: dict | None = None) -> int:
    """Samples per step derived from the step's token budget (num_rows x seq_len).

    probe: per stream, the documents of some of its samples as training builds them;
    shares: each stream's share of the samples. At most num_rows * seq_len / (mean tokens
    of a sample); then the largest count whose samples, drawn at random by share and
    packed step after step as the Packer packs them (carry included), lose at most
    max_drop of their tokens: a document with an image cannot be split, so rows leave
    gaps that the token count alone does not see. Deterministic (seeded), so every rank
    derives the same count. report: when a dict, gets "drop", the share of tokens lost at
    the returned count (above max_drop only where even one sample per step loses more:
    samples longer than a step and its carry hold).
    """
    weights = [w if probe[s] else 0.0 for s, w in enumerate(shares)]
    total = sum(weights)
    if total <= 0:
        if report is not None:
            report["drop"] = 0.0
        return 1
    lengths = [[sum(document_length(d, tokens_per_image) for d in docs) for docs in stream] for stream in probe]
    mean = sum(w * sum(ls) / len(ls) for w, ls in zip(weights, lengths) if w) / total
    upper = max(1, int(num_rows * seq_len // max(mean, 1.0)))
    p = [w / total for w in weights]

    drops: dict[int, float] = {}

    def drop_fraction(n: int) -> float:
        if n not in drops:
            drops[n] = simulated_drop(n)
        return drops[n]

    def simulated_drop(n: int) -> float:
        import numpy as np

        rng = np.random.default_rng(seed)
        packer = Packer(num_rows, seq_len, tokens_per_image, (), True, carry_tokens)
        stats: Counter = Counter()
        consumed = 0
        for _ in range(max(32, min(steps, 50_000 // n))):
            pieces = list(packer.carry)
            for s in rng.choice(len(p), size=n, p=p):
                k = int(rng.integers(len(probe[s])))
                consumed += lengths[s][k]
                pieces += [Piece(doc, (0, 0, j, 0)) for j, doc in enumerate(probe[s][k])]
            packer.place(pieces, stats)
        return (stats["dropped_tokens"] + stats["unfit_tokens"]) / max(consumed, 1)

    lo, hi = 1, upper  # the largest n in [lo, hi] with drop_fraction(n) <= max_drop
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if drop_fraction(mid) <= max_drop:
            lo = mid
        else:
            hi = mid - 1
    if report is not None:
        report["drop"] = drop_fraction(lo)
    return lo
