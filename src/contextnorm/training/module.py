"""Lightning modules: any model, with each batch's contexts routed to its context layers.

:class:`ContextModule` holds what every task shares: the batch preprocessing, the context
scope around the forward pass, and the optimiser and schedule. A task subclasses it and
writes its steps; :class:`ClassificationModule` is the classification task of the papers.
Other tasks (domain adaptation, GANs) subclass :class:`ContextModule` the same way.

Batches are tuples ``(images uint8, labels, contexts)``; contexts are int64 ids (N,) in
[0, K), -1 where unknown.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

import contextnorm as cn
from contextnorm.config import TrainConfig
from contextnorm.metrics import classification_metrics
from contextnorm.training.preprocess import BatchPreprocess

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
MULTISTEP_MILESTONES = (0.5, 0.75)
MULTISTEP_FACTOR = 0.1


class ContextModule(L.LightningModule):
    """Base LightningModule: preprocessing, context routing, optimiser and learning-rate schedule.

    Args:
        model: the network; it is called as ``model(images)``, and runs inside
            ``contextnorm.use_context(contexts)`` when it holds context layers.
        preprocess: turns uint8 batches into normalised (and, in training, augmented) floats.
        optimization: optimiser, learning rate, weight decay, schedule and epoch count.
    """

    def __init__(
        self, model: nn.Module, preprocess: BatchPreprocess, optimization: TrainConfig
    ) -> None:
        super().__init__()
        self.model = model
        self.preprocess = preprocess
        self.optimization = optimization
        self.needs_context = cn.uses_context(model)

    def forward(self, images: torch.Tensor, contexts: torch.Tensor | None = None) -> Any:
        """The model's output for float images; ``contexts=None`` means unknown contexts."""
        if not self.needs_context:
            return self.model(images)
        with cn.use_context(contexts):
            return self.model(images)

    def on_after_batch_transfer(self, batch: Batch, dataloader_idx: int) -> Batch:
        images, *rest = batch
        return (self.preprocess(images, augment=self.trainer.training), *rest)

    def configure_optimizers(self) -> Any:
        settings = self.optimization
        if settings.optimizer == "adamw":
            optimizer: torch.optim.Optimizer = torch.optim.AdamW(
                self.parameters(), lr=settings.lr, weight_decay=settings.weight_decay
            )
        else:
            optimizer = torch.optim.SGD(
                self.parameters(),
                lr=settings.lr,
                momentum=settings.momentum,
                nesterov=settings.momentum > 0,
                weight_decay=settings.weight_decay,
            )
        if settings.schedule == "constant":
            return optimizer
        if settings.schedule == "multistep":
            milestones = [round(share * settings.epochs) for share in MULTISTEP_MILESTONES]
            scheduler: torch.optim.lr_scheduler.LRScheduler = torch.optim.lr_scheduler.MultiStepLR(
                optimizer, milestones=milestones, gamma=MULTISTEP_FACTOR
            )
        else:
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=settings.epochs)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"},
        }


class ClassificationModule(ContextModule):
    """Classification with cross-entropy: loss and accuracy per epoch, all metrics on val and test.

    Logged names: ``train/loss``, ``train/accuracy``, ``val/<metric>`` and, for each test view,
    ``test/<view>/<metric>`` (metrics: see :func:`contextnorm.metrics.classification_metrics`).

    Args:
        num_classes: number of classes.
        (the others as :class:`ContextModule`.)
    """

    def __init__(
        self,
        model: nn.Module,
        preprocess: BatchPreprocess,
        optimization: TrainConfig,
        num_classes: int,
    ) -> None:
        super().__init__(model, preprocess, optimization)
        self.num_classes = num_classes
        self.train_accuracy = MulticlassAccuracy(num_classes, average="micro")
        self.val_metrics = classification_metrics(num_classes).clone(prefix="val/")
        self.test_metrics = nn.ModuleDict()
        self.test_views: list[str] = []

    def set_test_views(self, views: Sequence[str]) -> None:
        """Name the test dataloaders, in order; each gets its own metrics under ``test/<view>/``."""
        self.test_views = list(views)
        self.test_metrics = nn.ModuleDict(
            {
                view: classification_metrics(self.num_classes).clone(prefix=f"test/{view}/")
                for view in views
            }
        )

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        images, labels, contexts = batch
        logits = self(images, contexts)
        loss = F.cross_entropy(logits, labels)
        self.train_accuracy(logits, labels)
        # Losses are plain tensors: sync_dist averages them over processes under multi-GPU
        # training (a no-op on one device); the torchmetrics objects synchronise themselves.
        self.log(
            "train/loss", loss, on_step=False, on_epoch=True, batch_size=len(labels), sync_dist=True
        )
        self.log(
            "train/accuracy",
            self.train_accuracy,
            on_step=False,
            on_epoch=True,
            batch_size=len(labels),
        )
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        images, labels, contexts = batch
        logits = self(images, contexts)
        self.log(
            "val/loss", F.cross_entropy(logits, labels), batch_size=len(labels), sync_dist=True
        )
        self.val_metrics(logits, labels)
        self.log_dict(self.val_metrics, batch_size=len(labels))

    def test_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        images, labels, contexts = batch
        view = self.test_views[dataloader_idx]
        logits = self(images, contexts)
        metrics = self.test_metrics[view]
        metrics(logits, labels)
        self.log(
            f"test/{view}/loss",
            F.cross_entropy(logits, labels),
            batch_size=len(labels),
            add_dataloader_idx=False,
            sync_dist=True,
        )
        self.log_dict(metrics, batch_size=len(labels), add_dataloader_idx=False)
