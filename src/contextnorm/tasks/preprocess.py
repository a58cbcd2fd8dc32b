"""Batch preprocessing on the training device: uint8 -> float, augmentation, normalisation."""

from __future__ import annotations

from collections.abc import Sequence

import kornia.augmentation as augmentation
import kornia.enhance
import torch
from torch import nn

CROP_PADDING = 4
_STATISTICS_CHUNK = 4096
# A constant channel (e.g. a blank border in every image) must not divide by zero.
_MIN_STD = 1e-6


class BatchPreprocess(nn.Module):
    """Turn a batch of uint8 images into the network's float input.

    Runs on whole batches where they already are (the GPU when training on one), so data
    loading stays a cheap index into uint8 tensors.

    Args:
        mean: per-channel mean of the training images, on the [0, 1] scale.
        std: per-channel standard deviation of the training images, on the [0, 1] scale.
        image_size: (height, width) of the images, the size random crops return.
        crop_flip: augment training batches with a random crop from the image padded by
            4 pixels and a random horizontal flip (the CIFAR recipe of the papers).
    """

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        image_size: tuple[int, int],
        crop_flip: bool,
    ) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(
                f"mean and std must have one entry per channel; got {len(mean)} and {len(std)}"
            )
        if min(std) <= 0:
            raise ValueError(f"std must be positive for every channel; got {list(std)}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32))
        self.augmentation = (
            augmentation.AugmentationSequential(
                augmentation.RandomCrop(image_size, padding=CROP_PADDING),
                augmentation.RandomHorizontalFlip(),
            )
            if crop_flip
            else None
        )

    def forward(self, images: torch.Tensor, augment: bool) -> torch.Tensor:
        """Float images (N, C, H, W), normalised, and augmented if ``augment`` and crop_flip."""
        if images.dtype != torch.uint8:
            raise TypeError(
                f"images must be uint8 (N, C, H, W) as the data sets store them; got {images.dtype}"
            )
        scaled = images.float() / 255.0
        if augment and self.augmentation is not None:
            scaled = self.augmentation(scaled)
        return kornia.enhance.normalize(scaled, self.mean, self.std)


def channel_statistics(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of uint8 images (N, C, H, W) on the [0, 1] scale."""
    if images.dim() != 4 or len(images) == 0:
        raise ValueError(
            f"images must be a non-empty (N, C, H, W) tensor; got shape {tuple(images.shape)}"
        )
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    total_squares = torch.zeros_like(total)
    # Chunks keep the float copy small: a float64 copy of CIFAR's training set would take 1.2 GB.
    for chunk in images.split(_STATISTICS_CHUNK):
        scaled = chunk.to(torch.float64) / 255.0
        total += scaled.sum(dim=(0, 2, 3))
        total_squares += scaled.square().sum(dim=(0, 2, 3))
    count = images.numel() // images.shape[1]
    mean = total / count
    variance = (total_squares / count - mean.square()).clamp_min(0.0)
    return mean.tolist(), variance.sqrt().clamp_min(_MIN_STD).tolist()
