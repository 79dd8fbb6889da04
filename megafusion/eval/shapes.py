"""GenEval-style scoring of the synthetic shapes task by a deterministic image analyser.

analyse(image) finds the coloured shapes on the grey canvas that megafusion.data.synthetic
draws; score_generation(image, meta) and score_caption(text, meta) compare an image drawn
from a held-out caption, or a caption written for a held-out image, with the generator's
ground truth; summarise(scores) gives per-attribute accuracy beside chance. Nothing here is
learned: every number comes from the generator's own palette, vocabulary and drawing code,
so a change to the task changes the analyser with it.

How an image is read, and why:
- The generator draws flat colours at 4x and box-downsamples, so an edge pixel is a blend
  alpha * colour + (1 - alpha) * background. Each pixel is measured against the segment
  background -> colour of every palette colour: alpha is its position along the segment,
  the residual its distance from it. That keeps the sub-pixel coverage of edge pixels,
  which is what tells a 3-pixel circle from a 3-pixel square at 16x16.
- Core pixels (alpha >= 0.5, nearest colour by residual, residual under COLOUR_TOL) form
  4-connected components per colour.
- The image must be a grey canvas: its median pixel within COLOUR_TOL of the background
  (shapes cover under a fifth of it). That rejects noise images, whose random pixels also
  fall near the palette.
- A component is an object if it covers at least half the smallest shape the generator
  draws.
- Shape comes from moments of the soft coverage (alpha over the component grown by one
  pixel), not from a thresholded mask: mu22 / sqrt(mu40 mu04) is 1/3 for a disc and 5/9
  for an axis-aligned square, and the vertical skewness |mu03| / mu02^1.5 is ~0.57 for the
  generator's upright triangle and 0 for the other two. Bounding-box fill ratios need
  crisp edges, which 16x16 and 32x32 images do not have. The reference values are measured
  on shapes drawn by synthetic._draw itself, as are the area per diameter^2 that turns an
  area into a size and the offset from the centroid to the drawing centre.
"""
from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from megafusion.data.synthetic import BACKGROUND, COLOURS, POSITIONS, RELATIONS, SHAPES, SIZES, _draw

_NAMES = list(COLOURS)
_BG = np.array(BACKGROUND, dtype=np.float64)
_V = np.array([COLOURS[c] for c in _NAMES], dtype=np.float64) - _BG  # (6, 3) background -> colour
# The palette's own scale: the distance between its two closest colours (yellow and orange,
# 81 of 255). The nearest colour decides which colour a pixel is; this tolerance only
# rejects pixels that are no palette colour at all, and canvases that are not grey.
# Measured with Gaussian pixel noise on renders: every attribute stays at 1.0 up to
# sigma 25 at 32x32 and 64x64 (with half this tolerance, shapes fall apart into fragments
# at sigma 25: shape accuracy 0.82), and sigma 60 or uniform noise scores nothing.
COLOUR_TOL = min(float(np.linalg.norm(_V[i] - _V[j])) for i in range(len(_V)) for j in range(i))
CORE_ALPHA = 0.5  # at least half the pixel is covered


@dataclass(frozen=True)
class Detection:
    colour: str
    shape: str
    size: str
    position: str  # nearest of synthetic.POSITIONS
    centre: tuple[float, float]  # estimated drawing centre (x, y), fractions of width/height
    area: float  # soft coverage, fraction of the image
    bbox: tuple[float, float, float, float]  # core pixels: x0, y0, x1, y1 (exclusive), fractions


def _shift(a: np.ndarray, dy: int, dx: int, fill) -> np.ndarray:
    """out[y, x] = a[y - dy, x - dx], `fill` outside."""
    h, w = a.shape
    out = np.full_like(a, fill)
    src = a[max(-dy, 0):h - max(dy, 0), max(-dx, 0):w - max(dx, 0)]
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = src
    return out


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    for _ in range(steps):
        mask = mask | np.logical_or.reduce([_shift(mask, dy, dx, False) for dy in (-1, 0, 1) for dx in (-1, 0, 1)])
    return mask


def _components(classes: np.ndarray) -> np.ndarray:
    """4-connected components of equal non-negative class: each pixel takes the smallest
    flat index in its component (-1 where class < 0). Label propagation rather than scipy,
    which is not a dependency; images are at most a few thousand pixels."""
    big = classes.size
    labels = np.where(classes >= 0, np.arange(big).reshape(classes.shape), big)
    while True:
        new = labels
        for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0)):
            same = _shift(classes, dy, dx, -1) == classes
            new = np.minimum(new, np.where(same, _shift(labels, dy, dx, big), big))
        if np.array_equal(new, labels):
            return np.where(labels < big, labels, -1)
        labels = new


