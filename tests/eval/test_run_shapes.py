"""evaluate_shapes plumbing: an oracle model (the generator's own renders and captions)
scores 1.0, noise and random captions score at most chance; prompts parse into the
generator's ground truth."""
from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from megafusion import generate as G
from megafusion.data.synthetic import make_sample, synthetic_samples
from megafusion.eval.run_shapes import evaluate_shapes, format_shapes, meta_from_caption, score_prompt, shapes_scalars
from megafusion.eval.shapes import CHANCE

N = 120


@pytest.fixture(scope="module")
def rows():
    return [dict(id=s.id, image=s.image, caption=s.caption, meta=s.meta) for s in synthetic_samples(0, N, 32, "val")]


class FakeGen:
    steps, guidance_scale = 7, 2.0


def oracle(monkeypatch, rows, draw, say):
    calls = []

    def generate_image(gen, prompts, n=1, steps=None, cfg=None, seed=0, progress=True):
        calls.append(dict(prompts=list(prompts), n=n, steps=steps, cfg=cfg, seed=seed))
        return [draw(p) for p in prompts]

    def caption(gen, images, max_new_tokens=64):
        return [say(im) for im in images]

    monkeypatch.setattr(G, "generate_image", generate_image)
    monkeypatch.setattr(G, "caption", caption)
    return calls


def test_oracle_scores_one(monkeypatch, rows):
    renders = {r["caption"]: r["image"] for r in rows}
    truth = {r["image"].tobytes(): r["caption"] for r in rows}
    calls = oracle(monkeypatch, rows, lambda p: renders[p], lambda im: truth[im.tobytes()])
    result = evaluate_shapes(FakeGen(), rows, batch=32, seed=5, progress=False)
    for direction in ("generation", "captioning"):
        acc = {k: v["accuracy"] for k, v in result[direction].items()}
        assert acc == {k: 1.0 for k in acc}, (direction, acc)
        assert set(acc) == {"colour", "shape", "size", "position", "both_present", "relation", "all"}
    assert result["generation"]["colour"]["n"] + result["generation"]["relation"]["n"] == N
    # batched, the model's defaults used, each batch seeded by its first row
    assert [len(c["prompts"]) for c in calls] == [32, 32, 32, 24]
    assert [c["seed"] for c in calls] == [5, 37, 69, 101]
    assert {(c["steps"], c["cfg"], c["n"]) for c in calls} == {(7, 2.0, 1)}
    assert (result["steps"], result["cfg"], result["n"]) == (7, 2.0, N)
    rec = result["samples"][0]
    assert rec["prompt"] == rows[0]["caption"] and rec["caption"] == rows[0]["caption"]
    assert rec["generation"] == {"colour": True, "shape": True, "size": True, "position": True} or \
        rec["generation"] == {"both_present": True, "relation": True}
    assert shapes_scalars(result)["shapes/generation/colour"] == 1.0
    text = format_shapes(result)
    assert "colour" in text and f"{CHANCE['colour']:.3f}" in text


def test_noise_and_random_captions_score_at_most_chance(monkeypatch, rows):
    rng = np.random.default_rng(0)
    others = [make_sample(99, i, 32).caption for i in range(N)]  # captions of other images
    it = iter(others)
    oracle(monkeypatch, rows, lambda p: Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)),
           lambda im: next(it))
    result = evaluate_shapes(FakeGen(), rows, batch=50, progress=False)
    assert all(v["accuracy"] == 0.0 for v in result["generation"].values()), result["generation"]
    for key, v in result["captioning"].items():
        if key == "all":
            continue
        sd = math.sqrt(v["chance"] * (1 - v["chance"]) / v["n"])
        assert v["accuracy"] <= v["chance"] + 4 * sd + 1e-9, (key, v)
    assert result["captioning"]["colour"]["accuracy"] > 0  # random guesses hit sometimes


def test_directions_and_missing_meta(monkeypatch, rows):
    oracle(monkeypatch, rows, lambda p: None, lambda im: "")
    result = evaluate_shapes(FakeGen(), rows[:4], generation=False, progress=False)
    assert result["generation"] is None and result["captioning"]["colour"]["accuracy"] == 0.0
    from megafusion.eval.rows import EvalError

    with pytest.raises(EvalError, match="meta"):
        evaluate_shapes(FakeGen(), [dict(image=None, caption="x")], progress=False)


def test_meta_from_caption_is_the_generators_truth(rows):
    for r in rows:
        meta = meta_from_caption(r["caption"])
        assert meta["kind"] == r["meta"]["kind"]
        assert [(o["colour"], o["shape"], o["size"]) for o in meta["objects"]] == \
            [(o["colour"], o["shape"], o["size"]) for o in r["meta"]["objects"]]
        assert meta.get("position") == r["meta"].get("position") and meta.get("relation") == r["meta"].get("relation")
        assert score_prompt(r["image"], r["caption"]) in ({"colour": True, "shape": True, "size": True, "position": True},
                                                          {"both_present": True, "relation": True})
    assert meta_from_caption("a photo of a dog") is None
    assert meta_from_caption("a red circle and a blue square") is None  # two objects, no relation
    one = next(r for r in rows if r["meta"]["kind"] == "one")
    o = one["meta"]["objects"][0]
    words = f"{o['size']} {o['colour']} {o['shape']}" if o["size"] != "medium" else f"{o['colour']} {o['shape']}"
    assert score_prompt(one["image"], f"a {words}") == {"colour": True, "shape": True, "size": True}
