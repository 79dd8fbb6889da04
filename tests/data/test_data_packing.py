"""Packed sequences: layout, labels, masks, the packer's edge cases, its carry, and the
step's sample count derived from its token budget."""
from __future__ import annotations

import itertools

import pytest
import torch

from megafusion.data import build_train_loader, image_token_ids, pack_documents, text_special_ids
from megafusion.data.packing import Packer, fit_document, plan_samples_per_step, split_text
from megafusion.model.batch import IGNORE_INDEX, IMAGE, TEXT, ImageSegment, TextSegment, document_length

from mf_data_helpers import IMAGE_SIZE, SINGLE, TOKENS_PER_IMAGE


def brute_force_layout(rows, seq_len, tpi):
    """Per row: lists of (document, image or None, token id or None, label, position)."""
    out = []
    for docs in rows:
        pos = []
        for d, doc in enumerate(docs):
            p = 0
            for seg in doc:
                if isinstance(seg, TextSegment):
                    for t in seg.ids:
                        pos.append((d, None, t, t if seg.loss else IGNORE_INDEX, p))
                        p += 1
                else:
                    key = id(seg)
                    for _ in range(tpi):
                        pos.append((d, key, None, IGNORE_INDEX, p))
                        p += 1
        assert len(pos) <= seq_len
        pad_doc = len(docs)
        pos += [(pad_doc, None, None, IGNORE_INDEX, i) for i in range(seq_len - len(pos))]
        out.append(pos)
    return out


def brute_force_mask(layout):
    L = len(layout)
    m = torch.zeros(L, L, dtype=torch.bool)
    for i, (di, ii, *_ ) in enumerate(layout):
        for j, (dj, ij, *_ ) in enumerate(layout):
            m[i, j] = di == dj and (j <= i or (ii is not None and ii == ij))
    return m


def test_image_and_special_token_ids(tokenizer):
    assert image_token_ids(49152) == (49152, 49153)
    bos, eos = text_special_ids(tokenizer)
    assert bos == tokenizer.bos_token_id
    assert eos != bos and tokenizer.convert_ids_to_tokens(eos) == "<|im_end|>"


