"""Measuring learned tokens: classification, retrieval and generation against baselines.

``metrics`` holds the scoring primitives, ``data`` reads what an evaluation needs from a catalog (ours or
one laid out like PerVL-DeepFashion2, see ``pervl``), ``methods`` computes every method's numbers, and
``report`` turns them into ``metrics.json``, ``report.md`` and plots. No Ray here: `jobs/evaluate.py`
is the CLI around it.
"""

from factory.evaluation.metrics import class_embeddings, first_relevant_rank, heldout_accuracy, ranking_metrics

__all__ = ["class_embeddings", "first_relevant_rank", "heldout_accuracy", "ranking_metrics"]
