"""Figures of an experiment, drawn with matplotlib's Agg canvas into PNG files.

Figures are built on :class:`matplotlib.figure.Figure` directly (no pyplot), so drawing
them neither needs a display nor changes the backend of a program that imports this module.
What each figure shows comes from :class:`~contextnorm.metrics.MetricSpec` descriptions: the
figures know no task. Every figure says what its spread is and over how many seeds; bands stay
within the metric's range; summaries are dot plots, with the paired differences to the
baseline beside them.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.image import imread
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from contextnorm.io import atomic_write
from contextnorm.metrics import (
    MIXTURE_COMPONENTS,
    MIXTURE_ENTROPY,
    Difference,
    EpochRecord,
    MetricSpec,
    Summary,
    mixture_summary_key,
    summarize,
)
from contextnorm.runner.activations import ActivationSample

PANEL_SIZE = (4.2, 3.2)
DPI = 110
HISTOGRAM_BINS = 80
MAX_PROJECTED_POINTS = 2000
COMPONENT_STYLES = ("--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)))
# Characters per line of a panel title (a metric's title may name its protocol at length).
TITLE_WIDTH = 48


def _figure(num_panels: int, columns: int = 3) -> tuple[Figure, list[Axes]]:
    columns = min(columns, num_panels)
    rows = math.ceil(num_panels / columns)
    figure = Figure(figsize=(PANEL_SIZE[0] * columns, PANEL_SIZE[1] * rows), layout="constrained")
    FigureCanvasAgg(figure)
    axes = list(np.atleast_1d(figure.subplots(rows, columns, squeeze=False)).ravel())
    for unused in axes[num_panels:]:
        unused.set_visible(False)
    return figure, axes[:num_panels]


def _save(figure: Figure, path: str | Path) -> Path:
    return atomic_write(path, lambda temporary: figure.savefig(temporary, format="png", dpi=DPI))


def _seed_counts(counts: Sequence[int]) -> str:
    """``n = 3 seeds``, or ``n = 2-3 seeds`` when methods finished different numbers."""
    present = sorted({count for count in counts if count})
    if not present:
        return "no finished seeds"
    span = str(present[0]) if len(present) == 1 else f"{present[0]}-{present[-1]}"
    return f"n = {span} seed{'s' if present[-1] > 1 else ''}"


def plot_curves(
    histories: Mapping[str, Sequence[Sequence[EpochRecord]]],
    panels: Sequence[MetricSpec],
    path: str | Path,
    *,
    diverged: Mapping[str, int] | None = None,
) -> Path:
    """Per-epoch curves, one line per method: the mean over seeds and a ±1 std band.

    Args:
        histories: method -> one per-epoch history per seed.
        panels: one panel per metric, keyed as in the epoch records; bands are clipped to each
            metric's range, and the axis starts at the metric's lower bound when it has one.
        path: the PNG file to write.
        diverged: method -> how many of its runs diverged (said in the legend).

    An epoch that only some seeds reached (early stopping, divergence), or that some seeds
    measured, is averaged over those; values that are not finite are left out. Epochs that
    measured a metric at all are its points (a GAN's FID every few epochs).
    """
    diverged = diverged or {}
    figure, axes = _figure(len(panels), columns=2)
    # One colour per method in every panel, even where a method has no finite value; past ten
    # methods the colours come again, dashed.
    colours = {method: f"C{index % 10}" for index, method in enumerate(histories)}
    dashes = {method: "-" if index < 10 else "--" for index, method in enumerate(histories)}
    counts = []
    drawn = set()
    for spec, axis in zip(panels, axes, strict=True):
        for method, runs in histories.items():
            epochs, summaries = _per_epoch(runs, spec.key)
            if not epochs:
                continue
            drawn.add(method)
            counts.append(len(runs))
            mean = np.array([summary.mean for summary in summaries])
            spread = np.nan_to_num(np.array([summary.std for summary in summaries]))
            low = np.array([spec.clip(value) for value in mean - spread])
            high = np.array([spec.clip(value) for value in mean + spread])
            axis.plot(epochs, mean, dashes[method], marker="o", markersize=3, color=colours[method])
            axis.fill_between(epochs, low, high, color=colours[method], alpha=0.2)
        axis.set_title(textwrap.fill(spec.title, TITLE_WIDTH), fontsize="medium")
        axis.set_xlabel("epoch")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        if spec.lower is not None:
            axis.set_ylim(bottom=spec.lower)
        axis.grid(alpha=0.3)
    # The legend names the methods drawn, and those that diverged (which may have no line); a
    # figure of values only some methods record (a measurement) leaves the others out.
    shown = {
        method: runs
        for method, runs in histories.items()
        if method in drawn or diverged.get(method)
    }
    handles = [
        Line2D([], [], linestyle=dashes[method], color=colours[method], marker="o", markersize=3)
        for method in shown
    ]
    labels = [
        f"{method} ({diverged[method]} of {len(runs)} diverged)" if diverged.get(method) else method
        for method, runs in shown.items()
    ]
    figure.legend(handles, labels, loc="outside lower center", ncols=min(6, len(labels)))
    figure.suptitle(f"mean over seeds, band: ± sample std ({_seed_counts(counts)} per method)")
    return _save(figure, path)


def _per_epoch(runs: Sequence[Sequence[EpochRecord]], key: str) -> tuple[list[int], list[Summary]]:
    values: dict[int, list[float]] = {}
    for history in runs:
        for record in history:
            if key in record and math.isfinite(record[key]):
                values.setdefault(int(record["epoch"]) + 1, []).append(float(record[key]))
    epochs = sorted(values)
    return epochs, [summarize(values[epoch]) for epoch in epochs]


def plot_metric_summary(
    summaries: Mapping[str, Mapping[str, Summary]],
    differences: Mapping[str, Mapping[str, Difference]],
    view_titles: Mapping[str, str],
    metric: MetricSpec,
    baseline: str | None,
    path: str | Path,
) -> Path:
    """A dot plot of one test metric per method and view, and the paired differences.

    Left: the mean over seeds with ±1 sample std. Right (when there is a baseline): each
    method minus the baseline, paired by seed, with the 95 % t interval; filled markers are
    differences the runs support (the interval excludes 0), hollow ones are not.

    Args:
        summaries: method -> view -> the metric's summary.
        differences: method -> view -> its difference to the baseline (baseline left out).
        view_titles: view -> legend text.
        metric: the metric.
        baseline: the baseline's label, or ``None`` to leave out the differences.
        path: the PNG file to write.
    """
    methods = list(summaries)
    views = list(view_titles)
    columns = 2 if baseline is not None else 1
    figure = Figure(
        figsize=(5.2 * columns, max(2.6, 0.45 * len(methods) * max(1, len(views)) + 1.6)),
        layout="constrained",
    )
    FigureCanvasAgg(figure)
    axes = list(np.atleast_1d(figure.subplots(1, columns, sharey=True, squeeze=False)).ravel())
    rows = np.arange(len(methods))[::-1].astype(float)
    offset = 0.6 / max(1, len(views))
    scale = 100.0 if metric.percent else 1.0
    unit = " (%)" if metric.percent else ""
    for position, view in enumerate(views):
        shift = (position - (len(views) - 1) / 2) * offset
        means = np.array([summaries[method][view].mean for method in methods]) * scale
        spreads = np.nan_to_num([summaries[method][view].std for method in methods]) * scale
        (points, *_) = axes[0].errorbar(
            means, rows - shift, xerr=spreads, fmt="o", capsize=3, label=view_titles[view]
        )
        if columns == 2:
            colour = points.get_color()
            for row, method in zip(rows, methods, strict=True):
                difference = differences.get(method, {}).get(view)
                if difference is None or math.isnan(difference.mean):
                    continue
                error = (
                    None
                    if math.isnan(difference.low)
                    else [
                        [(difference.mean - difference.low) * scale],
                        [(difference.high - difference.mean) * scale],
                    ]
                )
                axes[1].errorbar(
                    [difference.mean * scale],
                    [row - shift],
                    xerr=error,
                    fmt="o",
                    capsize=3,
                    color=colour,
                    markerfacecolor=colour if difference.supported else "white",
                )
    counts = [summary.count for method in methods for summary in summaries[method].values()]
    axes[0].set_yticks(rows, methods)
    axes[0].set_xlabel(textwrap.fill(f"test {metric.title}{unit}", TITLE_WIDTH))
    axes[0].set_title(f"mean ± sample std ({_seed_counts(counts)})", fontsize="medium")
    lower = None if metric.lower is None else metric.lower * scale
    upper = None if metric.upper is None else metric.upper * scale
    axes[0].set_xlim(*_padded_limits(axes[0].get_xlim(), lower, upper))
    axes[0].grid(axis="x", alpha=0.3)
    if len(views) > 1:
        # Below the panels: inside, the legend would hide the first rows' points.
        handles, labels = axes[0].get_legend_handles_labels()
        figure.legend(handles, labels, loc="outside lower center", fontsize="small")
    if columns == 2:
        axes[1].axvline(0.0, color="0.3", linewidth=1)
        axes[1].set_xlabel(
            textwrap.fill(f"{metric.title}{unit} minus {baseline}'s, paired by seed", TITLE_WIDTH)
        )
        axes[1].set_title(
            "95 % t interval over seeds (filled: excludes 0)",
            fontsize="medium",
        )
        axes[1].grid(axis="x", alpha=0.3)
    return _save(figure, path)


def _padded_limits(
    limits: tuple[float, float], lower: float | None, upper: float | None
) -> tuple[float, float]:
    """The autoscaled limits, kept within the metric's range."""
    low, high = limits
    if lower is not None:
        low = max(low, lower)
    if upper is not None:
        high = min(high, upper)
    return low, high


def plot_activation_histograms(
    samples: Mapping[str, ActivationSample],
    num_components: int,
    context_names: Sequence[str],
    path: str | Path,
    *,
    seed: int = 0,
) -> Path:
    """Histogram of one input channel of each method's tested norm layer, with a fitted mixture.

    When the samples' contexts are known, the histogram is stacked by context (each context's
    part has the area of its share of the values). The curves are a 1-D Gaussian mixture with
    ``num_components`` components, the experiment's number of contexts, fitted to the values
    after training (scikit-learn, EM): a description of the trained activations, not the
    layer's own statistics. Dashed: the weighted components; solid: their sum.
    """
    from scipy.stats import norm
    from sklearn.mixture import GaussianMixture

    figure, axes = _figure(len(samples))
    for (method, sample), axis in zip(samples.items(), axes, strict=True):
        values = sample.channel_values.astype(np.float64)
        contexts = sample.channel_contexts
        axis.set_title(
            f"{method}: input of {sample.layer}, channel {sample.channel}", fontsize="medium"
        )
        finite = np.isfinite(values)
        if not finite.any():
            _diverged_panel(axis, "activations")
            continue
        values, contexts = values[finite], contexts[finite]
        edges = np.histogram_bin_edges(values, bins=HISTOGRAM_BINS)
        weights = np.full(len(values), 1.0 / (len(values) * np.diff(edges)[0] or 1.0))
        known = sorted(int(context) for context in np.unique(contexts) if context >= 0)
        if known and len(known) == len(np.unique(contexts)):
            axis.hist(
                [values[contexts == context] for context in known],
                bins=edges,
                weights=[weights[contexts == context] for context in known],
                stacked=True,
                histtype="stepfilled",
                alpha=0.55,
                label=[_context_name(context, context_names) for context in known],
            )
        else:
            axis.hist(values, bins=edges, weights=weights, color="0.75", label="activations")
        grid = np.linspace(values.min(), values.max(), 400)
        if np.ptp(values) > 0 and len(values) > num_components:
            mixture = GaussianMixture(num_components, random_state=seed).fit(values[:, None])
            order = np.argsort(mixture.means_.ravel())
            densities = [
                weight * norm.pdf(grid, mean, math.sqrt(variance))
                for weight, mean, variance in zip(
                    mixture.weights_[order],
                    mixture.means_.ravel()[order],
                    mixture.covariances_.ravel()[order],
                    strict=True,
                )
            ]
            for index, density in enumerate(densities):
                # Greys and dash patterns: the colours belong to the contexts.
                axis.plot(
                    grid,
                    density,
                    color="0.2",
                    linestyle=COMPONENT_STYLES[index % len(COMPONENT_STYLES)],
                    linewidth=1.2,
                    label=f"fitted component {index + 1}",
                )
            axis.plot(
                grid,
                np.sum(densities, axis=0),
                color="black",
                linewidth=1.8,
                label="fitted mixture",
            )
        axis.set_xlabel("activation")
        axis.set_ylabel("density")
        axis.legend(fontsize="x-small")
    figure.suptitle(
        f"Bars: values by context. Curves: a {num_components}-component Gaussian mixture "
        "fitted to the values after training (K = the number of contexts)",
        fontsize="medium",
    )
    return _save(figure, path)


def _diverged_panel(axis: Axes, what: str) -> None:
    """A diverged run still gets its panel, saying why it is empty."""
    _empty_panel(axis, f"no finite {what}\n(the run diverged)")


def _empty_panel(axis: Axes, why: str) -> None:
    """A panel with nothing to draw says why."""
    axis.text(0.5, 0.5, why, ha="center", va="center", transform=axis.transAxes)


def _context_name(context: int, names: Sequence[str]) -> str:
    if context < 0:
        return "unknown context"
    return names[context] if context < len(names) else f"context {context}"


def plot_feature_projection(
    samples: Mapping[str, ActivationSample],
    context_names: Sequence[str],
    path: str | Path,
    *,
    method: str = "pca",
    seed: int = 0,
) -> Path:
    """2-D projection (PCA, or t-SNE) of each method's normalised features, coloured by context.

    Features are the tested layer's output averaged over positions, one point per sample.
    """
    if method not in ("pca", "tsne"):
        raise ValueError(f"method must be 'pca' or 'tsne', got {method!r}")
    figure, axes = _figure(len(samples))
    for (name, sample), axis in zip(samples.items(), axes, strict=True):
        features = sample.features[:MAX_PROJECTED_POINTS].astype(np.float64)
        contexts = sample.contexts[:MAX_PROJECTED_POINTS]
        axis.set_title(f"{name}: output of {sample.layer} ({method.upper()})", fontsize="medium")
        axis.set_xticks([])
        axis.set_yticks([])
        finite = np.isfinite(features).all(1)
        if not finite.any():
            _diverged_panel(axis, "features")
            continue
        features, contexts = features[finite], contexts[finite]
        points = _project(features, method, seed)
        for context in np.unique(contexts):
            chosen = contexts == context
            axis.scatter(
                points[chosen, 0],
                points[chosen, 1],
                s=6,
                alpha=0.7,
                label=_context_name(int(context), context_names),
            )
    # A legend wherever the contexts differ from the first panel's (methods with their own).
    shown: set[str] = set()
    for axis in axes:
        labels = tuple(axis.get_legend_handles_labels()[1])
        if labels and str(labels) not in shown:
            axis.legend(fontsize="x-small", markerscale=2)
            shown.add(str(labels))
    return _save(figure, path)


def _project(features: np.ndarray, method: str, seed: int) -> np.ndarray:
    if len(features) < 3 or features.shape[1] < 2:
        padded = np.zeros((len(features), 2))
        padded[:, : min(2, features.shape[1])] = features[:, :2]
        return padded
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    if method == "pca":
        return PCA(2, random_state=seed).fit_transform(features)
    perplexity = min(30.0, (len(features) - 1) / 3)
    return TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(features)


def plot_run_images(
    images: Mapping[str, tuple[int, Path]], path: str | Path, title: str = ""
) -> Path:
    """One panel per method showing an image file one of its runs wrote (e.g. sample grids).

    Args:
        images: method -> (the run's seed, the PNG file).
        path: the PNG file to write.
        title: what the images show.
    """
    figure, axes = _figure(len(images))
    for (method, (seed, image)), axis in zip(images.items(), axes, strict=True):
        pixels = imread(image)
        axis.imshow(pixels, cmap="gray" if pixels.ndim == 2 else None, interpolation="nearest")
        axis.set_title(f"{method} (seed {seed})", fontsize="medium")
        axis.set_xticks([])
        axis.set_yticks([])
    if title:
        figure.suptitle(textwrap.fill(title, TITLE_WIDTH * min(3, len(images))), fontsize="medium")
    return _save(figure, path)


def plot_mixture_usage(
    histories: Mapping[str, Sequence[Sequence[EpochRecord]]],
    components: Mapping[str, int],
    weights: Mapping[str, tuple[int, Mapping[str, Sequence[float]]]],
    path: str | Path,
) -> Path:
    """How the mixture layers use their K components over training, and their final weights.

    Top: per epoch, the components in use (``exp`` of the entropy of a layer's mixture
    weights, 1 to K) and the posterior entropy of a position (0 to log K nats), the median over
    a model's mixture layers (solid: mean over seeds, band ±1 sample std, clipped to the range)
    and the minimum over its layers (dashed: mean over seeds). Below: one panel per method with
    each layer's final mixture weights, stacked (one run).

    Args:
        histories: method -> one per-epoch history per seed (keys of
            :func:`~contextnorm.metrics.mixture_summary_key`).
        components: method -> K, the components of its mixture layers.
        weights: method -> (the seed shown, layer name -> its final weights, in forward order).
        path: the PNG file to write.
    """
    largest = max(components.values())
    quantities = [
        (MIXTURE_COMPONENTS, "components in use", 1.0, float, largest),
        (MIXTURE_ENTROPY, "posterior entropy (nats)", 0.0, math.log, math.log(largest)),
    ]
    columns = 2
    rows = 1 + math.ceil(len(weights) / columns)
    figure = Figure(
        figsize=(PANEL_SIZE[0] * 1.3 * columns, PANEL_SIZE[1] * rows), layout="constrained"
    )
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(rows, columns)
    colours = {method: f"C{index % 10}" for index, method in enumerate(histories)}
    counts = []
    for column, (quantity, title, lower, bound, top) in enumerate(quantities):
        axis = figure.add_subplot(grid[0, column])
        for method, runs in histories.items():
            upper = bound(components[method])
            epochs, medians = _per_epoch(runs, mixture_summary_key(quantity, "median"))
            if not epochs:
                continue
            counts.append(len(runs))
            mean = np.array([summary.mean for summary in medians])
            spread = np.nan_to_num(np.array([summary.std for summary in medians]))
            colour = colours[method]
            axis.plot(epochs, mean, "-", marker="o", markersize=3, color=colour, label=method)
            axis.fill_between(
                epochs,
                np.clip(mean - spread, lower, upper),
                np.clip(mean + spread, lower, upper),
                color=colour,
                alpha=0.2,
            )
            low_epochs, minima = _per_epoch(runs, mixture_summary_key(quantity, "min"))
            axis.plot(low_epochs, [summary.mean for summary in minima], "--", color=colour)
        pad = 0.04 * (top - lower)
        axis.set_ylim(lower - pad, top + pad)
        axis.set_title(f"{title}, over mixture layers", fontsize="medium")
        axis.set_xlabel("epoch")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
    # Below the panels: inside, the legend would hide the curves near the bounds.
    handles = [
        Line2D([], [], color=colours[method], marker="o", markersize=3) for method in histories
    ]
    handles += [Line2D([], [], color="0.3", linestyle=style) for style in ("-", "--")]
    labels = [*histories, "median over layers", "min over layers"]
    figure.legend(handles, labels, loc="outside lower center", ncols=min(6, len(labels)))
    for position, (method, (seed, layers)) in enumerate(weights.items()):
        axis = figure.add_subplot(grid[1 + position // columns, position % columns])
        shares = np.array(
            [np.asarray(w, dtype=float) / max(sum(w), 1e-30) for w in layers.values()]
        )
        positions = np.arange(1, len(shares) + 1)
        bottom = np.zeros(len(shares))
        for component in range(shares.shape[1]):
            axis.bar(
                positions,
                shares[:, component],
                bottom=bottom,
                width=0.85,
                color=f"C{component % 10}",
                alpha=0.75,
                label=f"component {component + 1}",
            )
            bottom += shares[:, component]
        axis.set_ylim(0.0, 1.0)
        axis.set_xlabel("mixture layer (forward order)")
        axis.set_ylabel("mixture weight")
        # Every layer numbered when there are few; a locator would put ticks between them.
        if len(positions) <= 12:
            axis.set_xticks(positions)
        else:
            axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_title(f"{method} (seed {seed}): final weights per layer", fontsize="medium")
        axis.legend(fontsize="x-small", loc="lower right")
    if counts:
        title = (
            "Mixture layers' use of their components (running averages over training batches); "
            f"mean over seeds, band: ± sample std ({_seed_counts(counts)} per method)"
        )
    else:
        # Runs saved before the usage was logged per epoch keep only their final weights.
        title = "Mixture layers' final weights (these runs recorded no per-epoch usage)"
        for column in range(len(quantities)):
            _empty_panel(figure.axes[column], "no per-epoch record in these runs")
    figure.suptitle(title, fontsize="medium")
    return _save(figure, path)
