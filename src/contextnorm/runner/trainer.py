"""The Lightning Trainer of one run: loggers, the checkpoint, early stopping, seeding, progress."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from contextnorm.config import TrainConfig
from contextnorm.runner.callbacks import (
    AtomicCheckpointIO,
    EpochCheckpoint,
    EpochHistory,
    EpochSeeding,
)
from contextnorm.tasks import Selection

CHECKPOINT_FOLDER = "checkpoints"
CHECKPOINT_NAME = "last"
LOG_INTERVAL = 50


def last_checkpoint(run_dir: Path) -> Path:
    """The run's one checkpoint file: its latest finished epoch (the resume point)."""
    return run_dir / CHECKPOINT_FOLDER / f"{CHECKPOINT_NAME}.ckpt"


def build_trainer(
    settings: TrainConfig,
    run_dir: Path,
    *,
    seed: int,
    selection: Selection,
    history: EpochHistory,
    callbacks: Sequence[L.Callback],
    progress_bar: bool,
) -> L.Trainer:
    """A Trainer for one (method, seed) run writing into ``run_dir``.

    It keeps one checkpoint file, ``checkpoints/last.ckpt``, rewritten (atomically) after every
    epoch with ``history``'s record of that epoch; logs per-epoch metrics to ``csv/`` and
    ``tensorboard/``; reseeds every epoch from ``seed`` (exact resume); and stops early on the
    task's selection metric when ``settings.early_stopping_patience`` is set.

    Args:
        settings: the experiment's training settings.
        run_dir: the run's folder.
        seed: the run's seed.
        selection: the task's metric that selects and stops.
        history: the run's per-epoch records (kept in every checkpoint).
        callbacks: the runner's other callbacks (progress, interrupts).
        progress_bar: whether one of ``callbacks`` is a progress bar.
    """
    every: list[L.Callback] = [
        history,
        *callbacks,
        EpochSeeding(seed),
        # No monitored metric and one file kept: the newest epoch, under one fixed name.
        EpochCheckpoint(
            history,
            dirpath=run_dir / CHECKPOINT_FOLDER,
            filename=CHECKPOINT_NAME,
            save_top_k=1,
            enable_version_counter=False,
        ),
    ]
    if settings.early_stopping_patience is not None:
        every.append(
            # Not strict: a task may measure its selection metric every few epochs (a GAN's
            # FID); the patience then counts the epochs that measured it.
            EarlyStopping(
                selection.metric,
                patience=settings.early_stopping_patience,
                mode=selection.mode,
                strict=False,
            )
        )
    return L.Trainer(
        max_epochs=settings.epochs,
        accelerator=settings.accelerator,
        devices=settings.devices,
        precision=settings.precision,
        deterministic=settings.deterministic,
        callbacks=every,
        logger=[CSVLogger(run_dir, name="csv"), TensorBoardLogger(run_dir, name="tensorboard")],
        plugins=[AtomicCheckpointIO()],
        enable_progress_bar=progress_bar,
        enable_model_summary=False,
        # A sanity check draws from the random state before the first epoch: no exact resume.
        num_sanity_val_steps=0,
        # Tasks log per epoch; the interval only spaces out per-step values a task may add.
        log_every_n_steps=LOG_INTERVAL,
        default_root_dir=run_dir,
    )
