import pytest

from factory.errors import MalformedMarker, PromptTooLong
from factory.tokens import PromptTokenizer, find_markers, marker, split_on_markers


def test_split_on_markers_alternates_text_and_ids():
    texts, ids = split_on_markers("a <concept:a1> and <concept:b.2> dress")
    assert texts == ["a ", " and ", " dress"] and ids == ["a1", "b.2"]


@pytest.mark.parametrize(
    "prompt",
    [
        "a <concept:../etc> dress",
        "a <concept:a/b> dress",
        "a <concept:> x",
        "a <concept:abc dress",
        "a < concept : abc > dress",
    ],
)
def test_malformed_markers_are_errors(prompt):
    with pytest.raises(MalformedMarker):
        find_markers(prompt)


def test_marker_validates_ids():
    assert marker("sku-1") == "<concept:sku-1>"
    with pytest.raises(ValueError):
        marker("a/b")


def test_tokenize_records_marker_positions_and_eot():
    tok = PromptTokenizer(context_length=16)
    batch = tok(["a <concept:x> dress", "<concept:y> on <concept:x>"])
    assert batch.concept_ids == ["x", "y"]
    plain = tok.encode_text("a")
    # row 0: [sot, a, <x>, dress, eot]
    assert batch.marker_rows.tolist() == [0, 1, 1]
    assert batch.marker_cols.tolist() == [1 + len(plain), 1, 1 + 1 + len(tok.encode_text("on"))]
    assert batch.marker_slots.tolist() == [0, 1, 0]
    assert batch.input_ids[0, batch.eot_positions[0]] == tok.eot_id
    assert batch.input_ids[0, 0] == tok.sot_id


def test_segments_tokenize_like_the_whole_string():
    tok = PromptTokenizer(context_length=32)
    whole = tok(["a photo of a red dress, on grass"]).input_ids
    ids = [tok.sot_id] + tok.encode_text("a photo of a") + tok.encode_text("red dress, on grass") + [tok.eot_id]
    assert whole[0, : len(ids)].tolist() == ids


def test_too_long_prompt_is_an_error():
    with pytest.raises(PromptTooLong, match="context length 8"):
        PromptTokenizer(context_length=8)("one two three four five six seven eight nine")


def test_padding_modes():
    assert PromptTokenizer(16, pad="zero")(["a"]).input_ids[0, -1] == 0
    tok = PromptTokenizer(16, pad="eot")
    assert tok(["a"]).input_ids[0, -1] == tok.eot_id
