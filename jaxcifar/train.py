"""Training: `python -m jaxcifar.train --config configs/vgg.py --workdir runs/vgg`.

The entry point and the run's orchestration: workdir lock, dataset, resume, the epoch loop's logging,
checkpoints and report, signals; the step itself is step.py, its compiled loop trainer.py.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from pathlib import Path

import jax
import ml_collections

from jaxcifar import config as config_lib
from jaxcifar import checkpoint, data, errors, models, report, workdir as workdir_lib
from jaxcifar import distributed, runlog
from jaxcifar import step as step_lib
from jaxcifar.runlog import RunLog
from jaxcifar.step import TrainState
from jaxcifar.trainer import Trainer


def load_dataset(config, log=print) -> data.Preprocessed:
    d = config.data
    md5s = data.read_md5_file(d.md5_file) if d.md5_file else data.OFFICIAL_MD5
    return data.load_preprocessed(d.data_dir or None, d.cache_dir or None, d.preprocess, d.archive or None, md5s, log=log)


def load_dataset_once(config, log=print) -> data.Preprocessed:
    """`load_dataset`; with several processes, process 0 prepares and caches first while the others wait,
    so that they only read what it wrote (the data and cache folders may be shared)."""
    if jax.process_count() == 1:
        return load_dataset(config, log)
    dataset = load_dataset(config, log) if distributed.is_writer() else None
    distributed.barrier("dataset prepared")
    return dataset if dataset is not None else load_dataset(config, log)


class TrainingInterrupted(RuntimeError):
    """SIGINT/SIGTERM arrived; the state was saved and the run can be resumed."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step} after saving; "
                         "run the same command again to resume")
        self.signum = signum


class StopFlag:
    """Turns SIGINT/SIGTERM into a flag the loop checks between steps: the run saves, then stops.

    A second signal exits at once with one line, without waiting for that save: orbax writes a save
    under a temporary name, so the interrupted one is simply absent and the previous one is intact.
    """

    def __init__(self):
        self.signum = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:
            print(f"\njaxcifar: second {signal.Signals(signum).name}: exiting without waiting for the save in "
                  "progress; the last complete checkpoint is kept, and the same command resumes from it",
                  file=sys.stderr, flush=True)
            hard_exit(128 + signum)
        self.signum = signum

    def __call__(self) -> bool:
        """Whether to stop; with several processes, whether any of them was signalled (all stop together)."""
        agreed = distributed.any_process(self.signum is not None)
        if agreed and self.signum is None:
            self.signum = signal.SIGTERM  # another process's signal: stop and exit as if this one had it
        return agreed

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Trains `config` in `workdir`, resuming from its latest intact checkpoint if there is one.

    One training run per workdir: another one holding it is refused (workdir.WorkdirLock, taken by
    process 0). Problems the user can fix raise errors.JaxcifarError; log.txt records them too.
    """
    config_lib.validate(config)
    writer = distributed.is_writer()  # of several processes, only process 0 writes files (orbax saves aside)
    workdir = workdir_lib.make_workdir(workdir) if writer else Path(workdir)
    with contextlib.ExitStack() as stack:  # closes in reverse: pending saves, reporter, checkpointer, log, lock
        lock = workdir_lib.WorkdirLock(workdir)
        if writer:
            stack.enter_context(lock)  # before the log opens: a refused run writes nothing
        log = RunLog(workdir, config_lib.seed_list(config), writer=writer)
        stack.callback(log.close)
        try:
            if lock.stale:
                log.print(f"warning: took over the workdir lock of a run that ended without releasing it "
                          f"({lock.stale}: killed or crashed)")
            enable_compile_cache(config.compile_cache_dir)
            ckpt = checkpoint.Checkpointer(workdir, config.keep_checkpoints)
            stack.callback(ckpt.close)
            reporter = report.BackgroundReporter(enabled=writer)  # plotting overlaps the next epoch
            stack.callback(reporter.close)
            stack.callback(ckpt.wait)  # exit waits for pending saves, and reports a failed one
            with StopFlag() as stop:
                return _train(config, workdir, log, ckpt, stop, reporter, stack)
        except errors.JaxcifarError as e:
            log.write(f"error: {e}")  # the command line prints it; the log keeps it with the run
            raise


def enable_compile_cache(path: str) -> None:
    """JAX's persistent compilation cache, so restarts and resumes do not recompile."""
    if path == "none":
        return
    path = path or os.environ.get("JAXCIFAR_COMPILE_CACHE") or str(Path(data.default_cache_dir()) / "xla")
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def optimizer_state(config, epoch: int, step: int, lr: float) -> dict:
    """train.lua's optimState as the report shows it, plus where the run stands."""
    o = config.optimizer
    return {"learningRate": lr, "learningRateDecay": o.learning_rate_decay, "weightDecay": o.weight_decay,
            "momentum": o.momentum, "evalCounter": step, "epoch": epoch, "schedule": o.schedule}


