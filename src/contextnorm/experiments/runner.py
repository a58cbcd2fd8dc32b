"""Running an experiment: every method once per seed, resumable, never losing a finished run.

Results folder layout::

    <output_dir>/
      config.yaml                  the config the experiment ran with
      experiment.json              data, contexts and test views (see PreparedExperiment.summary)
      results.md, results.csv      tables (mean ± std over seeds), rewritten after each run
      *.png                        figures
      runs/<method>/seed-<seed>/
        result.json                written atomically when the run is finished
        run.json                   fingerprint of the settings the checkpoints belong to
        checkpoints/last.ckpt      the latest finished epoch (resume point)
        activations.npz            recorded activations (first seed of each method)
        csv/, tensorboard/         Lightning's per-epoch logs

A re-run of the same experiment skips every run whose ``result.json`` matches the current
settings, and resumes a run that was interrupted from its last checkpoint. Raising
``train.epochs`` continues finished runs from their last epoch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import statistics
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
from threadpoolctl import threadpool_limits

from contextnorm.config import ConfigError, ExperimentConfig, dump_config
from contextnorm.experiments.prepare import PreparedExperiment, prepare_experiment
from contextnorm.experiments.report import (
    ACTIVATIONS_FILE,
    CONFIG_FILE,
    EXPERIMENT_FILE,
    RESULT_FILE,
    run_directory,
    write_report,
)
from contextnorm.io import atomic_write_json, atomic_write_text
from contextnorm.training.activations import capture_activations
from contextnorm.training.callbacks import EpochHistory, EpochRecord
from contextnorm.training.trainer import build_trainer, last_checkpoint

RUN_FILE = "run.json"
# Settings that change how a run executes or what it prints, but not what it computes.
_EXECUTION_SETTINGS = (
    "seeds",
    "accelerator",
    "devices",
    "num_workers",
    "cpu_threads",
    "deterministic",
    "progress",
    "eval_batch_size",
)
# Settings a checkpoint can be continued under: another patience, or more epochs when the
# learning-rate schedule does not depend on the epoch count.
_CONTINUATION_SETTINGS = ("epochs", "early_stopping_patience")
# Lightning's advice for large jobs, irrelevant to in-memory tensors and to resumed runs.
_EXPECTED_WARNINGS = (
    ".*does not have many workers.*",
    ".*exists and is not empty.*",
    # The module, not the data module, owns batch preprocessing, as intended.
    ".*overridden `on_after_batch_transfer` in `LightningModule`.*",
    ".*the number of training batches.*smaller than the logging interval.*",
    # Emitted by Lightning's own use of a torch API that newer torch versions deprecate.
    ".*isinstance\\(treespec, LeafSpec\\).*",
)

Echo = Callable[[str], None]


def run_experiment(config: ExperimentConfig, *, echo: Echo = print) -> Path:
    """Train and test every method of ``config`` once per seed; write results, tables, figures.

    Everything that can be checked without training is checked first (see
    :func:`prepare_experiment`). Finished runs found in the results folder are reused.

    Args:
        config: the experiment.
        echo: receives the progress lines (``train.progress`` chooses how many).

    Returns:
        The results folder.
    """
    with _cpu_threads(config.train.cpu_threads):
        prepared = prepare_experiment(config)
        results_dir = config.results_dir
        atomic_write_text(results_dir / CONFIG_FILE, dump_config(config))
        atomic_write_json(
            results_dir / EXPERIMENT_FILE, {"name": config.name, **prepared.summary()}
        )
        say = echo if config.train.progress != "none" else _silent
        total = len(config.methods) * len(config.train.seeds)
        say(
            f"{config.name}: {len(config.methods)} methods x {len(config.train.seeds)} seeds, "
            f"{config.train.epochs} epochs each -> {results_dir}"
        )
        finished = 0
        for index, method in enumerate(config.methods):
            for seed in config.train.seeds:
                record, reused = run_single(prepared, index, seed, echo=say)
                finished += 1
                accuracy = next(iter(record["test"].values()))["accuracy"]
                status = "reused" if reused else f"{record['time_per_epoch_s']:.2f} s/epoch"
                say(
                    f"[{finished:>{len(str(total))}}/{total}] {method.display_name:<14} "
                    f"seed {seed}: test accuracy {accuracy:.4f}  "
                    f"({record['epochs']} epochs, {status})"
                )
                # Tables after each run: a long job shows its results so far.
                write_report(results_dir, figures=False)
        write_report(results_dir, figures=config.plots.enabled)
    return results_dir


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


def run_single(
    prepared: PreparedExperiment, index: int, seed: int, *, echo: Echo = print
) -> tuple[dict[str, Any], bool]:
    """Run ``config.methods[index]`` with ``seed``, unless its finished result is already saved.

    Returns:
        The run's result record and whether it was reused from an earlier invocation.

    Raises:
        ConfigError: the run's folder holds a checkpoint of different settings.
    """
    config = prepared.config
    method = config.methods[index]
    run_dir = run_directory(config.results_dir, method.display_name, seed)
    checkpoint_key, result_key = run_fingerprints(config, index, seed)
    wants_activations = config.plots.enabled and seed == config.train.seeds[0]
    result_path = run_dir / RESULT_FILE
    previous = _read_json(result_path)
    if previous is not None and previous.get("fingerprint") == result_key:
        if wants_activations and not (run_dir / ACTIVATIONS_FILE).exists():
            _activations_from_checkpoint(prepared, index, seed, run_dir)
        return previous, True

    resume_from = _resume_point(run_dir, checkpoint_key)
    if resume_from is None:
        atomic_write_json(run_dir / RUN_FILE, {"fingerprint": checkpoint_key})

    L.seed_everything(seed, workers=True, verbose=False)
    module, built = prepared.build_module(index)
    views = list(prepared.test_views)
    # A model without context layers gives the same numbers in every view: test it once.
    tested_views = views if module.needs_context else views[:1]
    module.set_test_views(tested_views)
    datamodule = prepared.datamodule(tested_views)
    history = EpochHistory(
        on_epoch=_epoch_printer(method.display_name, seed, echo)
        if config.train.progress == "epoch"
        else None
    )
    num_batches = max(1, len(prepared.train.data) // config.train.batch_size)
    with _quiet_lightning():
        trainer = build_trainer(
            config.train, run_dir, seed=seed, history=history, num_train_batches=num_batches
        )
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from)
        if len(history.records) > config.train.epochs:
            raise ConfigError(
                f"{run_dir} holds a run of {len(history.records)} epochs, more than "
                f"train.epochs={config.train.epochs}; "
                "delete that folder or choose another output_dir"
            )
        outputs = trainer.test(module, datamodule=datamodule, verbose=False)
    tested = {
        view: _view_metrics(output, view)
        for view, output in zip(tested_views, outputs, strict=True)
    }
    record = {
        "method": method.display_name,
        "name": method.name,
        "options": method.options,
        "seed": seed,
        "fingerprint": result_key,
        "uses_context": module.needs_context,
        "parameters": sum(parameter.numel() for parameter in module.model.parameters()),
        "epochs": len(history.records),
        "resumed_after_epochs": history.resumed_after_epochs,
        "time_per_epoch_s": statistics.fmean(epoch["time_s"] for epoch in history.records),
        "history": history.records,
        "test": {view: tested.get(view, tested[tested_views[0]]) for view in views},
    }
    atomic_write_json(result_path, record)
    if wants_activations:
        _save_activations(prepared, module, built.tested_layers, seed, run_dir)
    return record, False


def _activations_from_checkpoint(
    prepared: PreparedExperiment, index: int, seed: int, run_dir: Path
) -> None:
    """Record a finished run's activations from its final checkpoint (figures enabled later)."""
    checkpoint_path = last_checkpoint(run_dir)
    if not checkpoint_path.exists():
        return
    module, built = prepared.build_module(index)
    # The run's own checkpoint: besides tensors it holds Lightning's loop and callback state.
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
    module.load_state_dict(checkpoint["state_dict"])
    _save_activations(prepared, module, built.tested_layers, seed, run_dir)


