"""Onboarding throughput: concepts per minute, same learner steps, with the held-out accuracy of each way.

    python benchmarks/onboard_throughput.py --out build/onboard_throughput.json

(a) naive: one concept at a time, its images re-encoded (CLIP features and latents) at every step, the
    way the diffusers textual-inversion example works;
(b) the learner: features and latents computed once, C concepts per optimisation step;
(c) the Ray job (`tokenfactory onboard`) with 1 and with 2 Train workers, on a local catalog folder.
Prints a table, writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from factory.backbones import load_backbone
from factory.catalog import read_concepts
from factory.concepts import encode_images
from factory.evaluation import heldout_accuracy
from factory.learner import LearnerConfig, learn_tokens, template_prompts
from factory.losses import LossWeights
from factory.onboarding import heldout_features, image_size_for, learn_in_chunks, load_images, negative_banks, prepare_concepts
from factory.registry import TokenRegistry
from factory.world import write_catalog


def _accuracy(backbone, specs, heldout, tokens):
    pairs = [(s.concept_id, s.parent) for s in specs if s.concept_id in tokens]
    prompts = lambda c, p: template_prompts(f"<concept:{c}>", p)  # noqa: E731
    return heldout_accuracy(backbone, pairs, heldout, prompts, tokens)[0]


def naive(backbone, specs, concepts, banks, cfg, size):
    """One concept at a time; every step re-reads nothing but re-encodes all of the concept's images."""
    t0 = time.perf_counter()
    tokens = {}
    for spec, concept in zip(specs, concepts):
        images = load_images({spec.concept_id: spec.image_uris}, size).images
        for _ in range(cfg.steps):  # the per-step encoding the naive loop pays for
            encode_images(backbone, images, latents=True)
        tokens[concept.concept_id] = learn_tokens(backbone, [concept], banks, cfg)[0].vector
    return time.perf_counter() - t0, tokens


def batched(backbone, concepts, banks, cfg, c):
    t0 = time.perf_counter()
    learned = learn_in_chunks(backbone, concepts, banks, cfg, c)
    return time.perf_counter() - t0, {t.concept_id: t.vector for t in learned}


def ray_job(catalog, backbone_name, workers, args):
    from jobs.cli import main

    registry = tempfile.mkdtemp(prefix="tf-bench-registry-")
    t0 = time.perf_counter()
    main(["onboard", "--catalog", catalog, "--registry", registry, "--backbone", backbone_name,
          "--workers", str(workers), "--cpus-per-worker", str(args.cpus_per_worker),
          "--concepts-per-step", str(args.concepts_per_step), "--steps", str(args.steps), "--lambda-image-ce", "0"])
    seconds = time.perf_counter() - t0
    version = TokenRegistry(registry).open()
    return seconds, {r.concept_id: torch.tensor(r.vector) for r in version.records()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="build/onboard_throughput.json", help="JSON output path")
    p.add_argument("--backbone", default="fashion-mini", help="backbone (default: fashion-mini)")
    p.add_argument("--products", type=int, default=8, help="concepts in the catalog (default: 8)")
    p.add_argument("--shots", type=int, default=5, help="few-shot images per concept (default: 5)")
    p.add_argument("--steps", type=int, default=50, help="learner steps, the same for every way (default: 50)")
    p.add_argument("--concepts-per-step", type=int, default=4, help="C for (b) and (c) (default: 4)")
    p.add_argument("--cpus-per-worker", type=float, default=0.5, help="CPUs per Ray Train worker (default: 0.5)")
    p.add_argument("--skip-ray", action="store_true", help="skip (c)")
    args = p.parse_args(argv)

    catalog = tempfile.mkdtemp(prefix="tf-bench-catalog-")
    write_catalog(catalog, seed=7, products=args.products, shots=args.shots, heldout=5, contexts=1, distractors=0)
    specs = read_concepts(catalog)
    backbone = load_backbone(args.backbone)
    concepts, loaded, _ = prepare_concepts(backbone, specs)
    banks = negative_banks(concepts)
    heldout = heldout_features(backbone, specs)
    # Image-side CE couples the concepts of a chunk, so it is off here: every way optimises the same
    # per-concept objective and only the execution differs.
    cfg = LearnerConfig(steps=args.steps, weights=LossWeights(ti=1.0, ce=1.0, image_ce=0.0), log_every=0)
    size = image_size_for(backbone.config)

    rows = []
    secs, toks = naive(backbone, specs, concepts, banks, cfg, size)
    rows.append(("naive (1 concept, re-encode every step)", secs, toks))
    secs, toks = batched(backbone, concepts, banks, cfg, 1)
    rows.append(("learner, precomputed, C=1", secs, toks))
    secs, toks = batched(backbone, concepts, banks, cfg, args.concepts_per_step)
    rows.append((f"learner, precomputed, C={args.concepts_per_step}", secs, toks))
    if not args.skip_ray:
        for w in (1, 2):
            secs, toks = ray_job(catalog, args.backbone, w, args)
            rows.append((f"ray job, {w} worker(s), C={args.concepts_per_step} (end to end)", secs, toks))

    result = {"settings": vars(args), "cpus": os.cpu_count(), "ways": []}
    print(f"{'way':52s} {'seconds':>8s} {'concepts/min':>13s} {'held-out acc':>13s}")
    for name, secs, toks in rows:
        acc = _accuracy(backbone, specs, heldout, toks)
        rate = len(toks) / secs * 60
        result["ways"].append({"way": name, "seconds": secs, "concepts_per_min": rate, "heldout_accuracy": acc,
                               "concepts": len(toks)})
        print(f"{name:52s} {secs:8.1f} {rate:13.2f} {acc:13.3f}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
