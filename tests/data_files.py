"""Small data files in the published layouts, written by the tests (never real data)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

SVHN_ZERO_LABEL = 10
_MNIST_PREFIX = {"train": "train", "test": "t10k"}


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> None:
    """An IDX file of unsigned bytes, gzip-compressed or not (MNIST's published format)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(size).to_bytes(4, "big") for size in array.shape
    )
    content = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(content) if compress else content)


def write_mnist(root: Path, counts: dict[str, int], seed: int = 0) -> dict[str, np.ndarray]:
    """Fake MNIST in ``root``: 28x28 digits, a bright bar on black, every class present when
    there are ten images or more; returns the labels per split."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    labels = {}
    for split, count in counts.items():
        images = np.zeros((count, 28, 28), dtype=np.uint8)
        labels[split] = (np.arange(count) % 10).astype(np.uint8)
        for index, label in enumerate(labels[split]):
            # The bar's position says the digit, so that a model can learn it.
            top, left = 2 + 2 * int(label), rng.integers(4, 20)
            images[index, top : top + 6, left : left + 4] = rng.integers(128, 256)
        write_idx(root / f"{_MNIST_PREFIX[split]}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{_MNIST_PREFIX[split]}-labels-idx1-ubyte.gz", labels[split])
    return labels


def write_photo_folder(root: Path, counts: dict[str, int], size: int = 32, seed: int = 0) -> None:
    """A CIFAR-10-style image folder ``root/<split>/<class>/*.png`` of random colour photos."""
    rng = np.random.default_rng(seed)
    for split, count in counts.items():
        for index in range(count):
            folder = root / split / f"class{index % 2}"
            folder.mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{index}.png")


def write_svhn_mat(root: Path, split: str, images: np.ndarray, labels: np.ndarray) -> Path:
    """``root/<split>_32x32.mat`` in SVHN's official layout: X (32, 32, 3, N) uint8 and
    y (N, 1) with label 10 for the digit 0; ``images`` are (N, 3, 32, 32)."""
    root.mkdir(parents=True, exist_ok=True)
    official = np.where(labels == 0, SVHN_ZERO_LABEL, labels).astype(np.uint8)[:, None]
    path = root / f"{split}_32x32.mat"
    scipy.io.savemat(path, {"X": images.transpose(2, 3, 1, 0), "y": official})
    return path
