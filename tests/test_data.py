"""Loaders on tiny files written here in each official layout; the embedded digits; downloads."""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image
from sklearn.datasets import load_digits

from contextnorm.cli import main
from contextnorm.data import DATASETS, ImageData, default_data_root, load_dataset
from contextnorm.data.decode import cache_entries, cache_folder, clear_cache
from contextnorm.data.files import RemoteFile, ensure_files, fetch

SHARED_MNIST = Path("/work/shared/data/mnist")


@pytest.fixture(autouse=True)
def private_data_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Send the decoded-image cache (and any default root) to a per-test folder."""
    root = tmp_path / "data-root"
    monkeypatch.setenv("CONTEXTNORM_DATA", str(root))
    return root


def random_pixels(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def write_image(path: Path, pixels: np.ndarray) -> None:
    """Write an (H, W) or (H, W, 3) uint8 array as JPEG or PNG, by the file's extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(
        path, format="JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG"
    )


# --- ImageData --------------------------------------------------------------------------------


def make_image_data(num_samples: int = 6, **extra) -> ImageData:
    rng = np.random.default_rng(0)
    return ImageData(
        images=torch.from_numpy(random_pixels(rng, num_samples, 3, 4, 4)),
        labels=torch.arange(num_samples) % 3,
        classes=["a", "b", "c"],
        **extra,
    )


def test_image_data_properties_and_subset() -> None:
    data = make_image_data(domains=torch.tensor([0, 1, 0, 1, 0, 1]), domain_names=["x", "y"])
    assert (len(data), data.num_classes, data.num_channels, data.image_size) == (6, 3, 3, 4)
    picked = data.subset(torch.tensor([5, 0]))
    assert torch.equal(picked.images, data.images[[5, 0]])
    assert picked.labels.tolist() == [2, 0] and picked.domains.tolist() == [1, 0]
    assert picked.classes == data.classes and picked.domain_names == ["x", "y"]
    masked = data.subset(data.domains == 1)
    assert masked.domains.tolist() == [1, 1, 1]
    assert len(data.subset([])) == 0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"images": torch.zeros(6, 3, 4, 4)}, "uint8"),
        ({"images": torch.zeros(6, 4, 4, dtype=torch.uint8)}, r"\(N, C, H, W\)"),
        ({"labels": torch.zeros(5, dtype=torch.int64)}, "labels has 5 entries"),
        ({"labels": torch.zeros(6, dtype=torch.int32)}, "int64"),
        ({"labels": torch.full((6,), 3)}, r"\[0, 3\)"),
        (
            {"coarse_labels": torch.zeros(6, dtype=torch.int64)},
            "coarse_classes must be given together",
        ),
        (
            {"domains": torch.zeros(6, dtype=torch.int64), "domain_names": []},
            r"domains must lie in \[0, 0\)",
        ),
    ],
)
def test_image_data_rejects_inconsistent_fields(change: dict, message: str) -> None:
    fields = {
        "images": make_image_data().images,
        "labels": make_image_data().labels,
        "classes": ["a", "b", "c"],
    }
    with pytest.raises(ValueError, match=message):
        ImageData(**{**fields, **change})


def test_image_size_of_non_square_images_names_the_fix() -> None:
    data = ImageData(
        torch.zeros(1, 1, 4, 6, dtype=torch.uint8), torch.zeros(1, dtype=torch.int64), ["a"]
    )
    with pytest.raises(ValueError, match="image_size"):
        _ = data.image_size


# --- the embedded digits ----------------------------------------------------------------------


def test_digits_sizes_domains_and_determinism() -> None:
    train, test = load_dataset("digits", None, "train"), load_dataset("digits", None, "test")
    assert (len(train), len(test)) == (1347, 450)  # 1,797 digits, 25 % test
    assert train.images.shape[1:] == (1, 8, 8) and train.images.dtype == torch.uint8
    assert train.classes == [str(d) for d in range(10)] and train.domain_names == [
        "original",
        "inverted",
    ]
    for split in (train, test):
        assert set(split.labels.tolist()) == set(range(10))
        shares = split.domains.bincount() / len(split)
        assert shares.tolist() == pytest.approx([0.5, 0.5], abs=0.01)
    assert torch.equal(load_dataset("digits", None, "train").images, train.images)


