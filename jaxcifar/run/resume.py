"""Resuming a run: which saves a config may continue (the policy), and the run restored from its newest intact save
or started afresh. `python -m jaxcifar.train` and the fidelity tools' JAX side both go through restore_or_init.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import ml_collections
import numpy as np

from jaxcifar.run import checkpoint
from jaxcifar import config as config_lib
from jaxcifar.errors import CheckpointError
from jaxcifar.nn import step as step_lib
from jaxcifar.nn.step import TrainState
from jaxcifar.run.trainer import Trainer

if TYPE_CHECKING:  # for type hints only
    from jaxcifar.data import cache

# The resume policy fails safe: every config field is fixed on resume (changing it would make the resumed run differ
# from an uninterrupted run of the new config: another network, input, step -> epoch mapping, random stream or update
# rule) unless it is listed here, with the reason it may change. A field added to the config is fixed until someone
# adds it here.
CHANGEABLE_FIELDS = {
    "num_epochs": "how long to train; fixed where the schedule spans the run (SCHEDULES_OVER_THE_RUN)",
    "seed": "compared apart, as the list of seeds the run trained", "seeds": "likewise",
    "eval_batch_size": "evaluation only: the same counts, the test loss summed in other batches",
    "log_every_steps": "logging", "checkpoint_every_epochs": "saving", "checkpoint_every_s": "saving",
    "keep_checkpoints": "saving", "save_best": "saving", "report_every_epochs": "the report",
    "results.dir": "where the result file goes", "results.name": "its name",
    "compile_cache_dir": "where compiled programs are kept",
    "data.data_dir": "where the data is: the data itself is checked by its fingerprint and statistics",
    "data.cache_dir": "likewise", "data.archive": "likewise", "data.md5_file": "likewise",
    # How the step is built: the same function, rounded differently (noted at resume). dropout_bits changes the
    # random stream: its resolved value is compared apart (FIXED_STEP_CHOICES).
    "steps_per_call": "how the step is built", "step_loop": "likewise", "conv_impl": "likewise",
    "pool_grad": "likewise", "bn_grad": "likewise", "dropout_bits": "compared apart, resolved",
}
# Schedules whose rate at a step depends on the run's length.
SCHEDULES_OVER_THE_RUN = ("cosine", "onecycle")
# Step choices that change the random stream (not only the rounding): a resume must keep them.
FIXED_STEP_CHOICES = ("dropout_bits",)


def incompatible_run(meta: dict, config, seeds: list[int], choices: dict) -> list[str]:
    """'what: saved -> now' for each difference between a save's run and the run about to resume from it:
    the config's fixed fields, the seeds, and the step choices that change the random stream."""
    differing = incompatible_fields(meta["config"], config)
    if meta["seeds"] != seeds:
        differing.append(f"seeds: {meta['seeds']} -> {seeds}")
    saved = meta.get("step_choices", {})
    differing += [f"{k} (step choice): {saved[k]!r} -> {choices[k]!r}"
                  for k in FIXED_STEP_CHOICES if k in saved and saved[k] != choices[k]]
    return differing


def other_dataset(meta: dict, fingerprint: str, stats: dict) -> str | None:
    """How the data a save was trained on differs from the data at hand (its fingerprint, or its normalization
    statistics beyond float rounding), or None when they are the same."""
    if meta.get("fingerprint") != fingerprint:
        return f"dataset fingerprint {meta.get('fingerprint')}; the data at hand has {fingerprint}"
    saved = meta.get("stats", {})
    if saved.get("method") != stats["method"] or not all(
            len(saved.get(k, ())) == len(stats[k]) and np.allclose(saved[k], stats[k], rtol=1e-6) for k in ("mean", "std")):
        return f"normalization statistics {saved}; the data at hand has {stats}"
    return None


