"""The project's one evaluation path: eval-mode networks over images.

SplitScorer: confusion counts and mean loss over a labelled image set held on the devices; the Trainer runs it on
the test split every epoch, `python -m jaxcifar.evaluate` on a saved run, the fidelity tools for their accuracies.
eval_logits: the logits of unlabelled images (`python -m jaxcifar.predict`).
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxcifar.nn import backends, batches
from jaxcifar.nn.mesh import global_array
from jaxcifar.nn.step import eval_split, over_replicas


class SplitScorer:
    """Confusion counts and mean loss of K replicas' models over a labelled image set held on the devices.

    The images sit replicated on the mesh; each batch, split over the 'data' axis, is picked inside
    the program (`step.eval_split`, every batch in one call), so nothing but the totals crosses to the host, and it
    works whichever process holds which devices.
    """

    def __init__(self, model, images: np.ndarray, labels: np.ndarray, *, num_classes: int, batch_size: int,
                 replicas: int, mesh: Mesh, compiler_options=None):
        replicated = NamedSharding(mesh, P())
        devices = mesh.devices.size
        self.num_classes, self.replicas, self.count = num_classes, replicas, len(labels)
        self.images = global_array(images, replicated)
        self.labels = global_array(labels.astype(np.int32), replicated)
        # No larger than the split (a batch of 10^8 asked for 3.2 TB after an epoch of training), and a multiple of
        # the device count; padding rows are masked out.
        batch = -(-min(batch_size, len(labels)) // devices) * devices
        indices, valid = batches.eval_batches(len(labels), batch)
        rows = NamedSharding(mesh, P(None, "data"))
        self.indices, self.valid = global_array(indices, rows), global_array(valid, rows)
        self._program = _scoring_program(model, num_classes, replicas, mesh, tuple(sorted((compiler_options or {}).items())))

    def __call__(self, params, batch_stats) -> tuple[np.ndarray, np.ndarray]:
        """Per replica: (confusion (K, C, C), mean loss (K,)) over every image, exactly once."""
        confusion, loss = self._program(params, batch_stats, self.images, self.labels, self.indices, self.valid)
        return np.asarray(confusion), np.asarray(loss, np.float64) / self.count


@functools.lru_cache(maxsize=16)
def _scoring_program(model, num_classes: int, replicas: int, mesh: Mesh, compiler_options: tuple):
    """The jitted evaluation of a whole split, one per (model, replicas, mesh): scorers of the same model share its
    compile."""
    replicated = NamedSharding(mesh, P())
    return jax.jit(over_replicas(functools.partial(eval_split, model=model, num_classes=num_classes),
                                 (0, 0, None, None, None, None), replicas),
                   out_shardings=(replicated, replicated), compiler_options=dict(compiler_options) or None)


def eval_logits(model, variables: dict, images: np.ndarray, num_classes: int, batch_size: int = 500) -> np.ndarray:
    """Eval-mode logits of `variables` (one run's, no replica axis) for preprocessed images, in fixed-size batches
    (one compile)."""
    logits, out = _logits_program(model), []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        padded = np.concatenate([chunk, np.zeros((batch_size - len(chunk), *chunk.shape[1:]), chunk.dtype)])
        out.append(np.asarray(logits(variables, padded))[: len(chunk)])
    return np.concatenate(out) if out else np.zeros((0, num_classes), np.float32)


@functools.cache
def _logits_program(model):
    return jax.jit(functools.partial(model.apply, train=False), compiler_options=backends.compiler_options())
