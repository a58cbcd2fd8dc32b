"""An experiment: every method of a config trained once per seed, resumable, never losing a run.

:func:`prepare_experiment` builds the task and checks everything that can be checked without
training; :func:`run_experiment` then runs (or reuses, or resumes) each (method, seed) run and
keeps the results folder's tables current after each one. A finished run is reused on a
re-run when its settings match; an interrupted one resumes from its last finished epoch; a
diverged one is recorded and the experiment goes on.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from threadpoolctl import threadpool_limits

from contextnorm.config import ConfigError, ExperimentConfig
from contextnorm.layers.sync import check_synchronisable
from contextnorm.metrics import MetricSpec
from contextnorm.runner.fingerprint import code_version
from contextnorm.runner.folder import merge_with_folder, set_aside_stale_runs, write_experiment
from contextnorm.runner.progress import Progress
from contextnorm.runner.report import write_report
from contextnorm.runner.run import Interrupted, RunOutcome, is_main_process, run_single
from contextnorm.runner.trainer import process_count
from contextnorm.tasks import Task, build_task
from contextnorm.tasks.data import process_batch_size
from contextnorm.tasks.network import method_location

Echo = Callable[[str], None]


def prepare_experiment(config: ExperimentConfig) -> Task:
    """The experiment's task, set up and checked, before any training.

    Imports the config's ``imports``, builds the task, lets it load and check its data, and
    builds every method's module once, so that a bad config fails in seconds, not after the
    first runs.

    Raises:
        ConfigError: a setting that does not fit (the message names the key to change).
        FileNotFoundError: the data are missing (the message says where to get them).
    """
    for name in config.imports:
        try:
            importlib.import_module(name)
        except ImportError as error:
            raise ConfigError(
                f"imports: cannot import {name!r} ({error}); put the module on the Python path "
                "(PYTHONPATH) or install its package"
            ) from error
    processes = process_count(config.train)
    train = config.train
    for key, size in (("batch_size", train.batch_size), ("eval_batch_size", train.eval_batch_size)):
        if size is not None:
            process_batch_size(size, processes, f"train.{key}")
    task = build_task(config)
    task.setup()
    for index in range(len(config.methods)):
        module = task.build_module(index)
        _check_figure_layer(config, module.tested_layers, index)
        if processes > 1:
            _check_synchronisable(config, module, index, processes)
    return task


def _check_synchronisable(
    config: ExperimentConfig, module: torch.nn.Module, index: int, processes: int
) -> None:
    """Fail now if a method's norm layers cannot compute their statistics over the processes."""
    try:
        check_synchronisable(module)
    except NotImplementedError as error:
        raise ConfigError(
            f"{method_location(config, index)} cannot train on the {processes} processes that "
            f"train.devices and train.num_nodes start: {error}. Set train.devices=1 and "
            "train.num_nodes=1 for it"
        ) from None


def _check_figure_layer(
    config: ExperimentConfig, layers: list[torch.nn.Module], index: int
) -> None:
    """Fail now, not after the first run, if the figures ask for a missing layer or channel."""
    plots = config.plots
    if not plots.enabled:
        return
    where = method_location(config, index)
    if plots.layer >= len(layers):
        raise ConfigError(
            f"plots.layer={plots.layer} but the model of {where} has {len(layers)} tested norm "
            f"layer(s); use 0..{len(layers) - 1}"
        )
    layer = layers[plots.layer]
    channels = getattr(layer, "num_features", getattr(layer, "num_channels", None))
    if channels is not None and plots.channel >= channels:
        raise ConfigError(
            f"plots.channel={plots.channel} but the recorded norm layer has {channels} channels; "
            f"use 0..{channels - 1}"
        )


def run_experiment(config: ExperimentConfig, *, echo: Echo = print) -> Path:
    """Train and test every method of ``config`` once per seed; write results, tables, figures.

    Args:
        config: the experiment.
        echo: receives the progress lines (``train.progress`` chooses how many).

    Returns:
        The results folder.

    Raises:
        Interrupted: Ctrl-C; finished runs and the interrupted run's last epoch are saved.
    """
    # Every process of a multi-device run executes the experiment; the first alone speaks.
    progress = Progress(config.train.progress, echo if is_main_process() else _silent)
    results_dir = config.results_dir
    finished, total = 0, len(config.methods) * len(config.train.seeds)
    try:
        with _cpu_threads(config.train.cpu_threads):
            task = prepare_experiment(config)
            # Before any training: the processes of a multi-device run start at the first fit.
            stale = (
                set_aside_stale_runs(config) if config.reuse == "code" and is_main_process() else []
            )
            merged, notes = merge_with_folder(config)
            spec = task.describe()
            info = {"name": config.name, "task": config.task.name, "report": spec.to_json()}
            if is_main_process():
                write_experiment(results_dir, merged, {**info, **task.info()})
            progress.say(
                f"{config.name}: {len(config.methods)} methods x {len(config.train.seeds)} "
                f"seeds, {config.train.epochs} epochs each -> {results_dir}"
            )
            for note in [*stale, *notes]:
                progress.say(note)
            for index in range(len(config.methods)):
                for seed in config.train.seeds:
                    outcome = run_single(task, index, seed, progress)
                    finished += 1
                    progress.say(_run_line(outcome, spec.headline, finished, total))
                    # Tables after each run: a long job shows its results so far.
                    if is_main_process():
                        write_report(results_dir, figures=False)
            if is_main_process():
                write_report(results_dir, figures=config.plots.enabled)
    except KeyboardInterrupt as interrupt:
        stopped = interrupt if isinstance(interrupt, Interrupted) else Interrupted()
        stopped.results_dir, stopped.finished, stopped.total = results_dir, finished, total
        raise stopped from None
    return results_dir


def _silent(line: str) -> None:
    """Where the progress lines of the processes other than the first go."""


def _run_line(outcome: RunOutcome, headline: MetricSpec, position: int, total: int) -> str:
    """``[ 3/21] cn   seed 2: test accuracy 0.9911  (12 epochs, 0.25 s/epoch)``."""
    record = outcome.record
    counter = f"[{position:>{len(str(total))}}/{total}] {record.method:<14} seed {record.seed}:"
    if not record.finished:
        return f"{counter} diverged in epoch {record.diverged_at} ({record.divergence})"
    value = next(iter(record.test.values()))[headline.key]
    status = f"{record.time_per_epoch_s:.2f} s/epoch"
    if outcome.reused:
        current = code_version()
        status = (
            "reused"
            if record.code == current
            else f"reused, made with code {record.code or 'of an earlier version'}, not {current}"
        )
    return f"{counter} test {headline.title} {value:.4f}  ({record.epochs} epochs, {status})"


@contextlib.contextmanager
def _cpu_threads(count: int | None) -> Iterator[None]:
    """Use ``count`` CPU threads inside the block (``None``: leave the settings), then restore.

    The limit covers PyTorch and the BLAS and OpenMP pools of scikit-learn and NumPy: on a
    machine whose cores are busy, threads that wait for each other can make small jobs many
    times slower than one thread.
    """
    if count is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        with threadpool_limits(count):
            yield
    finally:
        torch.set_num_threads(previous)
