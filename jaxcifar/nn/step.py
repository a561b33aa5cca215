"""The training state, its random streams, and the functions XLA compiles: one update, several, an evaluation batch.

Every random draw is a function of (seed, epoch) or (seed, step): the epoch's order from
fold_in(key, epoch), a step's flips and dropout from fold_in(key, step). A run is therefore the
same run however often it is stopped and resumed. Every state leaf may carry a leading replica
axis (one entry per seed, `over_replicas`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from jaxcifar.nn import augment, backends, batches, metrics, models, optim
from jaxcifar.nn.recipe import Recipe


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # updates applied so far
    params: Any
    batch_stats: Any
    opt_state: Any
    key_data: jax.Array  # the raw data (uint32) of the run's base key, so checkpoints hold plain arrays


# Saves store `key_data` under the field's earlier name, "rng": the name of layout replicas-1, which this version
# writes (a rename would need a new checkpoint.LAYOUT).
_SAVED_NAMES = {"key_data": "rng"}


def _state_to_dict(state: TrainState) -> dict:
    return {_SAVED_NAMES.get(f.name, f.name): flax.serialization.to_state_dict(getattr(state, f.name))
            for f in dataclasses.fields(state)}


def _state_from_dict(state: TrainState, saved: dict) -> TrainState:
    return state.replace(**{f.name: flax.serialization.from_state_dict(getattr(state, f.name),
                                                                          saved[_SAVED_NAMES.get(f.name, f.name)])
                            for f in dataclasses.fields(state)})


flax.serialization.register_serialization_state(TrainState, _state_to_dict, _state_from_dict, override=True)


def build_model(config, choices: dict | None = None) -> flax.linen.Module:
    """The config's network, built with `choices` (default: backends.step_choices for JAX's backend)."""
    choices = choices or backends.step_choices(config)
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
    def init(key_data):
        variables = models.init_variables(model, stream_key(key_data, INIT_STREAM), image_shape)
        params = variables["params"]
        return TrainState(step=jnp.zeros([], jnp.int32), params=params, batch_stats=variables["batch_stats"],
                          opt_state=tx.init(params), key_data=key_data)

    return jax.jit(init)


def layer_order(model, image_shape) -> list[str]:
    """The network's parameter layers ('ConvBNReLU_0/Conv_0', ...) in the order its forward pass creates them.

    A state's own dicts are in jax's sorted key order (ConvBNReLU_0, _1, _10, ...), not the network's; flax's
    init builds them in call order, which tracing it (nothing computed) records.
    """
    order = []

    def init(key):
        variables = models.init_variables(model, key, image_shape)
        order.extend(dict.fromkeys("/".join(path[:-1]) for path in traverse_util.flatten_dict(variables["params"])))
        return jnp.zeros(())

    jax.eval_shape(init, jax.random.key(0))
    return order


def steps_done(state: TrainState) -> int:
    """The updates a state has applied (every replica has applied the same number)."""
    return int(state.step[0])


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


def stream_key(key_data, stream: int):
    return jax.random.fold_in(jax.random.wrap_key_data(key_data), stream)


def step_keys(state: TrainState):
    """(augmentation key, dropout key) of the update about to be applied: a function of (seed, step) only."""
    return step_keys_at(state.key_data, state.step)


def step_keys_at(key_data, step):
    return jax.random.split(jax.random.fold_in(stream_key(key_data, STEP_STREAM), step))


def epoch_order(key_data, epoch, num_examples: int, batch_size: int):
    """The epoch's batches: a function of (seed, epoch) only."""
    return batches.epoch_batch_indices(stream_key(key_data, ORDER_STREAM), epoch, num_examples, batch_size)


def training_loss(params, *, batch_stats, images, labels, dropout_key, model, recipe: Recipe):
    """The loss a train step differentiates (train mode: batch statistics, dropout; the recipe's loss), with the
    logits and the updated BatchNorm statistics. `bench` times this same function."""
    logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, images, train=True,
                                  rngs={"dropout": dropout_key}, mutable=["batch_stats"])
    return recipe.loss(logits, labels), (logits, updates["batch_stats"])


def train_step(state: TrainState, epoch_metrics: dict, images, labels, epoch_indices, *, model, tx, recipe: Recipe,
               batch_sharding=None):
    """One torch7-SGD update on the batch `epoch_indices[step % steps]`, augmented as the recipe says; accumulates
    epoch metrics."""
    steps = epoch_indices.shape[0]
    augment_key, dropout_key = step_keys(state)
    x, y = batches.gather_batch(images, labels, epoch_indices[state.step % steps])
    x = augment.augment(x, augment_key, recipe.augment)
    if batch_sharding is not None:
        x = jax.lax.with_sharding_constraint(x, batch_sharding)

    loss_fn = functools.partial(training_loss, batch_stats=state.batch_stats, images=x, labels=y,
                                dropout_key=dropout_key, model=model, recipe=recipe)
    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                          batch_stats=batch_stats, opt_state=opt_state)
    classes = recipe.num_classes
    epoch_metrics = {"loss_sum": epoch_metrics["loss_sum"] + loss, "last_loss": loss,
                     "confusion": epoch_metrics["confusion"] + metrics.confusion_update(logits, y, classes)}
    return state, epoch_metrics


def train_steps(state: TrainState, epoch_metrics: dict, images, labels, epoch_indices, *, count: int,
                loop: str = "unroll", **step_kwargs):
    """`count` consecutive `train_step`s in one program: traced one after another, or as a `lax.scan`.

    Why several per call, and which loop, depends on the backend: backends.STEP_CHOICES.
    """
    step = functools.partial(train_step, images=images, labels=labels, epoch_indices=epoch_indices, **step_kwargs)
    if loop == "scan" and count > 1:
        def body(carry, _):
            return step(*carry), None

        return jax.lax.scan(body, (state, epoch_metrics), length=count)[0]
    for _ in range(count):
        state, epoch_metrics = step(state, epoch_metrics)
    return state, epoch_metrics


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


def eval_split(params, batch_stats, images, labels, all_indices, all_valid, *, model, num_classes: int):
    """Confusion counts and summed loss over every batch of the tables, in one program: one dispatch an evaluation.
    The batches were separate calls, 20 dispatches for the test split: on a GPU whose train step takes 3 ms, the
    host's dispatching is much of what an evaluation costs. The loss sums in the same order as that loop did."""
    def one_batch(totals, batch):
        confusion, loss = eval_step(params, batch_stats, images, labels, all_indices, all_valid, batch, model=model,
                                    num_classes=num_classes)
        return (totals[0] + confusion, totals[1] + loss), None

    zeros = (jnp.zeros((num_classes, num_classes), jnp.int32), jnp.zeros((), jnp.float32))
    totals, _ = jax.lax.scan(one_batch, zeros, jnp.arange(all_indices.shape[0]))
    return totals
