import numpy as np
import pytest
import torch
from PIL import Image


def test_plain_prompts_match_the_family_s_own_text_forward(backbone):
    prompts = ["a photo of a red dress", "a striped coat on a beach"]
    batch = backbone.tokenize(prompts)
    ours = backbone.encode_text(batch).features
    with torch.no_grad():
        if backbone.config.family == "hf-clip":
            ref = backbone.clip.get_text_features(input_ids=batch.input_ids).pooler_output
        else:
            ref = backbone.clip.encode_text(batch.input_ids)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_image_encoding_shape_and_preprocess_from_pil(backbone):
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)) for _ in range(3)]
    px = backbone.preprocess(imgs)
    assert px.shape == (3, 3, backbone.config.image.size, backbone.config.image.size)
    feats = backbone.encode_image(px)
    assert feats.shape[0] == 3 and torch.isfinite(feats).all()


def test_preprocess_rejects_mixed_sizes(backbone):
    imgs = [Image.new("RGB", (32, 32)), Image.new("RGB", (16, 16))]
    with pytest.raises(ValueError, match="different sizes"):
        backbone.preprocess(imgs)


def test_generator_latents_round_trip_shape(backbone):
    x = torch.randint(0, 255, (2, 40, 40, 3), dtype=torch.uint8)
    lat = backbone.generator.encode(backbone.generator_pixels(x))
    assert lat.shape[1] == backbone.generator.latent_channels
    assert lat.shape[-1] == backbone.generator.unet.config.sample_size
    assert backbone.generator.decode(lat).shape[-1] == backbone.generator.image_size


def test_word_embedding_of_a_multi_piece_word_is_the_mean_of_its_pieces(hf_backbone):
    ids = hf_backbone.tokenizer.word_ids("zigzagged")
    assert len(ids) > 1
    rows = hf_backbone.token_embedding.weight[ids]
    torch.testing.assert_close(hf_backbone.word_embedding("zigzagged"), rows.mean(0))
