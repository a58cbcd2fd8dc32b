"""Where data files live, how missing ones are reported, and how published archives are fetched."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tarfile
import tempfile
import urllib.request
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from contextnorm.io import atomic_write

log = logging.getLogger(__name__)

DATA_ROOT_VARIABLE = "CONTEXTNORM_DATA"
_CHUNK_BYTES = 1 << 20
_DOWNLOAD_TIMEOUT_S = 60


def default_data_root() -> Path:
    """The data directory used when none is given.

    ``$CONTEXTNORM_DATA`` when set, else ``~/.cache/contextnorm/data``.
    """
    configured = os.environ.get(DATA_ROOT_VARIABLE)
    return (
        Path(configured).expanduser()
        if configured
        else Path.home() / ".cache" / "contextnorm" / "data"
    )


class MissingFilesError(FileNotFoundError):
    """Data files are missing.

    Attributes:
        details: which files are missing, where they go and where to get them.
        advice: how to fetch them from where the data set was loaded (a call or a config key).
    """

    def __init__(self, details: str, advice: str) -> None:
        super().__init__(f"{details}\n{advice}" if advice else details)
        self.details = details
        self.advice = advice


@dataclass(frozen=True)
class RemoteFile:
    """A file as its authors publish it.

    Attributes:
        filename: name of the downloaded file in the data set's directory.
        urls: the official address first, then mirrors.
        md5: the published MD5 checksum of the file.
        unpacks_to: top-level entries an archive creates when extracted; empty for a file
            that is read as downloaded.
    """

    filename: str
    urls: tuple[str, ...]
    md5: str
    unpacks_to: tuple[str, ...] = ()

    @property
    def provides(self) -> tuple[str, ...]:
        """The top-level entries of the data set's directory that this file supplies."""
        return self.unpacks_to or (self.filename,)


def existing_variant(path: Path) -> Path | None:
    """``path`` if it exists; for ``*.gz`` also the decompressed file (the IDX readme allows it)."""
    if path.exists():
        return path
    if path.suffix == ".gz" and path.with_suffix("").exists():
        return path.with_suffix("")
    return None


def ensure_files(
    title: str,
    root: Path,
    required: Sequence[str],
    remote_files: Sequence[RemoteFile],
    *,
    download: bool,
    dataset_name: str,
) -> None:
    """Make sure every path in ``required`` (relative to ``root``) exists, downloading if allowed.

    Raises:
        MissingFilesError: files are missing and could not be downloaded; the message names each
            missing path, the file to fetch, where it goes, and its URL.
    """
    missing = _missing(root, required)
    if not missing:
        return
    needed = [
        remote
        for remote in remote_files
        if any(Path(path).parts[0] in remote.provides for path in missing)
    ]
    failure = ""
    if download:
        try:
            for remote in needed:
                fetch(remote, root)
        except OSError as error:
            failure = f"\nThe download failed: {error}"
        missing = _missing(root, required)
        if not missing:
            return
        if not failure:
            failure = "\nThe downloaded archives did not contain these paths."
    lines = [f"{title} not found in {root}. Missing:"]
    lines += [
        f"  {root / path}" + (" (or its decompressed form)" if path.endswith(".gz") else "")
        for path in missing
    ]
    lines.append("Get the official files and place them as follows:")
    for remote in needed:
        action = (
            f"extract it in {root}/ (it creates {', '.join(remote.unpacks_to)})"
            if remote.unpacks_to
            else f"put it in {root}/"
        )
        lines.append(f"  {remote.urls[0]} (md5 {remote.md5}): {action}")
    advice = (
        ""
        if download
        else f"Or call load_dataset({dataset_name!r}, root={str(root)!r}, download=True) where "
        "a network is available."
    )
    raise MissingFilesError("\n".join(lines) + failure, advice)


def _missing(root: Path, required: Sequence[str]) -> list[str]:
    return [path for path in required if existing_variant(root / path) is None]


def fetch(remote: RemoteFile, root: Path) -> None:
    """Download ``remote`` into ``root`` unless a verified copy is there; unpack an archive.

    Raises:
        OSError: every URL failed or gave a file whose MD5 differs from the published one.
    """
    root.mkdir(parents=True, exist_ok=True)
    target = root / remote.filename
    if not (target.exists() and _md5(target) == remote.md5):
        errors = []
        for url in remote.urls:
            try:
                _download(url, target, remote.md5)
                break
            except OSError as error:
                errors.append(f"{url}: {error}")
        else:
            raise OSError("; ".join(errors))
    if remote.unpacks_to:
        _unpack(target, root, remote.unpacks_to)


def _download(url: str, target: Path, md5: str) -> None:
    log.info("downloading %s", url)

    def write(temporary: Path) -> None:
        digest = hashlib.md5(usedforsecurity=False)
        with (
            urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as response,
            temporary.open("wb") as out,
        ):
            while chunk := response.read(_CHUNK_BYTES):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != md5:
            raise OSError(f"MD5 {digest.hexdigest()} differs from the published {md5}")

    atomic_write(target, write)


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as stream:
        while chunk := stream.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _unpack(archive: Path, root: Path, entries: Sequence[str]) -> None:
    """Extract into a staging folder in ``root``, then move the entries in.

    An interrupted extraction thus never leaves a half-written data folder behind.
    """
    log.info("extracting %s", archive)
    staging = Path(tempfile.mkdtemp(prefix=".extract-", dir=root))
    try:
        if archive.suffix == ".zip":
            with zipfile.ZipFile(archive) as bundle:
                bundle.extractall(staging)
        else:
            with tarfile.open(archive) as bundle:
                bundle.extractall(staging, filter="data")
        for entry in entries:
            if not (staging / entry).exists():
                raise OSError(f"{archive.name} has no top-level entry {entry!r}")
            _move_into(staging / entry, root / entry)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _move_into(source: Path, destination: Path) -> None:
    """Move ``source`` to ``destination``, merging folders; files already there are kept."""
    if not destination.exists():
        os.replace(source, destination)
    elif source.is_dir() and destination.is_dir():
        for child in source.iterdir():
            _move_into(child, destination / child.name)
