"""The shapes analyser against the generator's own renders: right on them, wrong on
perturbed ones, and caption scoring against the generator's own captions."""
from __future__ import annotations

import copy

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from megafusion.data.synthetic import (BACKGROUND, COLOURS, POSITIONS, RELATIONS, SHAPES, SIZES, SUPERSAMPLE,
                                       _draw, make_sample, synthetic_samples)
from megafusion.eval.shapes import CHANCE, analyse, parse_caption, score_caption, score_generation, summarise

N = 300  # per image size: ~150 one-object and ~150 two-object samples
SIZES_TESTED = (16, 32, 64)  # the configs' 32 (demo, tiny), the 16 of the calibration runs, and 64


def render(meta: dict, size: int) -> Image.Image:
    """Draw `meta`'s objects the way make_sample does (test_render_matches_generator checks
    it), so that a changed meta gives a genuine render of the changed scene."""
    big = size * SUPERSAMPLE
    img = Image.new("RGB", (big, big), BACKGROUND)
    for o in meta["objects"]:
        _draw(ImageDraw.Draw(img), o["shape"], o["colour"], o["x"] * big, o["y"] * big, SIZES[o["size"]] * big)
    return img.resize((size, size), Image.Resampling.BOX)


def samples(size: int, n: int = N, seed: int = 0):
    return list(synthetic_samples(seed, n, size, split="val"))


def other(options, value, shift=1):
    options = list(options)
    return options[(options.index(value) + shift) % len(options)]


def test_render_matches_generator():
    for s in samples(32, 20):
        assert np.array_equal(np.asarray(render(s.meta, 32)), np.asarray(s.image))


@pytest.mark.parametrize("size", SIZES_TESTED)
def test_generator_renders_score_at_least_099(size):
    data = samples(size)
    summary = summarise([score_generation(s.image, s.meta) for s in data])
    assert {k: v["accuracy"] for k, v in summary.items()} == pytest.approx(
        {k: 1.0 for k in summary}, abs=0.01), summary
    assert summary["colour"]["n"] > 100 and summary["relation"]["n"] > 100
    for s in data:
        if s.meta["kind"] == "one":  # the estimated drawing centre is the generator's
            (d,) = analyse(s.image)
            o = s.meta["objects"][0]
            assert abs(d.centre[0] - o["x"]) < 0.04 and abs(d.centre[1] - o["y"]) < 0.04
            x0, y0, x1, y1 = d.bbox
            assert x0 < d.centre[0] < x1 and y0 < d.centre[1] < y1


@pytest.mark.parametrize("size", (32, 64))
@pytest.mark.parametrize("imperfection", ("noise", "blur", "colour_shift"))
def test_imperfect_renders_still_score(size, imperfection):
    """Generated images are never clean: mild noise, blur and off colours keep the scores."""
    rng = np.random.default_rng(1)

    def perturb(img):
        if imperfection == "blur":
            return img.filter(ImageFilter.GaussianBlur(0.5))
        a = np.asarray(img, dtype=np.float64)
        a = a + (rng.normal(0, 15, a.shape) if imperfection == "noise" else rng.uniform(-20, 20, 3))
        return np.clip(a, 0, 255).round().astype(np.uint8)

    summary = summarise([score_generation(perturb(s.image), s.meta) for s in samples(size, 100, seed=1)])
    assert all(v["accuracy"] >= 0.95 for v in summary.values()), summary


def _changed(size, kind, change, n=60):
    """(score of the render of the changed meta, against the original meta) for samples of a kind."""
    out = []
    for s in samples(size, n):
        if s.meta["kind"] == kind:
            meta = copy.deepcopy(s.meta)
            change(meta)
            out.append(score_generation(render(meta, size), s.meta))
    return out


def _move(meta):  # mirror through the centre; the centre itself goes to the top left
    o = meta["objects"][0]
    o["x"], o["y"] = (0.25, 0.25) if meta["position"] == "in the center" else (1 - o["x"], 1 - o["y"])


def _resize(meta):  # large <-> small, medium -> large; pulled inside the canvas like the generator
    o = meta["objects"][0]
    o["size"] = {"small": "large", "medium": "large", "large": "small"}[o["size"]]
    d = SIZES[o["size"]]
    o["x"], o["y"] = (min(max(v, d / 2 + 0.02), 1 - d / 2 - 0.02) for v in (o["x"], o["y"]))