def test_packed_batches_match_samples(tokenizer, synthetic_dir, fusion_cfg, make_cfg):
    from megafusion.model.attention import hybrid_mask

    seq_len, rows, per_step = 170, 2, 5
    cfg = make_cfg(synthetic_dir, seq_len=seq_len, batch_size=rows, samples_per_step=per_step, shuffle=True)
    loader = build_train_loader(cfg, fusion_cfg, tokenizer, TOKENS_PER_IMAGE, SINGLE)
    batches = list(itertools.islice(loader, 12))

    # The same samples, straight from a fresh dataset (same epoch 0) in loader order.
    cfg2 = make_cfg(synthetic_dir, seq_len=seq_len, batch_size=rows, samples_per_step=per_step, shuffle=True)
    ref = build_train_loader(cfg2, fusion_cfg, tokenizer, TOKENS_PER_IMAGE, SINGLE)
    samples = list(itertools.islice(iter(ref.dataset), 12 * per_step))

    bos, eos = text_special_ids(tokenizer)
    boi, eoi = image_token_ids(len(tokenizer))
    carried = 0
    waiting = []  # documents carried from earlier steps, oldest first
    for step, batch in enumerate(batches):
        group = samples[step * per_step:(step + 1) * per_step]
        assert batch.num_samples == per_step and batch.stats["samples"] == per_step
        assert batch.input_ids.shape == (rows, seq_len)
        assert batch.images.shape[1:] == (3, IMAGE_SIZE, IMAGE_SIZE) and not batch.images_are_latents

        # Reference packing, written independently: the waiting documents, then the step's,
        # each into the first row with room; what fits nowhere waits (well under the carry's
        # 8 steps x rows x seq_len tokens here, so nothing is dropped).
        expect_rows, used, left = [[] for _ in range(rows)], [0] * rows, []
        for doc in waiting + [s["docs"][0] for s in group]:
            n = document_length(doc, TOKENS_PER_IMAGE)
            r = next((r for r in range(rows) if used[r] + n <= seq_len), None)
            if r is None:
                left.append(doc)
                continue
            expect_rows[r].append(doc)
            used[r] += n
        assert batch.stats["carried_in"] == len(waiting) and batch.stats["carried"] == len(left)
        assert batch.stats["dropped_overflow"] == 0
        waiting = left
        carried += len(left)

        layout = brute_force_layout(expect_rows, seq_len, TOKENS_PER_IMAGE)
        images = [seg for row in expect_rows for doc in row for seg in doc if isinstance(seg, ImageSegment)]
        assert batch.num_images == len(images)
        for k, seg in enumerate(images):
            assert torch.equal(batch.images[k], seg.image)
            assert batch.timesteps[k] == seg.timestep
            assert bool(batch.image_is_condition[k]) == seg.is_condition
        for b in range(rows):
            lay = layout[b]
            assert batch.document_ids[b].tolist() == [p[0] for p in lay]
            assert batch.position_ids[b].tolist() == [p[4] for p in lay]
            assert batch.modality[b].tolist() == [TEXT if p[1] is None else IMAGE for p in lay]
            assert batch.labels[b].tolist() == [p[3] for p in lay]
            text = [(p[2] if p[2] is not None else 0) for p in lay]
            assert batch.input_ids[b].tolist() == text
            # Image ids: one contiguous run per image, all inside this row.
            img = batch.image_ids[b]
            for k in img.unique().tolist():
                if k >= 0:
                    where = (img == k).nonzero().flatten()
                    assert where.numel() == TOKENS_PER_IMAGE
                    assert int(where[-1] - where[0]) == TOKENS_PER_IMAGE - 1
            assert torch.equal(hybrid_mask(batch.document_ids[b:b + 1], batch.image_ids[b:b + 1])[0],
                               brute_force_mask(lay))

        # Token content: each document is BOS, caption, BOI, image, EOI, EOS or the
        # understanding order, with the caption tokenised by the real tokenizer.
        for s in group:
            raw = ref.dataset.get_item(s["index"])
            caption = tokenizer(raw["caption"], add_special_tokens=False)["input_ids"]
            (doc,) = s["docs"]
            ids = [t for seg in doc if isinstance(seg, TextSegment) for t in seg.ids]
            image_seg = next(seg for seg in doc if isinstance(seg, ImageSegment))
            if image_seg.is_condition:
                assert ids == [bos, boi, eoi] + caption + [eos]
                assert isinstance(doc[1], TextSegment) and isinstance(doc[2], ImageSegment)
            elif ids == [bos, boi, eoi, eos]:
                pass  # caption dropped
            else:
                assert ids == [bos] + caption + [boi, eoi, eos]
    assert carried > 0  # the configuration above does overflow: the carry is exercised


def test_labels_with_dropped_caption(tokenizer, synthetic_dir, fusion_cfg, make_cfg):
    cfg = make_cfg(synthetic_dir, seq_len=100, batch_size=1, samples_per_step=1, caption_drop=1.0,
                   generation_ratio=1.0)
    loader = build_train_loader(cfg, fusion_cfg, tokenizer, TOKENS_PER_IMAGE, SINGLE)
    bos, eos = text_special_ids(tokenizer)
    boi, eoi = image_token_ids(len(tokenizer))
    batch = next(iter(loader))
    n = 3 + TOKENS_PER_IMAGE + 1
    assert batch.input_ids[0, :2].tolist() == [bos, boi]
    assert batch.labels[0, :n].tolist() == [IGNORE_INDEX, boi] + [IGNORE_INDEX] * TOKENS_PER_IMAGE + [eoi, eos]
    assert batch.stats["tokens"] == n


def doc(text_len, images=1, text_after=0, tpi=4):
    out = [TextSegment(list(range(1, text_len + 1)))]
    for _ in range(images):
        out.append(ImageSegment(torch.zeros(3, 2, 2)))
    if text_after:
        out.append(TextSegment(list(range(1, text_after + 1))))
    return out


def test_fit_document_truncates_trailing_text_only():
    d = doc(2, text_after=10)  # 2 + 4 + 10 = 16
    assert fit_document(d, 16, 4) is d
    cut = fit_document(d, 9, 4)
    assert document_length(cut, 4) == 9 and isinstance(cut[1], ImageSegment)
    assert fit_document(doc(8), 10, 4) is None  # the image would be cut


