"""An evaluation's outputs: ``metrics.json``, ``report.md`` and PNG plots, written to any URI."""

from __future__ import annotations

import io
import json

import matplotlib

matplotlib.use("Agg")  # files only: no display on cluster nodes
import matplotlib.pyplot as plt  # noqa: E402

from factory import storage  # noqa: E402
from factory.evaluation.anchors import ANCHORS  # noqa: E402
from factory.evaluation.harness import Evaluation  # noqa: E402
from factory.evaluation.ir_metrics import MAP_AT_K, MAP_AT_KEY  # noqa: E402
from factory.evaluation.methods import CLASSIFICATION_METHODS, RETRIEVAL_METHODS  # noqa: E402
from factory.figures import image_grid  # noqa: E402
from factory.storage import S3Options  # noqa: E402

FILES = ("metrics.json", "report.md", "classification.png", "retrieval.png", "gair_previews.png")


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _bars(title: str, ylabel: str, groups: dict[str, dict[str, float]]) -> bytes:
    """Grouped bars: one group per metric, one bar per method."""
    metrics = list(groups)
    methods = list(next(iter(groups.values())))
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(metrics) * max(1, len(methods)) / 3, 3.2))
    width = 0.8 / len(methods)
    for j, m in enumerate(methods):
        xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(metrics))]
        ax.bar(xs, [groups[g][m] for g in metrics], width, label=m)
    ax.set_xticks(range(len(metrics)), metrics)
    ax.set_ylim(0, 1)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7, ncols=2)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def _gair_grid(ev: Evaluation) -> bytes:
    rows, titles = [], []
    for qid, prompt, res in ev.outcome.traces:
        images, titles = [], []
        for s in res.steps:
            if len(s.previews) == 0:  # not rendered (previews_for="chosen")
                continue
            images.append(s.previews[0])
            titles.append(f"alpha={s.alpha:g}" + (" *" if s.alpha == res.alpha else ""))  # PIL's font has no α
        short = prompt if len(prompt) <= 44 else "..." + prompt[-41:]
        rows.append((f"{qid}: {short}", images))
    buf = io.BytesIO()
    image_grid(rows, titles, scale=3, label_w=300).save(buf, format="PNG")
    return buf.getvalue()


def markdown(metrics: dict) -> str:
    cls, ret, gen = metrics["classification"], metrics["retrieval"], metrics["generation"]
    cat = metrics["catalog"]
    fmt = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
    lines = [
        f"# Evaluation: {cat['name']}",
        "",
        f"{cat['evaluated_concepts']} concepts, {cat['queries']} queries, gallery of {cat['gallery']} items, "
        f"{cat['intents']} intents.",
        "",
        "## Classification (held-out images among the concepts of the same parent)",
        "",
        "| method | accuracy |",
        "|---|---:|",
    ]
    lines += [f"| {m} | {cls[m]['accuracy']:.3f} |" for m in CLASSIFICATION_METHODS if m in cls]
    lines += [
        "",
        "## Retrieval (one query per concept and context)",
        "",
        (
            "R@k: any relevant item in the top k; mAP over all relevant items, mAP@k over min(#relevant, k) "
            "(ConCon-Chi's definitions, `factory.evaluation.ir_metrics`)."
        ),
        "",
        f"| method | MRR | R@1 | R@5 | R@10 | mAP | mAP@{MAP_AT_K} |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {m} | {ret[m]['mrr']:.3f} | {ret[m]['r1']:.3f} | {ret[m]['r5']:.3f} | {ret[m]['r10']:.3f} | "
        f"{fmt(ret[m].get('map'))} | {fmt(ret[m].get(MAP_AT_KEY))} |"
        for m in RETRIEVAL_METHODS
        if m in ret
    ]
    anchors = metrics.get("anchors", {})
    if anchors:
        lines += [
            "",
            "## Anchors (published methods learned here on the same few-shot features)",
            "",
            "| anchor | seconds per concept | concepts | generation |",
            "|---|---:|---:|---|",
        ]
        lines += [
            f"| {m} | {anchors[m]['seconds_per_concept']:.3f} | {anchors[m]['n_concepts']} | "
            f"{'token not sampled' if anchors[m]['has_token'] else 'none: no token (a text-encoder update)'} |"
            for m in ANCHORS
            if m in anchors
        ]
    lines += [
        "",
        "## Generation (previews judged by the backbone among the catalog's intents)",
        "",
        "| method | intent accuracy | concept fidelity (cos) | object fidelity | identity |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {m} | {gen[m]['intent_accuracy']:.3f} | {gen[m]['fidelity']:.3f} | "
        f"{fmt(gen[m].get('object_fidelity'))} | {fmt(gen[m].get('identity_accuracy'))} |"
        for m in ("token_intent", "gair_auto")
        if m in gen
    ]
    composed = [m for m in ("ti", "ce", "ti_ce_free", "ti_ce_proj", "caption") if "category_accuracy" in gen.get(m, {})]
    if composed:
        lines += [
            "",
            '## Composition in generation ("a photo of a <concept> <parent> <context>", fresh noise)',
            "",
            "| method | colour | category | intent | fidelity | object fidelity | identity |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {m} | {fmt(gen[m]['colour_accuracy'])} | {gen[m]['category_accuracy']:.3f} | "
            f"{gen[m]['intent_accuracy']:.3f} | {gen[m]['fidelity']:.3f} | {fmt(gen[m].get('object_fidelity'))} | "
            f"{fmt(gen[m].get('identity_accuracy'))} |"
            for m in composed
        ]
    chance = gen.get("gair_auto", {}).get("chance")
    if chance:
        lines += ["", f"Chance intent accuracy: {chance:.3f}."]
    lines += ["", "| tokens of | mean L2 norm |", "|---|---:|"]
    lines += [
        f"| {m} | {gen[m]['token_norm']:.3f} |"
        for m in (*CLASSIFICATION_METHODS, "vocabulary")
        if "token_norm" in gen.get(m, {})
    ]
    lines += [
        "",
        f"GAIR's chosen α (queries per value): {json.dumps(metrics['gair']['chosen_alpha'])}",
        "",
        "## Targets",
        "",
        "| target | value | met |",
        "|---|---|---|",
    ]
    for name, t in metrics["targets"].items():
        lines.append(f"| {name} | {t['value']:.3f} | {'yes' if t['met'] else 'no'} |")
    lines += [
        "",
        "Plots: `classification.png`, `retrieval.png`; GAIR previews per α (* = chosen): `gair_previews.png`.",
        "",
    ]
    return "\n".join(lines)


def write_report(ev: Evaluation, out: str, s3: S3Options | None = None) -> dict[str, str]:
    """Write every file of ``FILES`` under ``out``; returns name -> URI."""
    m = ev.metrics
    files = {
        "metrics.json": json.dumps(m, indent=2, sort_keys=True, default=float).encode(),
        "report.md": markdown(m).encode(),
        "classification.png": _bars(
            "held-out classification",
            "accuracy",
            {"accuracy": {k: v["accuracy"] for k, v in m["classification"].items()}},
        ),
        "retrieval.png": _bars(
            "retrieval",
            "score",
            {k: {meth: m["retrieval"][meth][k] for meth in m["retrieval"]} for k in ("mrr", "r1", "r5", "r10")},
        ),
    }
    if ev.outcome.traces:
        files["gair_previews.png"] = _gair_grid(ev)
    uris = {}
    for name, data in files.items():
        uris[name] = storage.join(out, name)
        storage.write_bytes(uris[name], data, s3)
    return uris


__all__ = ["FILES", "markdown", "write_report"]
