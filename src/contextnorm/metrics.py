"""Classification metrics (torchmetrics) and their summary over seeds."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

# Metric key -> how tables and plots name it; the order is the order of table columns.
METRIC_TITLES: dict[str, str] = {
    "accuracy": "accuracy",
    "top5": "top-5 accuracy",
    "precision": "macro precision",
    "recall": "macro recall",
    "f1": "macro F1",
    "loss": "loss",
}
TOP_K = 5


def classification_metrics(num_classes: int) -> MetricCollection:
    """Accuracy, top-5 accuracy (for more than 5 classes), macro precision, recall and F1.

    The loss is logged by the training module itself, not here.
    """
    if num_classes < 2:
        raise ValueError(
            f"num_classes must be at least 2 for classification metrics, got {num_classes}"
        )
    metrics = {
        # torchmetrics averages per class by default; "accuracy" is the share of correct answers.
        "accuracy": MulticlassAccuracy(num_classes, average="micro"),
        "precision": MulticlassPrecision(num_classes, average="macro"),
        "recall": MulticlassRecall(num_classes, average="macro"),
        "f1": MulticlassF1Score(num_classes, average="macro"),
    }
    if num_classes > TOP_K:
        metrics["top5"] = MulticlassAccuracy(num_classes, top_k=TOP_K, average="micro")
    return MetricCollection(metrics)


@dataclass(frozen=True)
class Summary:
    """Mean and sample standard deviation (n - 1 in the denominator) of one metric over seeds.

    ``std`` is NaN when there is a single value: one seed says nothing about the spread.
    """

    mean: float
    std: float
    count: int

    def format(self, scale: float = 1.0, digits: int = 2) -> str:
        """``mean ± std``, both times ``scale`` (100 for percent); the mean alone for one seed."""
        if math.isnan(self.mean):
            return "n/a"
        if math.isnan(self.std):
            return f"{self.mean * scale:.{digits}f}"
        return f"{self.mean * scale:.{digits}f} ± {self.std * scale:.{digits}f}"


def summarize(values: Sequence[float]) -> Summary:
    """Summarise the values of one metric across seeds; NaN entries are left out."""
    finite = [float(value) for value in values if not math.isnan(float(value))]
    if not finite:
        return Summary(math.nan, math.nan, 0)
    std = statistics.stdev(finite) if len(finite) > 1 else math.nan
    return Summary(statistics.fmean(finite), std, len(finite))
