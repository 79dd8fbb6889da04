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
    assert n == 2000
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
