"""Scripted evaluation of a saved run: `python -m jaxcifar.evaluate --workdir W [--step N | --best]`.

Prints accuracy and the confusion matrix in the seed's layout (`--json PATH` writes them too);
exits non-zero on any failure. Checkpoints restore onto whatever devices this machine has.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxcifar import checkpoint, data, metrics, models, preprocess, train


class TrainedModel(NamedTuple):
    model: object
    variables: dict  # {"params", "batch_stats"}
    config: ml_collections.ConfigDict
    stats: preprocess.NormalizationStats
    meta: dict
    step: int


def load_trained(workdir: str | Path, step: int | None = None, best: bool = False) -> TrainedModel:
    """The model and variables of a checkpoint in `workdir` (latest by default)."""
    workdir = Path(workdir)
    if not workdir.is_dir():
        raise checkpoint.CheckpointError(f"workdir {workdir} does not exist")
    ckpt = checkpoint.Checkpointer(workdir)
    try:
        steps = ckpt.steps(best)
        if not steps:
            raise checkpoint.CheckpointError(
                f"no {'best ' if best else ''}checkpoints in {workdir}; train first with "
                f"`python -m jaxcifar.train --workdir {workdir} ...`")
        step = max(steps) if step is None else step
        config = ml_collections.ConfigDict(ckpt.read_meta(step, best)["config"])
        model = train.build_model(config)
        template = train.init_train_state(config, model, train.build_optimizer(config, 1), (32, 32, 3))
        tree_template = checkpoint.to_tree({"train_state": template,
                                            "epoch_metrics": train.zero_train_metrics(config.num_classes)})
        try:
            tree, meta, _ = ckpt.restore(tree_template, step=step, best=best)
        except checkpoint.CheckpointError as e:
            raise checkpoint.CheckpointError(f"{e} (does it match model {config.model!r} at width {config.width}?)") from None
    finally:
        ckpt.close()
    state = checkpoint.from_tree(template, tree["train_state"])
    return TrainedModel(model, {"params": state.params, "batch_stats": state.batch_stats}, config,
                        preprocess.NormalizationStats.from_json(meta["stats"]), meta, step)


@functools.cache
def _logits_fn(model):
    return jax.jit(functools.partial(model.apply, train=False), compiler_options=models.compiler_options())


def predict_logits(trained: TrainedModel, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
    """Logits for preprocessed float32 images (N, 32, 32, 3), in fixed-size batches (one compile)."""
    logits, out = _logits_fn(trained.model), []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        padded = np.concatenate([chunk, np.zeros((batch_size - len(chunk), *chunk.shape[1:]), chunk.dtype)])
        out.append(np.asarray(logits(trained.variables, padded))[: len(chunk)])
    return np.concatenate(out) if out else np.zeros((0, trained.config.num_classes), np.float32)


def batch_statistics(model, variables: dict, images: np.ndarray, num_batches: int, batch_size: int, seed: int = 0,
                     dropout_seed: int | None = None):
    """Each of `num_batches` training batches' BatchNorm statistics (mean, unbiased variance per layer).

    The batches are a seeded random draw without flips, passed in train mode with dropout off, or,
    given `dropout_seed`, with dropout on as training sees them.
    """
    if num_batches * batch_size > len(images):
        raise ValueError(f"--recompute-bn-stats {num_batches} needs {num_batches * batch_size:,} images of batch "
                         f"{batch_size}, the split has {len(images):,}; use at most {len(images) // batch_size}")
    net = model if dropout_seed is not None else model.clone(dropout=False)
    momentum = models.TorchBatchNorm.momentum
    zeros = jax.tree_util.tree_map(jnp.zeros_like, variables["batch_stats"])

    @functools.partial(jax.jit, compiler_options=models.compiler_options())
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


def evaluate(trained: TrainedModel, split: str = "test", data_dir: str | None = None,
             cache_dir: str | None = None, recompute_bn_batches: int = 0) -> dict:
    cfg = trained.config
    dataset = data.load_preprocessed(data_dir or cfg.data.data_dir or None, cache_dir or cfg.data.cache_dir or None,
                                     cfg.data.preprocess, log=lambda m: print(m, file=sys.stderr))
    if dataset.stats != trained.stats:
        print("warning: the dataset's normalization statistics differ from the checkpoint's; "
              "using the dataset's cache", file=sys.stderr)
    images = dataset.test_images if split == "test" else dataset.train_images
    labels = dataset.test_labels if split == "test" else dataset.train_labels
    if recompute_bn_batches:
        trained = trained._replace(variables=recompute_batch_stats(
            trained.model, trained.variables, dataset.train_images, recompute_bn_batches, cfg.batch_size))
    logits = predict_logits(trained, images, cfg.eval_batch_size)
    confusion = np.zeros((cfg.num_classes,) * 2, np.int64)
    np.add.at(confusion, (labels, logits.argmax(-1)), 1)
    summary = metrics.summarize(confusion)
    return {"workdir": None, "step": trained.step, "epoch": trained.meta["epoch"], "split": split,
            "images": int(len(labels)), "recomputed_bn_batches": recompute_bn_batches, "accuracy": summary["accuracy"],
            "average_row_correct": summary["average_row_correct"],
            "average_rowucol_correct": summary["average_rowucol_correct"], "confusion": confusion.tolist()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jaxcifar.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--step", type=int, help="evaluate this saved step (default: the latest)")
    which.add_argument("--best", action="store_true", help="evaluate the best checkpoint by test accuracy")
    p.add_argument("--split", choices=("test", "train"), default="test")
    p.add_argument("--recompute-bn-stats", type=int, default=0, metavar="N",
                   help="re-estimate BatchNorm statistics from N training batches with dropout off before evaluating "
                        "(a diagnostic, not the seed's protocol, which uses the running statistics of training)")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--data-dir", help="tfds data dir (default: the run's, else $TFDS_DATA_DIR)")
    p.add_argument("--cache-dir", help="preprocessed cache dir (default: the run's)")
    args = p.parse_args(argv)
    try:
        trained = load_trained(args.workdir, args.step, args.best)
        if args.recompute_bn_stats < 0:
            raise ValueError(f"--recompute-bn-stats {args.recompute_bn_stats} must be >= 0")
        result = evaluate(trained, args.split, args.data_dir, args.cache_dir, args.recompute_bn_stats)
        result["workdir"] = str(args.workdir)
        print(f"{args.workdir}: step {result['step']} (epoch {result['epoch']}), {args.split} split, "
              f"{result['images']:,} images")
        if args.recompute_bn_stats:
            print(f"BatchNorm statistics re-estimated from {args.recompute_bn_stats} training batches without "
                  "dropout (not the seed's protocol: training's running statistics are replaced)")
        print(f"accuracy: {result['accuracy']:.2f} %")
        print(metrics.format_confusion(np.asarray(result["confusion"]), data.CLASS_NAMES))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
    except (checkpoint.CheckpointError, data.DataError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
