"""Training and evaluation batches from the dataset held on the devices: the epoch's order and the gather run inside
`jit`, every step (augment.py then crops and flips); the evaluation tables are built once on the host.
"""

from __future__ import annotations

import jax
import numpy as np


def epoch_batch_indices(key, epoch, num_examples: int, batch_size: int):
    """(steps, batch) example indices for one epoch; the last partial batch is dropped."""
    steps = num_examples // batch_size
    perm = jax.random.permutation(jax.random.fold_in(key, epoch), num_examples)
    return perm[: steps * batch_size].reshape(steps, batch_size)


def gather_batch(images, labels, indices):
    """A training batch gathered from device-resident arrays (NHWC); augment.py does the rest."""
    return images[indices], labels[indices]


def eval_batches(num_examples: int, batch_size: int):
    """(indices, valid) per evaluation batch: covers every example exactly once, the last batch padded."""
    steps = -(-num_examples // batch_size)
    idx = np.arange(steps * batch_size)
    valid = idx < num_examples
    idx = np.where(valid, idx, 0)
    return idx.reshape(steps, batch_size), valid.reshape(steps, batch_size)
