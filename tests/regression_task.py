"""A task defined outside the package: regress a digit's value from its image.

It shows what a task writes (its options, batch layout, module, metrics, selection metric and
report) and what it leaves to the runner (loops, checkpoints, resume, seeds, progress, tables,
figures). ``tests/test_tasks.py`` runs it end to end.
"""

from __future__ import annotations

from dataclasses import dataclass

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics import MeanAbsoluteError, MeanSquaredError

from contextnorm.metrics import MetricSpec, ReportSpec, ViewSpec
from contextnorm.tasks import TASKS, Probe, Selection, Task, TaskModule
from contextnorm.tasks.data import (
    ContextDataModule,
    ContextSplit,
    assign_contexts,
    context_names,
    fit_contexts,
    load_splits,
)
from contextnorm.tasks.network import build_network
from contextnorm.tasks.preprocess import BatchPreprocess, channel_statistics


class RegressionModule(TaskModule):
    """One output per image, trained with the squared error to ``scale * label``."""

    def __init__(self, network, preprocess, optimization, scale: float) -> None:
        super().__init__(network.model, network.tested_layers, optimization)
        self.preprocess = preprocess
        self.scale = scale
        self.val_error = MeanAbsoluteError()
        self.test_errors = torch.nn.ModuleDict(
            {"mae": MeanAbsoluteError(), "mse": MeanSquaredError()}
        )

    def _predict(self, batch):
        images, labels, contexts = batch
        inputs = self.preprocess(images, augment=False)
        return self(inputs, contexts).squeeze(1), labels.float() * self.scale

    def training_step(self, batch, batch_idx):
        predictions, targets = self._predict(batch)
        loss = F.mse_loss(predictions, targets)
        self.log("train/mse", loss, on_step=False, on_epoch=True, batch_size=len(targets))
        return loss

    def validation_step(self, batch, batch_idx):
        predictions, targets = self._predict(batch)
        self.val_error(predictions, targets)
        self.log("val/mae", self.val_error, batch_size=len(targets))

    def test_step(self, batch, batch_idx):
        predictions, targets = self._predict(batch)
        for name, metric in self.test_errors.items():
            metric(predictions, targets)
            self.log(f"test/{name}", metric, batch_size=len(targets))


@TASKS.register("digit-regression")
class DigitRegression(Task):
    """Regress the digit's value from its image (a task registered by a user)."""

    @dataclass
    class Options:
        scale: float = 1.0

    selection = Selection("val/mae", "min")

    def setup(self) -> None:
        config = self.config
        splits = load_splits(config.data)
        builder = fit_contexts(config.contexts, splits.train)
        self.num_contexts = builder.num_contexts
        self.splits = {
            name: ContextSplit(data, assign_contexts(builder, data, name, config.contexts.kind))
            for name, data in (("train", splits.train), ("val", splits.val), ("test", splits.test))
        }
        self.names = context_names(config.contexts.kind, splits.train, self.num_contexts)
        self.mean, self.std = channel_statistics(splits.train.images)

    def describe(self) -> ReportSpec:
        error = {"lower": 0.0, "higher_is_better": False}
        return ReportSpec(
            about=[f"targets: {self.options.scale:g} x the digit's value"],
            views={"test": ViewSpec("stored domain", "each test image's own domain")},
            metrics=[
                MetricSpec("mae", "mean absolute error", **error),
                MetricSpec("mse", "mean squared error", **error),
            ],
            curves=[
                MetricSpec("train/mse", "training squared error", **error),
                MetricSpec("val/mae", "validation absolute error", **error),
            ],
            num_contexts=self.num_contexts,
            context_names=self.names,
        )

    def build_module(self, index: int) -> RegressionModule:
        data = self.splits["train"].data
        network = build_network(
            self.config,
            index,
            num_contexts=self.num_contexts,
            num_classes=1,
            in_channels=data.num_channels,
            image_size=data.image_size,
        )
        size = (data.image_size, data.image_size)
        preprocess = BatchPreprocess(self.mean, self.std, size, crop_flip=False)
        return RegressionModule(network, preprocess, self.config.train, self.options.scale)

    def datamodule(self, index: int, module: TaskModule) -> L.LightningDataModule:
        settings = self.config.train
        return ContextDataModule(
            self.splits["train"],
            self.splits["val"],
            {"test": self.splits["test"]},
            batch_size=settings.batch_size,
            eval_batch_size=settings.batch_size,
        )

    def evaluate(self, index, trainer, module, datamodule) -> dict[str, dict[str, float]]:
        (output,) = trainer.test(module, datamodule=datamodule, verbose=False)
        return {"test": {name: float(output[f"test/{name}"]) for name in ("mae", "mse")}}

    def probe(self, index: int, module: TaskModule, count: int, seed: int) -> Probe:
        split = self.splits["test"]
        chosen = torch.from_numpy(
            np.sort(np.random.default_rng(seed).permutation(len(split.data))[:count])
        )
        module._predict(
            (split.data.images[chosen], split.data.labels[chosen], split.contexts[chosen])
        )
        return Probe(split.contexts[chosen], split.data.labels[chosen])
