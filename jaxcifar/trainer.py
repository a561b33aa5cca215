"""The Trainer: the dataset on the devices, the compiled step and evaluation, and the loop over an epoch."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxcifar import config as config_lib
from jaxcifar import data, models
from jaxcifar.errors import ConfigError, TrainingDiverged
from jaxcifar.step import (TrainState, build_model, build_optimizer, call_plan, epoch_order, eval_step, init_replicas,
                           over_replicas, train_steps, zero_replica_metrics)


def replicate(x, sharding):
    """A host array as a global array with `sharding`; works across hosts, where device_put cannot."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


class Evaluator:
    """Confusion counts and mean loss of K replicas' models over a labelled image set held on the devices.

    The project's one evaluation: the Trainer runs it on the test split every epoch, `evaluate` on a
    saved run. The images sit replicated on the mesh; each batch, split over the 'data' axis, is
    picked inside the program (`step.eval_step`), so the loop passes only integers and works
    whichever process holds which devices.
    """

    def __init__(self, model, images: np.ndarray, labels: np.ndarray, *, num_classes: int, batch_size: int,
                 replicas: int, mesh: Mesh, compiler_options=None):
        replicated = NamedSharding(mesh, P())
        devices = mesh.devices.size
        self.num_classes, self.replicas, self.count = num_classes, replicas, len(labels)
        self.images = replicate(images, replicated)
        self.labels = replicate(labels.astype(np.int32), replicated)
        batch = -(-batch_size // devices) * devices  # a multiple of the device count; padding rows are masked out
        indices, valid = data.eval_batches(len(labels), batch)
        rows = NamedSharding(mesh, P(None, "data"))
        self.indices, self.valid = replicate(indices, rows), replicate(valid, rows)
        self._step = _eval_program(model, num_classes, replicas, mesh, tuple(sorted((compiler_options or {}).items())))

    def __call__(self, params, batch_stats) -> tuple[np.ndarray, np.ndarray]:
        """Per replica: (confusion (K, C, C), mean loss (K,)) over every image, exactly once."""
        confusion = jnp.zeros((self.replicas, self.num_classes, self.num_classes), jnp.int32)
        loss = jnp.zeros([self.replicas], jnp.float32)
        for batch in range(self.indices.shape[0]):
            conf, batch_loss = self._step(params, batch_stats, self.images, self.labels, self.indices, self.valid,
                                          np.int32(batch))
            confusion, loss = confusion + conf, loss + batch_loss
        return np.asarray(confusion), np.asarray(loss, np.float64) / self.count


@functools.lru_cache(maxsize=16)
def _eval_program(model, num_classes: int, replicas: int, mesh: Mesh, compiler_options: tuple):
    """The jitted evaluation batch, one per (model, replicas, mesh): evaluators of the same model share its compile."""
    replicated = NamedSharding(mesh, P())
    return jax.jit(over_replicas(functools.partial(eval_step, model=model, num_classes=num_classes),
                                 (0, 0, None, None, None, None, None), replicas),
                   out_shardings=(replicated, replicated), compiler_options=dict(compiler_options) or None)


def make_mesh(devices) -> Mesh:
    return Mesh(np.array(list(devices)), ("data",))


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
        self.mesh = make_mesh(devices)
        self.replicated = NamedSharding(self.mesh, P())
        batch_rows = NamedSharding(self.mesh, P(None, None, "data"))  # (replica, steps, batch) index tables
        self.model = build_model(config, self.choices)
        self.tx = build_optimizer(config, self.steps_per_epoch)
        # The whole preprocessed dataset lives on the devices, once for all replicas; batches are gathered inside jit.
        self.train_images = replicate(dataset.train_images, self.replicated)
        self.train_labels = replicate(dataset.train_labels.astype(np.int32), self.replicated)
        self.compiler_options = models.compiler_options(devices[0].platform)
        self.test_evaluator = Evaluator(self.model, dataset.test_images, dataset.test_labels,
                                        num_classes=config.num_classes, batch_size=config.eval_batch_size,
                                        replicas=self.replicas, mesh=self.mesh, compiler_options=self.compiler_options)
        self._train_calls = {}  # steps per call -> compiled program, built on first use
        self._train_step_kwargs = dict(model=self.model, tx=self.tx, flip=config.flip,
                                       label_smoothing=config.label_smoothing, num_classes=config.num_classes,
                                       batch_sharding=NamedSharding(self.mesh, P("data")))
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
                compiler_options=self.compiler_options)
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

        Returns (state, acc, finished); `finished` is False when `should_stop()`, asked at log boundaries, cut the
        epoch short.
        """
        c = self.config
        order = self.epoch_order(state.rng, epoch)
        acc = self.zero_metrics() if acc is None else acc
        done = int(state.step[0]) - (epoch - 1) * self.steps_per_epoch
        for count in call_plan(done, self.steps_per_epoch, self.steps_per_call):
            state, acc = self.run_steps(state, acc, order, count)
            before, done = done, done + count
            if not (done // c.log_every_steps > before // c.log_every_steps or done == self.steps_per_epoch):
                continue  # no sync between log boundaries: the device queue stays full
            last = np.asarray(acc["last_loss"])  # syncs: keeps the bar honest and catches divergence early
            if not np.all(np.isfinite(last)):
                bad = ", ".join(f"{v} (seed {s})" for s, v in zip(self.seeds, last.tolist()) if not math.isfinite(v))
                raise TrainingDiverged(
                    f"loss became {bad} at epoch {epoch}, step {int(state.step[0])}: training stopped; "
                    "lower optimizer.learning_rate or check the input data")
            if progress is not None:
                progress(done, float(last.mean()))
            # Asked at log boundaries only: with several processes it is a blocking all-gather across hosts.
            if done < self.steps_per_epoch and should_stop():
                return state, acc, False
        return state, acc, True

    def epoch_summary(self, acc: dict) -> tuple[np.ndarray, np.ndarray]:
        """Per replica: (mean training loss (K,), training confusion (K, C, C)) of a finished epoch."""
        return np.asarray(acc["loss_sum"], np.float64) / self.steps_per_epoch, np.asarray(acc["confusion"])

    def evaluate(self, params, batch_stats) -> tuple[np.ndarray, np.ndarray]:
        """Per replica: (confusion (K, C, C), mean loss (K,)) over every test image, exactly once."""
        return self.test_evaluator(params, batch_stats)