def save(ckpt: checkpoint.Checkpointer, config, dataset: data.Preprocessed, state: TrainState, acc: dict,
         epochs_done: int, history: list, choices: dict, is_best: bool = False) -> None:
    """Starts the asynchronous save of the run as it stands after `epochs_done` epochs (plus `acc`'s steps)."""
    step = int(state.step[0])
    meta = {"epoch": epochs_done, "step": step, "history": history, "stats": dataset.stats.to_json(),
            "fingerprint": dataset.fingerprint, "config": config.to_dict(), "seeds": config_lib.seed_list(config),
            "layout": checkpoint.LAYOUT, "step_choices": choices}
    ckpt.save(step, checkpoint.to_tree({"train_state": state, "epoch_metrics": acc}), meta, is_best=is_best)


def _train(config, workdir: Path, log: RunLog, ckpt: checkpoint.Checkpointer, stop: StopFlag,
           reporter: report.BackgroundReporter, closing: contextlib.ExitStack) -> TrainState:
    seeds = config_lib.seed_list(config)
    runs = f"seeds {','.join(map(str, seeds))} in one program" if len(seeds) > 1 else f"seed {seeds[0]}"
    log.print(f"jaxcifar: {config.model}, {runs}, on {jax.device_count()} {jax.devices()[0].platform} device(s); "
              f"workdir {workdir}")
    dataset = load_dataset_once(config, log.print)
    trainer = Trainer(config, dataset)
    state = trainer.init_state()
    acc = None
    history: list[dict] = []

    # Resume order: (1) the newest readable checkpoint, (2) refuse one of another run,
    # (3) state, partial-epoch metrics and history from it, (4) logs rewritten from that history,
    # so epochs logged after the save are neither duplicated nor missing.
    template = checkpoint.to_tree({"train_state": state, "epoch_metrics": trainer.zero_metrics()})

    def refuse_other_runs(meta):
        checkpoint.check_layout(meta, workdir)
        differing = checkpoint.incompatible_run(meta, config, seeds, trainer.choices)
        if differing:
            raise checkpoint.CheckpointError(
                f"{workdir} holds checkpoints of a different run ({'; '.join(differing)}); "
                "use a fresh --workdir, or restore those settings to resume")

    restored = ckpt.restore(template, check_meta=refuse_other_runs, log=log.print, set_aside_damaged=True)
    if restored is not None:
        tree, meta, step = restored
        state = trainer.place(checkpoint.from_tree(state, tree["train_state"]))
        acc = trainer.place(checkpoint.from_tree(trainer.zero_metrics(), tree["epoch_metrics"]))
        history = meta["history"]
        log.print(f"resumed from checkpoint at step {step} (epoch {meta['epoch']}, "
                  f"{len(history)} epochs done) in {workdir / 'checkpoints'}")
        rounding = {k: (v, trainer.choices[k]) for k, v in meta.get("step_choices", {}).items()
                    if k in trainer.choices and v != trainer.choices[k]}
        if rounding:
            log.print("note: the step is built differently from the saved run's ("
                      + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in rounding.items())
                      + "): the same function, rounded differently, so not bit-identical to an uninterrupted run")
    elif (workdir / "metrics.jsonl").exists() and (workdir / "metrics.jsonl").read_text().strip():
        log.print(f"warning: {workdir} holds the metrics of an earlier run but no checkpoint; starting afresh "
                  "(the old metrics move to metrics.discarded.jsonl)")
    log.rewrite(history)
    one = step_lib.replica(state, 0)
    choices = ", ".join(f"{k} {v}" for k, v in trainer.choices.items())
    log.print(f"{models.count_params(one.params):,} parameters per run; {trainer.steps_per_epoch} steps of "
              f"{config.batch_size} per epoch; {config.num_epochs} epochs; step: {choices}")
    summary = report.model_summary(one.params, one.batch_stats)
    resumed_step = 0 if restored is None else restored[2]  # events logged after that save are hidden, then rewritten
    scalars = report.ScalarWriter(workdir / "tensorboard", purge_after=resumed_step) if log.writer else None
    if scalars is not None:
        closing.callback(scalars.close)

    start_epoch = int(state.step[0]) // trainer.steps_per_epoch + 1
    if history and start_epoch > config.num_epochs:
        log.print(f"nothing to train: the run in {workdir} has already trained {len(history)} epochs, past "
                  f"num_epochs={config.num_epochs}; raise --config.num_epochs to train further")
    for epoch in range(start_epoch, config.num_epochs + 1):
        ckpt.check()  # a save that failed in the background stops the run here, not at its end
        lr = step_lib.learning_rate_at(config, trainer.steps_per_epoch, (epoch - 1) * trainer.steps_per_epoch)
        log.print(f"==> epoch {epoch}/{config.num_epochs} [batch {config.batch_size}, lr {lr:.6g}]")
        first = int(state.step[0]) - (epoch - 1) * trainer.steps_per_epoch
        t0 = time.time()
        bar, progress = runlog.progress_bar(epoch, trainer.steps_per_epoch, first)
        try:
            state, acc, finished = trainer.train_epoch(state, epoch, acc, progress, stop)
        finally:
            bar.close()
        if not finished:  # stopped mid-epoch: keep the partial epoch's metrics too
            save(ckpt, config, dataset, state, acc, epoch - 1, history, trainer.choices)
            ckpt.wait()
            raise TrainingInterrupted(stop.signum, int(state.step[0]))
        train_time = time.time() - t0
        train_loss, train_conf = trainer.epoch_summary(acc)
        acc = None
        t1 = time.time()
        test_conf, test_loss = trainer.evaluate(state.params, state.batch_stats)
        eval_time = time.time() - t1
        step = int(state.step[0])
        record = runlog.epoch_record(epoch=epoch, step=step, lr=lr, seeds=seeds, train_loss=train_loss,
                              train_conf=train_conf, test_loss=test_loss, test_conf=test_conf, train_time=train_time,
                              eval_time=eval_time, images=(trainer.steps_per_epoch - first) * config.batch_size)
        runlog.log_epoch(log, record)
        is_best = all(record["test_accuracy"] > h["test_accuracy"] for h in history)
        history.append(record)
        # Save before logging: the save waits for the previous one, so a logged epoch's predecessor is
        # always on disk and a kill loses at most the last logged epoch and the one in progress.
        if epoch % config.checkpoint_every_epochs == 0 or epoch == config.num_epochs or is_best:
            save(ckpt, config, dataset, state, trainer.zero_metrics(), epoch, history, trainer.choices, is_best)
        log.epoch(record)
        reporter.submit(workdir, list(history), config.to_dict(), optimizer_state(config, epoch, step, lr),
                        summary, data.CLASS_NAMES)
        if scalars is not None:
            scalars.write(step, runlog.scalar_summary(record))
        if stop():
            ckpt.wait()
            raise TrainingInterrupted(stop.signum, step)
    return state


