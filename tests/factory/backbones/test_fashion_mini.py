"""The embedded default: committed weights that load offline and actually know their world."""

import os

import torch
import torch.nn.functional as F

from factory.backbones import get_backbone_config, load_backbone
from factory.backbones.trimming import fashion_mini_words, keep_ids_for
from factory.world import FashionWorld


def test_trimmed_vocabulary_is_reproducible_from_the_word_list():
    assert get_backbone_config("fashion-mini").tokenizer.keep_ids == keep_ids_for(fashion_mini_words())


def test_weights_are_committed_and_small():
    path = os.path.join(get_backbone_config("fashion-mini").weights, "model.safetensors")
    assert os.path.getsize(path) <= 50 * 2**20


def test_true_caption_scores_above_the_others_on_heldout_renders():
    backbone = load_backbone("fashion-mini")
    renders = FashionWorld(seed=123, split="test").sample(64)
    # a batch of renders with distinct captions, each scored against all of the batch's captions
    first = {}
    for i, c in enumerate(renders.captions):
        first.setdefault(c, i)
    idx = list(first.values())[:16]
    with torch.no_grad():
        img = F.normalize(backbone.encode_image(backbone.preprocess(renders.images[idx])), dim=-1)
        txt = F.normalize(backbone.encode_prompts([renders.captions[i] for i in idx]).features, dim=-1)
    acc = float((img @ txt.T).argmax(1).eq(torch.arange(len(idx))).float().mean())
    assert acc >= 0.5, acc  # chance is 1/16
