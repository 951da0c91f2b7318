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


def test_local_onboarding_chunks_the_catalog_like_the_job(tmp_path, monkeypatch):
    # A concept without a usable image is skipped; the others keep the chunks the whole catalog gives.
    import factory.onboarding as onboarding
    from factory.backbones import load_backbone
    from factory.catalogs import read_concepts
    from factory.learner import LearnerConfig
    from factory.registry import TokenRegistry
    from factory.world import write_catalog

    write_catalog(str(tmp_path / "cat"), seed=3, products=6, shots=2, heldout=0, contexts=1, distractors=0)
    specs = read_concepts(str(tmp_path / "cat"))
    gone = sorted(specs, key=lambda s: (s.parent, s.concept_id))[1]
    specs = [s.model_copy(update={"image_uris": [str(tmp_path / "missing.png")]}) if s is gone else s for s in specs]
    seen = []
    real = onboarding.learn_tokens
    monkeypatch.setattr(
        onboarding,
        "learn_tokens",
        lambda bb, chunk, *a: seen.append([c.concept_id for c in chunk]) or real(bb, chunk, *a),
    )
    onboarding.learn_and_commit(
        TokenRegistry(str(tmp_path / "reg")),
        specs,
        "r",
        load_backbone("tiny-hf-clip"),
        LearnerConfig(steps=1, log_every=0),
        concepts_per_step=2,
    )
    want = [[s.concept_id for s in c if s.concept_id != gone.concept_id] for c in chunks_by_parent(specs, 2)]
    assert seen == [c for c in want if c] and len(seen[0]) == 1
