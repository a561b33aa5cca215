"""Train a CIFAR-10 recipe of cifar.torch; running the same command again resumes it.

usage: python -m jaxcifar.train --config configs/vgg.py --workdir runs/vgg [--config.FIELD=VALUE ...]

  --config     a recipe file: configs/quick.py (minutes on a CPU), vgg_fast.py (40 epochs), vgg.py (the original's
               300 epochs), nin.py and the ablations beside them
  --workdir    the run's folder: log.txt, metrics.jsonl/csv, report.html, TensorBoard events, checkpoints/
  --config.FIELD=VALUE  overrides one field, e.g. --config.num_epochs=2, --config.seeds=0,1,2,
               --config.data.archive=cifar-10-binary.tar.gz; the fields, their defaults and meaning are in
               jaxcifar/config.py (base_config) and docs/training.md

Ctrl-C (or SIGTERM) stops after the compiled call in progress and saves; a second one exits at once.
"""

# The run's orchestration lives here: workdir lock, dataset, resume, and the epoch loop with its saves, logs and
# report. The step itself is step.py, its compiled loop trainer.py; the command line is cli.py, stopping on a
# signal signals.py.

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import time
from pathlib import Path

import jax
import ml_collections

from jaxcifar import cli, config as config_lib, distributed, errors
from jaxcifar.data import archive, cache
from jaxcifar.run import checkpoint, machine, report, results, resume, runlog, workdir as workdir_lib
from jaxcifar.nn import models, step as step_lib
from jaxcifar.run.resume import TrainingRun
from jaxcifar.run.runlog import RunLog
from jaxcifar.run.signals import exit_now, StopFlag, TrainingInterrupted
from jaxcifar.nn.step import TrainState
from jaxcifar.run.trainer import Trainer


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       summary: runlog.RunSummary | None = None, config_name: str = "run") -> TrainState:
    """Trains `config` in `workdir`, resuming from its latest intact checkpoint if there is one.

    One training run per workdir: another one holding it is refused (workdir.WorkdirLock, taken by
    process 0). Problems the user can fix raise errors.JaxcifarError; log.txt records them too.
    `summary`, if given, is filled in as the run goes, so that its last line can be said however it ends.
    `config_name` names the result file when `results.dir` is set and `results.name` is not (the command line gives
    its --config file's name).
    """
    config_lib.validate(config)  # the one validation, before anything is read
    summary = summary if summary is not None else runlog.RunSummary(Path(workdir), config.num_epochs)
    summary.num_epochs = config.num_epochs
    if config.results.dir and not config.results.name:
        config.results.name = config_name
    writer = summary.writer = distributed.is_writer()  # of several processes, only process 0 writes files
    held_nothing = writer and workdir_lib.holds_nothing(workdir)
    existed = held_nothing and Path(workdir).is_dir()  # an empty folder (a missing one is made, then removed)
    workdir = workdir_lib.make_workdir(workdir) if writer else Path(workdir)
    try:
        return _lock_and_train(config, workdir, writer, summary)
    except (errors.JaxcifarError, TrainingInterrupted):
        # A start refused (bad data or config found after the lock) or stopped before training anything leaves a
        # workdir that held nothing as it was, not with checkpoints/, best/, log.txt and train.lock in it.
        if held_nothing and not summary.training_started:  # a run that trained keeps its log of what happened
            workdir_lib.clear_if_untrained(workdir, remove=not existed)
        raise


def _lock_and_train(config, workdir: Path, writer: bool, summary: runlog.RunSummary) -> TrainState:
    with contextlib.ExitStack() as stack:  # closes in reverse: pending saves, reporter, checkpointer, log, lock
        lock = workdir_lib.WorkdirLock(workdir)
        if writer:
            stack.enter_context(lock)  # before the log opens: a refused run writes nothing
        log = RunLog(workdir, writer=writer)
        stack.callback(log.close)
        try:
            if lock.stale:
                log.print(f"warning: took over the workdir lock of a run that ended without releasing it "
                          f"({lock.stale}: killed or crashed)")
            enable_compile_cache(config.compile_cache_dir)
            ckpt = checkpoint.Checkpointer(workdir, config.keep_checkpoints)
            stack.callback(ckpt.close)
            if writer:  # it holds the lock: no other run of this workdir is saving
                ckpt.remove_leftovers(log.print)
            reporter = report.BackgroundReporter(enabled=writer)  # plotting overlaps the next epoch
            stack.callback(reporter.close)
            stack.callback(ckpt.wait)  # exit waits for pending saves, and reports a failed one
            with StopFlag() as stop:
                return _train(config, workdir, log, ckpt, stop, reporter, stack, summary)
        except errors.JaxcifarError as e:
            log.write(f"error: {e}")  # the command line prints it; the log keeps it with the run
            raise


