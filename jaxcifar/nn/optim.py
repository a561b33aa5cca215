"""torch7 `optim.sgd` as cifar.torch's train.lua drives it, as an optax transformation.

Per call n = 0, 1, 2, ... (torch's `evalCounter`):
    g      = grad + weight_decay * x                  (every parameter, BN and biases too)
    buf    = g                              if n == 0  (torch copies the first gradient)
           = momentum * buf + (1 - dampening) * g     otherwise
    clr    = lr_epoch / (1 + n * learning_rate_decay)
    x     <- x - clr * buf
with dampening defaulting to the momentum, so lr 1 acts like lr 0.1 of modern SGD, and
lr_epoch = learning_rate / 2^floor(epoch / epoch_step) for epochs counted from 1
(train.lua halves the rate at the start of epochs 25, 50, 75, ...).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("torch_step", "cosine", "onecycle")


class Torch7SGDState(NamedTuple):
    count: jax.Array  # torch's evalCounter: updates applied so far
    momentum_buffer: optax.Updates


def torch_step_lr(count, learning_rate, epoch_step, steps_per_epoch):
    """The base rate of train.lua at update `count` (0-based): halved every `epoch_step` epochs."""
    epoch = count // steps_per_epoch + 1
    return learning_rate * 0.5 ** (epoch // epoch_step)


def base_learning_rate(count, *, schedule: str, learning_rate: float, epoch_step: int, steps_per_epoch: int,
                       total_steps: int | None = None, warmup_fraction: float = 0.15):
    # count stays exact in float32 up to 2^24 updates (43,000 epochs of 390 steps)
    """The learning rate before torch's `learningRateDecay` annealing, for each schedule."""
    count = jnp.asarray(count, jnp.float32)
    if schedule == "torch_step":
        return torch_step_lr(jnp.floor(count), learning_rate, epoch_step, steps_per_epoch)
    if total_steps is None or total_steps <= 0:
        raise ValueError(f"schedule {schedule!r} needs total_steps > 0")
    progress = jnp.clip(count / total_steps, 0.0, 1.0)
    if schedule == "cosine":
        return learning_rate * 0.5 * (1 + jnp.cos(jnp.pi * progress))
    if schedule == "onecycle":  # linear warm-up to the peak, then linear decay to zero
        w = warmup_fraction
        return learning_rate * jnp.where(progress < w, progress / w, (1 - progress) / (1 - w))
    raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")


def torch7_sgd(
    learning_rate: float = 1.0,
    momentum: float = 0.9,
    dampening: float | None = None,
    weight_decay: float = 5e-4,
    learning_rate_decay: float = 1e-7,
    epoch_step: int = 25,
    steps_per_epoch: int = 390,
    schedule: str = "torch_step",
    total_steps: int | None = None,
) -> optax.GradientTransformation:
    if steps_per_epoch <= 0 or epoch_step <= 0:
        raise ValueError("steps_per_epoch and epoch_step must be positive")
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    damp = momentum if dampening is None else dampening
    current_lr = learning_rate_fn(learning_rate, learning_rate_decay, schedule=schedule, epoch_step=epoch_step,
                                  steps_per_epoch=steps_per_epoch, total_steps=total_steps)

    def init_fn(params):
        return Torch7SGDState(jnp.zeros([], jnp.int32), jax.tree_util.tree_map(jnp.zeros_like, params))

    def update_fn(grads, state, params):
        if params is None:
            raise ValueError("torch7_sgd needs params for weight decay: call update(grads, state, params)")
        g = jax.tree_util.tree_map(lambda g, x: g + weight_decay * x, grads, params)
        if momentum:
            first = state.count == 0
            buf = jax.tree_util.tree_map(
                lambda b, g: jnp.where(first, g, momentum * b + (1 - damp) * g), state.momentum_buffer, g)
        else:
            buf = g
        clr = current_lr(state.count)
        updates = jax.tree_util.tree_map(lambda b: (-clr * b).astype(b.dtype), buf)
        new_buf = buf if momentum else state.momentum_buffer
        return updates, Torch7SGDState(state.count + 1, new_buf)

    return optax.GradientTransformation(init_fn, update_fn)


def learning_rate_fn(learning_rate: float, learning_rate_decay: float, **schedule_kwargs):
    """count -> the rate torch7_sgd applies at update `count` (0-based), annealing included."""

    def lr(count):
        count = jnp.asarray(count)
        base = base_learning_rate(count, learning_rate=learning_rate, **schedule_kwargs)
        return base / (1 + count.astype(jnp.float32) * learning_rate_decay)

    return lr
