"""The vocabulary of results: what a metric is, what a task shows, and summaries over seeds.

Tasks describe their metrics, test views and curves with :class:`MetricSpec`, :class:`ViewSpec`
and :class:`ReportSpec`; the runner stores that description with the results, and the report
and figures are drawn from it alone, without knowing the task. Every run's history is a list
of :data:`EpochRecord`; a metric over seeds is a :class:`Summary`, and a method against the
baseline is a :class:`Difference` (paired over seeds, with a t interval).

Nothing here imports torch or Lightning: ``contextnorm report`` reads results with it.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

EpochRecord = dict[str, float]
"""One finished epoch: every logged epoch metric by name, ``epoch`` (from 0) and ``time_s``."""

CONFIDENCE = 0.95
"""Coverage of the intervals of paired differences."""

MIXTURE_COMPONENTS = "components"
"""A mixture layer's components in use: ``exp`` of the entropy of its weights, 1 to K."""
MIXTURE_ENTROPY = "entropy"
"""A mixture layer's mean posterior entropy of a position, in nats, 0 to log K."""
MIXTURE_VARIANCE_RATIO = "min_variance_ratio"
"""A mixture layer's smallest component variance over its mixture's variance."""


def mixture_layer_key(layer: str, quantity: str) -> str:
    """The epoch-record key of one mixture layer's value: ``mixture/<layer>/<quantity>``."""
    return f"mixture/{layer}/{quantity}"


def mixture_summary_key(quantity: str, statistic: str) -> str:
    """The epoch-record key of a summary over a model's mixture layers, e.g.
    ``mixture/components/median``."""
    return f"mixture/{quantity}/{statistic}"


@dataclass(frozen=True)
class MetricSpec:
    """One metric as tables and figures show it.

    Attributes:
        key: its name in the test results (``accuracy``) or in the epoch records
            (``val/accuracy``).
        title: how tables and axes name it.
        lower, upper: the metric's range (``None``: unbounded); curves and bands are clipped
            to it, and axes start at ``lower`` when it is set.
        higher_is_better: the direction of improvement.
        percent: shown times 100 in tables (accuracies).
    """

    key: str
    title: str
    lower: float | None = None
    upper: float | None = None
    higher_is_better: bool = True
    percent: bool = False

    def format(self, value: Summary | Difference) -> str:
        """A table cell for a summary or difference of this metric."""
        if self.percent:
            return value.format(scale=100.0, digits=2)
        return value.format(digits=4)

    def clip(self, value: float) -> float:
        """``value`` moved into the metric's range."""
        if self.lower is not None:
            value = max(self.lower, value)
        if self.upper is not None:
            value = min(self.upper, value)
        return value


@dataclass(frozen=True)
class ViewSpec:
    """One way of testing a trained model, e.g. with the true context or with none.

    Attributes:
        title: a column heading (``oracle context``).
        description: one sentence saying what the model is given at test time.
    """

    title: str
    description: str


@dataclass
class ReportSpec:
    """What a task's results tables and figures show; stored in ``experiment.json``.

    Attributes:
        about: markdown lines describing the data, contexts, model and training.
        views: test view name -> what it gives the model, in table order.
        metrics: the test metrics, in table order; the first is the headline metric.
        curves: the per-epoch panels of the curves figure (keys of the epoch records).
        notes: paragraphs printed after the description of the views.
        num_contexts: K, for the activation figures.
        context_names: a name per context id.
        run_images: image files a run writes (``Task.save_artifacts``), such as generated
            samples, each with a line saying what it shows; the report draws a figure of each,
            of the same name and with that line as its title, with a panel per method (its
            first finished seed).
        curve_figures: further per-epoch figures, drawn like ``curves``: file name (without
            ``.png``) -> its panels.
    """

    about: list[str]
    views: dict[str, ViewSpec]
    metrics: list[MetricSpec]
    curves: list[MetricSpec]
    notes: list[str] = field(default_factory=list)
    num_contexts: int = 1
    context_names: list[str] = field(default_factory=list)
    run_images: dict[str, str] = field(default_factory=dict)
    curve_figures: dict[str, list[MetricSpec]] = field(default_factory=dict)

    @property
    def headline(self) -> MetricSpec:
        """The metric of the headline table and the progress lines."""
        return self.metrics[0]

    def metric(self, key: str) -> MetricSpec:
        """The spec of the test metric ``key``."""
        for spec in self.metrics:
            if spec.key == key:
                return spec
        raise KeyError(f"no test metric {key!r}; metrics: {[spec.key for spec in self.metrics]}")

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        # A list: JSON files are written with sorted keys, and the views' order is the tables'.
        data["views"] = [{"name": name, **asdict(view)} for name, view in self.views.items()]
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ReportSpec:
        return cls(
            about=list(data["about"]),
            views=_views(data["views"]),
            metrics=[MetricSpec(**spec) for spec in data["metrics"]],
            curves=[MetricSpec(**spec) for spec in data["curves"]],
            notes=list(data.get("notes", [])),
            num_contexts=int(data.get("num_contexts", 1)),
            context_names=list(data.get("context_names", [])),
            run_images=_captions(data.get("run_images", {})),
            curve_figures={
                name: [MetricSpec(**spec) for spec in panels]
                for name, panels in data.get("curve_figures", {}).items()
            },
        )


