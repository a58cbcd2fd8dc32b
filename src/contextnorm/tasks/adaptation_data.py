"""Data of the domain-adaptation task: two domains, each sample's domain, and paired batches.

The source is the config's ``data`` section and the target ``task.options.target``, each loaded
and split like any data set (:func:`contextnorm.tasks.data.load_splits`). Every sample carries
its domain: :data:`SOURCE_DOMAIN` (0) or :data:`TARGET_DOMAIN` (1), stored as the ``domains``
of the combined splits, so that the ``domain`` context kind (and the ``random`` ablation that
copies its group sizes) can be built on them.

Every training batch holds a fixed number of source samples followed by ``uratio`` times as
many target samples. An epoch is one pass over the labelled source (``len(source) // n_s``
steps, the Keras example's and the context-normalization authors' step count); the target is
drawn in fresh random orders, as many as the epoch needs, so neither domain is cut short (the
Keras example zips the two data sets and so ends each epoch when the shorter one runs out, 381
of its 937 scheduled steps for SVHN). All orders come from torch's global generator, which the
runner reseeds per epoch, so a resumed run draws the same batches.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

from contextnorm.config import ConfigError, DataConfig
from contextnorm.data import DATASETS, ImageData
from contextnorm.data.mnist_m import to_rgb
from contextnorm.tasks.data import ContextDataModule, ContextSplit, Splits, load_splits

SOURCE_DOMAIN = 0
TARGET_DOMAIN = 1
SPLIT_NAMES = ("train", "val", "test")


@dataclass(frozen=True)
class DomainData:
    """The labelled source and the target: their splits and names.

    The target's labels are kept for evaluation and monitoring only; an adaptation method
    never trains on them.

    Attributes:
        names: (source name, target name), indexed by domain id.
        source, target: each domain's training, validation and test splits, as images of one
            shape and one class list.
    """

    names: tuple[str, str]
    source: Splits
    target: Splits

    def combined(self, split: str) -> ImageData:
        """The source's ``split`` followed by the target's, each sample's domain stored."""
        first, second = getattr(self.source, split), getattr(self.target, split)
        domains = torch.cat(
            [
                torch.full((len(first),), SOURCE_DOMAIN, dtype=torch.int64),
                torch.full((len(second),), TARGET_DOMAIN, dtype=torch.int64),
            ]
        )
        return replace(
            first,
            images=torch.cat([first.images, second.images]),
            labels=torch.cat([first.labels, second.labels]),
            coarse_labels=None,
            coarse_classes=None,
            domains=domains,
            domain_names=list(self.names),
        )


def load_domains(source: DataConfig, target: DataConfig, target_key: str) -> DomainData:
    """Both domains' splits as RGB images, checked to fit together.

    Args:
        source: the source's data section (``data``).
        target: the target's.
        target_key: where the target sits in the config, for messages.

    Raises:
        ConfigError: the domains have different classes or image sizes, naming the keys.
    """
    loaded = {"data": load_splits(source), target_key: load_splits(target, target_key)}
    # Greyscale repeated to RGB (MNIST beside SVHN, as the Keras example does): the two domains
    # share one network, and the strong augmentation's colour operations need three channels.
    try:
        domains = {
            key: Splits(*(to_rgb(getattr(splits, name)) for name in SPLIT_NAMES))
            for key, splits in loaded.items()
        }
    except ValueError as error:
        raise ConfigError(f"domain adaptation needs greyscale or RGB images: {error}") from None
    shapes = {key: tuple(splits.train.images.shape[1:]) for key, splits in domains.items()}
    if len(set(shapes.values())) != 1:
        described = " and ".join(f"{key}: {'x'.join(map(str, s))}" for key, s in shapes.items())
        raise ConfigError(
            f"the source and target images must have one shape (C x H x W); got {described}. "
            f"Set data.image_size and {target_key}.image_size to one size"
        )
    classes = {key: splits.train.classes for key, splits in domains.items()}
    if len(set(map(tuple, classes.values()))) != 1:
        raise ConfigError(
            "the source and target must name the same classes in the same order; got "
            + "; ".join(f"{key}: {names[:10]}" for key, names in classes.items())
        )
    source_splits, target_splits = domains.values()
    names = (_domain_name(source, source_splits.train), _domain_name(target, target_splits.train))
    if names[0] == names[1]:
        names = (f"{names[0]} (source)", f"{names[1]} (target)")
    return DomainData(names, source_splits, target_splits)


