"""Unsupervised domain adaptation: AdaMatch, and the source-only baseline, with domain contexts.

The papers' third experiment family (Faye et al. 2024b, Table VI; Faye et al. 2024a, Table VI;
Faye et al. 2024c, Table 2; Faye et al. 2023, the slides): a classifier learns from a labelled
source domain and unlabelled images of a target domain by AdaMatch (Berthelot et al. 2022),
and the source and target domains are the contexts (K = 2) of CN, CN-X and CN-E. The config's
``data`` section is the source and ``task.options.target`` the target; ``model.placement``
says where the tested norm goes: ``input`` (one layer on the input image, the authors' released
code) or ``all`` (every norm replaced, the papers' text).

The model is tested on the source test images and on the target test images under three
context views side by side (:data:`VIEWS`): the true domain id, the source id for every image
(what the authors' evaluation effectively does) and no domain at all. Nothing on the target
selects or stops a run: the selection metric is the loss on held-out *source* images; the
target's validation curves are for reading only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import lightning as L
import numpy as np
import torch

import contextnorm as cn
from contextnorm.config import ConfigError, ContextConfig, DataConfig
from contextnorm.metrics import MetricSpec, ReportSpec, ViewSpec
from contextnorm.tasks.adamatch import AdaMatchModule, WeakStrongAugment
from contextnorm.tasks.adaptation_data import (
    SOURCE_DOMAIN,
    DomainAdaptationDataModule,
    load_domains,
)
from contextnorm.tasks.base import TASKS, Probe, Selection, Task
from contextnorm.tasks.classification import (
    classification_metric_specs,
    describe_contexts,
    own_contexts_notes,
    tested_views,
)
from contextnorm.tasks.data import (
    UNKNOWN_CONTEXT,
    ContextSplit,
    assign_contexts,
    fit_contexts,
    loading_options,
    per_method_contexts,
    reference_options,
)
from contextnorm.tasks.gradient_variance import DOMAINS, STATISTICS, GradientVariance, metric_name
from contextnorm.tasks.module import TaskModule
from contextnorm.tasks.network import build_network, get_method, method_location
from contextnorm.tasks.preprocess import BatchPreprocess, channel_statistics

NUM_DOMAINS = 2
TARGET_KEY = "task.options.target"
CONTEXT_KINDS = ("domain", "random")
"""Context kinds that make sense here: the domains, and the ablation of their information."""

VIEWS = {
    "source": "the source test images, each with its own context (the source id, 0)",
    "target": (
        "the target test images, each with its own context (the target id, 1): what a model "
        "knows when it knows which domain an image comes from"
    ),
    "target_as_source": (
        "the target test images all given the source's id (0): what the context-normalization "
        "authors' evaluation does where it passes a context at all (Faye et al. 2024a, "
        "Sec. IV-E: 'considering the cluster identifier of the source domain during "
        "inference'; Faye et al. 2023: 'using source domain (MNIST) as a context identifier')"
    ),
    "target_unknown": (
        "the target test images with an unknown context (-1): context layers use their "
        "posterior mixture over the contexts"
    ),
}
"""The test views, in table order: view name -> what the model is given."""
SOURCE_VIEWS = ("source", "target")
"""The views that differ for a model without context layers."""

CURVES = [
    MetricSpec("train/loss", "training loss", lower=0.0, higher_is_better=False),
    MetricSpec("val/loss", "source validation loss (selects)", lower=0.0, higher_is_better=False),
    MetricSpec("train/accuracy", "source training accuracy (weak view)", 0.0, 1.0),
    MetricSpec("val/accuracy", "source validation accuracy", 0.0, 1.0),
    MetricSpec("val/target/accuracy", "target validation accuracy (read only)", 0.0, 1.0),
    MetricSpec("train/mask_rate", "share of target images pseudo-labelled", 0.0, 1.0),
    MetricSpec("train/pseudo_label_accuracy", "pseudo-label accuracy (read only)", 0.0, 1.0),
]
"""The per-epoch panels: the source's, then the target's (its labels read, never used)."""


@dataclass
class AdaptationOptions:
    """``task.options`` of domain adaptation; defaults are the papers' and AdaMatch's values.

    Attributes:
        target: the unlabelled target domain, a data section like ``data`` (e.g. ``{name:
            svhn, image_size: 32}``); its labels are used for testing and read-only curves.
        source_only: labels of the methods trained on the labelled source alone (the
            reference without adaptation); every other method trains by AdaMatch.
        uratio: target images per source image in a batch (3: AdaMatch, Keras). The source
            images per batch are ``train.batch_size`` (64 in the papers).
        tau: relative confidence ratio of the pseudo-labels (0.9: AdaMatch).
        final_lr_fraction: ``train.schedule: cosine`` decays the learning rate at every step
            to this share of it (0.25: the Keras example's ``CosineDecay(0.03, T, 0.25)``).
        translate: weak augmentation: random shift of up to this share of the image side,
            borders reflected (0.125: FixMatch/AdaMatch).
        flip: weak augmentation also flips horizontally. Off for digits, where a mirror image
            is not the same digit (the Keras example flips).
        randaugment_ops: strong augmentation: RandAugment operations per image (2: Keras,
            FixMatch).
        cutout: strong augmentation ends with a grey square over up to a quarter of the image
            (the AdaMatch authors' code; Keras does not).
        gradient_variance: record each epoch's gradient variance of the source and target
            losses: ``true`` for every method, a list of method labels for those, ``false``
            for none (one extra backward pass per AdaMatch step; one device only).
    """

    target: DataConfig | None = None
    source_only: list[str] = field(default_factory=list)
    uratio: int = 3
    tau: float = 0.9
    final_lr_fraction: float = 0.25
    translate: float = 0.125
    flip: bool = False
    randaugment_ops: int = 2
    cutout: bool = True
    gradient_variance: bool | list[str] = True

    def check(self) -> None:
        if self.target is None:
            raise ConfigError(
                f"{TARGET_KEY} is required: domain adaptation needs an unlabelled target domain, "
                "a data section like `data`, e.g. {name: svhn, image_size: 32}"
            )
        self.target.check(TARGET_KEY)
        ranges = {
            "uratio": (self.uratio >= 1, "must be a positive integer"),
            "randaugment_ops": (self.randaugment_ops >= 0, "must be >= 0"),
            "tau": (0.0 <= self.tau <= 1.0, "must be in [0, 1]"),
            "final_lr_fraction": (0.0 <= self.final_lr_fraction <= 1.0, "must be in [0, 1]"),
            "translate": (0.0 <= self.translate < 0.5, "must be in [0, 0.5)"),
        }
        for name, (valid, rule) in ranges.items():
            if not valid:
                raise ConfigError(f"task.options.{name} {rule}; got {getattr(self, name)!r}")


@dataclass
class PreparedContexts:
    """One way of giving the samples of both domains contexts, assigned to every split.

    Attributes:
        config: the ``contexts`` section it comes from.
        num_contexts: K.
        train: source and target training images (source first) with their contexts.
        val: the source validation images (the selection metric's).
        val_target: the target validation images (read-only curves).
        test: view -> the test images with that view's contexts.
    """

    config: ContextConfig
    num_contexts: int
    train: ContextSplit
    val: ContextSplit
    val_target: ContextSplit
    test: dict[str, ContextSplit]


@TASKS.register("adaptation")
class AdaptationTask(Task):
    """Unsupervised domain adaptation (AdaMatch or source-only), domains as contexts."""

    Options = AdaptationOptions
    options: AdaptationOptions
    # The source's held-out images: no target label selects or stops a run.
    selection = Selection("val/loss", "min")

    def setup(self) -> None:
        config, options = self.config, self.options
        labels = [method.display_name for method in config.methods]
        for index, method in enumerate(config.methods):
            get_method(method.name, method_location(config, index))
            if method.contexts is not None and method.contexts.kind not in CONTEXT_KINDS:
                raise ConfigError(
                    f"methods[{index}].contexts.kind: domain adaptation takes {CONTEXT_KINDS}, "
                    f"got {method.contexts.kind!r}"
                )
        measured = options.gradient_variance
        for key, named in (
            ("source_only", options.source_only),
            ("gradient_variance", measured if isinstance(measured, list) else []),
        ):
            unknown = [label for label in named if label not in labels]
            if unknown:
                raise ConfigError(
                    f"task.options.{key} names {unknown}, which are not method labels "
                    f"({', '.join(labels)})"
                )
        if config.contexts.kind != "domain":
            raise ConfigError(
                f"contexts.kind must be domain for domain adaptation (the source and target are "
                f"the contexts); got {config.contexts.kind!r}. Ablations go in a method's own "
                "contexts: {kind: random} or {kind: random, num_contexts: 1}"
            )
        if config.contexts.num_contexts not in (None, NUM_DOMAINS):
            raise ConfigError(
                f"contexts.num_contexts must be {NUM_DOMAINS} (source and target) or null; got "
                f"{config.contexts.num_contexts}"
            )
        if config.data.augment == "crop_flip":
            raise ConfigError(
                "data.augment=crop_flip does not apply to domain adaptation, which augments with "
                "its own weak and strong views (task.options.translate, flip, randaugment_ops, "
                "cutout); leave data.augment at auto"
            )
        assert options.target is not None  # AdaptationOptions.check
        self.domains = load_domains(config.data, options.target, TARGET_KEY)
        source_train = len(self.domains.source.train)
        if config.train.batch_size > source_train:
            raise ConfigError(
                f"train.batch_size={config.train.batch_size} source images per step, but the "
                f"source has {source_train} training images; lower train.batch_size"
            )
        self.contexts, self.shared = per_method_contexts(config, self._prepare_contexts)
        self.mean, self.std = channel_statistics(self.domains.combined("train").images)

    def _prepare_contexts(self, contexts: ContextConfig) -> PreparedContexts:
        """``contexts`` fitted on both domains' training images, assigned to every split."""
        domains = self.domains
        train = domains.combined("train")
        builder = fit_contexts(contexts, train, **reference_options(contexts, self.config.contexts))
        assigned = {
            split: assign_contexts(builder, domains.combined(split), split, contexts.kind)
            for split in ("train", "val", "test")
        }
        sizes = {split: len(getattr(domains.source, split)) for split in ("val", "test")}
        target_test = domains.target.test
        own = assigned["test"][sizes["test"] :]
        return PreparedContexts(
            config=contexts,
            num_contexts=builder.num_contexts,
            train=ContextSplit(train, assigned["train"]),
            val=ContextSplit(domains.source.val, assigned["val"][: sizes["val"]]),
            val_target=ContextSplit(domains.target.val, assigned["val"][sizes["val"] :]),
            test={
                "source": ContextSplit(domains.source.test, assigned["test"][: sizes["test"]]),
                "target": ContextSplit(target_test, own),
                "target_as_source": ContextSplit(target_test, torch.full_like(own, SOURCE_DOMAIN)),
                "target_unknown": ContextSplit(target_test, torch.full_like(own, UNKNOWN_CONTEXT)),
            },
        )

    @property
    def num_classes(self) -> int:
        return self.domains.source.train.num_classes

    @property
    def image_size(self) -> int:
        return self.domains.source.train.image_size

    def describe(self) -> ReportSpec:
        config, options, domains = self.config, self.options, self.domains
        source_name, target_name = domains.names
        views = {
            "source": ViewSpec(f"source: {source_name}", VIEWS["source"]),
            "target": ViewSpec(f"target: {target_name}, true domain id", VIEWS["target"]),
            "target_as_source": ViewSpec(
                f"target: {target_name}, source domain id", VIEWS["target_as_source"]
            ),
            "target_unknown": ViewSpec(
                f"target: {target_name}, unknown domain", VIEWS["target_unknown"]
            ),
        }
        notes = [
            "Precision, recall and F1 are macro averages over the classes, the column names of "
            "the papers' domain-adaptation tables. The authors' evaluation code computes them "
            "with scikit-learn's average='weighted', which makes recall equal accuracy (as in "
            "the tables' CN, CN-X and CN-E rows); the weighted precision and F1 are reported "
            "here too (the weighted recall is the accuracy itself).",
            "Models without context layers ignore the context, so their three target views "
            "coincide.",
        ]
        notes += own_contexts_notes(
            config.methods,
            map(_describe_contexts, self.contexts),
            " (the 'true domain id' view gives each test image its own context; the 'source "
            "domain id' view gives every target image context 0)",
        )
        curve_figures = {}
        if any(self._measures_gradients(label) for label in self._labels()):
            notes.append(
                "gradient_variance.png: for each domain's loss term (source: the labelled "
                "cross-entropy; target: the pseudo-label loss without its warm-up weight), the "
                "variance over an epoch's steps of each weight's mini-batch gradient, then the "
                "maximum and the mean over all weights. Methods trained on the source alone "
                "have no target term."
            )
            curve_figures["gradient_variance"] = [
                MetricSpec(
                    metric_name(domain, statistic),
                    f"{domain}: {statistic} gradient variance over weights",
                    lower=0.0,
                    higher_is_better=False,
                )
                for domain in DOMAINS
                for statistic in STATISTICS
            ]
        train = config.train
        steps = len(domains.source.train) // train.batch_size
        schedule = (
            f"cosine per step to {options.final_lr_fraction:g} x lr"
            if train.schedule == "cosine"
            else train.schedule
        )
        adapted = [label for label in self._labels() if label not in options.source_only]
        placement = {
            "input": "one norm on the input image, BatchNorm elsewhere (the "
            "context-normalization authors' released code)",
            "all": "every norm replaced (the papers' text)",
        }.get(config.model.placement, config.model.placement)
        shape = "x".join(map(str, domains.source.train.images.shape[1:]))
        return ReportSpec(
            about=[
                f"source: {source_name} (`{config.data.name}`), {_counts(domains.source)}",
                f"target: {target_name} (`{options.target.name}`), {_counts(domains.target)} "
                "(training images unlabelled)",
                f"images {shape}, {self.num_classes} classes",
                f"contexts: {_describe_contexts(self.shared)}; CN, CN-X and CN-E take them, "
                "the other norms none (ACN, MixNorm and ModeNorm have as many components)",
                f"model: {config.model.name}{_options(config.model.options)}, tested norm "
                f"placement: {placement}",
                f"AdaMatch (uratio {options.uratio}, tau {options.tau:g}): "
                f"{', '.join(adapted) or 'none'}; source only: "
                f"{', '.join(options.source_only) or 'none'}",
                f"training: {train.epochs} epochs of {steps} steps, {train.batch_size} source + "
                f"{options.uratio * train.batch_size} target images per step, "
                f"{train.optimizer} lr {train.lr:g}, weight decay {train.weight_decay:g} (conv "
                f"and linear weights), schedule {schedule}{train.clipping}",
                "selection: the source validation loss; nothing on the target selects or stops "
                "a run",
            ],
            views=views,
            metrics=classification_metric_specs(self.num_classes, weighted=True),
            curves=CURVES,
            notes=notes,
            num_contexts=NUM_DOMAINS,
            context_names=list(domains.names),
            curve_figures=curve_figures,
        )

    def _labels(self) -> list[str]:
        return [method.display_name for method in self.config.methods]

    def info(self) -> dict[str, Any]:
        domains = self.domains
        return {
            "classes": domains.source.train.classes,
            "domain_names": list(domains.names),
            "samples": {
                name: {split: len(getattr(splits, split)) for split in ("train", "val", "test")}
                for name, splits in (("source", domains.source), ("target", domains.target))
            },
            "image_shape": list(domains.source.train.images.shape[1:]),
            "mean": self.mean,
            "std": self.std,
            "source_only": list(self.options.source_only),
        }

    def build_module(self, index: int) -> AdaMatchModule:
        config, options = self.config, self.options
        network = build_network(
            config,
            index,
            num_contexts=self.contexts[index].num_contexts,
            num_classes=self.num_classes,
            in_channels=self.domains.source.train.num_channels,
            image_size=self.image_size,
        )
        # A model without context layers gives the same numbers in every target view.
        views = list(VIEWS) if cn.uses_context(network.model) else list(SOURCE_VIEWS)
        size = (self.image_size, self.image_size)
        return AdaMatchModule(
            network.model,
            network.tested_layers,
            BatchPreprocess(self.mean, self.std, size, crop_flip=False),
            WeakStrongAugment(
                size,
                translate=options.translate,
                flip=options.flip,
                randaugment_ops=options.randaugment_ops,
                cutout=options.cutout,
            ),
            config.train,
            self.num_classes,
            views,
            val_views=["target"],
            uratio=options.uratio,
            tau=options.tau,
            final_lr_fraction=options.final_lr_fraction,
            source_only=config.methods[index].display_name in options.source_only,
        )

    def datamodule(self, index: int, module: TaskModule) -> DomainAdaptationDataModule:
        assert isinstance(module, AdaMatchModule)
        contexts = self.contexts[index]
        return DomainAdaptationDataModule(
            contexts.train,
            contexts.val,
            {view: contexts.test[view] for view in module.test_views},
            uratio=self.options.uratio,
            val_views={"target": contexts.val_target},
            **loading_options(self.config.train),
        )

    def _measures_gradients(self, label: str) -> bool:
        measured = self.options.gradient_variance
        return measured if isinstance(measured, bool) else label in measured

    def callbacks(self, index: int) -> list[L.Callback]:
        label = self.config.methods[index].display_name
        return [GradientVariance()] if self._measures_gradients(label) else []

    def evaluate(
        self,
        index: int,
        trainer: L.Trainer,
        module: TaskModule,
        datamodule: L.LightningDataModule,
    ) -> dict[str, dict[str, float]]:
        assert isinstance(module, AdaMatchModule)
        return tested_views(trainer, module, datamodule, VIEWS, untested_as="target")

    def held_out_batch(
        self, index: int, module: TaskModule, seed: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Source then target validation images, as many of each as a training step's norms
        normalise (two views of ``batch_size`` source and ``uratio * batch_size`` target
        images), with the method's contexts."""
        assert isinstance(module, AdaMatchModule)
        images, contexts = [], []
        splits = (self.contexts[index].val, self.contexts[index].val_target)
        shares = (module.source_batch_size, module.target_batch_size)
        for split, share in zip(splits, shares, strict=True):
            chosen = split.choose(2 * share, seed)
            images.append(split.data.images[chosen])
            contexts.append(split.contexts[chosen])
        return module.evaluation_inputs(torch.cat(images), torch.cat(contexts))

    def probe(self, index: int, module: TaskModule, count: int, seed: int) -> Probe:
        """Half the samples from the source test images, half from the target's, each run with
        its own context (the 'true domain id' view) and drawn in its domain."""
        assert isinstance(module, AdaMatchModule)
        rng = np.random.default_rng(seed)
        images, contexts, domains, labels = [], [], [], []
        for domain, (view, share) in enumerate(
            zip(SOURCE_VIEWS, (count // 2, count - count // 2), strict=True)
        ):
            split = self.contexts[index].test[view]
            chosen = torch.from_numpy(np.sort(rng.permutation(len(split.data))[:share]))
            images.append(split.data.images[chosen])
            contexts.append(split.contexts[chosen])
            domains.append(torch.full((len(chosen),), domain, dtype=torch.int64))
            labels.append(split.data.labels[chosen])
        module(*module.evaluation_inputs(torch.cat(images), torch.cat(contexts)))
        # The figures name the domains: an ablation's random contexts would be mislabelled.
        return Probe(contexts=torch.cat(domains), labels=torch.cat(labels))


def _options(options: dict[str, Any]) -> str:
    """`` (depth 10, widen_factor 2)``, or nothing."""
    return f" ({', '.join(f'{key} {value}' for key, value in options.items())})" if options else ""


def _counts(splits: Any) -> str:
    return (
        f"{len(splits.train)} training / {len(splits.val)} validation / {len(splits.test)} "
        "test images"
    )


def _describe_contexts(contexts: PreparedContexts) -> str:
    return describe_contexts(contexts.config, contexts.num_contexts, ("source", "target"))