def _views(views: Mapping[str, Any] | list[dict[str, str]]) -> dict[str, ViewSpec]:
    # Results of an earlier version store the views as a mapping (in sorted order).
    if isinstance(views, Mapping):
        return {name: ViewSpec(**view) for name, view in views.items()}
    return {view["name"]: ViewSpec(view["title"], view["description"]) for view in views}


def _captions(images: Mapping[str, str] | list[str]) -> dict[str, str]:
    # Results of an earlier version list the file names alone.
    return dict(images) if isinstance(images, Mapping) else dict.fromkeys(images, "")


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


def summarize(values: list[float] | tuple[float, ...]) -> Summary:
    """Summarise the values of one metric across seeds; NaN entries are left out."""
    finite = [float(value) for value in values if not math.isnan(float(value))]
    if not finite:
        return Summary(math.nan, math.nan, 0)
    std = statistics.stdev(finite) if len(finite) > 1 else math.nan
    return Summary(statistics.fmean(finite), std, len(finite))


@dataclass(frozen=True)
class Difference:
    """A method minus the baseline, paired by seed: the mean and its 95 % t interval.

    Attributes:
        mean: the mean over seeds of (method - baseline).
        low, high: the interval (NaN with fewer than two pairs).
        count: the number of seeds both runs finished.
    """

    mean: float
    low: float
    high: float
    count: int

    @property
    def supported(self) -> bool:
        """Whether the runs support a difference: the interval excludes zero."""
        return self.low > 0 or self.high < 0

    def format(self, scale: float = 1.0, digits: int = 2) -> str:
        """``+1.20 [-0.40, +2.80]`` (times ``scale``), with ``*`` when the interval excludes 0."""
        if math.isnan(self.mean):
            return "n/a"
        mean = f"{self.mean * scale:+.{digits}f}"
        if math.isnan(self.low):
            return f"{mean} (n = {self.count})"
        interval = f"[{self.low * scale:+.{digits}f}, {self.high * scale:+.{digits}f}]"
        return f"{mean} {interval}{' *' if self.supported else ''}"


def paired_difference(
    values: Mapping[int, float], baseline: Mapping[int, float], confidence: float = CONFIDENCE
) -> Difference:
    """The paired difference ``values - baseline`` over the seeds both have, with a t interval.

    Runs of one seed share their data order, initialisation and augmentation draws, so the
    difference per seed removes what the seed alone explains; the interval is Student's t
    with n - 1 degrees of freedom over those n per-seed differences.

    Args:
        values: seed -> the method's value; NaN (a diverged run) leaves the seed out.
        baseline: seed -> the baseline's value.
        confidence: coverage of the interval.
    """
    seeds = sorted(
        seed
        for seed in values.keys() & baseline.keys()
        if math.isfinite(values[seed]) and math.isfinite(baseline[seed])
    )
    differences = [values[seed] - baseline[seed] for seed in seeds]
    if not differences:
        return Difference(math.nan, math.nan, math.nan, 0)
    mean = statistics.fmean(differences)
    if len(differences) < 2:
        return Difference(mean, math.nan, math.nan, 1)
    from scipy.stats import t  # scipy.stats takes a second to import; only tables need it

    half_width = float(
        t.ppf(0.5 + confidence / 2, len(differences) - 1)
        * statistics.stdev(differences)
        / math.sqrt(len(differences))
    )
    return Difference(mean, mean - half_width, mean + half_width, len(differences))
