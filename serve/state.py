"""A registry version made ready to serve: token vectors, and the text embedding of every concept.

Plain Python and torch (no Ray), so it is tested directly. A replica holds one `TokenState` at a time
and swaps the reference to a new one after it is fully built: a request that already holds the old
state finishes on it, which is what makes reloads lose no request.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from factory.backbones import Backbone
from factory.errors import TokenFactoryError
from factory.evaluation import class_embeddings
from factory.registry import TokenRegistry
from factory.tokens import marker
from factory.tokens.prompts import template_prompts
from schemas import TokenRecord

log = logging.getLogger("tokenfactory.serve")


class IncompatibleRegistry(TokenFactoryError, ValueError):
    """A registry version learned on other backbone weights than the ones being served."""

    http_status, code = 409, "incompatible_registry"


@dataclass
class TokenState:
    version: int
    records: dict[str, TokenRecord]
    tokens: dict[str, torch.Tensor]
    class_ids: list[str] = field(default_factory=list)
    class_matrix: torch.Tensor | None = None  # [K, D] normalised text embedding of each concept
    by_parent: dict[str, np.ndarray] = field(default_factory=dict)  # parent -> rows of class_matrix

    @classmethod
    def load(
        cls, registry: TokenRegistry, version: int | None, backbone: Backbone, with_classes: bool = True
    ) -> TokenState:
        if version is None:  # start-up: the newest version that verifies (a corrupt newest one is skipped)
            opened, skipped = registry.newest_readable()
            for v, why in skipped.items():
                log.error("registry version %d is unreadable, serving %d instead: %s", v, opened.version, why)
        else:
            opened = registry.open(version)
        records = {r.concept_id: r for r in opened.records()}
        fingerprint = backbone.fingerprint()
        wrong = [r.concept_id for r in records.values() if r.backbone_fingerprint != fingerprint]
        if wrong:
            raise IncompatibleRegistry(
                f"registry version {opened.version}: {len(wrong)} tokens (e.g. {wrong[0]!r}) were learned on other "
                f"weights than the served backbone {backbone.name!r} ({fingerprint[:12]}); serve the backbone they "
                "were learned on"
            )
        tokens = {c: torch.tensor(r.vector, dtype=torch.float32) for c, r in records.items()}
        state = cls(opened.version, records, tokens)
        if with_classes and records:
            state.class_ids = sorted(records)
            prompts = [template_prompts(marker(c), records[c].parent) for c in state.class_ids]
            with torch.no_grad():
                state.class_matrix = class_embeddings(backbone, prompts, tokens)
            parents: dict[str, list[int]] = {}
            for i, c in enumerate(state.class_ids):
                parents.setdefault(records[c].parent, []).append(i)
            state.by_parent = {p: np.array(rows) for p, rows in parents.items()}
        return state

    def classify(self, features: np.ndarray, parent: str | None, top_k: int) -> list[tuple[str, str, float]]:
        """(concept id, parent, cosine) of the best ``top_k`` concepts for one image feature."""
        if self.class_matrix is None:
            return []
        rows = self.by_parent.get(parent) if parent is not None else np.arange(len(self.class_ids))
        if rows is None:
            return []
        f = F.normalize(torch.as_tensor(features, dtype=torch.float32).reshape(1, -1), dim=-1)
        scores = (f @ self.class_matrix[torch.as_tensor(rows)].T)[0]
        top = torch.topk(scores, min(top_k, len(rows)))
        out = []
        for s, i in zip(top.values.tolist(), top.indices.tolist()):
            cid = self.class_ids[int(rows[i])]
            out.append((cid, self.records[cid].parent, float(s)))
        return out
