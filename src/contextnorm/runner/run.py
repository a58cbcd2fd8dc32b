"""One (method, seed) run: fit, evaluate and record it, or reuse or resume what is saved."""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import statistics
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only

from contextnorm.config import ConfigError
from contextnorm.io import atomic_write_json
from contextnorm.metrics import EpochRecord
from contextnorm.runner.activations import ActivationSample, capture_activations
from contextnorm.runner.callbacks import EpochHistory, InterruptWatch
from contextnorm.runner.diagnostics import MixtureUsage, final_mixtures, measure_train_eval_gap
from contextnorm.runner.fingerprint import Settings, code_version, differences, run_settings
from contextnorm.runner.folder import (
    ACTIVATIONS_FILE,
    DIVERGED,
    RESULT_FILE,
    RUN_FILE,
    RunRecord,
    read_json,
    run_directory,
)
from contextnorm.runner.progress import Progress
from contextnorm.runner.trainer import build_trainer, last_checkpoint
from contextnorm.tasks import Selection, Task, TaskModule

# Lightning's advice for large jobs, irrelevant to in-memory tensors and to resumed runs.
_EXPECTED_WARNINGS = (
    ".*does not have many workers.*",
    ".*exists and is not empty.*",
    # Task modules, not data modules, own batch preprocessing, as intended.
    ".*overridden `on_after_batch_transfer` in `LightningModule`.*",
    ".*the number of training batches.*smaller than the logging interval.*",
    # torchmetrics on the non-finite values of a diverging run, which is recorded as diverged.
    ".*Encountered `nan` values in tensor.*",
    # Emitted by Lightning's own use of a torch API that newer torch versions deprecate.
    ".*isinstance\\(treespec, LeafSpec\\).*",
)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C stopped the experiment; says what is saved.

    Attributes:
        run_dir: the folder of the run that was training, if one was.
        epochs_saved: the epochs of that run its checkpoint holds.
        results_dir: the experiment's results folder (set by the experiment).
        finished: runs finished in the folder, and ``total``: runs the config asks for.
    """

    def __init__(self, run_dir: Path | None = None, epochs_saved: int = 0) -> None:
        super().__init__()
        self.run_dir = run_dir
        self.epochs_saved = epochs_saved
        self.results_dir: Path | None = None
        self.finished = 0
        self.total = 0


def is_main_process() -> bool:
    """Whether this process writes files: every process of a multi-device run executes the
    experiment (Lightning launches the same command once per device); the first alone writes."""
    return rank_zero_only.rank == 0


@dataclass
class RunOutcome:
    """A run's record and how it came about."""

    record: RunRecord
    reused: bool


def run_single(task: Task, index: int, seed: int, progress: Progress) -> RunOutcome:
    """Run ``config.methods[index]`` with ``seed``, unless its result is saved with its settings.

    A run folder holding a checkpoint of the same settings resumes from it. A run whose logged
    values stop being finite is recorded as diverged (with the epoch), not raised.

    Raises:
        ConfigError: the run's folder holds a checkpoint of other settings; the message names
            each setting that differs and both values.
        Interrupted: Ctrl-C stopped the fit; the checkpoint of the last finished epoch is kept.
    """
    config = task.config
    method = config.methods[index]
    title = f"{method.display_name} seed {seed}"
    run_dir = run_directory(config.results_dir, method.display_name, seed)
    checkpoint_settings, continuation = run_settings(config, index, seed)
    settings = {**checkpoint_settings, **continuation}
    wants_activations = config.plots.enabled and seed == config.train.seeds[0]

    if (run_dir / RESULT_FILE).is_file():
        previous = RunRecord.load(run_dir / RESULT_FILE)
        if previous.settings == settings:
            if wants_activations and previous.finished:
                _refresh_activations(task, index, seed, run_dir)
            return RunOutcome(previous, reused=True)

    resume_from = _resume_point(run_dir, checkpoint_settings)
    if resume_from is None and is_main_process():
        atomic_write_json(
            run_dir / RUN_FILE, {"settings": checkpoint_settings, "code": code_version()}
        )

    L.seed_everything(seed, workers=True, verbose=False)
    module = task.build_module(index)
    datamodule = task.datamodule(index, module)
    shown = _shown_metrics(task)
    history = EpochHistory(
        on_epoch=progress.epoch_printer(title, config.train.epochs, shown),
        on_resume=lambda epochs: progress.say(
            f"{title}: resumed from epoch {epochs} ({last_checkpoint(run_dir)})"
        ),
    )
    interrupts = InterruptWatch()
    record = RunRecord(
        method=method.display_name,
        name=method.name,
        options=method.options,
        seed=seed,
        settings=settings,
        uses_context=module.uses_context,
        parameters=sum(parameter.numel() for parameter in module.parameters()),
        code=code_version(),
    )
    with _quiet_lightning():
        trainer = build_trainer(
            config.train,
            run_dir,
            seed=seed,
            selection=task.selection,
            history=history,
            callbacks=[
                *task.callbacks(index),
                MixtureUsage(),
                interrupts,
                *progress.callbacks(title, shown),
            ],
            progress_bar=progress.mode == "bar",
            partial_losses=not module.automatic_optimization,
        )
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from)
            if len(history.records) > config.train.epochs:
                raise ConfigError(
                    f"{run_dir} holds a run of {len(history.records)} epochs, more than "
                    f"train.epochs={config.train.epochs}; delete that folder to train it again, "
                    "or set output_dir to a new folder"
                )
            record.test = task.evaluate(index, trainer, module, datamodule)
        except FloatingPointError as error:
            record.status = DIVERGED
            record.diverged_at = trainer.current_epoch + 1
            record.divergence = str(error)
        except SystemExit:
            if not interrupts.interrupted:
                raise
            # Lightning ignores Ctrl-C while it shuts a fit down; give it back to the user.
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise Interrupted(run_dir, len(history.records)) from None
    _complete(record, history, task.selection)
    if is_main_process():
        if record.finished:
            # Before the record is saved: a run whose result exists is reused as it is.
            record.mixture = final_mixtures(module)
            record.train_eval_gap = measure_train_eval_gap(task, index, module, seed)
        record.save(run_dir)
        if record.finished:
            if wants_activations:
                _save_activations(task, index, module, seed, run_dir)
            task.save_artifacts(index, module, run_dir)
    return RunOutcome(record, reused=False)


