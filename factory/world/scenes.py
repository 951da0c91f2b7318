"""Procedural background scenes, one generator per background word, vectorised over a batch.

Each scene is drawn from a few cheap ingredients (vertical bands, low-frequency noise, per-pixel noise,
lines, sparse dots) so that a 32 px thumbnail of it is recognisable at a glance, while no two renders are
pixel-identical: the model has to learn "snow", not memorise one snow image.

Arrays are channel-first, ``[n, 3, S, S]``: NumPy broadcasts a colour over a 32-pixel row much faster
than over a trailing axis of 3, which made the channel-last version of the renderer 3x slower.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from factory.world.attributes import BACKGROUNDS

Scene = Callable[[int, int, np.random.Generator], np.ndarray]


def bilinear_matrix(src: int, dst: int) -> np.ndarray:
    """``[dst, src]`` weights that resample a length-``src`` signal to ``dst`` samples (edge-clamped).

    Images are resampled separably as ``M @ img @ M.T``: two small matmuls instead of per-pixel gathers.
    """
    pos = np.clip((np.arange(dst) + 0.5) * src / dst - 0.5, 0, src - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, src - 1)
    frac = (pos - lo).astype(np.float32)
    m = np.zeros((dst, src), dtype=np.float32)
    rows = np.arange(dst)
    m[rows, lo] += 1 - frac
    m[rows, hi] += frac
    return m


def _smooth_noise(n: int, size: int, rng: np.random.Generator, cells: int = 4) -> np.ndarray:
    """``[n, 1, size, size]`` zero-mean, unit-ish noise varying over about ``size / cells`` pixels."""
    m = bilinear_matrix(cells, size)
    coarse = rng.standard_normal((n, 1, cells, cells), dtype=np.float32)
    return m @ coarse @ m.T


def _noise(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """``[n, 1, size, size]`` per-pixel standard normal noise (the same on all channels: grey grain)."""
    return rng.standard_normal((n, 1, size, size), dtype=np.float32)


def _rows(size: int) -> np.ndarray:
    """Row coordinate in [0, 1], shaped ``[1, 1, size, 1]`` to broadcast over ``[n, 3, size, size]``."""
    return np.linspace(0.0, 1.0, size, dtype=np.float32)[None, None, :, None]


def _uniform(rng: np.random.Generator, low: float, high: float, n: int) -> np.ndarray:
    """One value per image, ``[n, 1, 1, 1]``."""
    return rng.uniform(low, high, (n, 1, 1, 1)).astype(np.float32)


def _rgb(*values: float) -> np.ndarray:
    """A colour shaped ``[3, 1, 1]``."""
    return np.array(values, dtype=np.float32)[:, None, None]


def _mix(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Blend colours ``a`` -> ``b`` by ``t`` (``[n, 1, s, s]`` or broadcastable to it)."""
    return a + (b - a) * t


def beach(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    # Sky, then a band of sea, then sand; the horizon and the shore line move from image to image.
    y = _rows(size)
    horizon = _uniform(rng, 0.18, 0.32, n)
    shore = horizon + _uniform(rng, 0.15, 0.25, n)
    sky = _mix(_rgb(150, 200, 240), _rgb(200, 228, 248), y)  # broadcasts over images and columns
    sea = _rgb(25, 105, 170) + 12 * _smooth_noise(n, size, rng, 6)
    sand = _rgb(226, 200, 148) + 10 * _noise(n, size, rng)
    return np.where(y < horizon, sky, np.where(y < shore, sea, sand))


def grass(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    # Patchy green (light and dark areas) with vertical blade-like streaks and per-pixel speckle.
    patches = _smooth_noise(n, size, rng, 4)
    blades = rng.standard_normal((n, 1, 1, size), dtype=np.float32)
    speckle = _noise(n, size, rng)
    t = np.clip(0.5 + 0.25 * patches + 0.12 * blades + 0.15 * speckle, 0, 1)
    return _mix(_rgb(30, 95, 25), _rgb(110, 185, 70), t)


def snow(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    # White with blue-grey drifts: the noise decides how much shadow each spot gets.
    drifts = _smooth_noise(n, size, rng, 5)
    speckle = _noise(n, size, rng)
    t = np.clip(0.3 + 0.3 * drifts + 0.12 * speckle, 0, 1)
    return _mix(_rgb(246, 249, 255), _rgb(160, 178, 210), t)


def street(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    # Grey asphalt with a solid kerb line and a dashed white lane marking at random heights.
    y = np.arange(size, dtype=np.float32)[None, None, :, None]
    x = np.arange(size, dtype=np.float32)[None, None, None, :]
    asphalt = _rgb(100, 100, 104) + 10 * _noise(n, size, rng)
    width = max(1.0, size / 20)
    kerb_y = _uniform(rng, 0.08, 0.25, n) * size
    lane_y = _uniform(rng, 0.7, 0.9, n) * size
    period = size / 4
    phase = _uniform(rng, 0, period, n)
    kerb = np.abs(y - kerb_y) < width
    lane = (np.abs(y - lane_y) < width) & (((x + phase) % period) < period * 0.6)
    return np.where(lane, _rgb(240, 240, 235), np.where(kerb, _rgb(185, 185, 180), asphalt))


def studio(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    # A smooth, light paper backdrop: bright at the top, slightly darker at the bottom, a random warm or
    # neutral tint (never blue, which is snow's colour).
    y = _rows(size)
    tint = _uniform(rng, 0, 1, n) * _rgb(8, 3, -8)
    top = _uniform(rng, 232, 246, n)
    return top - 40 * y + tint + 2 * _noise(n, size, rng)


def night(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    # Dark blue sky, a little lighter near the bottom, sprinkled with bright star dots.
    y = _rows(size)
    sky = _mix(_rgb(8, 12, 40), _rgb(25, 35, 85), y) + 3 * _noise(n, size, rng)
    stars = rng.random((n, 1, size, size), dtype=np.float32) < 0.035
    return np.where(stars, _rgb(235, 235, 200), sky)


SCENES: dict[str, Scene] = {
    "beach": beach,
    "grass": grass,
    "snow": snow,
    "street": street,
    "studio": studio,
    "night": night,
}
assert tuple(SCENES) == BACKGROUNDS, "one scene generator per background word, in vocabulary order"


def draw_backgrounds(background_idx: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """``float32 [N, 3, size, size]`` in 0..255: each image gets a fresh scene of its background.

    The loop is over the 6 scene kinds, not over images: each generator draws its whole sub-batch at once.
    """
    out = np.empty((len(background_idx), 3, size, size), dtype=np.float32)
    for b, scene in enumerate(SCENES.values()):
        where = np.flatnonzero(background_idx == b)
        if len(where):
            out[where] = scene(len(where), size, rng)
    return out
