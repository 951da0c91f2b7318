"""Decoding and validating untrusted image bytes.

Catalog images come from anywhere. A bad one must become a *reason* in the run report, never a crash:
`decode_image` raises `BadImage` with a short reason for empty, corrupt or truncated files, unsupported
formats, absurd dimensions and decompression bombs (checked from the header, before decoding pixels).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image

from factory.errors import TokenFactoryError

MAX_PIXELS = 4096 * 4096  # larger images are rejected from the header, before any pixel is decoded
MAX_SIDE = 16384
MIN_SIDE = 8


class BadImage(TokenFactoryError, ValueError):
    """An image that cannot be used; the message is a short reason for the run report."""

    code = "bad_image"


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Bytes -> uint8 RGB array [H, W, 3], or BadImage."""
    if not data:
        raise BadImage("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            if w * h > max_pixels or max(w, h) > MAX_SIDE:
                raise BadImage(f"too large: {w}x{h} pixels (limit {max_pixels} pixels)")
            if min(w, h) < MIN_SIDE:
                raise BadImage(f"too small: {w}x{h} pixels (minimum side {MIN_SIDE})")
            im.load()  # decodes now: truncated files fail here
            return np.asarray(im.convert("RGB"))
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage(f"decompression bomb: {e}") from None
    except Image.UnidentifiedImageError:
        raise BadImage("not an image (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImage(f"corrupt or truncated image: {e}") from None


def encode_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


THUMBNAIL_PX = 64


def thumbnail_b64(image: np.ndarray, px: int = THUMBNAIL_PX) -> str:
    """A small base64 PNG of a uint8 RGB image (at most ``px`` a side): what the studio shows of a concept."""
    import base64

    im = Image.fromarray(image)
    if max(im.size) > px:
        im.thumbnail((px, px), Image.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode()


def load_rgb(data: bytes, size: int, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode, centre-crop to a square and resize to ``size``: every image of a batch gets one shape."""
    arr = decode_image(data, max_pixels)
    h, w = arr.shape[:2]
    if (h, w) == (size, size):
        return arr
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    im = Image.fromarray(arr[top : top + s, left : left + s])
    return np.asarray(im.resize((size, size), Image.BICUBIC))


def to_uint8(images) -> np.ndarray:
    """Generator output in [-1, 1], [N, 3, H, W] (torch or NumPy) -> uint8 [N, H, W, 3]."""
    x = images.detach().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
    return ((x.transpose(0, 2, 3, 1) + 1) * 127.5).clip(0, 255).round().astype(np.uint8)
