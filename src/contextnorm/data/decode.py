"""Decoding image files into one uint8 tensor, resizing, and caching the decoded result.

The decoded-image cache keeps each decoded file set as one tensor file in
``<data root>/decoded`` (``$CONTEXTNORM_DATA/decoded``, or ``~/.cache/contextnorm/data/decoded``),
so that later runs skip the decoding. Its size is capped at ``$CONTEXTNORM_CACHE_GB`` gigabytes
(10 by default): the least recently used files go first. ``contextnorm cache`` shows it and
``contextnorm cache --clear`` empties it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
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
CACHE_LIMIT_VARIABLE = "CONTEXTNORM_CACHE_GB"
DEFAULT_CACHE_LIMIT_GB = 10.0
_BYTES_PER_GB = 1024**3


def cache_folder() -> Path:
    """Where decoded image sets are cached: ``default_data_root() / "decoded"``."""
    return default_data_root() / "decoded"


def cache_limit_bytes() -> int:
    """The cache's size cap: ``$CONTEXTNORM_CACHE_GB`` gigabytes, 10 by default (0 disables)."""
    text = os.environ.get(CACHE_LIMIT_VARIABLE)
    try:
        limit = DEFAULT_CACHE_LIMIT_GB if text is None else float(text)
    except ValueError:
        raise ValueError(
            f"${CACHE_LIMIT_VARIABLE} must be a number of gigabytes; got {text!r}"
        ) from None
    return int(max(0.0, limit) * _BYTES_PER_GB)


@dataclass(frozen=True)
class CacheEntry:
    """One cached decoded image set."""

    path: Path
    size: int
    last_used: float


def cache_entries() -> list[CacheEntry]:
    """The cached files, least recently used first."""
    folder = cache_folder()
    if not folder.is_dir():
        return []
    entries = []
    for path in folder.glob("*.pt"):
        status = path.stat()
        entries.append(CacheEntry(path, status.st_size, status.st_mtime))
    return sorted(entries, key=lambda entry: entry.last_used)


def clear_cache() -> list[CacheEntry]:
    """Delete every cached file; returns what was deleted."""
    removed = cache_entries()
    for entry in removed:
        entry.path.unlink(missing_ok=True)
    return removed


def _evict(limit: int, keep: Path) -> None:
    """Delete the least recently used files until the cache fits ``limit`` (never ``keep``)."""
    entries = cache_entries()
    total = sum(entry.size for entry in entries)
    for entry in entries:
        if total <= limit:
            break
        if entry.path != keep:
            entry.path.unlink(missing_ok=True)
            total -= entry.size


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

    The cache (see the module docstring) is keyed by the absolute file paths, their byte sizes
    and the decoding options, so a changed or moved file set is decoded again.
    """
    cache_file = cache_folder() / f"{cache_name}-{_cache_key(paths, image_size, force_rgb)}.pt"
    if cache_file.exists():
        images = torch.load(cache_file, weights_only=True)
        if isinstance(images, torch.Tensor) and len(images) == len(paths):
            # The modification time marks the last use: the least recently used go first.
            os.utime(cache_file)
            return images
    log.info("decoding %d images (cached afterwards in %s)", len(paths), cache_file)
    images = _decode(paths, image_size, force_rgb)
    limit = cache_limit_bytes()
    size = images.numel() * images.element_size()
    if size > limit:
        log.info("not caching %s: %d bytes exceed the cache limit of %d", cache_file, size, limit)
        return images
    try:
        atomic_write(cache_file, lambda temporary: torch.save(images, temporary))
        _evict(limit, keep=cache_file)
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
            "set an image_size (data.image_size in a config) to resize them to one square size."
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
