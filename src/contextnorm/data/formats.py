"""Readers for the published layouts of each data set, with their official download addresses."""

from __future__ import annotations

import csv
import gzip
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import scipy.io
import torch

from contextnorm.data.decode import IMAGE_EXTENSIONS, load_image_files, resize_images
from contextnorm.data.files import RemoteFile, existing_variant
from contextnorm.data.image_data import ImageData

SPLITS = ("train", "test")
DIGIT_NAMES = [str(digit) for digit in range(10)]
PET_DEFAULT_IMAGE_SIZE = 64
PET_SPECIES = ["cat", "dog"]


@dataclass(frozen=True)
class DatasetFormat:
    """How one data set is laid out on disk and where its official files come from.

    Attributes:
        title: human-readable name for messages.
        required: split -> paths (relative to the data set's directory) that must exist.
        remote_files: the official files that supply those paths.
        read: ``read(directory, split, image_size, **options) -> ImageData``, called once the
            paths exist; its keyword arguments after ``image_size`` are the data set's options
            (``data.options`` in a config).
        root: ``"default"``: the directory defaults to ``default_data_root() / name``;
            ``"required"``: it must be given; ``"ignored"``: the data need no files.
    """

    title: str
    required: Callable[[str], tuple[str, ...]]
    remote_files: tuple[RemoteFile, ...]
    read: Callable[..., ImageData]
    root: Literal["default", "required", "ignored"] = "default"


# --- MNIST: IDX files -----------------------------------------------------------------------

_MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
_IDX_UNSIGNED_BYTE = 0x08


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file of unsigned bytes (gzip-compressed when the name ends in ``.gz``)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as stream:
        content = stream.read()
    if len(content) < 4 or content[0] != 0 or content[1] != 0:
        raise ValueError(f"{path} is not an IDX file (its first two bytes must be zero)")
    if content[2] != _IDX_UNSIGNED_BYTE:
        raise ValueError(
            f"{path} holds IDX type 0x{content[2]:02x}; only unsigned bytes (0x08) are supported"
        )
    num_dims = content[3]
    shape = tuple(
        int(size) for size in np.frombuffer(content, dtype=">u4", count=num_dims, offset=4)
    )
    values = np.frombuffer(content, dtype=np.uint8, offset=4 + 4 * num_dims)
    if values.size != int(np.prod(shape)):
        raise ValueError(
            f"{path} is truncated: its header announces shape {shape}, it has {values.size} values"
        )
    return values.reshape(shape)


def _read_mnist(directory: Path, split: str, image_size: int | None) -> ImageData:
    image_file, label_file = (existing_variant(directory / name) for name in _MNIST_FILES[split])
    images = torch.from_numpy(read_idx(image_file).copy())[:, None]
    labels = torch.from_numpy(read_idx(label_file).astype(np.int64))
    if len(images) != len(labels):
        raise ValueError(
            f"{image_file} has {len(images)} images but {label_file} has {len(labels)} labels"
        )
    return ImageData(resize_images(images, image_size), labels, DIGIT_NAMES)


MNIST = DatasetFormat(
    title="MNIST",
    required=lambda split: _MNIST_FILES[split],
    remote_files=tuple(
        RemoteFile(name, tuple(mirror + name for mirror in _MNIST_MIRRORS), md5)
        for name, md5 in _MNIST_MD5.items()
    ),
    read=_read_mnist,
)


# --- CIFAR-10 and CIFAR-100: Python pickles ---------------------------------------------------

_CIFAR10_FOLDER = "cifar-10-batches-py"
_CIFAR100_FOLDER = "cifar-100-python"
_CIFAR10_BATCHES = {
    "train": tuple(f"data_batch_{index}" for index in range(1, 6)),
    "test": ("test_batch",),
}


def _unpickle(path: Path) -> dict:
    # The official batches were pickled by Python 2; latin1 turns their byte-string keys into str.
    # Pickles can run code: only read files from the official archives.
    with path.open("rb") as stream:
        return pickle.load(stream, encoding="latin1")


def _cifar_images(rows: np.ndarray) -> torch.Tensor:
    # Each row is 3072 bytes: 1024 red values, then green, then blue, each 32x32 row by row.
    return torch.from_numpy(np.ascontiguousarray(rows, dtype=np.uint8).reshape(-1, 3, 32, 32))


