import math

import pytest
import torch
import torch.nn.functional as F

from factory.backbones import load_backbone
from factory.losses import image_side_ce, text_side_ce, textual_inversion_loss


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _unit(*shape):
    return F.normalize(torch.randn(*shape), dim=-1)


def test_text_side_ce_matches_a_hand_computed_softmax():
    text = _unit(1, 1, 4)
    pos, neg = _unit(1, 1, 4), _unit(1, 2, 4)
    loss, acc = text_side_ce(
        text, pos, torch.ones(1, 1, dtype=torch.bool), neg, torch.ones(1, 2, dtype=torch.bool), 10.0
    )
    logits = 10.0 * torch.cat([pos[0] @ text[0, 0], neg[0] @ text[0, 0]])
    assert math.isclose(float(loss), float(-F.log_softmax(logits, 0)[0]), rel_tol=1e-5)
    assert float(acc) == float(logits[0] > logits[1:].max())


def test_text_side_ce_ignores_masked_rows():
    text, pos, neg = _unit(1, 2, 4), _unit(1, 3, 4), _unit(1, 2, 4)
    pm = torch.tensor([[True, True, False]])
    nm = torch.tensor([[True, False]])
    loss, _ = text_side_ce(text, pos, pm, neg, nm, 5.0)
    ref, _ = text_side_ce(text, pos[:, :2], pm[:, :2], neg[:, :1], nm[:, :1], 5.0)
    torch.testing.assert_close(loss, ref)


def test_text_side_ce_without_negatives_is_zero():
    loss, acc = text_side_ce(
        _unit(1, 1, 4),
        _unit(1, 2, 4),
        torch.ones(1, 2, dtype=torch.bool),
        _unit(1, 1, 4),
        torch.zeros(1, 1, dtype=torch.bool),
        5.0,
    )
    assert float(loss) == 0.0 and float(acc) == 1.0


def test_image_side_ce_prefers_matching_prototypes():
    protos = torch.eye(3, 4)
    text = protos[:, None, :].expand(3, 2, 4)
    good = image_side_ce(text, protos[:, None, :], torch.ones(3, 1, dtype=torch.bool), 20.0)
    bad = image_side_ce(text, protos.roll(1, 0)[:, None, :], torch.ones(3, 1, dtype=torch.bool), 20.0)
    assert (good < 0.01).all() and (bad > 5).all()


def test_image_side_ce_with_fixed_competitors_equals_the_whole_group():
    # The learner drops stopped concepts from its step and passes their prototypes as ``others``:
    # the active concepts' losses must be those of the whole group.
    text, pos = _unit(5, 3, 8), _unit(5, 2, 8)
    mask = torch.ones(5, 2, dtype=torch.bool)
    whole = image_side_ce(text, pos, mask, 10.0)
    active, stopped = [0, 2, 3], [1, 4]
    others = F.normalize(text[stopped].mean(1), dim=-1)
    part = image_side_ce(text[active], pos[active], mask[active], 10.0, others)
    torch.testing.assert_close(part, whole[active])


def test_textual_inversion_loss_is_the_noise_mse(hf_backbone):
    gen = hf_backbone.generator
    sched = gen.noise_scheduler()
    lat = torch.randn(2, 3, 16, 16)
    cond = hf_backbone.encode_prompts(["a red dress", "a blue coat"]).hidden
    noise, t = torch.randn_like(lat), torch.tensor([10, 500])
    loss = textual_inversion_loss(gen.unet, sched, lat, cond, noise, t)
    pred = gen.unet(sched.add_noise(lat, noise, t), t, encoder_hidden_states=cond).sample
    torch.testing.assert_close(loss, (pred - noise).pow(2).mean(dim=(1, 2, 3)))


def test_v_prediction_target():
    backbone = load_backbone("tiny-open-clip")  # its config uses v-prediction and a VAE
    gen = backbone.generator
    sched = gen.noise_scheduler()
    assert sched.config.prediction_type == "v_prediction"
    lat = torch.randn(1, gen.latent_channels, gen.unet.config.sample_size, gen.unet.config.sample_size)
    cond = backbone.encode_prompts(["a dress"]).hidden
    noise, t = torch.randn_like(lat), torch.tensor([300])
    loss = textual_inversion_loss(gen.unet, sched, lat, cond, noise, t)
    pred = gen.unet(sched.add_noise(lat, noise, t), t, encoder_hidden_states=cond).sample
    torch.testing.assert_close(loss, (pred - sched.get_velocity(lat, noise, t)).pow(2).mean(dim=(1, 2, 3)))
