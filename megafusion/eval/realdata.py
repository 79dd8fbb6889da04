"""Metrics for real image-caption data: FID (torchmetrics' FrechetInceptionDistance),
CLIP score (torchmetrics' CLIPScore) and CIDEr (pycocoevalcap).

Nothing is downloaded: the Inception weights are a local file (torch-fidelity's
pt_inception-2015-12-05 state dict, the network FID is defined with), the CLIP model a
local transformers directory (CLIPModel + CLIPProcessor). A missing one is a one-line
EvalError naming its option. CIDEr's reference tokenizer is Stanford's PTBTokenizer,
which runs on Java; without java a lowercase, punctuation-stripping tokenizer stands in
and the result says so.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch

from megafusion.eval.rows import EvalError, progress as _progress

INCEPTION_DIMS = (64, 192, 768, 2048)


def _quiet_metric_warnings():
    import warnings

    warnings.filterwarnings("ignore", module=r"torchmetrics\..*")
    warnings.filterwarnings("ignore", message=r".*torch-fidelity.*")


def uint8_batch(images, size: int) -> torch.Tensor:
    """PIL images -> uint8 [N, 3, size, size], resized and centre-cropped as the data pipeline does."""
    import numpy as np

    from megafusion.data.images import resize_center_crop, to_rgb

    arrays = [np.asarray(resize_center_crop(to_rgb(im), size), dtype=np.uint8) for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


# ------------------------------------------------------------------------------ FID

def inception(weights: str | None, dims: int = 2048) -> torch.nn.Module:
    """torchmetrics' Inception (torch-fidelity's FID network) with local weights."""
    if dims not in INCEPTION_DIMS:
        raise EvalError(f"--dims {dims}: expected one of {', '.join(map(str, INCEPTION_DIMS))}")
    if not weights:
        raise EvalError("--inception-weights: required (torch-fidelity's pt_inception-2015-12-05 weights file; "
                        "nothing is downloaded)")
    if not Path(weights).is_file():
        raise EvalError(f"--inception-weights {weights}: no such file (FID needs torch-fidelity's "
                        "pt_inception-2015-12-05 weights; nothing is downloaded)")
    _quiet_metric_warnings()
    from torchmetrics.image.fid import NoTrainInceptionV3

    try:
        return NoTrainInceptionV3(name="inception-v3-compat", features_list=[str(dims)],
                                  feature_extractor_weights_path=str(weights))
    except Exception as exc:  # torch.load / load_state_dict raise many types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise EvalError(f"--inception-weights {weights}: not InceptionV3 FID weights ({type(exc).__name__}: {first[:120]})") from None


def fid_score(real_images, fake_images, feature: torch.nn.Module | int, *, size: int = 299, batch: int = 32,
              progress: bool = True) -> dict:
    """FID between two lists of PIL images; `feature` is a module mapping uint8
    [N, 3, size, size] to features (inception() or any custom extractor)."""
    _quiet_metric_warnings()
    from torchmetrics.image.fid import FrechetInceptionDistance

    if int(size) < 1:
        raise EvalError(f"--size {size}: must be >= 1")
    if len(real_images) < 2 or len(fake_images) < 2:
        raise EvalError(f"fid: needs at least 2 real and 2 generated images (got {len(real_images)} and {len(fake_images)})")
    metric = FrechetInceptionDistance(feature=feature, normalize=False, input_img_size=(3, size, size))
    with torch.no_grad(), _progress(total=len(real_images) + len(fake_images), desc="fid", enabled=progress) as bar:
        for images, real in ((real_images, True), (fake_images, False)):
            for i in range(0, len(images), batch):
                chunk = images[i:i + batch]
                metric.update(uint8_batch(chunk, size), real=real)
                bar.update(len(chunk))
        value = float(metric.compute())
    return dict(task="fid", fid=value, n_real=len(real_images), n_fake=len(fake_images), image_size=size)


# ------------------------------------------------------------------------- CLIP score

def clip_loader(path: str):
    """A CLIPScore model_name_or_path callable for a local directory (torchmetrics accepts
    only hub names as strings)."""
    p = Path(path) if path else None
    if p is None or not (p / "config.json").is_file():
        raise EvalError(f"--clip-model {path}: no such CLIP model directory (a transformers CLIPModel + "
                        "CLIPProcessor saved with save_pretrained; nothing is downloaded)")

    def load():
        from transformers import CLIPModel, CLIPProcessor

        try:
            return CLIPModel.from_pretrained(str(p)).eval(), CLIPProcessor.from_pretrained(str(p))
        except Exception as exc:
            raise EvalError(f"--clip-model {path}: cannot load a CLIP model and processor ({type(exc).__name__})") from None

    return load


def clip_score(images, captions: list[str], clip_model: str, *, batch: int = 32, progress: bool = True) -> dict:
    """Mean CLIP score (100 * max(cosine, 0)) of images against their captions."""
    _quiet_metric_warnings()
    from torchmetrics.multimodal.clip_score import CLIPScore

    if len(images) != len(captions) or not images:
        raise EvalError(f"clip: {len(images)} images for {len(captions)} captions")
    metric = CLIPScore(model_name_or_path=clip_loader(clip_model))
    per_batch = []
    with torch.no_grad(), _progress(total=len(images), desc="clip", enabled=progress) as bar:
        for i in range(0, len(images), batch):
            tensors = [t for t in uint8_batch(images[i:i + batch], _clip_size(metric))]
            per_batch.append(float(metric(tensors, captions[i:i + batch])))
            bar.update(len(tensors))
        value = float(metric.compute())
    return dict(task="clip", clip_score=value, n=len(images), batch_scores=per_batch)


def _clip_size(metric) -> int:
    return int(metric.model.config.vision_config.image_size)


# ------------------------------------------------------------------------------ CIDEr

_PTB_PUNCTUATION = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--",
                    "...", ";"}


def simple_tokenize(text: str) -> str:
    """Lowercase words, punctuation dropped: what PTBTokenizer -lowerCase plus
    pycocoevalcap's punctuation filter give for plain captions."""
    words = re.findall(r"[a-z0-9]+(?:'[a-z]+)?", text.lower().replace("\n", " "))
    return " ".join(w for w in words if w not in _PTB_PUNCTUATION)


