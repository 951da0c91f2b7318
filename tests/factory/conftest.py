"""Tiny random backbones of both families, built from their registered configs once per session."""

from __future__ import annotations

import pytest

from factory.backbones import load_backbone

FAMILIES = ["tiny-hf-clip", "tiny-open-clip"]


@pytest.fixture(scope="session", params=FAMILIES)
def backbone(request):
    return load_backbone(request.param)


@pytest.fixture(scope="session")
def hf_backbone():
    return load_backbone("tiny-hf-clip")
