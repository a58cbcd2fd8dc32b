"""Everything an experiment needs before its first run, checked before any training starts.

:func:`prepare_experiment` loads the data, splits off the validation set, builds the contexts
of every split, checks them, and builds each method's model once, so a bad config (a missing
data set, contexts of the wrong length or out of range, a layer whose K disagrees with the
contexts, a model option that does not exist) fails in seconds, not after the first runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torch import nn

from contextnorm.config import ConfigError, DataConfig, ExperimentConfig, MethodConfig
from contextnorm.contexts import ContextBuilder, ContextPredictor, build_contexts, label_derived
from contextnorm.data import ImageData, load_dataset
from contextnorm.models import build_model
from contextnorm.training.data import ContextDataModule, ContextSplit
from contextnorm.training.methods import get_method
from contextnorm.training.module import ClassificationModule
from contextnorm.training.preprocess import BatchPreprocess, channel_statistics

UNKNOWN_CONTEXT = -1

VIEW_DESCRIPTIONS: dict[str, str] = {
    "input": "context computed from the test image itself (no label information)",
    "oracle": (
        "true superclass given at test time: the papers' protocol, which tells the model part "
        "of the label"
    ),
    "predicted": (
        "superclass predicted from the image by a separate classifier (PCA + logistic regression)"
    ),
    "unknown": "no context given: context layers use their posterior mixture over contexts",
}


class LayerRecorder:
    """A norm factory that remembers the layers it builds: a model's tested layers, in order."""

    def __init__(self, factory: Any) -> None:
        self.factory = factory
        self.layers: list[nn.Module] = []

    def __call__(self, num_features: int) -> nn.Module:
        layer = self.factory(num_features)
        self.layers.append(layer)
        return layer


@dataclass
class BuiltModel:
    """A model and the norm layers under test inside it (forward order for the shipped models)."""

    model: nn.Module
    tested_layers: list[nn.Module]


@dataclass
class PreparedExperiment:
    """The data, contexts and model recipe shared by every run of an experiment.

    Attributes:
        config: the checked config.
        train, val: training and validation splits with their contexts.
        test_views: view name -> the test split with that view's contexts (``VIEW_DESCRIPTIONS``).
        num_contexts: K.
        context_names: a name for each context id.
        context_prediction_accuracy: for label-derived contexts, how often the predicted context
            matches the true one on the test split; else ``None``.
        mean, std: per-channel statistics of the training images (on the [0, 1] scale).
        crop_flip: whether training batches are augmented with random crops and flips.
    """

    config: ExperimentConfig
    train: ContextSplit
    val: ContextSplit
    test_views: dict[str, ContextSplit]
    num_contexts: int
    context_names: list[str]
    context_prediction_accuracy: float | None
    mean: list[float]
    std: list[float]
    crop_flip: bool

    @property
    def num_classes(self) -> int:
        return self.train.data.num_classes

    def build_model(self, index: int) -> BuiltModel:
        """The model of ``config.methods[index]``, initialised from the current random state."""
        method = self.config.methods[index]
        where = _method_location(index, method)
        recorder = LayerRecorder(
            get_method(method.name, where=where).norm_factory(
                self.num_contexts, method.options, where=where
            )
        )
        model_config = self.config.model
        base_norm = None
        if model_config.base_norm is not None:
            base_method = get_method(model_config.base_norm, where="model.base_norm")
            base_norm = base_method.norm_factory(self.num_contexts, {}, where="model.base_norm")
        try:
            model = build_model(
                model_config.name,
                num_classes=self.num_classes,
                in_channels=self.train.data.num_channels,
                image_size=self.train.data.image_size,
                norm_layer=recorder,
                placement=model_config.placement,
                base_norm_layer=base_norm,
                **model_config.options,
            )
        except (TypeError, ValueError) as error:
            raise ConfigError(f"model ({model_config.name}) for {where}: {error}") from error
        if not recorder.layers:
            raise ConfigError(
                f"model.placement={model_config.placement!r} puts no tested norm into "
                f"{model_config.name}; "
                "choose a placement the model supports"
            )
        return BuiltModel(model, recorder.layers)

    def build_module(self, index: int) -> tuple[ClassificationModule, BuiltModel]:
        """The Lightning module of ``config.methods[index]`` and the model inside it."""
        built = self.build_model(index)
        image_size = self.train.data.image_size
        preprocess = BatchPreprocess(
            self.mean, self.std, (image_size, image_size), crop_flip=self.crop_flip
        )
        module = ClassificationModule(built.model, preprocess, self.config.train, self.num_classes)
        return module, built

    def datamodule(self, views: Sequence[str] | None = None) -> ContextDataModule:
        """Loaders over the prepared splits; the test loaders cover ``views`` (default: all)."""
        settings = self.config.train
        chosen = list(self.test_views) if views is None else list(views)
        return ContextDataModule(
            self.train,
            self.val,
            {view: self.test_views[view] for view in chosen},
            batch_size=settings.batch_size,
            eval_batch_size=settings.eval_batch_size or settings.batch_size,
            num_workers=settings.num_workers,
        )

    def summary(self) -> dict[str, Any]:
        """What a results reader needs to know about the data and contexts (JSON-serialisable)."""
        return {
            "num_classes": self.num_classes,
            "classes": self.train.data.classes,
            "num_contexts": self.num_contexts,
            "context_names": self.context_names,
            "label_derived_contexts": label_derived(self.config.contexts.kind),
            "views": {view: VIEW_DESCRIPTIONS[view] for view in self.test_views},
            "context_prediction_accuracy": self.context_prediction_accuracy,
            "samples": {
                "train": len(self.train.data),
                "val": len(self.val.data),
                "test": len(next(iter(self.test_views.values())).data),
            },
            "image_shape": list(self.train.data.images.shape[1:]),
            "mean": self.mean,
            "std": self.std,
            "augmentation": "random crop (padding 4) + horizontal flip"
            if self.crop_flip
            else "none",
        }