def _read_cifar10(directory: Path, split: str, image_size: int | None) -> ImageData:
    folder = directory / _CIFAR10_FOLDER
    batches = [_unpickle(folder / name) for name in _CIFAR10_BATCHES[split]]
    images = torch.cat([_cifar_images(batch["data"]) for batch in batches])
    labels = torch.tensor(
        [label for batch in batches for label in batch["labels"]], dtype=torch.int64
    )
    classes = list(_unpickle(folder / "batches.meta")["label_names"])
    return ImageData(resize_images(images, image_size), labels, classes)


def _read_cifar100(directory: Path, split: str, image_size: int | None) -> ImageData:
    folder = directory / _CIFAR100_FOLDER
    batch = _unpickle(folder / split)
    meta = _unpickle(folder / "meta")
    return ImageData(
        images=resize_images(_cifar_images(batch["data"]), image_size),
        labels=torch.tensor(batch["fine_labels"], dtype=torch.int64),
        classes=list(meta["fine_label_names"]),
        coarse_labels=torch.tensor(batch["coarse_labels"], dtype=torch.int64),
        coarse_classes=list(meta["coarse_label_names"]),
    )


CIFAR10 = DatasetFormat(
    title="CIFAR-10",
    required=lambda split: tuple(
        f"{_CIFAR10_FOLDER}/{name}" for name in (*_CIFAR10_BATCHES[split], "batches.meta")
    ),
    remote_files=(
        RemoteFile(
            "cifar-10-python.tar.gz",
            ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",),
            "c58f30108f718f92721af3b95e74349a",
            unpacks_to=(_CIFAR10_FOLDER,),
        ),
    ),
    read=_read_cifar10,
)

CIFAR100 = DatasetFormat(
    title="CIFAR-100",
    required=lambda split: (f"{_CIFAR100_FOLDER}/{split}", f"{_CIFAR100_FOLDER}/meta"),
    remote_files=(
        RemoteFile(
            "cifar-100-python.tar.gz",
            ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",),
            "eb9058c3a382ffc7106e4002c42a8d85",
            unpacks_to=(_CIFAR100_FOLDER,),
        ),
    ),
    read=_read_cifar100,
)


# --- SVHN: MATLAB files -----------------------------------------------------------------------

_SVHN_MD5 = {
    "train": "e26dedcc434d2e4c54c9b2d4a06d8373",
    "test": "eb5a983be6a315427106f1b164d9cef3",
}
_SVHN_ZERO_LABEL = 10


def _read_svhn(directory: Path, split: str, image_size: int | None) -> ImageData:
    content = scipy.io.loadmat(directory / f"{split}_32x32.mat")
    # X is (height, width, channel, sample) in MATLAB order.
    images = torch.from_numpy(
        np.ascontiguousarray(content["X"].transpose(3, 2, 0, 1), dtype=np.uint8)
    )
    labels = content["y"].reshape(-1).astype(np.int64)
    labels[labels == _SVHN_ZERO_LABEL] = 0
    return ImageData(resize_images(images, image_size), torch.from_numpy(labels), DIGIT_NAMES)


SVHN = DatasetFormat(
    title="SVHN",
    required=lambda split: (f"{split}_32x32.mat",),
    remote_files=tuple(
        RemoteFile(
            f"{split}_32x32.mat",
            (f"http://ufldl.stanford.edu/housenumbers/{split}_32x32.mat",),
            md5,
        )
        for split, md5 in _SVHN_MD5.items()
    ),
    read=_read_svhn,
)


# --- Tiny ImageNet: JPEG folders ----------------------------------------------------------------

_TINY_FOLDER = "tiny-imagenet-200"


def _read_tiny_imagenet(directory: Path, split: str, image_size: int | None) -> ImageData:
    folder = directory / _TINY_FOLDER
    wnids = sorted((folder / "wnids.txt").read_text().split())
    label_of = {wnid: label for label, wnid in enumerate(wnids)}
    words = dict(
        line.split("\t", 1)
        for line in (folder / "words.txt").read_text().splitlines()
        if "\t" in line
    )
    classes = [words.get(wnid, wnid).strip() for wnid in wnids]
    if split == "train":
        samples = [
            (path, label_of[wnid])
            for wnid in wnids
            for path in sorted((folder / "train" / wnid / "images").glob("*.JPEG"))
        ]
    else:
        samples = []
        for line in (folder / "val" / "val_annotations.txt").read_text().splitlines():
            if not line.strip():
                continue
            filename, wnid = line.split("\t")[:2]
            if wnid not in label_of:
                raise ValueError(
                    f"val_annotations.txt names class {wnid!r}, which wnids.txt does not list"
                )
            samples.append((folder / "val" / "images" / filename, label_of[wnid]))
    if not samples:
        raise FileNotFoundError(f"no Tiny ImageNet {split} images found under {folder}")
    paths, labels = zip(*samples, strict=True)
    images = load_image_files(
        paths, image_size=image_size, force_rgb=True, cache_name=f"tiny-imagenet-{split}"
    )
    return ImageData(images, torch.tensor(labels, dtype=torch.int64), classes)


