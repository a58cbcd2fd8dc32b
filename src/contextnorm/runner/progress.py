"""What the runner shows while it works: Lightning's live bar on a terminal, plain lines elsewhere.

``train.progress`` chooses: ``auto`` (the bar when the output is a terminal, epoch lines when it
is a file or a pipe), ``bar``, ``epoch``, ``run`` or ``none``.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar

from contextnorm.metrics import EpochRecord

Echo = Callable[[str], None]


class RunProgressBar(TQDMProgressBar):
    """Lightning's bar, per epoch and per batch, naming the run and showing its epoch metrics.

    Args:
        title: the run, e.g. ``cn seed 0``.
        shown: the epoch metrics shown beside the bar (those logged so far).
    """

    def __init__(self, title: str, shown: Sequence[str]) -> None:
        super().__init__()
        self.title = title
        self.shown = list(shown)

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description(
            f"{self.title} · epoch {trainer.current_epoch + 1}/{trainer.max_epochs}"
        )

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        values = trainer.callback_metrics
        return {key: f"{float(values[key]):.4g}" for key in self.shown if key in values}


class Progress:
    """The runner's console output for one experiment.

    Args:
        mode: ``train.progress``.
        echo: where lines go (``print`` by default).
        is_terminal: whether the output is a terminal; ``None`` asks ``sys.stdout``.
    """

    def __init__(self, mode: str, echo: Echo, is_terminal: bool | None = None) -> None:
        if mode == "auto":
            terminal = sys.stdout.isatty() if is_terminal is None else is_terminal
            mode = "bar" if terminal else "epoch"
        self.mode = mode
        self.echo = echo

    def say(self, line: str) -> None:
        """An experiment-level line (start, resumes, finished runs, notes)."""
        if self.mode != "none":
            self.echo(line)

    def callbacks(self, title: str, shown: Sequence[str]) -> list[L.Callback]:
        """The progress callbacks of one run: the bar, or nothing."""
        return [RunProgressBar(title, shown)] if self.mode == "bar" else []

    def epoch_printer(
        self, title: str, epochs: int, shown: Sequence[str]
    ) -> Callable[[EpochRecord], None] | None:
        """A function printing a line per finished epoch, in ``epoch`` mode; else ``None``."""
        if self.mode != "epoch":
            return None

        def report(record: EpochRecord) -> None:
            values = ", ".join(
                f"{key} {record[key]:.4f}"
                for key in shown
                if key in record and not math.isnan(record[key])
            )
            self.echo(
                f"    {title} epoch {int(record['epoch']) + 1}/{epochs}: {values} "
                f"({record['time_s']:.1f} s)"
            )

        return report
