"""Figures of an experiment, drawn with matplotlib's Agg canvas into PNG files.

Figures are built on :class:`matplotlib.figure.Figure` directly (no pyplot), so drawing
them neither needs a display nor changes the backend of a program that imports this module.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy.stats import norm
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE
from sklearn.mixture import GaussianMixture

from contextnorm.io import atomic_write
from contextnorm.metrics import Summary, summarize
from contextnorm.training.activations import ActivationSample

EpochRecord = Mapping[str, float]
CURVE_PANELS = (
    ("train/loss", "training loss"),
    ("val/loss", "validation loss"),
    ("train/accuracy", "training accuracy"),
    ("val/accuracy", "validation accuracy"),
)
PANEL_SIZE = (4.2, 3.2)
DPI = 110
HISTOGRAM_BINS = 80
MAX_PROJECTED_POINTS = 2000


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


def plot_curves(histories: Mapping[str, Sequence[Sequence[EpochRecord]]], path: str | Path) -> Path:
    """Training and validation loss and accuracy per epoch, one line per method.

    Args:
        histories: method -> one per-epoch history per seed (records with ``train/loss``,
            ``val/loss``, ``train/accuracy``, ``val/accuracy``).
        path: the PNG file to write.

    Lines are the mean over seeds, the shaded band one standard deviation either side; an
    epoch that only some seeds reached (early stopping) is averaged over those seeds.
    """
    figure, axes = _figure(len(CURVE_PANELS), columns=2)
    for (key, title), axis in zip(CURVE_PANELS, axes, strict=True):
        for method, runs in histories.items():
            epochs, summaries = _per_epoch(runs, key)
            if not epochs:
                continue
            mean = np.array([summary.mean for summary in summaries])
            spread = np.nan_to_num(np.array([summary.std for summary in summaries]))
            (line,) = axis.plot(epochs, mean, marker="o", markersize=3, label=method)
            axis.fill_between(
                epochs, mean - spread, mean + spread, color=line.get_color(), alpha=0.2
            )
        axis.set_title(title)
        axis.set_xlabel("epoch")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    return _save(figure, path)


def _per_epoch(runs: Sequence[Sequence[EpochRecord]], key: str) -> tuple[list[int], list[Summary]]:
    values: dict[int, list[float]] = {}
    for history in runs:
        for record in history:
            if key in record:
                values.setdefault(int(record["epoch"]) + 1, []).append(float(record[key]))
    epochs = sorted(values)
    return epochs, [summarize(values[epoch]) for epoch in epochs]


def plot_activation_histograms(
    samples: Mapping[str, ActivationSample], num_components: int, path: str | Path, *, seed: int = 0
) -> Path:
    """Histogram of one input channel of each method's tested norm layer, with a fitted mixture.

    As in Fig. 2 of the cluster-based normalization paper: a 1-D Gaussian mixture with
    ``num_components`` components is fitted (scikit-learn, EM) to the values; dashed curves are
    the weighted components, the solid curve their sum.
    """
    figure, axes = _figure(len(samples))
    for (method, sample), axis in zip(samples.items(), axes, strict=True):
        values = sample.channel_values.astype(np.float64)
        axis.set_title(
            f"{method}: input of {sample.layer}, channel {sample.channel}", fontsize="medium"
        )
        finite = np.isfinite(values)
        if not finite.any():
            # A diverged run still gets its panel, saying why it is empty.
            axis.text(0.5, 0.5, "no finite activations\n(the run diverged)", ha="center",
                      va="center", transform=axis.transAxes)
            continue
        values = values[finite]
        axis.hist(values, bins=HISTOGRAM_BINS, density=True, color="0.75", label="activations")
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
                axis.plot(
                    grid, density, linestyle="--", linewidth=1.2, label=f"component {index + 1}"
                )
            axis.plot(
                grid, np.sum(densities, axis=0), color="green", linewidth=1.8, label="mixture"
            )
        axis.set_xlabel("activation")
        axis.set_ylabel("density")
    axes[0].legend(fontsize="x-small")
    return _save(figure, path)


def plot_feature_projection(
    samples: Mapping[str, ActivationSample],
    context_names: Sequence[str],
    path: str | Path,
    *,
    method: str = "pca",
    seed: int = 0,
) -> Path:
    """2-D projection (PCA, or t-SNE) of each method's normalised features, coloured by context.

    Features are the tested layer's output averaged over positions, one point per image.
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
            axis.text(0.5, 0.5, "no finite features\n(the run diverged)", ha="center",
                      va="center", transform=axis.transAxes)
            continue
        features, contexts = features[finite], contexts[finite]
        points = _project(features, method, seed)
        for context in np.unique(contexts):
            chosen = contexts == context
            label = (
                context_names[context]
                if 0 <= context < len(context_names)
                else f"context {context}"
            )
            axis.scatter(points[chosen, 0], points[chosen, 1], s=6, alpha=0.7, label=label)
    axes[0].legend(fontsize="x-small", markerscale=2)
    return _save(figure, path)


def _project(features: np.ndarray, method: str, seed: int) -> np.ndarray:
    if len(features) < 3 or features.shape[1] < 2:
        padded = np.zeros((len(features), 2))
        padded[:, : min(2, features.shape[1])] = features[:, :2]
        return padded
    if method == "pca":
        return PCA(2, random_state=seed).fit_transform(features)
    perplexity = min(30.0, (len(features) - 1) / 3)
    return TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(features)


def plot_metric_bars(
    summaries: Mapping[str, Mapping[str, Summary]],
    view_titles: Mapping[str, str],
    metric: str,
    path: str | Path,
) -> Path:
    """Bars of one test metric per method and view (mean over seeds, error bar: one std).

    Args:
        summaries: method -> view -> the metric's summary.
        view_titles: view -> legend text.
        metric: the metric's name, for the axis label.
        path: the PNG file to write.
    """
    methods = list(summaries)
    views = list(view_titles)
    figure = Figure(
        figsize=(max(5.0, 0.9 * len(methods) * max(1, len(views)) + 2), 3.6), layout="constrained"
    )
    FigureCanvasAgg(figure)
    axis = figure.subplots()
    width = 0.8 / len(views)
    positions = np.arange(len(methods))
    for offset, view in enumerate(views):
        means = [summaries[method][view].mean for method in methods]
        errors = np.nan_to_num([summaries[method][view].std for method in methods])
        axis.bar(
            positions + (offset - (len(views) - 1) / 2) * width,
            means,
            width,
            yerr=errors,
            capsize=3,
            label=view_titles[view],
        )
    axis.set_xticks(positions, methods)
    axis.set_ylabel(metric)
    axis.grid(axis="y", alpha=0.3)
    finite = [
        summaries[m][v].mean for m in methods for v in views if not math.isnan(summaries[m][v].mean)
    ]
    if finite:
        # Methods often differ by a few points; a zero baseline would hide the differences.
        low, high = min(finite), max(finite)
        axis.set_ylim(bottom=max(0.0, low - 0.1), top=1.0 if high <= 1.0 else None)
    if len(views) > 1:
        axis.legend(fontsize="small")
    return _save(figure, path)
