"""Domain-adaptation data on tiny files written here: the MNIST-M-style construction, the SVHN
layout, the two domains of a config, and the paired training batches."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import scipy.io
import torch

from contextnorm.config import ConfigError, DataConfig
from contextnorm.data import ImageData, load_dataset, mnist_m
from contextnorm.data.mnist_m import (
    MNIST_M_STYLE_TITLE,
    blend_with_patches,
    build_mnist_m_style,
    load_mnist_m_style,
)
from contextnorm.tasks.adaptation_data import (
    SOURCE_DOMAIN,
    TARGET_DOMAIN,
    DomainAdaptationDataModule,
    PairedDomainBatches,
    load_domains,
)
from contextnorm.tasks.data import ContextSplit

from data_files import SVHN_ZERO_LABEL

pytestmark = pytest.mark.usefixtures("private_data_root")

TARGET = "task.options.target"


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
    def build(seed: int) -> ImageData:
        return load_mnist_m_style(
            "train", photo_root, mnist_root=mnist_root, seed=seed, image_size=32, cache=False
        )

    first, again, other = build(0), build(0), build(1)
    mnist = load_dataset("mnist", mnist_root, "train")
    assert first.images.shape == (40, 3, 32, 32) and first.images.dtype == torch.uint8
    assert torch.equal(first.images, again.images)
    assert not torch.equal(first.images, other.images)
    assert torch.equal(first.labels, mnist.labels) and first.classes == mnist.classes
    # Test digits are blended with the photo set's test split, at another seed stream.
    test = load_mnist_m_style("test", photo_root, mnist_root=mnist_root, seed=0, cache=False)
    assert test.images.shape == (20, 3, 28, 28)  # the digits' own size by default


def test_mnist_m_style_is_cached_atomically_and_reused(
    mnist_root: Path, photo_root: Path, private_data_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    built = load_mnist_m_style("test", photo_root, mnist_root=mnist_root, image_size=16)
    cached = list((private_data_root / "mnist-m-style").glob("test-*.pt"))
    assert len(cached) == 1 and not list(cached[0].parent.glob(".*.tmp"))
    assert built.images.shape == (20, 3, 16, 16)

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


# --- the registered data sets -----------------------------------------------------------------


def test_mnist_m_style_is_a_registered_data_set(mnist_root: Path, photo_root: Path) -> None:
    data = load_dataset(
        "mnist-m-style", photo_root, "test", image_size=16, mnist_root=str(mnist_root), seed=2
    )
    direct = load_mnist_m_style("test", photo_root, mnist_root=mnist_root, seed=2, image_size=16)
    assert torch.equal(data.images, direct.images) and data.images.shape == (20, 3, 16, 16)
    with pytest.raises(ValueError, match="mnist-m-style needs root"):
        load_dataset("mnist-m-style", None, "test", mnist_root=str(mnist_root))


def test_svhn_fixture_loads_through_the_official_loader(svhn_root: Path) -> None:
    train = load_dataset("svhn", svhn_root, "train")
    assert train.images.shape == (30, 3, 32, 32)
    assert train.labels.tolist()[:12] == [*range(10), 0, 1]  # label 10 read back as digit 0
    raw = scipy.io.loadmat(svhn_root / "train_32x32.mat")
    assert raw["X"].shape == (32, 32, 3, 30) and raw["y"].shape == (30, 1)
    assert int(raw["y"][0, 0]) == SVHN_ZERO_LABEL


def test_digits_keep_one_domain_on_request() -> None:
    both = load_dataset("digits", None, "train")
    original = load_dataset("digits", None, "train", domain="original")
    inverted = load_dataset("digits", None, "train", domain="inverted")
    assert len(original) + len(inverted) == len(both)
    assert (original.domains == 0).all() and (inverted.domains == 1).all()
    with pytest.raises(ValueError, match="domain must be one of original, inverted"):
        load_dataset("digits", None, "train", domain="upside-down")


# --- the two domains of a config -------------------------------------------------------------


def test_mnist_to_svhn_domains_are_rgb_of_one_size(mnist_root: Path, svhn_root: Path) -> None:
    domains = load_domains(
        DataConfig(name="mnist", root=str(mnist_root), image_size=32, val_fraction=0.25),
        DataConfig(name="svhn", root=str(svhn_root), val_fraction=0.2),
        TARGET,
    )
    assert domains.names == ("MNIST", "SVHN")
    assert domains.source.train.images.shape[1:] == (3, 32, 32)
    # The grey digit repeated to three channels.
    assert torch.equal(domains.source.train.images[:, 0], domains.source.train.images[:, 2])
    assert (len(domains.source.train), len(domains.source.val)) == (30, 10)
    assert (len(domains.target.train), len(domains.target.val), len(domains.target.test)) == (
        24,
        6,
        20,
    )
    combined = domains.combined("test")
    assert combined.domain_names == ["MNIST", "SVHN"]
    assert combined.domains.tolist() == [SOURCE_DOMAIN] * 20 + [TARGET_DOMAIN] * 20
    assert torch.equal(combined.images[20:], domains.target.test.images)


def test_mnist_m_style_domain_is_named_honestly(mnist_root: Path, photo_root: Path) -> None:
    domains = load_domains(
        DataConfig(name="mnist", root=str(mnist_root), image_size=16),
        DataConfig(
            name="mnist-m-style",
            root=str(photo_root),
            image_size=16,
            options={"mnist_root": str(mnist_root)},
        ),
        TARGET,
    )
    assert domains.names == ("MNIST", MNIST_M_STYLE_TITLE)
    assert "CIFAR-10" in MNIST_M_STYLE_TITLE and "SVHN" not in MNIST_M_STYLE_TITLE


def test_domains_that_do_not_fit_together_are_config_errors(
    mnist_root: Path, svhn_root: Path, photo_root: Path
) -> None:
    source = DataConfig(name="mnist", root=str(mnist_root))
    with pytest.raises(ConfigError, match=rf"28x28 and {TARGET}: 3x32x32.*{TARGET}.image_size"):
        load_domains(source, DataConfig(name="svhn", root=str(svhn_root)), TARGET)
    with pytest.raises(ConfigError, match=rf"same classes.*{TARGET}: \['class0', 'class1'\]"):
        load_domains(
            DataConfig(name="digits", image_size=32),
            DataConfig(name="image-folder", root=str(photo_root)),
            TARGET,
        )


# --- paired batches and the data module -------------------------------------------------------


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


def test_data_module_batches_hold_both_domains_whatever_the_contexts() -> None:
    domains = load_domains(
        DataConfig(name="digits", options={"domain": "original"}),
        DataConfig(name="digits", options={"domain": "inverted"}),
        TARGET,
    )
    train = domains.combined("train")
    # Contexts that are not the domains (as in the random ablation): batches still pair by
    # domain. Here each sample's context is its position, to see which samples a batch holds.
    split = ContextSplit(train, torch.arange(len(train)))
    test = ContextSplit(
        domains.source.test, torch.zeros(len(domains.source.test), dtype=torch.long)
    )
    module = DomainAdaptationDataModule(
        split, test, {"source": test}, batch_size=4, uratio=3, eval_batch_size=50
    )
    n_source = len(domains.source.train)
    assert len(module.train_dataloader()) == n_source // 4
    images, labels, positions = next(iter(module.train_dataloader()))
    assert images.shape == (16, 3, 8, 8) and labels.shape == (16,)
    assert (positions[:4] < n_source).all() and (positions[4:] >= n_source).all()
    assert len(module.test_dataloader()) == 1


def test_data_module_refuses_a_training_split_without_target_or_domains() -> None:
    domains = load_domains(
        DataConfig(name="digits", options={"domain": "original"}),
        DataConfig(name="digits", options={"domain": "inverted"}),
        TARGET,
    )
    source = domains.source.train
    zeros = torch.zeros(len(source), dtype=torch.long)
    arguments = {"batch_size": 4, "uratio": 3, "eval_batch_size": 8}
    no_target = ContextSplit(source, zeros)  # the digits' own domain ids: all 0
    with pytest.raises(ValueError, match="the target has no training samples"):
        DomainAdaptationDataModule(no_target, no_target, {}, **arguments)
    bare = ContextSplit(replace(source, domains=None, domain_names=None), zeros)
    with pytest.raises(ValueError, match="must store each sample's domain"):
        DomainAdaptationDataModule(bare, bare, {}, **arguments)
    with pytest.raises(ValueError, match="fewer than one batch"):
        DomainAdaptationDataModule(
            ContextSplit(
                domains.combined("train"),
                torch.zeros(len(domains.combined("train")), dtype=torch.long),
            ),
            no_target,
            {},
            batch_size=10_000,
            uratio=1,
            eval_batch_size=8,
        )
