"""Mixing an image-caption stream with a text stream by proportion."""
from __future__ import annotations

import json
from collections import Counter

from mf_data_helpers import SINGLE, TOKENS_PER_IMAGE

from megafusion.data import build_train_loader
from megafusion.data.prepare import write_text


def test_mixing_by_proportion(tokenizer, synthetic_dir, tmp_path, fusion_cfg, make_cfg):
    src = tmp_path / "text.jsonl"
    with open(src, "w") as f:
        for i in range(300):
            f.write(json.dumps({"text": f"Sentence number {i} about nothing in particular."}) + "\n")
    write_text([str(src)], str(tmp_path / "text"))
    streams = [{"remote": synthetic_dir, "proportion": 0.7}, {"remote": str(tmp_path / "text"), "proportion": 0.3}]
    cfg = make_cfg(streams, seq_len=512, batch_size=2, samples_per_step=8, epoch_size=2000)
    loader = build_train_loader(cfg, fusion_cfg, tokenizer, TOKENS_PER_IMAGE, SINGLE)
    kinds = Counter()
    per_stream = Counter()
    for s in loader.dataset:
        kinds[s["kind"]] += 1
        per_stream[s["stream"]] += 1
    n = sum(kinds.values())
    # streaming repeats a few samples so that each of the 64 canonical nodes gets as many.
    assert 2000 <= n < 2000 + 64
    # streaming's balanced sampling draws exactly proportion * epoch_size per stream; allow
    # sampling error in case a version draws them at random.
    assert abs(kinds["image"] / n - 0.7) < 4.5 * (0.21 / n) ** 0.5
    assert per_stream[0] == kinds["image"] and per_stream[1] == kinds["text"]

    # And through the loader: both kinds arrive in packed batches, counted in stats.
    totals = Counter()
    for i, batch in enumerate(loader):
        totals.update({k: batch.stats[k] for k in ("image_samples", "text_samples")})
        if i == 60:
            break
    share = totals["image_samples"] / (totals["image_samples"] + totals["text_samples"])
    assert abs(share - 0.7) < 4.5 * (0.21 / 488) ** 0.5


def write_long_text(tmp_path, n_docs=120, seed=0) -> str:
    """Text shards of long documents: 50 to 500 words (about 110 to 1100 tokens)."""
    import random

    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "zen", "dor", "pel", "qua"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(300)]
    src = tmp_path / "long.jsonl"
    with open(src, "w") as f:
        for _ in range(n_docs):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(50, 500)))}) + "\n")
    write_text([str(src)], str(tmp_path / "long"))
    return str(tmp_path / "long")


def test_long_text_mixed_with_images_is_packed_not_dropped(tokenizer, synthetic_dir, tmp_path, fusion_cfg, make_cfg):
    """A text stream of long documents (30% of the samples) mixed with short image-caption
    samples (~80 tokens). Each step's sample count is derived from its token budget, and
    what does not fit waits for the next step, so nearly all of the text stream's tokens
    reach a batch while the rows stay full. Reference: the text rows consumed, read back
    raw and tokenised here, against the tokens of image-free documents in the batches."""
    from itertools import islice

    from megafusion.data.packing import is_text_only
    from megafusion.model.batch import IGNORE_INDEX, IMAGE

    streams = [{"remote": synthetic_dir, "proportion": 0.7}, {"remote": write_long_text(tmp_path), "proportion": 0.3}]
    seq_len, rows, steps = 512, 4, 60
    kw = dict(seq_len=seq_len, batch_size=rows, epoch_size=4000)
    loader = build_train_loader(make_cfg(streams, **kw), fusion_cfg, tokenizer, TOKENS_PER_IMAGE, SINGLE)
    batches = list(islice(loader, steps))
    consumed = sum(b.num_samples for b in batches)

    # The same rows in loader order, from a twin loader's dataset, tokenised independently.
    twin = build_train_loader(make_cfg(streams, **kw), fusion_cfg, tokenizer, TOKENS_PER_IMAGE, SINGLE)
    available = 0
    for s in islice(iter(twin.dataset), consumed):
        raw = twin.dataset.get_item(s["index"])
        if "text" in raw:
            available += len(tokenizer(raw["text"], add_special_tokens=False)["input_ids"]) + 2  # BOS, EOS

    placed = filled = 0
    for b in batches:
        for r in range(rows):
            docs = b.document_ids[r]
            for d in docs.unique().tolist():
                sel = docs == d
                real = int((b.labels[r][sel] != IGNORE_INDEX).sum())  # padding has no labels
                filled += int(sel.sum()) if real else 0
                if not (b.modality[r][sel] == IMAGE).any():
                    placed += real
    share, fill = placed / available, filled / (steps * rows * seq_len)
    # Nothing is lost: what is not in a batch yet is waiting in the carry (or was dropped, counted).
    waiting = sum(len(seg.ids) for p in loader.packer.carry if is_text_only(p.doc) for seg in p.doc)
    dropped = sum(b.stats["dropped_tokens"] for b in batches)
    assert placed + waiting + dropped == available
    print(f"samples/step {batches[0].num_samples}: text tokens placed {placed}/{available} = {share:.3f}, "
          f"rows filled {fill:.3f}, waiting {waiting}, dropped {dropped}")
    assert available > 50 * seq_len  # the text stream is a real part of the mix
    assert share >= 0.9
    assert fill >= 0.8
