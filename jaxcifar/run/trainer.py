"""The Trainer: the dataset on the devices, the compiled steps, and the loop over an epoch."""

from __future__ import annotations

import functools
import math
import time
from typing import TYPE_CHECKING

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxcifar.nn import backends
from jaxcifar.errors import ConfigError, TrainingDiverged
from jaxcifar.nn.scoring import SplitScorer
from jaxcifar.nn.mesh import global_array, make_mesh
from jaxcifar.nn.recipe import Recipe
from jaxcifar.run.plan import RunPlan
from jaxcifar.nn.step import (TrainState, build_model, build_optimizer, epoch_order, init_replicas,
                           over_replicas, steps_done, train_steps, zero_replica_metrics)

if TYPE_CHECKING:  # for type hints only: the Trainer does not sit above the tfds stack
    from jaxcifar.data import cache


# The progress bar's longest silence: a sync this often costs nothing at full width (one 4-step call of the VGG
# takes 6-10 s on a 2-core CPU) and little at small widths; log boundaries alone left it a minute silent there.
PROGRESS_EVERY_S = 2.0


class Trainer:
    """The compiled steps and device-resident data of K runs trained together, data-parallel over `devices`.

    Every state leaf carries a leading replica axis, one entry per seed of `config.seeds` (K = 1 by
    default); replica k is the single run with seed k. Parameters, optimizer state and the dataset
    are replicated over the devices; every replica's batch is split along the 'data' mesh axis.
    BatchNorm statistics are means over the global batch (XLA inserts the all-reduce), so any device
    count computes the same function as one device.
    """

    def __init__(self, config, dataset: cache.Preprocessed, devices=None):
        self.config = config
        self.num_train = len(dataset.train_labels)
        devices = list(jax.devices() if devices is None else devices)
        if config.batch_size % len(devices):
            raise ConfigError(f"bad config: batch_size={config.batch_size} is not divisible by the {len(devices)} "
                             f"devices; use a multiple of {len(devices)}")
        self.choices = backends.step_choices(config, devices[0].platform)  # "auto" resolved here, once
        self.plan = RunPlan.of(config, self.num_train, self.choices)
        self.mesh = make_mesh(devices)
        self.replicated = NamedSharding(self.mesh, P())
        batch_rows = NamedSharding(self.mesh, P(None, None, "data"))  # (replica, steps, batch) index tables
        self.model = build_model(config, self.choices)
        self.tx = build_optimizer(config, self.plan.steps_per_epoch)
        # The whole preprocessed dataset lives on the devices, once for all replicas; batches are gathered inside jit.
        self.train_images = global_array(dataset.train_images, self.replicated)
        self.train_labels = global_array(dataset.train_labels.astype(np.int32), self.replicated)
        self.compiler_options = backends.compiler_options(devices[0].platform)
        self.test_scorer = SplitScorer(self.model, dataset.test_images, dataset.test_labels,
                                        num_classes=config.num_classes, batch_size=config.eval_batch_size,
                                        replicas=self.plan.replicas, mesh=self.mesh, compiler_options=self.compiler_options)
        self._train_calls = {}  # steps per call -> compiled program, built on first use
        self.recipe = Recipe.of_config(config)
        self._train_step_kwargs = dict(model=self.model, tx=self.tx, recipe=self.recipe,
                                       batch_sharding=NamedSharding(self.mesh, P("data")))
        order = functools.partial(epoch_order, num_examples=self.num_train, batch_size=config.batch_size)
        self._epoch_order = jax.jit(over_replicas(order, (0, None), self.plan.replicas), out_shardings=batch_rows)
        self.dispatched_step = None  # the step the last dispatched call ends on (for a stop's announcement)
        self.epoch_in_progress = None  # the epoch train_epoch is training, None between epochs

    def epoch_order(self, key_data, epoch: int):
        """Each replica's (steps, batch) example indices of `epoch` (1-based), for the runs' key data (K, 2)."""
        return self._epoch_order(key_data, epoch)

    def run_steps(self, state: TrainState, epoch_metrics: dict, order, count: int):
        """`count` updates of every replica in one compiled call (within one epoch, whose batch order is `order`)."""
        if count not in self._train_calls:
            steps = functools.partial(train_steps, count=count, loop=self.choices["step_loop"], **self._train_step_kwargs)
            self._train_calls[count] = jax.jit(
                over_replicas(steps, (0, 0, None, None, 0), self.plan.replicas),
                out_shardings=(self.replicated, self.replicated), donate_argnums=(0, 1),
                compiler_options=self.compiler_options)
        return self._train_calls[count](state, epoch_metrics, self.train_images, self.train_labels, order)

    def init_state(self) -> TrainState:
        return self.place(self._fresh_state())

    def zero_metrics(self) -> dict:
        return self.place(self._zero_metrics())

    def state_shapes(self) -> TrainState:
        """`init_state`'s shapes, dtypes and shardings, nothing computed: a restore template."""
        return self._placed_shapes(self._fresh_state)

    def metrics_shapes(self) -> dict:
        """`zero_metrics`'s shapes, dtypes and shardings, nothing computed."""
        return self._placed_shapes(self._zero_metrics)

    def _fresh_state(self) -> TrainState:
        return init_replicas(self.plan.seeds, self.model, self.tx, self.train_images.shape[1:])

    def _zero_metrics(self) -> dict:
        return zero_replica_metrics(self.config.num_classes, self.plan.replicas)

    def _placed_shapes(self, make):
        return jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=self.replicated),
                                      jax.eval_shape(make))

    def place(self, tree):
        """Replicates a host or single-device pytree (a fresh or restored state) over the mesh."""
        return jax.tree_util.tree_map(lambda x: global_array(x, self.replicated), tree)

    def train_epoch(self, state: TrainState, epoch: int, epoch_metrics: dict | None = None, progress=None,
                    should_stop=lambda boundary: False):
        """Runs the remaining steps of `epoch` (1-based) from `state.step`, accumulating into `epoch_metrics`.

        Returns (state, epoch_metrics, finished); `finished` is False when `should_stop(boundary)`, asked after
        every compiled call (`boundary`: the call ended on a log boundary, where every process asks), cut the
        epoch short. `progress(done, loss)` is called at log boundaries and at least every PROGRESS_EVERY_S.
        """
        self.epoch_in_progress = epoch
        try:
            return self._train_epoch(state, epoch, epoch_metrics, progress, should_stop)
        finally:
            self.epoch_in_progress = None

    def _train_epoch(self, state, epoch, epoch_metrics, progress, should_stop):
        plan = self.plan
        order = self.epoch_order(state.key_data, epoch)
        epoch_metrics = self.zero_metrics() if epoch_metrics is None else epoch_metrics
        done = steps_done(state) - plan.epoch_start(epoch)
        shown = time.monotonic()
        for count in plan.calls(done):
            state, epoch_metrics = self.run_steps(state, epoch_metrics, order, count)
            before, done = done, done + count
            self.dispatched_step = plan.epoch_start(epoch) + done
            boundary = plan.log_boundary(before, done)
            # Between boundaries nothing syncs unless the bar is due: the device queue stays full.
            if boundary or (progress is not None and time.monotonic() - shown >= PROGRESS_EVERY_S):
                last = np.asarray(epoch_metrics["last_loss"])  # syncs
                if boundary:  # every process checks at the same steps, so all of them stop together
                    self._check_finite(last, epoch, steps_done(state))
                if progress is not None:
                    progress(done, float(last.mean()))
                    shown = time.monotonic()
            if done < plan.steps_per_epoch and should_stop(boundary):
                return state, epoch_metrics, False
        return state, epoch_metrics, True

    def _check_finite(self, last_loss: np.ndarray, epoch: int, step: int) -> None:
        if not np.all(np.isfinite(last_loss)):
            bad = ", ".join(f"{v} (seed {s})" for s, v in zip(self.plan.seeds, last_loss.tolist()) if not math.isfinite(v))
            raise TrainingDiverged(f"loss became {bad} at epoch {epoch}, step {step}: training stopped; "
                                   "lower optimizer.learning_rate or check the input data")

    def epoch_summary(self, epoch_metrics: dict) -> tuple[np.ndarray, np.ndarray]:
        """Per replica: (mean training loss (K,), training confusion (K, C, C)) of a finished epoch."""
        loss = np.asarray(epoch_metrics["loss_sum"], np.float64) / self.plan.steps_per_epoch
        return loss, np.asarray(epoch_metrics["confusion"])

    def score_test_set(self, params, batch_stats) -> tuple[np.ndarray, np.ndarray]:
        """Per replica: (confusion (K, C, C), mean loss (K,)) over every test image, exactly once."""
        return self.test_scorer(params, batch_stats)