TINY_IMAGENET = DatasetFormat(
    title="Tiny ImageNet",
    required=lambda split: (
        f"{_TINY_FOLDER}/wnids.txt",
        f"{_TINY_FOLDER}/words.txt",
        f"{_TINY_FOLDER}/train" if split == "train" else f"{_TINY_FOLDER}/val/val_annotations.txt",
    ),
    remote_files=(
        RemoteFile(
            "tiny-imagenet-200.zip",
            ("http://cs231n.stanford.edu/tiny-imagenet-200.zip",),
            "90528d7ca1a48142e341f4ef8d21d0de",
            unpacks_to=(_TINY_FOLDER,),
        ),
    ),
    read=_read_tiny_imagenet,
)


# --- Oxford-IIIT Pet: JPEGs with list files -------------------------------------------------------

_PET_LISTS = {"train": "annotations/trainval.txt", "test": "annotations/test.txt"}


def _read_pet_list(path: Path) -> list[tuple[str, int, int]]:
    """(image name, class id, species id), ids from 0, per line "name class species breed_id"."""
    entries = []
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, class_id, species, _breed_id = line.split()
        entries.append((name, int(class_id) - 1, int(species) - 1))
    return entries


def _read_oxford_pet(directory: Path, split: str, image_size: int | None) -> ImageData:
    # Both lists name classes: reading both gives train and test the same complete class list.
    entries = {name: _read_pet_list(directory / path) for name, path in _PET_LISTS.items()}
    breed_of = {
        class_id: name.rsplit("_", 1)[0]
        for listing in entries.values()
        for name, class_id, _ in listing
    }
    num_classes = max(breed_of) + 1
    unnamed = sorted(set(range(num_classes)) - breed_of.keys())
    if unnamed:
        raise ValueError(
            f"the Pet annotation lists have no image of class id(s) {[i + 1 for i in unnamed]}"
        )
    listing = entries[split]
    if not listing:
        raise ValueError(f"{directory / _PET_LISTS[split]} lists no images")
    names, labels, species = zip(*listing, strict=True)
    images = load_image_files(
        [directory / "images" / f"{name}.jpg" for name in names],
        image_size=PET_DEFAULT_IMAGE_SIZE if image_size is None else image_size,
        force_rgb=True,
        cache_name=f"oxford-pet-{split}",
    )
    return ImageData(
        images=images,
        labels=torch.tensor(labels, dtype=torch.int64),
        classes=[breed_of[class_id] for class_id in range(num_classes)],
        coarse_labels=torch.tensor(species, dtype=torch.int64),
        coarse_classes=list(PET_SPECIES),
    )


OXFORD_PET = DatasetFormat(
    title="Oxford-IIIT Pet",
    required=lambda split: ("images", *_PET_LISTS.values()),
    remote_files=(
        RemoteFile(
            "images.tar.gz",
            ("https://www.robots.ox.ac.uk/~vgg/data/pets/data/images.tar.gz",),
            "5c4f3ee8e5d25df40f4fd59a7f44e54c",
            unpacks_to=("images",),
        ),
        RemoteFile(
            "annotations.tar.gz",
            ("https://www.robots.ox.ac.uk/~vgg/data/pets/data/annotations.tar.gz",),
            "95a8c909bbe2e81eed6a22bccdf3f68f",
            unpacks_to=("annotations",),
        ),
    ),
    read=_read_oxford_pet,
)


# --- image folder: root/<class>/<image>, optionally under root/train and root/test ----------------


