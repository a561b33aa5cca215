"""tfds's `cifar10`, prepared from the archive (or tfds's download) without TensorFlow, checked, and read back.

TFDS_DATA_DIR/cifar10/3.0.2 holds array_record files, read with `tfds.data_source`, and a record of the
archive they came from (SOURCE_FILE). Runs on the host at preparation time.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import hashlib
import io
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Mapping

import numpy as np

from jaxcifar.data import parallel
from jaxcifar.data.archive import CLASS_NAMES, OFFICIAL_MD5, TEST_FILES, TRAIN_FILES, md5s_of, parse_batches, read_archive
from jaxcifar.errors import DataError, disk_failure_cause, first_line, os_error_fix

DOWNLOAD_HOST = ("www.cs.toronto.edu", 443)
DOWNLOAD_PROBE_TIMEOUT_S = 5.0
OFFICIAL_SIZES = {"train": 50_000, "test": 10_000}
# Written beside tfds's files when jaxcifar prepares them: the MD5s of the batch files they came from.
SOURCE_FILE = "jaxcifar_source.json"


@functools.lru_cache(maxsize=None)
def _builder_class():
    """tfds's catalog `cifar10` builder, able to read a local archive and prepare without TensorFlow."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.image_classification import cifar

    class Cifar10(cifar.Cifar10, skip_registration=True):
        # Same name, version and features as the catalog builder, so `tfds.data_source("cifar10")` reads it.
        name = "cifar10"

        def __init__(self, *, archive_members: Mapping[str, bytes] | None = None, md5s=OFFICIAL_MD5, **kwargs):
            self._archive_members = archive_members
            self._md5s = md5s
            super().__init__(**kwargs)

        def _info(self):
            info = super()._info()
            # tfds fills an unprepared builder's info from its GCS bucket, which this tfds keeps switched off; the
            # call still makes an empty temp folder and never removes it (3 a preparation, thousands in a test run).
            info.initialize_from_bucket = lambda: None
            return info

        @tfds.core.utils.classproperty
        @classmethod
        def _checksums_path(cls):
            return cifar.Cifar10._checksums_path  # the catalog's recorded download checksum

        def _split_generators(self, dl_manager):
            members = self._archive_members
            if members is None:  # online: tfds downloads and checks the official archive
                members = read_archive(dl_manager.download_and_extract(self._cifar_info.url), self._md5s)
            self.source_md5s = md5s_of(members)
            names = members.get("batches.meta.txt", b"").decode().split()
            self.info.features["label"].names = names if len(names) == 10 else list(CLASS_NAMES)
            return {
                "train": self._generate_examples("train_", [members[f] for f in TRAIN_FILES]),
                "test": self._generate_examples("test_", [members[f] for f in TEST_FILES]),
            }

        def _generate_examples(self, split_prefix, blobs):
            images, labels = parse_batches(blobs)
            # PNG encoding was 16 of a preparation's 26 s on one core; chunks of it run on every core (the same
            # bytes: each image is encoded alone).
            chunks = parallel.map_ordered(lambda span: [_png_bytes(image) for image in images[span]],
                                          parallel.spans(len(images), 1024))
            pngs = [png for chunk in chunks for png in chunk]
            for index, (png, label) in enumerate(zip(pngs, labels)):
                yield index, {"id": f"{split_prefix}{index:05d}", "image": png, "label": int(label)}

    return Cifar10


def _png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    png = io.BytesIO()
    Image.fromarray(image).save(png, format="PNG")
    return png.getvalue()


def default_data_dir() -> str:
    return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


def _quiet_tfds():
    from absl import logging

    # tfds warns of what a user cannot act on: no OpenCV (Pillow decodes these 32x32 PNGs), and a variant folder
    # without dataset_info.json (every first preparation). Its errors still show.
    logging.set_verbosity(logging.ERROR)


def builder(data_dir: str | None = None, **kwargs):
    _quiet_tfds()
    return _builder_class()(data_dir=data_dir or default_data_dir(), file_format="array_record", **kwargs)


def _can_download() -> bool:
    """Whether the download host answers within the probe timeout (DNS included, hence the thread)."""

    def probe():
        with socket.create_connection(DOWNLOAD_HOST, timeout=DOWNLOAD_PROBE_TIMEOUT_S):
            return True

    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        return pool.submit(probe).result(timeout=DOWNLOAD_PROBE_TIMEOUT_S)
    except (OSError, concurrent.futures.TimeoutError):
        return False
    finally:
        pool.shutdown(wait=False)