def main(argv) -> None:
    from absl import flags, logging

    del argv
    logging.set_verbosity(logging.WARNING)  # orbax and tfds narrate every file at INFO
    cfg, workdir = flags.FLAGS.config, flags.FLAGS.workdir
    try:
        distributed.initialize_distributed()
        train_and_evaluate(cfg, workdir)
    except TrainingInterrupted as e:
        print(f"jaxcifar: {e}", file=sys.stderr)
        exit_now(128 + e.signum)
    except errors.JaxcifarError as e:
        print(f"error: {e}", file=sys.stderr)
        exit_now(2)


def exit_now(code: int) -> None:
    """sys.exit, unless a failed save left orbax threads waiting for signals that never come: a normal exit joins
    them and hangs (measured: alive after 60 s), so the process ends without joining them."""
    stuck = [t for t in threading.enumerate() if t.is_alive() and not t.daemon and t is not threading.main_thread()]
    if stuck:
        hard_exit(code)
    sys.exit(code)


def hard_exit(code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _define_flags() -> None:
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Training config file, e.g. configs/vgg.py.", lock_config=True)
    flags.DEFINE_string("workdir", None, "Folder for logs, checkpoints and the report.")
    flags.mark_flags_as_required(["config", "workdir"])


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with every mistake in the command line as one line and exit code 2."""
    from absl import flags

    config_file = _flag_value(argv, "--config")
    overrides = [a.split("=")[0] for a in argv if a.startswith("--config.")]
    if config_file is None and overrides:
        _usage_error(f"{overrides[0]} is given without --config; name the config file it overrides first, e.g. "
                     f"--config configs/vgg.py {overrides[0]}=...")
    if config_file is not None and not Path(config_file.split(":")[0]).is_file():
        _usage_error(f"--config {config_file}: no such file; give a config file such as configs/vgg.py")
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:  # a bad value or a missing flag
        text = str(e).strip().splitlines()
        missing = next((f for f in ("--config", "--workdir") if f"{f}=None" in text[0]), None)
        _usage_error(f"{missing} is required" if missing else text[0] + (f" ({text[-1].strip()})" if len(text) > 1 else ""))
    except AttributeError as e:  # ml_collections: an override naming no field of the config
        if "get_config" in str(e):
            _usage_error(f"--config {config_file}: the file defines no get_config(); a config file returns its "
                         "ml_collections.ConfigDict from get_config(), as configs/vgg.py does")
        key = str(e.args[0]).strip("'\"") if e.args else "?"
        key = key.strip("'\"")
        bad = next((a.split("=")[0] for a in argv if a.startswith("--config.") and a.split("=")[0].endswith("." + key)),
                   f"--config...{key}")
        _usage_error(f"{bad}: the config has no field {key!r}; check the spelling against {config_file or 'the config file'}")
    except Exception as e:  # loading the config file ran its code: a syntax or runtime error there is the user's
        _usage_error(f"--config {config_file}: cannot be loaded ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                     "fix the file or give another")


def _flag_value(argv: list[str], name: str) -> str | None:
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def _usage_error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main, flags_parser=parse_flags)