def test_pack_documents_first_fit_split_and_counts():
    from collections import Counter

    stats = Counter()
    docs = [doc(2), doc(2), doc(6), doc(1), doc(20), doc(30, images=0)]
    # lengths: 6, 6, 10, 5, 24 (> 12: the image would be cut -> too_long), 30 text-only.
    # Rows of 12: the 6s fill row 0, the 10 goes to row 1, the 5 fits nowhere; the text
    # fits no row whole, so its first 2 tokens fill row 1 and 28 are left.
    rows = pack_documents(docs, 2, 12, 4, stats)
    assert [[document_length(d, 4) for d in row] for row in rows] == [[6, 6], [10, 2]]
    assert rows[1][1] == [TextSegment([1, 2])]
    assert stats["too_long"] == 1 and stats["truncated"] == 0 and stats["split"] == 1
    assert stats["dropped_overflow"] == 2 and stats["dropped_tokens"] == 5 + 28
    assert stats["documents"] == 4 and stats["tokens"] == 24
    # With a list for leftovers, nothing is dropped: what is left comes back with its index.
    left = []
    pack_documents(docs, 2, 12, 4, Counter(), leftover=left)
    assert [(i, document_length(part, 4)) for i, part in left] == [(3, 5), (5, 28)]
    assert left[1][1] == [TextSegment(list(range(3, 31)))]


def test_a_split_document_leaves_the_room_it_does_not_need():
    """Rows of 10 with 4 free each: a 6-token text fits in neither, so it is split 4 + 2,
    and the 2-token document after it takes the 2 places row 1 still has (before, the
    split claimed all of row 1, carried an empty piece and counted 20 tokens for 18)."""
    from collections import Counter

    a, b = [TextSegment(list(range(6)))], [TextSegment(list(range(10, 16)))]
    split, short = [TextSegment(list(range(100, 106)))], [TextSegment([7, 8])]
    stats, left = Counter(), []
    rows = pack_documents([a, b, split, short], 2, 10, 4, stats, leftover=left)
    assert rows == [[a, [TextSegment([100, 101, 102, 103])]], [b, [TextSegment([104, 105])], short]]
    assert left == [] and stats["split"] == 1 and stats["tokens"] == 20 and stats["documents"] == 5
    # Without a leftover list nothing is counted as dropped either.
    stats = Counter()
    pack_documents([a, b, split], 2, 10, 4, stats)
    assert stats["dropped_overflow"] == 0 and stats["dropped_tokens"] == 0 and stats["tokens"] == 18


def test_fit_document_never_cuts_a_llava_image():
    """A LLaVA understanding row longer than seq_len keeps its head when the image's
    placeholder run fits whole, and is too long otherwise (before: AttributeError in the
    loader, which treated the run as text)."""
    from collections import Counter

    from megafusion.model.batch import VLMImageSegment

    image = VLMImageSegment(torch.zeros(3, 4, 4), token_id=999, n_tokens=20)
    row = [TextSegment([1], loss=False), image, TextSegment([2], loss=False), TextSegment([5, 6, 7, 3])]
    assert fit_document(row, 23, 4) == [TextSegment([1], loss=False), image, TextSegment([2], loss=False),
                                        TextSegment([5])]
    assert fit_document(row, 21, 4) == [TextSegment([1], loss=False), image]
    assert fit_document(row, 20, 4) is None
    stats = Counter()
    assert pack_documents([row], 1, 16, 4, stats) == [[]] and stats["too_long"] == 1


def test_first_fit_fills_earlier_rows():
    # 8 opens row 0, the 6 does not fit beside it and opens row 1; the 4 goes back to row 0
    # (next fit, which only looks at the current row, would leave row 0 at 8 of 12).
    rows = pack_documents([doc(4), doc(2), doc(0)], 2, 12, 4)
    assert [[document_length(d, 4) for d in row] for row in rows] == [[8, 4], [6]]


