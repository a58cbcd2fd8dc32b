"""The Lightning Trainer of one run: loggers, checkpoints, early stopping, seeding."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from contextnorm.config import TrainConfig
from contextnorm.training.callbacks import AtomicCheckpointIO, EpochHistory, EpochSeeding

CHECKPOINT_FOLDER = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
MONITORED_METRIC = "val/loss"
DEFAULT_LOG_INTERVAL = 50


def last_checkpoint(run_dir: Path) -> Path:
    """Where a run keeps the checkpoint of its latest finished epoch."""
    return run_dir / CHECKPOINT_FOLDER / LAST_CHECKPOINT


def build_trainer(
    settings: TrainConfig,
    run_dir: Path,
    *,
    seed: int,
    history: EpochHistory,
    num_train_batches: int,
) -> L.Trainer:
    """A Trainer for one (method, seed) run writing into ``run_dir``.

    It saves ``checkpoints/last.ckpt`` after every epoch (atomically), logs per-epoch metrics
    to ``csv/`` and ``tensorboard/``, reseeds every epoch from ``seed`` (exact resume), and
    stops early on the validation loss when ``settings.early_stopping_patience`` is set.

    Args:
        settings: the experiment's training settings.
        run_dir: the run's folder.
        seed: the run's seed.
        history: collects the per-epoch records (kept in the checkpoints).
        num_train_batches: batches per training epoch, to fit the logging interval.
    """
    callbacks: list[L.Callback] = [
        history,
        EpochSeeding(seed),
        # save_top_k=1 with no monitored metric keeps the newest epoch; save_last copies it to
        # last.ckpt.
        ModelCheckpoint(dirpath=run_dir / CHECKPOINT_FOLDER, save_last=True, save_top_k=1),
    ]
    if settings.early_stopping_patience is not None:
        callbacks.append(
            EarlyStopping(MONITORED_METRIC, patience=settings.early_stopping_patience, mode="min")
        )
    return L.Trainer(
        max_epochs=settings.epochs,
        accelerator=settings.accelerator,
        devices=settings.devices,
        precision=settings.precision,
        deterministic=settings.deterministic,
        callbacks=callbacks,
        logger=[CSVLogger(run_dir, name="csv"), TensorBoardLogger(run_dir, name="tensorboard")],
        plugins=[AtomicCheckpointIO()],
        enable_progress_bar=settings.progress == "bar",
        enable_model_summary=False,
        # A sanity check draws from the random state before the first epoch: no exact resume.
        num_sanity_val_steps=0,
        log_every_n_steps=max(1, min(DEFAULT_LOG_INTERVAL, num_train_batches)),
        default_root_dir=run_dir,
    )