def incompatible_fields(saved_config: dict, config) -> list[str]:
    """'field: saved -> now' for each setting whose change would make a resumed run another run: every field but
    CHANGEABLE_FIELDS. A field the save predates counts as the default it had before it existed (base_config's);
    one without a default there differs unless unset (None)."""
    now = _flat(config.to_dict())
    saved = {**_flat(config_lib.base_config().to_dict()), **_flat(saved_config)}
    changeable = set(CHANGEABLE_FIELDS)
    if config.optimizer.schedule in SCHEDULES_OVER_THE_RUN:
        changeable.discard("num_epochs")
    return [f"{field}: {saved.get(field)!r} -> {value!r}" for field, value in now.items()
            if field not in changeable and saved.get(field) != value]


def _flat(tree: dict, prefix: str = "") -> dict:
    """{'optimizer.learning_rate': 1.0, ...} of a nested config dict."""
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def check_identity(saved: dict | None, identity: dict | None, workdir: Path) -> None:
    """Refuses a save of another tool's run, or of another run of the same tool (which the config alone may not
    tell apart: fidelity's side, variant and measurements)."""
    if saved == identity:
        return
    if saved is None or identity is None:
        whose = (f"a {saved['tool']} run's" if saved is not None else "a `python -m jaxcifar.train` run's")
        raise CheckpointError(f"{workdir} holds {whose} checkpoints, not this command's; pass another --workdir")
    differing = sorted(k for k in set(saved) | set(identity) if saved.get(k) != identity.get(k))
    raise CheckpointError(f"{workdir} holds the checkpoint of another run (differs in {', '.join(differing)}); pass "
                          "another --workdir, or delete that one to start afresh")


@dataclasses.dataclass
class TrainingRun:
    """Where a training run stands: its state, the metrics of an epoch in progress, the finished epochs' records."""

    config: ml_collections.ConfigDict
    workdir: Path
    trainer: Trainer
    dataset: cache.Preprocessed
    state: TrainState
    epoch_metrics: Any = None  # None between epochs
    history: list = dataclasses.field(default_factory=list)
    resumed_step: int = 0  # the step of the checkpoint it resumed from; 0 when it started afresh
    restored: bool = False  # resumed from a checkpoint (False: initialised afresh)
    identity: dict | None = None  # what a tool beside `train` (fidelity) says makes a save its run's; None for train
    # Seconds spent training the epoch in progress (before the last save of it, once train.py adds the time since),
    # so that a resumed epoch's time covers the whole epoch; None: resumed from a save that did not record it.
    epoch_train_s: float | None = 0.0
    # Epochs finished before this process started: the next one pays its compilation (runlog.run_eta).
    epochs_restored: int = dataclasses.field(init=False)

    # When the run was last saved, or restored (time.monotonic()): `checkpoint_every_s` counts from it.
    last_save_at: float = dataclasses.field(init=False)

    def __post_init__(self):
        self.epochs_restored = len(self.history)
        self.last_save_at = time.monotonic()

    @property
    def step(self) -> int:
        return step_lib.steps_done(self.state)

    def save(self, ckpt: checkpoint.Checkpointer, epochs_done: int, is_best: bool = False) -> None:
        """Starts the asynchronous save of the run after `epochs_done` epochs (plus the epoch in progress's steps)."""
        c, step = self.config, self.step
        meta = {"epoch": epochs_done, "step": step, "history": self.history, "stats": self.dataset.stats.to_json(),
                "fingerprint": self.dataset.fingerprint, "config": c.to_dict(), "seeds": list(self.trainer.plan.seeds),
                "layout": checkpoint.LAYOUT, "step_choices": self.trainer.choices}
        if self.identity is not None:
            meta["run_identity"] = self.identity
        if self.epoch_metrics is not None and self.epoch_train_s is not None:
            meta["epoch_train_s"] = self.epoch_train_s
        epoch_metrics = self.trainer.zero_metrics() if self.epoch_metrics is None else self.epoch_metrics
        self.last_save_at = time.monotonic()
        ckpt.save(step, checkpoint.to_tree({"train_state": self.state, "epoch_metrics": epoch_metrics}), meta,
                  is_best=is_best)