def test_split_text_keeps_segments_and_loss():
    d = [TextSegment([1, 2, 3], loss=False), TextSegment([4, 5, 6, 7])]
    head, tail = split_text(d, 5)
    assert head == [TextSegment([1, 2, 3], loss=False), TextSegment([4, 5])]
    assert tail == [TextSegment([6, 7])]
    assert split_text(d, 3) == ([TextSegment([1, 2, 3], loss=False)], [TextSegment([4, 5, 6, 7])])


def text_sample(index, n, epoch=0):
    return {"kind": "text", "index": index, "epoch": epoch, "docs": [[TextSegment(list(range(100 + index, 100 + index + n)))]]}


def test_packer_carries_what_does_not_fit_and_restores_it():
    """Rows of 10, 2 rows: step 1 has 7 + 9 + 8 text tokens: 20 fit, the 8's last 4 wait and
    open step 2; the carry names them by (epoch, index, doc, offset) and a packer rebuilt
    from that state packs step 2 exactly as the original does."""
    built = {i: text_sample(i, n) for i, n in ((0, 7), (1, 9), (2, 8), (3, 5))}
    a = Packer(2, 10, 4, (3, 2, 2), False, carry_tokens=40)
    first = a([built[0], built[1], built[2]])
    assert first.stats["carried"] == 1 and first.stats["split"] == 1 and first.stats["dropped_overflow"] == 0
    assert a.carry_state() == [[0, 2, 0, 4]]
    assert first.stats["tokens"] == 20
    b = Packer(2, 10, 4, (3, 2, 2), False, carry_tokens=40)
    b.restore_carry(a.carry_state(), lambda epoch, i: built[i])
    sa, sb = a([built[3]]), b([built[3]])
    for k, v in sa.as_dict().items():
        assert torch.equal(v, getattr(sb, k)) if isinstance(v, torch.Tensor) else v == getattr(sb, k), k
    # Step 2 holds the carried tail (tokens 4.. of sample 2), then sample 3.
    assert sa.input_ids[0, :9].tolist() == list(range(106, 110)) + list(range(103, 108))
    assert sa.stats["carried_in"] == 1 and sa.stats["carried"] == 0


def test_packer_drops_beyond_the_carry_limit():
    built = [text_sample(i, 10) for i in range(4)]
    packer = Packer(1, 10, 4, (3, 2, 2), False, carry_tokens=15)
    batch = packer(built)  # 40 tokens, 10 fit, 10 wait, 20 dropped (two documents)
    assert batch.stats["carried"] == 1 and batch.stats["dropped_overflow"] == 2
    assert batch.stats["dropped_tokens"] == 20
    assert Packer(1, 10, 4, (3, 2, 2), False, carry_tokens=0)(built).stats["dropped_tokens"] == 30


def test_packer_counts_skips_and_keeps_image_shape():
    packer = Packer(1, 16, 4, (3, 2, 2), False, carry_tokens=0)
    batch = packer([{"skip": "image_unreadable_image"}, {"kind": "text", "index": 0, "epoch": 0,
                                                         "docs": [[TextSegment([5, 6, 7])]]}])
    assert batch.num_samples == 2
    assert batch.stats["skipped"] == 1 and batch.stats["skipped/image_unreadable_image"] == 1
    assert batch.images.shape == (0, 3, 2, 2)
    assert batch.input_ids[0, :3].tolist() == [5, 6, 7]
    moved = batch.to(dtype=torch.float64)
    assert moved.num_samples == 2 and moved.stats == batch.stats
    assert set(batch.as_dict()) == set(batch.packed().as_dict())