def read_image_folder(
    directory: Path, split: str, image_size: int | None, domains: str | None = None
) -> ImageData:
    """Read ``directory/<split>/<class>/*`` when ``directory/train`` or ``directory/test`` exists,
    else ``directory/<class>/*`` as the train split (a flat tree has no test split).

    Classes are the sorted class-folder names over all splits, so train and test labels agree
    even when a class is missing from one split. Hidden folders (".name") are not classes.

    Args:
        directory: the image folder.
        split: ``"train"`` or ``"test"``.
        image_size: resize to this square size; ``None`` keeps the size.
        domains: a CSV file (relative to ``directory``, or absolute) that gives each image a
            domain, for ``domain`` contexts: a header row naming a ``path`` column (the image's
            path relative to ``directory``, e.g. ``train/cat/001.jpg``) and a ``domain`` column
            (an id from 0, or a name; names are numbered in sorted order). Every image needs a
            row.
    """
    if not directory.is_dir():
        raise FileNotFoundError(
            f"image folder {directory} does not exist; expected {directory}/<class>/<image> "
            f"or {directory}/train/<class>/<image> and {directory}/test/<class>/<image>."
        )
    split_folders = [directory / name for name in SPLITS if (directory / name).is_dir()]
    if not split_folders and split != "train":
        raise ValueError(
            f"{directory} has no train/ and test/ folders, so it holds a training split only; "
            f"put the images in {directory}/train/<class>/ and {directory}/test/<class>/ for a "
            "test split (or, in Python, divide the train split with ImageData.subset)."
        )
    folder = directory / split if split_folders else directory
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{directory} has a {split_folders[0].name}/ folder but no {split}/ folder; "
            f"put the {split} images in {folder}/<class>/<image>."
        )
    classes = sorted(
        {
            child.name
            for parent in split_folders or [directory]
            for child in parent.iterdir()
            if child.is_dir() and not child.name.startswith(".")
        }
    )
    samples = [
        (path, label)
        for label, name in enumerate(classes)
        if (folder / name).is_dir()
        for path in sorted((folder / name).iterdir())
        if path.suffix.lower() in IMAGE_EXTENSIONS
    ]
    if not samples:
        raise FileNotFoundError(
            f"no images found in {folder}: expected {folder}/<class>/<image> with one of the "
            f"extensions {sorted(IMAGE_EXTENSIONS)}."
        )
    paths, labels = zip(*samples, strict=True)
    domain_ids, domain_names = (None, None)
    if domains is not None:
        domain_ids, domain_names = _read_domains(directory, domains, paths)
    images = load_image_files(
        paths, image_size=image_size, force_rgb=False, cache_name=f"image-folder-{split}"
    )
    return ImageData(
        images,
        torch.tensor(labels, dtype=torch.int64),
        classes,
        domains=domain_ids,
        domain_names=domain_names,
    )


_PATH_COLUMN = "path"
_DOMAIN_COLUMNS = ("domain", "context")


def _read_domains(
    directory: Path, table: str, paths: tuple[Path, ...]
) -> tuple[torch.Tensor, list[str]]:
    """Each image's domain id from the CSV ``table``, and the domain names."""
    path = Path(table).expanduser()
    path = path if path.is_absolute() else directory / path
    if not path.is_file():
        raise FileNotFoundError(f"domains file {path} does not exist.")
    with path.open(newline="", encoding="utf-8-sig") as stream:
        reader = csv.DictReader(stream)
        header = [name.strip().lower() for name in reader.fieldnames or []]
        column = next((name for name in _DOMAIN_COLUMNS if name in header), None)
        if _PATH_COLUMN not in header or column is None:
            raise ValueError(
                f"{path} must start with a header row naming a 'path' column and a 'domain' "
                f"column; its header is {reader.fieldnames}."
            )
        rows = [
            {key.strip().lower(): value.strip() for key, value in row.items()} for row in reader
        ]
    root = directory.resolve()
    listed = {}
    for number, row in enumerate(rows, start=2):
        if not row[_PATH_COLUMN] or not row[column]:
            raise ValueError(f"{path}, line {number}: the path or the domain is empty.")
        listed[(root / row[_PATH_COLUMN]).resolve()] = row[column]
    values = sorted(set(listed.values()))
    if all(value.isdigit() for value in values):
        count = max(int(value) for value in values) + 1
        names = [f"domain {index}" for index in range(count)]
        ids = {value: int(value) for value in values}
    else:
        names = values
        ids = {value: index for index, value in enumerate(values)}
    wanted = [image.resolve() for image in paths]
    missing = [image.relative_to(root).as_posix() for image in wanted if image not in listed]
    if missing:
        raise ValueError(
            f"{path} gives no domain for {len(missing)} of the {len(wanted)} images, e.g. "
            f"{missing[:3]}; add a row for each (paths relative to {directory})."
        )
    return torch.tensor([ids[listed[image]] for image in wanted], dtype=torch.int64), names


IMAGE_FOLDER = DatasetFormat(
    title="Image folder",
    required=lambda split: (),
    remote_files=(),
    read=read_image_folder,
    root="required",
)
