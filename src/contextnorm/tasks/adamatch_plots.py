"""The gradient-variance figure of the domain-adaptation experiments (see
:mod:`contextnorm.tasks.adamatch_gradients` for what is measured)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.ticker import MaxNLocator

from contextnorm.plots import EpochRecord, _figure, _per_epoch, _save
from contextnorm.tasks.adamatch_gradients import STATISTICS, metric_name


def plot_gradient_variance(
    histories: Mapping[str, Sequence[Sequence[EpochRecord]]],
    path: str | Path,
    *,
    domain_names: tuple[str, str] = ("source", "target"),
) -> Path:
    """Max and mean gradient variance per epoch, source and target, one line per method.

    Args:
        histories: method label -> one per-epoch history per seed, records holding
            ``epoch`` and ``grad_variance/<domain>/<max|mean>`` (the :class:`GradientVariance`
            records, or epoch records that include them).
        path: the PNG file to write.
        domain_names: how the panels name the source and the target (e.g. "MNIST", "SVHN").

    Rows: source, target; columns: max, mean over weights. Lines are the mean over seeds, the
    band spans the lowest to the highest seed (variances stay >= 0), and the legend gives the
    number of seeds. The y axes start at 0. A method without target term (source-only) has no
    target line.
    """
    figure, axes = _figure(4, columns=2)
    panels = [(domain, statistic) for domain in ("source", "target") for statistic in STATISTICS]
    for (domain, statistic), axis in zip(panels, axes, strict=True):
        key = metric_name(domain, statistic)
        for method, runs in histories.items():
            epochs, summaries = _per_epoch(runs, key)
            if not epochs:
                continue
            values = _seed_values(runs, key, epochs)
            (line,) = axis.plot(
                epochs,
                [summary.mean for summary in summaries],
                marker="o",
                markersize=3,
                label=f"{method} (n = {len(runs)} seed{'s' if len(runs) > 1 else ''})",
            )
            axis.fill_between(
                epochs,
                np.nanmin(values, 0),
                np.nanmax(values, 0),
                color=line.get_color(),
                alpha=0.2,
            )
        name = domain_names[0] if domain == "source" else domain_names[1]
        axis.set_title(f"{domain} ({name}): {statistic} over weights")
        axis.set_xlabel("epoch")
        axis.set_ylabel("gradient variance across steps")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_ylim(bottom=0.0)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    figure.suptitle(
        "Per-epoch variance of each weight's mini-batch gradient "
        "(line: mean over seeds; band: lowest to highest seed)",
        fontsize="medium",
    )
    return _save(figure, path)


def _seed_values(
    runs: Sequence[Sequence[EpochRecord]], key: str, epochs: Sequence[int]
) -> np.ndarray:
    """(seeds, epochs) values of ``key``, NaN where a seed has no value for an epoch."""
    values = np.full((len(runs), len(epochs)), np.nan)
    column = {epoch: position for position, epoch in enumerate(epochs)}
    for row, history in enumerate(runs):
        for record in history:
            epoch = int(record["epoch"]) + 1
            if key in record and epoch in column:
                values[row, column[epoch]] = float(record[key])
    return values