def prepare(data_dir: str | None = None, archive: str | None = None, md5s: Mapping[str, str] | None = OFFICIAL_MD5,
            log=print):
    """Makes sure tfds's `cifar10` is prepared in `data_dir` and is the dataset `md5s` describe; returns the builder.

    A given `archive` is always read and verified, prepared or not, and must be the one the
    prepared files came from. `md5s=None` accepts whatever is prepared (readers of a finished run).
    One process prepares a folder at a time; another one waits for it, then uses what it prepared.
    """
    b = builder(data_dir)
    members = read_archive(archive, md5s or OFFICIAL_MD5) if archive else None
    if not b.is_prepared():
        with _preparing(Path(b.data_dir).parent, log):
            b = builder(data_dir)  # another process may have prepared it meanwhile
            if not b.is_prepared():
                _remove_incomplete(Path(b.data_dir).parent, log)
                _prepare_from(b, data_dir, archive, members, md5s, log)
                return builder(data_dir)
    source = prepared_source(b)
    if members is not None and source is not None and source["md5"] != md5s_of(members):
        raise DataError(f"{b.data_dir} already holds a dataset prepared from another archive than {archive}; "
                        "give another --data-dir (--config.data.data_dir), or delete that folder to prepare this one")
    check_prepared(b, md5s, source)
    return b


def _prepare_from(b, data_dir, archive, members, md5s, log) -> None:
    if members is not None:
        b = builder(data_dir, archive_members=members, md5s=md5s or OFFICIAL_MD5)
    elif not _can_download():
        raise DataError(
            f"CIFAR-10 is not prepared in {b.data_dir} and {DOWNLOAD_HOST[0]} cannot be reached: supply the archive with "
            "`python -m jaxcifar.prepare --archive /path/to/cifar-10-binary.tar.gz` "
            "(or --config.data.archive=PATH when training)"
        )
    # tfds writes to a temporary folder and renames it when complete: no partial dataset survives a failure.
    try:
        if members is not None:
            log(f"preparing CIFAR-10 in {b.data_dir} from {archive} (once; about half a minute for the real set)")
            _prepare_quietly(b)  # tfds's "Downloading ... Unknown size" and its bars say nothing true offline
        else:
            b.download_and_prepare(file_format="array_record")
        source = {"md5": b.source_md5s, "official": b.source_md5s == OFFICIAL_MD5}
        (Path(b.data_dir) / SOURCE_FILE).write_text(json.dumps(source, indent=1))
    except Exception as e:  # noqa: BLE001 - tfds and array_record wrap the OSError of a full or read-only disk
        cause = disk_failure_cause(e)
        if cause is None:
            raise
        shutil.rmtree(b.data_dir, ignore_errors=True)  # a half-written dataset would be taken as prepared
        fix = "free space" if cause == "no space left on device" else os_error_fix(e)
        raise DataError(f"cannot prepare CIFAR-10 in {b.data_dir}: {cause}; {fix}, or give another "
                        "--data-dir (TFDS_DATA_DIR)") from None


@contextlib.contextmanager
def _preparing(dataset_folder: Path, log):
    """Holds the dataset folder's preparation lock (an OS file lock, released if its process dies); says so
    when it has to wait for another process."""
    import fcntl

    try:
        dataset_folder.mkdir(parents=True, exist_ok=True)
        lock = open(dataset_folder / ".jaxcifar-prepare.lock", "a")
    except OSError as e:
        raise DataError(f"cannot prepare CIFAR-10 in {dataset_folder}: {e.strerror or e}; make the folder writable "
                        "or give another --data-dir (TFDS_DATA_DIR)") from None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"another process is preparing CIFAR-10 in {dataset_folder}; waiting for it")
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _remove_incomplete(dataset_folder: Path, log) -> None:
    """Removes what a preparation killed before its end left (tfds's incomplete.* folders); only called with the
    preparation lock held, so no living process is writing them."""
    for leftover in sorted(dataset_folder.glob("incomplete.*")):
        shutil.rmtree(leftover, ignore_errors=True)
        log(f"removed {leftover}, left by a preparation that was stopped before its end")


def _prepare_quietly(b) -> None:
    import contextlib
    import io

    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            b.download_and_prepare(file_format="array_record")
    finally:
        tfds.enable_progress_bar()