def test_digits_splits_partition_the_source_digits_and_the_style_is_invertible() -> None:
    def grey_levels(data: ImageData) -> torch.Tensor:
        """Undo each domain's tone curve (see contextnorm.data.digits) back to the 16 levels."""
        pixels = data.images[:, 0].double()
        inverted = data.domains[:, None, None] == 1
        return torch.where(inverted, (230 - pixels) * 16 / 140, pixels * 16 / 255).round()

    def as_multiset(levels: np.ndarray, labels: np.ndarray) -> list[tuple[bytes, int]]:
        return sorted(zip(map(bytes, levels.astype(np.uint8)), labels.tolist(), strict=True))

    train, test = load_dataset("digits", None, "train"), load_dataset("digits", None, "test")
    source = load_digits()
    recovered = torch.cat([grey_levels(train), grey_levels(test)]).numpy()
    labels = torch.cat([train.labels, test.labels]).numpy()
    assert as_multiset(recovered, labels) == as_multiset(source.images, source.target)


def test_digit_domains_have_very_different_statistics() -> None:
    train = load_dataset("digits", None, "train")
    original = train.images[train.domains == 0].float()
    inverted = train.images[train.domains == 1].float()
    assert inverted.mean() - original.mean() > 80
    assert original.std() > 1.5 * inverted.std()
    # Same strokes, inverted tone: the background corner is dark in one domain, light in the other.
    assert original[:, 0, 0, 0].max() == 0 and inverted[:, 0, 0, 0].min() == 230


def test_digits_resize() -> None:
    assert load_dataset("digits", None, image_size=16).images.shape[1:] == (1, 16, 16)


# --- argument checking and missing files --------------------------------------------------------


def test_unknown_name_split_and_image_size_list_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="cifar100"):
        load_dataset("cifar1000", None)
    with pytest.raises(ValueError, match="train, test"):
        load_dataset("digits", None, "val")
    with pytest.raises(ValueError, match="image_size"):
        load_dataset("digits", None, image_size=0)
    assert tuple(DATASETS) == (
        "digits",
        "mnist",
        "cifar10",
        "cifar100",
        "svhn",
        "tiny-imagenet",
        "oxford-pet",
        "image-folder",
    )


