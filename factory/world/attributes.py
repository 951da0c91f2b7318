"""The fashion world's words: garment categories, colours, patterns and background scenes.

Every list here is also in ``factory/tokens/vocabularies/fashion.json`` (the attribute vocabulary whose
word embeddings span a fashion token's subspace), so a token learned on this world can be expressed in the
same words its captions use; ``tests/factory/world`` checks that the two agree. Indices into these tuples
are what the renderer and the catalog store; words only appear in captions and catalog attributes.
"""

from __future__ import annotations

import numpy as np

# The 10 Fashion-MNIST classes, in label order 0..9, spelled as parent words (lowercase, hyphenated) so
# they are valid ``ParentWord`` values and single natural words in a prompt ("ankle boot" -> "boot").
CATEGORIES: tuple[str, ...] = (
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
COLOURS: tuple[str, ...] = (
    "red",
    "orange",
    "yellow",
    "green",
    "blue",
    "purple",
    "pink",
    "brown",
    "black",
    "white",
)
PATTERNS: tuple[str, ...] = ("plain", "striped", "dotted", "checked", "zigzag")
BACKGROUNDS: tuple[str, ...] = ("beach", "grass", "snow", "street", "studio", "night")

PLAIN = PATTERNS.index("plain")
NO_PATTERN_COLOUR = -1  # the pattern colour of a plain garment: there is none
NONE_WORD = "none"  # how NO_PATTERN_COLOUR is spelled in catalog attributes

# Fill colours, sRGB. Chosen to be far apart from each other at 32 px once modulated by the garment's
# texture (which darkens them by up to ~40%): e.g. brown is a warm mid-dark, not a dark orange.
COLOUR_RGB: np.ndarray = np.array(
    [
        (220, 30, 35),  # red
        (250, 140, 20),  # orange
        (250, 225, 40),  # yellow
        (40, 170, 60),  # green
        (35, 85, 225),  # blue
        (135, 50, 185),  # purple
        (250, 130, 190),  # pink
        (120, 70, 30),  # brown
        (25, 25, 28),  # black
        (248, 248, 245),  # white
    ],
    dtype=np.float32,
)

# The natural preposition for each scene, so captions read "in the snow" and "at night", not "on the night".
BACKGROUND_PHRASES: tuple[str, ...] = (
    "on the beach",
    "on the grass",
    "in the snow",
    "on the street",
    "in the studio",
    "at night",
)


def article(word: str) -> str:
    """'an' before a vowel, else 'a'."""
    return "an" if word[0] in "aeiou" else "a"


def caption(category: str, colour: str, pattern: str = "plain", background: str | None = None) -> str:
    """The hand-written caption of a render: ``"a red striped dress on the beach"``.

    A plain pattern is left out ("a red dress"), as a person would; ``background=None`` leaves the scene
    out too, which is the concept-level caption of a catalog product ("a red striped dress").
    """
    for word, allowed, kind in (
        (category, CATEGORIES, "category"),
        (colour, COLOURS, "colour"),
        (pattern, PATTERNS, "pattern"),
    ):
        if word not in allowed:
            raise ValueError(f"unknown {kind} {word!r}; known: {', '.join(allowed)}")
    words = [colour] if pattern == "plain" else [colour, pattern]
    text = f"{article(words[0])} {' '.join(words)} {category}"
    if background is not None:
        if background not in BACKGROUNDS:
            raise ValueError(f"unknown background {background!r}; known: {', '.join(BACKGROUNDS)}")
        text += " " + BACKGROUND_PHRASES[BACKGROUNDS.index(background)]
    return text


def background_phrase(background: str) -> str:
    """``"in the snow"`` for ``"snow"``: the intent text of a composite query."""
    if background not in BACKGROUNDS:
        raise ValueError(f"unknown background {background!r}; known: {', '.join(BACKGROUNDS)}")
    return BACKGROUND_PHRASES[BACKGROUNDS.index(background)]