def restore_or_init(config, workdir: Path, trainer: Trainer, dataset: cache.Preprocessed,
                    ckpt: checkpoint.Checkpointer, say: Callable[[str], None],
                    identity: dict | None = None) -> TrainingRun:
    """The run resumed from its newest readable checkpoint in `workdir`, or a fresh one. `identity`: what else
    than the config makes a save this run's (fidelity's run description; None for `python -m jaxcifar.train`)."""
    # Resume order: (1) the newest readable checkpoint, (2) refuse one of another run before reading its arrays,
    # (3) state, partial-epoch metrics and history from it; (4) the caller rewrites its logs from that history,
    # so epochs logged after the save are neither duplicated nor missing.
    shapes = trainer.state_shapes()  # nothing computed: jax.eval_shape, with the trainer's shardings
    template = checkpoint.to_tree({"train_state": shapes, "epoch_metrics": trainer.metrics_shapes()})

    def refuse_other_runs(meta):
        checkpoint.check_layout(meta, workdir)
        check_identity(meta.get("run_identity"), identity, workdir)
        other_data = other_dataset(meta, dataset.fingerprint, dataset.stats.to_json())
        if other_data:
            raise CheckpointError(f"{workdir} holds a run trained on other data ({other_data}); resuming "
                                             "would train it on different images: point --config.data.* (or "
                                             "TFDS_DATA_DIR) at the data it trained on, or use a fresh --workdir")
        differing = incompatible_run(meta, config, list(trainer.plan.seeds), trainer.choices)
        if differing:
            raise CheckpointError(
                f"{workdir} holds checkpoints of a different run ({'; '.join(differing)}); "
                "use a fresh --workdir, or restore those settings to resume")

    restored = ckpt.restore(template, check_meta=refuse_other_runs, log=say, set_aside_damaged=True)
    if restored is None:
        return TrainingRun(config, workdir, trainer, dataset, trainer.init_state(), identity=identity)
    tree, meta, step = restored
    state = trainer.place(checkpoint.from_tree(shapes, tree["train_state"]))
    epoch_metrics = trainer.place(checkpoint.from_tree(template["epoch_metrics"], tree["epoch_metrics"]))
    run = TrainingRun(config, workdir, trainer, dataset, state, epoch_metrics, meta["history"], step, restored=True,
                      identity=identity,
                      epoch_train_s=meta.get("epoch_train_s") if step % trainer.plan.steps_per_epoch else 0.0)
    say(f"resumed from checkpoint at step {step}, {trainer.plan.resume_point(step)} "
              f"({len(run.history)} of {config.num_epochs} epochs done), from {workdir / 'checkpoints'}")
    rounding = {k: (v, trainer.choices[k]) for k, v in meta.get("step_choices", {}).items()
                if k in trainer.choices and v != trainer.choices[k]}
    if rounding:
        say("note: the step is built differently from the saved run's ("
                  + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in rounding.items())
                  + "): the same function, rounded differently, so not bit-identical to an uninterrupted run")
    return run


def say_where_it_moved(history: list[dict], context: dict, say: Callable[[str], None]) -> None:
    """Warns when a resumed run's last epoch was trained on another machine or by other code than `context`
    (machine.run_context()): the records keep saying which, but epoch times stop being comparable, and the rounding
    may differ."""
    last = history[-1] if history else {}
    if last.get("machine", context["machine"]) != context["machine"]:
        say(f"warning: this run's epoch {last['epoch']} was trained on {last['machine']}; it resumes on "
            f"{context['machine']}: its epoch times mix machines (each epoch's record names its machine)")
    if last.get("commit", context["commit"]) != context["commit"]:
        say(f"note: this run's epoch {last['epoch']} was trained by the code of commit {last['commit']}; it "
            f"resumes with {context['commit']} (each epoch's record names its commit)")


def epochs_to_train(run: TrainingRun, say: Callable[[str], None]) -> range:
    """The epochs (1-based) left to train: from the one the state's step falls in, to `num_epochs`."""
    left = run.trainer.plan.epochs_left(run.step)
    if run.history and not left:
        say(f"nothing to train: the run in {run.workdir} has already trained {len(run.history)} epochs, past "
                  f"num_epochs={run.config.num_epochs}; raise --config.num_epochs to train further")
    return left
