"""Batches for domain adaptation: every sample carries its domain id, and every training batch
holds a fixed number of source samples followed by ``uratio`` times as many target samples.

An epoch is one pass over the labelled source (``len(source) // n_s`` steps, the Keras example's and
the context-normalization authors' step count); the target is drawn in fresh random orders, as many
as the epoch needs, so neither domain is cut short (the Keras example zips the two data sets and so
ends each epoch when the shorter one runs out, 381 of its 937 scheduled steps for SVHN). All orders
come from torch's global generator, which the training loop reseeds per epoch, so a resumed run
draws the same batches.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import replace

import torch
from torch.utils.data import DataLoader, Sampler

from contextnorm.data.image_data import ImageData
from contextnorm.data.mnist_m import SOURCE_DOMAIN, TARGET_DOMAIN, DomainPair
from contextnorm.training.data import ContextDataModule, ContextSplit

UNKNOWN_DOMAIN = -1

VIEW_DESCRIPTIONS: dict[str, str] = {
    "source": "source test images with the source id (0)",
    "target": "target test images with their true domain id (1)",
    "target_as_source": (
        "target test images all given the source id (0): what the context-normalization "
        "authors' released evaluation does, where a context was passed at all (Faye, Azzag and "
        "Lebbah, 'Cluster-Based Normalization Layer for Neural Networks', arXiv:2403.16798 v2, "
        "2024, Sec. IV-E: 'considering the cluster identifier of the source domain during "
        "inference')"
    ),
    "target_unknown": (
        "target test images with an unknown domain (-1): context layers use their posterior "
        "mixture over the two domains"
    ),
}


def _concatenate(first: ImageData, second: ImageData) -> ImageData:
    return replace(
        first,
        images=torch.cat([first.images, second.images]),
        labels=torch.cat([first.labels, second.labels]),
        coarse_labels=None,
        coarse_classes=None,
        domains=None,
        domain_names=None,
    )


def _with_domain(data: ImageData, domain: int) -> ContextSplit:
    return ContextSplit(data, torch.full((len(data),), domain, dtype=torch.int64))


def training_split(pair: DomainPair) -> ContextSplit:
    """The source and target training images in one split, each with its domain id
    (source first). The target's labels travel along for monitoring only."""
    data = _concatenate(pair.source_train, pair.target_train)
    domains = torch.cat(
        [
            torch.full((len(pair.source_train),), SOURCE_DOMAIN, dtype=torch.int64),
            torch.full((len(pair.target_train),), TARGET_DOMAIN, dtype=torch.int64),
        ]
    )
    return ContextSplit(data, domains)


def evaluation_views(pair: DomainPair) -> dict[str, ContextSplit]:
    """The test views of :data:`VIEW_DESCRIPTIONS`, in that order."""
    return {
        "source": _with_domain(pair.source_test, SOURCE_DOMAIN),
        "target": _with_domain(pair.target_test, TARGET_DOMAIN),
        "target_as_source": _with_domain(pair.target_test, SOURCE_DOMAIN),
        "target_unknown": _with_domain(pair.target_test, UNKNOWN_DOMAIN),
    }


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
    """Paired source/target training batches and named evaluation views.

    Args:
        train: the training split, every sample's context its domain id: 0 (source) or
            1 (target), both present (see :func:`training_split`).
        val_views: view name -> split, validated after every epoch, in order. With no target
            labels in a real adaptation problem, nothing on the target may select or stop a
            run; these views draw curves.
        test_views: view name -> split (see :func:`evaluation_views`).
        source_batch_size: source samples per training batch (n_s).
        uratio: target samples per source sample in a batch.
        eval_batch_size: batch size of validation and test.
        num_workers: loader worker processes.

    Raises:
        ValueError: a training split without target (or source) samples, or with a domain id
            other than 0 and 1; a view or batch size that cannot work.
    """

    def __init__(
        self,
        train: ContextSplit,
        val_views: Mapping[str, ContextSplit],
        test_views: Mapping[str, ContextSplit],
        *,
        source_batch_size: int,
        uratio: int,
        eval_batch_size: int,
        num_workers: int = 0,
    ) -> None:
        if not val_views:
            raise ValueError("val_views must name at least one split to validate on")
        first_val = next(iter(val_views.values()))
        super().__init__(
            train,
            first_val,
            test_views,
            batch_size=source_batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
        )
        domains = train.contexts
        unexpected = sorted(set(domains.unique().tolist()) - {SOURCE_DOMAIN, TARGET_DOMAIN})
        if unexpected:
            raise ValueError(
                f"training domain ids must be {SOURCE_DOMAIN} (source) or {TARGET_DOMAIN} "
                f"(target); got {unexpected}. Unknown (-1) belongs to evaluation views only"
            )
        source = torch.nonzero(domains == SOURCE_DOMAIN).flatten()
        target = torch.nonzero(domains == TARGET_DOMAIN).flatten()
        if len(target) == 0:
            raise ValueError(
                "the training split has no target samples (domain id 1): domain adaptation "
                "needs an unlabelled target domain; give the data set a target"
            )
        if len(source) == 0:
            raise ValueError("the training split has no source samples (domain id 0)")
        if isinstance(uratio, bool) or not isinstance(uratio, int) or uratio < 1:
            raise ValueError(f"uratio must be a positive integer, got {uratio!r}")
        self.val_views = dict(val_views)
        self.sampler = PairedDomainBatches(
            source, target, source_batch_size, source_batch_size * uratio
        )

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train.dataset(),
            batch_sampler=self.sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def val_dataloader(self) -> list[DataLoader]:
        return [
            self._loader(split, self.eval_batch_size, shuffle=False)
            for split in self.val_views.values()
        ]
