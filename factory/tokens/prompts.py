"""The prompts that stand for a concept: the learner trains on them and classification scores with them.

Kept apart from the learner so that whoever only needs the prompts (the service's classifier, the
evaluation's baselines, vocabulary trimming) does not import the optimisation code.
"""

from __future__ import annotations

from typing import Sequence

DEFAULT_TEMPLATES = (
    "a photo of a {concept} {parent}",
    "a {concept} {parent}",
    "a close-up photo of the {concept} {parent}",
    "an image of a {concept} {parent}",
)


def template_prompts(concept: str, parent: str, templates: Sequence[str] = DEFAULT_TEMPLATES) -> list[str]:
    """The templates filled with a concept phrase (a marker, or "" for the parent word alone) and the parent
    word, whitespace collapsed: the prompts that stand for a concept when classifying."""
    return [" ".join(t.format(concept=concept, parent=parent).split()) for t in templates]


__all__ = ["DEFAULT_TEMPLATES", "template_prompts"]
