"""Training: `python -m jaxcifar.train --config configs/vgg.py --workdir runs/vgg`.

Every random draw is a function of (seed, epoch) or (seed, step): the epoch's order
from fold_in(key, epoch), a step's flips and dropout from fold_in(key, step). A run is
therefore the same run however often it is stopped and resumed.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxcifar import config as config_lib
from jaxcifar import checkpoint, data, errors, metrics, models, optim, report, workdir as workdir_lib
from jaxcifar.errors import ConfigError, TrainingDiverged


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # updates applied so far
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array  # raw key data of the run's base key (uint32), so checkpoints hold plain arrays


def build_model(config, choices: dict | None = None) -> flax.linen.Module:
    """The config's network, built with `choices` (default: config_lib.step_choices for JAX's backend)."""
    choices = choices or config_lib.step_choices(config)
    return models.create_model(
        config.model, num_classes=config.num_classes, width=config.width, batch_norm=config.batch_norm,
        dropout=config.dropout, conv_impl=choices["conv_impl"], dtype=jnp.dtype(config.dtype),
        pool_grad=choices["pool_grad"], bn_grad=choices["bn_grad"], dropout_bits=choices["dropout_bits"])


def build_optimizer(config, steps_per_epoch: int) -> optax.GradientTransformation:
    return optim.torch7_sgd(**_optimizer_kwargs(config, steps_per_epoch))


def _optimizer_kwargs(config, steps_per_epoch: int) -> dict:
    o = config.optimizer
    return dict(
        learning_rate=o.learning_rate, momentum=o.momentum, dampening=o.dampening,
        weight_decay=o.weight_decay, learning_rate_decay=o.learning_rate_decay, epoch_step=o.epoch_step,
        steps_per_epoch=steps_per_epoch, schedule=o.schedule, total_steps=steps_per_epoch * config.num_epochs)


def learning_rate_schedule(config, steps_per_epoch: int):
    """step -> the rate torch7_sgd applies at that update, for this config."""
    kw = _optimizer_kwargs(config, steps_per_epoch)
    for unused in ("momentum", "dampening", "weight_decay"):
        del kw[unused]
    return optim.learning_rate_fn(**kw)


def learning_rate_at(config, steps_per_epoch: int, step: int) -> float:
    return float(learning_rate_schedule(config, steps_per_epoch)(step))


def init_train_state(seed: int, model, tx, image_shape) -> TrainState:
    """The state of one run before its first update: a function of `seed` alone."""
    return _compiled_init(model, tx, tuple(image_shape))(jax.random.key_data(jax.random.key(seed)))


@functools.lru_cache(maxsize=8)
def _compiled_init(model, tx, image_shape):
    """One compiled initializer per (model, optimizer, shape), the key an argument: K seeds, one compile."""
    def init(rng):
        variables = model.init({"params": stream_key(rng, INIT_STREAM)}, jnp.zeros((1, *image_shape), jnp.float32),
                               train=False)
        params = variables["params"]
        return TrainState(step=jnp.zeros([], jnp.int32), params=params, batch_stats=variables.get("batch_stats", {}),
                          opt_state=tx.init(params), rng=rng)

    return jax.jit(init)


def init_replicas(seeds, model, tx, image_shape) -> TrainState:
    """One state per seed, stacked along a leading replica axis (each exactly its single run's)."""
    return stack_replicas([init_train_state(s, model, tx, image_shape) for s in seeds])


def stack_replicas(trees: list):
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)


def zero_replica_metrics(num_classes: int, replicas: int) -> dict:
    return stack_replicas([zero_train_metrics(num_classes)] * replicas)


def replica(tree, k: int):
    """Replica `k`'s part of a tree with a leading replica axis."""
    return jax.tree_util.tree_map(lambda x: x[k], tree)


def over_replicas(fn, in_axes: tuple, replicas: int):
    """`fn` mapped over the leading replica axis of the arguments whose in_axes entry is 0.

    K > 1 replicas: `jax.vmap`, K independent runs in each kernel. One replica: `fn` itself on the
    replica's slice, the very program of a run without replicas.
    """
    if replicas > 1:
        return jax.vmap(fn, in_axes=in_axes)

    def single(*args):
        args = [replica(a, 0) if axis == 0 else a for a, axis in zip(args, in_axes)]
        return jax.tree_util.tree_map(lambda x: x[None], fn(*args))

    return single


