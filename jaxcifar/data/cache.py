"""The preprocessed dataset (the original's provider.t7), computed once and cached: npy files and a JSON manifest
with their SHA-256s, no pickle. `load_dataset` (a config's data fields) is what training and the fidelity scripts
call, `load_preprocessed` what `evaluate`, `prepare` and the tests call.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Mapping, NamedTuple

import numpy as np

from jaxcifar.data import preprocess, tfds_cifar10
from jaxcifar.data.archive import OFFICIAL_MD5, read_md5_file
from jaxcifar.errors import DataError, failure_line, os_error_cause
from jaxcifar.data.tfds_cifar10 import DamagedDataset

CACHE_FORMAT_VERSION = 1


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
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _cache_key(fingerprint: str, method: str) -> str:
    return f"cifar10-{fingerprint[:16]}-{method}-v{preprocess.PREPROCESS_VERSION}.{CACHE_FORMAT_VERSION}"


def read_cache(folder: Path, fingerprint: str) -> Preprocessed | None:
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


def usable_cache_dir(cache_dir: str | None) -> Path:
    """The cache folder (made if needed); DataError naming the problem when it is a file or cannot be made."""
    root = Path(cache_dir or default_cache_dir())
    try:
        if root.exists() and not root.is_dir():
            raise DataError(f"the preprocessed-data cache {root} is a file, not a folder; move it away, or set "
                            "JAXCIFAR_CACHE_DIR (--config.data.cache_dir) to a folder")
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot use {root} for the preprocessed-data cache: {os_error_cause(e) or e}; set "
                        "JAXCIFAR_CACHE_DIR (--config.data.cache_dir) to a folder you can write") from None
    return root


def remove_orphans(folder: Path, log) -> None:
    """Removes versions of the cache `folder` whose writer died before finishing (a kill while it wrote 586 MB):
    those the link does not point to, written by a process of this host that is gone."""
    current = folder.resolve() if folder.is_symlink() else None
    for version in sorted(folder.parent.glob(f"{folder.name}.version-*")):
        pid = version.name[len(folder.name) + len(".version-"):].split("-")[0]
        if version == current or not pid.isdigit() or _alive(int(pid)):
            continue
        shutil.rmtree(version, ignore_errors=True)
        log(f"removed {version}, a preprocessed cache whose writing was stopped before its end")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def write_cache(folder: Path, dataset: Preprocessed) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    # The writer's pid in the name: a version whose writer has died is an orphan (remove_orphans).
    tmp = Path(tempfile.mkdtemp(prefix=f"{folder.name}.version-{os.getpid()}-", dir=folder.parent))
    try:
        sums = {}
        for name in _ARRAYS:
            np.save(tmp / f"{name}.npy", getattr(dataset, name), allow_pickle=False)
            sums[name] = _file_sha256(tmp / f"{name}.npy")
        manifest = {"fingerprint": dataset.fingerprint, "stats": dataset.stats.to_json(), "sha256": sums,
                    "preprocess_version": preprocess.PREPROCESS_VERSION}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        # `folder` is a symbolic link to a complete version; renaming a new link over it is atomic, so a reader
        # always finds a whole cache, the old or the new (removing the old first left a window with none).
        link = folder.parent / f".{folder.name}.link-{os.getpid()}"
        link.unlink(missing_ok=True)
        os.symlink(tmp.name, link)
        old = folder.resolve() if folder.is_symlink() else None
        # A plain folder: a cache written before commit a22a6f1 (the layout before links; its format number was not
        # raised), which nothing writes now but which machines still hold. Replaced by the linked layout here.
        if folder.is_dir() and not folder.is_symlink():
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
    b = tfds_cifar10.prepare(data_dir, archive, md5s, log)
    log(f"dataset: {tfds_cifar10.describe(b)} in {b.data_dir}")
    fingerprint = tfds_cifar10.dataset_fingerprint(b)
    folder = usable_cache_dir(cache_dir) / _cache_key(fingerprint, method)
    remove_orphans(folder, log)
    cached = read_cache(folder, fingerprint)
    if cached is not None:
        log(f"loaded preprocessed CIFAR-10 from {folder}")
        return cached
    t0 = time.time()
    try:
        raw = tfds_cifar10.load_uint8(data_dir)
    except DamagedDataset as e:
        if archive is None or not repair:
            raise
        aside = tfds_cifar10.set_aside_prepared(b)
        log(f"warning: {str(e).split('; prepare it again')[0]}; moved it to {aside} and preparing it again from {archive}")
        return load_preprocessed(data_dir, cache_dir, method, archive, md5s, log, repair=False)
    log(f"preprocessing CIFAR-10 ({method}); this runs once and is cached in {folder}")
    train, test, stats = preprocess.NORMALIZERS[method](raw["train_images"], raw["test_images"])
    data = Preprocessed(train, raw["train_labels"], test, raw["test_labels"], stats, fingerprint)
    try:
        write_cache(folder, data)
    except OSError as e:
        raise DataError(f"cannot write the preprocessed cache in {folder.parent}: {failure_line(e)}; free "
                        "space or make it writable, or set JAXCIFAR_CACHE_DIR (--config.data.cache_dir) to another "
                        "folder") from None
    log(f"preprocessed in {time.time() - t0:.1f} s")
    return data


def load_dataset(config, log=print) -> Preprocessed:
    """`load_preprocessed` with a training config's data fields."""
    d = config.data
    md5s = read_md5_file(d.md5_file) if d.md5_file else OFFICIAL_MD5
    return load_preprocessed(d.data_dir or None, d.cache_dir or None, d.preprocess, d.archive or None, md5s, log=log)


def load_dataset_once(config, log=print) -> Preprocessed:
    """`load_dataset`; with several processes, process 0 prepares and caches first while the others wait,
    so that they only read what it wrote (the data and cache folders may be shared)."""
    import jax

    from jaxcifar import distributed

    if jax.process_count() == 1:
        return load_dataset(config, log)
    dataset = load_dataset(config, log) if distributed.is_writer() else None
    distributed.barrier("dataset prepared")
    return dataset if dataset is not None else load_dataset(config, log)
