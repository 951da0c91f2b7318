"""Pictures for people: a grid of few-shot images beside images generated from learned tokens."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw


def image_grid(
    rows: Sequence[tuple[str, Sequence[np.ndarray]]],
    col_titles: Sequence[str],
    scale: int = 3,
    pad: int = 4,
    label_w: int = 130,
    title_h: int = 16,
) -> Image.Image:
    """Rows of uint8 images [H, W, 3] with a label per row and a title per column."""
    h, w = rows[0][1][0].shape[:2]
    cell_h, cell_w = h * scale + pad, w * scale + pad
    ncols = max(len(imgs) for _, imgs in rows)
    canvas = Image.new("RGB", (label_w + ncols * cell_w, title_h + len(rows) * cell_h), "white")
    draw = ImageDraw.Draw(canvas)
    for j, title in enumerate(col_titles[:ncols]):
        draw.text((label_w + j * cell_w + 2, 2), title, fill="black")
    for i, (label, imgs) in enumerate(rows):
        y = title_h + i * cell_h
        draw.text((2, y + cell_h // 2 - 6), label, fill="black")
        for j, img in enumerate(imgs):
            tile = Image.fromarray(img).resize((w * scale, h * scale), Image.NEAREST)
            canvas.paste(tile, (label_w + j * cell_w, y))
    return canvas
