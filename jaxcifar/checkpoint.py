"""Orbax checkpoints of a whole run: train state, epoch metrics so far, history, stats and config.

Layout of a workdir:
    checkpoints/<step>/{state,meta}   the last `keep` saves (every epoch, and on SIGINT/SIGTERM)
    best/<step>/{state,meta}          the single save with the best test accuracy so far
Orbax writes each save under a temporary name and renames it when complete, so a crash
mid-save leaves nothing that `all_steps()` lists.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import flax.serialization
import jax
import orbax.checkpoint as ocp

# Changing any of these makes a checkpoint meaningless for the run (another network, another
# input, another step -> epoch mapping); `num_epochs` and the like may change freely.
FIXED_FIELDS = ("model", "width", "batch_norm", "dropout", "num_classes", "batch_size", "data.preprocess")


# Every state leaf has a leading replica axis (one entry per seed), recorded in the meta as "seeds".
LAYOUT = "replicas-1"


class CheckpointError(RuntimeError):
    pass


def check_layout(meta: dict, where) -> None:
    """Refuses a save whose arrays are not laid out as this version writes them."""
    if meta.get("layout") != LAYOUT:
        raise CheckpointError(
            f"{where} holds checkpoints written by an older jaxcifar (arrays without the replica axis, layout "
            f"{meta.get('layout', 'none')!r}, this version reads {LAYOUT!r}); train afresh in a new --workdir, "
            "or evaluate them with the version that wrote them")


def _manager(directory: Path, keep: int) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True, create=True)
    return ocp.CheckpointManager(directory.absolute(), options=options, item_names=("state", "meta"))


def config_field(config, dotted: str):
    value = config
    for part in dotted.split("."):
        value = value[part]
    return value


def incompatible_fields(saved_config: dict, config) -> list[str]:
    """'field: saved -> now' for each fixed field that differs."""
    out = []
    for field in FIXED_FIELDS:
        try:
            saved = config_field(saved_config, field)
        except (KeyError, TypeError):
            continue
        now = config_field(config, field)
        if saved != now:
            out.append(f"{field}: {saved!r} -> {now!r}")
    return out


class Checkpointer:
    """Saves and restores one workdir's run; saves are asynchronous, restore is validated."""

    def __init__(self, workdir: str | Path, keep: int = 3):
        self.workdir = Path(workdir)
        self.latest = _manager(self.workdir / "checkpoints", keep)
        self.best = _manager(self.workdir / "best", 1)

    def save(self, step: int, state_tree: Any, meta: dict, is_best: bool = False) -> None:
        """Starts an asynchronous save; returns once the arrays are copied off the device.

        A step already saved is not written again: a resumed run reproduces the same state there.
        At most one save is in flight: a new one first waits for the previous to be on disk, so
        when an epoch is logged after its save starts, the epoch before it is durable.
        """
        for manager, wanted in ((self.latest, True), (self.best, is_best)):
            manager.wait_until_finished()
            manager.check_for_errors()  # a failed earlier save surfaces here, not silently
            if wanted and step not in manager.all_steps():
                args = ocp.args.Composite(state=ocp.args.StandardSave(state_tree), meta=ocp.args.JsonSave(meta))
                manager.save(step, args=args, force=True)

    def wait(self) -> None:
        """Blocks until pending saves are on disk; raises if one failed."""
        for m in (self.latest, self.best):
            m.wait_until_finished()
            m.check_for_errors()

    def close(self) -> None:
        for m in (self.latest, self.best):
            m.close()

    def _set_aside(self, unreadable: list[int]) -> None:
        """Moves unreadable saves out of the way (a resumed run saves those steps again), deleting nothing."""
        if not unreadable:
            return
        aside = self.workdir / "unreadable-checkpoints"
        aside.mkdir(exist_ok=True)
        for s in unreadable:
            src = Path(self.latest.directory) / str(s)
            if src.exists():
                os.replace(src, aside / f"{s}-{int(time.time())}")
        self.latest.reload()

    def read_meta(self, step: int, best: bool = False) -> dict:
        manager = self.best if best else self.latest
        if step not in manager.all_steps():
            raise CheckpointError(f"no checkpoint at step {step} in {manager.directory}; "
                                  f"available: {sorted(manager.all_steps()) or 'none'}")
        try:
            return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:
            raise CheckpointError(f"checkpoint {step} in {manager.directory} is unreadable: {_one_line(e)}") from None

    def steps(self, best: bool = False) -> list[int]:
        return sorted((self.best if best else self.latest).all_steps())

    def restore(self, template: Any, step: int | None = None, best: bool = False, check_meta=None, log=print,
                set_aside_unreadable: bool = False):
        """(state, meta, step) from the newest readable save (or `step`); None when there is none.

        `check_meta(meta)` runs before the arrays are read and may refuse the run by raising.
        A save that fails to read is skipped with a warning and the one before it is used; a run
        about to resume passes `set_aside_unreadable` so the skipped ones leave the step list.
        """
        manager = self.best if best else self.latest
        available = sorted(manager.all_steps(), reverse=True)
        if step is not None and step not in available:
            raise CheckpointError(f"no checkpoint at step {step} in {manager.directory}; "
                                  f"available: {sorted(available) or 'none'}")
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, template)
        unreadable = []
        for s in [step] if step is not None else available:
            try:
                meta = manager.restore(s, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
                if check_meta is not None:
                    check_meta(meta)
                restored = manager.restore(s, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
                if set_aside_unreadable and not best:
                    self._set_aside(unreadable)
                return restored["state"], meta, s
            except CheckpointError:
                raise
            except Exception as e:  # orbax raises many types for damaged files
                if step is not None:
                    raise CheckpointError(f"checkpoint {s} in {manager.directory} is unreadable: {_one_line(e)}") from None
                log(f"warning: checkpoint {s} in {manager.directory} is unreadable ({_one_line(e)}); trying an older one")
                unreadable.append(s)
        if available:
            raise CheckpointError(f"no checkpoint in {manager.directory} is readable; move the folder away to start "
                                  "afresh, or use a fresh --workdir")
        return None


def _one_line(e: Exception) -> str:
    text = f"{type(e).__name__}: {e}".strip().splitlines()
    return text[0][:300] if text else type(e).__name__


def to_tree(obj) -> Any:
    """A flax struct / NamedTuple pytree as nested dicts (stable, plain keys for orbax)."""
    return flax.serialization.to_state_dict(obj)


def from_tree(template, tree) -> Any:
    return flax.serialization.from_state_dict(template, tree)


def read_saved(workdir: str | Path, step: int | None = None, best: bool = False):
    """(state tree, meta, step) of a save as stored, without a template (for tools and tests)."""
    ckpt = Checkpointer(workdir)
    try:
        steps = ckpt.steps(best)
        if not steps:
            raise CheckpointError(f"no checkpoints in {Path(workdir) / ('best' if best else 'checkpoints')}")
        step = max(steps) if step is None else step
        manager = ckpt.best if best else ckpt.latest
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                                 meta=ocp.args.JsonRestore()))
        return restored["state"], restored["meta"], step
    finally:
        ckpt.close()
