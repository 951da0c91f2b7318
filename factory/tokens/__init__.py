"""Custom tokens: prompt markers, injection into the text encoder, attribute subspaces, parametrisations."""

from factory.tokens.injection import inject, pool_at
from factory.tokens.markers import MARKER_PATTERN, find_markers, marker, split_on_markers
from factory.tokens.parametrization import TokenParameters
from factory.tokens.subspace import Subspace, build_subspace
from factory.tokens.tokenizer import PromptBatch, PromptTokenizer
from factory.tokens.vocabulary import (
    AttributeVocabulary,
    add_vocabulary,
    get_vocabulary,
    list_vocabularies,
    vocabulary_for_parent,
)

__all__ = [
    "MARKER_PATTERN",
    "find_markers",
    "marker",
    "split_on_markers",
    "PromptBatch",
    "PromptTokenizer",
    "inject",
    "pool_at",
    "AttributeVocabulary",
    "add_vocabulary",
    "get_vocabulary",
    "list_vocabularies",
    "vocabulary_for_parent",
    "Subspace",
    "build_subspace",
    "TokenParameters",
]
