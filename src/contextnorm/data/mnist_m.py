"""An MNIST-M-style domain: MNIST digits blended with patches of natural colour photos.

The papers adapt MNIST (source) to SVHN (target) (Faye et al. 2024b, Table VI). Where SVHN is
not at hand, the data set ``mnist-m-style`` builds a colour target the way MNIST-M is built
(Ganin & Lempitsky 2015): each digit is blended with a patch cut at random from a natural
photo, ``out = |patch - digit|`` per channel, so strokes invert the photo's colours and the
background is the photo. MNIST-M proper takes its patches from BSDS500; here they come from
CIFAR-10 (or any colour image set), so the domain is named :data:`MNIST_M_STYLE_TITLE`
everywhere, never "MNIST-M".
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from contextnorm.data.decode import resize_images
from contextnorm.data.files import default_data_root
from contextnorm.data.formats import DatasetFormat
from contextnorm.data.image_data import ImageData
from contextnorm.io import atomic_write

log = logging.getLogger(__name__)

MNIST_M_STYLE_TITLE = "MNIST-M-style (MNIST blended with CIFAR-10 patches)"
RGB_CHANNELS = 3
# Bump when the construction changes, so that caches of the old one are not reused.
_CONSTRUCTION_VERSION = 1
_CACHE_FOLDER = "mnist-m-style"
_SPLIT_STREAMS = {"train": 0, "test": 1}


def to_rgb(data: ImageData) -> ImageData:
    """``data`` with single-channel images repeated to three channels (RGB data unchanged)."""
    if data.num_channels == RGB_CHANNELS:
        return data
    if data.num_channels != 1:
        raise ValueError(f"to_rgb needs 1- or 3-channel images; got {data.num_channels} channels")
    return replace(data, images=data.images.expand(-1, RGB_CHANNELS, -1, -1).contiguous())


def blend_with_patches(digits: torch.Tensor, photos: torch.Tensor, seed: int) -> torch.Tensor:
    """MNIST-M blending: ``|patch - digit|`` per channel, one random photo patch per digit.

    Args:
        digits: uint8 (N, 1, H, W) greyscale digits (white strokes on black, as MNIST).
        photos: uint8 (M, 3, h, w) colour photos with ``h >= H`` and ``w >= W``.
        seed: draws, for every digit, the photo and the patch's top-left corner (uniformly
            over the photo); the same seed and inputs always give the same images.

    Returns:
        uint8 (N, 3, H, W): the photo patch where the digit is black, its colour negative
        where the digit is white.
    """
    if digits.dtype != torch.uint8 or digits.dim() != 4 or digits.shape[1] != 1:
        raise ValueError(
            f"digits must be uint8 (N, 1, H, W); got dtype {digits.dtype} and shape "
            f"{tuple(digits.shape)}"
        )
    if photos.dtype != torch.uint8 or photos.dim() != 4 or photos.shape[1] != RGB_CHANNELS:
        raise ValueError(
            f"photos must be uint8 RGB (M, 3, h, w); got dtype {photos.dtype} and shape "
            f"{tuple(photos.shape)}"
        )
    if len(photos) == 0:
        raise ValueError("photos is empty: the blend needs at least one photo to cut patches from")
    height, width = digits.shape[-2:]
    photo_height, photo_width = photos.shape[-2:]
    if photo_height < height or photo_width < width:
        raise ValueError(
            f"photos ({photo_height}x{photo_width}) must be at least as large as the digits "
            f"({height}x{width}) to cut a patch per digit; load the photos at a larger size"
        )
    rng = np.random.default_rng(seed)
    count = len(digits)
    photo_index = torch.from_numpy(rng.integers(0, len(photos), count))
    top = torch.from_numpy(rng.integers(0, photo_height - height + 1, count))
    left = torch.from_numpy(rng.integers(0, photo_width - width + 1, count))
    rows = (top[:, None] + torch.arange(height))[:, None, :, None]
    columns = (left[:, None] + torch.arange(width))[:, None, None, :]
    channels = torch.arange(RGB_CHANNELS)[None, :, None, None]
    patches = photos[photo_index[:, None, None, None], channels, rows, columns]
    return (patches.to(torch.int16) - digits.to(torch.int16)).abs_().to(torch.uint8)


def build_mnist_m_style(
    digits: ImageData, photos: ImageData, seed: int, image_size: int | None = None
) -> ImageData:
    """The MNIST-M-style images of ``digits`` (labels kept), blended at the digits' own size
    with patches of ``photos``, then resized to ``image_size`` (``None`` keeps it).

    Raises:
        ValueError: the digits are not greyscale or the photos not RGB and at least as large.
    """
    if digits.num_channels != 1:
        raise ValueError(
            f"digits must be greyscale (1 channel) to blend; got {digits.num_channels} channels"
        )
    blended = blend_with_patches(digits.images, to_rgb(photos).images, seed)
    return replace(digits, images=resize_images(blended, image_size))


def load_mnist_m_style(
    split: str,
    photo_root: str | os.PathLike,
    *,
    photo_format: str = "image-folder",
    mnist_root: str | os.PathLike | None = None,
    seed: int = 0,
    image_size: int | None = None,
    cache: bool = True,
) -> ImageData:
    """The ``split`` of the MNIST-M-style domain: MNIST's ``split`` blended with patches of the
    photo set's ``split`` (test digits never meet a training photo).

    Args:
        split: ``"train"`` or ``"test"``.
        photo_root: the photo data set's folder, e.g. a CIFAR-10 image folder holding
            ``train/<class>/*.jpg`` and ``test/<class>/*.jpg``.
        photo_format: how to read it: any registered colour data set (``"image-folder"``,
            ``"cifar10"``, ...).
        mnist_root: the MNIST IDX files; ``None`` is ``default_data_root() / "mnist"``.
        seed: the construction's seed (each split draws from its own stream of it).
        image_size: side of the returned images; the blend itself runs at MNIST's 28x28.
        cache: keep the built images in ``default_data_root()/mnist-m-style``, keyed by the
            exact input pixels and arguments, written atomically; later calls with the same
            inputs load them instead of rebuilding, and get byte-identical images even if the
            resizing code of a later library version changes.
    """
    # The registry lists this data set, so it is imported here, when a split is built.
    from contextnorm.data.loading import load_dataset

    digits = load_dataset("mnist", mnist_root, split)
    photos = load_dataset(photo_format, photo_root, split)
    split_seed = int(np.random.SeedSequence([seed, _SPLIT_STREAMS[split]]).generate_state(1)[0])
    if not cache:
        return build_mnist_m_style(digits, photos, split_seed, image_size)
    cache_file = (
        default_data_root()
        / _CACHE_FOLDER
        / f"{split}-{_cache_key(digits, photos, split_seed, image_size)}.pt"
    )
    if cache_file.exists():
        images = torch.load(cache_file, weights_only=True)
        if isinstance(images, torch.Tensor) and len(images) == len(digits):
            return replace(digits, images=images)
    log.info("building the %s %s split (cached in %s)", MNIST_M_STYLE_TITLE, split, cache_file)
    built = build_mnist_m_style(digits, photos, split_seed, image_size)
    try:
        atomic_write(cache_file, lambda temporary: torch.save(built.images, temporary))
    except OSError as error:
        warnings.warn(
            f"could not cache the {MNIST_M_STYLE_TITLE} images in {cache_file} ({error}); they "
            "will be built again next time",
            stacklevel=2,
        )
    return built


def _cache_key(digits: ImageData, photos: ImageData, seed: int, image_size: int | None) -> str:
    digest = hashlib.sha256(f"v{_CONSTRUCTION_VERSION}|seed={seed}|size={image_size}|".encode())
    for tensor in (digits.images, digits.labels, photos.images):
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()[:20]


def _read_mnist_m_style(
    directory: Path,
    split: str,
    image_size: int | None,
    mnist_root: str | None = None,
    photo_format: str = "image-folder",
    seed: int = 0,
) -> ImageData:
    return load_mnist_m_style(
        split,
        directory,
        photo_format=photo_format,
        mnist_root=mnist_root,
        seed=seed,
        image_size=image_size,
    )


MNIST_M_STYLE = DatasetFormat(
    title=MNIST_M_STYLE_TITLE,
    # The photo set and MNIST check their own files when they are read.
    required=lambda split: (),
    remote_files=(),
    read=_read_mnist_m_style,
    root="required",
)
"""The data set ``mnist-m-style``: ``root`` is the photo set (a CIFAR-10 image folder);
options ``mnist_root`` (default: the data root's ``mnist``), ``photo_format`` and ``seed``."""