ONE_OBJECT_CHANGES = {
    "colour": lambda m: m["objects"][0].update(colour=other(COLOURS, m["objects"][0]["colour"])),
    "shape": lambda m: m["objects"][0].update(shape=other(SHAPES, m["objects"][0]["shape"])),
    "size": _resize,
    "position": _move,
}


@pytest.mark.parametrize("size", (16, 32))
@pytest.mark.parametrize("attribute", ONE_OBJECT_CHANGES)
def test_changed_attribute_fails_only_that_attribute(size, attribute):
    scores = _changed(size, "one", ONE_OBJECT_CHANGES[attribute])
    assert len(scores) > 20 and not any(s[attribute] for s in scores)
    if attribute in ("colour", "shape"):  # the rest of the scene is untouched
        assert all(v for s in scores for k, v in s.items() if k != attribute)


def test_two_objects_wrong_object_or_swapped_places_fail():
    def recolour(meta):
        o = meta["objects"][1]
        taken = {(p["colour"], p["shape"]) for p in meta["objects"]}
        o["colour"] = next(c for c in COLOURS if c != o["colour"] and (c, o["shape"]) not in taken)

    def swap(meta):
        a, b = meta["objects"]
        (a["x"], a["y"]), (b["x"], b["y"]) = (b["x"], b["y"]), (a["x"], a["y"])

    for size in (16, 32):
        scores = _changed(size, "two", recolour)
        assert len(scores) > 20 and all(s == dict(both_present=False, relation=None) for s in scores)
        scores = _changed(size, "two", swap)
        assert all(s["both_present"] and not s["relation"] for s in scores)


@pytest.mark.parametrize("size", SIZES_TESTED)
def test_blank_and_noise_are_absent(size):
    rng = np.random.default_rng(2)
    blank = Image.new("RGB", (size, size), BACKGROUND)
    uniform = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    assert analyse(blank) == [] and analyse(uniform) == []
    for s in samples(size, 30):
        heavy = np.asarray(s.image, dtype=np.float64) + rng.normal(0, 80, (size, size, 3))
        for img in (blank, uniform, np.clip(heavy, 0, 255).astype(np.uint8)):
            assert not any(score_generation(img, s.meta).values())


def test_input_types():
    s = make_sample(0, 3, 32)
    expected = analyse(s.image)
    assert expected and analyse(np.asarray(s.image)) == expected == analyse(s.image.convert("RGBA"))
    with pytest.raises(ValueError, match="uint8"):
        analyse(np.asarray(s.image, dtype=np.float32) / 255)


# ------------------------------------------------------------------------- captions

def test_true_captions_score_one():
    scores = [score_caption(s.caption, s.meta) for s in samples(32, 200)]
    assert all(v["accuracy"] == 1.0 for v in summarise(scores).values())
    s = next(s for s in samples(32, 20) if s.meta["kind"] == "one")
    assert all(score_caption(s.caption.upper() + ".", s.meta).values())


def _replace_word(caption, words, shift=1):
    found = next(w for w in sorted(words, key=len, reverse=True) if w in caption)
    return caption.replace(found, other(words, found, shift), 1)


@pytest.mark.parametrize("attribute,words", [("colour", COLOURS), ("shape", SHAPES), ("position", POSITIONS)])
def test_wrong_word_fails_that_attribute(attribute, words):
    ones = [s for s in samples(32, 200) if s.meta["kind"] == "one"]
    for shift in range(1, len(words)):
        for s in ones:
            score = score_caption(_replace_word(s.caption, words, shift), s.meta)
            assert not score[attribute]
            assert all(v for k, v in score.items() if k != attribute)


def test_size_words():
    meta = dict(kind="one", position="at the top", objects=[dict(shape="circle", colour="red", size="medium")])
    assert score_caption("a red circle at the top", meta)["size"]  # medium goes unsaid
    assert not score_caption("a large red circle at the top", meta)["size"]
    meta["objects"][0]["size"] = "small"
    assert score_caption("a small red circle at the top", meta)["size"]


