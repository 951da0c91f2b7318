import pytest
import torch

from factory.backbones import add_backbone_config, get_backbone_config, load_backbone
from factory.errors import EmptyVocabulary, UnknownWord
from factory.tokens import (
    AttributeVocabulary,
    TokenParameters,
    add_vocabulary,
    build_subspace,
    get_vocabulary,
    list_vocabularies,
    vocabulary_for_parent,
)
from factory.tokens.tokenizer import PromptTokenizer

SMALL = AttributeVocabulary("small", ("dress",), {"colour": ("red", "blue", "green"), "pattern": ("striped",)})


def test_vocabulary_files_are_registered():
    assert {"fashion", "generic"} <= set(list_vocabularies())
    assert vocabulary_for_parent("dress").name == "fashion"
    assert vocabulary_for_parent("teapot").name == "generic"
    assert "red" in get_vocabulary("fashion").words()


def test_add_vocabulary_from_dict():
    v = add_vocabulary({"name": "teapots", "parents": ["teapot"], "attributes": {"material": ["ceramic"]}})
    assert vocabulary_for_parent("teapot") is v


def test_basis_is_orthonormal_and_spans_the_words(backbone):
    s = build_subspace(backbone.word_embedding, SMALL, "dress")
    eye = torch.eye(s.rank)
    torch.testing.assert_close(s.basis.T @ s.basis, eye, atol=1e-5, rtol=0)
    assert s.rank == 5  # 4 attribute words + the parent, generic position in R^32
    for w in ["red", "striped", "dress"]:
        e = backbone.word_embedding(w)
        torch.testing.assert_close(s.project(e), e, atol=1e-5, rtol=1e-4)


def test_rank_tolerance_drops_duplicate_directions(backbone):
    dup = AttributeVocabulary("dup", ("dress",), {"colour": ("red", "red", "blue"), "other": ("red",)})
    assert build_subspace(backbone.word_embedding, dup, "dress").rank == 3


def test_multi_piece_words_are_averaged(hf_backbone):
    vocab = AttributeVocabulary("mp", ("dress",), {"pattern": ("zigzagged",)})
    s = build_subspace(hf_backbone.word_embedding, vocab, "dress")
    ids = hf_backbone.tokenizer.word_ids("zigzagged")
    mean = hf_backbone.token_embedding.weight[ids].mean(0)
    torch.testing.assert_close(s.project(mean), mean, atol=1e-5, rtol=1e-4)
    assert s.rank == 2


def _trimmed_backbone():
    cfg = get_backbone_config("tiny-hf-clip").to_dict()
    tok = PromptTokenizer()
    keep = [tok.sot_bpe, tok.eot_bpe] + tok.bpe_ids("a photo of dress red")
    cfg["tokenizer"]["keep_ids"] = keep
    cfg["clip"]["text_config"].update(vocab_size=len(keep), bos_token_id=0, eos_token_id=1, pad_token_id=1)
    add_backbone_config(cfg, name="tiny-trimmed")
    return load_backbone("tiny-trimmed")


def test_a_vocabulary_with_no_known_word_is_a_clear_error():
    bb = _trimmed_backbone()
    vocab = AttributeVocabulary("unknowns", ("dress",), {"colour": ("mauve", "teal")})
    with pytest.raises(EmptyVocabulary, match="no word this backbone knows"):
        build_subspace(bb.word_embedding, vocab, "dress")
    partial = build_subspace(bb.word_embedding, AttributeVocabulary("p", (), {"c": ("red", "teal")}), "dress")
    assert partial.words == ["red"] and partial.unknown_words == ["teal"]
    with pytest.raises(UnknownWord):
        bb.encode_prompts(["a teal dress"])


def test_projected_parameters_start_at_the_parent_and_free_ones_too(backbone):
    s = build_subspace(backbone.word_embedding, SMALL, "dress")
    e = backbone.word_embedding("dress")[None]
    torch.testing.assert_close(TokenParameters(e, [s])(), e, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(TokenParameters(e)(), e)


def test_padded_coefficients_never_move(backbone):
    small = build_subspace(backbone.word_embedding, SMALL, "dress")
    big = build_subspace(backbone.word_embedding, get_vocabulary("fashion"), "coat")
    init = torch.stack([backbone.word_embedding("dress"), backbone.word_embedding("coat")])
    params = TokenParameters(init, [small, big])
    params().pow(2).sum().backward()
    assert params.coefficients.grad[0, small.rank :].abs().max() == 0
    assert len(params.coefficients_of(0)) == small.rank


def test_scene_words_stay_out_of_the_basis():
    from factory.backbones import load_backbone
    from factory.tokens import build_subspace, vocabulary_for_parent

    vocab = vocabulary_for_parent("dress")
    assert "background" in vocab.context and "beach" in vocab.words(include_context=True)
    assert "beach" not in vocab.words() and "striped" in vocab.words()
    space = build_subspace(load_backbone("tiny-hf-clip").word_embedding, vocab, "dress")
    assert not {"beach", "snow", "street", "grass", "studio", "night"} & set(space.words)