def zero_train_metrics(num_classes: int) -> dict:
    return {"loss_sum": jnp.zeros([], jnp.float32), "confusion": jnp.zeros((num_classes, num_classes), jnp.int32),
            "last_loss": jnp.zeros([], jnp.float32)}


# Independent streams derived from the run's key, so epoch and step numbers never collide.
INIT_STREAM, ORDER_STREAM, STEP_STREAM = 0, 1, 2


def stream_key(rng, stream: int):
    return jax.random.fold_in(jax.random.wrap_key_data(rng), stream)


def step_keys(state: TrainState):
    """(flip key, dropout key) of the update about to be applied: a function of (seed, step) only."""
    return step_keys_at(state.rng, state.step)


def step_keys_at(rng, step):
    return jax.random.split(jax.random.fold_in(stream_key(rng, STEP_STREAM), step))


def epoch_order(rng, epoch, num_examples: int, batch_size: int):
    """The epoch's batches: a function of (seed, epoch) only."""
    return data.epoch_batch_indices(stream_key(rng, ORDER_STREAM), epoch, num_examples, batch_size)


def train_step(state: TrainState, acc: dict, images, labels, epoch_indices, *, model, tx, flip: str,
               label_smoothing: float, num_classes: int, batch_sharding=None):
    """One torch7-SGD update on the batch `epoch_indices[step % steps]`; accumulates epoch metrics."""
    steps = epoch_indices.shape[0]
    flip_key, dropout_key = step_keys(state)
    x, y = data.gather_batch(images, labels, epoch_indices[state.step % steps], flip_key, flip)
    if batch_sharding is not None:
        x = jax.lax.with_sharding_constraint(x, batch_sharding)

    def loss_fn(params):
        logits, updates = model.apply({"params": params, "batch_stats": state.batch_stats}, x, train=True,
                                      rngs={"dropout": dropout_key}, mutable=["batch_stats"])
        targets = optax.smooth_labels(jax.nn.one_hot(y, num_classes), label_smoothing)
        return optax.softmax_cross_entropy(logits, targets).mean(), (logits, updates["batch_stats"])

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                          batch_stats=batch_stats, opt_state=opt_state)
    acc = {"loss_sum": acc["loss_sum"] + loss, "last_loss": loss,
           "confusion": acc["confusion"] + metrics.confusion_update(logits, y, num_classes)}
    return state, acc


def train_steps(state: TrainState, acc: dict, images, labels, epoch_indices, *, count: int, loop: str = "unroll",
                **step_kwargs):
    """`count` consecutive `train_step`s in one program: traced one after another, or as a `lax.scan`.

    Why several per call, and which loop, depends on the backend: config.STEP_CHOICES.
    """
    step = functools.partial(train_step, images=images, labels=labels, epoch_indices=epoch_indices, **step_kwargs)
    if loop == "scan" and count > 1:
        def body(carry, _):
            return step(*carry), None

        return jax.lax.scan(body, (state, acc), length=count)[0]
    for _ in range(count):
        state, acc = step(state, acc)
    return state, acc


def call_plan(first: int, steps: int, steps_per_call: int) -> list[int]:
    """How many steps each call runs from step `first` to the end of an epoch of `steps`.

    Multi-step calls start at multiples of `steps_per_call` counted from the epoch's start, so a
    run resumed at any step groups its updates exactly as an uninterrupted one does (a multi-step
    program may round differently from single calls in the last bit). More than an epoch's steps
    per call: one call per epoch.
    """
    steps_per_call = min(steps_per_call, steps)
    plan, i = [], first
    while i < steps:
        k = steps_per_call if i % steps_per_call == 0 and i + steps_per_call <= steps else 1
        plan.append(k)
        i += k
    return plan