def test_missing_files_error_names_files_directory_and_url(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as caught:
        load_dataset("mnist", tmp_path / "mnist", "test")
    message = str(caught.value)
    assert str(tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz") in message
    assert str(tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz") in message
    assert "train-images" not in message  # only the files of the requested split
    assert "https://ossci-datasets.s3.amazonaws.com/mnist/t10k-images-idx3-ubyte.gz" in message
    assert "download=True" in message

    with pytest.raises(FileNotFoundError) as caught:
        load_dataset("cifar100", tmp_path)
    message = str(caught.value)
    assert str(tmp_path / "cifar-100-python" / "train") in message
    assert (
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz" in message
        and "extract it in" in message
    )


def test_default_root_follows_the_environment(private_data_root: Path) -> None:
    assert default_data_root() == private_data_root
    with pytest.raises(FileNotFoundError, match=re.escape(str(private_data_root / "svhn"))):
        load_dataset("svhn", None)


# --- download: checksum, atomic placement, extraction ---------------------------------------------


def make_archive(tmp_path: Path) -> tuple[Path, str]:
    source = tmp_path / "archive-source" / "bundle"
    source.mkdir(parents=True)
    (source / "payload.txt").write_text("content")
    archive = tmp_path / "bundle.tar.gz"
    with tarfile.open(archive, "w:gz") as bundle:
        bundle.add(source, arcname="bundle")
    return archive, hashlib.md5(archive.read_bytes()).hexdigest()


def test_download_verifies_checksum_and_extracts(tmp_path: Path) -> None:
    archive, md5 = make_archive(tmp_path)
    root = tmp_path / "root"
    remote = RemoteFile("bundle.tar.gz", (archive.as_uri(),), md5, unpacks_to=("bundle",))
    ensure_files("Bundle", root, ["bundle/payload.txt"], [remote], download=True, dataset_name="b")
    assert (root / "bundle" / "payload.txt").read_text() == "content"
    leftovers = sorted(path.name for path in root.iterdir())
    assert leftovers == ["bundle", "bundle.tar.gz"]  # no staging folder or temporary file

    corrupt = RemoteFile("other.tar.gz", (archive.as_uri(),), "0" * 32, unpacks_to=("bundle",))
    with pytest.raises(OSError, match="differs from the published"):
        fetch(corrupt, root)
    assert not (root / "other.tar.gz").exists()


def test_failed_download_still_explains_where_files_go(tmp_path: Path) -> None:
    remote = RemoteFile("data.bin", ((tmp_path / "absent.bin").as_uri(),), "0" * 32)
    with pytest.raises(FileNotFoundError, match="download failed") as caught:
        ensure_files(
            "Thing", tmp_path / "root", ["data.bin"], [remote], download=True, dataset_name="thing"
        )
    assert str(tmp_path / "root" / "data.bin") in str(caught.value)


# --- MNIST ----------------------------------------------------------------------------------------


def write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(size).to_bytes(4, "big") for size in array.shape
    )
    content = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(content) if compress else content)


@pytest.mark.parametrize("compress", [True, False])
def test_mnist_idx(tmp_path: Path, compress: bool) -> None:
    rng = np.random.default_rng(1)
    images, labels = random_pixels(rng, 5, 28, 28), np.array([3, 1, 4, 1, 5])
    suffix = ".gz" if compress else ""
    write_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}", images, compress)
    write_idx(tmp_path / f"t10k-labels-idx1-ubyte{suffix}", labels, compress)
    data = load_dataset("mnist", tmp_path, "test")
    assert data.images.shape == (5, 1, 28, 28) and data.images.dtype == torch.uint8
    assert torch.equal(data.images[:, 0], torch.from_numpy(images))
    assert data.labels.tolist() == [3, 1, 4, 1, 5] and data.labels.dtype == torch.int64
    assert load_dataset("mnist", tmp_path, "test", image_size=14).images.shape == (5, 1, 14, 14)


def test_mnist_rejects_a_truncated_file(tmp_path: Path) -> None:
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((5, 28, 28)), True)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(
        gzip.compress(gzip.decompress((tmp_path / "t10k-images-idx3-ubyte.gz").read_bytes())[:-10])
    )
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(5), True)
    with pytest.raises(ValueError, match="truncated"):
        load_dataset("mnist", tmp_path, "test")


@pytest.mark.skipif(
    not SHARED_MNIST.exists(), reason="the real MNIST files are not on this machine"
)
def test_real_mnist() -> None:
    data = load_dataset("mnist", SHARED_MNIST, "train")
    assert data.images.shape == (60000, 1, 28, 28)
    assert data.images.float().mean().item() / 255 == pytest.approx(0.1307, abs=5e-4)
    assert data.labels.bincount().tolist()[:2] == [5923, 6742]


# --- CIFAR ----------------------------------------------------------------------------------------


def dump_pickle(path: Path, content: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(content))