def test_two_object_captions():
    meta = dict(kind="two", relation="above", objects=[dict(shape="circle", colour="red", size="small"),
                                                       dict(shape="square", colour="blue", size="medium")])
    assert score_caption("a small red circle above a blue square", meta) == dict(both_present=True, relation=True)
    assert score_caption("a blue square below a small red circle", meta) == dict(both_present=True, relation=True)
    for rel in set(RELATIONS) - {"above"}:
        assert score_caption(f"a red circle {rel} a blue square", meta) == dict(both_present=True, relation=False)
    # Not both named: the relation is not scored (None), whatever the relation word.
    assert score_caption("a red circle above a green square", meta) == dict(both_present=False, relation=None)
    assert not any(score_caption("", meta).values())


def test_hedging_captions_fail():
    meta = dict(kind="one", position="at the top", objects=[dict(shape="circle", colour="red", size="medium")])
    assert not score_caption("a red circle at the top or at the bottom", meta)["position"]
    assert not score_caption("a red circle or a blue circle at the top", meta)["colour"]
    assert parse_caption("a green triangle on the left")["position"] == "on the left"


def test_summarise_and_chance():
    scores = [dict(colour=True, shape=False, size=True, position=True), dict(colour=False, shape=False, size=True,
              position=True), dict(both_present=True, relation=True)]
    out = summarise(scores)
    assert out["colour"] == dict(accuracy=0.5, n=2, chance=pytest.approx(1 / 6))
    assert out["relation"] == dict(accuracy=1.0, n=1, chance=0.25)
    assert out["all"]["accuracy"] == pytest.approx(1 / 3)


def test_relation_is_scored_where_both_objects_are_present():
    """The relation's accuracy is over the two-object samples with both objects present,
    so that its printed chance (1/4, one of the relation words) is the chance of what it
    counts. Hand-built captions and images with known outcomes; the expected numbers are
    counted by hand, not by summarise."""
    meta = dict(kind="two", relation="above", objects=[dict(shape="circle", colour="red", size="small"),
                                                       dict(shape="square", colour="blue", size="medium")])
    captions = ["a small red circle above a blue square",  # both named, relation right
                "a blue square below a small red circle",  # both named, said the other way round: right
                "a red circle left of a blue square",      # both named, relation wrong
                "a red circle above a green square",       # an object wrong: relation not scored
                "a purple triangle above a red circle",    # an object wrong: relation not scored
                "a red circle"]                            # one object: relation not scored
    out = summarise([score_caption(c, meta) for c in captions])
    assert out["both_present"] == dict(accuracy=3 / 6, n=6, chance=pytest.approx(1 / 153))
    assert out["relation"] == dict(accuracy=2 / 3, n=3, chance=0.25)
    # Every attribute right: 2 of 6, a uniform guess gets a sample right with 1/153 x 1/4.
    assert out["all"]["accuracy"] == pytest.approx(2 / 6) and out["all"]["chance"] == pytest.approx(1 / 612)

    # Images: the generator's renders of two-object scenes (relation right), the same
    # scenes with the objects' places swapped (relation wrong, both present) and with the
    # second object recoloured (not both present).
    two = [s for s in samples(32, 60) if s.meta["kind"] == "two"][:6]
    images, truths = [], []
    for s in two:
        swapped, recoloured = copy.deepcopy(s.meta), copy.deepcopy(s.meta)
        a, b = swapped["objects"]
        (a["x"], a["y"]), (b["x"], b["y"]) = (b["x"], b["y"]), (a["x"], a["y"])
        o = recoloured["objects"][1]
        taken = {(p["colour"], p["shape"]) for p in recoloured["objects"]}
        o["colour"] = next(c for c in COLOURS if c != o["colour"] and (c, o["shape"]) not in taken)
        images += [s.image, render(swapped, 32), render(recoloured, 32)]
        truths += [s.meta] * 3
    scores = [score_generation(im, m) for im, m in zip(images, truths)]
    assert scores == [dict(both_present=True, relation=True), dict(both_present=True, relation=False),
                      dict(both_present=False, relation=None)] * len(two)
    out = summarise(scores)
    k = len(two)
    assert out["both_present"] == dict(accuracy=2 * k / (3 * k), n=3 * k, chance=pytest.approx(1 / 153))
    assert out["relation"] == dict(accuracy=k / (2 * k), n=2 * k, chance=0.25)
    # Nothing present anywhere: the relation has no samples to be scored on.
    assert "relation" not in summarise([dict(both_present=False, relation=None)] * 3)
    assert CHANCE["position"] == pytest.approx(1 / 9) and CHANCE["both_present"] == pytest.approx(1 / 153)
    assert summarise([]) == {}