def prepare_experiment(config: ExperimentConfig) -> PreparedExperiment:
    """Load and split the data, build and check the contexts, and build every method's model once.

    Raises:
        ConfigError: a config value that does not fit the data (contexts, model, methods).
        FileNotFoundError: the data set is missing (the loader's message says where to get it).
    """
    # Names first: a misspelt method should not wait for the data to load.
    for index, method in enumerate(config.methods):
        get_method(method.name, where=_method_location(index, method))
    data_config = config.data
    train_full = _load(config, "train")
    test = _load(config, "test")
    if data_config.train_samples is not None:
        train_full = _stratified_subset(
            train_full, data_config.train_samples, data_config, "data.train_samples"
        )
    if data_config.test_samples is not None:
        test = _stratified_subset(test, data_config.test_samples, data_config, "data.test_samples")
    if data_config.val_fraction > 0:
        train, val = _split_validation(train_full, config)
    else:
        train, val = train_full, test

    kind = config.contexts.kind
    try:
        builder = build_contexts(
            kind,
            config.contexts.num_contexts,
            train,
            seed=config.contexts.seed,
            **config.contexts.options,
        )
    except (TypeError, ValueError) as error:
        raise ConfigError(f"contexts ({kind}): {error}") from error
    num_contexts = builder.num_contexts
    train_split = ContextSplit(train, _assign(builder, train, "train", kind))
    val_split = ContextSplit(val, _assign(builder, val, "validation", kind))
    test_contexts = _assign(builder, test, "test", kind)

    prediction_accuracy = None
    if not label_derived(kind):
        test_views = {"input": ContextSplit(test, test_contexts)}
    else:
        predictor = ContextPredictor(seed=config.contexts.seed).fit(train, train_split.contexts)
        predicted = check_contexts(
            predictor.predict(test), "predicted test", len(test), num_contexts
        )
        prediction_accuracy = float((predicted == test_contexts).double().mean())
        test_views = {
            "oracle": ContextSplit(test, test_contexts),
            "predicted": ContextSplit(test, predicted),
            "unknown": ContextSplit(test, torch.full_like(test_contexts, UNKNOWN_CONTEXT)),
        }

    mean, std = channel_statistics(train.images)
    crop_flip = data_config.augment == "crop_flip" or (
        data_config.augment == "auto" and train.num_channels == 3
    )
    prepared = PreparedExperiment(
        config=config,
        train=train_split,
        val=val_split,
        test_views=test_views,
        num_contexts=num_contexts,
        context_names=_context_names(kind, train, num_contexts),
        context_prediction_accuracy=prediction_accuracy,
        mean=mean,
        std=std,
        crop_flip=crop_flip,
    )
    for index in range(len(config.methods)):
        _check_recorded_layer(config, prepared.build_model(index), index)
    return prepared


