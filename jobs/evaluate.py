"""The evaluation job as a typed function: `EvaluateConfig` in, metrics.json + report.md + plots out.

Reads the catalog, the registry version (newest, or ``version``) and the gallery index; learns the ablation
tokens with the registry run's own learner settings (read back from its manifest), in this process or as
parallel Ray tasks (``ray_ablations``); runs every method of
`factory.evaluation.methods`. `tokenfactory evaluate` (`cli/evaluate_cmd.py`) builds the config from flags.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from factory.errors import ConfigError
from factory.storage import S3Options, absolute_uri

if TYPE_CHECKING:
    from factory.evaluation.methods import GairSettings


def _default_gair() -> "GairSettings":
    # Imported when a config is built: `tokenfactory evaluate`'s flags read this module's field defaults,
    # and building the parser must not import torch (`cli/main.py`).
    from factory.evaluation.methods import GairSettings

    return GairSettings()


@dataclass
class EvaluateConfig:
    catalog: str  # a `world` folder/manifest.json or a PerVL <split>_fsl_train.txt
    registry: str
    index: str  # written by `tokenfactory index`
    out: str  # folder for metrics.json, report.md, *.png
    version: int | None = None  # registry version (None: the newest)
    backbone: str | dict[str, Any] | None = None  # None: the one the registry run recorded
    weights: str | None = None
    max_queries: int | None = None  # only the first N queries (GAIR costs previews per query)
    generation_queries: int | None = 24  # queries whose composition prompts every method samples
    ablation_steps: int | None = None  # learner steps of the ablations (None: the run's own)
    ray_ablations: bool = False  # learn the ablations as parallel Ray tasks (`jobs.evaluate_ablations`)
    ablation_cpus: int = 1  # CPUs (and torch threads) of each such task
    # Torch threads of this process while Ray ablation tasks learn beside it (0: unchanged); see
    # `factory.evaluation.harness.EvaluationConfig.threads_while_learning`. Only with ``ray_ablations``.
    threads_while_learning: int = 1
    # The backbone on this process's GPU for GAIR's previews, composition sampling, held-out features and
    # ablations learned here; with ``ray_ablations`` each task takes ``ablation_gpus`` of a GPU too.
    use_gpu: bool = False
    precision: str | None = None  # of the frozen models; None: `factory.device.default_precision` (bf16 on a GPU)
    ablation_gpus: float = 0.25  # GPU share of each Ray ablation task with ``use_gpu``: 4 tasks per GPU
    gair: GairSettings = field(default_factory=_default_gair)
    s3: S3Options | None = field(default=None, repr=False)  # never recorded: it may hold keys

    def __post_init__(self):
        from factory.device import check_learning_precision, default_precision

        for name in ("catalog", "registry", "index", "out", "weights"):
            setattr(self, name, absolute_uri(getattr(self, name)))
        if self.precision is None:
            self.precision = default_precision(self.use_gpu)
        check_learning_precision(self.precision)  # the ablations learn tokens: fp16 is refused (see there)
        if not 0 < self.ablation_gpus <= 1:
            raise ConfigError(
                f"ablation_gpus must be in (0, 1] (a share of one GPU per task), got {self.ablation_gpus}"
            )

    def record(self) -> dict[str, Any]:
        """The config as JSON-able data (printed, stored in metrics.json), without the S3 options."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "s3"}


# Versions written before runs stored their learner settings recorded onboard's flags: flag -> field.
_LEGACY_FIELDS = {
    "steps": "steps",
    "lr": "lr",
    "seed": "seed",
    "parametrization": "parametrization",
    "ti_samples": "ti_samples",
    "ti_micro_batch": "ti_micro_batch",
    "gradient_checkpointing": "gradient_checkpointing",
    "max_norm_ratio": "max_norm_ratio",
}
_LEGACY_WEIGHTS = {
    "lambda_ti": "ti",
    "lambda_ce": "ce",
    "lambda_image_ce": "image_ce",
    "lambda_reg": "reg",
    "ti_balance": "ti_balance",
}


