"""Data every task needs: the configured splits, their contexts, and Lightning loaders over them.

The helpers here turn the ``data:`` and ``contexts:`` sections into checked tensors, raising
``ConfigError`` that names the key to change, so that each task reads its data the same way.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import lightning as L
import numpy as np
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, Dataset, TensorDataset

from contextnorm.config import (
    ConfigError,
    ContextConfig,
    DataConfig,
    ExperimentConfig,
    TrainConfig,
)
from contextnorm.contexts import CONTEXTS, ContextBuilder, build_contexts
from contextnorm.data import ImageData, load_dataset
from contextnorm.data.files import MissingFilesError
from contextnorm.registry import UnknownNameError

Prepared = TypeVar("Prepared")

UNKNOWN_CONTEXT = -1
"""The context id of a sample whose context is unknown (layers use their posterior mixture)."""


@dataclass(frozen=True)
class ContextSplit:
    """One split of the data and the context of each of its samples.

    Attributes:
        data: the images and labels.
        contexts: int64 (N,) context ids in [0, K), or -1 for "unknown" (the layers then use
            their posterior mixture over contexts).
    """

    data: ImageData
    contexts: torch.Tensor

    def __post_init__(self) -> None:
        if self.contexts.dtype != torch.int64 or self.contexts.shape != (len(self.data),):
            raise ValueError(
                f"contexts must be an int64 tensor of shape ({len(self.data)},), "
                "one id per sample; "
                f"got dtype {self.contexts.dtype} and shape {tuple(self.contexts.shape)}"
            )

    def dataset(self) -> TensorDataset:
        """The split as a dataset of (image, label, context) triples."""
        return TensorDataset(self.data.images, self.data.labels, self.contexts)

    def choose(self, count: int, seed: int) -> torch.Tensor:
        """Indices of ``count`` samples (every sample when there are fewer) drawn without
        replacement with ``seed``, in increasing order."""
        order = np.random.default_rng(seed).permutation(len(self.data))
        return torch.from_numpy(np.sort(order[:count]))


@dataclass(frozen=True)
class Splits:
    """The training, validation and test data of an experiment (contexts not yet assigned)."""

    train: ImageData
    val: ImageData
    test: ImageData


def load_data(data: DataConfig, split: str, key: str = "data") -> ImageData:
    """One split of the configured data set; errors name the keys (under ``key``) to change."""
    try:
        return load_dataset(
            data.name,
            data.root,
            split,
            download=data.download,
            image_size=data.image_size,
            **data.options,
        )
    except MissingFilesError as error:
        where = f"Or set {key}.root to the folder that holds the files"
        fetch = "" if data.download else f", or {key}.download=true where a network is available"
        raise MissingFilesError(error.details, f"{where}{fetch}.") from None
    except UnknownNameError as error:
        raise ConfigError(f"{key}.name: {error}") from None
    except ValueError as error:
        raise ConfigError(f"{key} ({data.name}): {error}") from error


def load_splits(data: DataConfig, key: str = "data") -> Splits:
    """The configured splits: subsets (``train_samples``, ``test_samples``) and the validation
    hold-out (``val_fraction``; with 0 the test split validates, as in the papers).

    Args:
        data: the data section.
        key: where it sits in the config (``data``, or a task's second data set), for messages.

    Raises:
        ConfigError: train and test do not hold the same classes, or a subset cannot be drawn.
    """
    train_full = load_data(data, "train", key)
    test = load_data(data, "test", key)
    check_same_classes(train_full, test, f"{key} ({data.name})")
    if data.train_samples is not None:
        train_full = _stratified_subset(
            train_full, data.train_samples, data, f"{key}.train_samples"
        )
    if data.test_samples is not None:
        test = _stratified_subset(test, data.test_samples, data, f"{key}.test_samples")
    if data.val_fraction == 0:
        return Splits(train_full, test, test)
    held_out = max(1, round(data.val_fraction * len(train_full)))
    rest, validation = _stratified_partition(
        train_full, len(train_full) - held_out, data.seed, f"{key}.val_fraction"
    )
    return Splits(train_full.subset(rest), train_full.subset(validation), test)


def check_same_classes(train: ImageData, test: ImageData, name: str) -> None:
    """Refuse a test split whose classes are not the training split's (``name``: how messages
    call the data, e.g. ``data (mnist)``).

    A class seen in training but absent from the test images (or the reverse) makes every
    per-class metric and the comparison with published numbers meaningless, and usually means
    a misplaced folder.
    """
    if train.classes != test.classes:
        raise ConfigError(
            f"{name}: the train and test splits name different classes "
            f"(train: {train.classes[:10]}, test: {test.classes[:10]}); give both splits the "
            "same classes"
        )
    for present, absent in (("train", "test"), ("test", "train")):
        counts = {
            "train": torch.bincount(train.labels, minlength=train.num_classes),
            "test": torch.bincount(test.labels, minlength=test.num_classes),
        }
        missing = [
            train.classes[label]
            for label in range(train.num_classes)
            if counts[present][label] > 0 and counts[absent][label] == 0
        ]
        if missing:
            raise ConfigError(
                f"{name}: class(es) {missing[:10]} have {present} images but no {absent} "
                f"images; put {absent} images of every class in place (for image-folder: "
                f"{absent}/<class>/), or remove the class from both splits"
            )


def fit_contexts(contexts: ContextConfig, train: ImageData, **extra: Any) -> ContextBuilder:
    """The context builder of ``contexts:`` fitted on ``train``; errors name the keys.

    Args:
        contexts: the config section.
        train: the training split.
        **extra: options a task adds to ``contexts.options`` (e.g. the reference of ``random``).
    """
    try:
        return build_contexts(
            contexts.kind,
            contexts.num_contexts,
            train,
            seed=contexts.seed,
            **{**extra, **contexts.options},
        )
    except UnknownNameError as error:
        raise ConfigError(f"contexts.kind: {error}") from None
    except (TypeError, ValueError) as error:
        raise ConfigError(f"contexts ({contexts.kind}): {error}") from error


def per_method_contexts(
    config: ExperimentConfig, prepare: Callable[[ContextConfig], Prepared]
) -> tuple[list[Prepared], Prepared]:
    """``prepare`` run once per distinct ``contexts`` section of an experiment.

    Returns:
        One result per method (of its own contexts, or of the experiment's), and the result of
        the experiment's contexts; methods with equal sections share one result.
    """
    prepared: dict[str, Prepared] = {}

    def get(contexts: ContextConfig) -> Prepared:
        key = json.dumps(dataclasses.asdict(contexts), sort_keys=True, default=str)
        if key not in prepared:
            prepared[key] = prepare(contexts)
        return prepared[key]

    per_method = [get(method.contexts or config.contexts) for method in config.methods]
    return per_method, get(config.contexts)


def reference_options(contexts: ContextConfig, experiment: ContextConfig) -> dict[str, Any]:
    """Builder options a method's ``contexts`` take from the experiment's: the ``random`` kind
    without a ``like`` of its own copies the experiment's K and group sizes (the ablation of
    the experiment's contexts)."""
    if contexts.kind != "random" or "like" in contexts.options:
        return {}
    return {
        "like": {
            "kind": experiment.kind,
            "num_contexts": experiment.num_contexts,
            "options": experiment.options,
        }
    }


def assign_contexts(
    builder: ContextBuilder, data: ImageData, split: str, kind: str
) -> torch.Tensor:
    """The checked context column of one split (ids in [0, K), one per sample)."""
    try:
        contexts = builder.assign(data)
    except ValueError as error:
        raise ConfigError(f"contexts ({kind}) of the {split} split: {error}") from error
    return check_contexts(contexts, split, len(data), builder.num_contexts)


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
            f"{num_samples} samples; the context column needs exactly one id per sample"
        )
    if num_samples and (int(contexts.min()) < 0 or int(contexts.max()) >= num_contexts):
        raise ConfigError(
            f"contexts of the {split} split must lie in [0, {num_contexts}) for K={num_contexts}; "
            f"got ids in [{int(contexts.min())}, {int(contexts.max())}]. Set "
            "contexts.num_contexts to the number of contexts the data define, or fix the "
            "context column"
        )
    return contexts


