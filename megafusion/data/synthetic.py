"""A built-in image-caption task a CPU can learn in minutes.

Each image is a grey square canvas with one or two coloured shapes; its caption states
them: "a large green triangle in the top left", "a red circle above a small blue square".
3 shapes x 6 colours x 3 sizes (medium is unnamed) x 9 positions for one shape, or
4 relations between two different shapes.

Sample `index` of a seed is a pure function of (seed, index): the training split uses
indices 0, 1, ... and the held-out split starts at VAL_INDEX_OFFSET, so the two never
share a random stream. `meta` holds the ground truth for evaluation.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 220, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
}
# Diameter as a fraction of the image side; "medium" is not said in captions.
SIZES = {"small": 0.22, "medium": 0.32, "large": 0.46}
POSITIONS = {  # name -> centre (x, y) as fractions of the side
    "in the top left": (0.25, 0.25), "at the top": (0.5, 0.25), "in the top right": (0.75, 0.25),
    "on the left": (0.25, 0.5), "in the center": (0.5, 0.5), "on the right": (0.75, 0.5),
    "in the bottom left": (0.25, 0.75), "at the bottom": (0.5, 0.75), "in the bottom right": (0.75, 0.75),
}
RELATIONS = ("above", "below", "left of", "right of")
BACKGROUND = (128, 128, 128)
VAL_INDEX_OFFSET = 1_000_000_000
SUPERSAMPLE = 4


@dataclass
class SyntheticSample:
    id: str
    image: Image.Image
    caption: str
    meta: dict


def _phrase(colour: str, shape: str, size: str) -> str:
    words = f"{colour} {shape}" if size == "medium" else f"{size} {colour} {shape}"
    return ("an " if words[0] in "aeiou" else "a ") + words


def _draw(draw: ImageDraw.ImageDraw, shape: str, colour: str, cx: float, cy: float, diameter: float) -> None:
    r = diameter / 2
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        s = r * 0.9  # same visual weight as the circle
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
    else:
        raise ValueError(shape)


def make_sample(seed: int, index: int, size: int = 32) -> SyntheticSample:
    rng = np.random.default_rng([int(seed), int(index)])
    big = size * SUPERSAMPLE
    img = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(img)
    colours = list(COLOURS)

    def jitter():
        return float(rng.uniform(-0.04, 0.04))

    if rng.random() < 0.5:
        shape = SHAPES[rng.integers(len(SHAPES))]
        colour = colours[rng.integers(len(colours))]
        size_name = list(SIZES)[rng.integers(len(SIZES))]
        pos_name = list(POSITIONS)[rng.integers(len(POSITIONS))]
        x, y = POSITIONS[pos_name]
        # Keep a large shape inside the canvas: pull it towards the centre.
        d = SIZES[size_name]
        x = min(max(x + jitter(), d / 2 + 0.02), 1 - d / 2 - 0.02)
        y = min(max(y + jitter(), d / 2 + 0.02), 1 - d / 2 - 0.02)
        _draw(draw, shape, colour, x * big, y * big, d * big)
        caption = f"{_phrase(colour, shape, size_name)} {pos_name}"
        objects = [dict(shape=shape, colour=colour, size=size_name, x=x, y=y)]
        meta = dict(kind="one", position=pos_name, objects=objects)
    else:
        pairs = [(c, s) for c in colours for s in SHAPES]
        i, j = rng.choice(len(pairs), size=2, replace=False)
        (c1, s1), (c2, s2) = pairs[i], pairs[j]
        z1, z2 = ("small", "medium")[rng.integers(2)], ("small", "medium")[rng.integers(2)]
        relation = RELATIONS[rng.integers(len(RELATIONS))]
        along = float(rng.uniform(0.3, 0.7))  # shared coordinate across the relation axis
        first, second = (0.27, 0.73)
        if relation in ("below", "right of"):
            first, second = second, first
        if relation in ("above", "below"):
            p1, p2 = (along + jitter(), first + jitter()), (along + jitter(), second + jitter())
        else:
            p1, p2 = (first + jitter(), along + jitter()), (second + jitter(), along + jitter())
        _draw(draw, s1, c1, p1[0] * big, p1[1] * big, SIZES[z1] * big)
        _draw(draw, s2, c2, p2[0] * big, p2[1] * big, SIZES[z2] * big)
        caption = f"{_phrase(c1, s1, z1)} {relation} {_phrase(c2, s2, z2)}"
        objects = [dict(shape=s1, colour=c1, size=z1, x=p1[0], y=p1[1]),
                   dict(shape=s2, colour=c2, size=z2, x=p2[0], y=p2[1])]
        meta = dict(kind="two", relation=relation, objects=objects)
    img = img.resize((size, size), Image.Resampling.BOX)
    return SyntheticSample(id=f"synthetic-{seed}-{index}", image=img, caption=caption, meta=meta)


def synthetic_samples(seed: int, n: int, size: int = 32, split: str = "train"):
    """Yield the first n samples of a split ("train" or "val")."""
    if split not in ("train", "val"):
        raise ValueError(f"split={split!r}: expected train or val")
    offset = VAL_INDEX_OFFSET if split == "val" else 0
    for i in range(n):
        yield make_sample(seed, offset + i, size)
