"""Image classification, the papers' first experiment family: cross-entropy, accuracy, views.

Batches are ``(images uint8 (N, C, H, W), labels int64 (N,), contexts int64 (N,))``. Contexts
come from ``contexts:``; a kind computed from the labels (superclasses) is tested in three
views side by side: the oracle context, a context predicted from the image by a separate
classifier, and no context (the layers' posterior mixture).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

import contextnorm as cn
from contextnorm.config import ConfigError, ContextConfig, MethodConfig, TrainConfig
from contextnorm.contexts import CONTEXTS, ContextPredictor, label_derived
from contextnorm.metrics import MetricSpec, ReportSpec, ViewSpec
from contextnorm.registry import UnknownNameError
from contextnorm.tasks.base import TASKS, Probe, Selection, Task
from contextnorm.tasks.data import (
    UNKNOWN_CONTEXT,
    ContextDataModule,
    ContextSplit,
    Splits,
    assign_contexts,
    check_contexts,
    context_names,
    fit_contexts,
    load_splits,
    loading_options,
    per_method_contexts,
    reference_options,
)
from contextnorm.tasks.module import TaskModule
from contextnorm.tasks.network import build_network, get_method, method_location
from contextnorm.tasks.preprocess import BatchPreprocess, channel_statistics

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
TOP_K = 5

PREDICTED_VIEW = ViewSpec(
    "predicted context",
    "superclass predicted from the image by a separate classifier (PCA + logistic regression)",
)
UNKNOWN_VIEW = ViewSpec(
    "unknown context",
    "no context given: context layers use their posterior mixture over contexts",
)


def classification_metrics(num_classes: int, *, weighted: bool = False) -> MetricCollection:
    """Accuracy, top-5 accuracy (for more than 5 classes), macro precision, recall and F1.

    With ``weighted``, also precision and F1 averaged over classes with class-frequency weights
    (scikit-learn's ``average='weighted'``, which some published tables used; weighted recall is
    accuracy itself). The loss is logged by the module itself, not here.
    """
    if num_classes < 2:
        raise ValueError(
            f"num_classes must be at least 2 for classification metrics, got {num_classes}"
        )
    metrics = {
        # torchmetrics averages per class by default; "accuracy" is the share of correct answers.
        "accuracy": MulticlassAccuracy(num_classes, average="micro"),
        "precision": MulticlassPrecision(num_classes, average="macro"),
        "recall": MulticlassRecall(num_classes, average="macro"),
        "f1": MulticlassF1Score(num_classes, average="macro"),
    }
    if num_classes > TOP_K:
        metrics["top5"] = MulticlassAccuracy(num_classes, top_k=TOP_K, average="micro")
    if weighted:
        metrics["weighted_precision"] = MulticlassPrecision(num_classes, average="weighted")
        metrics["weighted_f1"] = MulticlassF1Score(num_classes, average="weighted")
    return MetricCollection(metrics)


def classification_metric_specs(num_classes: int, *, weighted: bool = False) -> list[MetricSpec]:
    """The test metrics of classification, in table order: accuracy first, the loss last.

    Top-5 accuracy is measured only with more than five classes; the class-frequency weighted
    precision and F1 with ``weighted`` (see :func:`classification_metrics`).
    """
    share = {"lower": 0.0, "upper": 1.0, "percent": True}
    specs = [MetricSpec("accuracy", "accuracy", **share)]
    if num_classes > TOP_K:
        specs.append(MetricSpec("top5", "top-5 accuracy", **share))
    specs += [
        MetricSpec("precision", "macro precision", **share),
        MetricSpec("recall", "macro recall", **share),
        MetricSpec("f1", "macro F1", **share),
    ]
    if weighted:
        specs += [
            MetricSpec("weighted_precision", "weighted precision", **share),
            MetricSpec("weighted_f1", "weighted F1", **share),
        ]
    specs.append(MetricSpec("loss", "loss", lower=0.0, higher_is_better=False))
    return specs


CLASSIFICATION_CURVES = [
    MetricSpec("train/loss", "training loss", lower=0.0, higher_is_better=False),
    MetricSpec("val/loss", "validation loss", lower=0.0, higher_is_better=False),
    MetricSpec("train/accuracy", "training accuracy", lower=0.0, upper=1.0),
    MetricSpec("val/accuracy", "validation accuracy", lower=0.0, upper=1.0),
]
"""The per-epoch panels of classification: loss and accuracy, training and validation."""


class ClassificationModule(TaskModule):
    """Classification with cross-entropy: loss and accuracy per epoch, all metrics on val and test.

    Logged names: ``train/loss``, ``train/accuracy``, ``val/loss``, ``val/<metric>``, for each
    further validation view ``val/<view>/<metric>``, and for each test view
    ``test/<view>/<metric>`` (metrics: :func:`classification_metrics`).

    Args:
        model: the network, ``model(images) -> logits``.
        tested_layers: the norm layers under test inside it.
        preprocess: turns uint8 batches into normalised (and, in training, augmented) floats.
        optimization: the ``train:`` settings.
        num_classes: number of classes.
        test_views: the names of the test loaders, in order; each gets its own metrics.
        val_views: the names of the validation loaders after the first, in order: curves
            only (the task's selection metric reads the first loader's ``val/`` values).
        weighted: also measure the class-frequency weighted precision and F1.
    """

    def __init__(
        self,
        model: nn.Module,
        tested_layers: Sequence[nn.Module],
        preprocess: BatchPreprocess,
        optimization: TrainConfig,
        num_classes: int,
        test_views: Sequence[str],
        val_views: Sequence[str] = (),
        *,
        weighted: bool = False,
    ) -> None:
        super().__init__(model, tested_layers, optimization)
        self.preprocess = preprocess
        self.num_classes = num_classes
        self.test_views = list(test_views)
        self.val_views = list(val_views)
        self.train_accuracy = MulticlassAccuracy(num_classes, average="micro")

        def metrics(prefix: str) -> MetricCollection:
            return classification_metrics(num_classes, weighted=weighted).clone(prefix=prefix)

        self.val_metrics = metrics("val/")
        self.val_view_metrics = nn.ModuleDict(
            {view: metrics(f"val/{view}/") for view in self.val_views}
        )
        self.test_metrics = nn.ModuleDict(
            {view: metrics(f"test/{view}/") for view in self.test_views}
        )
        # Evaluation losses as metrics: weighted by the samples of every process, exact when
        # the processes evaluate shards of different sizes.
        self.val_loss = MeanMetric()
        self.val_view_losses = nn.ModuleDict({view: MeanMetric() for view in self.val_views})
        self.test_losses = nn.ModuleDict({view: MeanMetric() for view in self.test_views})

    def evaluation_inputs(
        self, images: torch.Tensor, contexts: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 ``images`` and their ``contexts`` as ``self(images, contexts)`` takes them in
        evaluation: on the module's device, the images normalised and not augmented."""
        images = self.preprocess(images.to(self.device), augment=False)
        return images, contexts.to(self.device)

    def on_after_batch_transfer(self, batch: Batch, dataloader_idx: int) -> Batch:
        images, *rest = batch
        return (self.preprocess(images, augment=self.trainer.training), *rest)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        images, labels, contexts = batch
        logits = self(images, contexts)
        loss = F.cross_entropy(logits, labels)
        self._log_training(loss, logits, labels)
        return loss

    def _log_training(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Log a training step's loss and accuracy, averaged over the epoch."""
        self.train_accuracy(logits.detach(), labels)
        # Losses are plain tensors: sync_dist averages them over processes under multi-device
        # training (a no-op on one device); the torchmetrics objects synchronise themselves.
        self.log(
            "train/loss",
            loss.detach(),
            on_step=False,
            on_epoch=True,
            batch_size=len(labels),
            sync_dist=True,
        )
        self.log(
            "train/accuracy",
            self.train_accuracy,
            on_step=False,
            on_epoch=True,
            batch_size=len(labels),
        )

    def validation_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        if dataloader_idx == 0:
            self._evaluate(batch, "val/", self.val_metrics, self.val_loss)
        else:
            view = self.val_views[dataloader_idx - 1]
            self._evaluate(
                batch, f"val/{view}/", self.val_view_metrics[view], self.val_view_losses[view]
            )

    def test_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        view = self.test_views[dataloader_idx]
        self._evaluate(batch, f"test/{view}/", self.test_metrics[view], self.test_losses[view])

    def _evaluate(
        self, batch: Batch, prefix: str, metrics: MetricCollection, loss: MeanMetric
    ) -> None:
        """Log the loss and ``metrics`` of one evaluation batch under ``prefix``.

        The loss is a metric, weighted by the samples of every process: exact when the
        processes evaluate shards of different sizes.
        """
        images, labels, contexts = batch
        logits = self(images, contexts)
        metrics(logits, labels)
        loss(F.cross_entropy(logits, labels), weight=len(labels))
        self.log(f"{prefix}loss", loss, batch_size=len(labels), add_dataloader_idx=False)
        self.log_dict(metrics, batch_size=len(labels), add_dataloader_idx=False)


def tested_views(
    trainer: L.Trainer,
    module: ClassificationModule,
    datamodule: L.LightningDataModule,
    views: Iterable[str],
    untested_as: str,
) -> dict[str, dict[str, float]]:
    """Test ``module`` on its test views (``module.test_views``, the loaders of
    ``datamodule``): view -> metric -> value for every view of ``views``.

    A model without context layers is tested on fewer views, since the contexts change nothing;
    a view it was not tested on gets the numbers of the tested view ``untested_as``.
    """
    outputs = trainer.test(module, datamodule=datamodule, verbose=False)
    tested = {
        view: {
            key.removeprefix(f"test/{view}/"): float(value)
            for key, value in output.items()
            if key.startswith(f"test/{view}/")
        }
        for view, output in zip(module.test_views, outputs, strict=True)
    }
    return {view: tested.get(view, tested[untested_as]) for view in views}


@dataclass
class PreparedContexts:
    """One way of giving samples contexts, assigned to every split.

    Attributes:
        config: the ``contexts`` section it comes from.
        num_contexts: K.
        names: a name per context id.
        train, val: the training and validation splits with these contexts.
        test: view -> the test split with that view's contexts.
        prediction_accuracy: with label-derived views, how often the predicted test context
            is the true one.
    """

    config: ContextConfig
    num_contexts: int
    names: list[str]
    train: ContextSplit
    val: ContextSplit
    test: dict[str, ContextSplit]
    prediction_accuracy: float | None


@TASKS.register("classification")
class ClassificationTask(Task):
    """Image classification with cross-entropy (the default task).

    Every method gets the experiment's contexts unless its config gives its own
    (``methods: [{name: cn, label: cn-random, contexts: {kind: random}}]``): the context
    ablations then sit in the same tables. The test views follow the experiment's context
    kind; a method with its own contexts gets those in every view.
    """

    selection = Selection("val/loss", "min")

    def setup(self) -> None:
        config = self.config
        # Names first: a misspelt method should not wait for the data to load.
        for index, method in enumerate(config.methods):
            get_method(method.name, method_location(config, index))
        kind = config.contexts.kind
        try:
            builder_class = CONTEXTS.get(kind)
        except UnknownNameError as error:
            raise ConfigError(f"contexts.kind: {error}") from None
        splits = load_splits(config.data)
        if builder_class.label_derived:
            self.views = {"oracle": None, "predicted": PREDICTED_VIEW, "unknown": UNKNOWN_VIEW}
        else:
            self.views = {"input": None}
        self.contexts, self.shared = per_method_contexts(
            config, lambda contexts: self._prepare_contexts(contexts, splits)
        )
        first = next(iter(self.views))
        self.views[first] = ViewSpec(builder_class.title, builder_class.description)
        self.mean, self.std = channel_statistics(splits.train.images)
        augment = config.data.augment
        self.crop_flip = augment == "crop_flip" or (
            augment == "auto" and splits.train.num_channels == 3
        )

    def _prepare_contexts(self, contexts: ContextConfig, splits: Splits) -> PreparedContexts:
        """``contexts`` fitted on the training split and assigned to every split and view."""
        extra = reference_options(contexts, self.config.contexts)
        builder = fit_contexts(contexts, splits.train, **extra)
        kind, count = contexts.kind, builder.num_contexts
        train = ContextSplit(splits.train, assign_contexts(builder, splits.train, "train", kind))
        val = ContextSplit(splits.val, assign_contexts(builder, splits.val, "validation", kind))
        test_contexts = assign_contexts(builder, splits.test, "test", kind)
        accuracy = None
        if "predicted" not in self.views:
            test = {"input": ContextSplit(splits.test, test_contexts)}
        else:
            if count == 1:
                # One context: nothing to predict.
                predicted = torch.zeros_like(test_contexts)
            else:
                predictor = ContextPredictor(seed=contexts.seed).fit(splits.train, train.contexts)
                predicted = check_contexts(
                    predictor.predict(splits.test), "predicted test", len(splits.test), count
                )
            accuracy = float((predicted == test_contexts).double().mean())
            unknown = torch.full_like(test_contexts, UNKNOWN_CONTEXT)
            test = {
                "oracle": ContextSplit(splits.test, test_contexts),
                "predicted": ContextSplit(splits.test, predicted),
                "unknown": ContextSplit(splits.test, unknown),
            }
        names = context_names(kind, splits.train, count)
        return PreparedContexts(contexts, count, names, train, val, test, accuracy)

    @property
    def train(self) -> ContextSplit:
        """The training split with the experiment's contexts."""
        return self.shared.train

    @property
    def test_splits(self) -> dict[str, ContextSplit]:
        """View -> the test split with the experiment's contexts of that view."""
        return self.shared.test

    @property
    def num_classes(self) -> int:
        return self.train.data.num_classes

    def describe(self) -> ReportSpec:
        config, shared, data = self.config, self.shared, self.train.data
        test = next(iter(shared.test.values())).data
        shape = "x".join(map(str, data.images.shape[1:]))
        train = config.train
        notes = []
        if shared.prediction_accuracy is not None:
            notes.append(
                "The context predictor recovers the true context of "
                f"{100 * shared.prediction_accuracy:.2f} % of the test images. Models "
                "without context layers ignore the context, so their views coincide."
            )
        notes += own_contexts_notes(
            config.methods,
            map(_describe_contexts, self.contexts),
            ", in every view in place of the experiment's",
        )
        return ReportSpec(
            about=[
                f"data: {config.data.name}, {len(data)} training / {len(shared.val.data)} "
                f"validation / {len(test)} test images of shape {shape}, {self.num_classes} "
                f"classes; augmentation: {self._augmentation()}",
                f"contexts: {_describe_contexts(shared)}",
                f"model: {config.model.name}, tested norm placement: {config.model.placement}",
                f"training: {train.epochs} epochs, batch {train.batch_size}, {train.optimizer} "
                f"lr {train.lr:g}, weight decay {train.weight_decay:g}, schedule "
                f"{train.schedule}{train.clipping}",
            ],
            views=dict(self.views),
            metrics=classification_metric_specs(self.num_classes),
            curves=CLASSIFICATION_CURVES,
            notes=notes,
            num_contexts=shared.num_contexts,
            context_names=shared.names,
        )

    def info(self) -> dict[str, Any]:
        shared = self.shared
        return {
            "classes": self.train.data.classes,
            "num_contexts": shared.num_contexts,
            "context_names": shared.names,
            "label_derived_contexts": label_derived(self.config.contexts.kind),
            "context_prediction_accuracy": shared.prediction_accuracy,
            "samples": {
                "train": len(self.train.data),
                "val": len(shared.val.data),
                "test": len(next(iter(shared.test.values())).data),
            },
            "image_shape": list(self.train.data.images.shape[1:]),
            "mean": self.mean,
            "std": self.std,
            "augmentation": self._augmentation(),
        }

    def _augmentation(self) -> str:
        return "random crop (padding 4) + horizontal flip" if self.crop_flip else "none"

    def build_module(self, index: int) -> ClassificationModule:
        data = self.train.data
        network = build_network(
            self.config,
            index,
            num_contexts=self.contexts[index].num_contexts,
            num_classes=self.num_classes,
            in_channels=data.num_channels,
            image_size=data.image_size,
        )
        # A model without context layers gives the same numbers in every view: test it once.
        views = list(self.views) if cn.uses_context(network.model) else list(self.views)[:1]
        preprocess = BatchPreprocess(
            self.mean, self.std, (data.image_size, data.image_size), crop_flip=self.crop_flip
        )
        return ClassificationModule(
            network.model,
            network.tested_layers,
            preprocess,
            self.config.train,
            self.num_classes,
            views,
        )

    def datamodule(self, index: int, module: TaskModule) -> ContextDataModule:
        assert isinstance(module, ClassificationModule)
        contexts = self.contexts[index]
        return ContextDataModule(
            contexts.train,
            contexts.val,
            {view: contexts.test[view] for view in module.test_views},
            **loading_options(self.config.train),
        )

    def evaluate(
        self,
        index: int,
        trainer: L.Trainer,
        module: TaskModule,
        datamodule: L.LightningDataModule,
    ) -> dict[str, dict[str, float]]:
        assert isinstance(module, ClassificationModule)
        return tested_views(trainer, module, datamodule, self.views, module.test_views[0])

    def held_out_batch(
        self, index: int, module: TaskModule, seed: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A training batch's worth of validation images (the test images when
        ``data.val_fraction`` is 0), with the method's contexts."""
        assert isinstance(module, ClassificationModule)
        split = self.contexts[index].val
        chosen = split.choose(self.config.train.batch_size, seed)
        return module.evaluation_inputs(split.data.images[chosen], split.contexts[chosen])

    def probe(self, index: int, module: TaskModule, count: int, seed: int) -> Probe:
        assert isinstance(module, ClassificationModule)
        split = next(iter(self.contexts[index].test.values()))
        chosen = split.choose(count, seed)
        module(*module.evaluation_inputs(split.data.images[chosen], split.contexts[chosen]))
        # The figures group the samples by the experiment's contexts, which they name, whatever
        # contexts an ablation ran with (its random groups would be drawn under those names).
        experiment = next(iter(self.shared.test.values()))
        return Probe(contexts=experiment.contexts[chosen], labels=split.data.labels[chosen])


def describe_contexts(config: ContextConfig, num_contexts: int, names: Sequence[str]) -> str:
    """``domain, K = 2 (original, inverted)``, with a random kind's reference."""
    if config.kind != "random":
        return f"{config.kind}, K = {num_contexts} ({', '.join(names)})"
    like = config.options.get("like")
    reference = like if isinstance(like, str) or like is None else like["kind"]
    sizes = "one context" if num_contexts == 1 else "groups of equal size"
    if reference is not None or config.num_contexts is None:
        sizes = f"the group sizes of the {reference or 'experiment'}'s contexts"
    return f"random, K = {num_contexts}, drawn once per sample (seed {config.seed}) with {sizes}"


def own_contexts_notes(
    methods: Sequence[MethodConfig], described: Iterable[str], usage: str
) -> list[str]:
    """The report's note on the methods with contexts of their own, or none if no method has.

    Args:
        methods: ``config.methods``.
        described: each method's contexts in words, in the order of ``methods``.
        usage: how the task uses a method's own contexts, after "trained and tested with those".
    """
    own = [
        f"{method.display_name}: {text}"
        for method, text in zip(methods, described, strict=True)
        if method.contexts is not None
    ]
    if not own:
        return []
    return [
        f"Methods with contexts of their own are trained and tested with those{usage}: "
        + "; ".join(own)
        + "."
    ]


def _describe_contexts(contexts: PreparedContexts) -> str:
    return describe_contexts(contexts.config, contexts.num_contexts, contexts.names)
