"""One evaluation run: a catalog, the registry's tokens, a gallery index -> every metric of `methods`."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from factory.backbones import Backbone
from factory.catalogs.evaluation import EvalCatalog
from factory.evaluation.anchors import ANCHORS, AnchorSettings, learn_anchors
from factory.evaluation.composition import composition_generation
from factory.evaluation.methods import (
    ABLATIONS,
    GairSettings,
    RetrievalOutcome,
    classification,
    learn_ablation,
    retrieval_and_generation,
    token_norms,
)
from factory.evaluation.metrics import look_alikes
from factory.gair import ConceptToken
from factory.learner import ConceptData, LearnerConfig
from factory.onboarding import chunks_by_parent, heldout_features, prepare_concepts
from factory.storage import S3Options
from schemas import TokenRecord

log = logging.getLogger(__name__)

MRR_GAIN_TARGET = 1.07  # the seed paper's +7% MRR on DeepFashion2
COMPOSITION_METHODS = ("ti", "ce", "ti_ce_free", "ti_ce_proj")  # and the caption, always


@dataclass
class EvaluationConfig:
    learner: LearnerConfig = field(default_factory=LearnerConfig)  # the registry run's settings
    concepts_per_step: int = 8
    gair: GairSettings = field(default_factory=GairSettings)
    max_queries: int | None = None  # evaluate only the first N queries (GAIR costs previews per query)
    generation_queries: int | None = 24  # queries whose composition prompts every method samples (None: all)
    # Torch threads of this process for the stages that run while the ablations learn elsewhere (0: as is).
    # Parallel ablation tasks hold the node's cores; a multi-threaded process beside them has its threads
    # spin at every op's barrier waiting for a sibling that is descheduled, so it and the tasks both slow
    # down (measured on 2 cores: a 2-thread UNet loop beside two 1-thread tasks ran 2.8x slower than on one
    # thread, and the tasks 1.4x slower). `evaluate --ray-ablations` sets 1 (`--threads-while-learning`).
    threads_while_learning: int = 0
    # The published anchors learned on the same few-shot features (`factory.evaluation.anchors`): POLAR's
    # value update and PALAVRA's fine-tuned token, in classification and retrieval. A few seconds in all.
    anchors: AnchorSettings = field(default_factory=AnchorSettings)


@dataclass
class Evaluation:
    metrics: dict
    outcome: RetrievalOutcome


def _prototypes(data, records: dict[str, TokenRecord]) -> dict[str, torch.Tensor]:
    """The registry's stored prototype of each concept, else the mean of its few-shot features."""
    out = {}
    for d in data:
        rec = records[d.concept_id]
        proto = torch.tensor(rec.prototype) if rec.prototype else F.normalize(d.image_features.float(), dim=-1).mean(0)
        out[d.concept_id] = F.normalize(proto.float(), dim=0)
    return out


def targets(metrics: dict) -> dict[str, dict]:
    """The issue's targets, each with its numbers and whether it was met (never tuned, only reported)."""
    cls, ret, gen = metrics["classification"], metrics["retrieval"], metrics["generation"]
    out = {}
    if "ti_ce_proj" in cls:
        rivals = {m: cls[m]["accuracy"] for m in ("caption", "ti", "parent_word") if m in cls}
        out["ti_ce_proj_beats_caption_ti_parent"] = {
            "value": cls["ti_ce_proj"]["accuracy"],
            "rivals": rivals,
            "met": all(cls["ti_ce_proj"]["accuracy"] > v for v in rivals.values()),
        }
    if "gair_auto" in ret:
        # The rival is every method a user could run, with the best fixed α picked in hindsight; the
        # per-query oracle is a ceiling, not a rival.
        # The anchors are other methods, not balances of the method's own query: they are compared in the
        # tables, and leave this target as it was defined.
        best = max(
            (m for m in ret if not m.startswith("gair_") and m != "oracle_alpha" and m not in ANCHORS),
            key=lambda m: ret[m]["mrr"],
        )
        ratio = ret["gair_auto"]["mrr"] / ret[best]["mrr"] if ret[best]["mrr"] > 0 else float("inf")
        out["gair_mrr_gain"] = {
            "value": ratio,
            "best_other": best,
            "target": MRR_GAIN_TARGET,
            "met": ratio >= MRR_GAIN_TARGET,
        }
    if {"ti_ce_proj", "ce", "caption"} <= set(cls):
        value, ce, caption = (cls[m]["accuracy"] for m in ("ti_ce_proj", "ce", "caption"))
        out["classification_ti_ce_proj_vs_ce_and_caption"] = {
            "value": value,
            "ce": ce,
            "caption": caption,
            "met": value >= ce - 0.02 and value >= caption + 0.15,
        }
    if {"ti_ce_proj", "caption", "ce", "ti"} <= set(gen) and gen["ti_ce_proj"].get("colour_accuracy") is not None:
        g = {m: gen[m] for m in ("ti_ce_proj", "caption", "ce", "ti")}
        out["generation_composition"] = {
            "value": g["ti_ce_proj"]["colour_accuracy"],
            "colour": g["ti_ce_proj"]["colour_accuracy"],
            "caption_colour": g["caption"]["colour_accuracy"],
            "fidelity": g["ti_ce_proj"]["fidelity"],
            "ce_fidelity": g["ce"]["fidelity"],
            "intent": g["ti_ce_proj"]["intent_accuracy"],
            "ti_intent": g["ti"]["intent_accuracy"],
            "met": (
                g["ti_ce_proj"]["colour_accuracy"] >= 0.8 * (g["caption"]["colour_accuracy"] or 0.0)
                and g["ti_ce_proj"]["fidelity"] > g["ce"]["fidelity"]
                and g["ti_ce_proj"]["intent_accuracy"] > g["ti"]["intent_accuracy"]
            ),
        }
    if "gair_auto" in gen and "token_intent" in gen:
        out["gair_intent_beats_token_intent"] = {
            "value": gen["gair_auto"]["intent_accuracy"],
            "token_intent": gen["token_intent"]["intent_accuracy"],
            "met": gen["gair_auto"]["intent_accuracy"] > gen["token_intent"]["intent_accuracy"],
        }
    return out


