"""Classification metrics through `evaluate`, offline.

`evaluate.load("accuracy")` fetches its script from the Hub, which fails behind a firewall. The metric below is
an `evaluate.Metric` defined in this package, so it works with no network and keeps evaluate's interface
(`add_batch`, `compute`) for anyone who wants to reuse it.
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np
from sklearn.metrics import accuracy_score, precision_recall_fscore_support

METRIC_NAMES = ("loss", "accuracy", "f1_macro", "f1_weighted", "precision_macro", "recall_macro")


class ClassificationMetrics(evaluate.Metric):
    """Accuracy, macro and weighted F1, macro precision and recall of single-label predictions."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Accuracy, F1 (macro, weighted), precision and recall (macro) for classification.",
            citation="",
            inputs_description="predictions and references: class indices (int).",
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, labels=None):
        predictions = np.asarray(predictions)
        references = np.asarray(references)
        labels = list(labels) if labels is not None else sorted(set(references) | set(predictions))
        results = {"accuracy": float(accuracy_score(references, predictions))}
        for average in ("macro", "weighted"):
            precision, recall, f1, _ = precision_recall_fscore_support(
                references, predictions, labels=labels, average=average, zero_division=0
            )
            results[f"f1_{average}"] = float(f1)
            if average == "macro":
                results["precision_macro"] = float(precision)
                results["recall_macro"] = float(recall)
        return results


def compute_classification_metrics(predictions, references, num_labels: int) -> dict[str, float]:
    """Compute the metrics of `ClassificationMetrics` for class indices in `0..num_labels-1`.

    Macro averages run over the classes that occur in `references` or `predictions`. A class missing from
    both (say, absent from a small validation split) has no defined precision or recall, and counting it as 0
    would score a perfect prediction below 1. A class in `references` that is never predicted counts as 0.
    """
    predictions, references = list(predictions), list(references)
    present = sorted(set(predictions) | set(references))
    if present and (present[0] < 0 or present[-1] >= num_labels):
        raise ValueError(f"class indices must lie in 0..{num_labels - 1}, got {present[0]}..{present[-1]}")
    metric = ClassificationMetrics()
    return metric.compute(predictions=predictions, references=references, labels=present)