def _check_recorded_layer(config: ExperimentConfig, built: BuiltModel, index: int) -> None:
    """Fail now, not after the first run, if the figures ask for a missing layer or channel."""
    plots = config.plots
    if not plots.enabled:
        return
    count = len(built.tested_layers)
    if plots.layer >= count:
        raise ConfigError(
            f"plots.layer={plots.layer} but the model of methods[{index}] has {count} tested norm "
            f"layer(s); use 0..{count - 1}"
        )
    layer = built.tested_layers[plots.layer]
    channels = getattr(layer, "num_features", getattr(layer, "num_channels", None))
    if channels is not None and plots.channel >= channels:
        raise ConfigError(
            f"plots.channel={plots.channel} but the recorded norm layer has {channels} channels; "
            f"use 0..{channels - 1}"
        )


def check_contexts(contexts: Any, split: str, num_samples: int, num_contexts: int) -> torch.Tensor:
    """``contexts`` if it is an int64 tensor (N,) of ids in [0, K); else an error naming the split.

    Args:
        contexts: the context column of one split.
        split: the split's name, for the message.
        num_samples: N, the number of samples of the split.
        num_contexts: K.
    """
    if (
        not isinstance(contexts, torch.Tensor)
        or contexts.dtype != torch.int64
        or contexts.dim() != 1
    ):
        raise ConfigError(
            f"contexts of the {split} split must be an int64 tensor (N,) of context ids; got "
            f"{getattr(contexts, 'dtype', type(contexts).__name__)} "
            f"{tuple(getattr(contexts, 'shape', ()))}"
        )
    if len(contexts) != num_samples:
        raise ConfigError(
            f"contexts of the {split} split have {len(contexts)} entries but the split has "
            f"{num_samples} "
            "samples; the context column needs exactly one id per sample"
        )
    if num_samples and (int(contexts.min()) < 0 or int(contexts.max()) >= num_contexts):
        raise ConfigError(
            f"contexts of the {split} split must lie in [0, {num_contexts}) for K={num_contexts}; "
            f"got ids in [{int(contexts.min())}, {int(contexts.max())}]. Set "
            "contexts.num_contexts to the number of contexts "
            "the data define, or fix the context column"
        )
    return contexts


def _method_location(index: int, method: MethodConfig) -> str:
    return f"methods[{index}] ({method.display_name})"


def _assign(builder: ContextBuilder, data: ImageData, split: str, kind: str) -> torch.Tensor:
    """The checked context column of one split."""
    try:
        contexts = builder.assign(data)
    except ValueError as error:
        raise ConfigError(f"contexts ({kind}) of the {split} split: {error}") from error
    return check_contexts(contexts, split, len(data), builder.num_contexts)


def _load(config: ExperimentConfig, split: str) -> ImageData:
    data_config = config.data
    try:
        return load_dataset(
            data_config.name,
            data_config.root,
            split,
            download=data_config.download,
            image_size=data_config.image_size,
        )
    except ValueError as error:
        raise ConfigError(f"data ({data_config.name}): {error}") from error


def _stratified_subset(data: ImageData, size: int, data_config: DataConfig, key: str) -> ImageData:
    if size >= len(data):
        return data
    kept, _ = _stratified_partition(data, size, data_config.seed, key)
    return data.subset(kept)


def _split_validation(data: ImageData, config: ExperimentConfig) -> tuple[ImageData, ImageData]:
    held_out = max(1, round(config.data.val_fraction * len(data)))
    rest, validation = _stratified_partition(
        data, len(data) - held_out, config.data.seed, "data.val_fraction"
    )
    return data.subset(rest), data.subset(validation)


def _stratified_partition(
    data: ImageData, first_size: int, seed: int, key: str
) -> tuple[np.ndarray, np.ndarray]:
    """A seeded split of the indices into ``first_size`` and the rest, stratified where possible."""
    positions = np.arange(len(data))
    labels = data.labels.numpy()
    counts = np.bincount(labels)
    second_size = len(data) - first_size
    # sklearn needs two samples of every class and room for every class on each side to stratify.
    can_stratify = counts[counts > 0].min() >= 2 and min(
        first_size, second_size
    ) >= np.count_nonzero(counts)
    try:
        first, second = train_test_split(
            positions,
            train_size=first_size,
            random_state=seed,
            stratify=labels if can_stratify else None,
        )
    except ValueError as error:
        raise ConfigError(f"{key}: cannot split {len(data)} samples this way ({error})") from error
    return np.sort(first), np.sort(second)


def _context_names(kind: str, train: ImageData, num_contexts: int) -> list[str]:
    if kind == "domain" and train.domain_names is not None:
        return list(train.domain_names)
    if (
        kind == "superclass"
        and train.coarse_classes is not None
        and len(train.coarse_classes) == num_contexts
    ):
        return list(train.coarse_classes)
    return [f"{kind} {index}" for index in range(num_contexts)]
