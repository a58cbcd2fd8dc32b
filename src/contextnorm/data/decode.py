"""Decoding image files into one uint8 tensor, resizing, and caching the decoded result."""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from contextnorm.data.files import default_data_root
from contextnorm.io import atomic_write

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)
_RESIZE_CHUNK = 4096
_CACHE_FORMAT_VERSION = 1


def resize_images(images: torch.Tensor, image_size: int | None) -> torch.Tensor:
    """Resize uint8 (N, C, H, W) images to (image_size, image_size), bilinear with antialiasing.

    ``None`` returns the images unchanged.
    """
    if image_size is None or tuple(images.shape[-2:]) == (image_size, image_size):
        return images
    if image_size < 1:
        raise ValueError(f"image_size must be a positive number of pixels; got {image_size}.")
    # Chunks bound the float copy: 60k CIFAR images as float32 would take 0.7 GB at once.
    chunks = [
        F.interpolate(
            chunk.float(),
            size=(image_size, image_size),
            mode="bilinear",
            antialias=True,
            align_corners=False,
        )
        .round_()
        .clamp_(0, 255)
        .to(torch.uint8)
        for chunk in images.split(_RESIZE_CHUNK)
    ]
    return (
        torch.cat(chunks)
        if chunks
        else images.new_empty((0, images.shape[1], image_size, image_size))
    )


def load_image_files(
    paths: Sequence[Path], *, image_size: int | None, force_rgb: bool, cache_name: str
) -> torch.Tensor:
    """Decode ``paths`` into a uint8 (N, C, H, W) tensor, reusing a cached decode of the same files.

    Args:
        paths: image files, in sample order.
        image_size: resize every image to this square size; ``None`` keeps the size, which must
            then be the same for all images.
        force_rgb: convert every image to RGB. Otherwise the images stay single-channel when all
            are greyscale, and greyscale ones are repeated to three channels when any is in colour.
        cache_name: prefix of the cache file name, for a human browsing the cache folder.

    The cache lives in ``default_data_root()/decoded`` and is keyed by the absolute file paths,
    their byte sizes and the decoding options, so a changed or moved file set is decoded again.
    """
    cache_file = (
        default_data_root()
        / "decoded"
        / f"{cache_name}-{_cache_key(paths, image_size, force_rgb)}.pt"
    )
    if cache_file.exists():
        images = torch.load(cache_file, weights_only=True)
        if isinstance(images, torch.Tensor) and len(images) == len(paths):
            return images
    log.info("decoding %d images (cached afterwards in %s)", len(paths), cache_file)
    images = _decode(paths, image_size, force_rgb)
    try:
        atomic_write(cache_file, lambda temporary: torch.save(images, temporary))
    except OSError as error:
        warnings.warn(
            f"could not cache decoded images in {cache_file} ({error}); they will be decoded "
            "again next time",
            stacklevel=2,
        )
    return images


def _cache_key(paths: Sequence[Path], image_size: int | None, force_rgb: bool) -> str:
    listing = [[str(path.absolute()), path.stat().st_size] for path in paths]
    options = {"version": _CACHE_FORMAT_VERSION, "image_size": image_size, "force_rgb": force_rgb}
    return hashlib.sha256(json.dumps([options, listing]).encode()).hexdigest()[:20]


def _decode(paths: Sequence[Path], image_size: int | None, force_rgb: bool) -> torch.Tensor:
    if not paths:
        raise ValueError("no image files to decode")
    decoded = [_decode_one(path, image_size, force_rgb) for path in paths]
    sizes = {tuple(image.shape[-2:]) for image in decoded}
    if len(sizes) > 1:
        raise ValueError(
            f"the images have {len(sizes)} different sizes (e.g. {sorted(sizes)[:3]}); "
            "pass image_size=... to resize them to one square size."
        )
    channels = max(image.shape[0] for image in decoded)
    return torch.stack([image.expand(channels, -1, -1) for image in decoded])


def _decode_one(path: Path, image_size: int | None, force_rgb: bool) -> torch.Tensor:
    try:
        with Image.open(path) as image:
            if image_size is not None:
                # JPEG can decode at 1/2, 1/4 or 1/8 scale directly, much faster for large photos.
                image.draft(None, (image_size, image_size))
            greyscale = not force_rgb and image.mode in ("1", "L", "LA", "I", "I;16", "F")
            pixels = np.asarray(image.convert("L" if greyscale else "RGB"))
    except OSError as error:
        raise OSError(f"cannot decode image file {path}: {error}") from error
    tensor = torch.from_numpy(pixels.copy())
    tensor = tensor[None] if tensor.dim() == 2 else tensor.permute(2, 0, 1)
    return resize_images(tensor[None], image_size)[0]