def run_learner_config(manifest_config: dict, steps: int | None = None):
    """(LearnerConfig, concepts per step) of the onboarding run that wrote a registry version.

    A run records its resolved learner settings (``learner``). For versions written before it did, the
    flags it recorded are laid over onboard's defaults as they were then (no TI calibration existed: a
    ``ti_balance`` it did not record is 0)."""
    from factory.learner import LearnerConfig
    from jobs.onboard import onboard_learner

    if "learner" in manifest_config:
        learner = LearnerConfig(**manifest_config["learner"])
    else:
        base = onboard_learner()
        weights = {
            **dataclasses.asdict(base.weights),
            "ti_balance": 0.0,
            **{w: manifest_config[f] for f, w in _LEGACY_WEIGHTS.items() if f in manifest_config},
        }
        fields = {k: manifest_config[f] for f, k in _LEGACY_FIELDS.items() if f in manifest_config}
        learner = dataclasses.replace(base, weights=type(base.weights)(**weights), **fields)
    if steps is not None:
        learner = dataclasses.replace(learner, steps=steps)
    return learner, int(manifest_config.get("concepts_per_step", 8))


def evaluate_registry(cfg: EvaluateConfig) -> dict:
    """Evaluate a registry version's tokens against the baselines; writes the report, returns the metrics."""
    from rich.console import Console

    from factory.backbones import load_backbone
    from factory.catalogs import read_eval_catalog
    from factory.device import PRECISIONS, pick_device
    from factory.evaluation.harness import EvaluationConfig, evaluate
    from factory.evaluation.report import markdown, write_report
    from factory.index import load_index
    from factory.registry import TokenRegistry

    print("[evaluate] config: " + json.dumps(cfg.record(), sort_keys=True), flush=True)
    # First: --use-gpu on a machine without one fails now, not after the catalog and index are read.
    device = pick_device(cfg.use_gpu)
    t0 = time.perf_counter()
    version = TokenRegistry(cfg.registry, cfg.s3).open(cfg.version)
    # The run's own resolved backbone config when it recorded one (a standard-layout backbone needs its ROOT).
    recorded = version.manifest.config.get("backbone_config") or version.manifest.backbone
    # The whole backbone on the device: the evaluation uses every part (text and image towers for the
    # features, the UNet and VAE for the previews and the TI ablations).
    backbone = load_backbone(
        cfg.backbone or recorded, weights=cfg.weights, s3=cfg.s3, device=device, dtype=PRECISIONS[cfg.precision]
    )
    catalog = read_eval_catalog(cfg.catalog, cfg.s3)
    index = load_index(cfg.index, cfg.s3)
    learner, per_step = run_learner_config(version.manifest.config, cfg.ablation_steps)
    config = EvaluationConfig(
        learner=learner,
        concepts_per_step=per_step,
        max_queries=cfg.max_queries,
        generation_queries=cfg.generation_queries,
        gair=cfg.gair,
        threads_while_learning=cfg.threads_while_learning if cfg.ray_ablations else 0,
    )
    print(
        f"[evaluate] {len(catalog.concepts)} concepts, {len(catalog.queries)} queries, gallery index of "
        f"{len(index)}; registry version {version.version} ({len(version)} tokens)",
        flush=True,
    )
    ablations = None
    if cfg.ray_ablations:
        from jobs.evaluate_ablations import ray_ablations

        ablations = ray_ablations(
            cfg.backbone or recorded,
            cfg.weights,
            cfg.s3,
            cfg.ablation_cpus,
            gpus=cfg.ablation_gpus if cfg.use_gpu else 0.0,
            precision=cfg.precision,
        )
    ev = evaluate(backbone, catalog, version.records(), index, config, cfg.s3, ablations=ablations)
    ev.metrics["registry"] = {"uri": cfg.registry, "version": version.version, "run_id": version.manifest.run_id}
    ev.metrics["config"] = cfg.record()
    uris = write_report(ev, cfg.out, cfg.s3)
    Console().print(markdown(ev.metrics))
    print(f"[evaluate] wrote {', '.join(uris.values())} in {time.perf_counter() - t0:.0f}s", flush=True)
    return ev.metrics


__all__ = ["EvaluateConfig", "evaluate_registry", "run_learner_config"]
