"""The fashion world's renderer: real Fashion-MNIST garments, coloured, patterned and placed in a scene.

A render keeps what makes a garment *that* garment (its silhouette and the light/dark texture of the
photo) and replaces what Fashion-MNIST lacks (colour, pattern, scene) with attributes we control and can
name. Everything is vectorised over the batch: geometry is two small matmuls per image (the placement is
an axis-aligned scale + shift, hence separable), patterns are computed per pattern kind and scenes per
scene kind, so the only Python loops are over those few kinds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from factory.world.attributes import (
    BACKGROUNDS,
    CATEGORIES,
    COLOUR_RGB,
    COLOURS,
    NO_PATTERN_COLOUR,
    PATTERNS,
    PLAIN,
    caption,
)
from factory.world.fashion_mnist import FashionSplit, load_fashion_mnist
from factory.world.scenes import draw_backgrounds

if TYPE_CHECKING:
    from factory.world.products import Product

__all__ = ["FashionWorld", "Renders", "caption", "render"]

GARMENT_PX = 28
MAX_SHIFT = 2.0  # pixels at 32 px, scaled with the output size
SCALE_RANGE = (0.85, 1.1)


def _placement_matrix(offset: np.ndarray, scale: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-image bilinear sampling matrices ``[N, size, 28]`` along one axis, and the garment coordinate
    of every output pixel ``[N, size]`` (patterns are drawn in garment coordinates so they move and scale
    with the garment instead of sliding across it)."""
    n = len(offset)
    u = np.arange(size, dtype=np.float32) + 0.5 - size / 2  # output pixel centres, relative to the centre
    src = (u[None, :] - offset[:, None]) * (GARMENT_PX / (size * scale[:, None])) + (GARMENT_PX - 1) / 2
    # Clamping to [-1, 28] makes anything outside the garment read the zero border of a padded row.
    pos = np.clip(src, -1.0, float(GARMENT_PX))
    lo = np.floor(pos).astype(np.int64)
    frac = (pos - lo).astype(np.float32)
    m = np.zeros((n, size, GARMENT_PX + 3), dtype=np.float32)  # columns: pad, 28 pixels, 2 pads
    nn, ii = np.meshgrid(np.arange(n), np.arange(size), indexing="ij")
    m[nn, ii, lo + 1] = 1 - frac
    m[nn, ii, lo + 2] = frac
    return m[:, :, 1 : GARMENT_PX + 1], src.astype(np.float32)


