"""`<concept:ID>` markers inside prompts.

A prompt names a learned concept with a marker, e.g. ``a photo of a <concept:sku-123> dress``. Markers are
parsed *before* tokenisation, so no BPE merge can ever split or fuse them with the words around them.
"""

from __future__ import annotations

import re

from factory.errors import MalformedMarker
from schemas import validate_concept_id

# Anything that starts like a marker; its id is validated separately so that a bad id is an error
# naming the problem rather than silently becoming ordinary text.
MARKER_PATTERN = re.compile(r"<concept:([^<>\s]*)>")
_MARKER_START = re.compile(r"<\s*concept\s*:", re.IGNORECASE)


def marker(concept_id: str) -> str:
    """The marker text for a concept id."""
    return f"<concept:{validate_concept_id(concept_id)}>"


def split_on_markers(prompt: str) -> tuple[list[str], list[str]]:
    """Split a prompt into text pieces and concept ids: ``texts[0] id[0] texts[1] id[1] ... texts[-1]``.

    Raises MalformedMarker for an invalid id or for marker-like text that is not a complete marker.
    """
    texts: list[str] = []
    ids: list[str] = []
    pos = 0
    for m in MARKER_PATTERN.finditer(prompt):
        texts.append(prompt[pos : m.start()])
        try:
            ids.append(validate_concept_id(m.group(1)))
        except ValueError as e:
            raise MalformedMarker(f"bad concept id in marker {m.group(0)!r}: {e}") from None
        pos = m.end()
    texts.append(prompt[pos:])
    for t in texts:
        if _MARKER_START.search(t):
            raise MalformedMarker(
                f"incomplete or malformed concept marker in {prompt!r}: write markers as <concept:ID>"
            )
    return texts, ids


def find_markers(prompt: str) -> list[str]:
    """Concept ids named in a prompt, in order (duplicates kept)."""
    return split_on_markers(prompt)[1]
