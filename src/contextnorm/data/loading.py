"""``load_dataset``: one entry point for every supported data set."""

from __future__ import annotations

import os
from pathlib import Path

from contextnorm.data import formats
from contextnorm.data.digits import load_digits_domains
from contextnorm.data.files import default_data_root, ensure_files
from contextnorm.data.image_data import ImageData

_FORMATS: dict[str, formats.DatasetFormat] = {
    "mnist": formats.MNIST,
    "cifar10": formats.CIFAR10,
    "cifar100": formats.CIFAR100,
    "svhn": formats.SVHN,
    "tiny-imagenet": formats.TINY_IMAGENET,
    "oxford-pet": formats.OXFORD_PET,
    "image-folder": formats.IMAGE_FOLDER,
}
DATASETS: tuple[str, ...] = ("digits", *_FORMATS)


def load_dataset(
    name: str,
    root: str | os.PathLike | None,
    split: str = "train",
    *,
    download: bool = False,
    image_size: int | None = None,
) -> ImageData:
    """Load one split of a data set into memory.

    Args:
        name: one of ``DATASETS``:

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

            Decoded JPEG/PNG sets (Tiny ImageNet, Pet, image folder) are cached as tensors under
            ``default_data_root()/decoded``.
        root: the data set's own directory; ``None`` means ``default_data_root() / name``.
        split: ``"train"`` or ``"test"``.
        download: fetch missing official files (checked against their published MD5) into ``root``.
        image_size: resize the images to this square size; ``None`` keeps their size.

    Raises:
        ValueError: unknown ``name`` or ``split``, or unusable ``image_size``.
        FileNotFoundError: the files are missing (and could not be downloaded); the message says
            which files go where and where to get them.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}.")
    if split not in formats.SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(formats.SPLITS)}.")
    if image_size is not None and (
        isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1
    ):
        raise ValueError(f"image_size must be a positive int or None; got {image_size!r}.")
    if name == "digits":
        return load_digits_domains(split, image_size)
    if root is None and name == "image-folder":
        raise ValueError(
            "image-folder needs root: the folder that holds <class>/<image> or train/ and test/."
        )
    directory = Path(root).expanduser() if root is not None else default_data_root() / name
    dataset_format = _FORMATS[name]
    ensure_files(
        f"{dataset_format.title} ({split} split)",
        directory,
        dataset_format.required(split),
        dataset_format.remote_files,
        download=download,
        dataset_name=name,
    )
    return dataset_format.read(directory, split, image_size)
