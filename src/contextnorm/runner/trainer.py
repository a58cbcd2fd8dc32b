"""The Lightning Trainer of one run: loggers, the checkpoint, early stopping, seeding, progress."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy
from torch.nn.parallel import DistributedDataParallel

from contextnorm.config import TrainConfig
from contextnorm.runner.callbacks import (
    AtomicCheckpointIO,
    EpochCheckpoint,
    EpochHistory,
    EpochSeeding,
    SyncNormStatistics,
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
    partial_losses: bool = False,
) -> L.Trainer:
    """A Trainer for one (method, seed) run writing into ``run_dir``.

    Several devices or machines train with DDP: the norm layers compute their batch statistics
    over all processes (:class:`~contextnorm.runner.callbacks.SyncNormStatistics`), so their
    buffers stay equal on every process without DDP's per-forward buffer broadcast, which is
    off: evaluation shards may then differ by a batch between processes without a hang.

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
        callbacks: the task's callbacks and the runner's (progress, interrupts).
        progress_bar: whether one of ``callbacks`` is a progress bar.
        partial_losses: the module optimises manually, with losses that each reach part of its
            parameters (a GAN's generator and discriminator losses): DDP then looks for the
            parameters a backward pass left out, instead of waiting for their gradients.
    """
    every: list[L.Callback] = [
        # Before the history: what they log at an epoch's end joins its record.
        *callbacks,
        history,
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
        num_nodes=settings.num_nodes,
        strategy=_strategy(settings, partial_losses),
        precision=settings.precision,
        gradient_clip_val=settings.gradient_clip,
        gradient_clip_algorithm="norm",
        deterministic=settings.deterministic,
        callbacks=every,
        logger=[CSVLogger(run_dir, name="csv"), TensorBoardLogger(run_dir, name="tensorboard")],
        plugins=[AtomicCheckpointIO(), SyncNormStatistics()],
        enable_progress_bar=progress_bar,
        enable_model_summary=False,
        # A sanity check draws from the random state before the first epoch: no exact resume.
        num_sanity_val_steps=0,
        # Tasks log per epoch; the interval only spaces out per-step values a task may add.
        log_every_n_steps=LOG_INTERVAL,
        default_root_dir=run_dir,
    )


def process_count(settings: TrainConfig) -> int:
    """How many processes ``train.accelerator``, ``train.devices`` and ``train.num_nodes`` start."""
    devices = settings.devices
    if isinstance(devices, list):
        per_node = len(devices)
    elif isinstance(devices, str) and "," in devices:
        per_node = len([device for device in devices.split(",") if device.strip()])
    elif str(devices).strip().lstrip("-").isdigit() and int(devices) != -1:
        per_node = int(devices)
    else:
        # "auto" or -1: every GPU when the accelerator may be one, else a single process.
        gpus = settings.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
        per_node = torch.cuda.device_count() if gpus else 1
    return per_node * settings.num_nodes


def _strategy(settings: TrainConfig, partial_losses: bool) -> str | DDPStrategy:
    """DDP without per-forward buffer broadcasts for several processes; Lightning's choice for one.

    The buffers are still made equal once, when DDP wraps the model.
    """
    if process_count(settings) <= 1:
        return "auto"
    # Newer torch names the switch forward_sync_buffers and deprecates broadcast_buffers.
    forward_only = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    buffers = "forward_sync_buffers" if forward_only else "broadcast_buffers"
    return DDPStrategy(**{buffers: False}, find_unused_parameters=partial_losses)
