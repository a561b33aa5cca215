"""One fidelity run: a recipe trained epoch by epoch in JAX (jaxcifar's Trainer) or in the PyTorch port, each epoch
measured the same way on both sides, its rows recorded, and its state saved so that the same command resumes it.

The JAX side restores and saves through resume.py, the code `python -m jaxcifar.train` resumes with; the port keeps
its state in an npz of arrays (no pickle). Both refuse a workdir of another run (resume.check_identity).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from jaxcifar.data import cache
from jaxcifar import config as config_lib, errors


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def require_torch():
    """torch, or a JaxcifarError saying how to install it (the port is an optional extra)."""
    try:
        import torch
    except ImportError:
        raise errors.JaxcifarError("the PyTorch port needs PyTorch: pip install -e '.[torch]' (the README's \"PyTorch "
                                   "for the tests\" says which build)") from None
    return torch


def parse_value(text: str):
    """A --set value: an int, a float, true/false, or the text itself."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def recipe_config(path, width: float, epochs: int, seed: int, overrides: list[str], flag: str = "--set"):
    """A recipe file's config at `width`, its schedule stretched to `epochs`, with FIELD=VALUE overrides (given by
    the option `flag`); checked as training checks it. A file that is missing or fails to load, an override of no
    field or of the wrong type, and a value that cannot train raise ConfigError naming it."""
    import ml_collections

    if not Path(path).is_file() or Path(path).suffix != ".py":
        what = "is not a Python file" if Path(path).is_file() else "no such file"
        raise errors.ConfigError(f"--config {path}: {what}; give a recipe such as configs/vgg_fast.py")
    try:
        c = config_lib.load_config_file(path)
    except Exception as e:  # noqa: BLE001 - the user's file: whatever it raised, it is named in one line
        why = f"{type(e).__name__}: {errors.first_line(e)}"
        raise errors.ConfigError(f"--config {path} cannot be loaded ({why}); fix the file or give another") from None
    config_lib.validate(c)  # first: a get_config() that returned something else has no width to set
    c.width, c.num_epochs, c.seed = width, epochs, seed
    for item in overrides:
        key, eq, value = item.partition("=")
        if not (key and eq):
            raise errors.ConfigError(f"{flag} {item}: give FIELD=VALUE, e.g. {flag} conv_impl=xla")
        *groups, last = key.split(".")
        target = c
        for group in groups:
            target = target.get(group) if isinstance(target, ml_collections.ConfigDict) else None
        if not isinstance(target, ml_collections.ConfigDict) or last not in target:
            raise errors.ConfigError(f"{flag} {item}: the config has no field {key!r}")
        try:  # a text field takes the text as it is (seeds=2 is the list "2", not the number)
            target[last] = value if isinstance(target[last], str) else parse_value(value)
        except TypeError:
            kind = type(target[last]).__name__
            raise errors.ConfigError(f"{flag} {item}: {key} is of type {kind} and {value!r} is not") from None
    config_lib.validate(c)
    return c


def default_workdir(out: Path) -> Path:
    """Where a run whose JSON is `out` keeps its state: $JAXCIFAR_CACHE_DIR/fidelity/<out name>."""
    return Path(cache.default_cache_dir()) / "fidelity" / out.stem


@dataclasses.dataclass
class Measurements:
    """What each epoch measures beyond training: eval-mode accuracy on `train_eval` (training images and labels),
    and at the epochs `recompute_at` the accuracy with BatchNorm statistics re-estimated from `recompute_batches`
    training batches."""

    train_eval: tuple[np.ndarray, np.ndarray]
    recompute_at: set[int]
    recompute_batches: int


@dataclasses.dataclass
class RunRecord:
    """A run's identity, its workdir, and its rows, written (by `write`) after every epoch."""

    workdir: Path
    identity: dict
    write: Callable[[list[dict], dict | None], None]  # (all rows, the new row or None on resume)
    stop_after: int | None = None
    rows: list[dict] = dataclasses.field(default_factory=list)

    def epochs(self, to_train) -> list[int]:
        """The epochs of `to_train` this process trains: all, or up to --stop-after."""
        return [e for e in to_train if self.stop_after is None or e <= self.stop_after]

    def start(self, rows: list[dict]) -> None:
        """The rows of the epochs the saved state holds; the JSON is rewritten from them (later rows were not saved)."""
        self.rows = list(rows)
        self.write(self.rows, None)

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.write(self.rows, row)


