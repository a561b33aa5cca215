"""CIFAR-10 through tfds, the preprocessed cache, and device-resident batches.

archive --(md5-verified, tfds builder)--> TFDS_DATA_DIR/cifar10/3.0.2 (array_record)
        --tfds.data_source--> uint8 arrays --preprocess--> cache (npy + manifest)
        --device_put once--> per-epoch permutation, gather and flips inside jit.

`python -m jaxcifar.data prepare --archive PATH` prepares the dataset offline.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import hashlib
import io
import json
import os
import shutil
import socket
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Iterable, Mapping, NamedTuple

import numpy as np

from jaxcifar import preprocess
from jaxcifar.errors import DataError, JaxcifarError, first_line

CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
TEST_FILES = ("test_batch.bin",)
ARCHIVE_PREFIX = "cifar-10-batches-bin"
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
DOWNLOAD_HOST = ("www.cs.toronto.edu", 443)
DOWNLOAD_PROBE_TIMEOUT_S = 5.0
CACHE_FORMAT_VERSION = 1
OFFICIAL_SIZES = {"train": 50_000, "test": 10_000}
# Written beside tfds's files when jaxcifar prepares them: the MD5s of the batch files they came from.
SOURCE_FILE = "jaxcifar_source.json"

__all__ = ["DataError", "CLASS_NAMES", "OFFICIAL_MD5", "prepare", "load_preprocessed", "read_archive", "read_md5_file"]


# ---------------------------------------------------------------------------
# Reading and verifying the archive


def read_md5_file(path: str | os.PathLike) -> dict[str, str]:
    """`md5sum`-style lines (`<md5>  <name>`) -> {name: md5}."""
    sums = {}
    try:
        text = Path(path).read_text()
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
        sums[Path(fields[1].strip().lstrip("*")).name] = digest
    if not sums:
        raise DataError(f"MD5 file {path} lists no files; it needs a line per batch file, as `md5sum` writes them")
    return sums


def read_archive(path: str | os.PathLike, md5s: Mapping[str, str] = OFFICIAL_MD5) -> dict[str, bytes]:
    """Reads the six batch files from a `.tar.gz` or an extracted folder and verifies their MD5s."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"archive {path} does not exist; pass the path of cifar-10-binary.tar.gz")
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


# ---------------------------------------------------------------------------
# The tfds dataset


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

        @tfds.core.utils.classproperty
        @classmethod
        def _checksums_path(cls):
            return cifar.Cifar10._checksums_path  # the catalog's recorded download checksum

        def _split_generators(self, dl_manager):
            members = self._archive_members
            if members is None:  # online: tfds downloads and checks the official archive
                members = read_archive(dl_manager.download_and_extract(self._cifar_info.url), self._md5s)
            self.source_md5s = _md5s_of(members)
            names = members.get("batches.meta.txt", b"").decode().split()
            self.info.features["label"].names = names if len(names) == 10 else list(CLASS_NAMES)
            return {
                "train": self._generate_examples("train_", [members[f] for f in TRAIN_FILES]),
                "test": self._generate_examples("test_", [members[f] for f in TEST_FILES]),
            }

        def _generate_examples(self, split_prefix, blobs):
            from PIL import Image

            images, labels = parse_batches(blobs)
            for index, (image, label) in enumerate(zip(images, labels)):
                png = io.BytesIO()
                Image.fromarray(image).save(png, format="PNG")
                yield index, {"id": f"{split_prefix}{index:05d}", "image": png.getvalue(), "label": int(label)}

    return Cifar10


def default_data_dir() -> str:
    return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


def _quiet_tfds():
    from absl import logging

    logging.set_verbosity(logging.WARNING)


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


def prepare(data_dir: str | None = None, archive: str | None = None, md5s: Mapping[str, str] | None = OFFICIAL_MD5):
    """Makes sure tfds's `cifar10` is prepared in `data_dir` and is the dataset `md5s` describe; returns the builder.

    A given `archive` is always read and verified, prepared or not, and must be the one the
    prepared files came from. `md5s=None` accepts whatever is prepared (readers of a finished run).
    """
    b = builder(data_dir)
    members = read_archive(archive, md5s or OFFICIAL_MD5) if archive else None
    if b.is_prepared():
        source = prepared_source(b)
        if members is not None and source is not None and source["md5"] != _md5s_of(members):
            raise DataError(f"{b.data_dir} already holds a dataset prepared from another archive than {archive}; "
                            "give another --data-dir (--config.data.data_dir), or delete that folder to prepare this one")
        check_prepared(b, md5s, source)
        return b
    if members is not None:
        b = builder(data_dir, archive_members=members, md5s=md5s or OFFICIAL_MD5)
    elif not _can_download():
        raise DataError(
            f"CIFAR-10 is not prepared in {b.data_dir} and {DOWNLOAD_HOST[0]} cannot be reached: supply the archive with "
            "`python -m jaxcifar.data prepare --archive /path/to/cifar-10-binary.tar.gz` "
            "(or --config.data.archive=PATH when training)"
        )
    # tfds writes to a temporary folder and renames it when complete: no partial dataset survives a failure.
    b.download_and_prepare(file_format="array_record")
    source = {"md5": b.source_md5s, "official": b.source_md5s == OFFICIAL_MD5}
    (Path(b.data_dir) / SOURCE_FILE).write_text(json.dumps(source, indent=1))
    return b


