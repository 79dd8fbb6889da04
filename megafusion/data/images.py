"""Image decoding and normalisation shared by shard writing and reading.

Every image becomes RGB: CMYK, palette, 16-bit and alpha images are converted (alpha
composited on white), never skipped. Files that cannot be decoded raise ImageSkip with a
short reason, which callers count.
"""
from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


class ImageSkip(Exception):
    """An image that cannot be used; `reason` is the key it is counted under."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def decode_image(data: bytes) -> Image.Image:
    """Bytes -> fully loaded PIL image (any mode), or ImageSkip."""
    if not data:
        raise ImageSkip("empty_file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL warns on odd metadata; a warning is not a skip
            img = Image.open(io.BytesIO(data))
            img.load()
    except Image.DecompressionBombError as e:
        raise ImageSkip("image_too_large", str(e)) from None
    except UnidentifiedImageError as e:
        raise ImageSkip("unreadable_image", str(e)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        msg = str(e)
        raise ImageSkip("truncated_image" if "truncated" in msg.lower() else "unreadable_image", msg) from None
    if img.width < 1 or img.height < 1:
        raise ImageSkip("zero_size_image")
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. 16/32-bit gray is scaled to 8 bits; transparency goes on white."""
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # broken EXIF must not lose the image
        pass
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        if mode == "F":
            hi = 1.0 if a.max(initial=0.0) <= 1.0 else 255.0
        elif mode.startswith("I;16") or a.max(initial=0) > 255:
            hi = 65535.0
        else:
            hi = 255.0
        a = np.clip(np.round(a / hi * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(a, mode="L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
    if mode in ("LA", "La", "PA", "RGBa") or (mode == "L" and "transparency" in img.info):
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode == "RGB" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode == "RGBA":
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Scale the shorter side to `size`, then cut the centre square."""
    w, h = img.size
    if (w, h) == (size, size):
        return img
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=3.0 if scale < 0.5 else None)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def load_rgb(data: bytes, size: int) -> Image.Image:
    """Bytes -> RGB image of size x size, or ImageSkip."""
    return resize_center_crop(to_rgb(decode_image(data)), size)


def encode_image(img: Image.Image, fmt: str = "png") -> bytes:
    buf = io.BytesIO()
    if fmt == "png":
        img.save(buf, format="PNG", compress_level=6)
    elif fmt == "jpeg":
        img.save(buf, format="JPEG", quality=95)
    else:
        raise ValueError(f"unknown image format {fmt!r}")
    return buf.getvalue()


def to_tensor(img: Image.Image):
    """RGB image -> float32 torch tensor [3, H, W] in [-1, 1]."""
    import torch

    a = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(a.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
