"""Orbax checkpoints of a whole run: train state, epoch metrics so far, history, stats and config.

Layout of a workdir:
    checkpoints/<step>/{state,meta}   the last `keep` saves (every `checkpoint_every_epochs`, at the end, on
                                      a new best, and on SIGINT/SIGTERM)
    best/<step>/{state,meta}          the single save with the best test accuracy so far
Orbax writes each save under a temporary name and renames it when complete, so a crash
mid-save leaves nothing that `all_steps()` lists. Damage after that (flipped bits, a truncated
file) is caught on restore by per-leaf checksums recorded in the meta at save time.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import flax.serialization
import jax
import orbax.checkpoint as ocp

from jaxcifar import distributed
from jaxcifar.run import integrity, orbax_quiet, workdir as workdir_lib
from jaxcifar.errors import CheckpointDamaged, CheckpointError, CheckpointSaveFailed, failure_line, os_error_fix

# Every state leaf has a leading replica axis (one entry per seed), recorded in the meta as "seeds".
LAYOUT = "replicas-1"


def check_layout(meta: dict, where) -> None:
    """Refuses a save whose arrays are not laid out as this version writes them: a refusal, not a reader. Saves
    without a layout were written before commit 319e0b9 (2026-11-28, no release); nothing writes them now."""
    if meta.get("layout") != LAYOUT:
        raise CheckpointError(
            f"{where} holds checkpoints written by an older jaxcifar (arrays without the replica axis, layout "
            f"{meta.get('layout', 'none')!r}, this version reads {LAYOUT!r}); train afresh in a new --workdir, "
            "or evaluate them with the version that wrote them")


def _manager(directory: Path, keep: int, read_only: bool = False) -> ocp.CheckpointManager:
    # With several processes orbax synchronizes each save through barriers named after the step; the two
    # managers (checkpoints/, best/) save the same step, so each gets its own barrier names.
    processes = ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=directory.name)
    if read_only:  # writes nothing, creates nothing: safe beside a training run, and on an empty folder
        options = ocp.CheckpointManagerOptions(read_only=True, create=False, max_to_keep=None, save_interval_steps=0,
                                               enable_async_checkpointing=False, multiprocessing_options=processes)
    else:
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True, create=True,
                                               multiprocessing_options=processes)
    # Handlers named up front so that item_metadata can read a save's array shapes before restoring it. Readers
    # get the PyTree handler (the same files as the Standard one writes), which can restore part of a tree.
    state_handler = ocp.PyTreeCheckpointHandler() if read_only else ocp.StandardCheckpointHandler()
    handlers = {"state": state_handler, "meta": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(directory.absolute(), options=options, item_handlers=handlers)


def _abstract(x) -> jax.ShapeDtypeStruct:
    """A restore target for template leaf `x`: its sharding, or without one, this process's first device.

    (Orbax would otherwise use the sharding saved with the array, which names the saving run's devices.)
    """
    target = ocp.utils.to_shape_dtype_struct(x)
    if getattr(target, "sharding", None) is None:
        target = jax.ShapeDtypeStruct(target.shape, target.dtype,
                                      sharding=jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
    return target


# ---------------------------------------------------------------------------


def _saved_arrays(manager, step: int) -> dict:
    """Orbax's metadata (shape, dtype) of the arrays a save holds, as nested dicts; CheckpointDamaged if unreadable."""
    where = f"checkpoint {step} in {manager.directory}"
    try:
        items = manager.item_metadata(step)
    except Exception as e:  # noqa: BLE001 - narrowed by integrity.unreadable()
        if not integrity.unreadable(e):
            raise
        raise CheckpointDamaged(f"{where} is unreadable: {failure_line(e)}") from None
    if "state" not in items:  # its state/ folder deleted
        raise CheckpointDamaged(f"{where} is unreadable: it has no arrays (its state/ folder is missing)")
    tree = getattr(items["state"], "tree", items["state"])
    if tree is None:
        raise CheckpointDamaged(f"{where} is unreadable: its array metadata is missing")
    return tree


# ---------------------------------------------------------------------------


class Checkpointer:
    """Saves and restores one workdir's run; saves are asynchronous, restores are verified.

    `read_only`: for tools that only read (evaluate, predict): nothing is created or written.
    """

    def __init__(self, workdir: str | Path, keep: int = 3, read_only: bool = False):
        self.workdir = Path(workdir)
        self.read_only = read_only
        if not read_only and distributed.is_writer():
            for folder in ("checkpoints", "best"):  # before the first epoch, not after it
                workdir_lib.check_writable_folder(self.workdir / folder)
        orbax_quiet.silence_echoes(str(self.workdir.absolute()))
        self.latest = _manager(self.workdir / "checkpoints", keep, read_only)
        self.best = _manager(self.workdir / "best", 1, read_only)
        self._saving: dict[int, int] = {}  # id(manager) -> the step of its last save
        # A failed background save leaves orbax threads waiting for signals that never come; the process
        # must then end with os._exit or it hangs at exit (measured: still alive after 60 s, three tries).
        self.failed = False

    def save(self, step: int, state_tree: Any, meta: dict, is_best: bool = False) -> None:
        """Starts an asynchronous save; returns once the arrays are copied off the device.

        A step already saved is not written again: a resumed run reproduces the same state there.
        At most one save per folder (checkpoints/, best/) is in flight, one in all with several
        processes: a new one first waits for the previous to be on disk, so when an epoch is logged
        after its save starts, the epoch before it is durable.
        The meta records the step and each leaf's checksum (computed on the device, before the copy).
        """
        meta = {**meta, "step": step, "checksums": integrity.tree_checksums(state_tree), "checksum_method": integrity.CHECKSUM_METHOD}
        meta["meta_sha256"] = integrity.meta_sha256(meta)
        for manager, wanted in ((self.latest, True), (self.best, is_best)):
            # Several processes: one save in flight in all (orbax's background threads of two concurrent
            # multi-process saves meet at barriers of the same name and fail: measured, 2 processes on gloo).
            for m in (self.latest, self.best) if jax.process_count() > 1 else (manager,):
                self._finish(m, block=True)  # a failed earlier save surfaces here, not silently
            if wanted and step not in manager.all_steps():
                args = ocp.args.Composite(state=ocp.args.StandardSave(state_tree), meta=ocp.args.JsonSave(meta))
                self._saving[id(manager)] = step
                try:
                    manager.save(step, args=args, force=True)
                except OSError as e:  # the synchronous part (creating folders) may fail here already
                    self._fail(manager, e)

    def wait(self) -> None:
        """Blocks until pending saves are on disk; raises CheckpointSaveFailed if one failed."""
        for m in (self.latest, self.best):
            self._finish(m, block=True)

    def check(self) -> None:
        """Raises CheckpointSaveFailed if a background save has already failed (does not wait for one in flight)."""
        for m in (self.latest, self.best):
            self._finish(m, block=False)

    def _finish(self, manager, block: bool) -> None:
        if self.failed:  # raised once already; orbax would raise it again from every call
            return
        try:
            if block:
                manager.wait_until_finished()
            manager.check_for_errors()
        except Exception as e:  # noqa: BLE001 - orbax re-raises whatever its background threads hit
            self._fail(manager, e)

    def _fail(self, manager, e: BaseException) -> None:
        self.failed = True
        directory = Path(manager.directory)
        step = self._saving.get(id(manager), "?")
        for other in (self.latest, self.best):
            if other is not manager:  # its save of the same step may still be writing into its temporary folder
                try:
                    other.wait_until_finished()
                except Exception:  # noqa: BLE001 - the same cause; its partial save is removed below
                    pass
        self.remove_failed_saves()
        complete = workdir_lib.complete_steps(self.workdir / "checkpoints")
        last = (f"the last complete checkpoint is step {complete[-1]} in {self.workdir / 'checkpoints'}"
                if complete else "no checkpoint of this run is complete yet")
        raise CheckpointSaveFailed(f"{failure_line(e)} while saving step {step} to {directory}; {last}. "
                                   f"{os_error_fix(e).capitalize()}, then run the same command to resume") \
            from None

    def close(self) -> None:
        for m in (self.latest, self.best):
            try:
                m.close()  # waits for a save in flight, and raises its failure
            except Exception as e:  # noqa: BLE001 - orbax re-raises whatever its background threads hit
                if not self.failed:
                    self._fail(m, e)
        if self.failed:  # the other folder's save of the same step may have failed after the first report
            self.remove_failed_saves()

    def remove_leftovers(self, log) -> None:
        """Removes the temporary folders of saves that a hard stop interrupted (a second Ctrl-C, a kill); called
        by the training run that holds the workdir's lock, before it saves anything."""
        for leftover in self.partial_saves():
            shutil.rmtree(leftover, ignore_errors=True)
            log(f"removed {leftover}, a save that was stopped before its end (the complete saves are untouched)")

    def partial_saves(self) -> list[Path]:
        """The temporary folders of saves not finished (orbax renames a save when it is complete)."""
        return [p for m in (self.latest, self.best) for p in sorted(Path(m.directory).glob("*.orbax-checkpoint-tmp*"))]

    def remove_failed_saves(self, settle_s: float = 1.0, give_up_s: float = 30.0) -> None:
        """Deletes the temporary folders of saves that failed (never a complete save).

        A failed orbax save reports its first failed write while its other writes go on (its ChainedFuture
        stops at the first error), so a folder can be written into, or made again, after it was deleted:
        measured, 1 of 20 full-disk runs (tmpfs of 2.4-4.4 MB, two at a time on 2 cores) left
        `best/<step>.orbax-checkpoint-tmp` after one pass. Deleting repeats until no such folder has been seen
        for `settle_s`: 0 of 40 such runs left one.
        """
        give_up = time.monotonic() + give_up_s
        quiet_since = time.monotonic()
        while time.monotonic() < give_up:
            leftovers = self.partial_saves()
            for leftover in leftovers:
                shutil.rmtree(leftover, ignore_errors=True)
            if leftovers:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= settle_s:
                return
            time.sleep(0.05)

    def _set_aside(self, damaged: list[int]) -> Path | None:
        aside = integrity.set_aside(self.workdir, Path(self.latest.directory), damaged)
        if aside is not None:
            self.latest.reload()
        return aside

    def _manager_of(self, best: bool) -> ocp.CheckpointManager:
        return self.best if best else self.latest

    def read_meta(self, step: int, best: bool = False) -> dict:
        manager = self._manager_of(best)
        _require_step(manager, step)
        return self._read_meta(manager, step)

    @staticmethod
    def _read_meta(manager, step: int) -> dict:
        try:
            meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:  # noqa: BLE001 - narrowed by integrity.unreadable()
            if not integrity.unreadable(e):
                raise
            raise CheckpointDamaged(f"checkpoint {step} in {manager.directory} is unreadable: {failure_line(e)}") from None
        if not isinstance(meta, dict):
            raise CheckpointDamaged(f"checkpoint {step} in {manager.directory} has a damaged meta file")
        integrity.check_meta_checksum(meta, f"checkpoint {step} in {manager.directory}")
        integrity.check_meta_step(meta, step, f"checkpoint {step} in {manager.directory}")
        return meta

    def steps(self, best: bool = False) -> list[int]:
        return sorted(self._manager_of(best).all_steps())

    def _restore_one(self, manager, step: int, template: Any, check_meta, partial: bool = False):
        """(state, meta) of one save; CheckpointDamaged when its files are damaged, CheckpointError when it
        is intact but not for this run or this code (structure)."""
        where = f"checkpoint {step} in {manager.directory}"
        meta = self._read_meta(manager, step)
        if check_meta is not None:
            check_meta(meta)
        difference = integrity.structure_difference(integrity.array_specs(_saved_arrays(manager, step)), integrity.array_specs(template), partial)
        if difference:
            raise CheckpointError(f"{where} does not hold the arrays this version builds for its config "
                                  f"({difference}); it was written by another jaxcifar version or model code: "
                                  "evaluate it with that version, or train afresh in a new --workdir")
        abstract = jax.tree_util.tree_map(_abstract, template)
        try:
            state = manager.restore(step, args=ocp.args.Composite(state=self._restore_args(abstract, partial)))["state"]
        except Exception as e:  # noqa: BLE001 - narrowed by integrity.unreadable()
            if not integrity.unreadable(e):
                raise
            raise CheckpointDamaged(f"{where} is unreadable: {failure_line(e)}") from None
        integrity.verify_checksums(state, meta, where, partial)
        return state, meta

    def _restore_args(self, abstract, partial: bool = False):
        if not self.read_only:
            if partial:
                raise ValueError("a partial restore needs a read-only Checkpointer")
            return ocp.args.StandardRestore(abstract)
        restore_args = jax.tree_util.tree_map(lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding, dtype=s.dtype),
                                              abstract)
        return ocp.args.PyTreeRestore(abstract, restore_args=restore_args, partial_restore=partial)

    def restore(self, template: Any, step: int | None = None, best: bool = False, check_meta=None, log=print,
                set_aside_damaged: bool = False, partial: bool = False):
        """(state, meta, step) from the newest intact save (or `step`); None when there is none.

        `check_meta(meta)` runs before the arrays are read and may refuse the run by raising.
        A damaged save (unreadable, or failing its checksums) is skipped with one warning and the
        one before it is used; a run about to resume passes `set_aside_damaged` so that the skipped
        saves are moved to damaged-checkpoints/ (kept, not deleted). A given `step` that is damaged
        raises. Any other problem (a save of another run or code version) raises: nothing is set aside.
        `partial` (read-only Checkpointers): `template` names some of the saved arrays; only those are read.
        """
        manager = self._manager_of(best)
        available = sorted(manager.all_steps(), reverse=True)
        if step is not None:
            _require_step(manager, step)
        damaged = []
        for s in [step] if step is not None else available:
            try:
                state, meta = self._restore_one(manager, s, template, check_meta, partial)
            except CheckpointDamaged as e:
                if step is not None:
                    raise
                damaged.append(s)
                log(f"warning: {e}; falling back to an older checkpoint")
                continue
            if set_aside_damaged and not best and not self.read_only:
                aside = self._set_aside(damaged)
                if aside is not None:
                    log(f"warning: moved damaged checkpoint(s) {', '.join(map(str, damaged))} to {aside}")
            return state, meta, s
        if available:
            kept = [] if best else self.steps(best=True)
            spare = (f" (best/ holds the save of step {kept[-1]}, which `evaluate --best` and `predict --best` read; "
                     "keep it)") if kept else ""
            raise CheckpointDamaged(f"every checkpoint in {manager.directory} is damaged; move that folder away to "
                                    f"start afresh{spare}, or use a fresh --workdir")
        return None