def _moments(w: np.ndarray) -> tuple[float, float, float, float, float]:
    """Area, centroid (pixels) and the two shape features of a coverage map."""
    ys, xs = np.indices(w.shape, dtype=np.float64) + 0.5  # pixel centres
    area = float(w.sum())
    cx, cy = float((w * xs).sum()) / area, float((w * ys).sum()) / area
    dx, dy = xs - cx, ys - cy

    def mu(p, q):
        return float((w * dx**p * dy**q).sum()) / area

    square_ness = mu(2, 2) / math.sqrt(mu(4, 0) * mu(0, 4) + 1e-12)
    skew = abs(mu(0, 3)) / (mu(0, 2) ** 1.5 + 1e-12)  # abs: an upside-down triangle is a triangle
    return area, cx, cy, square_ness, skew


@functools.cache
def _references() -> dict:
    """Per shape, measured on synthetic._draw at high resolution: the two features, area per
    diameter^2, and the drawing centre minus the centroid per diameter (the triangle's
    centroid sits below the point it is drawn around)."""
    side, d = 400, 200.0
    refs = {}
    for shape in SHAPES:
        img = Image.new("RGB", (side, side), (0, 0, 0))
        _draw(ImageDraw.Draw(img), shape, _NAMES[0], side / 2, side / 2, d)
        area, cx, cy, square_ness, skew = _moments(np.asarray(img).any(-1).astype(np.float64))
        refs[shape] = dict(features=np.array([square_ness, skew]), area=area / d**2,
                           offset=((side / 2 - cx) / d, (side / 2 - cy) / d))
    return refs


def _nearest_log(value: float, table: dict) -> str:
    return min(table, key=lambda k: abs(math.log(value / table[k])))


def _nearest_position(x: float, y: float) -> str:
    return min(POSITIONS, key=lambda k: (POSITIONS[k][0] - x) ** 2 + (POSITIONS[k][1] - y) ** 2)


def _as_rgb(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = image.convert("RGB")
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an RGB PIL image or a uint8 HxWx3 array, got {arr.dtype} {arr.shape}")
    return arr.astype(np.float64)


def analyse(image) -> list[Detection]:
    """The coloured shapes on a synthetic-task image, largest first."""
    rel = _as_rgb(image) - _BG
    h, w = rel.shape[:2]
    if np.median(np.linalg.norm(rel, axis=-1)) >= COLOUR_TOL:
        return []  # not a grey canvas
    alpha = rel @ _V.T / (_V**2).sum(1)  # (h, w, 6)
    resid = np.linalg.norm(rel[:, :, None, :] - np.clip(alpha, 0, 1)[..., None] * _V, axis=-1)
    resid = np.where(alpha >= CORE_ALPHA, resid, np.inf)
    best = resid.argmin(-1)
    classes = np.where(resid.min(-1) < COLOUR_TOL, best, -1)
    labels = _components(classes)
    refs = _references()
    min_area = 0.5 * min(r["area"] for r in refs.values()) * min(SIZES.values()) ** 2
    found = []
    for label in np.unique(labels[labels >= 0]):
        core = labels == label
        k = int(classes[core][0])
        grown = _dilate(core, 1)
        cover = np.where(grown, np.clip(alpha[:, :, k], 0, 1), 0.0)
        area, cx, cy, square_ness, skew = _moments(cover)
        if area < min_area * h * w:
            continue
        shape = min(SHAPES, key=lambda s: float(np.linalg.norm(refs[s]["features"] - (square_ness, skew))))
        ref = refs[shape]
        diameter = math.sqrt(area / ref["area"])  # pixels
        x = (cx + ref["offset"][0] * diameter) / w
        y = (cy + ref["offset"][1] * diameter) / h
        ys, xs = np.nonzero(core)
        found.append(Detection(
            colour=_NAMES[k], shape=shape, size=_nearest_log(diameter / math.sqrt(h * w), SIZES),
            position=_nearest_position(x, y), centre=(x, y), area=area / (h * w),
            bbox=(xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h)))
    return sorted(found, key=lambda d: -d.area)


def relation_between(a: tuple[float, float], b: tuple[float, float]) -> str:
    """Where centre a lies relative to centre b: the direction of the larger displacement
    (image y grows downwards)."""
    dx, dy = a[0] - b[0], a[1] - b[1]
    if abs(dy) >= abs(dx):
        return "above" if dy < 0 else "below"
    return "left of" if dx < 0 else "right of"


def score_generation(image, meta: dict) -> dict:
    """Per-attribute booleans for an image drawn from the caption whose truth is `meta`.
    One object: the largest detection is the drawn object. Two: each object must appear
    (colour and shape, distinct detections), and the relation holds between those two;
    relation is None (not scored) when they do not both appear."""
    found = analyse(image)
    if meta["kind"] == "one":
        want = meta["objects"][0]
        got = found[0] if found else None
        return dict(colour=bool(got and got.colour == want["colour"]),
                    shape=bool(got and got.shape == want["shape"]),
                    size=bool(got and got.size == want["size"]),
                    position=bool(got and got.position == meta["position"]))
    matched, free = [], list(found)
    for want in meta["objects"]:
        hit = next((d for d in free if (d.colour, d.shape) == (want["colour"], want["shape"])), None)
        if hit is not None:
            free.remove(hit)
            matched.append(hit)
    both = len(matched) == 2
    return dict(both_present=both,
                relation=relation_between(matched[0].centre, matched[1].centre) == meta["relation"] if both else None)


_OBJECT = re.compile(r"\b(?:({sizes})\s+)?({colours})\s+({shapes})\b".format(
    sizes="|".join(SIZES), colours="|".join(COLOURS), shapes="|".join(SHAPES)))
_INVERSE = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}


