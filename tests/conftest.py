"""Fixtures shared by the test modules: a private data root and small data sets on disk."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from data_files import write_mnist, write_photo_folder, write_svhn_mat


@pytest.fixture
def private_data_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Send every cache (decoded images, built data sets) and default root to a per-test folder.

    Modules whose tests read or write data use it for all their tests
    (``pytestmark = pytest.mark.usefixtures("private_data_root")``).
    """
    root = tmp_path / "data-root"
    monkeypatch.setenv("CONTEXTNORM_DATA", str(root))
    return root


@pytest.fixture
def mnist_root(tmp_path: Path) -> Path:
    """A fake MNIST (train 40, test 20 images, every digit) in the IDX layout."""
    root = tmp_path / "mnist"
    write_mnist(root, {"train": 40, "test": 20})
    return root


@pytest.fixture
def photo_root(tmp_path: Path) -> Path:
    """A CIFAR-10-style image folder of random colour photos (train 6, test 4)."""
    root = tmp_path / "photos"
    write_photo_folder(root, {"train": 6, "test": 4})
    return root


@pytest.fixture
def svhn_root(tmp_path: Path) -> Path:
    """A tiny SVHN (train 30, test 20 images, every digit including 0) in the official layout."""
    rng = np.random.default_rng(7)
    root = tmp_path / "svhn"
    for split, count in (("train", 30), ("test", 20)):
        images = rng.integers(0, 256, size=(count, 3, 32, 32), dtype=np.uint8)
        write_svhn_mat(root, split, images, np.arange(count) % 10)
    return root


@pytest.fixture(scope="session", autouse=True)
def _native_kernels_built() -> None:
    """Build the native CPU kernels (once per machine, ~30 s) before any test runs, so that the
    build never happens inside a test's spawned processes and their timeouts."""
    from contextnorm.functional import native

    native.kernels()


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Small networks train many times faster on one thread than on two busy cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
