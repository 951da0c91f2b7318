"""Attribute vocabularies: the words whose embeddings span a parent class's token subspace.

Kept as data files (``vocabularies/*.json``), one per super-class or domain, and registered by name the
way open_clip registers model configs: files are scanned at import, `add_vocabulary` adds more at run
time (a path or a dict), `vocabulary_for_parent` picks the vocabulary that lists a parent word and
falls back to ``generic``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from factory.errors import UnknownVocabulary

_VOCAB_DIR = Path(__file__).parent / "vocabularies"
_VOCABULARIES: dict[str, "AttributeVocabulary"] = {}
FALLBACK = "generic"


@dataclass(frozen=True)
class AttributeVocabulary:
    """Attribute words grouped by kind (colour, pattern, material, …) for a set of parent words."""

    name: str
    parents: tuple[str, ...]
    attributes: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # Kinds that describe a scene or an intent ("background": beach, snow…), not the object itself. They
    # stay out of the token's basis: a token that can move along "beach" can absorb the very scene it
    # must later compose with ("a <token> dress on the beach").
    context: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, d: dict) -> "AttributeVocabulary":
        attrs = {k: tuple(v) for k, v in d.get("attributes", {}).items()}
        context = tuple(d.get("context", ()))
        unknown = [k for k in context if k not in attrs]
        if unknown:
            raise ValueError(f"vocabulary {d.get('name')!r}: context kinds {unknown} are not attribute kinds")
        return cls(name=d["name"], parents=tuple(d.get("parents", ())), attributes=attrs, context=context)

    def words(self, include_context: bool = False) -> list[str]:
        """Every attribute word once, in file order; the context kinds' words only if asked for."""
        seen: dict[str, None] = {}
        for kind, values in self.attributes.items():
            if kind in self.context and not include_context:
                continue
            for w in values:
                seen.setdefault(w, None)
        return list(seen)


def add_vocabulary(source: str | Path | dict) -> AttributeVocabulary:
    """Register a vocabulary from a JSON path or a dict; a later one replaces an earlier of that name."""
    d = json.loads(Path(source).read_text()) if not isinstance(source, dict) else source
    vocab = AttributeVocabulary.from_dict(d)
    _VOCABULARIES[vocab.name] = vocab
    return vocab


def list_vocabularies() -> list[str]:
    return sorted(_VOCABULARIES)


def get_vocabulary(name: str) -> AttributeVocabulary:
    try:
        return _VOCABULARIES[name]
    except KeyError:
        raise UnknownVocabulary(f"unknown attribute vocabulary {name!r}; known: {list_vocabularies()}") from None


def vocabulary_for_parent(parent: str) -> AttributeVocabulary:
    """The first vocabulary (by name) that lists ``parent``, else the generic one."""
    for name in list_vocabularies():
        if parent in _VOCABULARIES[name].parents:
            return _VOCABULARIES[name]
    return get_vocabulary(FALLBACK)


for _path in sorted(_VOCAB_DIR.glob("*.json")):
    add_vocabulary(_path)
