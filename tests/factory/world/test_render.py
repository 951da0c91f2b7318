"""The renderer and the world's words: deterministic, fast, correctly labelled, visibly different."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

import factory.world.fashion_mnist as fm
from factory.world import (
    BACKGROUND_PHRASES,
    BACKGROUNDS,
    CATEGORIES,
    COLOURS,
    PATTERNS,
    FashionMNISTMissing,
    FashionWorld,
    caption,
    load_fashion_mnist,
    render,
)
from factory.world.scenes import draw_backgrounds

VOCAB = Path(__file__).parents[3] / "factory" / "tokens" / "vocabularies" / "fashion.json"


def _garments(n: int, seed: int = 0) -> np.ndarray:
    images, _ = load_fashion_mnist("train")
    return images[np.random.default_rng(seed).integers(0, len(images), n)]


def test_categories_are_the_fashion_mnist_classes_and_in_the_vocabulary() -> None:
    assert CATEGORIES == (
        "t-shirt",
        "trousers",
        "pullover",
        "dress",
        "coat",
        "sandal",
        "shirt",
        "sneaker",
        "bag",
        "boot",
    )
    vocab = json.loads(VOCAB.read_text())
    assert set(CATEGORIES) <= set(vocab["parents"])
    assert set(COLOURS) <= set(vocab["attributes"]["colour"])
    assert set(PATTERNS) <= set(vocab["attributes"]["pattern"])
    assert list(BACKGROUNDS) == vocab["attributes"]["background"]


def test_fashion_mnist_is_cached_read_only_and_missing_files_say_how_to_install(monkeypatch, tmp_path) -> None:
    images, labels = load_fashion_mnist("test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [1000] * 10
    assert load_fashion_mnist("test")[0] is images and not images.flags.writeable
    monkeypatch.setenv(fm.ENV_VAR, str(tmp_path))
    with pytest.raises(FashionMNISTMissing, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("train")


def test_render_shape_dtype_and_determinism() -> None:
    g = _garments(16)
    idx = np.arange(16)
    args = (g, idx % 10, idx % 5, (idx + 3) % 10, idx % 6)
    a = render(*args, np.random.default_rng(7))
    b = render(*args, np.random.default_rng(7))
    c = render(*args, np.random.default_rng(8))
    assert a.shape == (16, 32, 32, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)  # the seed moves garments and redraws scenes
    assert render(*args, np.random.default_rng(7), size=48).shape == (16, 48, 48, 3)
    w1, w2 = FashionWorld(3).sample(20), FashionWorld(3).sample(20)
    np.testing.assert_array_equal(w1.images, w2.images)
    assert w1.captions == w2.captions


def test_render_rejects_bad_inputs() -> None:
    g = _garments(2)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="colour_idx out of range"):
        render(g, [0, 10], [0, 0], [-1, -1], [0, 0], rng)
    with pytest.raises(ValueError, match="needs a pattern colour"):
        render(g, [0, 1], [1, 0], [-1, -1], [0, 0], rng)
    with pytest.raises(ValueError, match="one entry per garment"):
        render(g, [0], [0, 0], [-1, -1], [0, 0], rng)


def test_renders_at_least_a_thousand_images_per_second() -> None:
    world = FashionWorld(0)
    world.sample(256)  # warm the dataset cache
    start = time.perf_counter()
    r = world.sample(2000)
    rate = len(r) / (time.perf_counter() - start)
    print(f"render rate: {rate:.0f} images/s at 32x32")
    assert rate >= 1000, f"only {rate:.0f} renders/s"


def test_captions_match_labels() -> None:
    r = FashionWorld(1).sample(300)
    _, labels = load_fashion_mnist("train")
    np.testing.assert_array_equal(r.category, labels[r.garment_index])
    for i, text in enumerate(r.captions):
        cat, col, pat, bg = (
            CATEGORIES[r.category[i]],
            COLOURS[r.colour[i]],
            PATTERNS[r.pattern[i]],
            BACKGROUNDS[r.background[i]],
        )
        assert text == caption(cat, col, pat, bg)
        assert text.endswith(f" {cat} {BACKGROUND_PHRASES[r.background[i]]}")
        assert (f" {pat} " in text) == (pat != "plain")
        assert (r.pattern_colour[i] == -1) == (pat == "plain") and r.pattern_colour[i] != r.colour[i]
    assert caption("dress", "red", "striped", "beach") == "a red striped dress on the beach"
    assert caption("dress", "red", "plain", "beach") == "a red dress on the beach"
    assert caption("coat", "orange", "plain", "night") == "an orange coat at night"
    assert caption("boot", "black", "dotted") == "a black dotted boot"
    with pytest.raises(ValueError, match="unknown colour"):
        caption("dress", "mauve")


def test_colours_give_visibly_different_garments() -> None:
    g = _garments(40, seed=2)
    n = len(g)
    plain, studio = np.zeros(n, int), np.full(n, BACKGROUNDS.index("studio"))
    # Same rng seed: same placement and scene, so only the garment pixels differ between colours.
    renders = [
        render(g, np.full(n, c), plain, np.full(n, -1), studio, np.random.default_rng(0)).astype(float)
        for c in range(len(COLOURS))
    ]
    garment = np.abs(renders[COLOURS.index("red")] - renders[COLOURS.index("blue")]).max(-1) > 40
    means = np.stack([img[garment].mean(0) for img in renders])  # [10, 3] mean RGB over garment pixels
    dist = np.linalg.norm(means[:, None] - means[None], axis=-1)
    assert dist[~np.eye(len(COLOURS), dtype=bool)].min() > 30, np.round(dist)
    red, green, blue = means[0], means[3], means[4]
    assert red.argmax() == 0 and green.argmax() == 1 and blue.argmax() == 2


def test_patterns_and_backgrounds_change_the_image() -> None:
    g = _garments(30, seed=4)
    n = len(g)
    zeros = np.zeros(n, int)

    def draw(pattern: int = 0, background: int = 4) -> np.ndarray:
        pc = np.full(n, -1 if pattern == 0 else COLOURS.index("white"))
        return render(g, zeros, np.full(n, pattern), pc, np.full(n, background), np.random.default_rng(0))

    plain = draw().astype(float)
    for p in range(1, len(PATTERNS)):
        assert np.abs(draw(pattern=p) - plain).mean() > 5, PATTERNS[p]

    def scene_stats(b: int) -> np.ndarray:  # mean colour and roughness of the scene
        x = draw_backgrounds(np.full(50, b), 32, np.random.default_rng(b)).astype(float)
        return np.append(x.reshape(-1, 3).mean(0), 5 * np.abs(np.diff(x, axis=2)).mean())

    stats = [scene_stats(b) for b in range(len(BACKGROUNDS))]
    assert min(np.linalg.norm(a - b) for i, a in enumerate(stats) for b in stats[i + 1 :]) > 20


@pytest.mark.parametrize("pattern", [p for p in PATTERNS if p != "plain"])
def test_pattern_colour_is_a_minority_of_the_garment(pattern: str) -> None:
    # The caption names one colour, so it must be the garment's majority colour: count the garment pixels
    # of red garments with a blue pattern that came out nearer blue than red.
    n = 64
    g = _garments(n, seed=1)
    red, blue = COLOURS.index("red"), COLOURS.index("blue")
    images = render(
        g,
        np.full(n, red),
        np.full(n, PATTERNS.index(pattern)),
        np.full(n, blue),
        np.full(n, BACKGROUNDS.index("studio")),
        np.random.default_rng(0),
    ).astype(np.float32)
    plain = render(
        g,
        np.full(n, red),
        np.zeros(n, int),
        np.full(n, -1),
        np.full(n, BACKGROUNDS.index("studio")),
        np.random.default_rng(0),
    ).astype(np.float32)
    garment = (
        np.abs(
            plain
            - render(
                g,
                np.full(n, blue),
                np.zeros(n, int),
                np.full(n, -1),
                np.full(n, BACKGROUNDS.index("studio")),
                np.random.default_rng(0),
            )
        ).sum(-1)
        > 60
    )  # pixels the fill colour reaches
    bluish = images[..., 2] - images[..., 0] > 0
    share = bluish[garment].mean()
    assert 0.1 < share < 0.42, f"{pattern}: {share:.2f} of the garment is in the pattern colour"


def test_hard_negative_groups_share_all_but_one_attribute() -> None:
    r = FashionWorld(5).sample(400, group_size=4)
    attrs = {"garment": r.garment_index, "colour": r.colour, "pattern": r.pattern, "background": r.background}
    varied_kinds = set()
    for g in range(0, 400, 4):
        differing = [k for k, a in attrs.items() if len(set(a[g : g + 4].tolist())) > 1]
        assert len(differing) <= 1, f"group {g // 4} differs in {differing}"
        varied_kinds.update(differing)
        # A pattern colour is never the fill and only plain garments have none, in groups as elsewhere.
        assert all((r.pattern_colour[i] == -1) == (r.pattern[i] == 0) for i in range(g, g + 4))
        assert all(r.pattern_colour[i] != r.colour[i] for i in range(g, g + 4))
    assert varied_kinds == set(attrs)  # each kind of hard negative occurs
    assert r.captions == [
        caption(CATEGORIES[c], COLOURS[k], PATTERNS[p], BACKGROUNDS[b])
        for c, k, p, b in zip(r.category, r.colour, r.pattern, r.background)
    ]


def test_group_size_one_is_the_plain_sampler() -> None:
    a, b = FashionWorld(6).sample(50), FashionWorld(6).sample(50, group_size=1)
    np.testing.assert_array_equal(a.images, b.images)
    assert a.captions == b.captions
    with pytest.raises(ValueError, match="group_size must be at least 1"):
        FashionWorld(6).sample(8, group_size=0)
