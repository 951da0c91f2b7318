"""Quality of the embedded default (`fashion-mini`): zero-shot CLIP accuracy and generation accuracy.

    python benchmarks/embedded_quality.py --out build/embedded_quality.json

zero_shot.<attr>: accuracy on held-out renders (test-split garments) when scoring the captions that vary
only <attr> (the other attributes are the render's own). generation.<attr>: the same judge applied to
images generated from random captions. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch
import torch.nn.functional as F

from factory.backbones import load_backbone
from factory.images import to_uint8
from factory.world import BACKGROUNDS, CATEGORIES, COLOURS, PATTERNS, FashionWorld, caption

TARGETS = {
    "zero_shot": {"category": 0.75, "colour": 0.95, "pattern": 0.95, "background": 0.95},
    "generation": {"category": 0.45, "colour": 0.85, "background": 0.75},
}
VALUES = {"category": CATEGORIES, "colour": COLOURS, "pattern": PATTERNS, "background": BACKGROUNDS}


def _words(r, i):
    return {
        "category": CATEGORIES[r.category[i]],
        "colour": COLOURS[r.colour[i]],
        "pattern": PATTERNS[r.pattern[i]],
        "background": BACKGROUNDS[r.background[i]],
    }


@torch.no_grad()
def attribute_accuracy(backbone, images: np.ndarray, labels: list[dict], attr: str, batch: int = 200) -> float:
    """Accuracy of picking the true value of ``attr`` among captions that vary only ``attr``."""
    values = VALUES[attr]
    hits = 0
    for s in range(0, len(images), batch):
        img = F.normalize(backbone.encode_image(backbone.preprocess(images[s : s + batch])), dim=-1)
        for j, lab in enumerate(labels[s : s + batch]):
            prompts = [caption(**{**lab, attr: v}) for v in values]
            txt = F.normalize(backbone.encode_prompts(prompts).features, dim=-1)
            hits += int(int((txt @ img[j]).argmax()) == values.index(lab[attr]))
    return hits / len(images)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="build/embedded_quality.json", help="JSON output path")
    p.add_argument("--backbone", default="fashion-mini", help="backbone name (default: fashion-mini)")
    p.add_argument("--weights", default=None, help="weights URI (default: the backbone's own)")
    p.add_argument("--n-zero-shot", type=int, default=1000, help="held-out renders for zero-shot (default: 1000)")
    p.add_argument("--n-generated", type=int, default=100, help="images generated for the generation scores")
    p.add_argument("--steps", type=int, default=40, help="DDIM steps (default: 40)")
    p.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance (default: 4)")
    p.add_argument("--seed", type=int, default=1234, help="seed (default: 1234)")
    args = p.parse_args(argv)

    backbone = load_backbone(args.backbone, weights=args.weights)
    r = FashionWorld(seed=args.seed, split="test").sample(args.n_zero_shot)
    labels = [_words(r, i) for i in range(len(r))]
    result = {"backbone": backbone.name, "fingerprint": backbone.fingerprint(), "zero_shot": {}, "generation": {}}
    t0 = time.perf_counter()
    for attr in VALUES:
        result["zero_shot"][attr] = attribute_accuracy(backbone, r.images, labels, attr)
    result["zero_shot_seconds"] = time.perf_counter() - t0

    if args.n_generated > 0:
        _generation(backbone, args, result)
    result["settings"] = vars(args)

    print(f"{'metric':28s} {'value':>7s} {'target':>7s}")
    for group in ("zero_shot", "generation"):
        for attr, v in result[group].items():
            tgt = TARGETS[group][attr]
            print(f"{group + '.' + attr:28s} {v:7.3f} {tgt:7.2f} {'ok' if v >= tgt else 'MISSED'}")
    if "sampling_seconds_per_image" in result:
        print(f"{'sampling s/image':28s} {result['sampling_seconds_per_image']:7.3f}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    return 0


def _generation(backbone, args, result) -> None:
    g = FashionWorld(seed=args.seed + 1, split="test").sample(args.n_generated)
    gen_labels = [_words(g, i) for i in range(len(g))]
    t0 = time.perf_counter()
    with torch.no_grad():
        cond = backbone.encode_prompts(g.captions).hidden
        uncond = backbone.encode_prompts([""]).hidden
        images = to_uint8(
            backbone.generator.sample(cond, uncond, steps=args.steps, guidance=args.guidance, seed=args.seed)
        )
    result["sampling_seconds_per_image"] = (time.perf_counter() - t0) / len(images)
    for attr in ("category", "colour", "background"):
        result["generation"][attr] = attribute_accuracy(backbone, images, gen_labels, attr)


if __name__ == "__main__":
    sys.exit(main())