def _ptb_tokenize(lines: list[str]) -> list[str] | None:
    """Stanford's PTBTokenizer as pycocoevalcap runs it (its jar, -preserveLines
    -lowerCase, its punctuation filter), one output line per input line; None when the
    output does not have exactly one line per caption (then nothing lines up)."""
    import os
    import subprocess
    import tempfile

    from pycocoevalcap.tokenizer import ptbtokenizer as P

    jar = os.path.join(os.path.dirname(os.path.abspath(P.__file__)), P.STANFORD_CORENLP_3_4_1_JAR)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "captions.txt")
        with open(path, "wb") as f:
            f.write("\n".join(lines).encode())
        # the Java tokenizer reports its speed on stderr
        done = subprocess.run(["java", "-cp", jar, "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines",
                               "-lowerCase", path], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    if done.returncode != 0:
        return None
    out = done.stdout.decode().split("\n")
    if len(out) == len(lines) + 1 and out[-1] == "":  # a final newline
        out.pop()
    if len(out) != len(lines):
        return None
    return [" ".join(w for w in line.rstrip().split(" ") if w not in P.PUNCTUATIONS) for line in out]


def tokenize_captions(captions: dict[str, list[str]], tokenizer: str = "auto") -> tuple[dict[str, list[str]], str]:
    """{id: [caption, ...]} -> tokenised, and the tokenizer used. Whitespace is normalised
    first (runs of any whitespace -> one space): the Java tokenizer ends a line at '\\r',
    U+0085, U+2028 and U+2029 as well as '\\n', which would shift every caption after one."""
    if tokenizer not in ("auto", "ptb", "simple"):
        raise EvalError(f"--tokenizer {tokenizer}: expected auto, ptb or simple")
    captions = {k: [" ".join(str(c).split()) for c in v] for k, v in captions.items()}
    why = "simple"
    if tokenizer != "simple":
        if shutil.which("java"):
            keys = [k for k, v in captions.items() for _ in v]
            try:
                lines = _ptb_tokenize([c for v in captions.values() for c in v])
            except OSError:
                lines = None
            if lines is not None:
                out: dict[str, list[str]] = {k: [] for k in captions}
                for k, line in zip(keys, lines):  # same length: _ptb_tokenize checked it
                    out[k].append(line)
                return out, "ptb"
            problem = "Stanford's PTBTokenizer failed or did not give one line per caption"
        else:
            problem = "Stanford's PTBTokenizer needs java, which is not on PATH"
        if tokenizer == "ptb":
            raise EvalError(f"--tokenizer ptb: {problem}")
        why = f"simple ({problem}: lowercase words, punctuation dropped, instead)"
    return {k: [simple_tokenize(c) for c in v] for k, v in captions.items()}, why


def cider_score(predictions: list[str], references: list[list[str]], *, tokenizer: str = "auto") -> dict:
    """Corpus CIDEr-D (pycocoevalcap's Cider: n = 4, sigma = 6, x10) of predictions
    against their reference lists."""
    from pycocoevalcap.cider.cider import Cider

    if len(predictions) != len(references) or not predictions:
        raise EvalError(f"cider: {len(predictions)} predictions for {len(references)} reference lists")
    if any(not refs for refs in references):
        raise EvalError("cider: every prediction needs at least one reference")
    keys = [str(i) for i in range(len(predictions))]
    res, used = tokenize_captions(dict(zip(keys, ([p] for p in predictions))), tokenizer)
    gts, _ = tokenize_captions(dict(zip(keys, references)), tokenizer)
    score, scores = Cider().compute_score(gts, res)
    return dict(task="cider", cider=float(score), n=len(predictions), tokenizer=used,
                per_sample=[float(s) for s in scores])