def test_cifar10_batches(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    folder = tmp_path / "cifar-10-batches-py"
    batches = {}
    for index, name in enumerate([*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]):
        batches[name] = {"data": random_pixels(rng, 2, 3072), "labels": [index % 10, 9]}
        dump_pickle(folder / name, batches[name])
    dump_pickle(
        folder / "batches.meta", {"label_names": ["airplane", *(f"c{i}" for i in range(1, 10))]}
    )

    train = load_dataset("cifar10", tmp_path, "train")
    assert train.images.shape == (10, 3, 32, 32) and train.classes[0] == "airplane"
    assert train.labels.tolist() == [0, 9, 1, 9, 2, 9, 3, 9, 4, 9]
    # Row layout: 1024 red values, then green, then blue.
    first = batches["data_batch_1"]["data"][0]
    assert torch.equal(train.images[0, 1, 0], torch.from_numpy(first[1024:1056]))
    test = load_dataset("cifar10", tmp_path, "test")
    assert len(test) == 2 and torch.equal(
        test.images.reshape(2, -1), torch.from_numpy(batches["test_batch"]["data"])
    )
    assert train.coarse_labels is None


def test_cifar100_fine_and_coarse_labels(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    folder = tmp_path / "cifar-100-python"
    for split, size in (("train", 4), ("test", 3)):
        dump_pickle(
            folder / split,
            {
                "data": random_pixels(rng, size, 3072),
                "fine_labels": list(range(size)),
                "coarse_labels": [*[0, 1, 19][: size - 1], 5],
            },
        )
    dump_pickle(
        folder / "meta",
        {
            "fine_label_names": [f"f{i}" for i in range(100)],
            "coarse_label_names": [f"s{i}" for i in range(20)],
        },
    )
    test = load_dataset("cifar100", tmp_path, "test")
    assert test.labels.tolist() == [0, 1, 2] and test.coarse_labels.tolist() == [0, 1, 5]
    assert test.num_classes == 100 and len(test.coarse_classes) == 20
    assert len(load_dataset("cifar100", tmp_path, "train")) == 4


# --- SVHN -----------------------------------------------------------------------------------------


def test_svhn_mat_maps_label_10_to_zero(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    images = random_pixels(rng, 3, 3, 32, 32)  # (N, C, H, W)
    scipy.io.savemat(
        tmp_path / "train_32x32.mat",
        {"X": images.transpose(2, 3, 1, 0), "y": np.array([[10], [1], [9]], dtype=np.uint8)},
    )
    data = load_dataset("svhn", tmp_path, "train")
    assert data.labels.tolist() == [0, 1, 9]
    assert torch.equal(data.images, torch.from_numpy(images))
    with pytest.raises(FileNotFoundError, match=r"test_32x32\.mat"):
        load_dataset("svhn", tmp_path, "test")


# --- Tiny ImageNet --------------------------------------------------------------------------------


def test_tiny_imagenet_train_and_val_as_test(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    folder = tmp_path / "tiny-imagenet-200"
    wnids = ["n02", "n01"]
    folder.mkdir()
    (folder / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (folder / "words.txt").write_text(
        "n01\tgoldfish, Carassius auratus\nn02\ttabby, tabby cat\nn03\tunused\n"
    )
    for wnid in wnids:
        for index in range(2):
            write_image(
                folder / "train" / wnid / "images" / f"{wnid}_{index}.JPEG",
                random_pixels(rng, 8, 8, 3),
            )
    write_image(folder / "val" / "images" / "val_0.JPEG", random_pixels(rng, 8, 8, 3))
    write_image(
        folder / "val" / "images" / "val_1.JPEG", random_pixels(rng, 8, 8)
    )  # some Tiny images are greyscale
    (folder / "val" / "val_annotations.txt").write_text(
        "val_0.JPEG\tn02\t0\t0\t8\t8\nval_1.JPEG\tn01\t0\t0\t8\t8\n"
    )

    train = load_dataset("tiny-imagenet", tmp_path, "train")
    assert train.classes == [
        "goldfish, Carassius auratus",
        "tabby, tabby cat",
    ]  # sorted wnids n01, n02
    assert train.images.shape == (4, 3, 8, 8) and train.labels.tolist() == [0, 0, 1, 1]
    test = load_dataset("tiny-imagenet", tmp_path, "test", image_size=4)
    assert test.images.shape == (2, 3, 4, 4) and test.labels.tolist() == [1, 0]
    assert torch.equal(test.images[1, 0], test.images[1, 2])  # greyscale converted to RGB


# --- Oxford-IIIT Pet ------------------------------------------------------------------------------


def test_oxford_pet_species_as_coarse_labels_and_resizing(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    trainval = [("Abyssinian_1", 1, 1), ("american_bulldog_10", 2, 2), ("Abyssinian_2", 1, 1)]
    test = [("american_bulldog_11", 2, 2), ("Abyssinian_3", 1, 1)]
    for index, (name, _, _) in enumerate(trainval + test):
        write_image(tmp_path / "images" / f"{name}.jpg", random_pixels(rng, 20 + 7 * index, 30, 3))
    annotations = tmp_path / "annotations"
    annotations.mkdir()
    for filename, entries in (("trainval.txt", trainval), ("test.txt", test)):
        (annotations / filename).write_text(
            "".join(f"{name} {cls} {species} 1\n" for name, cls, species in entries)
        )

    train = load_dataset("oxford-pet", tmp_path, "train")
    assert train.images.shape == (3, 3, 64, 64)  # photos of different sizes, default size 64
    assert train.classes == ["Abyssinian", "american_bulldog"]
    assert train.labels.tolist() == [0, 1, 0] and train.coarse_labels.tolist() == [0, 1, 0]
    assert train.coarse_classes == ["cat", "dog"]
    test_data = load_dataset("oxford-pet", tmp_path, "test", image_size=16)
    assert test_data.images.shape == (2, 3, 16, 16) and test_data.coarse_labels.tolist() == [1, 0]


# --- image folder and the decoded-image cache -----------------------------------------------------


def test_image_folder_with_split_subfolders(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    pixels = random_pixels(rng, 6, 6)
    write_image(tmp_path / "train" / "cat" / "a.png", pixels)
    write_image(tmp_path / "train" / "dog" / "b.PNG", random_pixels(rng, 6, 6))
    (tmp_path / "train" / "dog" / "readme.txt").write_text("not an image")
    write_image(tmp_path / "test" / "dog" / "c.png", random_pixels(rng, 6, 6))
    (tmp_path / "train" / ".cache").mkdir()
    train = load_dataset("image-folder", tmp_path, "train")
    assert train.classes == ["cat", "dog"] and train.labels.tolist() == [0, 1]
    assert train.images.shape == (2, 1, 6, 6)  # all greyscale: one channel
    assert torch.equal(train.images[0, 0], torch.from_numpy(pixels))
    test = load_dataset("image-folder", tmp_path, "test")
    assert test.classes == ["cat", "dog"] and test.labels.tolist() == [1]  # labels agree with train


def test_image_folder_flat_mixed_colour_and_sizes(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    write_image(tmp_path / "a" / "1.png", random_pixels(rng, 5, 5))
    write_image(tmp_path / "b" / "2.jpg", random_pixels(rng, 5, 7, 3))
    with pytest.raises(ValueError, match="image_size"):
        load_dataset("image-folder", tmp_path)
    data = load_dataset("image-folder", tmp_path, image_size=4)
    assert data.images.shape == (
        2,
        3,
        4,
        4,
    )  # greyscale repeated to RGB because one image has colour
    assert torch.equal(data.images[0, 0], data.images[0, 1])
    with pytest.raises(ValueError, match="holds a training split only; put the images in"):
        load_dataset("image-folder", tmp_path, "test")
    with pytest.raises(ValueError, match="needs root"):
        load_dataset("image-folder", None)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset("image-folder", tmp_path / "absent")


def test_decoded_images_are_cached_and_refreshed_when_files_change(
    tmp_path: Path, private_data_root: Path
) -> None:
    rng = np.random.default_rng(9)
    write_image(tmp_path / "x" / "1.png", random_pixels(rng, 4, 4))
    first = load_dataset("image-folder", tmp_path)
    cached = list((private_data_root / "decoded").glob("image-folder-train-*.pt"))
    assert len(cached) == 1
    assert torch.equal(load_dataset("image-folder", tmp_path).images, first.images)
    assert len(list((private_data_root / "decoded").iterdir())) == 1  # the second load reused it

    replacement = random_pixels(rng, 4, 4, 3)
    write_image(tmp_path / "x" / "1.png", replacement)  # an RGB PNG: a different byte size
    assert torch.equal(
        load_dataset("image-folder", tmp_path).images[0],
        torch.from_numpy(replacement).permute(2, 0, 1),
    )


def test_the_cache_keeps_under_its_limit_dropping_the_least_recently_used(
    tmp_path: Path, private_data_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(10)
    for name in ("a", "b", "c"):
        write_image(tmp_path / name / "x" / "1.png", random_pixels(rng, 64, 64, 3))
    # Each decoded set takes 3 x 64 x 64 bytes and a file header; room for two of them.
    monkeypatch.setenv("CONTEXTNORM_CACHE_GB", str(2.5 * 3 * 64 * 64 / 1024**3))
    load_dataset("image-folder", tmp_path / "a")
    load_dataset("image-folder", tmp_path / "b")
    first, second = cache_entries()
    # Using the first set again makes the second the least recently used one.
    os.utime(second.path, (first.last_used - 10, first.last_used - 10))
    load_dataset("image-folder", tmp_path / "a")
    load_dataset("image-folder", tmp_path / "c")
    kept = {entry.path for entry in cache_entries()}
    assert len(kept) == 2 and first.path in kept and second.path not in kept
    assert cache_folder() == private_data_root / "decoded"

    monkeypatch.setenv("CONTEXTNORM_CACHE_GB", "0")
    load_dataset("image-folder", tmp_path / "b")  # larger than the limit: decoded, not cached
    assert {entry.path for entry in cache_entries()} == kept
    assert len(clear_cache()) == 2 and cache_entries() == []


def test_cache_command_shows_the_folder_and_clears_it(
    tmp_path: Path, private_data_root: Path, capsys: pytest.CaptureFixture
) -> None:
    write_image(tmp_path / "x" / "1.png", random_pixels(np.random.default_rng(11), 4, 4))
    load_dataset("image-folder", tmp_path)
    assert main(["cache"]) == 0
    output = capsys.readouterr().out
    assert str(private_data_root / "decoded") in output and "holds 1 file(s)" in output
    assert main(["cache", "--clear"]) == 0
    assert "deleted 1 file(s)" in capsys.readouterr().out
    assert cache_entries() == []


def write_domain_folder(root: Path, rng: np.random.Generator) -> list[tuple[str, str]]:
    """train/ and test/ with two classes; each image's domain ("bright" or "dark") in a CSV."""
    rows = []
    for split in ("train", "test"):
        for label in ("cat", "dog"):
            for index in range(3):
                domain = "dark" if index % 2 else "bright"
                relative = f"{split}/{label}/{index}.png"
                write_image(root / relative, random_pixels(rng, 4, 4))
                rows.append((relative, domain))
    return rows


def test_image_folder_domains_from_a_csv_file(tmp_path: Path) -> None:
    rows = write_domain_folder(tmp_path, np.random.default_rng(12))
    table = "Path,Domain\n" + "".join(f"{path},{domain}\n" for path, domain in reversed(rows))
    (tmp_path / "domains.csv").write_text(table)
    train = load_dataset("image-folder", tmp_path, "train", domains="domains.csv")
    assert train.domain_names == ["bright", "dark"]
    assert train.domains.tolist() == [0, 1, 0, 0, 1, 0]
    test = load_dataset("image-folder", tmp_path, "test", domains=str(tmp_path / "domains.csv"))
    assert test.domain_names == train.domain_names and len(test.domains) == 6

    (tmp_path / "ids.csv").write_text(
        "path,context\n" + "".join(f"{path},{int(domain == 'dark')}\n" for path, domain in rows)
    )
    with_ids = load_dataset("image-folder", tmp_path, "train", domains="ids.csv")
    assert with_ids.domain_names == ["domain 0", "domain 1"]
    assert torch.equal(with_ids.domains, train.domains)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ("file,domain\ntrain/cat/0.png,a\n", "header row naming a 'path' column"),
        (
            "path,domain\ntrain/cat/0.png,a\n",
            r"no domain for 5 of the 6 images, e.g. \['train/cat/1",
        ),
        ("path,domain\ntrain/cat/0.png,\n", "line 2: the path or the domain is empty"),
    ],
)
def test_image_folder_domains_file_mistakes_are_named(
    tmp_path: Path, table: str, message: str
) -> None:
    write_domain_folder(tmp_path / "images", np.random.default_rng(13))
    (tmp_path / "images" / "domains.csv").write_text(table)
    with pytest.raises(ValueError, match=message):
        load_dataset("image-folder", tmp_path / "images", domains="domains.csv")
    with pytest.raises(FileNotFoundError, match="domains file .* does not exist"):
        load_dataset("image-folder", tmp_path / "images", domains="absent.csv")
    with pytest.raises(ValueError, match="has no option 'domain'; its options: domains"):
        load_dataset("image-folder", tmp_path / "images", domain="domains.csv")