def _domain_name(config: DataConfig, train: ImageData) -> str:
    """The data set's title, with the stored domain when all its images share one."""
    title = DATASETS.get(config.name).title if config.name in DATASETS else config.name
    if train.domains is not None and train.domain_names is not None:
        stored = train.domains.unique()
        if len(stored) == 1:
            return f"{title} ({train.domain_names[int(stored)]})"
    return title


class PairedDomainBatches(Sampler[list[int]]):
    """Index batches of ``source_batch_size`` source samples then ``target_batch_size`` target
    samples, for a dataset whose samples are listed in ``source_indices`` and
    ``target_indices``.

    ``len(source_indices) // source_batch_size`` batches per epoch: each source sample once
    (the remainder dropped); the target cycles through new random permutations as needed.
    """

    def __init__(
        self,
        source_indices: torch.Tensor,
        target_indices: torch.Tensor,
        source_batch_size: int,
        target_batch_size: int,
    ) -> None:
        if source_batch_size < 1 or target_batch_size < 1:
            raise ValueError(
                "source_batch_size and target_batch_size must be positive, got "
                f"{source_batch_size} and {target_batch_size}"
            )
        if len(source_indices) < source_batch_size:
            raise ValueError(
                f"the source has {len(source_indices)} training samples, fewer than one batch "
                f"of source_batch_size={source_batch_size}; lower source_batch_size"
            )
        if len(target_indices) == 0:
            raise ValueError("the target has no training samples; domain adaptation needs them")
        self.source_indices = source_indices
        self.target_indices = target_indices
        self.source_batch_size = source_batch_size
        self.target_batch_size = target_batch_size

    def __len__(self) -> int:
        return len(self.source_indices) // self.source_batch_size

    def __iter__(self) -> Iterator[list[int]]:
        steps = len(self)
        source = self.source_indices[torch.randperm(len(self.source_indices))]
        rounds = -(-steps * self.target_batch_size // len(self.target_indices))
        target = torch.cat(
            [self.target_indices[torch.randperm(len(self.target_indices))] for _ in range(rounds)]
        )
        for step in range(steps):
            yield [
                *source[
                    step * self.source_batch_size : (step + 1) * self.source_batch_size
                ].tolist(),
                *target[
                    step * self.target_batch_size : (step + 1) * self.target_batch_size
                ].tolist(),
            ]


class DomainAdaptationDataModule(ContextDataModule):
    """Paired source/target training batches; validation and test as :class:`ContextDataModule`.

    Args:
        train: the training split: the source then the target (:meth:`DomainData.combined`),
            each sample's domain in ``train.data.domains`` and its context (the domain, or an
            ablation's) in ``train.contexts``.
        val, test_views: as for :class:`ContextDataModule`.
        uratio: target samples per source sample in a batch.
        loading: the keyword arguments of :class:`ContextDataModule`; its ``batch_size`` is
            the source samples per training batch (n_s).

    Raises:
        ValueError: a training split without domains, without target (or source) samples, or
            with a domain id other than 0 and 1; fewer source samples than one batch.
    """

    def __init__(
        self,
        train: ContextSplit,
        val: ContextSplit,
        test_views: Mapping[str, ContextSplit],
        *,
        uratio: int,
        **loading: Any,
    ) -> None:
        super().__init__(train, val, test_views, **loading)
        domains = train.data.domains
        if domains is None:
            raise ValueError(
                "the training split must store each sample's domain (ImageData.domains: "
                f"{SOURCE_DOMAIN} source, {TARGET_DOMAIN} target); build it with "
                "DomainData.combined"
            )
        unexpected = sorted(set(domains.unique().tolist()) - {SOURCE_DOMAIN, TARGET_DOMAIN})
        if unexpected:
            raise ValueError(
                f"training domain ids must be {SOURCE_DOMAIN} (source) or {TARGET_DOMAIN} "
                f"(target); got {unexpected}"
            )
        source = torch.nonzero(domains == SOURCE_DOMAIN).flatten()
        target = torch.nonzero(domains == TARGET_DOMAIN).flatten()
        self.sampler = PairedDomainBatches(
            source, target, self.batch_size, self.batch_size * uratio
        )

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train.dataset(),
            batch_sampler=self.sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )
