"""The training sampler scores its grid and held-out captions with the shapes analyser
when the run's data is the synthetic task, and logs them to tensorboard; with other data
it logs none. One process, no DeepSpeed (an unpartitioned model samples as is); the model
is replaced by an oracle that draws the generator's renders and says its captions."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "eval"))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from megafusion.data.prepare import ImageShardWriter, write_synthetic
    from megafusion.data.synthetic import synthetic_samples

    root = tmp_path_factory.mktemp("sampling_shapes")
    write_synthetic(str(root / "val"), 8, 32, seed=0, split="val")
    plain = ImageShardWriter(str(root / "plain"), 32, with_meta=False)  # image-caption data without ground truth
    for s in synthetic_samples(1, 4, 32):
        plain.add(s.id, s.image, s.caption)
    plain.close()
    return root


def sampler(tmp_path, tiny_llama, data, prompts):
    from transformers import AutoTokenizer

    from eval_models import make_fused  # tests/eval/eval_models.py
    from megafusion.config import load_config
    from megafusion.parallel.sampling import TrainingSampler

    cfg = load_config(str(REPO / "configs/tiny.yaml"), [
        f"model.base={tiny_llama}", "model.image_size=16", "model.patch_size=4", f"data.train={data}",
        f"data.val={data}", f"run.dir={tmp_path}", "log.sample_every=3", f"log.sample_prompts={json.dumps(prompts)}",
        "log.sample_per_prompt=2", "log.sample_captions=4", "log.sample_diffusion_steps=2", "log.sample_caption_tokens=3"])

    class Engine:
        module = make_fused(tiny_llama)
        optimizer = None

    return TrainingSampler(cfg, Engine(), AutoTokenizer.from_pretrained(tiny_llama), tmp_path, rank=0)


def test_synthetic_run_logs_shapes_scores(tmp_path, tiny_llama, shards, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    from megafusion import generate as G
    from megafusion.data.synthetic import synthetic_samples

    truth = list(synthetic_samples(0, 8, 32, "val"))
    prompts = [truth[0].caption, "a photo of a dog", truth[1].caption]  # the middle one is no shapes prompt
    renders = {s.caption: s.image for s in truth}
    s = sampler(tmp_path, tiny_llama, shards / "val", prompts)
    assert s.synthetic and [m["kind"] for m in s.metas] == [t.meta["kind"] for t in truth[:4]]
    monkeypatch.setattr(G, "generate_image", lambda gen, ps, n=1, **kw: [renders.get(p, truth[5].image) for p in ps for _ in range(n)])
    monkeypatch.setattr(G, "caption", lambda gen, ims, **kw: [t.caption for t in truth[:len(ims)]])
    writer = SummaryWriter(str(tmp_path / "tb"))
    s(3, writer)
    writer.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "shapes/generation/colour" in tags and "shapes/captioning/colour" in tags
    for tag in tags:
        assert [(e.step, e.value) for e in acc.Scalars(tag)] == [(3, 1.0)], tag
    # 4 grid images from the two shapes prompts, none from the dog
    n_gen = sum(1 for p in (truth[0], truth[1]) for _ in range(2))
    scores = s.shapes_scores([renders[truth[0].caption]] * 2 + [truth[5].image] * 2 + [renders[truth[1].caption]] * 2,
                             [t.caption for t in truth[:4]])
    assert scores == {t: 1.0 for t in tags} and n_gen == 4
    text = (tmp_path / "samples" / "step_0000003.txt").read_text()
    assert "shapes/generation/colour: 1.000" in text
    # a wrong drawing shows
    wrong = s.shapes_scores([truth[5].image] * 6, ["a photo of a dog"] * 4)
    assert wrong["shapes/captioning/colour"] == 0.0 and wrong.get("shapes/generation/all", 0.0) < 1.0


def test_other_data_logs_no_shapes_scores(tmp_path, tiny_llama, shards):
    s = sampler(tmp_path, tiny_llama, shards / "plain", ["a red circle in the center"])
    assert not s.synthetic and s.metas == [None] * 4
    assert s.shapes_scores([], ["a red circle"] * 4) == {}


def test_sample_eval_n_appends_the_learning_curve(tmp_path, tiny_llama, shards, monkeypatch):
    """log.sample_eval_n: each sample point scores that many held-out rows (drawn from
    their captions, captioned from their images) into shapes_eval.jsonl and tensorboard
    shapes_eval/*. Oracle first (every attribute 1.0), then a model that draws one fixed
    render and always says the same caption: its accuracies are those of that guess,
    computed here from the generator's truth."""
    import numpy as np
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    from megafusion import generate as G
    from megafusion.data.synthetic import synthetic_samples

    truth = list(synthetic_samples(0, 8, 32, "val"))
    by_caption = {t.caption: t for t in truth}
    by_pixels = {np.asarray(t.image).tobytes(): t for t in truth}
    s = sampler(tmp_path, tiny_llama, shards / "val", [truth[0].caption])
    s.cfg.log.sample_eval_n = 6
    s.eval_rows = s._eval_rows(s.cfg)
    assert [r["caption"] for r in s.eval_rows] == [t.caption for t in truth[:6]]
    monkeypatch.setattr(G, "generate_image", lambda gen, ps, n=1, **kw: [by_caption[p].image for p in ps for _ in range(n)])
    # (The sampler's own four held-out captions see the images resized to the model's 16 px:
    # not renders of the task at its 32 px, so any caption does for them.)
    monkeypatch.setattr(G, "caption", lambda gen, ims, **kw: [
        by_pixels.get(np.asarray(im.convert("RGB")).tobytes(), truth[7]).caption for im in ims])
    writer = SummaryWriter(str(tmp_path / "tb"))
    s(3, writer)
    fixed = truth[0]
    monkeypatch.setattr(G, "generate_image", lambda gen, ps, n=1, **kw: [fixed.image for p in ps for _ in range(n)])
    monkeypatch.setattr(G, "caption", lambda gen, ims, **kw: [fixed.caption for _ in ims])
    s(6, writer)
    writer.close()
    rows = [json.loads(line) for line in (tmp_path / "shapes_eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 6] and rows[0]["n"] == 6
    assert all(v["accuracy"] == 1.0 for d in ("generation", "captioning") for v in rows[0][d].values())
    # The fixed guess: right where a held-out row shares the guessed colour (one-object rows
    # and the first object of two-object rows are what the analyser compares first).
    one = [t for t in truth[:6] if t.meta["kind"] == "one"]
    if fixed.meta["kind"] == "one" and one:
        expect = sum(t.meta["objects"][0]["colour"] == fixed.meta["objects"][0]["colour"] for t in one) / len(one)
        assert rows[1]["captioning"]["colour"]["accuracy"] == pytest.approx(expect)
    assert rows[1]["captioning"]["all"]["accuracy"] < 1.0 and rows[1]["generation"]["all"]["accuracy"] < 1.0
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("shapes_eval/captioning/colour")][0] == (3, 1.0)