def enable_compile_cache(path: str) -> None:
    """JAX's persistent compilation cache, so restarts and resumes do not recompile."""
    path = path or os.environ.get("JAXCIFAR_COMPILE_CACHE") or str(Path(cache.default_cache_dir()) / "xla")
    if path == "none":  # from the config or the environment alike
        return
    jax.config.update("jax_compilation_cache_dir", path)
    # Every program, not only those over JAX's default 1 s of compiling: a start compiles ~60 small ones (init,
    # placement, metrics, checksums) that the threshold leaves out. Measured on the tiny config, second start: 15.2 s
    # wall with the 1 s threshold, 10.3-12.1 s with none, for 1.1 MB of cache instead of 0.7 MB (AMD EPYC).
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def optimizer_state(config, epoch: int, step: int, lr: float) -> dict:
    """train.lua's optimState as the report shows it, plus where the run stands."""
    o = config.optimizer
    return {"learningRate": lr, "learningRateDecay": o.learning_rate_decay, "weightDecay": o.weight_decay,
            "momentum": o.momentum, "evalCounter": step, "epoch": epoch, "schedule": o.schedule}


def _train(config, workdir: Path, log: RunLog, ckpt: checkpoint.Checkpointer, stop: StopFlag,
           reporter: report.BackgroundReporter, closing: contextlib.ExitStack,
           summary: runlog.RunSummary) -> TrainState:
    """The recipe: restore or initialise, then for each epoch train, evaluate, save, log and report."""
    log.print(f"jaxcifar: {config.model} on {jax.device_count()} {jax.devices()[0].platform} device(s); workdir "
              f"{workdir}")
    dataset = cache.load_dataset_once(config, log.print)
    run = resume.restore_or_init(config, workdir, Trainer(config, dataset), dataset, ckpt, log.print)
    plan = run.trainer.plan
    if not run.restored and (workdir / "metrics.jsonl").exists() and (workdir / "metrics.jsonl").read_text().strip():
        log.print(f"warning: {workdir} holds the metrics of an earlier run but no checkpoint; starting afresh "
                  "(the old metrics move to metrics.discarded.jsonl)")
    log.rewrite(run.history, plan.seeds)  # the logs hold exactly the restored history (resume order, restore_or_init)
    summary.follow(run.history)
    stop.describe = functools.partial(stop_announcement, run.trainer)
    model_summary = describe_run(run, log)
    scalars = open_scalars(workdir, run.history) if log.writer else None
    if scalars is not None:
        closing.callback(scalars.close)
    context = machine.run_context()
    resume.say_where_it_moved(run.history, context, log.print)
    evaluated = None  # when the last epoch's evaluation ended: what follows until the next step is bookkeeping
    if stop():  # during preparation, preprocessing or restoring: nothing has been trained, so nothing to save
        raise TrainingInterrupted(stop.signum, run.step, saved=False)
    summary.training_started = True
    try:
        for epoch in resume.epochs_to_train(run, log.print):
            ckpt.check()  # a save that failed in the background stops the run here, not at its end
            started = time.monotonic()
            record = train_and_evaluate_epoch(run, epoch, ckpt, log, stop, context)
            if evaluated is None:  # the first epoch this process trains: what came before it is start-up
                record["startup_s"] = started - summary.started
            else:
                record["bookkeeping_s"] = started - evaluated
            evaluated = time.monotonic()
            saved = save_log_and_report(run, record, ckpt, log, reporter, scalars, model_summary, stopping=stop())
            if stop():  # asked again: a signal during the bookkeeping was announced as "evaluated and saved" too
                if not saved:
                    run.save(ckpt, epoch)
                if epoch < config.num_epochs:  # during the last epoch's evaluation: finished, and saved
                    ckpt.wait()
                    raise TrainingInterrupted(stop.signum, record["step"])
    except TrainingInterrupted:
        if log.writer and run.config.report_every_epochs == 0 and run.history:  # the report waits for a stop
            submit_report(run, reporter, model_summary)
        raise
    return run.state


