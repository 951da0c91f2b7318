"""`tokenfactory evaluate`: measure a registry's tokens against baselines on a catalog and its gallery index.

Reads the catalog (a folder written by `tokenfactory world`, or the ``<split>_fsl_train.txt`` of a
PerVL-DeepFashion2 layout), the newest (or ``--version``) registry version and the index written by
`tokenfactory index`; learns the ablation tokens (TI only, CE only, free token) with the registry run's
own learner settings; runs every classification, retrieval and generation method of
`factory.evaluation.methods`; and writes ``OUT/metrics.json``, ``OUT/report.md`` and PNG plots.

Runs in one process, or with ``--ray-ablations`` learns the five ablations as parallel Ray tasks (joining
RAY_ADDRESS, else a local cluster): the cost is the ablations' learning and GAIR's previews (alphas ×
previews images per query, or two α with the default ``--previews-for chosen``); ``--max-queries``
bounds the latter. ``--use-gpu`` runs all of it on this machine's GPU, in bf16 unless ``--precision``
says otherwise (the Ray tasks on GPU shares, ``--ablation-gpus``). (The command line's side: flags ->
`jobs.evaluate.EvaluateConfig` -> `jobs.evaluate.evaluate_registry`.)
"""

from __future__ import annotations


def register(sub) -> None:
    from cli.arguments import add_s3_arguments, field_defaults
    from jobs.evaluate import EvaluateConfig

    # The job's flags take their defaults from EvaluateConfig's fields (one source per default). The GAIR
    # flags (--alphas .. --previews-for) still spell GairSettings' defaults out: that class lives in a module
    # that imports torch, which building the parser must not (`cli/main.py`).
    d = field_defaults(EvaluateConfig)

    p = sub.add_parser(
        "evaluate",
        help="classification / retrieval / generation metrics of a registry vs baselines",
        description=__doc__,
    )
    p.add_argument(
        "--catalog", required=True, help="catalog URI: a `world` folder/manifest.json or a PerVL <split>_fsl_train.txt"
    )
    p.add_argument("--registry", required=True, help="token registry root URI")
    p.add_argument("--index", required=True, help="gallery index URI (written by `tokenfactory index`)")
    p.add_argument("--out", required=True, help="output folder URI: metrics.json, report.md, *.png")
    p.add_argument("--version", type=int, default=d["version"], help="registry version (default: the newest)")
    p.add_argument("--backbone", default=d["backbone"], help="backbone name (default: the registry's)")
    p.add_argument("--weights", default=d["weights"], help="backbone weights URI (default: the config's own)")
    p.add_argument(
        "--max-queries", type=int, default=d["max_queries"], help="evaluate only the first N queries (default: all)"
    )
    p.add_argument(
        "--generation-queries",
        type=int,
        default=d["generation_queries"],
        help="queries whose composition prompts every method samples, from fresh noise (default: %(default)s)",
    )
    p.add_argument(
        "--alphas",
        default="0,0.25,0.5,0.75,1",
        help="GAIR's α schedule, comma-separated; must include 1 (default: 0,0.25,0.5,0.75,1)",
    )
    p.add_argument("--previews", type=int, default=2, help="GAIR previews per α (default: 2)")
    p.add_argument("--sample-steps", type=int, default=20, help="DDIM steps per preview (default: 20)")
    p.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance of previews (default: 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the previews (default: 0)")
    p.add_argument(
        "--gair-rule",
        choices=["retrieval", "object", "previews"],
        default="retrieval",
        help="how gair_auto picks α: 'retrieval' (what each α's query retrieves), 'object' (the same "
        "against the concept's look-alikes) or 'previews' (the previews' min-max balance, needs "
        "--previews-for every); every rule is also reported as gair_<rule> (default: retrieval)",
    )
    p.add_argument(
        "--gair-intent-margin",
        type=float,
        default=None,
        help="the retrieval rule's intent margin, cosine (default: the library's, chosen on seed 0)",
    )
    p.add_argument(
        "--gair-refine",
        type=int,
        default=0,
        help="gair_auto's rounds of bisection around its α; gair_bisect1..3 are reported either way (default: 0)",
    )
    p.add_argument(
        "--previews-for",
        choices=["chosen", "every"],
        default="chosen",
        help="render GAIR previews for the chosen α and α = 1 only (the generation metrics' two), or for "
        "every α (needed by the previews rule and gair_previews; 2.5x the sampling) (default: chosen)",
    )
    p.add_argument(
        "--ablation-steps",
        type=int,
        default=d["ablation_steps"],
        help="learner steps of the ablations (default: the registry run's --steps)",
    )
    p.add_argument(
        "--ray-ablations",
        action="store_true",
        default=d["ray_ablations"],
        help="learn the ablations as parallel Ray tasks, one per (ablation, chunk of concepts), while "
        "this process runs GAIR beside them (default: one after another in this process)",
    )
    p.add_argument(
        "--ablation-cpus",
        type=int,
        default=d["ablation_cpus"],
        help="CPUs and torch threads of each ablation task with --ray-ablations (default: %(default)s)",
    )
    p.add_argument(
        "--threads-while-learning",
        type=int,
        default=d["threads_while_learning"],
        help="torch threads of this process while the --ray-ablations tasks learn: the tasks hold the "
        "node's cores, and a multi-threaded process beside them spins at its own barriers; raise it "
        "when the tasks run on other nodes (0: torch's default) (default: %(default)s)",
    )
    p.add_argument(
        "--use-gpu",
        action="store_true",
        default=d["use_gpu"],
        help="compute on this machine's GPU: GAIR's previews, composition sampling, the features and the "
        "ablations' learning (an error where there is no GPU) (default: the CPU)",
    )
    p.add_argument(
        "--precision",
        choices=["fp32", "bf16"],
        default=d["precision"],
        help="precision of the frozen models (the ablations learn, so no fp16) (default: bf16 with "
        "--use-gpu, else fp32)",
    )
    p.add_argument(
        "--ablation-gpus",
        type=float,
        default=d["ablation_gpus"],
        metavar="SHARE",
        help="GPU share of each --ray-ablations task with --use-gpu, in (0, 1] (default: %(default)s: "
        "four tasks per GPU at 0.25)",
    )
    add_s3_arguments(p)
    p.set_defaults(func=run)


def config_from_args(args):
    """The typed job config of these flags."""
    import dataclasses

    from cli.arguments import s3_options
    from factory.evaluation.methods import GairSettings
    from jobs.evaluate import EvaluateConfig

    gair = GairSettings(
        alphas=[float(a) for a in args.alphas.split(",")],
        previews=args.previews,
        steps=args.sample_steps,
        guidance=args.guidance,
        seed=args.seed,
        rule=args.gair_rule,
        refine=args.gair_refine,
        previews_for=args.previews_for,
        **({} if args.gair_intent_margin is None else {"intent_margin": args.gair_intent_margin}),
    )
    fields = [f.name for f in dataclasses.fields(EvaluateConfig) if f.name not in ("gair", "s3")]  # all flags
    return EvaluateConfig(**{f: getattr(args, f) for f in fields}, gair=gair, s3=s3_options(args))


def run(args) -> int:
    from jobs.evaluate import evaluate_registry

    evaluate_registry(config_from_args(args))
    return 0
