"""Onboarding throughput: concepts per minute, same learner steps, with the held-out accuracy of each way.

    python benchmarks/onboard_throughput.py --out build/onboard_throughput.json

(a) naive: one concept at a time, its images re-encoded (CLIP features and latents) at every step, the
    way the diffusers textual-inversion example works;
(b) the learner: features and latents computed once, C concepts per optimisation step;
(c) the Ray job (`tokenfactory onboard`) with 1 and with 2 Train workers, on a local catalog folder.
Prints a table, writes JSON.

Ratios (the JSON's top-level keys):
    speedup_batched_vs_naive   concepts/min of the learner at the largest C over the naive loop's
    speedup_2_vs_1_workers     *steady-state* concepts/min of the Ray job, 2 workers over 1, from the
                               chunk end times the workers record in the run report (`jobs.onboard.
                               steady_rate`): start-up (Ray, actors, models, the first chunk) is left out
    speedup_2_vs_1_workers_end_to_end   the same from whole-run wall times
The naive loop is linear in the number of concepts (nothing to amortise), so it runs on the first
``--naive-concepts`` only and its rate stands for the whole catalog.
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
from factory.catalogs import read_concepts
from factory.concepts import encode_images
from factory.evaluation import heldout_accuracy
from factory.learner import LearnerConfig, learn_tokens
from factory.tokens.prompts import template_prompts
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
    """(seconds end to end, steady concepts/min from the run report's chunk times, tokens)."""
    from cli.main import main
    from jobs.onboard import steady_rate

    registry = tempfile.mkdtemp(prefix="tf-bench-registry-")
    t0 = time.perf_counter()
    main(["onboard", "--catalog", catalog, "--registry", registry, "--backbone", backbone_name,
          "--workers", str(workers), "--cpus-per-worker", str(args.cpus_per_worker),
          "--concepts-per-step", str(args.ray_concepts_per_step or args.concepts_per_step), "--steps", str(args.steps),
          "--lambda-image-ce", "0"])
    seconds = time.perf_counter() - t0
    version = TokenRegistry(registry).open()
    steady, _ = steady_rate(version.manifest.report["workers"])
    return seconds, steady, {r.concept_id: torch.tensor(r.vector) for r in version.records()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="build/onboard_throughput.json", help="JSON output path")
    p.add_argument("--backbone", default="fashion-mini", help="backbone (default: fashion-mini)")
    p.add_argument("--products", type=int, default=64, help="concepts in the catalog (default: 64)")
    p.add_argument("--naive-concepts", type=int, default=8, help="concepts the naive loop runs on (default: 8)")
    p.add_argument("--shots", type=int, default=5, help="few-shot images per concept (default: 5)")
    p.add_argument("--steps", type=int, default=50, help="learner steps, the same for every way (default: 50)")
    p.add_argument("--concepts-per-step", type=int, default=16, help="C for (b) and (c) (default: 16)")
    p.add_argument("--learner-c", type=int, nargs="+", default=[1, 4],
                   help="further values of C for (b), besides --concepts-per-step (default: 1 4)")
    p.add_argument("--cpus-per-worker", type=float, default=0.5, help="CPUs per Ray Train worker (default: 0.5)")
    p.add_argument("--ray-concepts-per-step", type=int, default=None,
                   help="C of the Ray job (default: --concepts-per-step); smaller C gives each worker more chunks to time")
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

    rows, n_naive = [], min(args.naive_concepts, len(specs))
    secs, toks = naive(backbone, specs[:n_naive], concepts[:n_naive], banks, cfg, size)
    rows.append(("naive (1 concept, re-encode every step)", secs, toks))
    for c in sorted({*args.learner_c, args.concepts_per_step}):
        secs, toks = batched(backbone, concepts, banks, cfg, c)
        rows.append((f"learner, precomputed, C={c}", secs, toks))
    ray_seconds, steady = {}, {}
    if not args.skip_ray:
        for w in (1, 2):
            secs, steady[w], toks = ray_job(catalog, args.backbone, w, args)
            ray_seconds[w] = secs
            rows.append((f"ray job, {w} worker(s), C={args.ray_concepts_per_step or args.concepts_per_step} "
                         f"(end to end)", secs, toks))

    result = {"settings": vars(args), "cpus": os.cpu_count(), "ways": []}
    print(f"{'way':52s} {'seconds':>8s} {'concepts/min':>13s} {'held-out acc':>13s}")
    rates = {}
    for name, secs, toks in rows:
        acc = _accuracy(backbone, specs, heldout, toks)
        rates[name] = rate = len(toks) / secs * 60
        result["ways"].append({"way": name, "seconds": secs, "concepts_per_min": rate, "heldout_accuracy": acc,
                               "concepts": len(toks)})
        print(f"{name:52s} {secs:8.1f} {rate:13.2f} {acc:13.3f}")
    best = f"learner, precomputed, C={max(*args.learner_c, args.concepts_per_step)}"
    result["speedup_batched_vs_naive"] = rates[best] / rates["naive (1 concept, re-encode every step)"]
    if ray_seconds:
        result["steady_concepts_per_min"] = {f"{w}_workers": r for w, r in steady.items()}
        result["speedup_2_vs_1_workers"] = steady[2] / steady[1]
        result["speedup_2_vs_1_workers_end_to_end"] = ray_seconds[1] / ray_seconds[2]
    for k in ("speedup_batched_vs_naive", "speedup_2_vs_1_workers", "speedup_2_vs_1_workers_end_to_end"):
        if k in result:
            print(f"{k}: {result[k]:.2f}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