def epoch_row(epoch: int, loss: float, train_accuracy: float, test_accuracy: float, train_images_eval: float,
              train_time: float) -> dict:
    return {"epoch": epoch, "train_loss": float(loss), "train_accuracy": float(train_accuracy),
            "test_accuracy": float(test_accuracy), "gap": float(train_accuracy - test_accuracy),
            "train_images_eval_accuracy": float(train_images_eval), "train_time_s": float(train_time)}


def run_jax(config, dataset: cache.Preprocessed, measure: Measurements, record: RunRecord) -> None:
    from jaxcifar.run import checkpoint, resume
    from jaxcifar.run.trainer import Trainer

    trainer = Trainer(config, dataset)
    ckpt = checkpoint.Checkpointer(record.workdir, config.keep_checkpoints)
    try:
        run = resume.restore_or_init(config, record.workdir, trainer, dataset, ckpt, say, identity=record.identity)
        record.start(run.history)
        for epoch in record.epochs(resume.epochs_to_train(run, say)):
            t0 = time.time()
            run.state, epoch_metrics, _ = trainer.train_epoch(run.state, epoch, run.epoch_metrics)
            run.epoch_metrics = None
            (loss,), (conf,) = trainer.epoch_summary(epoch_metrics)
            row = measure_jax_epoch(trainer, run.state, dataset, measure, epoch,
                                    loss, 100.0 * np.trace(conf) / conf.sum(), time.time() - t0)
            run.history.append(row)
            run.save(ckpt, epoch)
            ckpt.wait()  # the row is recorded only once its state is on disk
            record.add(row)
    finally:
        ckpt.close()


def measure_jax_epoch(trainer, state, dataset, measure: Measurements, epoch: int, loss: float, train_accuracy: float,
                      train_time: float) -> dict:
    import jax

    from jaxcifar import evaluate
    from jaxcifar.nn import step as step_lib

    one = step_lib.replica(state, 0)
    variables = {"params": one.params, "batch_stats": one.batch_stats}
    model, classes, batch = trainer.model, trainer.config.num_classes, trainer.config.batch_size

    def accuracy(variables, images, labels):
        one = jax.tree_util.tree_map(lambda x: np.asarray(x)[None], variables)  # a replica axis of 1
        confusion, _ = _scorer(model, images, labels, classes)(one["params"], one["batch_stats"])
        return 100.0 * float(np.trace(confusion[0])) / len(labels)

    test = (dataset.test_images, dataset.test_labels)
    row = epoch_row(epoch, loss, train_accuracy, accuracy(variables, *test), accuracy(variables, *measure.train_eval),
                    train_time)
    if epoch in measure.recompute_at:
        n = measure.recompute_batches
        fresh = evaluate.recompute_batch_stats(model, variables, dataset.train_images, n, batch)
        row["test_accuracy_recomputed_bn"] = accuracy(fresh, *test)
        by_var, by_inverse_std, spread = dropout_statistics(model, variables, dataset.train_images, n, batch)
        row["test_accuracy_dropout_bn_mean_var"] = accuracy(by_var, *test)
        row["test_accuracy_dropout_bn_mean_inverse_std"] = accuracy(by_inverse_std, *test)
        row["max_inverse_std_vs_var_relative"] = spread
    return row


_SCORERS: dict = {}  # (model, id(images)) -> (images, SplitScorer): the images sit on the devices once per run


def _scorer(model, images: np.ndarray, labels: np.ndarray, classes: int):
    """The evaluation of `model` over `images` (scoring.SplitScorer, as training evaluates), built once."""
    import jax

    from jaxcifar.nn import mesh, scoring

    held = _SCORERS.get((model, id(images)))
    if held is None or held[0] is not images:
        held = _SCORERS[(model, id(images))] = (images, scoring.SplitScorer(
            model, images, labels, num_classes=classes, batch_size=500, replicas=1, mesh=mesh.make_mesh(jax.devices())))
    return held[1]


def dropout_statistics(model, variables, images, num_batches: int, batch_size: int, seed: int = 0):
    """BatchNorm statistics of `num_batches` training batches with dropout on, as training sees them, averaged two
    ways: the variance (today's torch and jaxcifar) and, as torch7's 2015 BatchNormalization did, the inverse
    standard deviation. Returns both variable sets and the largest relative difference in the implied std.
    """
    from flax import traverse_util

    from jaxcifar import evaluate
    from jaxcifar.nn import models
    from jaxcifar.run import trees

    batches = [trees.flat_dict(stats) for stats in evaluate.batch_statistics(
        model, variables, images, num_batches, batch_size, seed, dropout_seed=seed + 1000)]
    epsilons = models.batch_norm_epsilons(model, images.shape[1:])
    mean_var, by_inverse_std, spread = {}, {}, 0.0
    for path in batches[0]:
        per_batch = [np.asarray(b[path]) for b in batches]
        mean_var[path] = by_inverse_std[path] = np.mean(np.stack(per_batch), 0)
        if path.endswith("/var"):
            eps = epsilons[path.rsplit("/", 1)[0]]
            inverse_std = np.mean([1 / np.sqrt(v + eps) for v in per_batch], 0)
            by_inverse_std[path] = torch7_var = 1 / inverse_std ** 2 - eps
            spread = max(spread, float(np.max(np.abs(np.sqrt(torch7_var + eps) / np.sqrt(mean_var[path] + eps) - 1))))
    mean_var, by_inverse_std = (traverse_util.unflatten_dict(t, sep="/") for t in (mean_var, by_inverse_std))
    return ({"params": variables["params"], "batch_stats": mean_var},
            {"params": variables["params"], "batch_stats": by_inverse_std}, spread)