def eval_step(params, batch_stats, images, labels, all_indices, all_valid, batch, *, model, num_classes: int):
    """Confusion counts and summed loss of evaluation batch `batch` (padding rows weighted 0).

    The batch is picked inside the program from the device-resident tables, so a loop over batches
    passes only an integer: nothing is read back, and no process needs another's part of the tables.
    """
    indices, valid = all_indices[batch], all_valid[batch]
    logits = model.apply({"params": params, "batch_stats": batch_stats}, images[indices], train=False)
    y = labels[indices]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return metrics.confusion_update(logits, y, num_classes, valid), jnp.sum(jnp.where(valid, loss, 0.0))


def replicate(x, sharding):
    """A host array as a global array with `sharding`; works across hosts, where device_put cannot."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


class Trainer:
    """The compiled steps and device-resident data of K runs trained together, data-parallel over `devices`.

    Every state leaf carries a leading replica axis, one entry per seed of `config.seeds` (K = 1 by
    default); replica k is the single run with seed k. Parameters, optimizer state and the dataset
    are replicated over the devices; every replica's batch is split along the 'data' mesh axis.
    BatchNorm statistics are means over the global batch (XLA inserts the all-reduce), so any device
    count computes the same function as one device.
    """

    def __init__(self, config, dataset: data.Preprocessed, devices=None):
        self.config = config
        self.seeds = config_lib.seed_list(config)
        self.replicas = len(self.seeds)
        self.num_train = len(dataset.train_labels)
        self.steps_per_epoch = self.num_train // config.batch_size
        if self.steps_per_epoch < 1:
            raise ConfigError(f"bad config: batch_size={config.batch_size} exceeds the {self.num_train} training images")
        devices = list(jax.devices() if devices is None else devices)
        if config.batch_size % len(devices):
            raise ConfigError(f"bad config: batch_size={config.batch_size} is not divisible by the {len(devices)} "
                             f"devices; use a multiple of {len(devices)}")
        self.choices = config_lib.step_choices(config, devices[0].platform)
        self.mesh = Mesh(np.array(devices), ("data",))
        self.replicated = NamedSharding(self.mesh, P())
        batch_rows = NamedSharding(self.mesh, P(None, None, "data"))  # (replica, steps, batch) index tables
        self.model = build_model(config, self.choices)
        self.tx = build_optimizer(config, self.steps_per_epoch)
        # The whole preprocessed dataset lives on the devices, once for all replicas; batches are gathered inside jit.
        self.train_images = replicate(dataset.train_images, self.replicated)
        self.train_labels = replicate(dataset.train_labels.astype(np.int32), self.replicated)
        self.test_images = replicate(dataset.test_images, self.replicated)
        self.test_labels = replicate(dataset.test_labels.astype(np.int32), self.replicated)
        self.num_test = len(dataset.test_labels)
        eval_batch = -(-config.eval_batch_size // len(devices)) * len(devices)  # padding rows are masked out
        indices, valid = data.eval_batches(len(dataset.test_labels), eval_batch)
        eval_rows = NamedSharding(self.mesh, P(None, "data"))
        self.eval_indices, self.eval_valid = replicate(indices, eval_rows), replicate(valid, eval_rows)
        self._compiler_options = models.compiler_options(devices[0].platform)
        self._train_calls = {}  # steps per call -> compiled program, built on first use
        self._train_step_kwargs = dict(model=self.model, tx=self.tx, flip=config.flip,
                                       label_smoothing=config.label_smoothing, num_classes=config.num_classes,
                                       batch_sharding=NamedSharding(self.mesh, P("data")))
        self._eval_step = jax.jit(
            over_replicas(functools.partial(eval_step, model=self.model, num_classes=config.num_classes),
                          (0, 0, None, None, None, None, None), self.replicas),
            out_shardings=(self.replicated, self.replicated), compiler_options=self._compiler_options)
        order = functools.partial(epoch_order, num_examples=self.num_train, batch_size=config.batch_size)
        self._epoch_order = jax.jit(over_replicas(order, (0, None), self.replicas), out_shardings=batch_rows)

    @property
    def steps_per_call(self) -> int:
        return self.choices["steps_per_call"]

    def epoch_order(self, rng, epoch: int):
        """Each replica's (steps, batch) example indices of `epoch` (1-based), for the run keys `rng` (K, 2)."""
        return self._epoch_order(rng, epoch)

    def run_steps(self, state: TrainState, acc: dict, order, count: int):
        """`count` updates of every replica in one compiled call (within one epoch, whose batch order is `order`)."""
        if count not in self._train_calls:
            steps = functools.partial(train_steps, count=count, loop=self.choices["step_loop"], **self._train_step_kwargs)
            self._train_calls[count] = jax.jit(
                over_replicas(steps, (0, 0, None, None, 0), self.replicas),
                out_shardings=(self.replicated, self.replicated), donate_argnums=(0, 1),
                compiler_options=self._compiler_options)
        return self._train_calls[count](state, acc, self.train_images, self.train_labels, order)

    def init_state(self) -> TrainState:
        return self.place(init_replicas(self.seeds, self.model, self.tx, self.train_images.shape[1:]))

    def zero_metrics(self) -> dict:
        return self.place(zero_replica_metrics(self.config.num_classes, self.replicas))

    def place(self, tree):
        """Replicates a host or single-device pytree (a fresh or restored state) over the mesh."""
        return jax.tree_util.tree_map(lambda x: replicate(x, self.replicated), tree)

    def train_epoch(self, state: TrainState, epoch: int, acc: dict | None = None, progress=None,
                    should_stop=lambda: False):
        """Runs the remaining steps of `epoch` (1-based) from `state.step`, accumulating into `acc`.

        Returns (state, acc, finished); `finished` is False when `should_stop()` cut the epoch short.
        """
        c = self.config
        order = self.epoch_order(state.rng, epoch)
        acc = self.zero_metrics() if acc is None else acc
        done = int(state.step[0]) - (epoch - 1) * self.steps_per_epoch
        for count in call_plan(done, self.steps_per_epoch, self.steps_per_call):
            state, acc = self.run_steps(state, acc, order, count)
            before, done = done, done + count
            if done // c.log_every_steps > before // c.log_every_steps or done == self.steps_per_epoch:
                last = np.asarray(acc["last_loss"])  # syncs: keeps the bar honest and catches divergence early
                if not np.all(np.isfinite(last)):
                    bad = ", ".join(f"{v} (seed {s})" for s, v in zip(self.seeds, last.tolist()) if not math.isfinite(v))
                    raise TrainingDiverged(
                        f"loss became {bad} at epoch {epoch}, step {int(state.step[0])}: training stopped; "
                        "lower optimizer.learning_rate or check the input data")
                if progress is not None:
                    progress(done, float(last.mean()))
            if done < self.steps_per_epoch and should_stop():
                return state, acc, False
        return state, acc, True

    def epoch_summary(self, acc: dict) -> tuple[np.ndarray, np.ndarray]:
        """Per replica: (mean training loss (K,), training confusion (K, C, C)) of a finished epoch."""
        return np.asarray(acc["loss_sum"], np.float64) / self.steps_per_epoch, np.asarray(acc["confusion"])

    def evaluate(self, params, batch_stats) -> tuple[np.ndarray, np.ndarray]:
        """Per replica: (confusion (K, C, C), mean loss (K,)) over every test image, exactly once."""
        confusion = jnp.zeros((self.replicas, *(self.config.num_classes,) * 2), jnp.int32)
        loss = jnp.zeros([self.replicas], jnp.float32)
        for batch in range(self.eval_indices.shape[0]):
            conf, batch_loss = self._eval_step(params, batch_stats, self.test_images, self.test_labels,
                                               self.eval_indices, self.eval_valid, np.int32(batch))
            confusion, loss = confusion + conf, loss + batch_loss
        return np.asarray(confusion), np.asarray(loss, np.float64) / self.num_test


