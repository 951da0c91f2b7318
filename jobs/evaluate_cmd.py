"""`tokenfactory evaluate`: measure a registry's tokens against baselines on a catalog and its gallery index.

Reads the catalog (a folder written by `tokenfactory world`, or the ``<split>_fsl_train.txt`` of a
PerVL-DeepFashion2 layout), the newest (or ``--version``) registry version and the index written by
`tokenfactory index`; learns the ablation tokens (TI only, CE only, free token) with the registry run's
own learner settings; runs every classification, retrieval and generation method of
`factory.evaluation.methods`; and writes ``OUT/metrics.json``, ``OUT/report.md`` and PNG plots.

Runs in one process (no Ray): the cost is the ablations' learning and GAIR's previews (alphas × previews
images per query); ``--max-queries`` bounds the latter.
"""
from __future__ import annotations

import json
import time


def register(sub) -> None:
    from jobs.arguments import add_s3_arguments

    p = sub.add_parser("evaluate", help="classification / retrieval / generation metrics of a registry vs baselines",
                       description=__doc__)
    p.add_argument("--catalog", required=True, help="catalog URI: a `world` folder/manifest.json or a PerVL <split>_fsl_train.txt")
    p.add_argument("--registry", required=True, help="token registry root URI")
    p.add_argument("--index", required=True, help="gallery index URI (written by `tokenfactory index`)")
    p.add_argument("--out", required=True, help="output folder URI: metrics.json, report.md, *.png")
    p.add_argument("--version", type=int, default=None, help="registry version (default: the newest)")
    p.add_argument("--backbone", default=None, help="backbone name (default: the registry's)")
    p.add_argument("--weights", default=None, help="backbone weights URI (default: the config's own)")
    p.add_argument("--max-queries", type=int, default=None, help="evaluate only the first N queries (default: all)")
    p.add_argument("--generation-queries", type=int, default=24,
                   help="queries whose composition prompts every method samples, from fresh noise (default: 24)")
    p.add_argument("--alphas", default="0,0.25,0.5,0.75,1", help="GAIR's α schedule, comma-separated; must include 1 (default: 0,0.25,0.5,0.75,1)")
    p.add_argument("--previews", type=int, default=2, help="GAIR previews per α (default: 2)")
    p.add_argument("--sample-steps", type=int, default=20, help="DDIM steps per preview (default: 20)")
    p.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance of previews (default: 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the previews (default: 0)")
    p.add_argument("--gair-rule", choices=["retrieval", "previews"], default="retrieval",
                   help="how gair_auto picks α: 'retrieval' (what each α's query retrieves) or 'previews' (the "
                        "previews' min-max balance); every rule is also reported as gair_<rule> (default: retrieval)")
    p.add_argument("--gair-intent-margin", type=float, default=None,
                   help="the retrieval rule's intent margin, cosine (default: the library's, chosen on seed 0)")
    p.add_argument("--ablation-steps", type=int, default=None,
                   help="learner steps of the ablations (default: the registry run's --steps)")
    add_s3_arguments(p)
    p.set_defaults(func=run)


def run_learner_config(manifest_config: dict, steps: int | None = None):
    """(LearnerConfig, concepts per step) of the onboarding run that wrote a registry version.

    A run records its resolved learner settings (``learner``); for versions written before it did, the
    flags it recorded are laid over the onboard command's defaults."""
    import argparse
    import dataclasses

    from factory.learner import LearnerConfig
    from jobs import onboard_cmd

    if "learner" in manifest_config:
        learner = LearnerConfig(**manifest_config["learner"])
        if steps is not None:
            learner = dataclasses.replace(learner, steps=steps)
        return learner, int(manifest_config["concepts_per_step"])

    parser = argparse.ArgumentParser()
    onboard_cmd.register(parser.add_subparsers())  # onboard's own flags and defaults, nothing else
    defaults = parser.parse_args(["onboard", "--catalog", "-", "--registry", "-"])
    learner_config = onboard_cmd.learner_config
    args = argparse.Namespace(**{**vars(defaults), **{k: v for k, v in manifest_config.items() if k in vars(defaults)}})
    if steps is not None:
        args.steps = steps
    return LearnerConfig(**learner_config(args)), int(args.concepts_per_step)


def run(args) -> int:
    from rich.console import Console

    from factory.backbones import load_backbone
    from factory.catalogs.evaluation import read_eval_catalog
    from factory.evaluation.harness import EvaluationConfig, evaluate
    from factory.evaluation.methods import GairSettings
    from factory.evaluation.report import markdown, write_report
    from factory.index import load_index
    from factory.registry import TokenRegistry
    from jobs.arguments import absolute_uri, effective_config, s3_options

    for name in ("catalog", "registry", "index", "out", "weights"):
        setattr(args, name, absolute_uri(getattr(args, name)))
    print("[evaluate] config: " + json.dumps(effective_config(args), sort_keys=True), flush=True)
    s3 = s3_options(args)
    t0 = time.perf_counter()
    version = TokenRegistry(args.registry, s3).open(args.version)
    catalog = read_eval_catalog(args.catalog, s3)
    index = load_index(args.index, s3)
    # The run's own resolved backbone config when it recorded one (a standard-layout backbone needs its ROOT).
    recorded = version.manifest.config.get("backbone_config") or version.manifest.backbone
    backbone = load_backbone(args.backbone or recorded, weights=args.weights, s3=s3)
    learner, per_step = run_learner_config(version.manifest.config, args.ablation_steps)
    config = EvaluationConfig(
        learner=learner, concepts_per_step=per_step, max_queries=args.max_queries,
        generation_queries=args.generation_queries,
        gair=GairSettings(alphas=[float(a) for a in args.alphas.split(",")], previews=args.previews,
                          steps=args.sample_steps, guidance=args.guidance, seed=args.seed, rule=args.gair_rule,
                          **({} if args.gair_intent_margin is None else {"intent_margin": args.gair_intent_margin})))
    print(f"[evaluate] {len(catalog.concepts)} concepts, {len(catalog.queries)} queries, gallery index of "
          f"{len(index)}; registry version {version.version} ({len(version)} tokens)", flush=True)
    ev = evaluate(backbone, catalog, version.records(), index, config, s3)
    ev.metrics["registry"] = {"uri": args.registry, "version": version.version, "run_id": version.manifest.run_id}
    ev.metrics["config"] = effective_config(args)
    uris = write_report(ev, args.out, s3)
    Console().print(markdown(ev.metrics))
    print(f"[evaluate] wrote {', '.join(uris.values())} in {time.perf_counter() - t0:.0f}s", flush=True)
    return 0
