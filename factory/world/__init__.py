"""The fashion world: real Fashion-MNIST garments rendered in colours, patterns and scenes, with captions.

Pure NumPy + PIL (no torch, no Ray), vectorised and deterministic by seed. It feeds the pretraining of the
embedded ``fashion-mini`` backbone (``FashionWorld.sample``) and provides the sample catalog used by the
demo, the tests and the benchmarks (``write_catalog``; `factory.catalogs` reads it back).
"""

from factory.world.attributes import (
    BACKGROUND_PHRASES,
    BACKGROUNDS,
    CATEGORIES,
    COLOUR_RGB,
    COLOURS,
    NO_PATTERN_COLOUR,
    PATTERNS,
    caption,
)
from factory.world.catalog import write_catalog
from factory.world.fashion_mnist import FashionMNISTMissing, load_fashion_mnist
from factory.world.products import Product
from factory.world.render import FashionWorld, Renders, render

__all__ = [
    "BACKGROUNDS",
    "BACKGROUND_PHRASES",
    "CATEGORIES",
    "COLOURS",
    "COLOUR_RGB",
    "NO_PATTERN_COLOUR",
    "PATTERNS",
    "FashionMNISTMissing",
    "FashionWorld",
    "Product",
    "Renders",
    "caption",
    "load_fashion_mnist",
    "render",
    "write_catalog",
]