def _require_step(manager, step: int) -> None:
    if step not in manager.all_steps():
        raise CheckpointError(f"no checkpoint at step {step} in {manager.directory}; "
                              f"available: {sorted(manager.all_steps()) or 'none'}")


def to_tree(obj) -> Any:
    """A flax struct / NamedTuple pytree as nested dicts (stable, plain keys for orbax)."""
    return flax.serialization.to_state_dict(obj)


def from_tree(template, tree) -> Any:
    return flax.serialization.from_state_dict(template, tree)


def read_saved(workdir: str | Path, step: int | None = None, best: bool = False):
    """(state tree, meta, step) of a save as stored, without a template (for tools and tests).

    The arrays land on this process's first device, whatever devices wrote them. Not verified.
    """
    ckpt = Checkpointer(workdir, read_only=True)
    try:
        steps = ckpt.steps(best)
        if not steps:
            raise CheckpointError(f"no checkpoints in {Path(workdir) / ('best' if best else 'checkpoints')}")
        step = max(steps) if step is None else step
        manager = ckpt.best if best else ckpt.latest
        abstract = jax.tree_util.tree_map(lambda a: _abstract(jax.ShapeDtypeStruct(tuple(a.shape), a.dtype)),
                                          _saved_arrays(manager, step))
        restored = manager.restore(step, args=ocp.args.Composite(state=ckpt._restore_args(abstract),
                                                                 meta=ocp.args.JsonRestore()))
        return restored["state"], restored["meta"], step
    finally:
        ckpt.close()
