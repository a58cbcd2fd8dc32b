"""The results folder: its layout, its records, and what it holds about an experiment.

::

    <output_dir>/
      config.yaml                  the experiment's config: every method and seed it holds
      experiment.json              the task's description of the data and the report
      results.md, results.csv      tables (mean ± std over seeds, paired differences)
      *.png                        figures
      runs/<method>/seed-<seed>/
        result.json                the finished (or diverged) run, written atomically
        run.json                   the settings (and code version) its checkpoint belongs to
        checkpoints/last.ckpt      the latest finished epoch (resume point)
        activations.npz            recorded activations (first seed of each method)
        csv/, tensorboard/         Lightning's per-epoch logs
      stale/<code version>/<method>/seed-<seed>/
                                   runs made with other code, set aside by ``reuse: code``

Nothing here imports torch or Lightning: the report reads folders with it alone.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from contextnorm.config import ExperimentConfig, dump_config, parse_config, read_yaml
from contextnorm.io import atomic_write_json, atomic_write_text
from contextnorm.metrics import EpochRecord, ReportSpec, Summary, summarize
from contextnorm.runner.fingerprint import Settings, code_version, differences, run_settings

CONFIG_FILE = "config.yaml"
EXPERIMENT_FILE = "experiment.json"
RESULT_FILE = "result.json"
RUN_FILE = "run.json"
ACTIVATIONS_FILE = "activations.npz"
RESULTS_MARKDOWN = "results.md"
RESULTS_CSV = "results.csv"
RUNS_FOLDER = "runs"
STALE_FOLDER = "stale"
FINISHED = "finished"
DIVERGED = "diverged"


def run_directory(results_dir: Path, label: str, seed: int) -> Path:
    """The folder of one (method, seed) run inside a results folder."""
    return (
        Path(results_dir) / RUNS_FOLDER / re.sub(r"[^A-Za-z0-9._-]+", "_", label) / f"seed-{seed}"
    )


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or ``None`` when there is no such file."""
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


@dataclass
class RunRecord:
    """What ``result.json`` holds about one (method, seed) run.

    Attributes:
        method: the method's label (its row in the tables).
        name: the method's registry name.
        options: the method's options.
        seed: the run's seed.
        settings: the settings it ran with.
        status: ``finished``, or ``diverged`` (then ``test`` is empty).
        diverged_at: the epoch (from 1) in which the run diverged.
        divergence: what was not finite.
        uses_context: whether the model holds context layers.
        parameters: the number of trainable and frozen parameters.
        epochs: epochs trained.
        resumed_after_epochs: epochs that came from a checkpoint of an earlier invocation.
        time_per_epoch_s: mean wall time of an epoch.
        history: one record per epoch.
        best: the best epoch by the task's selection metric: ``metric``, ``mode``, ``value``,
            ``epoch`` (from 1).
        test: view -> metric -> value.
        mixture: each mixture layer's name, weights and usage at the end of training, in
            forward order (``None`` without mixture layers); see
            :func:`contextnorm.runner.diagnostics.final_mixtures`.
        code: the code version that made it (:func:`~contextnorm.runner.fingerprint.code_version`;
            ``None``: a result of an earlier version, which did not record it).
        train_eval_gap: the norm layers' train/eval gap on a held-out batch after training,
            per layer and its median and maximum over layers (``None``: not measured, e.g. a
            result of an earlier version); see
            :func:`contextnorm.runner.diagnostics.measure_train_eval_gap`.
    """

    method: str
    name: str
    seed: int
    options: dict[str, Any] = field(default_factory=dict)
    settings: Settings = field(default_factory=dict)
    status: str = FINISHED
    diverged_at: int | None = None
    divergence: str | None = None
    uses_context: bool = False
    parameters: int = 0
    epochs: int = 0
    resumed_after_epochs: int = 0
    time_per_epoch_s: float = math.nan
    history: list[EpochRecord] = field(default_factory=list)
    best: dict[str, Any] | None = None
    test: dict[str, dict[str, float]] = field(default_factory=dict)
    mixture: list[dict[str, Any]] | None = None
    train_eval_gap: dict[str, Any] | None = None
    code: str | None = None

    @property
    def finished(self) -> bool:
        return self.status == FINISHED

    def save(self, run_dir: Path) -> Path:
        return atomic_write_json(run_dir / RESULT_FILE, dataclasses.asdict(self))

    @classmethod
    def load(cls, path: Path) -> RunRecord:
        data = json.loads(path.read_text(encoding="utf-8"))
        return cls(**data)


@dataclass
class MethodResults:
    """The runs of one method found in a results folder, in seed order."""

    label: str
    name: str
    records: list[RunRecord]

    def finished(self) -> list[RunRecord]:
        """The runs that finished (not diverged)."""
        return [record for record in self.records if record.finished]

    def diverged(self) -> list[RunRecord]:
        return [record for record in self.records if not record.finished]

    def values(self, view: str, metric: str) -> dict[int, float]:
        """Seed -> the test metric in one view, for the finished runs."""
        return {
            record.seed: float(record.test.get(view, {}).get(metric, math.nan))
            for record in self.finished()
        }

    def summary(self, view: str, metric: str) -> Summary:
        """Mean and std over seeds of a test metric in one view."""
        return summarize(list(self.values(view, metric).values()))

    def train_eval_gap(self, statistic: str) -> Summary:
        """Mean and std over the finished seeds that measured it of the train/eval gap's
        ``median`` or ``max`` over layers (no value: results of an earlier version)."""
        return summarize(
            [
                float(record.train_eval_gap[statistic])
                for record in self.finished()
                if record.train_eval_gap is not None
            ]
        )

    def time_per_epoch(self) -> Summary:
        """Mean and std over seeds of the seconds per epoch."""
        return summarize([record.time_per_epoch_s for record in self.records])