def prepared_source(b) -> dict | None:
    """The record of the archive a prepared dataset came from; None when tfds (or an old jaxcifar) prepared it."""
    path = Path(b.data_dir) / SOURCE_FILE
    if not path.exists():
        return None
    try:
        source = json.loads(path.read_text())
        if not isinstance(source.get("md5"), dict):
            raise ValueError("no md5 table")
        return source
    except (OSError, ValueError, AttributeError) as e:
        raise DataError(f"{path} is damaged ({e}); delete {b.data_dir} and prepare the dataset again") from None


def split_sizes(b) -> dict[str, int]:
    return {split: int(b.info.splits[split].num_examples) for split in ("train", "test")}


def check_prepared(b, md5s: Mapping[str, str] | None, source: dict | None) -> None:
    """Raises DataError when the prepared dataset (its `prepared_source` record: `source`) is not the one `md5s`
    describe (None: any)."""
    if md5s is None:
        return
    sizes = split_sizes(b)
    want = {f: md5s.get(f) for f in TRAIN_FILES + TEST_FILES}
    official = want == OFFICIAL_MD5
    if source is None:  # prepared by tfds itself: its sizes are all there is to check
        if official and sizes != OFFICIAL_SIZES:
            raise DataError(f"{b.data_dir} holds a cifar10 of {sizes['train']:,} train / {sizes['test']:,} test images, "
                            "not CIFAR-10's 50,000 / 10,000; delete it and prepare the official archive, or give "
                            "another --data-dir (--config.data.data_dir)")
        return
    if source["md5"] != want:
        what = "the official CIFAR-10 archive" if official else "the archive the given MD5 list describes"
        raise DataError(
            f"{b.data_dir} holds a dataset prepared from another archive than {what} ({describe(b)}); give another "
            "--data-dir (--config.data.data_dir), or delete that folder and prepare the right archive there")


def describe(b) -> str:
    """The prepared dataset in words: official CIFAR-10, or a set from another archive, with its sizes."""
    source, sizes = prepared_source(b), split_sizes(b)
    counts = f"{sizes['train']:,} train / {sizes['test']:,} test images"
    if source is None:
        return f"cifar10 prepared by tfds, {counts}"
    if source.get("official"):
        return f"official CIFAR-10, {counts}"
    return f"NOT the official CIFAR-10: a set prepared from another archive (MD5 list given), {counts}"


def load_uint8(data_dir: str | None = None) -> dict[str, np.ndarray]:
    """Reads the prepared splits back with `tfds.data_source` (no TensorFlow); DataError if their files are damaged."""
    import tensorflow_datasets as tfds

    _quiet_tfds()
    out = {}
    for split in ("train", "test"):
        try:
            source = tfds.data_source("cifar10", split=split, data_dir=data_dir or default_data_dir(), download=False)
            # Serial: tfds decodes under the GIL; read in threads, it took 14.4 s against 11.2 s (2-core Xeon).
            records = source.__getitems__(list(range(len(source))))
        except (RuntimeError, OSError, ValueError) as e:  # array_record: "Corrupted Riegeli/records file: ..."
            folder = builder(data_dir).data_dir
            raise DamagedDataset(
                f"the prepared dataset in {folder} is damaged ({split} split: {first_line(e)}); prepare it again with "
                "`python -m jaxcifar.prepare --force --archive /path/to/cifar-10-binary.tar.gz` (the damaged "
                "files are moved aside, not deleted), or train with --config.data.archive=PATH, which does it") from None
        out[f"{split}_images"] = np.stack([r["image"] for r in records]).astype(np.uint8)
        out[f"{split}_labels"] = np.array([r["label"] for r in records], dtype=np.int32)
    return out


class DamagedDataset(DataError):
    """The prepared tfds files fail to read back."""


def set_aside_prepared(b) -> Path:
    """Moves a prepared dataset's folder out of tfds's way (kept, not deleted); returns where it went."""
    folder = Path(b.data_dir)
    parent = folder.parent.parent / f"{folder.parent.name}-set-aside"
    parent.mkdir(parents=True, exist_ok=True)
    aside = Path(tempfile.mkdtemp(prefix=f"{folder.name}-{time.strftime('%Y%m%d-%H%M%S')}-", dir=parent))
    os.replace(folder, aside)  # onto the empty folder just made: a unique name, taken atomically
    return aside


def dataset_fingerprint(b) -> str:
    """SHA-256 over the prepared tfds files: changes whenever the dataset does."""
    h = hashlib.sha256()
    for f in sorted(Path(b.data_dir).iterdir()):
        if f.is_file() and "array_record" in f.name:
            h.update(f.name.encode())
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 22), b""):
                    h.update(chunk)
    return h.hexdigest()
