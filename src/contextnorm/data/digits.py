"""The embedded default data set: scikit-learn's handwritten digits in two visual domains.

scikit-learn ships the 1,797 8x8 digits of the UCI "optical recognition of handwritten
digits" set (16 grey levels), so this data set needs no download. A fixed random half of the
samples is shown in a second visual style, which gives context-based normalization a real
context to exploit:

* domain 0, ``"original"``: light strokes on a black background, grey level g -> g * 255 / 16.
* domain 1, ``"inverted"``: dark strokes on a light-grey background at lower contrast,
  g -> 230 - g * 140 / 16 (background 230, fullest stroke 90), like ink on paper.

The second style keeps every digit readable (the same strokes, only the tone curve differs)
but moves the pixel statistics far apart: mean about 78 vs 187 and standard deviation about
96 vs 53 grey values, so statistics pooled over both domains describe neither. The train/test
split (25 % test) is stratified by digit and domain, so both splits hold both domains in
equal shares. Everything is seeded: the data are identical on every machine.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from contextnorm.data.decode import resize_images
from contextnorm.data.formats import DIGIT_NAMES, DatasetFormat
from contextnorm.data.image_data import ImageData

DIGITS_DOMAIN_NAMES = ["original", "inverted"]
DIGITS_TEST_FRACTION = 0.25
_DIGITS_SEED = 0
_GREY_LEVELS = 16
_INVERTED_BACKGROUND = 230
_INVERTED_CONTRAST = 140


def load_digits_domains(split: str, image_size: int | None = None) -> ImageData:
    """The ``split`` ("train" or "test") of the two-domain digits, optionally resized.

    See the module docstring for the construction.
    """
    bunch = load_digits()
    grey_levels = bunch.images.astype(np.float64)
    rng = np.random.default_rng(_DIGITS_SEED)
    domains = np.zeros(len(grey_levels), dtype=np.int64)
    domains[rng.permutation(len(grey_levels))[: len(grey_levels) // 2]] = 1
    inverted = domains[:, None, None] == 1
    pixels = np.where(
        inverted,
        _INVERTED_BACKGROUND - grey_levels * _INVERTED_CONTRAST / _GREY_LEVELS,
        grey_levels * 255 / _GREY_LEVELS,
    )
    labels = bunch.target.astype(np.int64)
    train_index, test_index = train_test_split(
        np.arange(len(labels)),
        test_size=DIGITS_TEST_FRACTION,
        stratify=labels * len(DIGITS_DOMAIN_NAMES) + domains,
        random_state=_DIGITS_SEED,
    )
    index = train_index if split == "train" else test_index
    return ImageData(
        images=resize_images(
            torch.from_numpy(np.rint(pixels[index]).astype(np.uint8)[:, None]), image_size
        ),
        labels=torch.from_numpy(labels[index]),
        classes=list(DIGIT_NAMES),
        domains=torch.from_numpy(domains[index]),
        domain_names=list(DIGITS_DOMAIN_NAMES),
    )


def _read_digits(directory: Path | None, split: str, image_size: int | None) -> ImageData:
    return load_digits_domains(split, image_size)


DIGITS = DatasetFormat(
    title="two-domain digits",
    required=lambda split: (),
    remote_files=(),
    read=_read_digits,
    root="ignored",
)
