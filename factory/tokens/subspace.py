"""The attribute subspace of a parent class.

``A`` stacks the input embeddings of the vocabulary's attribute words (a word split into several BPE
pieces contributes the mean of its pieces) and the parent word's own embedding. ``U`` is an orthonormal
basis of span(A) from an SVD, dropping directions whose singular value is below ``rank_tol`` times the
largest: near-duplicate words would otherwise add numerically meaningless directions. A token kept in
this span cannot drift to an arbitrary point of R^d, which is what keeps it composable with words.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable

import torch

from factory.errors import EmptyVocabulary, UnknownWord
from factory.tokens.vocabulary import AttributeVocabulary


@dataclass
class Subspace:
    basis: torch.Tensor  # [d, k], orthonormal columns
    parent_embedding: torch.Tensor  # [d]
    basis_id: str
    words: list[str]
    unknown_words: list[str] = field(default_factory=list)

    @property
    def rank(self) -> int:
        return self.basis.shape[1]

    @property
    def dim(self) -> int:
        return self.basis.shape[0]

    def project(self, v: torch.Tensor) -> torch.Tensor:
        """Orthogonal projection of vectors [..., d] onto the span."""
        return (v @ self.basis) @ self.basis.T

    def coefficients(self, v: torch.Tensor) -> torch.Tensor:
        return v @ self.basis


def build_subspace(
    word_embedding: Callable[[str], torch.Tensor],
    vocabulary: AttributeVocabulary,
    parent: str,
    *,
    rank_tol: float = 1e-4,
    salt: str = "",
) -> Subspace:
    """Build the subspace of ``parent`` from ``vocabulary``.

    ``word_embedding(word) -> [d]`` is the backbone's mean-of-pieces embedding; it raises UnknownWord for
    words the backbone cannot spell, which are skipped here (and listed) unless nothing is left.
    ``salt`` (e.g. the backbone fingerprint) goes into ``basis_id`` so ids never collide across backbones.
    """
    e_p = word_embedding(parent).detach().float()  # an unknown parent is the caller's error: let it raise
    rows, used, unknown = [], [], []
    for w in vocabulary.words():
        try:
            rows.append(word_embedding(w).detach().float())
            used.append(w)
        except UnknownWord:
            unknown.append(w)
    if not rows:
        raise EmptyVocabulary(
            f"attribute vocabulary {vocabulary.name!r} has no word this backbone knows "
            f"({len(unknown)} unknown, e.g. {unknown[:5]}); add words the backbone's vocabulary contains"
        )
    a = torch.stack(rows + [e_p]).double()  # [n+1, d]
    u, s, _ = torch.linalg.svd(a.T, full_matrices=False)
    rank = int((s > rank_tol * s[0]).sum())
    basis = u[:, :rank].float().contiguous()
    # The basis bytes too: an id must name one basis, and an SVD's signs and rotation may differ between
    # LAPACK builds and devices (the learner builds every basis on the CPU in float64 for that reason).
    h = hashlib.sha256("\n".join([salt, parent, *used]).encode())
    h.update(basis.numpy().tobytes())
    digest = h.hexdigest()[:12]
    return Subspace(basis, e_p, f"{vocabulary.name}/{parent}/{digest}", used, unknown)