def _md5s_of(members: Mapping[str, bytes]) -> dict[str, str]:
    return {f: hashlib.md5(members[f]).hexdigest() for f in TRAIN_FILES + TEST_FILES}


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
            records = source.__getitems__(list(range(len(source))))
        except (RuntimeError, OSError, ValueError) as e:  # array_record: "Corrupted Riegeli/records file: ..."
            folder = builder(data_dir).data_dir
            raise DamagedDataset(
                f"the prepared dataset in {folder} is damaged ({split} split: {first_line(e)}); prepare it again with "
                "`python -m jaxcifar.data prepare --force --archive /path/to/cifar-10-binary.tar.gz` (the damaged "
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


# ---------------------------------------------------------------------------
# The preprocessed cache (the original's provider.t7): npy files + a JSON manifest, no pickle.


class Preprocessed(NamedTuple):
    train_images: np.ndarray  # float32 (N, 32, 32, 3)
    train_labels: np.ndarray  # int32 (N,)
    test_images: np.ndarray
    test_labels: np.ndarray
    stats: preprocess.NormalizationStats
    fingerprint: str


_ARRAYS = ("train_images", "train_labels", "test_images", "test_labels")


def default_cache_dir() -> str:
    return os.environ.get("JAXCIFAR_CACHE_DIR") or os.path.expanduser("~/.cache/jaxcifar")


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _cache_key(fingerprint: str, method: str) -> str:
    return f"cifar10-{fingerprint[:16]}-{method}-v{preprocess.PREPROCESS_VERSION}.{CACHE_FORMAT_VERSION}"


def _load_cache(folder: Path, fingerprint: str) -> Preprocessed | None:
    """Returns the cached arrays, or None when absent; a cache that fails any check is removed."""
    folder = folder.resolve()  # one version throughout, even if a writer swaps the link meanwhile
    manifest_path = folder / "manifest.json"
    if not manifest_path.exists():
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
        if manifest["fingerprint"] != fingerprint:
            raise ValueError("fingerprint mismatch")
        arrays = {}
        for name in _ARRAYS:
            path = folder / f"{name}.npy"
            if _file_sha256(path) != manifest["sha256"][name]:
                raise ValueError(f"{path.name} checksum mismatch")
            arrays[name] = np.load(path, allow_pickle=False)
        stats = preprocess.NormalizationStats.from_json(manifest["stats"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"jaxcifar: preprocessed cache {folder} is corrupt ({e}); rebuilding it", file=sys.stderr)
        shutil.rmtree(folder, ignore_errors=True)
        return None
    return Preprocessed(**arrays, stats=stats, fingerprint=fingerprint)


def _write_cache(folder: Path, data: Preprocessed) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".version-", dir=folder.parent))
    try:
        sums = {}
        for name in _ARRAYS:
            np.save(tmp / f"{name}.npy", getattr(data, name), allow_pickle=False)
            sums[name] = _file_sha256(tmp / f"{name}.npy")
        manifest = {"fingerprint": data.fingerprint, "stats": data.stats.to_json(), "sha256": sums,
                    "preprocess_version": preprocess.PREPROCESS_VERSION}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        # `folder` is a symbolic link to a complete version; renaming a new link over it is atomic, so a reader
        # always finds a whole cache, the old or the new (removing the old first left a window with none).
        link = folder.parent / f".{folder.name}.link-{os.getpid()}"
        link.unlink(missing_ok=True)
        os.symlink(tmp.name, link)
        old = folder.resolve() if folder.is_symlink() else None
        if folder.is_dir() and not folder.is_symlink():  # a cache of the layout before links
            old = folder.with_name(f"{folder.name}.old-{os.getpid()}")
            os.replace(folder, old)
        os.replace(link, folder)
        if old is not None and old != tmp.resolve():
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_preprocessed(
    data_dir: str | None = None,
    cache_dir: str | None = None,
    method: str = "yuv",
    archive: str | None = None,
    md5s: Mapping[str, str] | None = OFFICIAL_MD5,
    log=print,
    repair: bool = True,
) -> Preprocessed:
    """Prepared dataset -> preprocessed float32 arrays, computed once and cached.

    `md5s`: the batch files the dataset must come from (None: whatever is prepared). Prepared files
    that fail to read are prepared again from `archive` when it is given (`repair`), else DamagedDataset.
    """
    if method not in preprocess.NORMALIZERS:
        raise DataError(f"unknown preprocessing {method!r}; choose one of {sorted(preprocess.NORMALIZERS)}")
    b = prepare(data_dir, archive, md5s)
    log(f"dataset: {describe(b)} in {b.data_dir}")
    fingerprint = dataset_fingerprint(b)
    folder = Path(cache_dir or default_cache_dir()) / _cache_key(fingerprint, method)
    cached = _load_cache(folder, fingerprint)
    if cached is not None:
        log(f"loaded preprocessed CIFAR-10 from {folder}")
        return cached
    t0 = time.time()
    try:
        raw = load_uint8(data_dir)
    except DamagedDataset as e:
        if archive is None or not repair:
            raise
        log(f"warning: {str(e).split('; prepare it again')[0]}; moved it to {set_aside_prepared(b)} and preparing it "
            f"again from {archive}")
        return load_preprocessed(data_dir, cache_dir, method, archive, md5s, log, repair=False)
    log(f"preprocessing CIFAR-10 ({method}); this runs once and is cached in {folder}")
    train, test, stats = preprocess.NORMALIZERS[method](raw["train_images"], raw["test_images"])
    data = Preprocessed(train, raw["train_labels"], test, raw["test_labels"], stats, fingerprint)
    _write_cache(folder, data)
    log(f"preprocessed in {time.time() - t0:.1f} s")
    return data


