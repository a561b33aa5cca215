"""Scripted evaluation of a saved run: `python -m jaxcifar.evaluate --workdir W [--step N | --best] [--seed S]`.

Prints accuracy and the confusion matrix in the seed's layout (`--json PATH` writes them too);
a run of several seeds is evaluated seed by seed, then summarized as mean +- std.
Exits non-zero on any failure. Checkpoints restore onto whatever devices this machine has.
"""

from __future__ import annotations

if __name__ == "__main__":  # before the heavy imports: Ctrl-C while they load is one line too
    from jaxcifar import cli

    cli.interrupt_exits_quietly()

import argparse
import functools
import json
import os
import sys
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxcifar.data import archive, cache, preprocess
from jaxcifar.nn import backends, layers, mesh as mesh_lib, metrics, models, scoring, step as step_lib
from jaxcifar.run import checkpoint, resume, workdir as workdir_lib
from jaxcifar import errors
from jaxcifar.errors import CheckpointDamaged, CheckpointError, ConfigError


class TrainedModel(NamedTuple):
    model: object
    variables: dict  # {"params", "batch_stats"} of one seed's run
    config: ml_collections.ConfigDict
    stats: preprocess.NormalizationStats
    meta: dict
    step: int
    seed: int


def load_trained(workdir: str | Path, step: int | None = None, best: bool = False,
                 seed: int | None = None) -> TrainedModel:
    """The model and variables of one seed's run in a checkpoint of `workdir` (latest; first seed by default)."""
    runs = load_all_seeds(workdir, step, best)
    if seed is None:
        return runs[0]
    for run in runs:
        if run.seed == seed:
            return run
    raise ConfigError(f"--seed {seed}: {workdir} holds the runs of seeds {', '.join(str(r.seed) for r in runs)}")


def load_all_seeds(workdir: str | Path, step: int | None = None, best: bool = False) -> list[TrainedModel]:
    """Every seed's run in a checkpoint of `workdir` (latest by default), in the order trained.

    Reads only (nothing is written into `workdir`), so it works while the run trains: the latest save, replaced by a
    newer one (and deleted) while it was read, is read again as the newest. A damaged checkpoint is refused, not
    fallen back from: name another with `step`.
    """
    workdir = workdir_lib.existing_workdir(workdir)
    for attempt in range(REREADS + 1):
        try:
            return _load_all_seeds(workdir, step, best)
        except CheckpointDamaged as e:
            if step is not None or attempt == REREADS or e.step is None or _still_there(workdir, e.step, best):
                raise
            # Rotated away mid-read by the training run beside us: not damage. Read the newest instead.


REREADS = 3  # a save rotated away mid-read is read again as the newest, at most this often


def _still_there(workdir: Path, step: int, best: bool) -> bool:
    return (workdir / ("best" if best else "checkpoints") / str(step)).exists()


def _load_all_seeds(workdir: Path, step: int | None, best: bool) -> list[TrainedModel]:
    ckpt = checkpoint.Checkpointer(workdir, read_only=True)
    try:
        steps = ckpt.steps(best)
        if not steps:
            raise CheckpointError(
                f"no {'best ' if best else ''}checkpoints in {workdir}; " + (
                    "the run saves one there when an epoch improves the test accuracy; drop --best to read the latest"
                    if best and ckpt.steps() else f"train first with `python -m jaxcifar.train --workdir {workdir} ...`"))
        step = max(steps) if step is None else step
        try:
            meta = ckpt.read_meta(step, best)
            checkpoint.check_layout(meta, workdir)
            config = ml_collections.ConfigDict(meta["config"])
            model = step_lib.build_model(config)
            seeds = meta["seeds"]
            # Only what inference needs: the optimizer state and training metrics stay on disk.
            tree, meta, _ = ckpt.restore({"train_state": inference_template(model, len(seeds))}, step=step, best=best,
                                         partial=True)
        except CheckpointDamaged as e:
            raise CheckpointDamaged(f"{e}; not using it: {_other_saves(ckpt, steps, step, best)} (a resumed "
                                               "training run sets it aside and falls back by itself)", step=step) from None
    finally:
        ckpt.close()
    state = tree["train_state"]
    stats = preprocess.NormalizationStats.from_json(meta["stats"])
    return [TrainedModel(model, {"params": step_lib.replica(state["params"], k),
                                 "batch_stats": step_lib.replica(state["batch_stats"], k)}, config, stats, meta, step, s)
            for k, s in enumerate(seeds)]


def _other_saves(ckpt: checkpoint.Checkpointer, steps: list[int], step: int, best: bool) -> str:
    """Which other saves to name instead of a damaged one."""
    others = ckpt.steps() if best else [s for s in steps if s != step]
    best_steps = [] if best else ckpt.steps(best=True)
    if not others and not best_steps:
        return "no other checkpoint"
    if best:
        return f"drop --best to use the latest in checkpoints/, or pass --step with one of {others}"
    return " or ".join(([f"pass --step with one of {others}"] if others else [])
                       + ([f"--best (step {best_steps[-1]}, the best epoch's save in best/)"] if best_steps else []))