def _complete(record: RunRecord, history: EpochHistory, selection: Selection) -> None:
    """Fill in what the history says: epochs, timing, the best epoch by the selection metric."""
    epochs: list[EpochRecord] = history.records
    record.history = epochs
    record.epochs = len(epochs)
    record.resumed_after_epochs = history.resumed_after_epochs
    record.time_per_epoch_s = (
        statistics.fmean(epoch["time_s"] for epoch in epochs) if epochs else math.nan
    )
    scored = [
        (epoch[selection.metric], int(epoch["epoch"]) + 1)
        for epoch in epochs
        if math.isfinite(epoch.get(selection.metric, math.nan))
    ]
    if scored:
        value, epoch = (min if selection.mode == "min" else max)(scored)
        record.best = {
            "metric": selection.metric,
            "mode": selection.mode,
            "value": value,
            "epoch": epoch,
        }


def _shown_metrics(task: Task) -> list[str]:
    """The epoch metrics the progress display shows: the curves, then the selection metric."""
    keys = [spec.key for spec in task.describe().curves]
    return keys if task.selection.metric in keys else [*keys, task.selection.metric]


def _resume_point(run_dir: Path, settings: Settings) -> Path | None:
    checkpoint = last_checkpoint(run_dir)
    if not checkpoint.exists():
        return None
    stored = (read_json(run_dir / RUN_FILE) or {}).get("settings")
    if stored != settings:
        changed = differences(stored or {}, settings) if stored is not None else []
        detail = (
            f": {'; '.join(changed)} (checkpoint -> config)"
            if changed
            else " (its settings are not recorded)"
        )
        raise ConfigError(
            f"{run_dir} holds a checkpoint trained with other settings than the current config"
            f"{detail}. Delete that folder to train the run again, or set output_dir to a new "
            "folder"
        )
    return checkpoint


def _refresh_activations(task: Task, index: int, seed: int, run_dir: Path) -> None:
    """Record a finished run's activations again from its checkpoint when the figure settings
    changed (or figures were turned on after it ran)."""
    path = run_dir / ACTIVATIONS_FILE
    if path.is_file():
        sample = ActivationSample.load(path)
        if sample is not None and sample.matches(task.config.plots):
            return
    checkpoint_path = last_checkpoint(run_dir)
    if not checkpoint_path.exists():
        return
    module = task.build_module(index)
    # The run's own checkpoint: besides tensors it holds Lightning's loop and callback state.
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
    module.load_state_dict(checkpoint["state_dict"])
    _save_activations(task, index, module, seed, run_dir)


def _save_activations(task: Task, index: int, module: TaskModule, seed: int, run_dir: Path) -> None:
    plots = task.config.plots
    sample = capture_activations(
        lambda count, seed: task.probe(index, module, count, seed),
        module,
        module.tested_layers[plots.layer],
        plots=plots,
        seed=seed,
    )
    sample.save(run_dir / ACTIVATIONS_FILE)


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Hide Lightning's start-up banners and the warnings that do not apply to these runs."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            for pattern in _EXPECTED_WARNINGS:
                warnings.filterwarnings("ignore", message=pattern)
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