def _pattern_masks(pattern_idx: np.ndarray, gy: np.ndarray, gx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Boolean ``[N, S, S]``: where the pattern's second colour goes. ``gy``/``gx`` are garment coordinates
    ``[N, S]`` of rows/columns; each image gets its own random phase so stripes do not always line up."""
    n, s = gy.shape
    out = np.zeros((n, s, s), dtype=bool)
    phase = rng.uniform(0, 8, (n, 2)).astype(np.float32)
    for k, name in enumerate(PATTERNS):
        sel = np.flatnonzero(pattern_idx == k)
        if name == "plain" or not len(sel):
            continue
        y = (gy[sel] + phase[sel, :1])[:, :, None]  # [m, S, 1]
        x = (gx[sel] + phase[sel, 1:])[:, None, :]  # [m, 1, S]
        # The pattern's second colour covers about a third of the garment or less (measured in
        # tests/factory/world), so "the" colour of a render, the one its caption names, is always the
        # majority colour. (At ~50%, as a first version had, a red-and-blue check is as blue as it is red
        # and zero-shot colour fell to 0.52 on patterned garments.)
        if name == "striped":  # horizontal bands, 2.5 garment px on, 4.5 off
            mask = np.broadcast_to((y % 7.0) < 2.5, (len(sel), s, s))
        elif name == "dotted":  # a grid of round dots
            mask = ((y % 7.0) - 3.5) ** 2 + ((x % 7.0) - 3.5) ** 2 < 2.0**2
        elif name == "checked":  # a gingham-like grid of thin crossing bands
            mask = ((y % 8.0) < 1.5) | ((x % 8.0) < 1.5)
        elif name == "zigzag":  # bands displaced by a triangle wave along x
            tri = np.abs((x % 10.0) - 5.0) - 2.5  # in [-2.5, 2.5], period 10
            mask = ((y + tri) % 7.0) < 2.5
        else:  # pragma: no cover - guarded by the PATTERNS tuple
            raise AssertionError(name)
        out[sel] = mask
    return out


def _dilate(a: np.ndarray) -> np.ndarray:
    """Max over the 4-neighbourhood of ``[N, S, S]`` (edges padded with 0)."""
    out = a.copy()
    np.maximum(out[:, 1:], a[:, :-1], out=out[:, 1:])
    np.maximum(out[:, :-1], a[:, 1:], out=out[:, :-1])
    np.maximum(out[:, :, 1:], a[:, :, :-1], out=out[:, :, 1:])
    np.maximum(out[:, :, :-1], a[:, :, 1:], out=out[:, :, :-1])
    return out


def _check_index(name: str, idx: np.ndarray, n: int, high: int, allow_none: bool = False) -> np.ndarray:
    idx = np.asarray(idx, dtype=np.int64).reshape(-1)
    if idx.shape != (n,):
        raise ValueError(f"{name} must have one entry per garment ({n}), got shape {idx.shape}")
    low = NO_PATTERN_COLOUR if allow_none else 0
    if n and (idx.min() < low or idx.max() >= high):
        raise ValueError(f"{name} out of range [{low}, {high}): min {idx.min()}, max {idx.max()}")
    return idx


def render(
    garments: np.ndarray,
    colour_idx: np.ndarray,
    pattern_idx: np.ndarray,
    pattern_colour_idx: np.ndarray,
    background_idx: np.ndarray,
    rng: np.random.Generator,
    size: int = 32,
) -> np.ndarray:
    """Render ``uint8 [N, 28, 28]`` garments as ``uint8 [N, size, size, 3]`` images.

    Indices are into ``COLOURS``, ``PATTERNS``, ``COLOURS`` and ``BACKGROUNDS``. The pattern colour of a
    plain garment is ignored (it may be ``NO_PATTERN_COLOUR``). ``rng`` draws the placement (shift of up
    to ±2 px at 32 px, scale 0.85-1.1), the pattern phase and the scene, so a seed fixes the output.
    """
    garments = np.asarray(garments)
    if garments.ndim != 3 or garments.shape[1:] != (GARMENT_PX, GARMENT_PX):
        raise ValueError(f"garments must be [N, 28, 28], got {garments.shape}")
    if size < 8:
        raise ValueError(f"size must be at least 8 pixels, got {size}")
    n = len(garments)
    colour = _check_index("colour_idx", colour_idx, n, len(COLOURS))
    pattern = _check_index("pattern_idx", pattern_idx, n, len(PATTERNS))
    pcolour = _check_index("pattern_colour_idx", pattern_colour_idx, n, len(COLOURS), allow_none=True)
    if np.any((pattern != PLAIN) & (pcolour == NO_PATTERN_COLOUR)):
        raise ValueError("a patterned garment needs a pattern colour")
    background = _check_index("background_idx", background_idx, n, len(BACKGROUNDS))

    # Placement: one random shift and one scale per image; the same scale on both axes keeps proportions.
    shift = rng.uniform(-MAX_SHIFT, MAX_SHIFT, (n, 2)).astype(np.float32) * (size / 32)
    scale = rng.uniform(*SCALE_RANGE, n).astype(np.float32)
    my, gy = _placement_matrix(shift[:, 0], scale, size)
    mx, gx = _placement_matrix(shift[:, 1], scale, size)
    g = my @ (garments.astype(np.float32) / 255) @ mx.transpose(0, 2, 1)  # [N, S, S] in [0, 1]

    # Fashion-MNIST's background is exactly 0 and garments are (nearly) never that dark inside, so a low
    # ramp gives a clean, slightly soft mask without eating dark parts of the garment.
    alpha = np.clip((g - 0.01) / 0.06, 0.0, 1.0)[:, None]  # [N, 1, S, S]; channel-first, see scenes.py
    # Texture: the photo's own light/dark detail, normalised per image so dark photos are not all black.
    tex = (g / np.maximum(g.max(axis=(1, 2), keepdims=True), 1e-3))[:, None]

    ink = _pattern_masks(pattern, gy, gx, rng)[:, None]
    base = COLOUR_RGB[colour][:, :, None, None]  # [N, 3, 1, 1]
    second = COLOUR_RGB[np.where(pcolour < 0, colour, pcolour)][:, :, None, None]
    fg = np.where(ink, second, base)  # [N, 3, S, S]
    # Multiplicative shading keeps colours recognisable; the small additive term lets black garments
    # still show their folds and seams.
    fg *= 0.5 + 0.6 * tex
    fg += 40.0 * (tex - 0.6)

    bg = draw_backgrounds(background, size, rng)
    # A dark rim just outside the garment separates white-on-snow or green-on-grass from the scene.
    rim = np.clip(_dilate(alpha[:, 0]) - alpha[:, 0], 0.0, 1.0)[:, None]
    bg *= 1.0 - 0.4 * rim
    fg -= bg  # composite in place: out = bg + alpha * (fg - bg)
    fg *= alpha
    fg += bg + 0.5  # + 0.5 rounds on the cast below
    out = np.clip(fg, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(out.transpose(0, 2, 3, 1))  # [N, S, S, 3], what PIL and users expect


# Which attribute varies inside a hard-negative group (see `FashionWorld.sample`), and how often: category
# and pattern are the ones CLIP confuses (shirt/coat/pullover at 32 px, dots/checks), so they get most.
GROUP_VARY: dict[str, float] = {"garment": 0.4, "colour": 0.2, "pattern": 0.3, "background": 0.1}


def _grouped(rng: np.random.Generator, group_size: int, **attrs: np.ndarray) -> tuple[np.ndarray, ...]:
    """Copy each group's first render's attributes to the whole group, except the one drawn to vary.

    ``attrs`` are per-render arrays named as in `GROUP_VARY` (plus ``offset``, the pattern colour's
    distance from the fill, which always follows the group). Returns them in the order given.
    """
    n = len(next(iter(attrs.values())))
    first = np.arange(n) // group_size * group_size  # index of each render's group leader
    names = list(GROUP_VARY)
    vary = rng.choice(len(names), -(-n // group_size), p=list(GROUP_VARY.values()))
    varied = np.repeat(vary, group_size)[:n]
    return tuple(
        np.where(varied == names.index(k), a, a[first]) if k in GROUP_VARY else a[first] for k, a in attrs.items()
    )


@dataclass
class Renders:
    """A batch of renders with their labels (indices into the attribute tuples) and captions."""

    images: np.ndarray  # uint8 [N, S, S, 3]
    category: np.ndarray  # int64 [N], into CATEGORIES
    colour: np.ndarray  # into COLOURS
    pattern: np.ndarray  # into PATTERNS
    pattern_colour: np.ndarray  # into COLOURS, NO_PATTERN_COLOUR (-1) for plain garments
    background: np.ndarray  # into BACKGROUNDS
    garment_index: np.ndarray  # index of the garment in its Fashion-MNIST split
    captions: list[str]

    def __len__(self) -> int:
        return len(self.images)


def _captions(category: np.ndarray, colour: np.ndarray, pattern: np.ndarray, background: np.ndarray) -> list[str]:
    return [
        caption(CATEGORIES[c], COLOURS[k], PATTERNS[p], BACKGROUNDS[b])
        for c, k, p, b in zip(category.tolist(), colour.tolist(), pattern.tolist(), background.tolist())
    ]


class FashionWorld:
    """An endless, seeded stream of captioned renders of one Fashion-MNIST split.

    Pretraining uses ``split="train"``; the sample catalog's products are garments of the test split,
    so a model pretrained here never saw the exact garment behind a product.
    """

    def __init__(self, seed: int, size: int = 32, split: FashionSplit = "train") -> None:
        self.size = size
        self.split = split
        self.garments, self.labels = load_fashion_mnist(split)
        self.rng = np.random.default_rng(seed)

    def sample(self, n: int, rng: np.random.Generator | None = None, group_size: int = 1) -> Renders:
        """``n`` renders with uniformly random garment, colour, pattern, pattern colour and scene.

        ``rng`` overrides the world's own generator (pretraining passes its checkpointed one).
        ``group_size > 1`` draws *hard negatives* for contrastive pretraining: consecutive groups of that
        many renders share everything (the same garment, colourway and scene) but one attribute, drawn
        per group with `GROUP_VARY` odds. In a uniformly random batch two captions almost never differ
        in the category alone, so CLIP gets little pressure to tell a shirt from a coat or dots from
        checks; a group puts exactly those pairs side by side.
        """
        if group_size < 1:
            raise ValueError(f"group_size must be at least 1, got {group_size}")
        rng = self.rng if rng is None else rng
        garment = rng.integers(0, len(self.garments), n)
        colour = rng.integers(0, len(COLOURS), n)
        pattern = rng.integers(0, len(PATTERNS), n)
        offset = rng.integers(1, len(COLOURS), n)  # pattern colour = colour + offset: never the fill
        background = rng.integers(0, len(BACKGROUNDS), n)
        if group_size > 1:
            garment, colour, pattern, offset, background = _grouped(
                rng, group_size, garment=garment, colour=colour, pattern=pattern, offset=offset, background=background
            )
        pattern_colour = np.where(pattern == PLAIN, NO_PATTERN_COLOUR, (colour + offset) % len(COLOURS))
        images = render(self.garments[garment], colour, pattern, pattern_colour, background, rng, self.size)
        category = self.labels[garment].astype(np.int64)
        return Renders(
            images,
            category,
            colour,
            pattern,
            pattern_colour,
            background,
            garment,
            _captions(category, colour, pattern, background),
        )

    def render_product(
        self,
        product: Product,
        background_idx: int | np.ndarray,
        n: int,
        rng: np.random.Generator | None = None,
    ) -> Renders:
        """``n`` renders of one product (its own garment and colourway) in the given scene(s).

        ``background_idx`` is one index for all ``n`` renders or one per render. The garment comes from
        the product's own split (the test split for catalog products), whatever this world's split is.
        """
        rng = self.rng if rng is None else rng
        garments, labels = load_fashion_mnist(product.split)
        background = np.broadcast_to(np.asarray(background_idx, dtype=np.int64), (n,)).copy()
        idx = np.full(n, product.garment_index, dtype=np.int64)
        colour = np.full(n, product.colour, dtype=np.int64)
        pattern = np.full(n, product.pattern, dtype=np.int64)
        pcolour = np.full(n, product.pattern_colour, dtype=np.int64)
        images = render(garments[idx], colour, pattern, pcolour, background, rng, self.size)
        category = labels[idx].astype(np.int64)
        return Renders(
            images,
            category,
            colour,
            pattern,
            pcolour,
            background,
            idx,
            _captions(category, colour, pattern, background),
        )
