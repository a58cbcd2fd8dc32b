"""``load_dataset``: one entry point for every registered data set (:data:`DATASETS`)."""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

from contextnorm.data import formats
from contextnorm.data.digits import DIGITS
from contextnorm.data.files import default_data_root, ensure_files
from contextnorm.data.image_data import ImageData
from contextnorm.registry import Registry

DATASETS: Registry[formats.DatasetFormat] = Registry("data set")
"""Data sets by name (``data.name`` in a config); each entry is a :class:`DatasetFormat`."""

DATASETS.register(
    "digits", DIGITS, summary="scikit-learn's 8x8 digits in two visual domains (embedded)"
)
DATASETS.register("mnist", formats.MNIST, summary="MNIST, the four IDX files")
DATASETS.register("cifar10", formats.CIFAR10, summary="CIFAR-10, the official Python batches")
DATASETS.register(
    "cifar100", formats.CIFAR100, summary="CIFAR-100 with its 20 superclasses as coarse labels"
)
DATASETS.register("svhn", formats.SVHN, summary="SVHN cropped digits, the .mat files")
DATASETS.register(
    "tiny-imagenet", formats.TINY_IMAGENET, summary="Tiny ImageNet (the val folder as test)"
)
DATASETS.register(
    "oxford-pet", formats.OXFORD_PET, summary="Oxford-IIIT Pet, species as coarse labels"
)
DATASETS.register(
    "image-folder",
    formats.IMAGE_FOLDER,
    summary="your images: root/{train,test}/<class>/<image>, domains from a CSV file",
)

# The arguments every reader takes; what follows them are the data set's own options.
_READ_ARGUMENTS = 3


def load_dataset(
    name: str,
    root: str | os.PathLike | None,
    split: str = "train",
    *,
    download: bool = False,
    image_size: int | None = None,
    **options: Any,
) -> ImageData:
    """Load one split of a data set into memory.

    Args:
        name: a registered data set:

            * ``"digits"``: the embedded default, scikit-learn's 8x8 handwritten digits in two
              visual domains (see ``contextnorm.data.digits``); needs no files, ``root`` is ignored.
            * ``"mnist"``: the four IDX files (``train-images-idx3-ubyte.gz`` ...
              ``t10k-labels-idx1-ubyte.gz``, gzip-compressed or not) directly in ``root``.
            * ``"cifar10"`` / ``"cifar100"``: ``root/cifar-10-batches-py/`` and
              ``root/cifar-100-python/`` as extracted from the official Python archives;
              CIFAR-100 carries its 20 superclasses as coarse labels.
            * ``"svhn"``: ``root/train_32x32.mat`` and ``root/test_32x32.mat`` (label 10 becomes
              digit 0).
            * ``"tiny-imagenet"``: ``root/tiny-imagenet-200/``; the official ``val`` folder serves
              as the test split (the official test images have no labels).
            * ``"oxford-pet"``: ``root/images/*.jpg`` and ``root/annotations/{trainval,test}.txt``;
              "train" is the official trainval list. Species (cat, dog) are the coarse labels.
              The photos vary in size and are resized (squashed, not cropped) to ``image_size``,
              64 by default.
            * ``"image-folder"``: ``root/<split>/<class>/<image>`` when ``root/train`` or
              ``root/test`` exists, else ``root/<class>/<image>`` as a train split only.
              Greyscale stays one channel unless some image is in colour.

            Decoded JPEG/PNG sets (Tiny ImageNet, Pet, image folder) are cached as tensors
            (see ``contextnorm.data.decode``).
        root: the data set's own directory; ``None`` means ``default_data_root() / name``.
        split: ``"train"`` or ``"test"``.
        download: fetch missing official files (checked against their published MD5) into ``root``.
        image_size: resize the images to this square size; ``None`` keeps their size.
        **options: the data set's own options (for ``image-folder``: ``domains``).

    Raises:
        ValueError: unknown ``name``, ``split`` or option, or unusable ``image_size``.
        FileNotFoundError: the files are missing (and could not be downloaded); the message says
            which files go where and where to get them.
    """
    dataset_format = DATASETS.get(name)
    if split not in formats.SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(formats.SPLITS)}.")
    if image_size is not None and (
        isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1
    ):
        raise ValueError(f"image_size must be a positive int or None; got {image_size!r}.")
    accepted = list(inspect.signature(dataset_format.read).parameters)[_READ_ARGUMENTS:]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(
            f"data set {name!r} has no option {unknown[0]!r}; "
            f"its options: {', '.join(accepted) or 'none'}."
        )
    if dataset_format.root == "ignored":
        return dataset_format.read(None, split, image_size, **options)
    if root is None and dataset_format.root == "required":
        raise ValueError(
            f"{name} needs root: the folder that holds <class>/<image> or train/ and test/."
        )
    directory = Path(root).expanduser() if root is not None else default_data_root() / name
    ensure_files(
        f"{dataset_format.title} ({split} split)",
        directory,
        dataset_format.required(split),
        dataset_format.remote_files,
        download=download,
        dataset_name=name,
    )
    return dataset_format.read(directory, split, image_size, **options)
