"""`chunks_by_parent`: the one chunking rule of the job, local onboarding and the evaluation's ablations."""
from types import SimpleNamespace

from factory.onboarding import chunks_by_parent


def _c(cid, parent):
    return SimpleNamespace(concept_id=cid, parent=parent)


CATALOG = [_c("d1", "dress"), _c("s2", "shirt"), _c("d0", "dress"), _c("s1", "shirt"), _c("s0", "shirt")]


def _ids(chunks):
    return [[c.concept_id for c in chunk] for chunk in chunks]


def test_chunks_keep_a_parent_together_whatever_the_order():
    assert _ids(chunks_by_parent(CATALOG, 2)) == [["d0", "d1"], ["s0", "s1"], ["s2"]]
    assert _ids(chunks_by_parent(list(reversed(CATALOG)), 2)) == [["d0", "d1"], ["s0", "s1"], ["s2"]]


def test_chunks_over_the_catalog_match_a_job_that_skipped_a_concept():
    # The job chunks the whole catalog, then skips d1 (too few usable images): its chunks are [d0], [s0, s1],
    # [s2]. Chunking only the concepts the registry has would give [d0, s0], [s1, s2] instead.
    learned = [c for c in CATALOG if c.concept_id != "d1"]
    assert _ids(chunks_by_parent(learned, 2)) == [["d0", "s0"], ["s1", "s2"]]
    assert _ids(chunks_by_parent(learned, 2, catalog=CATALOG)) == [["d0"], ["s0", "s1"], ["s2"]]
    assert all(c in learned for chunk in chunks_by_parent(learned, 2, catalog=CATALOG) for c in chunk)
