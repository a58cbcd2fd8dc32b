"""Batches of (uint8 images, labels, contexts) for Lightning."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from contextnorm.data import ImageData


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


class ContextDataModule(L.LightningDataModule):
    """Training, validation and test loaders; the test split may come in several views.

    A *view* is the test split with one choice of contexts (for instance the oracle superclass,
    a predicted one, or none); ``test_dataloader`` returns one loader per view, in order.

    Args:
        train: the training split.
        val: the split validated after every epoch.
        test_views: view name -> test split with that view's contexts.
        batch_size: training batch size.
        eval_batch_size: batch size of validation and test.
        num_workers: loader worker processes.
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
    ) -> None:
        super().__init__()
        self.train = train
        self.val = val
        self.test_views = dict(test_views)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers

    def _loader(self, split: ContextSplit, batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(
            split.dataset(),
            batch_size=batch_size,
            shuffle=shuffle,
            # A last training batch of one image breaks batch statistics on 1x1 feature maps.
            drop_last=shuffle and len(split.data) > batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train, self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val, self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> list[DataLoader]:
        return [
            self._loader(split, self.eval_batch_size, shuffle=False)
            for split in self.test_views.values()
        ]
