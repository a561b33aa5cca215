"""The CIFAR-10 binary archive: MD5 lists, reading and verifying the six batch files, parsing their records.

Runs on the host, once, when the dataset is prepared (tfds_cifar10.py).
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from jaxcifar.errors import DataError, first_line

CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
TEST_FILES = ("test_batch.bin",)
ARCHIVE_PREFIX = "cifar-10-batches-bin"
IMAGE_SHAPE = (32, 32, 3)  # height, width, channels (RGB), as the arrays hold them
# The published MD5 sums of the official binary batches.
OFFICIAL_MD5 = {
    "data_batch_1.bin": "5dd7e06a14cb22eb9f671a540d1b7c25",
    "data_batch_2.bin": "5ea93a67294ea407fff1d09f752e9692",
    "data_batch_3.bin": "942cd6a4bcdd0dd3c604fbe906cb4421",
    "data_batch_4.bin": "ae636b3ba5c66a11e91e8cb52e771fcb",
    "data_batch_5.bin": "53f37980c15c3d472c316c40844f3f0d",
    "test_batch.bin": "803d5f7f4d78ea53de84dbe85f74fb6d",
}
RECORD_BYTES = 1 + 32 * 32 * 3


MD5_FILE_LIMIT = 1 << 16  # bytes: an MD5 list of the six batches is ~300


def read_md5_file(path: str | os.PathLike) -> dict[str, str]:
    """`md5sum`-style lines (`<md5>  <name>`) -> {name: md5}."""
    sums = {}
    path = Path(path)
    try:
        if path.exists():  # a missing one is read_text's OSError below
            if not path.is_file():  # /dev/zero was read whole: 6 GB in 8 s
                raise DataError(f"MD5 file {path} is not a regular file (a folder, a device or a pipe?); give the list "
                                "of the batch files' MD5s, as `md5sum` writes it")
            size = path.stat().st_size
            if size > MD5_FILE_LIMIT:
                raise DataError(f"MD5 file {path} is {size:,} bytes, too large for a list of MD5s (an archive?); give "
                                "the list of the batch files' MD5s, as `md5sum` writes it")
        text = path.read_text()
    except OSError as e:
        raise DataError(f"cannot read MD5 file {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise DataError(f"{path} is not an MD5 list (it is not text: the archive itself?); give the list of the batch "
                        "files' MD5s, one '<32 hex digits>  <file name>' line each, as `md5sum` writes them") from None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split(maxsplit=1)
        digest = fields[0].lower()
        if len(fields) != 2 or len(digest) != 32 or any(c not in "0123456789abcdef" for c in digest):
            raise DataError(f"{path}, line {number}: {line.strip()[:80]!r} is not '<32 hex digits>  <file name>' "
                            "(the format `md5sum` writes); fix or remove that line")
        name = Path(fields[1].strip().lstrip("*")).name
        if sums.get(name, digest) != digest:
            raise DataError(f"{path}, line {number}: a second MD5 for {name} ({digest}; an earlier line says "
                            f"{sums[name]}); keep the one line that is right")
        sums[name] = digest
    if not sums:
        raise DataError(f"MD5 file {path} lists no files; it needs a line per batch file, as `md5sum` writes them")
    return sums


def read_archive(path: str | os.PathLike, md5s: Mapping[str, str] = OFFICIAL_MD5) -> dict[str, bytes]:
    """Reads the six batch files from a `.tar.gz` or an extracted folder and verifies their MD5s."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"archive {path} does not exist; pass the path of cifar-10-binary.tar.gz")
    if not (path.is_dir() or path.is_file()):  # /dev/zero was read without end, a pipe waited forever
        raise DataError(f"archive {path} is not a regular file (a device or a pipe?); pass the path of "
                        "cifar-10-binary.tar.gz")
    if path.is_dir():
        members = _read_folder(path)
    else:
        members = _read_tarball(path)
    for name in TRAIN_FILES + TEST_FILES:
        if name not in members:
            raise DataError(f"{path} has no member {ARCHIVE_PREFIX}/{name}; it is not a complete cifar-10-binary archive")
        got = hashlib.md5(members[name]).hexdigest()
        want = md5s.get(name)
        if want is None:
            raise DataError(f"no expected MD5 for {name}; the MD5 list must name all six batch files")
        if got != want:
            raise DataError(
                f"{name} in {path} has MD5 {got}, expected {want}: the archive is corrupt or not the official one; "
                "download cifar-10-binary.tar.gz again"
            )
        if len(members[name]) % RECORD_BYTES:
            raise DataError(f"{name} in {path} is {len(members[name])} bytes, not a whole number of 3073-byte records")
    return members


def _read_folder(path: Path) -> dict[str, bytes]:
    folder = path / ARCHIVE_PREFIX if (path / ARCHIVE_PREFIX).is_dir() else path
    members = {}
    for name in TRAIN_FILES + TEST_FILES + ("batches.meta.txt",):
        f = folder / name
        if f.is_file():
            try:
                members[name] = f.read_bytes()
            except OSError as e:
                raise DataError(f"cannot read {f}: {e.strerror}") from None
    return members


def _read_tarball(path: Path) -> dict[str, bytes]:
    wanted = set(TRAIN_FILES + TEST_FILES + ("batches.meta.txt",))
    members = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for info in tar:
                name = Path(info.name).name
                if info.isfile() and name in wanted:
                    members[name] = tar.extractfile(info).read()
    except PermissionError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        reason = first_line(e).rstrip(":")  # tarfile lists every method it tried, one a line
        raise DataError(f"{path} is truncated or not a valid tar.gz ({reason}); download cifar-10-binary.tar.gz "
                        "again") from None
    return members


def parse_batches(blobs: Iterable[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Binary records -> (uint8 images (N, 32, 32, 3) RGB, int64 labels)."""
    records = np.concatenate([np.frombuffer(b, np.uint8).reshape(-1, RECORD_BYTES) for b in blobs])
    labels = records[:, 0].astype(np.int64)
    images = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    if labels.size and labels.max() >= len(CLASS_NAMES):
        raise DataError(f"label {labels.max()} out of range 0-9: the batch files are not CIFAR-10")
    return np.ascontiguousarray(images), labels


def md5s_of(members: Mapping[str, bytes]) -> dict[str, str]:
    return {f: hashlib.md5(members[f]).hexdigest() for f in TRAIN_FILES + TEST_FILES}
