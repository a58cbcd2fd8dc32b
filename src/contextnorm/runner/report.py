"""Tables and figures from a results folder, without training and without knowing the task.

``write_report(results_dir)`` reads the folder (see :mod:`contextnorm.runner.folder`): the
config, the task's description of its metrics and views, and every run's ``result.json`` (and
``activations.npz``), and writes ``results.md``, ``results.csv`` and the PNG figures. The
runner calls it after each run; ``contextnorm report`` calls it on a folder at any time, also
while the experiment is still running, and figures follow the folder's current ``plots:``.

Every table gives, per method, the mean ± sample std over the seeds that finished, and its
paired difference to the baseline (``report.baseline``, by default the first method) with a
95 % Student's t interval over seeds; ``*`` marks an interval that excludes zero.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from contextnorm.io import atomic_write_text
from contextnorm.metrics import (
    CONFIDENCE,
    Difference,
    EpochRecord,
    MetricSpec,
    paired_difference,
    summarize,
)
from contextnorm.runner.activations import ActivationSample
from contextnorm.runner.folder import (
    ACTIVATIONS_FILE,
    RESULTS_CSV,
    RESULTS_MARKDOWN,
    ExperimentResults,
    MethodResults,
    load_results,
    run_directory,
)

GAP_TITLE = "train/eval gap, median (max)"
GAP_STATISTICS = ("median", "max")


def write_report(results_dir: str | Path, *, figures: bool = True) -> Path:
    """Write ``results.md``, ``results.csv`` and (with ``figures``) the figures from saved results.

    Returns:
        The path of ``results.md``.
    """
    results = load_results(results_dir)
    atomic_write_text(results.results_dir / RESULTS_CSV, render_csv(results))
    written = draw_figures(results) if figures else []
    return atomic_write_text(
        results.results_dir / RESULTS_MARKDOWN, render_markdown(results, written)
    )


def difference(
    results: ExperimentResults, method: MethodResults, view: str, metric: str
) -> Difference | None:
    """``method`` minus the baseline in one view, paired by seed; ``None`` for the baseline."""
    baseline = results.baseline()
    if baseline is None or method.label == baseline.label:
        return None
    return paired_difference(method.values(view, metric), baseline.values(view, metric))


def _seeds(method: MethodResults) -> str:
    """``3``, or ``2 of 3 (1 diverged)``."""
    done, diverged = len(method.finished()), len(method.diverged())
    if not diverged:
        return str(done)
    return f"{done} of {done + diverged} ({diverged} diverged)"


def _difference_cell(
    results: ExperimentResults, method: MethodResults, view: str, spec: MetricSpec
) -> str:
    found = difference(results, method, view, spec.key)
    return "baseline" if found is None else spec.format(found)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def headline_table(results: ExperimentResults) -> str:
    """The headline metric per method in every view, its difference to the baseline, the
    train/eval gap of the norm layers, s/epoch."""
    spec = results.spec.headline
    baseline = results.config.baseline
    header = ["method", "seeds"]
    for view in results.views:
        header += [f"{spec.title}, {results.spec.views[view].title}", f"Δ vs {baseline}"]
    header += [GAP_TITLE, "s/epoch"]
    rows = []
    for method in results.present():
        row = [method.label, _seeds(method)]
        for view in results.views:
            row += [
                spec.format(method.summary(view, spec.key)),
                _difference_cell(results, method, view, spec),
            ]
        row += [_gap_cell(method), method.time_per_epoch().format(digits=2)]
        rows.append(row)
    return _table(header, rows)


def _gap_cell(method: MethodResults) -> str:
    """``median (max)`` of the runs' train/eval gaps, each a mean over the seeds that measured
    it; ``n/a`` when none did (results of an earlier version, or no layer with running
    estimates)."""
    median, largest = method.train_eval_gap("median"), method.train_eval_gap("max")
    if not median.count:
        return "n/a"
    return f"{median.mean:.3g} ({largest.mean:.3g})"


def code_versions(results: ExperimentResults) -> str:
    """Which code versions made the runs in the tables, with how many runs each."""
    counts: dict[str, int] = {}
    for method in results.present():
        for record in method.records:
            version = record.code or "not recorded (an earlier version)"
            counts[version] = counts.get(version, 0) + 1
    if len(counts) == 1:
        version, count = next(iter(counts.items()))
        return f"contextnorm {version}, every run ({count})"
    listed = ", ".join(f"{version} ({count} runs)" for version, count in sorted(counts.items()))
    return (
        f"runs made with {len(counts)} code versions: {listed}; `reuse=code` trains the runs "
        "of another version than the one running again"
    )


def render_markdown(results: ExperimentResults, figures: Sequence[Path] = ()) -> str:
    """The text of ``results.md``."""
    config, spec = results.config, results.spec
    percent = any(metric.percent for metric in spec.metrics)
    lines = [
        f"# Results: {config.name}",
        "",
        *(f"- {line}" for line in spec.about),
        f"- code: {code_versions(results)}",
        "- numbers: mean ± sample standard deviation (n - 1) over the seeds that finished"
        + ("; metrics in % where their values are shares" if percent else "")
        + ".",
        f"- Δ: the difference to {config.baseline} paired by seed, over the seeds both "
        f"finished, with its {100 * CONFIDENCE:.0f} % interval (Student's t over seeds, n - 1 "
        "degrees of freedom); * marks an interval that excludes 0, a difference these runs "
        "support. With one seed there is no interval.",
        f"- {GAP_TITLE}: after training, each norm layer with running estimates normalises one "
        "held-out batch of training-batch size in eval mode and, as a copy, in training mode "
        "(on the input eval mode gave it); its gap is mean |y_train - y_eval| / mean |y_eval|. "
        "The median and the max over the model's layers, each averaged over the seeds; n/a: "
        "not measured (a result of an earlier version, or no layer with running estimates).",
        "",
        "Test views (what the model is given at test time):",
        "",
        *(f"- **{view.title}**: {view.description}" for view in spec.views.values()),
    ]
    for note in spec.notes:
        lines += ["", note]
    headline = spec.headline
    lines += [
        "",
        f"## Test {headline.title}{' (%)' if headline.percent else ''}",
        "",
        headline_table(results),
    ]
    diverged = [
        f"{record.method} seed {record.seed} in epoch {record.diverged_at} ({record.divergence})"
        for method in results.present()
        for record in method.diverged()
    ]
    if diverged:
        lines += ["", "Diverged runs (left out of the means): " + "; ".join(diverged) + "."]
    for view in results.views:
        header = ["method"]
        for metric in spec.metrics:
            header += [metric.title + (" (%)" if metric.percent else ""), "Δ"]
        rows = []
        for method in results.finished():
            row = [method.label]
            for metric in spec.metrics:
                row += [
                    metric.format(method.summary(view, metric.key)),
                    _difference_cell(results, method, view, metric),
                ]
            rows.append(row)
        lines += ["", f"## All test metrics, {spec.views[view].title}", "", _table(header, rows)]
    if figures:
        lines += ["", "## Figures", ""]
        lines += [
            f"![{path.stem}]({path.relative_to(results.results_dir).as_posix()})"
            for path in figures
        ]
    return "\n".join(lines) + "\n"


def render_csv(results: ExperimentResults) -> str:
    """The text of ``results.csv``: a row per method.

    Columns: ``seeds`` (finished), ``diverged``, mean epochs, seconds per epoch, the train/eval
    gap's median and max over layers (``train_eval_gap_<median|max>_<mean|std>`` over seeds,
    empty when not measured), then for each
    view and metric ``<view>_<metric>_mean``, ``_std`` and the paired difference to the
    baseline, ``_diff``, ``_diff_low``, ``_diff_high`` (its interval), ``_diff_seeds``.
    """
    spec = results.spec
    header = [
        "method",
        "name",
        "seeds",
        "diverged",
        "epochs",
        "time_per_epoch_s_mean",
        "time_per_epoch_s_std",
        *(
            f"train_eval_gap_{statistic}_{part}"
            for statistic in GAP_STATISTICS
            for part in ("mean", "std")
        ),
    ]
    parts = ("mean", "std", "diff", "diff_low", "diff_high", "diff_seeds")
    header += [
        f"{view}_{metric.key}_{part}"
        for view in results.views
        for metric in spec.metrics
        for part in parts
    ]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for method in results.present():
        time = method.time_per_epoch()
        epochs = summarize([record.epochs for record in method.finished()])
        row: list[Any] = [
            method.label,
            method.name,
            len(method.finished()),
            len(method.diverged()),
            epochs.mean,
            time.mean,
            time.std,
        ]
        for statistic in GAP_STATISTICS:
            gap = method.train_eval_gap(statistic)
            row += [gap.mean, gap.std] if gap.count else ["", ""]
        for view in results.views:
            for metric in spec.metrics:
                summary = method.summary(view, metric.key)
                found = difference(results, method, view, metric.key)
                row += [summary.mean, summary.std]
                row += (
                    ["", "", "", ""]
                    if found is None
                    else [found.mean, found.low, found.high, found.count]
                )
        writer.writerow(row)
    return buffer.getvalue()


def draw_figures(results: ExperimentResults) -> list[Path]:
    """Curves, the headline metric with differences, activation figures, and a figure per run
    image of the task (``ReportSpec.run_images``) with a panel per method, from its first seed."""
    # matplotlib loads in a fraction of a second but is not needed for tables.
    from contextnorm.runner.plots import (
        plot_activation_histograms,
        plot_curves,
        plot_feature_projection,
        plot_metric_summary,
        plot_mixture_usage,
        plot_run_images,
    )

    present = results.present()
    finished = results.finished()
    if not present:
        return []
    folder, spec = results.results_dir, results.spec
    headline = spec.headline
    histories = {method.label: [record.history for record in method.records] for method in present}
    diverged = {method.label: len(method.diverged()) for method in present}
    written = [
        plot_curves(histories, panels, folder / f"{name}.png", diverged=diverged)
        for name, panels in {"curves": spec.curves, **spec.curve_figures}.items()
    ]
    if finished:
        baseline = results.baseline()
        written.append(
            plot_metric_summary(
                {
                    method.label: {
                        view: method.summary(view, headline.key) for view in results.views
                    }
                    for method in finished
                },
                {
                    method.label: {
                        view: found
                        for view in results.views
                        if (found := difference(results, method, view, headline.key)) is not None
                    }
                    for method in finished
                },
                {view: spec.views[view].title for view in results.views},
                headline,
                None if baseline is None or len(finished) < 2 else baseline.label,
                folder / f"test_{headline.key}.png",
            )
        )
    usage = _mixture_usage(results)
    if usage is not None:
        written.append(plot_mixture_usage(*usage, folder / "mixture_usage.png"))
    samples = _activation_samples(results)
    if samples:
        written.append(
            plot_activation_histograms(
                samples, spec.num_contexts, spec.context_names, folder / "activations.png"
            )
        )
        written.append(
            plot_feature_projection(samples, spec.context_names, folder / "features_pca.png")
        )
        if results.config.plots.tsne:
            written.append(
                plot_feature_projection(
                    samples, spec.context_names, folder / "features_tsne.png", method="tsne"
                )
            )
    for name, caption in spec.run_images.items():
        images = {}
        for method in finished:
            seed = method.finished()[0].seed
            image = run_directory(folder, method.label, seed) / name
            if image.is_file():
                images[method.label] = (seed, image)
        if images:
            written.append(plot_run_images(images, folder / name, caption))
    return written


def _activation_samples(results: ExperimentResults) -> dict[str, ActivationSample]:
    """Each method's recorded activations (its first seed that has them) that match the
    folder's figure settings."""
    samples = {}
    for method in results.finished():
        for record in method.finished():
            path = run_directory(results.results_dir, method.label, record.seed) / ACTIVATIONS_FILE
            sample = ActivationSample.load(path) if path.is_file() else None
            if sample is not None and sample.matches(results.config.plots):
                samples[method.label] = sample
                break
    return samples


def _mixture_usage(
    results: ExperimentResults,
) -> tuple[dict[str, list[list[EpochRecord]]], dict[str, int], dict[str, tuple[int, dict]]] | None:
    """The arguments of :func:`~contextnorm.runner.plots.plot_mixture_usage`, for the methods
    whose finished runs recorded mixture layers (``None`` when no method did)."""
    histories, components, weights = {}, {}, {}
    for method in results.finished():
        measured = [record for record in method.finished() if record.mixture]
        if not measured:
            continue
        first = measured[0]
        histories[method.label] = [record.history for record in measured]
        components[method.label] = max(len(layer["weights"]) for layer in first.mixture)
        weights[method.label] = (
            first.seed,
            {layer["layer"]: layer["weights"] for layer in first.mixture},
        )
    if not histories:
        return None
    return histories, components, weights
