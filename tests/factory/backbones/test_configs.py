import pytest
import torch

from factory.backbones import (
    add_backbone_config,
    get_backbone_config,
    list_backbones,
    load_backbone,
    save_weights,
)
from factory.errors import UnknownBackbone, WeightsError


def test_registered_configs_are_listed():
    assert {"tiny-hf-clip", "tiny-open-clip"} <= set(list_backbones())


def test_unknown_backbone_names_the_known_ones():
    with pytest.raises(UnknownBackbone, match="tiny-hf-clip"):
        get_backbone_config("no-such-backbone")


def test_add_backbone_config_from_dict_registers_a_new_name():
    d = get_backbone_config("tiny-hf-clip").to_dict()
    add_backbone_config(d, name="tiny-hf-clip-copy")
    assert "tiny-hf-clip-copy" in list_backbones()
    assert get_backbone_config("tiny-hf-clip-copy").family == "hf-clip"


def test_bad_family_is_rejected_at_registration():
    d = get_backbone_config("tiny-hf-clip").to_dict()
    d["family"] = "nope"
    with pytest.raises(ValueError, match="family"):
        add_backbone_config(d, name="broken")


def test_random_init_is_reproducible_from_the_config():
    a, b = load_backbone("tiny-hf-clip"), load_backbone("tiny-hf-clip")
    assert a.fingerprint() == b.fingerprint()
    assert torch.equal(a.token_embedding.weight, b.token_embedding.weight)


def test_weights_round_trip_through_a_uri(tmp_path, backbone):
    uri = save_weights(backbone, f"file://{tmp_path}/w")
    loaded = load_backbone(backbone.name, weights=f"file://{tmp_path}/w")
    for (k, v), (k2, v2) in zip(sorted(backbone.state_dict().items()), sorted(loaded.state_dict().items())):
        assert k == k2 and torch.equal(v, v2)
    assert uri.endswith("model.safetensors")


def test_weights_on_s3(s3_bucket, s3_server):
    bb = load_backbone("tiny-open-clip")
    save_weights(bb, f"{s3_bucket}/weights", s3=s3_server.s3_options)
    loaded = load_backbone("tiny-open-clip", weights=f"{s3_bucket}/weights", s3=s3_server.s3_options)
    assert torch.equal(loaded.token_embedding.weight, bb.token_embedding.weight)
    assert len(loaded.fingerprint()) == 64


def test_missing_weights_is_a_clear_error(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        load_backbone("tiny-hf-clip", weights=str(tmp_path / "nothing"))


def test_weights_of_another_architecture_are_refused(tmp_path):
    save_weights(load_backbone("tiny-open-clip"), str(tmp_path))
    with pytest.raises(WeightsError, match="do not fit"):
        load_backbone("tiny-hf-clip", weights=str(tmp_path))


def test_loaded_backbone_is_frozen(backbone):
    assert not any(p.requires_grad for p in backbone.parameters())
    assert not backbone.training