def context_names(kind: str, train: ImageData, num_contexts: int) -> list[str]:
    """A readable name for each context id: domain, superclass or class names where there are."""
    if kind == "class" and len(train.classes) == num_contexts:
        return list(train.classes)
    if kind == "domain" and train.domain_names is not None:
        return list(train.domain_names)
    if (
        kind == "superclass"
        and train.coarse_classes is not None
        and len(train.coarse_classes) == num_contexts
    ):
        return list(train.coarse_classes)
    title = CONTEXTS.get(kind).title if kind in CONTEXTS else kind
    return [f"{title} {index}" for index in range(num_contexts)]


def _stratified_subset(data: ImageData, size: int, config: DataConfig, key: str) -> ImageData:
    if size >= len(data):
        return data
    kept, _ = _stratified_partition(data, size, config.seed, key)
    return data.subset(kept)


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


def process_batch_size(batch_size: int, processes: int, key: str) -> int:
    """Each of ``processes`` processes' share of a batch of ``batch_size``: the configured batch
    is the whole step's, so that the number of devices does not change what is trained.

    Raises:
        ConfigError: the batch does not split evenly over the processes (``key`` names it).
    """
    if batch_size % processes:
        raise ConfigError(
            f"{key}={batch_size} is the batch of one step over all {processes} processes and must "
            f"split evenly between them; use a multiple of {processes}"
        )
    return batch_size // processes