def inference_template(model, replicas: int) -> dict:
    """Shapes and dtypes (nothing computed) of {params, batch_stats} with a leading axis of `replicas`."""
    shapes = jax.eval_shape(lambda key: models.init_variables(model, key, archive.IMAGE_SHAPE), jax.random.key(0))
    return jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct((replicas, *s.shape), s.dtype), shapes)


def batch_statistics(model, variables: dict, images: np.ndarray, num_batches: int, batch_size: int, seed: int = 0,
                     dropout_seed: int | None = None):
    """Each of `num_batches` training batches' BatchNorm statistics (mean, unbiased variance per layer).

    The batches are a seeded random draw without flips, passed in train mode with dropout off, or,
    given `dropout_seed`, with dropout on as training sees them.
    """
    if num_batches * batch_size > len(images):
        raise ConfigError(f"re-estimating BatchNorm statistics from {num_batches} batches needs "
                          f"{num_batches * batch_size:,} images of batch {batch_size}, the split has {len(images):,}; "
                          f"use at most {len(images) // batch_size} batches")
    net = model if dropout_seed is not None else model.clone(dropout=False)
    momentum = layers.TorchBatchNorm.momentum
    zeros = jax.tree_util.tree_map(jnp.zeros_like, variables["batch_stats"])

    @functools.partial(jax.jit, compiler_options=backends.compiler_options())
    def batch_stats_of(params, x, key):
        # Starting from zeros, one update leaves momentum x (batch mean, unbiased variance).
        rngs = {} if key is None else {"dropout": key}
        _, updates = net.apply({"params": params, "batch_stats": zeros}, x, train=True, rngs=rngs,
                               mutable=["batch_stats"])
        return jax.tree_util.tree_map(lambda s: s / momentum, updates["batch_stats"])

    order = np.random.default_rng(seed).permutation(len(images))[: num_batches * batch_size]
    for i, rows in enumerate(order.reshape(num_batches, batch_size)):
        key = None if dropout_seed is None else jax.random.key(dropout_seed + i)
        yield batch_stats_of(variables["params"], images[np.sort(rows)], key)


def recompute_batch_stats(model, variables: dict, images: np.ndarray, num_batches: int, batch_size: int,
                          seed: int = 0) -> dict:
    """BatchNorm statistics re-estimated from `num_batches` training batches in train mode with dropout off.

    Each layer gets the plain average of the batches' means and unbiased variances (PyTorch's
    `momentum=None`), not a moving average. Not the seed's protocol (train.lua evaluates with the
    running statistics of training).
    """
    total = None
    for stats in batch_statistics(model, variables, images, num_batches, batch_size, seed):
        total = stats if total is None else jax.tree_util.tree_map(jnp.add, total, stats)
    return {"params": variables["params"],
            "batch_stats": jax.tree_util.tree_map(lambda s: s / num_batches, total)}


def score_saved_run(trained: TrainedModel, split: str = "test", data_dir: str | None = None,
                    cache_dir: str | None = None, recompute_bn_batches: int = 0, other_data: bool = False) -> dict:
    """Accuracy and confusion of `trained` on a split of the prepared dataset; a dataset other than the one it
    trained on is refused (OtherDataError) unless `other_data`."""
    cfg = trained.config
    dataset = cache.load_preprocessed(data_dir or cfg.data.data_dir or None, cache_dir or cfg.data.cache_dir or None,
                                     cfg.data.preprocess, md5s=None, log=lambda m: print(m, file=sys.stderr))
    differs = resume.other_dataset(trained.meta, dataset.fingerprint, dataset.stats.to_json())
    if differs and not other_data:
        raise errors.OtherDataError(f"checkpoint {trained.step} was trained on other data than {dataset.fingerprint} "
                                    f"({differs})")
    if differs:
        print(f"warning: evaluating on other data than the run trained on ({differs})", file=sys.stderr)
    images = dataset.test_images if split == "test" else dataset.train_images
    labels = dataset.test_labels if split == "test" else dataset.train_labels
    if recompute_bn_batches:
        trained = trained._replace(variables=recompute_batch_stats(
            trained.model, trained.variables, dataset.train_images, recompute_bn_batches, cfg.batch_size))
    mesh = mesh_lib.make_mesh(jax.devices())
    scorer = scoring.SplitScorer(trained.model, images, labels, num_classes=cfg.num_classes,
                                 batch_size=cfg.eval_batch_size, replicas=1, mesh=mesh,
                                 compiler_options=backends.compiler_options())
    one = jax.tree_util.tree_map(lambda x: np.asarray(x)[None], trained.variables)  # a replica axis of 1
    confusions, losses = scorer(one["params"], one["batch_stats"])
    confusion, loss = confusions[0].astype(np.int64), float(losses[0])
    summary = metrics.summarize(confusion)
    return {"workdir": None, "step": trained.step, "epoch": trained.meta["epoch"], "seed": trained.seed, "split": split,
            "images": int(len(labels)), "recomputed_bn_batches": recompute_bn_batches, "accuracy": summary["accuracy"],
            "loss": loss,
            "average_row_correct": summary["average_row_correct"],
            "average_rowucol_correct": summary["average_rowucol_correct"], "confusion": confusion.tolist()}