# Starts learning the ablations: (the concepts in the registry run's chunks, the run's learner settings,
# methods) -> a function that waits for them and returns method -> (concept id -> token, seconds it took).
# Started first, waited for once the stages that need only the registry's tokens are done, so a learner
# that runs elsewhere (`jobs.evaluate_ablations`: parallel Ray tasks) overlaps GAIR's previews.
AblationLearner = Callable[
    [Sequence[Sequence[ConceptData]], LearnerConfig, Sequence[str]],
    Callable[[], dict[str, tuple[dict[str, torch.Tensor], float]]],
]


def learn_ablations_here(backbone: Backbone) -> AblationLearner:
    """The ablations learned one after another in this process, when waited for (nothing runs beside them)."""

    def start(chunks, base, methods):
        def wait():
            out = {}
            for method in methods:
                t0 = time.perf_counter()
                tokens = learn_ablation(backbone, chunks, base, method)
                out[method] = (tokens, time.perf_counter() - t0)
                log.info("tokens of %s ready (%.1fs)", method, out[method][1])
            return out

        return wait

    return start


@contextlib.contextmanager
def torch_threads(n: int):
    """Run the block on ``n`` torch intra-op threads (0: unchanged), then restore the previous count."""
    before = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def evaluate(
    backbone: Backbone,
    catalog: EvalCatalog,
    records: Sequence[TokenRecord],
    index,
    config: EvaluationConfig,
    s3: S3Options | None = None,
    progress: bool = True,
    ablations: AblationLearner | None = None,
) -> Evaluation:
    """Every metric of the evaluation (see `factory.evaluation.methods` for what each method is).
    ``ablations`` learns the ablation tokens (default: `learn_ablations_here`, in this process)."""
    t0 = time.perf_counter()
    by_id = {r.concept_id: r for r in records}
    specs = [s for s in catalog.concepts if s.concept_id in by_id]
    if not specs:
        raise ValueError(
            "the registry has no token for any concept of the catalog: evaluate the registry "
            "that was learned on this catalog"
        )
    data, loaded, skipped = prepare_concepts(backbone, specs, s3, min_images=1, latents=backbone.generator is not None)
    log.info(
        "%d concepts (%d skipped: no usable few-shot image), %d images rejected",
        len(data),
        len(skipped),
        len(loaded.rejected),
    )
    # ti_ce_proj is the registry's own tokens; without a generator the TI ablations cannot be learned. The
    # TI ablations take ~5x the CE ones: started first, they do not wait behind them (longest first).
    methods = [m for m in ABLATIONS if m != "ti_ce_proj" and not (m.startswith("ti") and backbone.generator is None)]
    methods.sort(key=lambda m: not m.startswith("ti"))
    t_ablations = time.perf_counter()
    # The registry run's chunks: the job chunks the whole catalog (`chunks_by_parent`) and drops the concepts
    # it skips, so the ablations do the same and each learns exactly what the method's tokens learned with.
    chunks = chunks_by_parent(data, config.concepts_per_step, catalog=catalog.concepts)
    pending = (ablations or learn_ablations_here(backbone))(chunks, config.learner, methods)
    stage_seconds: dict[str, float] = {}
    registry_tokens = {d.concept_id: torch.tensor(by_id[d.concept_id].vector) for d in data}

    # GAIR's retrieval and previews, the method's and the caption's composition and the held-out features need
    # only the registry's tokens: they run while the ablations learn.
    with torch_threads(config.threads_while_learning):
        # The anchors first: they take seconds, and retrieval scores them beside the method's queries.
        t1 = time.perf_counter()
        anchors = learn_anchors(backbone, data, config.anchors)
        stage_seconds["learn_anchors"] = time.perf_counter() - t1
        stage_seconds.update({f"learn_{name}": a.seconds for name, a in anchors.items()})
        t1 = time.perf_counter()
        protos = _prototypes(data, by_id)
        rivals = look_alikes(protos, {d.concept_id: d.parent for d in data})
        concepts = {
            d.concept_id: ConceptToken(
                registry_tokens[d.concept_id], d.parent, protos[d.concept_id], rivals[d.concept_id]
            )
            for d in data
        }
        eval_catalog = catalog
        if config.max_queries is not None:
            eval_catalog = EvalCatalog(
                catalog.name, catalog.concepts, catalog.queries[: config.max_queries], catalog.gallery
            )
        outcome = retrieval_and_generation(
            backbone, eval_catalog, index, concepts, config.gair, progress=progress, anchors=anchors
        )
        stage_seconds["retrieval_generation"] = time.perf_counter() - t1
        t1 = time.perf_counter()
        g = config.gair
        compose = lambda token_sets, caption: composition_generation(  # noqa: E731
            backbone,
            eval_catalog,
            token_sets,
            protos,
            g.previews,
            g.steps,
            g.guidance,
            g.seed,
            config.generation_queries,
            caption=caption,
        )
        composition = compose({"ti_ce_proj": registry_tokens}, True)  # the method and the caption: no ablation needed
        stage_seconds["composition"] = time.perf_counter() - t1
        t1 = time.perf_counter()
        heldout = heldout_features(backbone, specs, s3)
        stage_seconds["classification"] = time.perf_counter() - t1

    t1 = time.perf_counter()
    learned = pending()
    stage_seconds["ablations_wait"] = time.perf_counter() - t1  # what the overlap did not hide
    stage_seconds["learn_ablations"] = time.perf_counter() - t_ablations  # started to ready (wall)
    stage_seconds.update({f"learn_{m}": learned[m][1] for m in methods})
    if progress:
        log.info(
            "ablation tokens ready (%.1fs after they started): %s",
            stage_seconds["learn_ablations"],
            ", ".join(f"{m} {learned[m][1]:.0f}s" for m in methods),
        )
    token_sets: dict[str, dict[str, torch.Tensor]] = {m: learned[m][0] for m in ABLATIONS if m in learned}
    token_sets["ti_ce_proj"] = registry_tokens

    t1 = time.perf_counter()
    pairs = [(d.concept_id, d.parent) for d in data]
    captions = {s.concept_id: s.caption for s in specs}
    cls = classification(backbone, pairs, heldout, captions, token_sets, anchors)
    stage_seconds["classification"] += time.perf_counter() - t1

    t1 = time.perf_counter()
    composition.update(compose({m: token_sets[m] for m in COMPOSITION_METHODS if m in learned}, False))
    stage_seconds["composition"] += time.perf_counter() - t1
    generation = dict(outcome.generation)
    for method, scores in composition.items():
        generation[method] = {**generation.get(method, {}), **scores}
    anchor_tokens = {name: a.tokens for name, a in anchors.items() if a.tokens is not None}  # POLAR has none
    for method, norm in token_norms({**token_sets, **anchor_tokens}).items():
        generation[method] = {**generation.get(method, {}), "token_norm": norm}
    generation["vocabulary"] = {"token_norm": float(backbone.vocab_mean_norm)}
    metrics = {
        "catalog": {
            "name": catalog.name,
            "concepts": len(catalog.concepts),
            "evaluated_concepts": len(data),
            "queries": len(eval_catalog.queries),
            "gallery": len(index),
            "intents": len(eval_catalog.intents),
        },
        "classification": cls,
        "retrieval": outcome.retrieval,
        "retrieval_summary": outcome.summary,
        "retrieval_per_query": outcome.per_query,
        "generation": generation,
        "gair": {"chosen_alpha": outcome.alphas, "settings": asdict(config.gair)},
        "anchors": {name: a.summary() for name, a in anchors.items()},
        "learner": {**asdict(config.learner), "concepts_per_step": config.concepts_per_step},
        "skipped_concepts": skipped,
        "stage_seconds": {**stage_seconds, "total": time.perf_counter() - t0},
    }
    metrics["targets"] = targets(metrics)
    return Evaluation(metrics, outcome)


__all__ = [
    "AblationLearner",
    "Evaluation",
    "EvaluationConfig",
    "learn_ablations_here",
    "MRR_GAIN_TARGET",
    "evaluate",
    "targets",
]