def data_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    train: bool,
    trainer: L.Trainer | None,
    key: str,
    num_workers: int = 0,
) -> DataLoader:
    """A loader of ``dataset`` for one process: training shuffles, evaluation reads in order.

    ``batch_size`` is the whole step's batch (see :func:`process_batch_size`). Under several
    processes, Lightning shards a training loader (every shard padded to the same number of
    batches, as DDP needs); an evaluation loader reads every ``world_size``-th sample from the
    process's rank on, so that every sample is evaluated exactly once (shards may then differ
    by a batch, which evaluation allows: its steps run no collective).
    """
    size = process_batch_size(batch_size, 1 if trainer is None else trainer.world_size, key)
    sampler = None
    if not train and trainer is not None and trainer.world_size > 1:
        sampler = UnrepeatedDistributedSampler(
            dataset, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False
        )
    return DataLoader(
        dataset,
        batch_size=size,
        shuffle=train,
        sampler=sampler,
        # A last training batch of one image breaks batch statistics on 1x1 feature maps.
        drop_last=train and len(dataset) > batch_size,  # type: ignore[arg-type]
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
    )


class ContextDataModule(L.LightningDataModule):
    """Training, validation and test loaders of (image, label, context) batches.

    The test split may come in several *views*: the test images with one choice of contexts
    each (for instance the oracle superclass, a predicted one, or none); ``test_dataloader``
    returns one loader per view, in order. Validation may have further named splits after
    ``val`` (``val_views``), e.g. a second domain whose curves are drawn but select nothing.

    Args:
        train: the training split.
        val: the split validated after every epoch.
        test_views: view name -> test split with that view's contexts.
        batch_size: training batch size (of a whole step: see :func:`data_loader`).
        eval_batch_size: batch size of validation and test.
        num_workers: loader worker processes.
        val_views: view name -> a further split validated after every epoch, after ``val``.
    """

    def __init__(
        self,
        train: ContextSplit,
        val: ContextSplit,
        test_views: Mapping[str, ContextSplit],
        *,
        batch_size: int,
        eval_batch_size: int,
        num_workers: int = 0,
        val_views: Mapping[str, ContextSplit] | None = None,
    ) -> None:
        super().__init__()
        self.train = train
        self.val = val
        self.val_views = dict(val_views or {})
        self.test_views = dict(test_views)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers

    def _loader(self, split: ContextSplit, batch_size: int, shuffle: bool) -> DataLoader:
        return split_loader(
            split, batch_size, shuffle=shuffle, num_workers=self.num_workers, trainer=self.trainer
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train, self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        first = self._loader(self.val, self.eval_batch_size, shuffle=False)
        if not self.val_views:
            return first
        return [
            first,
            *(
                self._loader(split, self.eval_batch_size, shuffle=False)
                for split in self.val_views.values()
            ),
        ]

    def test_dataloader(self) -> list[DataLoader]:
        return [
            self._loader(split, self.eval_batch_size, shuffle=False)
            for split in self.test_views.values()
        ]


def loading_options(train: TrainConfig) -> dict[str, int]:
    """The ``batch_size``, ``eval_batch_size`` (``batch_size`` unless set) and ``num_workers``
    of ``train:``, the keyword arguments of :class:`ContextDataModule` it sets."""
    return {
        "batch_size": train.batch_size,
        "eval_batch_size": train.eval_batch_size or train.batch_size,
        "num_workers": train.num_workers,
    }


def split_loader(
    split: ContextSplit,
    batch_size: int,
    *,
    shuffle: bool,
    num_workers: int = 0,
    trainer: L.Trainer | None = None,
) -> DataLoader:
    """A loader of (image, label, context) batches of ``split`` for this process.

    Args:
        split: the images and their contexts.
        batch_size: images per batch of a whole step (``train.batch_size`` or
            ``train.eval_batch_size``), split over the processes (see :func:`data_loader`).
        shuffle: training order: shuffled, and the last incomplete batch dropped; otherwise
            evaluation order.
        num_workers: loader worker processes.
        trainer: the Trainer the loader serves (a data module's ``self.trainer``), which says
            how many processes share the batch; ``None``: one process.
    """
    return data_loader(
        split.dataset(),
        batch_size,
        train=shuffle,
        trainer=trainer,
        key="train.batch_size" if shuffle else "train.eval_batch_size",
        num_workers=num_workers,
    )
