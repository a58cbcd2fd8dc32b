"""Callbacks and plugins of every run: durable history, checkpoints, exact resume, divergence,
interrupts."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins import LayerSync
from torch import nn

import contextnorm as cn
from contextnorm.io import atomic_write
from contextnorm.metrics import EpochRecord


class EpochHistory(L.Callback):
    """Keeps one record per finished epoch: every value logged in that epoch, and its wall time.

    A record holds what the epoch logged and nothing older: Lightning's ``callback_metrics``
    keeps every value it has computed, so a value logged every few epochs (a GAN's FID, a
    validation run every other epoch) would otherwise reappear in the records of the epochs
    in between; it is emptied when an epoch starts. The record is taken by
    :class:`EpochCheckpoint` once the module's ``on_train_epoch_end`` has logged its values,
    just before the epoch's checkpoint is written.

    The history is part of each checkpoint, so a resumed run continues it instead of starting
    over, and the finished run's result carries the curves of all its epochs. An epoch whose
    logged values are not all finite ends the run with a ``FloatingPointError``: the run has
    diverged (its record is kept).

    Args:
        on_epoch: called with each new record (e.g. to print a progress line).
        on_resume: called with the number of epochs restored, when the fit resumes a checkpoint.

    Attributes:
        records: one record per finished epoch, in order.
        resumed_after_epochs: how many records came from the checkpoint the run resumed from.
    """

    def __init__(
        self,
        on_epoch: Callable[[EpochRecord], None] | None = None,
        on_resume: Callable[[int], None] | None = None,
    ) -> None:
        self.records: list[EpochRecord] = []
        self.resumed_after_epochs = 0
        self.on_epoch = on_epoch
        self.on_resume = on_resume
        self._epoch_start = math.nan

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The checkpoint, if any, is restored before on_fit_start.
        if self.resumed_after_epochs and self.on_resume is not None:
            self.on_resume(self.resumed_after_epochs)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.callback_metrics.clear()
        self._epoch_start = time.perf_counter()

    def record_epoch(self, trainer: L.Trainer) -> None:
        """Keep the record of the epoch that ``trainer`` just finished.

        Raises:
            FloatingPointError: a value logged in the epoch is not finite.
        """
        record: EpochRecord = {
            name: float(value)
            for name, value in trainer.callback_metrics.items()
            if value.numel() == 1
        }
        record["epoch"] = trainer.current_epoch
        record["time_s"] = time.perf_counter() - self._epoch_start
        self.records.append(record)
        if self.on_epoch is not None:
            self.on_epoch(record)
        # After the record is kept: a diverged run's history shows the epoch it diverged in.
        not_finite = sorted(name for name, value in record.items() if not math.isfinite(value))
        if not_finite:
            raise FloatingPointError(
                f"{', '.join(not_finite)} not finite after epoch {trainer.current_epoch + 1}"
            )

    def state_dict(self) -> dict[str, Any]:
        return {"records": list(self.records)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.records = list(state_dict["records"])
        self.resumed_after_epochs = len(self.records)


class EpochCheckpoint(ModelCheckpoint):
    """The run's checkpoint after every epoch, written once the epoch's record is complete.

    Lightning calls the callbacks' ``on_train_epoch_end`` before the module's, except those of
    checkpoints and early stopping, which it calls after, so that they see what the module logs
    there. A record taken by an ordinary callback would miss those values, or show the previous
    epoch's (a GAN's FID lagged one epoch that way). This checkpoint asks ``history`` for the
    epoch's record first, then writes the checkpoint, which therefore holds the record.

    Args:
        history: the run's history.
        **kwargs: arguments of ``ModelCheckpoint``; it always saves at the end of the training
            epoch, after validation, even when validation runs only every few epochs.
    """

    def __init__(self, history: EpochHistory, **kwargs: Any) -> None:
        super().__init__(save_on_train_epoch_end=True, **kwargs)
        self.history = history

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.history.record_epoch(trainer)
        super().on_train_epoch_end(trainer, pl_module)


class EpochSeeding(L.Callback):
    """Reseeds every random generator at the start of each epoch from (run seed, epoch, process).

    Batch order, augmentation and dropout of epoch e then depend on nothing but the seed and
    e, so a run resumed from a checkpoint continues exactly as the uninterrupted run would.
    The first epoch of a ``fit`` call is seeded in ``on_fit_start``, because Lightning
    prepares that epoch's first batch before ``on_train_epoch_start``; the epoch to resume
    from comes from the checkpoint, which is loaded before ``on_fit_start``.

    Under several processes each draws its own augmentation and dropout (process 0 draws
    what a one-process run draws), while the data order is shared: Lightning's
    ``DistributedSampler`` shuffles with the run seed and the epoch number, the same on every
    process, so that their shards partition the data.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._next_epoch = 0
        self._seeded_epoch: int | None = None

    def _seed(self, trainer: L.Trainer, epoch: int) -> None:
        rank = trainer.global_rank
        sequence = np.random.SeedSequence([self.seed, epoch], spawn_key=(rank,) if rank else ())
        L.seed_everything(int(sequence.generate_state(1)[0]), workers=True, verbose=False)
        # Lightning seeds the DistributedSampler it puts into training loaders from this
        # variable when it makes them (at the start of a fit, a later epoch for a resumed run):
        # the run seed keeps the shards disjoint and a resumed run's order exact.
        os.environ["PL_GLOBAL_SEED"] = str(self.seed)
        self._seeded_epoch = epoch

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._seed(trainer, self._next_epoch)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._seeded_epoch != trainer.current_epoch:
            self._seed(trainer, trainer.current_epoch)
        # A checkpoint written during this epoch resumes at the next one.
        self._next_epoch = trainer.current_epoch + 1

    def state_dict(self) -> dict[str, Any]:
        return {"next_epoch": self._next_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._next_epoch = int(state_dict["next_epoch"])


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file and renames it into place.

    A job killed while saving leaves the previous checkpoint intact instead of a truncated one.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None
    ) -> None:
        save = super().save_checkpoint
        atomic_write(path, lambda temporary: save(checkpoint, temporary, storage_options))


class InterruptWatch(L.Callback):
    """Remembers that Lightning stopped a fit on Ctrl-C.

    Lightning handles ``KeyboardInterrupt`` itself: it tears the fit down, ignores further
    Ctrl-C presses and exits with ``SystemExit(1)``. The runner reads :attr:`interrupted` to
    tell that exit from any other and to report what was saved.
    """

    def __init__(self) -> None:
        self.interrupted = False

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if isinstance(exception, KeyboardInterrupt):
            self.interrupted = True


class SyncNormStatistics(LayerSync):
    """Lightning's DDP strategy plugin that makes every norm layer use all processes' batches.

    :func:`contextnorm.convert_sync` while fitting (CN, ACN, ModeNorm, SwitchNorm, BatchNorm and
    the starts of CN-X and CN-E; MixNorm is refused); :func:`contextnorm.revert_sync`
    afterwards, which puts back the very BatchNorm objects it replaced (a module's references
    to its layers stay valid).
    """

    def apply(self, model: nn.Module) -> nn.Module:
        return cn.convert_sync(model)

    def revert(self, model: nn.Module) -> nn.Module:
        return cn.revert_sync(model)
