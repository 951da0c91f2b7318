"""A catalog product of the fashion world: which garment, in which colourway (the writing side's unit)."""

from __future__ import annotations

from dataclasses import dataclass

from factory.world.attributes import CATEGORIES, COLOURS, NO_PATTERN_COLOUR, NONE_WORD, PATTERNS, caption
from factory.world.fashion_mnist import FashionSplit


@dataclass(frozen=True)
class Product:
    """One catalog concept: a specific garment in its own colourway (indices into the attribute tuples)."""

    concept_id: str
    category: int
    garment_index: int
    colour: int
    pattern: int
    pattern_colour: int  # NO_PATTERN_COLOUR for plain products
    group: int
    split: FashionSplit = "test"

    @property
    def parent(self) -> str:
        return CATEGORIES[self.category]

    @property
    def colourway(self) -> tuple[int, int, int]:
        return (self.colour, self.pattern, self.pattern_colour)

    @property
    def caption(self) -> str:
        """The hand-written caption a person would give it, without scene: "a red striped dress"."""
        return caption(self.parent, COLOURS[self.colour], PATTERNS[self.pattern])

    def attributes(self) -> dict[str, str]:
        pc = NONE_WORD if self.pattern_colour == NO_PATTERN_COLOUR else COLOURS[self.pattern_colour]
        return {
            "category": self.parent,
            "colour": COLOURS[self.colour],
            "pattern": PATTERNS[self.pattern],
            "pattern_colour": pc,
            "garment": str(self.garment_index),
            "group": f"g{self.group:04d}",
        }
