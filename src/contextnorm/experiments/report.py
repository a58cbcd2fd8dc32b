"""Tables and figures from a results folder, without training.

``write_report(results_dir)`` reads ``config.yaml``, ``experiment.json`` and every finished
run's ``result.json`` (and ``activations.npz``), and writes ``results.md``, ``results.csv``
and the PNG figures. The experiment runner calls it after each run; ``contextnorm report``
calls it on a folder at any time, also while the experiment is still running.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from contextnorm.config import ExperimentConfig, parse_config
from contextnorm.io import atomic_write_text
from contextnorm.metrics import METRIC_TITLES, Summary, summarize
from contextnorm.plots import (
    plot_activation_histograms,
    plot_curves,
    plot_feature_projection,
    plot_metric_bars,
)
from contextnorm.training.activations import ActivationSample

CONFIG_FILE = "config.yaml"
EXPERIMENT_FILE = "experiment.json"
RESULT_FILE = "result.json"
ACTIVATIONS_FILE = "activations.npz"
RESULTS_MARKDOWN = "results.md"
RESULTS_CSV = "results.csv"
RUNS_FOLDER = "runs"
# Shown as percentages; the loss is shown as is.
PERCENT_METRICS = frozenset({"accuracy", "top5", "precision", "recall", "f1"})
VIEW_COLUMNS = {
    "input": "context from input",
    "oracle": "oracle context",
    "predicted": "predicted context",
    "unknown": "unknown context",
}


def run_directory(results_dir: Path, label: str, seed: int) -> Path:
    """The folder of one (method, seed) run inside a results folder."""
    return (
        Path(results_dir) / RUNS_FOLDER / re.sub(r"[^A-Za-z0-9._-]+", "_", label) / f"seed-{seed}"
    )


@dataclass
class MethodResults:
    """The finished runs of one method, in seed order."""

    label: str
    name: str
    records: list[dict[str, Any]]

    def summary(self, view: str, metric: str) -> Summary:
        """Mean and std over seeds of a test metric in one view."""
        return summarize(
            [record["test"][view].get(metric, float("nan")) for record in self.records]
        )

    def time_per_epoch(self) -> Summary:
        """Mean and std over seeds of the seconds per epoch."""
        return summarize([record["time_per_epoch_s"] for record in self.records])


@dataclass
class ExperimentResults:
    """Everything a results folder holds about a (possibly unfinished) experiment."""

    results_dir: Path
    config: ExperimentConfig
    info: dict[str, Any]
    methods: list[MethodResults]

    @property
    def views(self) -> list[str]:
        return list(self.info["views"])

    def metrics(self) -> list[str]:
        """The test metrics present in the results, in table order."""
        present = {
            metric
            for method in self.methods
            for record in method.records
            for view in record["test"].values()
            for metric in view
        }
        return [metric for metric in METRIC_TITLES if metric in present]

    def finished(self) -> list[MethodResults]:
        """The methods with at least one finished run."""
        return [method for method in self.methods if method.records]


def load_results(results_dir: str | Path) -> ExperimentResults:
    """Read a results folder written by ``run_experiment``.

    Raises:
        FileNotFoundError: not a results folder (no ``config.yaml`` or ``experiment.json``).
    """
    results_dir = Path(results_dir)
    for required in (CONFIG_FILE, EXPERIMENT_FILE):
        if not (results_dir / required).is_file():
            raise FileNotFoundError(
                f"{results_dir} is not a results folder: {required} is missing; "
                "pass the output_dir of an experiment"
            )
    config = parse_config(yaml.safe_load((results_dir / CONFIG_FILE).read_text(encoding="utf-8")))
    info = json.loads((results_dir / EXPERIMENT_FILE).read_text(encoding="utf-8"))
    methods = []
    for method in config.methods:
        records = []
        for seed in config.train.seeds:
            path = run_directory(results_dir, method.display_name, seed) / RESULT_FILE
            if path.is_file():
                records.append(json.loads(path.read_text(encoding="utf-8")))
        methods.append(MethodResults(method.display_name, method.name, records))
    return ExperimentResults(results_dir, config, info, methods)


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


def _cell(summary: Summary, metric: str) -> str:
    return (
        summary.format(scale=100.0, digits=2)
        if metric in PERCENT_METRICS
        else summary.format(digits=4)
    )


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def headline_table(results: ExperimentResults) -> str:
    """Test accuracy (%) per method in every view, with the number of seeds and s per epoch."""
    header = [
        "method",
        "seeds",
        *(f"accuracy, {VIEW_COLUMNS.get(view, view)}" for view in results.views),
        "s/epoch",
    ]
    rows = [
        [
            method.label,
            str(len(method.records)),
            *(_cell(method.summary(view, "accuracy"), "accuracy") for view in results.views),
            method.time_per_epoch().format(digits=2),
        ]
        for method in results.finished()
    ]
    return _table(header, rows)


def render_markdown(results: ExperimentResults, figures: Sequence[Path] = ()) -> str:
    """The text of ``results.md``."""
    config, info = results.config, results.info
    samples = info["samples"]
    lines = [
        f"# Results: {config.name}",
        "",
        f"- data: {config.data.name}, {samples['train']} training / {samples['val']} validation / "
        f"{samples['test']} test images of shape {'x'.join(map(str, info['image_shape']))}, "
        f"{info['num_classes']} classes; augmentation: {info['augmentation']}",
        f"- contexts: {config.contexts.kind}, K = {info['num_contexts']} "
        f"({', '.join(info['context_names'])})",
        f"- model: {config.model.name}, tested norm placement: {config.model.placement}",
        f"- training: {config.train.epochs} epochs, batch {config.train.batch_size}, "
        f"{config.train.optimizer} lr {config.train.lr:g}, weight decay "
        f"{config.train.weight_decay:g}, schedule {config.train.schedule}",
        "- numbers: mean ± sample standard deviation over seeds (n - 1); accuracy-type metrics "
        "in %.",
        "",
        "Test views (which context the model is given at test time):",
        "",
        *(f"- **{VIEW_COLUMNS.get(view, view)}**: {text}" for view, text in info["views"].items()),
    ]
    if info.get("context_prediction_accuracy") is not None:
        lines += [
            "",
            "The context predictor recovers the true context of "
            f"{100 * info['context_prediction_accuracy']:.2f} % of the test images. Models without "
            "context layers ignore the context, so their views coincide.",
        ]
    lines += ["", "## Test accuracy (%)", "", headline_table(results)]
    metrics = results.metrics()
    for view in results.views:
        rows = [
            [method.label, *(_cell(method.summary(view, metric), metric) for metric in metrics)]
            for method in results.finished()
        ]
        lines += [
            "",
            f"## All test metrics, {VIEW_COLUMNS.get(view, view)}",
            "",
            _table(["method", *(METRIC_TITLES[metric] for metric in metrics)], rows),
        ]
    if figures:
        lines += ["", "## Figures", ""]
        lines += [f"![{path.stem}]({path.name})" for path in figures]
    return "\n".join(lines) + "\n"


def render_csv(results: ExperimentResults) -> str:
    """The text of ``results.csv``: a row per method, ``<view>_<metric>_mean``/``_std`` columns."""
    metrics = results.metrics()
    header = ["method", "name", "seeds", "epochs", "time_per_epoch_s_mean", "time_per_epoch_s_std"]
    header += [
        f"{view}_{metric}_{part}"
        for view in results.views
        for metric in metrics
        for part in ("mean", "std")
    ]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for method in results.finished():
        time = method.time_per_epoch()
        epochs = summarize([record["epochs"] for record in method.records])
        row: list[Any] = [
            method.label,
            method.name,
            len(method.records),
            epochs.mean,
            time.mean,
            time.std,
        ]
        for view in results.views:
            for metric in metrics:
                summary = method.summary(view, metric)
                row += [summary.mean, summary.std]
        writer.writerow(row)
    return buffer.getvalue()


def draw_figures(results: ExperimentResults) -> list[Path]:
    """Draw curves, test-accuracy bars, activation histograms and projections; return the files."""
    finished = results.finished()
    if not finished:
        return []
    folder = results.results_dir
    written = [
        plot_curves(
            {method.label: [record["history"] for record in method.records] for method in finished},
            folder / "curves.png",
        ),
        plot_metric_bars(
            {
                method.label: {view: method.summary(view, "accuracy") for view in results.views}
                for method in finished
            },
            {view: VIEW_COLUMNS.get(view, view) for view in results.views},
            "test accuracy",
            folder / "test_accuracy.png",
        ),
    ]
    samples = _activation_samples(results)
    if samples:
        context_names = results.info["context_names"]
        written.append(
            plot_activation_histograms(
                samples, results.info["num_contexts"], folder / "activations.png"
            )
        )
        written.append(plot_feature_projection(samples, context_names, folder / "features_pca.png"))
        if results.config.plots.tsne:
            written.append(
                plot_feature_projection(
                    samples, context_names, folder / "features_tsne.png", method="tsne"
                )
            )
    return written


def _activation_samples(results: ExperimentResults) -> dict[str, ActivationSample]:
    samples = {}
    for method in results.finished():
        path = (
            run_directory(results.results_dir, method.label, method.records[0]["seed"])
            / ACTIVATIONS_FILE
        )
        if path.is_file():
            samples[method.label] = ActivationSample.load(path)
    return samples
