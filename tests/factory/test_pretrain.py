"""The pretraining steps themselves (no Ray): which weights each stage and tower setting trains."""
import pytest
import torch

from factory.backbones import create_backbone, get_backbone_config
from factory.pretrain import PretrainConfig, Pretrainer
from jobs.pretrain import world_batches


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("name", ["tiny-hf-clip", "tiny-open-clip"])
def test_image_tower_training_leaves_the_text_tower_alone(name: str) -> None:
    backbone = create_backbone(get_backbone_config(name))
    image_before = [_snapshot(m) for m in backbone.image_tower()]
    clip_before = _snapshot(backbone.clip)
    cfg = PretrainConfig(stage="clip", steps=2, batch_size=8, lr=1e-3, warmup=1, towers="image")
    Pretrainer(backbone, cfg, world_batches(32, 0.3, group_size=4)).train_steps(2)

    image_params = {p.data_ptr() for m in backbone.image_tower() for p in m.parameters()}
    for m, before in zip(backbone.image_tower(), image_before):
        after = m.state_dict()
        assert any(not torch.equal(after[k], v) for k, v in before.items()), "the image tower did not train"
    text_changed = [k for k, p in backbone.clip.named_parameters()
                    if p.data_ptr() not in image_params and k != "logit_scale" and not torch.equal(p, clip_before[k])]
    assert text_changed == []
    assert any(k.startswith(("text_model", "transformer", "token_embedding")) for k in clip_before)


def test_a_checkpoint_resumes_only_with_the_same_towers() -> None:
    backbone = create_backbone(get_backbone_config("tiny-hf-clip"))
    batches = world_batches(32, 0.0)
    both = Pretrainer(backbone, PretrainConfig(stage="clip", steps=1, batch_size=4, towers="both"), batches)
    image = Pretrainer(backbone, PretrainConfig(stage="clip", steps=1, batch_size=4, towers="image"), batches)
    with pytest.raises(ValueError, match="towers='both'"):
        image.load_state_dict(both.state_dict())


def test_unknown_towers_setting_is_refused() -> None:
    with pytest.raises(ValueError, match="towers must be"):
        PretrainConfig(towers="text")
