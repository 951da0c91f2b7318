"""Injection: a token equal to a word's embedding must encode exactly like the word written out."""

import pytest
import torch

from factory.errors import DimensionMismatch, UnknownConceptMarker
from factory.tokens import inject


def _close(a, b):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_marker_with_a_word_vector_encodes_like_the_word(backbone):
    w = backbone.word_embedding("red")
    assert len(backbone.tokenizer.word_ids("red")) == 1
    ours = backbone.encode_prompts(["a photo of a <concept:c1> dress"], {"c1": w})
    ref = backbone.encode_prompts(["a photo of a red dress"])
    _close(ours.features, ref.features)
    _close(ours.hidden, ref.hidden)


def test_two_markers_in_one_prompt(backbone):
    tokens = {"c1": backbone.word_embedding("red"), "c2": backbone.word_embedding("coat")}
    ours = backbone.encode_prompts(
        ["a <concept:c1> dress and a blue <concept:c2>", "<concept:c2> <concept:c2>"], tokens
    )
    ref = backbone.encode_prompts(["a red dress and a blue coat", "coat coat"])
    _close(ours.features, ref.features)
    _close(ours.hidden, ref.hidden)


def test_pooling_uses_the_true_end_of_text_in_a_mixed_batch(backbone):
    # Rows of different lengths, with markers: each row must pool at its own end-of-text, exactly
    # as if encoded alone (placeholder ids must never be mistaken for the end of text).
    v = torch.randn(backbone.token_dim) * 0.1
    prompts = ["<concept:c1>", "a very long prompt about a <concept:c1> striped dress on a beach"]
    together = backbone.encode_prompts(prompts, {"c1": v}).features
    for i, p in enumerate(prompts):
        _close(together[i], backbone.encode_prompts([p], {"c1": v}).features[0])
    batch = backbone.tokenize(prompts)
    assert batch.eot_positions[0] == 2  # [sot, <c1>, eot]
    assert (batch.input_ids[torch.arange(2), batch.eot_positions] == backbone.tokenizer.eot_id).all()


def test_the_token_changes_the_pooled_feature(backbone):
    a = backbone.encode_prompts(["a <concept:c1> dress"], {"c1": backbone.word_embedding("red")}).features
    b = backbone.encode_prompts(["a <concept:c1> dress"], {"c1": backbone.word_embedding("blue")}).features
    assert not torch.allclose(a, b)


def test_injection_is_differentiable_and_touches_only_the_vectors(backbone):
    v = backbone.word_embedding("red").clone().requires_grad_(True)
    enc = backbone.encode_text(backbone.tokenize(["a <concept:c1> dress"]), v[None])
    enc.features.sum().backward()
    assert v.grad is not None and v.grad.abs().sum() > 0
    assert all(p.grad is None for p in backbone.parameters())


def test_unknown_concept_marker_names_the_concept(backbone):
    with pytest.raises(UnknownConceptMarker, match="ghost"):
        backbone.encode_prompts(["a <concept:ghost> dress"], {"c1": backbone.word_embedding("red")})


def test_wrong_vector_dimension(backbone):
    with pytest.raises(DimensionMismatch, match="another backbone"):
        backbone.encode_prompts(["a <concept:c1> dress"], {"c1": torch.zeros(backbone.token_dim + 1)})
    batch = backbone.tokenize(["a <concept:c1> dress"])
    emb = backbone.token_embedding(batch.input_ids)
    with pytest.raises(DimensionMismatch, match="expected"):
        inject(emb, batch, torch.zeros(2, backbone.token_dim))


def test_a_sub_batch_encodes_as_the_same_rows_of_the_whole(hf_backbone):
    prompts = ["a <concept:a> dress", "a photo of <concept:b>", "a plain dress", "<concept:b> and <concept:a>"]
    batch = hf_backbone.tokenize(prompts)
    vectors = torch.randn(len(batch.concept_ids), hf_backbone.token_dim)
    whole = hf_backbone.encode_text(batch, vectors).features
    rows = [3, 1, 2]
    sub = batch.take(rows)
    assert sub.concept_ids == ["b", "a"]  # first appearance in the sub-batch
    slot = [batch.concept_ids.index(c) for c in sub.concept_ids]
    torch.testing.assert_close(hf_backbone.encode_text(sub, vectors[slot]).features, whole[rows])
