"""A token exported by the registry loads into a real diffusers StableDiffusionPipeline.

The pipeline is tiny and built from configs (no downloads): its text encoder is a standalone
`CLIPTextModel` carrying our HF backbone's text weights, its tokenizer HF's `CLIPTokenizer` on the CLIP
BPE files that open_clip ships. After `load_textual_inversion` the pipeline's text encoder must produce
the same hidden states for the prompt as our injection does.
"""

import pytest
import torch

from factory.learner import ConceptData, LearnerConfig, learn_tokens, to_record
from factory.losses import LossWeights
from factory.registry import TokenRegistry


@pytest.fixture(scope="module")
def pipeline(hf_backbone, tmp_path_factory):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextModel, CLIPTokenizer

    tok_dir = tmp_path_factory.mktemp("tokenizer")
    hf_backbone.tokenizer.write_hf_files(str(tok_dir))
    tokenizer = CLIPTokenizer(
        vocab=str(tok_dir / "vocab.json"),
        merges=str(tok_dir / "merges.txt"),
        model_max_length=hf_backbone.tokenizer.context_length,
    )
    text_encoder = CLIPTextModel(hf_backbone.clip.config.text_config)
    text_encoder.load_state_dict(hf_backbone.clip.text_model.state_dict())
    vae = AutoencoderKL(
        block_out_channels=[8],
        down_block_types=["DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D"],
        latent_channels=3,
        norm_num_groups=4,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=hf_backbone.generator.unet,
        scheduler=DDIMScheduler(steps_offset=1, clip_sample=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def test_hf_tokenizer_files_match_our_ids(hf_backbone, pipeline):
    prompt = "a photo of a striped dress, on the beach!"
    ours = hf_backbone.tokenize([prompt]).input_ids[0].tolist()
    theirs = pipeline.tokenizer(prompt, padding="max_length", max_length=len(ours)).input_ids
    assert theirs == ours


def test_exported_token_loads_with_load_textual_inversion(hf_backbone, pipeline, tmp_path):
    g = torch.Generator().manual_seed(0)
    concept = ConceptData("sku-7", "dress", torch.randn(3, 32, generator=g))
    token = learn_tokens(
        hf_backbone, [concept], {}, LearnerConfig(steps=5, lr=0.05, weights=LossWeights(ti=0, ce=0, reg=1.0))
    )[0]
    token.vector = token.vector + 0.05 * torch.randn(token.vector.shape, generator=g)  # make it clearly unlike any word
    registry = TokenRegistry(str(tmp_path / "registry"))
    writer = registry.begin("run-1", hf_backbone.name, hf_backbone.fingerprint())
    writer.write_shard("s0", [to_record(token, hf_backbone, "run-1")])
    writer.commit()
    out = str(tmp_path / "sku-7.safetensors")
    name = registry.export_textual_inversion("sku-7", out)
    assert name == "<concept:sku-7>"

    pipeline.load_textual_inversion(out)
    prompt = "a photo of a <concept:sku-7> dress on the beach"
    ids = pipeline.tokenizer(
        prompt, padding="max_length", max_length=pipeline.tokenizer.model_max_length, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        theirs = pipeline.text_encoder(ids).last_hidden_state
        ours = hf_backbone.encode_prompts([prompt], {"sku-7": registry.open().get("sku-7").vector}).hidden
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
