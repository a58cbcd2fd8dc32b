"""Domain-adaptation data on tiny files written here: the MNIST-M-style construction, the SVHN
layout, the source/target pairs, and the paired training batches."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from contextnorm.data import ImageData, load_dataset, mnist_m
from contextnorm.data.mnist_m import (
    MNIST_M_STYLE_TITLE,
    SOURCE_DOMAIN,
    TARGET_DOMAIN,
    DomainPair,
    blend_with_patches,
    build_mnist_m_style,
    digits_domain_pair,
    load_mnist_m_style,
    mnist_m_style_pair,
    mnist_svhn_pair,
    to_rgb,
)
from contextnorm.tasks.adamatch_data import (
    VIEW_DESCRIPTIONS,
    DomainAdaptationDataModule,
    PairedDomainBatches,
    evaluation_views,
    training_split,
)
from contextnorm.training.data import ContextSplit

SVHN_ZERO_LABEL = 10


@pytest.fixture(autouse=True)
def private_data_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Send every cache (decoded photos, built MNIST-M-style images) to a per-test folder."""
    root = tmp_path / "data-root"
    monkeypatch.setenv("CONTEXTNORM_DATA", str(root))
    return root


# --- writers of the official layouts (reusable fixtures) ----------------------------------------


def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file of unsigned bytes, gzip-compressed (MNIST's published format)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(size).to_bytes(4, "big") for size in array.shape
    )
    with gzip.open(path, "wb") as stream:
        stream.write(header + array.astype(np.uint8).tobytes())