# ---------------------------------------------------------------------------
# Logs: plain text, CSV and JSON lines in the workdir.


class RunLog:
    CSV_FIELDS = ("epoch", "step", "learning_rate", "train_loss", "train_accuracy", "test_loss", "test_accuracy",
                  "test_average_row_correct", "test_average_rowucol_correct", "epoch_time_s", "train_images_per_s",
                  "eval_time_s")
    PER_SEED_FIELDS = ("train_loss", "train_accuracy", "test_loss", "test_accuracy")

    def __init__(self, workdir: Path, seeds: list[int] | None = None, writer: bool = True):
        """`writer=False` (every process but 0 of a multi-process run): prints and writes nothing."""
        self.workdir = workdir
        self.writer = writer
        self.seeds = seeds or []
        # With several seeds the means lead; then the std of test accuracy and each seed's own numbers.
        self.csv_fields = self.CSV_FIELDS + (
            ("test_accuracy_std", *(f"{k}_seed{s}" for s in self.seeds for k in self.PER_SEED_FIELDS))
            if len(self.seeds) > 1 else ())
        self._text = open(workdir / "log.txt", "a", buffering=1) if writer else None

    def print(self, msg: str = "") -> None:
        if self.writer:
            print(msg, flush=True)
            self._text.write(msg + "\n")

    def write(self, msg: str) -> None:
        """To log.txt only."""
        if self.writer:
            self._text.write(msg + "\n")

    def epoch(self, record: dict) -> None:
        if not self.writer:
            return
        with open(self.workdir / "metrics.csv", "a") as f:  # rewrite() wrote its header at the start
            f.write(self._csv_row(record))
        with open(self.workdir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def rewrite(self, history: list[dict]) -> None:
        """Makes metrics.csv/jsonl hold exactly `history` (atomic replace), keeping what it drops aside."""
        if not self.writer:
            return
        jsonl = self.workdir / "metrics.jsonl"
        if jsonl.exists():
            old = jsonl.read_text().splitlines()
            if len(old) > len(history):  # epochs logged after the last save: kept, not lost
                with open(self.workdir / "metrics.discarded.jsonl", "a") as f:
                    f.write("".join(line + "\n" for line in old[len(history):]))
        for name, text in (("metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history)),
                           ("metrics.csv", ",".join(self.csv_fields) + "\n" + "".join(map(self._csv_row, history)))):
            tmp = self.workdir / f".{name}.tmp"
            tmp.write_text(text)
            os.replace(tmp, self.workdir / name)

    def _csv_row(self, record: dict) -> str:
        return ",".join(_csv_value(_csv_field(record, k)) for k in self.csv_fields) + "\n"

    def close(self) -> None:
        if self._text is not None:
            self._text.close()


def _csv_value(v) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def _csv_field(record: dict, name: str):
    if "_seed" in name and name not in record:  # e.g. test_accuracy_seed3
        field, seed = name.rsplit("_seed", 1)
        return record["per_seed"][field][record["seeds"].index(int(seed))]
    return record[name]


def epoch_record(*, epoch: int, step: int, lr: float, seeds: list[int], train_loss, train_conf, test_loss, test_conf,
                 train_time: float, eval_time: float, images: int) -> dict:
    """One epoch's log entry: means over the replicas (the only values when there is one) and each seed's own.

    The confusion matrix is the replicas' sum, so its accuracy is the mean accuracy.
    """
    train_s = [metrics.summarize(c) for c in train_conf]
    test_s = [metrics.summarize(c) for c in test_conf]
    per_seed = {"train_loss": [float(v) for v in train_loss], "train_accuracy": [s["accuracy"] for s in train_s],
                "test_loss": [float(v) for v in test_loss], "test_accuracy": [s["accuracy"] for s in test_s]}

    def mean(values):
        return float(np.mean(values))

    return {
        "epoch": epoch, "step": step, "learning_rate": lr, "train_loss": mean(per_seed["train_loss"]),
        "train_accuracy": mean(per_seed["train_accuracy"]), "test_loss": mean(per_seed["test_loss"]),
        "test_accuracy": mean(per_seed["test_accuracy"]),
        "test_average_row_correct": mean([s["average_row_correct"] for s in test_s]),
        "test_average_rowucol_correct": mean([s["average_rowucol_correct"] for s in test_s]),
        "epoch_time_s": train_time + eval_time, "train_images_per_s": images * len(seeds) / train_time,
        "eval_time_s": eval_time, "test_confusion": np.sum(test_conf, axis=0).tolist(),
        "test_accuracy_std": float(np.std(per_seed["test_accuracy"], ddof=1)) if len(seeds) > 1 else 0.0,
        "seeds": list(seeds), "per_seed": per_seed,
    }


def _progress_bar(epoch: int, total: int, start: int):
    from tqdm import tqdm

    bar = tqdm(total=total, initial=start, desc=f"epoch {epoch}", unit="step", leave=False, dynamic_ncols=True,
               file=sys.stderr)

    def update(done: int, loss: float):
        bar.update(done - bar.n)
        bar.set_postfix(loss=f"{loss:.4f}")

    return bar, update


# ---------------------------------------------------------------------------


def load_dataset(config, log=print) -> data.Preprocessed:
    d = config.data
    md5s = data.read_md5_file(d.md5_file) if d.md5_file else data.OFFICIAL_MD5
    return data.load_preprocessed(d.data_dir or None, d.cache_dir or None, d.preprocess, d.archive or None, md5s, log=log)


def load_dataset_once(config, log=print) -> data.Preprocessed:
    """`load_dataset`; with several processes, process 0 prepares and caches first while the others wait,
    so that they only read what it wrote (the data and cache folders may be shared)."""
    if jax.process_count() == 1:
        return load_dataset(config, log)
    from jax.experimental import multihost_utils

    dataset = load_dataset(config, log) if jax.process_index() == 0 else None
    multihost_utils.sync_global_devices("jaxcifar: dataset prepared")
    return dataset if dataset is not None else load_dataset(config, log)


class TrainingInterrupted(RuntimeError):
    """SIGINT/SIGTERM arrived; the state was saved and the run can be resumed."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step} after saving; "
                         "run the same command again to resume")
        self.signum = signum


class StopFlag:
    """Turns SIGINT/SIGTERM into a flag the loop checks between steps (a second signal still kills)."""

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
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
        self.signum = signum

    def __call__(self) -> bool:
        """Whether to stop; with several processes, whether any of them was signalled (all stop together)."""
        local = self.signum is not None
        if jax.process_count() == 1:
            return local
        from jax.experimental import multihost_utils

        agreed = bool(np.any(multihost_utils.process_allgather(np.int32(local))))
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
    writer = jax.process_index() == 0  # of several processes, only process 0 writes files (orbax saves aside)
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
        differing = checkpoint.incompatible_fields(meta["config"], config)
        if meta["seeds"] != seeds:
            differing.append(f"seeds: {meta['seeds']} -> {seeds}")
        saved_choices = meta.get("step_choices", {})
        differing += [f"{k} (step choice): {saved_choices[k]!r} -> {trainer.choices[k]!r}"
                      for k in checkpoint.FIXED_STEP_CHOICES if k in saved_choices and saved_choices[k] != trainer.choices[k]]
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
    one = replica(state, 0)
    choices = ", ".join(f"{k} {v}" for k, v in trainer.choices.items())
    log.print(f"{models.count_params(one.params):,} parameters per run; {trainer.steps_per_epoch} steps of "
              f"{config.batch_size} per epoch; {config.num_epochs} epochs; step: {choices}")
    summary = report.model_summary(one.params, one.batch_stats)
    scalars = report.ScalarWriter(workdir / "tensorboard") if log.writer else None
    if scalars is not None:
        closing.callback(scalars.close)

    start_epoch = int(state.step[0]) // trainer.steps_per_epoch + 1
    for epoch in range(start_epoch, config.num_epochs + 1):
        lr = learning_rate_at(config, trainer.steps_per_epoch, (epoch - 1) * trainer.steps_per_epoch)
        log.print(f"==> epoch {epoch}/{config.num_epochs} [batch {config.batch_size}, lr {lr:.6g}]")
        first = int(state.step[0]) - (epoch - 1) * trainer.steps_per_epoch
        t0 = time.time()
        bar, progress = _progress_bar(epoch, trainer.steps_per_epoch, first)
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
        record = epoch_record(epoch=epoch, step=step, lr=lr, seeds=seeds, train_loss=train_loss,
                              train_conf=train_conf, test_loss=test_loss, test_conf=test_conf, train_time=train_time,
                              eval_time=eval_time, images=(trainer.steps_per_epoch - first) * config.batch_size)
        log_epoch(log, record)
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
            scalars.write(step, scalar_summary(record))
        if stop():
            ckpt.wait()
            raise TrainingInterrupted(stop.signum, step)
    return state


def log_epoch(log: RunLog, r: dict) -> None:
    """The seed's per-epoch console lines (means over the seeds), then each seed's when there are several."""
    seeds = r["seeds"]
    over = f" (mean of {len(seeds)} seeds)" if len(seeds) > 1 else ""
    log.print(f"Train loss: {r['train_loss']:.4f}  Train accuracy: {r['train_accuracy']:.2f} %{over}  "
              f"time: {r['epoch_time_s'] - r['eval_time_s']:.1f} s ({r['train_images_per_s']:.0f} images/s)")
    spread = f" ± {r['test_accuracy_std']:.2f}" if len(seeds) > 1 else ""
    log.print(f"Test accuracy: {r['test_accuracy']:.2f}{spread} %{over}  (loss {r['test_loss']:.4f}, "
              f"{r['eval_time_s']:.1f} s)")
    if len(seeds) > 1:
        p = r["per_seed"]
        for i, s in enumerate(seeds):
            log.print(f"  seed {s}: train loss {p['train_loss'][i]:.4f}, train {p['train_accuracy'][i]:.2f} %, "
                      f"test {p['test_accuracy'][i]:.2f} % (loss {p['test_loss'][i]:.4f})")
        log.print(f"test confusion summed over the {len(seeds)} seeds:")
    log.print(metrics.format_confusion(np.asarray(r["test_confusion"]), data.CLASS_NAMES))


def scalar_summary(r: dict) -> dict:
    """TensorBoard scalars: the means under their usual tags; with several seeds, the std and seed<k>/ tags."""
    out = {k: r[k] for k in ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "learning_rate",
                             "train_images_per_s")}
    if len(r["seeds"]) > 1:
        out["test_accuracy_std"] = r["test_accuracy_std"]
        for field, values in r["per_seed"].items():
            out.update({f"seed{s}/{field}": v for s, v in zip(r["seeds"], values)})
    return out


# Seconds without a heartbeat after which JAX's coordination service declares a process dead and stops every
# other one (JAX's default is 100 s; a lost process should end the run sooner than that).
HEARTBEAT_TIMEOUT_S = 20


def initialize_distributed(environ=os.environ) -> bool:
    """JAX's distributed runtime, when this is one of several processes; returns whether it was started.

    Explicit: JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES=N, JAX_PROCESS_ID=i (the same address and
    N in every process). Otherwise, under SLURM or Open MPI with more than one task, what
    `jax.distributed.initialize()` detects. CPU devices talk over gloo.
    """
    address = environ.get("JAX_COORDINATOR_ADDRESS")
    tasks = max(int(environ.get("SLURM_NTASKS", "1") or 1), int(environ.get("OMPI_COMM_WORLD_SIZE", "1") or 1))
    if not address and tasks <= 1:
        return False

    def number(name):
        value = environ.get(name)
        if value is None:
            return None
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{name}={value!r} must be an integer") from None

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(address or None, num_processes=number("JAX_NUM_PROCESSES"),
                               process_id=number("JAX_PROCESS_ID"),
                               heartbeat_timeout_seconds=number("JAXCIFAR_HEARTBEAT_TIMEOUT_S") or HEARTBEAT_TIMEOUT_S)
    return True


def main(argv) -> None:
    from absl import flags, logging

    del argv
    logging.set_verbosity(logging.WARNING)  # orbax and tfds narrate every file at INFO
    cfg, workdir = flags.FLAGS.config, flags.FLAGS.workdir
    try:
        initialize_distributed()
        train_and_evaluate(cfg, workdir)
    except TrainingInterrupted as e:
        print(f"jaxcifar: {e}", file=sys.stderr)
        sys.exit(128 + e.signum)
    except errors.JaxcifarError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


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
    if config_file is not None and not Path(config_file.split(":")[0]).is_file():
        _usage_error(f"--config {config_file}: no such file; give a config file such as configs/vgg.py")
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:  # a bad value or a missing flag
        text = str(e).strip().splitlines()
        missing = next((f for f in ("--config", "--workdir") if f"{f}=None" in text[0]), None)
        _usage_error(f"{missing} is required" if missing else text[0] + (f" ({text[-1].strip()})" if len(text) > 1 else ""))
    except AttributeError as e:  # ml_collections: an override naming no field of the config
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
