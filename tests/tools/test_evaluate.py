"""tools/evaluate.py end to end on a tiny exported model and tiny random feature
extractors: every command prints its table, writes JSON with every field, and refuses a
bad input in one line."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "eval"))

from eval_models import clip_dir, inception_weights, tiny_export, val_shards  # noqa: E402,F401

from megafusion.eval.cli import main  # noqa: E402

FAST = ["--no-progress", "--batch", "2"]


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def refused(capsys, needle, *args):
    code, out, err = run(capsys, *args)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], err
    assert "Traceback" not in err


def image_dir(path: Path, shards: str, shift: int = 0, n: int = 6) -> Path:
    from megafusion.eval.rows import image_source

    path.mkdir()
    for r in image_source(shards, "--x", n):
        a = np.asarray(r["image"]).astype(int) + shift
        Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(path / f"{r['id']}.png")
    return path


def test_shapes_command(tmp_path, capsys, tiny_export, val_shards):
    out = tmp_path / "shapes.json"
    code, stdout, _ = run(capsys, "shapes", "--model", tiny_export, "--data", val_shards, "--n", 4, "--steps", 2,
                          "--cfg", 1.5, "--max-new-tokens", 2, "--seed", 3, "--out", out, "--save-images", tmp_path / "im",
                          *FAST)
    assert code == 0
    for word in ("colour", "shape", "size", "position", "chance", "generation", "captioning"):
        assert word in stdout
    r = json.loads(out.read_text())
    assert {"task", "n", "steps", "cfg", "seed", "chance", "generation", "captioning", "table", "samples", "model",
            "data", "command", "max_new_tokens"} <= set(r)
    assert (r["n"], r["steps"], r["cfg"], r["seed"], r["model"]) == (4, 2, 1.5, 3, str(tiny_export))
    assert len(r["samples"]) == 4 and {"id", "prompt", "meta", "generation", "caption", "captioning"} <= set(r["samples"][0])
    assert r["generation"]["colour"]["chance"] == pytest.approx(1 / 6)
    assert len(list((tmp_path / "im").glob("*.png"))) == 4
    assert {row["attribute"] for row in r["table"]} >= {"colour", "shape", "all"}


def test_shapes_command_line_process(tmp_path, tiny_export, val_shards):
    """The script itself, as users run it: table on stdout, a progress bar on stderr."""
    out = tmp_path / "s.json"
    p = subprocess.run([sys.executable, str(REPO / "tools" / "evaluate.py"), "shapes", "--model", str(tiny_export),
                        "--data", val_shards, "--n", "2", "--steps", "1", "--only", "generation", "--out", str(out)],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "colour" in p.stdout and "shapes: draw" in p.stderr
    r = json.loads(out.read_text())
    assert r["captioning"] is None and r["generation"]["all"]["n"] == 2


def test_text_command(tmp_path, capsys, tiny_export, tiny_llama):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "The capital of France is Paris."}\n{"text": "Two plus two is four."}\n')
    out = tmp_path / "text.json"
    code, stdout, _ = run(capsys, "text", "--model", tiny_export, "--base", tiny_llama, "--corpus", corpus, "--out", out,
                          "--no-progress")
    assert code == 0 and "perplexity" in stdout
    r = json.loads(out.read_text())
    assert {"max_abs_logit_diff", "model_perplexity", "base_perplexity", "tokens", "documents", "samples", "corpus",
            "model", "base", "tokenizers_agree"} <= set(r)
    assert r["documents"] == 2 and r["max_abs_logit_diff"] <= 1e-5
    assert r["model_perplexity"] == pytest.approx(r["base_perplexity"], rel=1e-6)


def test_fid_command(tmp_path, capsys, inception_weights, val_shards, tiny_export):
    same = image_dir(tmp_path / "same", val_shards)
    shifted = image_dir(tmp_path / "shifted", val_shards, shift=60)
    results = {}
    for name, fake in (("same", same), ("shifted", shifted)):
        out = tmp_path / f"{name}.json"
        code, stdout, _ = run(capsys, "fid", "--real", val_shards, "--fake", fake, "--n", 6, "--inception-weights",
                              inception_weights, "--dims", 64, "--size", 64, "--out", out, *FAST)
        assert code == 0 and "FID" in stdout
        results[name] = json.loads(out.read_text())
    assert {"fid", "n_real", "n_fake", "real", "fake", "inception_weights", "dims", "image_size"} <= set(results["same"])
    assert abs(results["same"]["fid"]) < 1e-3 < results["shifted"]["fid"]
    out = tmp_path / "model.json"
    code, _, _ = run(capsys, "fid", "--real", val_shards, "--model", tiny_export, "--n", 4, "--steps", 1,
                     "--inception-weights", inception_weights, "--dims", 64, "--size", 64, "--out", out, *FAST)
    assert code == 0 and json.loads(out.read_text())["n_fake"] == 4


def test_clip_command(tmp_path, capsys, clip_dir, val_shards, tiny_export):
    out = tmp_path / "clip.json"
    code, stdout, _ = run(capsys, "clip", "--images", val_shards, "--n", 4, "--clip-model", clip_dir, "--out", out, *FAST)
    assert code == 0 and "CLIP score" in stdout
    r = json.loads(out.read_text())
    assert {"clip_score", "n", "clip_model", "samples", "batch_scores"} <= set(r) and r["n"] == 4
    folder = image_dir(tmp_path / "imgs", val_shards, n=3)
    caps = tmp_path / "caps.jsonl"
    caps.write_text("".join(json.dumps({"image": p.name, "caption": "a red circle"}) + "\n" for p in sorted(folder.iterdir())))
    code, _, _ = run(capsys, "clip", "--images", folder, "--captions", caps, "--clip-model", clip_dir, *FAST)
    assert code == 0
    code, _, _ = run(capsys, "clip", "--model", tiny_export, "--captions", caps, "--steps", 1, "--clip-model", clip_dir,
                     "--out", out, *FAST)
    assert code == 0 and json.loads(out.read_text())["n"] == 3


def test_cider_command(tmp_path, capsys, val_shards, tiny_export):
    preds = tmp_path / "preds.jsonl"
    preds.write_text(json.dumps({"caption": "a small red circle above", "references": ["a small red circle above"]}) + "\n"
                     + json.dumps({"caption": "a blue square", "references": ["a blue square on the left"]}) + "\n"
                     + json.dumps({"caption": "a cat", "references": ["a green triangle"]}) + "\n")
    out = tmp_path / "cider.json"
    code, stdout, _ = run(capsys, "cider", "--captions", preds, "--tokenizer", "simple", "--out", out, "--no-progress")
    assert code == 0 and "CIDEr" in stdout
    r = json.loads(out.read_text())
    assert {"cider", "n", "tokenizer", "samples"} <= set(r) and r["n"] == 3
    # four words or more: every n-gram order up to 4 matches (a three-word caption has no 4-gram: 7.5)
    assert r["samples"][0]["cider"] == pytest.approx(10.0) and r["samples"][0]["cider"] > r["samples"][1]["cider"]
    code, _, _ = run(capsys, "cider", "--model", tiny_export, "--data", val_shards, "--n", 2, "--max-new-tokens", 2,
                     "--tokenizer", "simple", "--out", out, *FAST)
    assert code == 0 and len(json.loads(out.read_text())["samples"]) == 2


def test_refusals(tmp_path, capsys, tiny_export, val_shards, clip_dir):
    refused(capsys, "--inception-weights", "fid", "--real", val_shards, "--fake", val_shards,
            "--inception-weights", tmp_path / "none.pth")
    refused(capsys, "--inception-weights", "fid", "--real", val_shards, "--fake", val_shards)
    refused(capsys, "--clip-model", "clip", "--images", val_shards, "--clip-model", tmp_path / "noclip")
    refused(capsys, "--data", "shapes", "--model", tiny_export, "--data", tmp_path / "nodata")
    refused(capsys, "--model", "shapes", "--model", tmp_path / "nomodel", "--data", val_shards)
    refused(capsys, "--out", "shapes", "--model", tiny_export, "--data", val_shards, "--out", tmp_path / "x.txt")
    refused(capsys, "--n", "shapes", "--model", tiny_export, "--data", val_shards, "--n", 0)
    refused(capsys, "--base", "text", "--model", tiny_export, "--base", tmp_path / "nobase")
    refused(capsys, "--captions", "cider", "--captions", tmp_path / "none.jsonl")
    refused(capsys, "exactly one", "clip", "--clip-model", clip_dir)


def _captions_file(tmp_path: Path) -> Path:
    caps = tmp_path / "caps.jsonl"
    caps.write_text("".join(json.dumps(dict(caption=c, references=[c])) + "\n" for c in ("a red circle", "a blue square")))
    return caps


def test_out_is_checked_before_any_work(tmp_path, capsys, monkeypatch):
    """--out under a regular file used to be found out by write_json, after every number
    had been computed (a FileExistsError traceback); now before any work."""
    import megafusion.eval.realdata as R

    def no_work(*a, **k):
        raise AssertionError("cider computed before --out was checked")

    monkeypatch.setattr(R, "cider_score", no_work)
    monkeypatch.delenv("TRANSFORMERS_VERBOSITY", raising=False)  # main sets it
    caps = _captions_file(tmp_path)
    afile = tmp_path / "afile"
    afile.write_text("")
    refused(capsys, "--out", "cider", "--captions", caps, "--out", afile / "res.json")
    refused(capsys, "--out", "cider", "--captions", caps, "--out", afile / "deeper" / "res.json")
    refused(capsys, "--save-images", "shapes", "--model", tmp_path / "nomodel", "--save-images", afile)
    assert afile.read_text() == "" and not (tmp_path / "res.json").exists()


def test_out_directory_is_created_up_front(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TRANSFORMERS_VERBOSITY", raising=False)
    out = tmp_path / "new" / "dir" / "res.json"
    code, stdout, err = run(capsys, "cider", "--captions", _captions_file(tmp_path), "--tokenizer", "simple",
                            "--out", out, "--no-progress")
    assert code == 0, err
    assert json.loads(out.read_text())["cider"] == pytest.approx(10.0 * 3 / 4)  # 3-word captions: no 4-grams


@pytest.mark.parametrize("args,needle", [
    (["fid", "--real", "{tmp}", "--fake", "{tmp}", "--size", "0"], "--size 0"),
    (["fid", "--real", "{tmp}", "--fake", "{tmp}", "--size", "-3"], "--size -3"),
    (["shapes", "--model", "{tmp}/nomodel", "--device", "bogus"], "--device bogus"),
    (["cider", "--captions", "{tmp}/caps.jsonl", "--device", "cuda:99"], "--device cuda:99"),
])
def test_bad_numbers_and_devices_are_one_line(tmp_path, capsys, monkeypatch, args, needle):
    monkeypatch.delenv("TRANSFORMERS_VERBOSITY", raising=False)
    _captions_file(tmp_path)
    refused(capsys, needle, *[a.format(tmp=tmp_path) for a in args])

