"""Classification metrics against values computed by hand, offline through `evaluate`."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402

from finetune.metrics import METRIC_NAMES, ClassificationMetrics, compute_classification_metrics  # noqa: E402

# 10 examples of 3 classes (supports 4, 3, 3); class 2 is never predicted.
REFERENCES = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
PREDICTIONS = [0, 0, 0, 1, 1, 1, 0, 0, 1, 0]
# Per class, by hand:
#   class 0: 6 predicted, 3 right -> precision 1/2, recall 3/4, F1 3/5
#   class 1: 4 predicted, 2 right -> precision 1/2, recall 2/3, F1 4/7
#   class 2: none predicted        -> precision 0 (zero division counts as 0), recall 0, F1 0
EXPECTED = {
    "accuracy": 5 / 10,
    "precision_macro": (1 / 2 + 1 / 2 + 0) / 3,
    "recall_macro": (3 / 4 + 2 / 3 + 0) / 3,
    "f1_macro": (3 / 5 + 4 / 7 + 0) / 3,
    "f1_weighted": (4 * 3 / 5 + 3 * 4 / 7 + 3 * 0) / 10,
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_metric_by_hand(name):
    metrics = compute_classification_metrics(PREDICTIONS, REFERENCES, num_labels=3)
    assert metrics[name] == pytest.approx(EXPECTED[name], rel=1e-12)


def test_metric_names_match_contract():
    metrics = compute_classification_metrics(PREDICTIONS, REFERENCES, num_labels=3)
    assert set(metrics) == set(METRIC_NAMES) - {"loss"}


def test_metric_all_correct():
    metrics = compute_classification_metrics([2, 0, 1, 1], [2, 0, 1, 1], num_labels=3)
    assert metrics == {name: 1.0 for name in EXPECTED}


def test_metric_absent_class_ignored():
    # Class 3 is neither in the references nor predicted (e.g. a small validation split lacks it): it must not
    # pull the macro averages of a perfect prediction below 1, as sklearn's default label set does not.
    metrics = compute_classification_metrics([0, 1, 2, 2], [0, 1, 2, 2], num_labels=4)
    assert metrics["f1_macro"] == 1.0
    assert metrics["precision_macro"] == 1.0
    assert metrics["recall_macro"] == 1.0


def test_metric_batches_accumulate():
    metric = ClassificationMetrics()
    metric.add_batch(predictions=PREDICTIONS[:4], references=REFERENCES[:4])
    metric.add_batch(predictions=PREDICTIONS[4:], references=REFERENCES[4:])
    assert metric.compute() == pytest.approx(EXPECTED, rel=1e-12)


def test_metric_rejects_unknown_class():
    with pytest.raises(ValueError, match=r"class indices must lie in 0\.\.1, got 0\.\.2"):
        compute_classification_metrics([0, 2], [0, 1], num_labels=2)
