"""Placement on the devices: the one-axis ('data') mesh, and a host array as a global array on it."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh


def global_array(x, sharding):
    """A host array as a global array with `sharding` (replicated, or rows split over the 'data' axis); works
    across hosts, where device_put cannot."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def make_mesh(devices) -> Mesh:
    return Mesh(np.array(list(devices)), ("data",))