# ---------------------------------------------------------------------------
# Device-resident batches: everything below runs inside jit.


def epoch_batch_indices(key, epoch, num_examples: int, batch_size: int):
    """(steps, batch) example indices for one epoch; the last partial batch is dropped."""
    import jax

    steps = num_examples // batch_size
    perm = jax.random.permutation(jax.random.fold_in(key, epoch), num_examples)
    return perm[: steps * batch_size].reshape(steps, batch_size)


def flip_mask(key, batch_size: int, mode: str):
    """Which images of a batch are mirrored.

    'batchflip': torch's `randperm(bs):le(bs/2)`, exactly floor(bs/2) chosen at random;
    'independent': each image with probability 1/2; 'none': no flips.
    """
    import jax
    import jax.numpy as jnp

    if mode == "batchflip":
        return jax.random.permutation(key, batch_size) < batch_size // 2
    if mode == "independent":
        return jax.random.bernoulli(key, 0.5, (batch_size,))
    if mode == "none":
        return jnp.zeros((batch_size,), bool)
    raise ValueError(f"unknown flip mode {mode!r}; choose 'batchflip', 'independent' or 'none'")


def gather_batch(images, labels, indices, key, flip: str):
    """Gathers a training batch from device-resident arrays and mirrors the chosen images (NHWC)."""
    import jax.numpy as jnp

    x = images[indices]
    mask = flip_mask(key, indices.shape[0], flip)
    x = jnp.where(mask[:, None, None, None], x[:, :, ::-1, :], x)
    return x, labels[indices]


def eval_batches(num_examples: int, batch_size: int):
    """(indices, valid) per evaluation batch: covers every example exactly once, the last batch padded."""
    steps = -(-num_examples // batch_size)
    idx = np.arange(steps * batch_size)
    valid = idx < num_examples
    idx = np.where(valid, idx, 0)
    return idx.reshape(steps, batch_size), valid.reshape(steps, batch_size)


# ---------------------------------------------------------------------------
# CLI


def _print_summary(data_dir: str | None) -> None:
    raw = load_uint8(data_dir)
    for split in ("train", "test"):
        counts = np.bincount(raw[f"{split}_labels"], minlength=len(CLASS_NAMES))
        per_class = ", ".join(f"{name} {c:,}" for name, c in zip(CLASS_NAMES, counts))
        print(f"{split}: {counts.sum():,} images; per class: {per_class}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxcifar.data", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="prepare tfds cifar10 (from --archive offline, or by download)")
    p.add_argument("--archive", help="cifar-10-binary.tar.gz or an extracted cifar-10-batches-bin/ folder")
    p.add_argument("--data-dir", default=None, help="tfds data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)")
    p.add_argument("--md5-file", help="md5sum-style list for a non-official archive (default: the official sums)")
    p.add_argument("--force", action="store_true",
                   help="prepare again even if prepared (a damaged dataset): the old files are moved aside, not deleted")
    p.add_argument("--preprocess", action="store_true", help="also build the preprocessed cache")
    p.add_argument("--cache-dir", default=None, help="preprocessed cache dir (default: $JAXCIFAR_CACHE_DIR or ~/.cache/jaxcifar)")
    args = parser.parse_args(argv)
    try:
        md5s = read_md5_file(args.md5_file) if args.md5_file else OFFICIAL_MD5
        t0 = time.time()
        if args.force:
            if not args.archive:
                raise DataError("--force prepares the dataset again from --archive; give the archive too")
            read_archive(args.archive, md5s)  # verified before anything is moved
            existing = builder(args.data_dir)
            if Path(existing.data_dir).exists():
                print(f"moved the prepared dataset to {set_aside_prepared(existing)}")
        b = prepare(args.data_dir, args.archive, md5s)
        print(f"cifar10 {b.version} ready in {b.data_dir} ({time.time() - t0:.1f} s): {describe(b)}")
        _print_summary(args.data_dir)
        if args.preprocess:
            load_preprocessed(args.data_dir, args.cache_dir, md5s=md5s)
    except JaxcifarError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
