"""Per-sample random choices: ordering ratio, caption drop, condition cap, determinism."""
from __future__ import annotations

import math

import pytest
import torch
from mf_data_helpers import IMAGE_SIZE, TOKENS_PER_IMAGE
from PIL import Image

from megafusion.data.dataset import SampleBuilder
from megafusion.data.images import encode_image
from megafusion.data.sequence import plan_sample, text_special_ids
from megafusion.model.batch import ImageSegment, TextSegment
from megafusion.model.config import FusionConfig

N = 3000


def within(observed: float, p: float, n: int, sigmas: float = 4.5) -> bool:
    return abs(observed - p) <= sigmas * math.sqrt(p * (1 - p) / n) + 1e-12


def make_builder(tokenizer, objective="ddpm", cap=200, generation_ratio=0.8, caption_drop=0.1, seed=3):
    bos, eos = text_special_ids(tokenizer)
    cfg = FusionConfig(image_size=IMAGE_SIZE, objective=objective, condition_t_cap=cap)
    return SampleBuilder(tokenizer=tokenizer, tokens_per_image=TOKENS_PER_IMAGE, vocab_size=len(tokenizer),
                         bos=bos, eos=eos, seq_len=512, image_size=IMAGE_SIZE, use_latents=False,
                         latent_shape=None, generation_ratio=generation_ratio, caption_drop=caption_drop,
                         max_caption_tokens=None, condition_t_cap=cap, fusion_cfg=cfg, seed=seed)


@pytest.fixture(scope="module")
def row():
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (200, 30, 30))
    return {"caption": "a red square", "image": encode_image(img), "id": "x"}


def summarise(builder, row, n=N, epoch=0):
    out = []
    for i in range(n):
        (doc,) = builder(row, i, epoch)["docs"]
        img = next(s for s in doc if isinstance(s, ImageSegment))
        text = [t for s in doc if isinstance(s, TextSegment) for t in s.ids]
        out.append((img.is_condition, len(text) == 4, img.timestep))  # BOS BOI EOI EOS: dropped
    return out


@pytest.mark.parametrize("objective", ["ddpm", "rectified_flow"])
def test_ratios_and_condition_cap(tokenizer, row, objective):
    cap, T = 200, 1000
    stats = summarise(make_builder(tokenizer, objective, cap), row)
    cond = [s for s in stats if s[0]]
    gen = [s for s in stats if not s[0]]
    assert within(len(gen) / N, 0.8, N)
    assert within(sum(s[1] for s in gen) / len(gen), 0.1, len(gen))
    assert not any(s[1] for s in cond)  # understanding samples always keep their caption
    tc = torch.tensor([s[2] for s in cond])
    tg = torch.tensor([s[2] for s in gen])
    assert tc.min() >= 0 and tc.max() <= cap
    # Uniform on [0, cap]: mean cap / 2, sd cap / sqrt(12).
    assert abs(tc.mean().item() - cap / 2) <= 4.5 * cap / math.sqrt(12 * len(cond))
    assert tg.min() > 0 and tg.max() < T
    assert tg.max() > cap  # generation times use the whole range


def test_cap_zero_means_clean_conditions(tokenizer, row):
    stats = summarise(make_builder(tokenizer, cap=0), row, n=300)
    assert all(t == 0.0 for c, _, t in stats if c)
    assert all(t > 0.0 for c, _, t in stats if not c)


@pytest.mark.parametrize("ratio,drop", [(0.5, 0.3), (1.0, 0.0), (0.0, 0.5)])
def test_other_ratios(ratio, drop):
    plans = [plan_sample(11, 0, i, ratio, drop) for i in range(N)]
    gen = [p for p in plans if not p.understanding]
    assert within(len(gen) / N, ratio, N)
    if gen:
        assert within(sum(p.drop_caption for p in gen) / len(gen), drop, len(gen))
    assert not any(p.drop_caption for p in plans if p.understanding)


def test_randomness_is_a_function_of_seed_epoch_index(tokenizer, row):
    a, b = make_builder(tokenizer), make_builder(tokenizer)
    for i in (0, 5, 123456789):
        da, db = a(row, i, 2)["docs"][0], b(row, i, 2)["docs"][0]
        assert repr([(type(s).__name__, getattr(s, "ids", None), getattr(s, "timestep", None)) for s in da]) == \
            repr([(type(s).__name__, getattr(s, "ids", None), getattr(s, "timestep", None)) for s in db])
    torch.manual_seed(0)
    first = summarise(a, row, n=200, epoch=0)
    torch.manual_seed(1)  # global RNG state must not matter
    assert summarise(a, row, n=200, epoch=0) == first
    assert summarise(a, row, n=200, epoch=1) != first  # a new epoch draws anew
    assert [plan_sample(0, 0, i, 0.8, 0.1) for i in range(50)] != [plan_sample(1, 0, i, 0.8, 0.1) for i in range(50)]


def test_undecodable_rows_are_skipped_not_raised(tokenizer):
    builder = make_builder(tokenizer)
    assert builder({"caption": "x", "image": b"not an image", "id": "a"}, 0, 0) == {"skip": "image_unreadable_image"}
    assert builder({"caption": "x", "image": b"", "id": "a"}, 0, 0) == {"skip": "image_empty_file"}
    assert builder({"caption": None, "image": b"", "id": "a"}, 0, 0) == {"skip": "bad_caption"}
    assert builder({"foo": 1}, 0, 0) == {"skip": "unknown_columns"}
