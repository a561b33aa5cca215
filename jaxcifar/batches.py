"""Training and evaluation batches from the dataset held on the devices: the epoch's order, the gather and the
flips run inside `jit`, every step; the evaluation tables are built once on the host.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def epoch_batch_indices(key, epoch, num_examples: int, batch_size: int):
    """(steps, batch) example indices for one epoch; the last partial batch is dropped."""
    steps = num_examples // batch_size
    perm = jax.random.permutation(jax.random.fold_in(key, epoch), num_examples)
    return perm[: steps * batch_size].reshape(steps, batch_size)


def flip_mask(key, batch_size: int, mode: str):
    """Which images of a batch are mirrored.

    'batchflip': torch's `randperm(bs):le(bs/2)`, exactly floor(bs/2) chosen at random;
    'independent': each image with probability 1/2; 'none': no flips.
    """
    if mode == "batchflip":
        return jax.random.permutation(key, batch_size) < batch_size // 2
    if mode == "independent":
        return jax.random.bernoulli(key, 0.5, (batch_size,))
    if mode == "none":
        return jnp.zeros((batch_size,), bool)
    raise ValueError(f"unknown flip mode {mode!r}; choose 'batchflip', 'independent' or 'none'")


def gather_batch(images, labels, indices, key, flip: str):
    """Gathers a training batch from device-resident arrays and mirrors the chosen images (NHWC)."""
    x = images[indices]
    mask = flip_mask(key, indices.shape[0], flip)
    x = jnp.where(mask[:, None, None, None], x[:, :, ::-1, :], x)
    return x, labels[indices]


def eval_batches(num_examples: int, batch_size: int):
    """(indices, valid) per evaluation batch: covers every example exactly once, the last batch padded."""
    steps = -(-num_examples // batch_size)
    idx = np.arange(steps * batch_size)
    valid = idx < num_examples
    idx = np.where(valid, idx, 0)
    return idx.reshape(steps, batch_size), valid.reshape(steps, batch_size)