def open_scalars(workdir: Path, history: list[dict]) -> report.ScalarWriter:
    """TensorBoard's writer, holding exactly the epochs of `history`: what earlier writers left (epochs logged after
    the last save, or lost in a writer's buffer to a hard stop) is hidden and the history written again, as the
    metrics files are rewritten; once it is, the earlier writers' files go (each start added one, each holding the
    whole history): one file, rewritten."""
    earlier = sorted((workdir / "tensorboard").glob("events.out.tfevents.*"))
    scalars = report.ScalarWriter(workdir / "tensorboard", purge_after=0)
    for record in history:
        scalars.write(record["step"], runlog.scalar_summary(record))
    for events in earlier:
        events.unlink(missing_ok=True)
    return scalars


def stop_announcement(trainer: Trainer) -> str:
    """What a stop signal's acknowledgement says happens next, from where the loop has dispatched to."""
    return trainer.plan.stop_landing(trainer.dispatched_step, 1 if distributed.single_process() else jax.process_count(),
                                     trainer.epoch_in_progress)


def describe_run(run: TrainingRun, log: RunLog) -> str:
    """Logs the network's size and the step's build; returns the model summary the report shows."""
    trainer, config = run.trainer, run.config
    one = step_lib.replica(run.state, 0)
    choices = ", ".join(f"{k} {v}" for k, v in trainer.choices.items())
    seeds = trainer.plan.seeds
    runs = f"seeds {','.join(map(str, seeds))} in one program" if len(seeds) > 1 else f"seed {seeds[0]}"
    log.print(f"{runs}; {models.count_params(one.params):,} parameters per run; {trainer.plan.steps_per_epoch} steps of "
              f"{config.batch_size} per epoch; {config.num_epochs} epoch{'s' if config.num_epochs > 1 else ''}; step: {choices}")
    order = step_lib.layer_order(trainer.model, trainer.train_images.shape[1:])
    return report.model_summary(one.params, one.batch_stats, order)


def train_and_evaluate_epoch(run: TrainingRun, epoch: int, ckpt: checkpoint.Checkpointer, log: RunLog,
                             stop: StopFlag, context: dict) -> dict:
    """Trains the rest of `epoch` and evaluates on the test set; returns the epoch's record (`context`: where and by
    what code, machine.run_context()).

    A stop signal mid-epoch saves the run with the partial epoch's metrics and its training time so far, and
    raises TrainingInterrupted; the resumed epoch's record then times the whole epoch.
    """
    config, trainer, plan = run.config, run.trainer, run.trainer.plan
    lr = step_lib.learning_rate_at(config, plan.steps_per_epoch, plan.epoch_start(epoch))
    log.print(f"==> epoch {epoch}/{config.num_epochs} [batch {config.batch_size}, lr {lr:.6g}]"
              + runlog.run_eta(run.history, config.num_epochs - epoch + 1, compiled_in=run.epochs_restored))
    first = run.step - plan.epoch_start(epoch)
    t0 = time.time()
    bar, progress = runlog.progress_bar(epoch, plan.steps_per_epoch, first)
    try:
        run.state, run.epoch_metrics, finished = trainer.train_epoch(run.state, epoch, run.epoch_metrics, progress,
                                                                     stop)
    finally:
        bar.close()
    if not finished:
        if run.epoch_train_s is not None:
            run.epoch_train_s += time.time() - t0
        run.save(ckpt, epoch - 1)
        ckpt.wait()
        raise TrainingInterrupted(stop.signum, run.step)
    train_time = time.time() - t0
    if run.epoch_train_s is None:  # resumed from a save without the time before it: the part timed here only
        timed_steps = plan.steps_per_epoch - first
    else:
        timed_steps, train_time = plan.steps_per_epoch, train_time + run.epoch_train_s
    run.epoch_train_s = 0.0
    train_loss, train_conf = trainer.epoch_summary(run.epoch_metrics)
    run.epoch_metrics = None
    t1 = time.time()
    test_conf, test_loss = trainer.score_test_set(run.state.params, run.state.batch_stats)
    return runlog.epoch_record(epoch=epoch, step=run.step, lr=lr, seeds=list(plan.seeds),
                               train_loss=train_loss, train_conf=train_conf, test_loss=test_loss, test_conf=test_conf,
                               train_time=train_time, eval_time=time.time() - t1,
                               images=timed_steps * config.batch_size, context=context)