def parse_caption(text: str) -> dict:
    """The generator's grammar read back: objects as (colour, shape, size) in order of
    mention (no size word means medium), the position phrase and the relation word."""
    text = " ".join(text.lower().split())
    objects = [(m[2], m[3], m[1] or "medium") for m in _OBJECT.finditer(text)]
    positions = [p for p in POSITIONS if re.search(rf"\b{p}\b", text)]
    relations = [r for r in RELATIONS if re.search(rf"\b{r}\b", text)]
    return dict(objects=objects, position=positions[0] if len(positions) == 1 else None,
                relation=relations[0] if len(relations) == 1 else None)


def score_caption(text: str, meta: dict) -> dict:
    """Per-attribute booleans for a caption written for the image whose truth is `meta`.
    A caption that names two positions or two relations names none: hedging scores 0.
    Two objects: relation is None (not scored) unless the caption names both."""
    said = parse_caption(text)
    truth = [(o["colour"], o["shape"]) for o in meta["objects"]]
    if meta["kind"] == "one":
        first = said["objects"][0] if len(said["objects"]) == 1 else None
        return dict(colour=bool(first and first[0] == truth[0][0]),
                    shape=bool(first and first[1] == truth[0][1]),
                    size=bool(first and first[2] == meta["objects"][0]["size"]),
                    position=said["position"] == meta["position"])
    named = [o[:2] for o in said["objects"]]
    both = len(named) == 2 and sorted(named) == sorted(truth)
    # "B below A" says the same as "A above B".
    right = said["relation"] == (meta["relation"] if named == truth else _INVERSE[meta["relation"]])
    return dict(both_present=both, relation=right if both else None)


# Chance: the accuracy of a uniform guess over the generator's choices. One object: colour,
# shape, size and position are drawn independently and uniformly, so 1/6, 1/3, 1/3, 1/9.
# Two objects: an unordered pair of distinct (colour, shape) objects out of 6 x 3 = 18, so
# both present is 1/C(18, 2) = 1/153; the relation, given both, is one of 4. The relation is
# scored only where both are present (None elsewhere), so 1/4 is the chance of what its
# accuracy counts; a two-object sample is all right with chance 1/153 x 1/4.
CHANCE = dict(colour=1 / len(COLOURS), shape=1 / len(SHAPES), size=1 / len(SIZES),
              position=1 / len(POSITIONS), both_present=1 / math.comb(len(COLOURS) * len(SHAPES), 2),
              relation=1 / len(RELATIONS))


def summarise(scores: list[dict]) -> dict:
    """attribute -> {accuracy, n, chance}, over the samples where that attribute is scored
    (present and not None: relation only where both objects are present), plus "all": the
    share of samples with every attribute right, an unscored relation counting as wrong (its
    chance: the mean over samples of the product of their attributes' chances, the guesses
    being independent)."""
    out = {}
    for key in CHANCE:
        values = [s[key] for s in scores if s.get(key) is not None]
        if values:
            out[key] = dict(accuracy=sum(values) / len(values), n=len(values), chance=CHANCE[key])
    if scores:
        out["all"] = dict(accuracy=sum(all(s.values()) for s in scores) / len(scores), n=len(scores),
                          chance=sum(math.prod(CHANCE[k] for k in s) for s in scores) / len(scores))
    return out