def run_fingerprints(config: ExperimentConfig, index: int, seed: int) -> tuple[str, str]:
    """Hashes of a run's settings: (what its checkpoints belong to, what its result belongs to).

    The first leaves out the settings under which a checkpoint can be continued (the
    early-stopping patience, and the epoch count unless the learning-rate schedule depends on
    it); the second includes them.
    """
    train = {
        key: value for key, value in asdict(config.train).items() if key not in _EXECUTION_SETTINGS
    }
    continuable = [
        key
        for key in _CONTINUATION_SETTINGS
        if key != "epochs" or config.train.schedule == "constant"
    ]
    data = {key: value for key, value in asdict(config.data).items() if key != "download"}
    settings = {
        "data": data,
        "contexts": asdict(config.contexts),
        "model": asdict(config.model),
        "method": asdict(config.methods[index]),
        "train": {key: value for key, value in train.items() if key not in continuable},
        "seed": seed,
    }
    continued = {key: train[key] for key in continuable}
    return _hash(settings), _hash({**settings, "continuation": continued})


def _hash(settings: dict[str, Any]) -> str:
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _resume_point(run_dir: Path, checkpoint_key: str) -> Path | None:
    checkpoint = last_checkpoint(run_dir)
    if not checkpoint.exists():
        return None
    manifest = _read_json(run_dir / RUN_FILE) or {}
    if manifest.get("fingerprint") != checkpoint_key:
        raise ConfigError(
            f"{run_dir} holds a checkpoint trained with other settings than the current config; "
            "delete that folder to retrain it, or set output_dir to a new folder"
        )
    return checkpoint


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def _view_metrics(output: dict[str, float], view: str) -> dict[str, float]:
    prefix = f"test/{view}/"
    return {
        key.removeprefix(prefix): float(value)
        for key, value in output.items()
        if key.startswith(prefix)
    }


def _save_activations(
    prepared: PreparedExperiment,
    module: Any,
    tested_layers: list[torch.nn.Module],
    seed: int,
    run_dir: Path,
) -> None:
    plots = prepared.config.plots
    view = next(iter(prepared.test_views.values()))
    sample = capture_activations(
        module,
        tested_layers[plots.layer],
        view,
        samples=plots.samples,
        channel=plots.channel,
        seed=seed,
    )
    sample.save(run_dir / ACTIVATIONS_FILE)


def _epoch_printer(label: str, seed: int, echo: Echo) -> Callable[[EpochRecord], None]:
    def report(record: EpochRecord) -> None:
        echo(
            f"    {label} seed {seed} epoch {int(record['epoch']) + 1}: "
            f"train loss {record.get('train/loss', float('nan')):.4f}, "
            f"val accuracy {record.get('val/accuracy', float('nan')):.4f} "
            f"({record['time_s']:.1f} s)"
        )

    return report


def _silent(_: str) -> None:
    pass


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