@dataclass
class ExperimentResults:
    """Everything a results folder holds about a (possibly unfinished) experiment."""

    results_dir: Path
    config: ExperimentConfig
    info: dict[str, Any]
    spec: ReportSpec
    methods: list[MethodResults]

    @property
    def views(self) -> list[str]:
        return list(self.spec.views)

    def present(self) -> list[MethodResults]:
        """The methods with at least one run in the folder (finished or diverged)."""
        return [method for method in self.methods if method.records]

    def finished(self) -> list[MethodResults]:
        """The methods with at least one finished run."""
        return [method for method in self.methods if method.finished()]

    def baseline(self) -> MethodResults | None:
        """The method the others are compared with, if it has finished runs."""
        label = self.config.baseline
        return next((method for method in self.finished() if method.label == label), None)


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
                "give the output_dir of an experiment"
            )
    config = read_config(results_dir)
    info = read_json(results_dir / EXPERIMENT_FILE) or {}
    if "report" not in info:
        raise FileNotFoundError(
            f"{results_dir} was written by an earlier version of contextnorm ({EXPERIMENT_FILE} "
            "does not describe its report); regenerate it with `contextnorm run "
            f"{results_dir / CONFIG_FILE} output_dir=<a new folder>`"
        )
    spec = ReportSpec.from_json(info["report"])
    methods = []
    for method in config.methods:
        records = []
        for seed in config.train.seeds:
            path = run_directory(results_dir, method.display_name, seed) / RESULT_FILE
            if path.is_file():
                records.append(RunRecord.load(path))
        methods.append(MethodResults(method.display_name, method.name, records))
    return ExperimentResults(results_dir, config, info, spec, methods)


def read_config(results_dir: Path) -> ExperimentConfig:
    """The config stored in a results folder."""
    text = (results_dir / CONFIG_FILE).read_text(encoding="utf-8")
    return parse_config(read_yaml(text))


def write_experiment(results_dir: Path, config: ExperimentConfig, info: dict[str, Any]) -> None:
    """Store the config and the task's description; the report reads them back."""
    atomic_write_text(results_dir / CONFIG_FILE, dump_config(config))
    atomic_write_json(results_dir / EXPERIMENT_FILE, info)


def _shared_settings(config: ExperimentConfig) -> Settings:
    """The settings every run of the experiment shares: all but the method and the seed."""
    checkpoint, continuation = run_settings(config, 0, config.train.seeds[0])
    shared = {**checkpoint, **continuation}
    return {
        key: value
        for key, value in shared.items()
        if not key.startswith("method.") and key != "seed"
    }


def set_aside_stale_runs(config: ExperimentConfig) -> list[str]:
    """Move the config's runs made with other code out of the way, so that they train again.

    A (method, seed) run folder whose result or checkpoint was made with another code version
    than the running one (or before versions were recorded) moves, whole, to
    ``stale/<its code version>/<method>/seed-<seed>``: nothing finished is deleted. Call it
    before any training starts (and in one process only). Returns one line per moved run.
    """
    current = code_version()
    moved = []
    for method in config.methods:
        for seed in config.train.seeds:
            run_dir = run_directory(config.results_dir, method.display_name, seed)
            records = [read_json(run_dir / name) for name in (RESULT_FILE, RUN_FILE)]
            codes = {record.get("code") for record in records if record is not None}
            if not codes or codes == {current}:
                continue
            made_with = next(iter(codes - {current}), None) or "unrecorded"
            target = config.results_dir / STALE_FOLDER / made_with / run_dir.parent.name
            target.mkdir(parents=True, exist_ok=True)
            destination = target / run_dir.name
            suffix = 1
            while destination.exists():
                suffix += 1
                destination = target / f"{run_dir.name}.{suffix}"
            run_dir.rename(destination)
            moved.append(
                f"{method.display_name} seed {seed}: made with code {made_with}, not "
                f"{current}; moved to {destination} and trained again (reuse: code)"
            )
    return moved


def merge_with_folder(config: ExperimentConfig) -> tuple[ExperimentConfig, list[str]]:
    """The config the results folder describes once ``config`` has run in it.

    Methods and seeds run earlier in the folder, with the same shared settings, stay in its
    tables and figures: their labels and seeds are added after ``config``'s own (a method of
    ``config`` replaces an earlier one of the same label). Runs made with other shared
    settings are left out, and the returned notes say which and why.

    Returns:
        The merged config, and lines to show the user (empty when nothing was left out).
    """
    path = config.results_dir / CONFIG_FILE
    if not path.is_file():
        return config, []
    stored = read_config(config.results_dir)
    current_labels = {method.display_name for method in config.methods}
    earlier = [method for method in stored.methods if method.display_name not in current_labels]
    changed = differences(_shared_settings(stored), _shared_settings(config))
    if changed:
        if not earlier:
            return config, []
        labels = ", ".join(method.display_name for method in earlier)
        return config, [
            f"The runs of {labels} in {config.results_dir} were made with other settings "
            f"({'; '.join(changed[:3])}{'; ...' if len(changed) > 3 else ''}) and are left out "
            "of its tables; run them again with this config, or give this config its own "
            "output_dir."
        ]
    seeds = [*config.train.seeds, *(s for s in stored.train.seeds if s not in config.train.seeds)]
    # The folder keeps its baseline unless this config names one: a run of a few methods
    # (whose first would be the default baseline) must not change what the others compare with.
    baseline = config.report.baseline or stored.baseline
    merged = dataclasses.replace(
        config,
        methods=[*config.methods, *earlier],
        train=dataclasses.replace(config.train, seeds=seeds),
        report=dataclasses.replace(config.report, baseline=baseline),
    )
    return merged, []
