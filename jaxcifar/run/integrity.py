"""Whether a save is whole and is this run's: per-leaf checksums of the arrays, the meta's SHA-256, the step its folder
names, the arrays' structure against the template, and which failures are damage (set aside) rather than bugs.
checkpoint.py saves, restores and falls back; this module only judges.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxcifar import distributed
from jaxcifar.run import trees
from jaxcifar.errors import CheckpointDamaged

# Per-leaf checksums in the meta: the wrapping uint32 sum of the leaf's bits times odd position weights.
# Integer sums are exact in any order, so every device, sharding and CPU gets the same value; one
# flipped bit changes it (odd weight times a power of two is never 0 mod 2^32). Method 2 adds the
# SHA-256 of the meta itself ("meta_sha256"), which holds the normalization statistics and config.
CHECKSUM_METHOD = "u32-weighted-sum-2"


def _leaf_checksum(x):
    bits = jnp.dtype(x.dtype).itemsize * 8
    if bits > 32:
        raise TypeError(f"no checksum for {x.dtype} leaves")
    u = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{bits}")).astype(jnp.uint32).ravel()
    weights = jnp.arange(u.size, dtype=jnp.uint32) * jnp.uint32(0x9E3779B1) | jnp.uint32(1)
    return jnp.sum(u * weights, dtype=jnp.uint32)


@jax.jit
def _checksums(leaves):
    return [_leaf_checksum(x) for x in leaves]


def tree_checksums(tree) -> dict[str, int]:
    """{leaf path: checksum} of a tree of arrays (on any devices; computed where the arrays are)."""
    flat = trees.flat_dict(tree)
    return dict(zip(flat, (int(v) for v in jax.device_get(_checksums(list(flat.values()))))))


def verify_checksums(tree, meta: dict, where: str, partial: bool = False) -> None:
    """Raises CheckpointDamaged when a restored leaf's checksum differs from the one saved with it.

    `partial`: `tree` holds only some of the saved leaves; those are checked.
    """
    saved = meta["checksums"]  # check_meta_checksum refused a meta without them
    now = tree_checksums(tree)
    bad = [k for k in now if saved.get(k) != now[k]] + ([] if partial else [k for k in saved if k not in now])
    if bad:
        raise CheckpointDamaged(f"{where}: {len(bad)} of {len(now)} arrays fail their saved checksums "
                                f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}); its files were damaged")


def meta_sha256(meta: dict) -> str:
    """SHA-256 of a meta (less its own digest) as JSON: the same before the save and after reading it back."""
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(json.loads(json.dumps(body)), sort_keys=True).encode()).hexdigest()


def check_meta_checksum(meta: dict, where: str) -> None:
    """Raises CheckpointDamaged when a meta fails its digest, lacks its checksums, or names a checksum method this
    version does not know (a damaged name must not switch verification off). Every released version wrote
    CHECKSUM_METHOD with the meta's SHA-256, so a meta without them has lost them."""
    method = meta.get("checksum_method")
    if method is None or "checksums" not in meta or "meta_sha256" not in meta:
        missing = [k for k in ("checksum_method", "checksums", "meta_sha256") if k not in meta]
        raise CheckpointDamaged(f"{where}: its meta file lacks {', '.join(missing)}, which every save records; the "
                                "meta file is damaged, so its arrays cannot be verified")
    if method != CHECKSUM_METHOD:
        raise CheckpointDamaged(f"{where}: its meta names the checksum method {method!r}, which this version does not "
                                f"know ({CHECKSUM_METHOD!r}); the meta file is damaged, or a newer jaxcifar wrote it")
    if meta.get("meta_sha256") != meta_sha256(meta):
        raise CheckpointDamaged(f"{where}: its meta file (config, normalization statistics, history) fails its saved "
                                "SHA-256; its files were damaged")


def check_meta_step(meta: dict, step: int, where: str) -> None:
    """Raises CheckpointDamaged when a save's folder name and its meta name different steps (a copied or renamed
    folder: as found, it would resume from or label the wrong state)."""
    if meta.get("step") != step:
        raise CheckpointDamaged(f"{where}: its meta records step {meta.get('step')}, not {step}; the folder was "
                                "copied or renamed, so it is not the save of that step")


def array_specs(tree) -> dict[str, tuple]:
    """{path: (shape, dtype)} of a nested dict of arrays or of orbax's array metadata."""
    return {path: (tuple(a.shape), np.dtype(a.dtype).name) for path, a in trees.flat_dict(tree).items()}


def structure_difference(saved: dict, template: dict, partial: bool = False) -> str | None:
    """None when the saved arrays match the template's paths, shapes and dtypes (`partial`: the template's
    are among the saved ones); else the first differences."""
    if saved == template or partial and all(saved.get(k) == v for k, v in template.items()):
        return None
    missing = [k for k in template if k not in saved]
    extra = [] if partial else [k for k in saved if k not in template]
    changed = [f"{k} {saved[k]} -> {template[k]}" for k in template if k in saved and saved[k] != template[k]]
    parts = [f"{label}: {', '.join(items[:3])}{', ...' if len(items) > 3 else ''}"
             for label, items in (("missing", missing), ("unexpected", extra), ("different", changed)) if items]
    return "; ".join(parts)


def unreadable(e: BaseException) -> bool:
    """Whether a restore failed on the saved bytes (damage) rather than on code. Measured by damaging each
    file of a save (truncated, emptied, deleted, replaced by noise, a flipped byte, a folder in its place):
    TensorStore's DATA_LOSS / NOT_FOUND / OUT_OF_RANGE are ValueErrors, a damaged JSON file a
    JSONDecodeError or UnicodeDecodeError (ValueErrors too), missing files OSErrors, and orbax wraps a
    failed array read in a bare Exception. A save missing a whole piece (its `meta/` or `state/` folder deleted,
    or nothing left in its folder) is orbax's KeyError 'Item "meta" was not found in the checkpoint'. Anything else
    (a TypeError, an AttributeError, another KeyError) is a bug."""
    if isinstance(e, (OSError, ValueError, EOFError)):
        return True
    if isinstance(e, KeyError) and "was not found in the checkpoint" in str(e):
        return True
    return type(e) is Exception and "Encountered error while reading array" in str(e)


def set_aside(workdir: Path, latest: Path, damaged: list[int]) -> Path | None:
    """Moves the damaged saves `damaged` of the folder `latest` to workdir/damaged-checkpoints/ (a resumed run saves
    those steps again), deleting nothing; with several processes, one moves them while the others wait."""
    if not damaged:
        return None
    aside = Path(workdir) / "damaged-checkpoints"
    if distributed.is_writer():
        aside.mkdir(exist_ok=True)
        for s in damaged:
            src = Path(latest) / str(s)
            if src.exists():
                os.replace(src, aside / f"{s}-{int(time.time())}")
    distributed.barrier("damaged checkpoints set aside")
    return aside