def save_log_and_report(run: TrainingRun, record: dict, ckpt: checkpoint.Checkpointer, log: RunLog,
                        reporter: report.BackgroundReporter, scalars: report.ScalarWriter | None, summary: str,
                        stopping: bool = False) -> bool:
    """Saves the run when a save is due (`checkpoint_every_epochs`, or `checkpoint_every_s` seconds after the last
    one), at the end, on a stop (`stopping`) and when the test accuracy is its best (`save_best`); then logs the
    epoch, submits the report (every `report_every_epochs`, at the end, on a stop) and rewrites the result file.
    Returns whether it saved."""
    config, epoch = run.config, record["epoch"]
    runlog.log_epoch(log, record)
    is_best = config.save_best and all(record["test_accuracy"] > h["test_accuracy"] for h in run.history)
    run.history.append(record)
    last = epoch == config.num_epochs
    if config.checkpoint_every_s > 0:
        due = time.monotonic() - run.last_save_at >= config.checkpoint_every_s
    else:
        due = epoch % config.checkpoint_every_epochs == 0
    # Save before logging: the save waits for the previous one, so a logged epoch's predecessor is
    # always on disk and a kill loses at most the last logged epoch and the one in progress.
    saving = due or last or stopping or is_best
    if saving:
        run.save(ckpt, epoch, is_best)
    log.epoch(record)
    every = config.report_every_epochs
    if last or stopping or (every and epoch % every == 0):
        submit_report(run, reporter, summary)
    if scalars is not None:
        scalars.write(record["step"], runlog.scalar_summary(record))
    if config.results.dir and log.writer:
        results.write_result(results.run_result(run.history, config.to_dict(), result_name(config), run.workdir),
                             Path(config.results.dir))
    return saving


def submit_report(run: TrainingRun, reporter: report.BackgroundReporter, summary: str) -> None:
    config, record = run.config, run.history[-1]
    reporter.submit(run.workdir, list(run.history), config.to_dict(),
                    optimizer_state(config, record["epoch"], record["step"], record["learning_rate"]), summary,
                    archive.CLASS_NAMES, run.trainer.choices)


def result_name(config) -> str:
    """The NAME of the run's result file: `results.name`, else the --config file's, with the dtype if not fp32."""
    name = config.results.name  # train_and_evaluate names it when results.dir is set
    return name if config.dtype == "float32" else f"{name}-{config.dtype}"


def main(argv) -> None:
    from absl import flags, logging

    del argv
    logging.set_verbosity(logging.WARNING)  # orbax and tfds narrate every file at INFO
    cfg, workdir = flags.FLAGS.config, flags.FLAGS.workdir
    # The run's clock starts with the process: the summary's time and the first epoch's startup_s count the imports.
    summary = runlog.RunSummary(Path(workdir), 0, started=time.monotonic() - machine.process_age_s())
    code, outcome = 0, "finished"
    try:
        from ml_collections import config_flags

        distributed.initialize_distributed()
        train_and_evaluate(cfg, workdir, summary, Path(config_flags.get_config_filename(flags.FLAGS["config"])).stem)
    except TrainingInterrupted as e:
        code = 128 + e.signum
        outcome = (f"stopped by {signal.Signals(e.signum).name} at step {e.step}, "
                   + ("saved (the same command resumes)" if e.saved else "before training anything; nothing new to "
                      "save (the same command " + ("resumes)" if e.step else "starts it)")))
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - one line each, as every command says it
        code, line = cli.failure(e, summary.workdir)
        outcome = "interrupted" if code == 130 else "failed"  # Ctrl-C before or after the stop handlers
        if code != 130:
            print(line, file=sys.stderr)
    if summary.writer:
        print(summary.line(outcome), flush=True)
    elif code:  # the other processes of a multi-process run say how they ended; process 0 sums the run up
        print(f"jaxcifar: process {jax.process_index()}: {outcome}", flush=True)
    exit_now(code)


if __name__ == "__main__":
    from absl import app, flags

    cli.define_flags()
    flags.adopt_module_key_flags(cli)  # --help lists --config and --workdir (not only --helpfull)
    app.run(main, flags_parser=cli.parse_flags)
