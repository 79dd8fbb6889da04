"""FID, CLIP score and CIDEr against references computed here from their definitions."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from megafusion.eval.realdata import cider_score, clip_score, fid_score, inception, simple_tokenize, uint8_batch
from megafusion.eval.rows import EvalError


class TinyFeatures(torch.nn.Module):
    """A fixed random conv net: uint8 [N, 3, H, W] -> 8 features."""
    num_features = 8

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 4, stride=4)

    def forward(self, x):
        return torch.tanh(self.conv(x.float() / 127.5 - 1)).mean((2, 3))


def images(seed: int, n: int = 24, shift: int = 0):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 200, (n, 16, 16, 3))
    return [Image.fromarray(np.clip(a + shift, 0, 255).astype(np.uint8)) for a in base]


def reference_fid(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance of two Gaussians fitted to feature rows, tr sqrt(S1 S2) through the
    eigenvalues of S1^1/2 S2 S1^1/2 (symmetric, so eigh)."""
    m1, m2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s1)
    r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    covmean = np.sqrt(np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)).sum()
    return float(((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * covmean)


def test_fid_matches_the_definition_and_orders_sets():
    net = TinyFeatures()
    real, same, shifted = images(0), images(0), images(0, shift=50)
    other = images(1)
    with torch.no_grad():
        feats = {k: net(uint8_batch(v, 16)).double().numpy() for k, v in dict(real=real, shifted=shifted, other=other).items()}
    self_fid = fid_score(real, same, net, size=16, batch=7, progress=False)["fid"]
    assert abs(self_fid) < 1e-3
    got_other = fid_score(real, other, net, size=16, progress=False)["fid"]
    got_shift = fid_score(real, shifted, net, size=16, progress=False)
    assert got_other == pytest.approx(reference_fid(feats["real"], feats["other"]), rel=1e-3, abs=1e-4)
    assert got_shift["fid"] == pytest.approx(reference_fid(feats["real"], feats["shifted"]), rel=1e-3)
    assert got_shift["fid"] > got_other > 100 * abs(self_fid)
    assert (got_shift["n_real"], got_shift["n_fake"]) == (24, 24)
    with pytest.raises(EvalError, match="at least 2"):
        fid_score(real[:1], same, net, size=16, progress=False)


def test_inception_weights_are_required_and_checked(tmp_path):
    with pytest.raises(EvalError, match="--inception-weights .*no such file"):
        inception(str(tmp_path / "missing.pth"))
    bad = tmp_path / "bad.pth"
    torch.save({"x": torch.zeros(1)}, bad)
    with pytest.raises(EvalError, match="--inception-weights .*not InceptionV3"):
        inception(str(bad))
    with pytest.raises(EvalError, match="--dims"):
        inception(str(bad), dims=100)


def test_random_inception_file_self_zero_shift_larger(inception_weights):
    net = inception(inception_weights, dims=64)  # the real FID network and loading path; its cheapest feature
    real = images(0, n=6)
    assert abs(fid_score(real, images(0, n=6), net, size=64, progress=False)["fid"]) < 1e-3
    assert fid_score(real, images(0, n=6, shift=60), net, size=64, progress=False)["fid"] > 1e-2


def test_clip_score_is_the_cosine_of_the_models_embeddings(clip_dir):
    """torchmetrics' definition: max(mean over pairs of 100 * cosine(image, text), 0). Each
    image is paired with the candidate caption this random model finds closest, so the
    mean is positive and the clamp hides nothing."""
    from transformers import CLIPModel, CLIPProcessor

    pics = images(3, n=5)
    pool = ["a cat", "grey", "a dog", "sun", "sky", "a red circle", "two green triangles", "x", "blue", "a tree"]
    model, proc = CLIPModel.from_pretrained(clip_dir).eval(), CLIPProcessor.from_pretrained(clip_dir)
    with torch.no_grad():
        px = proc(images=[a.permute(1, 2, 0).numpy() for a in uint8_batch(pics, 32)], return_tensors="pt")
        tx = proc(text=pool, return_tensors="pt", padding=True)
        ie = torch.nn.functional.normalize(model.get_image_features(**px), dim=-1)
        te = torch.nn.functional.normalize(model.get_text_features(**tx), dim=-1)
    cos = 100 * ie @ te.T
    best = cos.argmax(1)
    want = cos.max(1).values.mean().item()
    assert want > 0.1
    got = clip_score(pics, [pool[i] for i in best], clip_dir, batch=2, progress=False)
    assert got["clip_score"] == pytest.approx(want, rel=1e-3, abs=1e-4)
    assert got["n"] == 5 and len(got["batch_scores"]) == 3


def test_clip_model_directory_is_required(tmp_path):
    with pytest.raises(EvalError, match="--clip-model .*no such CLIP model directory"):
        clip_score(images(0, 2), ["a", "b"], str(tmp_path / "none"), progress=False)


def test_cider_identical_is_ten_and_disjoint_zero():
    refs = [["a red circle in the center."], ["a small blue square at the top"], ["a green triangle on the left"]]
    same = cider_score([r[0] for r in refs], refs, tokenizer="simple")
    # identical candidate and reference: every n-gram cosine is 1, CIDEr-D = 10 x mean over n = 1..4
    assert same["cider"] == pytest.approx(10.0) and same["per_sample"] == pytest.approx([10.0] * 3)
    assert cider_score(["zebra", "yak", "xylophone"], refs, tokenizer="simple")["cider"] == 0.0
    assert simple_tokenize("A red circle, in the CENTER.") == "a red circle in the center"


@pytest.mark.skipif(shutil.which("java") is None, reason="no java: Stanford's PTBTokenizer cannot run")
def test_cider_ptb_tokenizer_agrees_with_simple_on_plain_captions():
    refs = [["A red circle in the center."], ["a small blue square, at the top"], ["A green triangle on the left!"]]
    preds = ["a red circle at the top", "a blue square", "a green circle on the left"]
    ptb = cider_score(preds, refs, tokenizer="ptb")
    simple = cider_score(preds, refs, tokenizer="simple")
    assert ptb["tokenizer"] == "ptb" and simple["tokenizer"] == "simple"
    assert ptb["cider"] == pytest.approx(simple["cider"]) and 0 < ptb["cider"] < 10


# Line breaks other than '\n': the Java tokenizer ends a line at each of them, and
# pycocoevalcap replaced only '\n', so every caption after one was scored against the
# wrong line.
_BREAKS = ["\r", "\u2028", "\u0085", "\u2029", "\x0b", "\x0c", "\r\n", "\n"]


@pytest.mark.parametrize("tokenizer", [
    "simple", pytest.param("ptb", marks=pytest.mark.skipif(shutil.which("java") is None, reason="no java"))])
def test_cider_line_breaks_inside_captions_change_nothing(tokenizer):
    clean = ["a red circle in the center", "a small blue square at the top", "a green triangle on the left",
             "a large purple square at the bottom", "a yellow circle on the right"]
    refs = [[c, "something else entirely here"] for c in clean]
    broken = [c.replace(" ", _BREAKS[i % len(_BREAKS)], 2) for i, c in enumerate(clean)]
    broken_refs = [[c.replace(" ", b, 1), r] for c, (_, r), b in zip(clean, refs, reversed(_BREAKS))]
    want = cider_score(clean, refs, tokenizer=tokenizer)
    for preds, rs in ((broken, refs), (clean, broken_refs), (broken, broken_refs)):
        got = cider_score(preds, rs, tokenizer=tokenizer)
        assert got["tokenizer"] == tokenizer
        assert got["per_sample"] == pytest.approx(want["per_sample"]) and got["cider"] == pytest.approx(want["cider"])
    # identical predictions and references score alike, each as a clean caption does against itself
    same = cider_score(broken, [[b] for b in broken], tokenizer=tokenizer)
    assert same["per_sample"] == pytest.approx(cider_score(clean, [[c] for c in clean], tokenizer=tokenizer)["per_sample"])
    assert same["per_sample"] == pytest.approx([10.0] * len(clean))


@pytest.mark.skipif(shutil.which("java") is None, reason="no java: Stanford's PTBTokenizer cannot run")
def test_ptb_output_must_have_one_line_per_caption():
    from megafusion.eval.realdata import _ptb_tokenize

    assert _ptb_tokenize(["A red circle.", "", "a blue square"]) == ["a red circle", "", "a blue square"]
    assert _ptb_tokenize(["a red\rcircle", "a blue square"]) is None  # three lines out for two in


@pytest.mark.parametrize("size", [0, -5])
def test_fid_refuses_a_size_below_one(size):
    # was a ZeroDivisionError from the resize
    with pytest.raises(EvalError, match=f"--size {size}: must be >= 1"):
        fid_score(images(0, 4), images(1, 4), TinyFeatures(), size=size, progress=False)
