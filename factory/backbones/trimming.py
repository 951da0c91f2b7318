"""Trimmed vocabularies: keep only the embedding rows of the BPE ids a small world uses.

The embedded default's world has a few hundred words; a full 49,408-row CLIP embedding table would be
most of its weights. A trimmed table keeps the start/end-of-text ids and the BPE pieces of a word list,
in ascending BPE order; anything else is an `UnknownWord` at tokenisation time.
"""

from __future__ import annotations

from typing import Iterable

from factory.tokens.tokenizer import PromptTokenizer

# Words beyond the attribute vocabularies that prompts, templates and queries commonly use.
PROMPT_WORDS = (
    "a an the of on in at with and or photo image picture close-up close up its his her their this that "
    "background colour color style wearing product item shown showing some one two , . ! - ' :"
).split()


def keep_ids_for(words: Iterable[str]) -> list[int]:
    """Sorted BPE ids: start/end of text, id 0 (open_clip's pad), and every piece of every word."""
    tok = PromptTokenizer()
    ids = {tok.sot_bpe, tok.eot_bpe, 0}
    for w in words:
        ids.update(tok.bpe_ids(w))
    return sorted(ids)


def fashion_mini_words() -> list[str]:
    """The word list of the embedded default: its world, its attribute vocabularies, prompt words."""
    from factory.tokens import get_vocabulary, list_vocabularies
    from factory.tokens.prompts import DEFAULT_TEMPLATES
    from factory.world.captions import world_words

    words = set(world_words()) | set(PROMPT_WORDS)
    for name in list_vocabularies():
        vocab = get_vocabulary(name)
        words |= set(vocab.words()) | set(vocab.parents)
    for t in DEFAULT_TEMPLATES:
        words |= set(t.replace("{concept}", "").replace("{parent}", "").split())
    return sorted(words)
