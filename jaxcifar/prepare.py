"""`python -m jaxcifar.prepare --archive PATH`: CIFAR-10 prepared for tfds offline (or by download), checked.

archive --(md5-verified, tfds builder)--> TFDS_DATA_DIR/cifar10/3.0.2 (array_record)
        --tfds.data_source--> uint8 arrays --preprocess--> cache (npy + manifest)
        --placed once on the device mesh (mesh.global_array)--> per-epoch permutation, gather and flips inside jit.

archive.py, tfds_cifar10.py, cache.py and batches.py hold those stages, in that order.
"""

from __future__ import annotations

if __name__ == "__main__":  # before the heavy imports: Ctrl-C while they load is one line too
    from jaxcifar import cli

    cli.interrupt_exits_quietly()

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from jaxcifar.data.archive import CLASS_NAMES, OFFICIAL_MD5, read_archive, read_md5_file
from jaxcifar.data.cache import load_preprocessed
from jaxcifar.errors import DataError, JaxcifarError
from jaxcifar.data.tfds_cifar10 import builder, describe, load_uint8, prepare, set_aside_prepared


def _print_summary(data_dir: str | None) -> None:
    raw = load_uint8(data_dir)
    for split in ("train", "test"):
        counts = np.bincount(raw[f"{split}_labels"], minlength=len(CLASS_NAMES))
        per_class = ", ".join(f"{name} {c:,}" for name, c in zip(CLASS_NAMES, counts))
        print(f"{split}: {counts.sum():,} images; per class: {per_class}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jaxcifar.prepare", description=__doc__.splitlines()[0])
    p.add_argument("--archive", help="cifar-10-binary.tar.gz or an extracted cifar-10-batches-bin/ folder")
    p.add_argument("--data-dir", default=None, help="tfds data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)")
    p.add_argument("--md5-file", help="md5sum-style list for a non-official archive (default: the official sums)")
    p.add_argument("--force", action="store_true",
                   help="prepare again even if prepared (a damaged dataset): the old files are moved aside, not deleted")
    p.add_argument("--preprocess", action="store_true", help="also build the preprocessed cache")
    p.add_argument("--cache-dir", default=None, help="preprocessed cache dir (default: $JAXCIFAR_CACHE_DIR or ~/.cache/jaxcifar)")
    args = p.parse_args(argv)
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
    from jaxcifar import cli

    cli.run_command(main)
