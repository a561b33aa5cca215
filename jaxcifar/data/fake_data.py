"""Small CIFAR-10-shaped archives for tests and smoke runs (never the real data), and random preprocessed sets.

Archive images are noise plus a class-dependent colour gradient, so a tiny model can learn them.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np

from jaxcifar.data.archive import ARCHIVE_PREFIX, CLASS_NAMES, TEST_FILES, TRAIN_FILES


def fake_batch(num_records: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    labels = np.arange(num_records) % len(CLASS_NAMES)
    rng.shuffle(labels)
    ramp = np.linspace(0, 1, 32)
    images = rng.integers(0, 96, (num_records, 3, 32, 32)).astype(np.float64)
    for i, label in enumerate(labels):
        channel, direction = label % 3, label // 3
        pattern = ramp[None, :] if direction % 2 else ramp[:, None]
        images[i, channel] += 150 * (pattern if direction < 2 else 1 - pattern)
    images = np.clip(images, 0, 255).astype(np.uint8).reshape(num_records, -1)
    return np.concatenate([labels[:, None].astype(np.uint8), images], axis=1).tobytes()


def write_fake_archive(folder, train_per_batch: int = 40, test_records: int = 50, seed: int = 0):
    """Writes `cifar-10-binary.tar.gz` and its `md5sums.txt` in `folder`; returns both paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    members = {name: fake_batch(train_per_batch, seed + i) for i, name in enumerate(TRAIN_FILES)}
    members[TEST_FILES[0]] = fake_batch(test_records, seed + 100)
    members["batches.meta.txt"] = ("\n".join(CLASS_NAMES) + "\n").encode()
    archive = folder / "cifar-10-binary.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, blob in members.items():
            info = tarfile.TarInfo(f"{ARCHIVE_PREFIX}/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    md5_file = folder / "md5sums.txt"
    md5_file.write_text("".join(f"{hashlib.md5(members[n]).hexdigest()}  {n}\n" for n in TRAIN_FILES + TEST_FILES))
    return archive, md5_file


def random_preprocessed(num_train: int, num_test: int | None = None, seed: int = 0):
    """A cache.Preprocessed of standard-normal images, labels cycling through the classes; the test split is the
    first `num_test` training images (default: all). For benchmarks and tests where only shapes matter."""
    from jaxcifar.data import cache, preprocess

    rng = np.random.default_rng(seed)
    images = rng.normal(size=(num_train, 32, 32, 3)).astype(np.float32)
    labels = (np.arange(num_train) % len(CLASS_NAMES)).astype(np.int32)
    stats = preprocess.NormalizationStats("yuv", (0.0, 0.0), (1.0, 1.0))
    test = slice(0, num_train if num_test is None else num_test)
    return cache.Preprocessed(images, labels, images[test], labels[test], stats, "random")