class JaxStream:
    """jaxcifar's data order, crops, flips and initialization for `config.seed`, for the PyTorch side to replay."""

    def __init__(self, config, num_examples: int):
        import jax

        from jaxcifar.nn import augment
        from jaxcifar.nn import step as step_lib

        self.config, self.n = config, num_examples
        self.rng = jax.random.key_data(jax.random.key(config.seed))
        self._order = jax.jit(step_lib.epoch_order, static_argnums=(2, 3))
        spec = augment.Augment.of_config(config)
        self._flips = jax.jit(lambda rng, step: augment.flip_mask(step_lib.step_keys_at(rng, step)[0],
                                                                  config.batch_size, spec.flip))
        self._crops = jax.jit(lambda rng, step: augment.crop_offsets(
            jax.random.fold_in(step_lib.step_keys_at(rng, step)[0], augment.CROP_STREAM), config.batch_size,
            max(spec.crop_padding, 1)))

    def order(self, epoch):
        return np.asarray(self._order(self.rng, epoch, self.n, self.config.batch_size))

    def flips(self, step):
        return np.asarray(self._flips(self.rng, step))

    def crops(self, step):
        """(batch, 2) crop offsets of the step, as augment.augment draws them (when the recipe crops)."""
        return np.asarray(self._crops(self.rng, step))

    def initial_variables(self, image_shape):
        from jaxcifar.nn import step as step_lib

        model = step_lib.build_model(self.config)
        state = step_lib.init_train_state(self.config.seed, model, step_lib.build_optimizer(self.config, 1), image_shape)
        return state.params, state.batch_stats


def run_torch(config, dataset: cache.Preprocessed, measure: Measurements, record: RunRecord,
              same_stream: bool = False) -> None:
    from jaxcifar.fidelity import torch_port

    stream = JaxStream(config, len(dataset.train_labels)) if same_stream else None
    port = torch_port.TorchRun(config, dataset.train_images, dataset.train_labels, config.seed, stream=stream)
    if stream is not None:
        port.load_flax(*stream.initial_variables(dataset.train_images.shape[1:]))
    saved = record.workdir / "state.npz"
    record.start(restore_torch(port, saved, record))
    for epoch in record.epochs(range(len(record.rows) + 1, config.num_epochs + 1)):
        t0 = time.time()
        stats = port.train_epoch()
        row = epoch_row(epoch, stats["loss"], stats["accuracy"], port.accuracy(dataset.test_images, dataset.test_labels),
                        port.accuracy(*measure.train_eval), time.time() - t0)
        if epoch in measure.recompute_at:
            row["test_accuracy_recomputed_bn"] = port.recompute_bn_accuracy(
                dataset.test_images, dataset.test_labels, measure.recompute_batches)
        save_torch(port, saved, record.identity, record.rows + [row])
        record.add(row)


def restore_torch(port, saved: Path, record: RunRecord) -> list[dict]:
    """The rows of the port's saved state, loaded into `port`; [] when there is none."""
    from jaxcifar.run import resume

    if not saved.exists():
        return []
    with np.load(saved, allow_pickle=False) as arrays:
        meta = json.loads(str(arrays["meta"]))
        resume.check_identity(meta.get("run_identity"), record.identity, record.workdir)
        port.load_state_arrays(arrays)
    say(f"resumed from {saved} after epoch {len(meta['rows'])}")
    return meta["rows"]


def save_torch(port, saved: Path, identity: dict, rows: list[dict]) -> None:
    """The port's state and rows, written atomically (arrays and a JSON string only: np.load needs no pickle)."""
    saved.parent.mkdir(parents=True, exist_ok=True)
    tmp = saved.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, meta=np.array(json.dumps({"run_identity": identity, "rows": rows})), **port.state_arrays())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, saved)
