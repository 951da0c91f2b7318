"""Two parametrisations of C concept tokens learned together.

* projected: ``v_c = U_c c_c`` with one coefficient tensor [C, k]. Concepts of different parents have
  subspaces of different rank; bases are zero-padded to the largest k, and a padded coefficient has a
  zero column in U, so its gradient is exactly zero and it never moves.
* free: ``v_c`` anywhere in R^d (the ablation).

Both start at the parent word's embedding (``c0 = Uᵀ e_p``, and e_p lies in the span by construction).
"""

from __future__ import annotations

import torch
from torch import nn

from factory.tokens.subspace import Subspace


class TokenParameters(nn.Module):
    def __init__(self, init: torch.Tensor, subspaces: list[Subspace] | None = None):
        """``init`` [C, d] start vectors; ``subspaces`` (one per concept) selects the projected mode."""
        super().__init__()
        self.projected = subspaces is not None
        self.register_buffer("init_vectors", init.detach().clone().float())
        if self.projected:
            if len(subspaces) != init.shape[0]:
                raise ValueError(f"{len(subspaces)} subspaces for {init.shape[0]} tokens")
            k = max(s.rank for s in subspaces)
            # On init's device: built on the CPU beside a GPU ``init`` this crashed the first GPU step.
            bases = init.new_zeros(len(subspaces), init.shape[1], k, dtype=torch.float32)
            for i, s in enumerate(subspaces):
                bases[i, :, : s.rank] = s.basis.to(bases)  # a subspace's basis lives on the CPU
            self.register_buffer("bases", bases)
            self.ranks = [s.rank for s in subspaces]
            self.coefficients = nn.Parameter(torch.einsum("cdk,cd->ck", bases, self.init_vectors))
        else:
            self.vectors_free = nn.Parameter(self.init_vectors.clone())

    @property
    def mode(self) -> str:
        return "projected" if self.projected else "free"

    def forward(self) -> torch.Tensor:
        """The C token vectors [C, d]."""
        if self.projected:
            return torch.einsum("cdk,ck->cd", self.bases, self.coefficients)
        return self.vectors_free

    @torch.no_grad()
    def bound_norms_(self, max_norm: float) -> None:
        """Scale every token longer than ``max_norm`` back to it, in place. Both modes are linear in their
        parameters, so scaling the coefficients (or the free vector) scales the token."""
        norms = self.forward().norm(dim=-1, keepdim=True)
        scale = (max_norm / norms.clamp_min(1e-12)).clamp(max=1.0)
        (self.coefficients if self.projected else self.vectors_free).mul_(scale)

    def coefficients_cpu(self) -> list[list[float]] | None:
        """Every concept's coefficients (its own rank's), from one host copy."""
        if not self.projected:
            return None
        rows = self.coefficients.detach().cpu().tolist()
        return [r[:rank] for r, rank in zip(rows, self.ranks)]

    def coefficients_of(self, i: int) -> list[float] | None:
        if not self.projected:
            return None
        return self.coefficients[i, : self.ranks[i]].detach().cpu().tolist()
