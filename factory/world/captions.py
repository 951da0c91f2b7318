"""Caption variety for pretraining: partial captions and prompt-template prefixes.

Full captions name every attribute at once. Mixing in captions that name only some of them (always the
category) teaches CLIP each attribute word on its own, and template prefixes ("a photo of …") teach it
the wording the learner's prompt templates use.
"""

from __future__ import annotations

import numpy as np

from factory.world.attributes import (
    BACKGROUND_PHRASES,
    BACKGROUNDS,
    CATEGORIES,
    COLOURS,
    PATTERNS,
    PLAIN,
    article,
)

PREFIXES = ("", "a photo of ", "an image of ", "a close-up photo of ", "a picture of ")


def partial_caption(renders, i: int, rng: np.random.Generator) -> str:
    """A caption of render ``i`` naming its category and a random subset of its other attributes."""
    words = []
    if rng.random() < 0.5:
        words.append(COLOURS[int(renders.colour[i])])
    if int(renders.pattern[i]) != PLAIN and rng.random() < 0.5:
        words.append(PATTERNS[int(renders.pattern[i])])
    words.append(CATEGORIES[int(renders.category[i])])
    text = f"{article(words[0])} {' '.join(words)}"
    if rng.random() < 0.5:
        text += " " + BACKGROUND_PHRASES[int(renders.background[i])]
    prefix = PREFIXES[int(rng.integers(len(PREFIXES)))]
    return prefix + text


def world_words() -> list[str]:
    """Every word the world's captions, prompt templates and composite queries use."""
    words = set(CATEGORIES) | set(COLOURS) | set(PATTERNS) | set(BACKGROUNDS)
    for phrase in BACKGROUND_PHRASES + PREFIXES:
        words |= set(phrase.split())
    return sorted(words)
