"""Prompt tokenisation with concept markers, on the CLIP BPE vocabulary that open_clip ships.

Each marker becomes one *placeholder id* and its position is recorded; at encode time the embedding
rows at those positions are replaced by learned vectors (see `injection.py`). The vocabulary never
grows and no embedding table is resized, so one frozen text encoder serves any number of concepts.

Text between markers is BPE-encoded piece by piece. CLIP's BPE splits on whitespace and punctuation
first, so encoding the pieces separately gives exactly the ids of the whole string.

A backbone may *trim* its embedding table to the BPE ids its world uses (the embedded default does,
to keep its weights small): `keep_ids` maps those BPE ids to compact row numbers, and any other piece
is an `UnknownWord`.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
from dataclasses import dataclass, field
from typing import Sequence

import torch

from factory.errors import PromptTooLong, UnknownWord
from factory.tokens.markers import split_on_markers


@functools.lru_cache(maxsize=1)
def _bpe():
    # Imported lazily: open_clip pulls in timm/torchvision, which is slow to import.
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


@dataclass
class PromptBatch:
    """Token ids of a batch of prompts plus where their concept markers sit.

    ``marker_rows[i], marker_cols[i]`` is the position of the i-th marker, ``marker_slots[i]`` the index
    of its concept in ``concept_ids`` (unique, in order of first appearance). ``eot_positions`` is the
    true end-of-text position of each row — pooling must use it, never ``argmax(ids)``.
    """

    input_ids: torch.Tensor
    eot_positions: torch.Tensor
    marker_rows: torch.Tensor
    marker_cols: torch.Tensor
    marker_slots: torch.Tensor
    concept_ids: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def take(self, rows: torch.Tensor | Sequence[int]) -> "PromptBatch":
        """The sub-batch of ``rows`` (in that order), its concept slots re-numbered by first appearance.

        The learner encodes only a step's prompts (active concepts, sampled templates) out of one batch
        tokenised up front: selecting rows is cheaper than tokenising again at every step.
        """
        b, rows = self.to("cpu"), torch.as_tensor(rows, dtype=torch.long).cpu()
        new_row = torch.full((len(b),), -1, dtype=torch.long)
        new_row[rows] = torch.arange(len(rows))
        keep = new_row[b.marker_rows] >= 0
        m_rows, m_cols, old = new_row[b.marker_rows[keep]], b.marker_cols[keep], b.marker_slots[keep]
        order = torch.argsort(m_rows * b.input_ids.shape[1] + m_cols)  # row-major, as `tokenize` lists them
        m_rows, m_cols, old = m_rows[order], m_cols[order], old[order]
        firsts = list(dict.fromkeys(old.tolist()))
        renumber = {s: i for i, s in enumerate(firsts)}
        slots = torch.tensor([renumber[s] for s in old.tolist()], dtype=torch.long)
        return PromptBatch(
            b.input_ids[rows], b.eot_positions[rows], m_rows, m_cols, slots, [b.concept_ids[s] for s in firsts]
        )

    def to(self, device) -> "PromptBatch":
        """The batch on ``device`` (itself when it is there already: the learner moves its batch once, and
        a copy per step was five blocking host-to-device copies on a GPU)."""
        from factory.device import to_device

        device = torch.device(device)
        if self.input_ids.device.type == device.type:
            return self
        return PromptBatch(
            to_device(self.input_ids, device),
            to_device(self.eot_positions, device),
            to_device(self.marker_rows, device),
            to_device(self.marker_cols, device),
            to_device(self.marker_slots, device),
            list(self.concept_ids),
        )


class PromptTokenizer:
    """CLIP BPE tokeniser that understands `<concept:ID>` markers.

    Args:
        context_length: rows are padded to this length; longer prompts raise `PromptTooLong`.
        pad: "eot" pads with the end-of-text id (OpenAI CLIP / SD 1.x tokenizers), "zero" with id 0
            (open_clip / SD 2.x). It matters for diffusion: the UNet attends to padded positions too.
        keep_ids: optional list of BPE ids kept by a trimmed embedding table (row i = keep_ids[i]).
        placeholder: BPE id written at marker positions before injection. Start-of-text is used by
            default because every CLIP vocabulary (trimmed or not) has it and its row is overwritten anyway.
    """

    def __init__(
        self,
        context_length: int = 77,
        pad: str = "eot",
        keep_ids: list[int] | None = None,
        placeholder: int | None = None,
    ):
        if pad not in ("eot", "zero"):
            raise ValueError(f"pad must be 'eot' or 'zero', got {pad!r}")
        bpe = _bpe()
        self.context_length = context_length
        self.sot_bpe, self.eot_bpe = bpe.sot_token_id, bpe.eot_token_id
        self.keep_ids = list(keep_ids) if keep_ids is not None else None
        self._compact = {b: i for i, b in enumerate(self.keep_ids)} if self.keep_ids is not None else None
        self.sot_id = self._to_row(self.sot_bpe, "<start_of_text>")
        self.eot_id = self._to_row(self.eot_bpe, "<end_of_text>")
        self.pad_id = self.eot_id if pad == "eot" else self._to_row(0, "!")
        self.placeholder_id = self.sot_id if placeholder is None else self._to_row(placeholder, "placeholder")

    @property
    def vocab_size(self) -> int:
        return len(self.keep_ids) if self.keep_ids is not None else _bpe().vocab_size

    def _to_row(self, bpe_id: int, what: str) -> int:
        if self._compact is None:
            return bpe_id
        try:
            return self._compact[bpe_id]
        except KeyError:
            raise UnknownWord(f"{what!r} (BPE id {bpe_id}) is not in this backbone's trimmed vocabulary") from None

    def bpe_ids(self, text: str) -> list[int]:
        """Raw CLIP BPE ids of plain text (no markers, no start/end tokens)."""
        return _bpe().encode(text)

    def encode_text(self, text: str) -> list[int]:
        """Embedding-row ids of plain text; raises UnknownWord for pieces a trimmed table lacks."""
        ids = self.bpe_ids(text)
        if self._compact is None:
            return ids
        missing = [i for i in ids if i not in self._compact]
        if missing:
            pieces = " ".join(_bpe().decode([i]).strip() for i in missing)
            raise UnknownWord(f"{text!r} has pieces outside this backbone's vocabulary: {pieces}")
        return [self._compact[i] for i in ids]

    def word_ids(self, word: str) -> list[int]:
        """Row ids of one word's BPE pieces; UnknownWord if it has none (blank) or any unknown piece."""
        ids = self.encode_text(word)
        if not ids:
            raise UnknownWord(f"{word!r} has no tokens")
        return ids

    def __call__(self, prompts: list[str] | str) -> PromptBatch:
        return self.tokenize(prompts)

    def tokenize(self, prompts: list[str] | str) -> PromptBatch:
        if isinstance(prompts, str):
            prompts = [prompts]
        n, length = len(prompts), self.context_length
        ids = torch.full((n, length), self.pad_id, dtype=torch.long)
        eot = torch.empty(n, dtype=torch.long)
        rows, cols, slots = [], [], []
        concept_ids: list[str] = []
        slot_of: dict[str, int] = {}
        for r, prompt in enumerate(prompts):
            texts, markers = split_on_markers(prompt)
            seq = [self.sot_id] + self.encode_text(texts[0])
            for cid, text in zip(markers, texts[1:]):
                if cid not in slot_of:
                    slot_of[cid] = len(concept_ids)
                    concept_ids.append(cid)
                rows.append(r)
                cols.append(len(seq))
                slots.append(slot_of[cid])
                seq.append(self.placeholder_id)
                seq.extend(self.encode_text(text))
            seq.append(self.eot_id)
            if len(seq) > length:
                raise PromptTooLong(
                    f"prompt has {len(seq)} tokens, more than the context length {length}: shorten it: {prompt!r}"
                )
            ids[r, : len(seq)] = torch.tensor(seq)
            eot[r] = len(seq) - 1
        as_long = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
        return PromptBatch(ids, eot, as_long(rows), as_long(cols), as_long(slots), concept_ids)

    def write_hf_files(self, directory: str) -> None:
        """Write `vocab.json` + `merges.txt` of the full CLIP BPE, the files HF's CLIPTokenizer reads.

        Lets a tokenfactory backbone be exported as a diffusers pipeline (and lets tests build one).
        Only meaningful for an untrimmed vocabulary.
        """
        if self.keep_ids is not None:
            raise ValueError("a trimmed vocabulary has no HF tokenizer files")
        from open_clip.tokenizer import bytes_to_unicode, default_bpe

        merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
        vocab = list(bytes_to_unicode().values())
        vocab += [v + "</w>" for v in vocab]
        vocab += ["".join(m.split()) for m in merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump({t: i for i, t in enumerate(vocab)}, f, ensure_ascii=False)
        with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