def summarize_seeds(results: list[dict]) -> dict:
    """One seed: its result. Several: the first's fields with the accuracies' mean, their std and each seed's result."""
    if len(results) == 1:
        return results[0]
    acc = np.array([r["accuracy"] for r in results])
    out = {k: v for k, v in results[0].items() if k not in ("seed", "confusion")}
    out.update({"seeds": [r["seed"] for r in results], "accuracy": float(acc.mean()),
                "accuracy_std": float(acc.std(ddof=1)),
                "confusion": np.sum([r["confusion"] for r in results], axis=0).tolist(), "per_seed": results})
    for k in ("average_row_correct", "average_rowucol_correct", "loss"):
        out[k] = float(np.mean([r[k] for r in results]))
    return out


def quiet_libraries() -> None:
    """Only errors from orbax and tfds: a reading tool reports its own problems, and orbax narrates read-only use."""
    from absl import logging

    logging.set_verbosity(logging.ERROR)


def check_writable_file(path: str) -> None:
    """Raises ConfigError unless `path` can be written (its folder exists and is writable; the file, if any, too)."""
    target = Path(path)
    folder = target.parent
    problem = ("is a folder" if target.is_dir() else
               f"its folder {folder} does not exist" if not folder.is_dir() else
               "it is not writable" if target.exists() and not os.access(target, os.W_OK) else
               f"its folder {folder} is not writable" if not target.exists() and not os.access(folder, os.W_OK | os.X_OK)
               else None)
    if problem:
        raise ConfigError(f"--json {path}: cannot write it ({problem}); give another path")


def print_result(result: dict, seeds: int) -> None:
    """The evaluation: what was scored, the accuracy, and the confusion matrix in the seed's layout."""
    print(f"{result['workdir']}: step {result['step']} (epoch {result['epoch']}), {result['split']} split, "
          f"{result['images']:,} images")
    if result["recomputed_bn_batches"]:
        print(f"BatchNorm statistics re-estimated from {result['recomputed_bn_batches']} training batches without "
              "dropout (not the seed's protocol: training's running statistics are replaced)")
    if seeds > 1:
        print(f"accuracy: {result['accuracy']:.2f} ± {result['accuracy_std']:.2f} % (mean ± std of {seeds} seeds); "
              "confusion summed over the seeds:")
    else:
        print(f"accuracy: {result['accuracy']:.2f} %")
    print(metrics.format_confusion(np.asarray(result["confusion"]), archive.CLASS_NAMES))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jaxcifar.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--step", type=int, help="evaluate this saved step (default: the latest)")
    which.add_argument("--best", action="store_true", help="evaluate the best checkpoint by test accuracy")
    p.add_argument("--seed", type=int, help="evaluate only this seed's run (default: every seed the run trained)")
    p.add_argument("--split", choices=("test", "train"), default="test")
    p.add_argument("--recompute-bn-stats", type=int, default=0, metavar="N",
                   help="re-estimate BatchNorm statistics from N training batches with dropout off before evaluating "
                        "(a diagnostic, not the seed's protocol, which uses the running statistics of training)")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--data-dir", help="tfds data dir (default: the run's, else $TFDS_DATA_DIR)")
    p.add_argument("--cache-dir", help="preprocessed cache dir (default: the run's)")
    p.add_argument("--other-data", action="store_true",
                   help="evaluate on the dataset found even if it is not the one the run trained on")
    args = p.parse_args(argv)
    quiet_libraries()
    try:
        if args.recompute_bn_stats < 0:
            raise ConfigError(f"--recompute-bn-stats {args.recompute_bn_stats} must be >= 0")
        if args.json:
            check_writable_file(args.json)  # before the evaluation, not after it
        runs = ([load_trained(args.workdir, args.step, args.best, args.seed)] if args.seed is not None
                else load_all_seeds(args.workdir, args.step, args.best))
        results = []
        for trained in runs:
            results.append(score_saved_run(trained, args.split, args.data_dir, args.cache_dir,
                                           args.recompute_bn_stats, args.other_data))
            if len(runs) > 1:
                print(f"seed {trained.seed}: accuracy {results[-1]['accuracy']:.2f} %")
        result = summarize_seeds(results)
        result["workdir"] = str(args.workdir)
        print_result(result, len(runs))
        if args.json:
            try:
                Path(args.json).write_text(json.dumps(result, indent=1))
            except OSError as e:
                raise ConfigError(f"--json {args.json}: cannot write it ({e.strerror or e})") from None
    except errors.OtherDataError as e:
        print(f"error: {e}; point --data-dir at the data it trained on, or pass --other-data to evaluate it on this "
              "set", file=sys.stderr)
        return 2
    except errors.JaxcifarError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    from jaxcifar import cli

    cli.run_command(main)