def write_mnist(root: Path, counts: dict[str, int], seed: int = 0) -> dict[str, np.ndarray]:
    """Fake MNIST in ``root``: 28x28 digits, a bright blob on black; returns the labels."""
    rng = np.random.default_rng(seed)
    names = {"train": "train", "test": "t10k"}
    root.mkdir(parents=True, exist_ok=True)
    labels = {}
    for split, count in counts.items():
        images = np.zeros((count, 28, 28), dtype=np.uint8)
        for index in range(count):
            top, left = rng.integers(4, 14, size=2)
            images[index, top : top + 10, left : left + 4] = rng.integers(128, 256)
        labels[split] = rng.integers(0, 10, size=count).astype(np.uint8)
        write_idx(root / f"{names[split]}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{names[split]}-labels-idx1-ubyte.gz", labels[split])
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
    y (N, 1) with label 10 for the digit 0."""
    root.mkdir(parents=True, exist_ok=True)
    official = np.where(labels == 0, SVHN_ZERO_LABEL, labels).astype(np.uint8)[:, None]
    path = root / f"{split}_32x32.mat"
    scipy.io.savemat(path, {"X": images.transpose(2, 3, 1, 0), "y": official})
    return path


@pytest.fixture
def svhn_root(tmp_path: Path) -> Path:
    """A tiny SVHN (train 12, test 6 images, every digit including 0) in the official layout."""
    rng = np.random.default_rng(7)
    root = tmp_path / "svhn"
    for split, count in (("train", 12), ("test", 6)):
        images = rng.integers(0, 256, size=(count, 3, 32, 32), dtype=np.uint8)
        write_svhn_mat(root, split, images, np.arange(count) % 10)
    return root


@pytest.fixture
def mnist_root(tmp_path: Path) -> Path:
    root = tmp_path / "mnist"
    write_mnist(root, {"train": 20, "test": 8})
    return root


@pytest.fixture
def photo_root(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    write_photo_folder(root, {"train": 6, "test": 4})
    return root


# --- MNIST-M-style construction ------------------------------------------------------------------


def test_blend_is_the_absolute_difference_with_the_photo_colour() -> None:
    digits = torch.tensor([[[[0, 255], [100, 30]]]], dtype=torch.uint8)
    photos = torch.tensor([200, 50, 0], dtype=torch.uint8).view(1, 3, 1, 1).expand(1, 3, 5, 5)
    blended = blend_with_patches(digits, photos.contiguous(), seed=0)
    expected = torch.tensor(
        [[[200, 55], [100, 170]], [[50, 205], [50, 20]], [[0, 255], [100, 30]]], dtype=torch.uint8
    )
    assert torch.equal(blended[0], expected)


def test_blend_cuts_whole_windows_of_a_photo_uniformly() -> None:
    # Position-coded photos: pixel value = 16 * photo + 4 * row + column, same in all channels.
    photos = (
        (16 * torch.arange(3).view(3, 1, 1) + 4 * torch.arange(4).view(1, 4, 1) + torch.arange(4))
        .to(torch.uint8)[:, None]
        .expand(3, 3, 4, 4)
        .contiguous()
    )
    digits = torch.zeros(600, 1, 2, 2, dtype=torch.uint8)
    blended = blend_with_patches(digits, photos, seed=1)
    corner = blended[:, 0, 0, 0].long()
    photo, row, column = corner // 16, corner % 16 // 4, corner % 4
    windows = torch.stack(
        [photos[p, :, r : r + 2, c : c + 2] for p, r, c in zip(photo, row, column, strict=True)]
    )
    assert torch.equal(blended, windows)  # black digits: the blend is the patch itself
    # Every photo and every one of the 3 x 3 corners is drawn.
    assert set(photo.tolist()) == {0, 1, 2}
    assert {(r, c) for r, c in zip(row.tolist(), column.tolist(), strict=True)} == {
        (r, c) for r in range(3) for c in range(3)
    }


def test_blend_rejects_photos_smaller_than_the_digits_and_wrong_layouts() -> None:
    digits = torch.zeros(2, 1, 28, 28, dtype=torch.uint8)
    with pytest.raises(ValueError, match="at least as large as the digits"):
        blend_with_patches(digits, torch.zeros(1, 3, 16, 16, dtype=torch.uint8), seed=0)
    with pytest.raises(ValueError, match="photos must be uint8 RGB"):
        blend_with_patches(digits, torch.zeros(1, 1, 32, 32, dtype=torch.uint8), seed=0)
    with pytest.raises(ValueError, match=r"digits must be uint8 \(N, 1, H, W\)"):
        blend_with_patches(
            digits.expand(-1, 3, -1, -1), torch.zeros(1, 3, 32, 32, dtype=torch.uint8), seed=0
        )


def test_mnist_m_style_is_deterministic_per_seed_and_keeps_the_labels(
    mnist_root: Path, photo_root: Path
) -> None:
    first = load_mnist_m_style("train", photo_root, mnist_root=mnist_root, seed=0, cache=False)
    again = load_mnist_m_style("train", photo_root, mnist_root=mnist_root, seed=0, cache=False)
    other = load_mnist_m_style("train", photo_root, mnist_root=mnist_root, seed=1, cache=False)
    mnist = load_dataset("mnist", mnist_root, "train")
    assert first.images.shape == (20, 3, 32, 32) and first.images.dtype == torch.uint8
    assert torch.equal(first.images, again.images)
    assert not torch.equal(first.images, other.images)
    assert torch.equal(first.labels, mnist.labels) and first.classes == mnist.classes
    # Test digits are blended with the photo set's test split, at another seed stream.
    test = load_mnist_m_style("test", photo_root, mnist_root=mnist_root, seed=0, cache=False)
    assert len(test) == 8


def test_mnist_m_style_is_cached_atomically_and_reused(
    mnist_root: Path, photo_root: Path, private_data_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    built = load_mnist_m_style("test", photo_root, mnist_root=mnist_root, image_size=16)
    cached = list((private_data_root / "mnist-m-style").glob("test-*.pt"))
    assert len(cached) == 1 and not list(cached[0].parent.glob(".*.tmp"))
    assert built.images.shape == (8, 3, 16, 16)

    def refuse(*args, **kwargs):
        raise AssertionError("rebuilt although a cache exists")

    monkeypatch.setattr(mnist_m, "build_mnist_m_style", refuse)
    assert torch.equal(
        load_mnist_m_style("test", photo_root, mnist_root=mnist_root, image_size=16).images,
        built.images,
    )
    # Another seed is another data set: a new cache entry, not the old images.
    monkeypatch.undo()
    monkeypatch.setenv("CONTEXTNORM_DATA", str(private_data_root))
    other = load_mnist_m_style("test", photo_root, mnist_root=mnist_root, image_size=16, seed=3)
    assert not torch.equal(other.images, built.images)
    assert len(list((private_data_root / "mnist-m-style").glob("test-*.pt"))) == 2


def test_build_needs_greyscale_digits() -> None:
    colour = ImageData(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.tensor([0, 1]), ["a", "b"])
    with pytest.raises(ValueError, match="digits must be greyscale"):
        build_mnist_m_style(colour, colour, seed=0)


# --- SVHN layout and the pairs -----------------------------------------------------------------


def test_svhn_fixture_loads_through_the_official_loader(svhn_root: Path) -> None:
    train = load_dataset("svhn", svhn_root, "train")
    assert train.images.shape == (12, 3, 32, 32)
    assert train.labels.tolist() == [*range(10), 0, 1]  # official label 10 read back as digit 0
    raw = scipy.io.loadmat(svhn_root / "train_32x32.mat")
    assert raw["X"].shape == (32, 32, 3, 12) and raw["y"].shape == (12, 1)
    assert int(raw["y"][0, 0]) == SVHN_ZERO_LABEL


def test_mnist_svhn_pair_is_rgb_32(mnist_root: Path, svhn_root: Path) -> None:
    pair = mnist_svhn_pair(mnist_root=mnist_root, svhn_root=svhn_root)
    assert pair.domain_names == ("MNIST", "SVHN")
    assert pair.source_train.images.shape == (20, 3, 32, 32)
    assert pair.target_test.images.shape == (6, 3, 32, 32)
    # The three channels of the source are the same greyscale digit.
    assert torch.equal(pair.source_train.images[:, 0], pair.source_train.images[:, 2])


def test_mnist_m_style_pair_names_the_substitute_honestly(
    mnist_root: Path, photo_root: Path
) -> None:
    pair = mnist_m_style_pair(photo_root, mnist_root=mnist_root)
    assert pair.domain_names[1] == MNIST_M_STYLE_TITLE
    assert "CIFAR-10" in pair.title and "MNIST-M-style" in pair.title
    assert len(pair.target_train) == 20 and pair.target_test.images.shape == (8, 3, 32, 32)


def test_digits_pair_splits_the_embedded_domains() -> None:
    pair = digits_domain_pair(image_size=16)
    assert pair.source_train.images.shape[1:] == (3, 16, 16)
    total = len(pair.source_train) + len(pair.target_train)
    assert total == len(load_dataset("digits", None, "train"))
    # The inverted target is much brighter than the original source.
    assert pair.target_train.images.float().mean() > pair.source_train.images.float().mean() + 50


def test_a_pair_without_target_or_with_mismatched_images_is_refused() -> None:
    pair = digits_domain_pair(image_size=8)
    empty = pair.target_train.subset([])
    with pytest.raises(ValueError, match="target_train is missing or empty"):
        DomainPair("x", ("a", "b"), pair.source_train, pair.source_test, empty, pair.target_test)
    grey = load_dataset("digits", None, "test", image_size=8)
    with pytest.raises(ValueError, match="one shape"):
        DomainPair("x", ("a", "b"), pair.source_train, pair.source_test, pair.target_train, grey)


def test_to_rgb_repeats_one_channel_and_refuses_two() -> None:
    grey = ImageData(torch.arange(4, dtype=torch.uint8).view(1, 1, 2, 2), torch.tensor([0]), ["a"])
    assert to_rgb(grey).images.shape == (1, 3, 2, 2)
    two = ImageData(torch.zeros(1, 2, 2, 2, dtype=torch.uint8), torch.tensor([0]), ["a"])
    with pytest.raises(ValueError, match="1- or 3-channel"):
        to_rgb(two)


# --- paired batches, views and the data module ---------------------------------------------------


def test_paired_batches_put_source_first_and_cover_the_source_once() -> None:
    source, target = torch.arange(0, 10), torch.arange(10, 14)
    sampler = PairedDomainBatches(source, target, source_batch_size=3, target_batch_size=6)
    torch.manual_seed(0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 3
    assert all(len(batch) == 9 for batch in batches)
    assert all(i < 10 for batch in batches for i in batch[:3])
    assert all(i >= 10 for batch in batches for i in batch[3:])
    drawn = [i for batch in batches for i in batch[:3]]
    assert len(set(drawn)) == 9  # no source sample twice in an epoch
    # 18 target draws from 4 samples: whole permutations, each sample 4 or 5 times.
    counts = torch.bincount(torch.tensor([i for batch in batches for i in batch[3:]]) - 10)
    assert counts.min() >= 4 and counts.max() <= 5
    torch.manual_seed(0)
    assert list(sampler) == batches  # the global seed decides the epoch's batches


def test_training_split_and_views_carry_the_domain_ids() -> None:
    pair = digits_domain_pair(image_size=8)
    train = training_split(pair)
    n_source = len(pair.source_train)
    assert (train.contexts[:n_source] == SOURCE_DOMAIN).all()
    assert (train.contexts[n_source:] == TARGET_DOMAIN).all()
    views = evaluation_views(pair)
    assert list(views) == list(VIEW_DESCRIPTIONS)
    assert {name: int(view.contexts[0]) for name, view in views.items()} == {
        "source": 0,
        "target": 1,
        "target_as_source": 0,
        "target_unknown": -1,
    }


def test_data_module_batches_hold_both_domains() -> None:
    pair = digits_domain_pair(image_size=8)
    views = evaluation_views(pair)
    module = DomainAdaptationDataModule(
        training_split(pair),
        {"source": views["source"]},
        views,
        source_batch_size=4,
        uratio=3,
        eval_batch_size=50,
    )
    images, labels, domains = next(iter(module.train_dataloader()))
    assert images.shape == (16, 3, 8, 8) and labels.shape == (16,)
    assert domains.tolist() == [0] * 4 + [1] * 12
    assert len(module.val_dataloader()) == 1 and len(module.test_dataloader()) == 4


def test_data_module_refuses_a_setup_without_target_or_with_bad_domain_ids() -> None:
    pair = digits_domain_pair(image_size=8)
    views = evaluation_views(pair)
    source_only = ContextSplit(
        pair.source_train, torch.zeros(len(pair.source_train), dtype=torch.long)
    )
    arguments = {"source_batch_size": 4, "uratio": 3, "eval_batch_size": 8}
    with pytest.raises(ValueError, match="no target samples"):
        DomainAdaptationDataModule(source_only, views, views, **arguments)
    bad = training_split(pair)
    bad.contexts[0] = 2
    with pytest.raises(ValueError, match=r"must be 0 \(source\) or 1 \(target\); got \[2\]"):
        DomainAdaptationDataModule(bad, views, views, **arguments)
    with pytest.raises(ValueError, match="uratio must be a positive integer"):
        DomainAdaptationDataModule(
            training_split(pair), views, views, source_batch_size=4, uratio=0, eval_batch_size=8
        )
    with pytest.raises(ValueError, match="fewer than one batch"):
        DomainAdaptationDataModule(
            training_split(pair),
            views,
            views,
            source_batch_size=10_000,
            uratio=1,
            eval_batch_size=8,
        )