def test_samples_per_step_from_the_token_budget():
    """Counted by hand: image documents of 78 tokens fit 6 to a 512-token row (the token
    budget alone, 1024 / 78, says 13); text is divisible, so 250-token documents fill the
    budget: 4 of them."""
    images = [[doc(74)]] * 8  # one stream: 8 samples of one document, 74 text + 4 image tokens
    assert document_length(doc(74), 4) == 78
    assert plan_samples_per_step([images], [1.0], 2, 512, 4, carry_tokens=4 * 1024) == 2 * (512 // 78)
    text = [[[TextSegment(list(range(250)))]]] * 8
    assert plan_samples_per_step([text], [1.0], 2, 512, 4, carry_tokens=4 * 1024) == 1024 // 250


def test_samples_longer_than_a_step_and_its_carry_report_what_is_dropped():
    """A sample of 20 rows' worth of text into steps of one row with 8 rows of carry: a
    step places one row and can keep 8 waiting, so in the steady state it places L of the
    20 L + 2 tokens each sample brings and drops the rest; the planner says so (before it
    returned one sample per step and said nothing). Documents a quarter of a row long
    lose nothing."""
    from megafusion.data.sequence import text_documents

    L = 64
    book = text_documents(list(range(10, 10 + 20 * L)), 1, 2, L)
    report = {}
    assert plan_samples_per_step([[book]], [1.0], 1, L, 4, 8 * L, steps=400, report=report) == 1
    assert report["drop"] == pytest.approx(1 - L / (20 * L + 2), abs=0.02)
    short = [[TextSegment(list(range(L // 4)))]]
    assert plan_samples_per_step([[short]], [1.0], 1, L, 4, 8 * L, report=report) == 4 and report["drop"] == 0


def test_the_drop_counts_the_tokens_of_documents_too_long_for_a_row():
    """An image document longer than a row whole (its image alone is 300 tokens in rows of
    256) is skipped: every token it brought is lost, and the share the planner reports is
    1 (it counted the skipped documents, not their tokens: 1 / 302). One whose trailing
    text is cut loses that text: 44 of its 300."""
    report = {}
    assert plan_samples_per_step([[[doc(2, tpi=300)]]], [1.0], 1, 256, 300, 0, report=report) == 1
    assert report["drop"] == 1.0
    cut = [[doc(2, text_after=294)]]  # 2 + 4 + 294 = 300 tokens, 256 placed
    assert plan_samples_per_step([cut], [1.0], 1, 256, 4, 0, report=report) == 1
    assert report["drop"] == pytest.approx(44 / 300)


def test_the_loader_warns_when_samples_outgrow_a_step(tokenizer, tmp_path, fusion_cfg, make_cfg, capfd):
    import json

    from megafusion.data.prepare import write_text

    src = tmp_path / "long.jsonl"
    src.write_text("".join(json.dumps({"text": f"Record {i}: " + "The quick brown fox jumps over the lazy dog. " * 60})
                           + "\n" for i in range(8)))
    write_text([str(src)], str(tmp_path / "text"))
    cfg = make_cfg(str(tmp_path / "text"), seq_len=64, batch_size=1, overflow_carry_steps=1)
    build_train_loader(cfg, fusion_cfg, tokenizer, TOKENS_PER_IMAGE, SINGLE)
    err = capfd.readouterr().err
    assert "warning: data.train:" in err and "overflow_carry_steps=1" in err, err
    cfg = make_cfg(str(tmp_path / "text"), seq_len=1024, batch_size=1)
    build_train_loader(cfg, fusion_cfg, tokenizer, TOKENS_PER_IMAGE, SINGLE)
    assert "warning" not in capfd.readouterr().err


@pytest.mark.parametrize("seq_len", [40, 300])
def test_text_only_documents_are_chunked(tokenizer, tmp_path, fusion_cfg, make_cfg, seq_len):
    import json

    from megafusion.data.prepare import write_text

    src = tmp_path / "t.jsonl"
    text = "The quick brown fox jumps over the lazy dog. " * 20
    src.write_text(json.dumps({"text": text}) + "\n")
    write_text([str(src)], str(tmp_path / "text"))
    cfg = make_cfg(str(tmp_path / "text"), seq_len=seq_len, batch_size=8, samples_per_step=1)
    batch = next(iter(build_train_loader(cfg, fusion_cfg, tokenizer, TOKENS_PER_IMAGE, SINGLE)))
    bos, eos = text_special_ids(tokenizer)
    ids = [bos] + tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
    chunks = [ids[i:i + seq_len] for i in range(0, len(ids), seq_len)]
    assert batch.stats["documents"] == len(chunks) and batch.num_images == 0
    got = []
    for b in range(batch.input_ids.shape[0]):
        for d in batch.document_ids[b].unique().tolist():
            sel = (batch.document_ids[b] == d) & (batch.labels[b] != IGNORE_INDEX)
            if sel.any():
                got.append(batch.input_ids[b][sel].tolist())
    assert got == chunks
