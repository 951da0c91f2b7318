"""The concepts one learner call learns together, and their tensors: the type the learner builds and the
objective reads (`factory.learner`, `factory.objective`), kept apart so both can name it."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ConceptData:
    """What the learner needs of one concept: normalised-or-not image features and optional latents."""

    concept_id: str
    parent: str
    image_features: torch.Tensor  # [n, D]
    latents: torch.Tensor | None = None  # [n, c, h, w] in the UNet's input space


@dataclass
class NegativeBank:
    """Image features of a parent class; rows owned by the concept being learned are masked out."""

    features: torch.Tensor  # [m, D]
    owners: list[str]  # concept id of each row ("" for distractors owned by no concept)


@dataclass
class ConceptGroup:
    """The concepts learned together and their tensors; row i of each tensor is concept i."""

    concepts: list[ConceptData]
    pos: torch.Tensor  # [C, N, D] normalised own-image features, ``pos_mask`` [C, N] valid rows
    pos_mask: torch.Tensor
    neg: torch.Tensor  # [C, M, D] the parent's negative bank less the concept's own rows
    neg_mask: torch.Tensor
    init: torch.Tensor  # [C, d] the parent words' embeddings
    gens: list[torch.Generator]  # TI samples, one generator per concept (host generators: see the objective)
    template_gens: list[torch.Generator]  # sampled templates (apart, so TI samples do not depend on them)

    def take(self, idx: list[int]) -> "ConceptGroup":
        from factory.device import to_device

        t = to_device(torch.as_tensor(idx, dtype=torch.long), self.pos.device)
        return ConceptGroup(
            [self.concepts[i] for i in idx],
            self.pos[t],
            self.pos_mask[t],
            self.neg[t],
            self.neg_mask[t],
            self.init[t],
            [self.gens[i] for i in idx],
            [self.template_gens[i] for i in idx],
        )
