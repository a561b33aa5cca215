"""Pytrees as {path: leaf}: the one way jaxcifar names a parameter or state leaf ("params/Conv_0/kernel")."""

from __future__ import annotations

from typing import Any

import numpy as np
from flax import serialization, traverse_util


def flat_dict(tree, sep: str = "/") -> dict[str, Any]:
    """{path: leaf} of a pytree of nested dicts, flax structs, NamedTuples or lists (list entries named by index).

    Paths are the keys of the tree's flax state dict, joined with `sep`: the names orbax saves under. Sorted,
    so two trees of one structure list their leaves in the same order however they were built. Empty
    subtrees (a network without BatchNorm has no `batch_stats`) have no entry.
    """
    state = serialization.to_state_dict(tree)
    if not isinstance(state, dict):
        return {"": state}
    return dict(sorted(traverse_util.flatten_dict(state, sep=sep).items()))


def flat_vector(tree) -> np.ndarray:
    """Every leaf of `tree`, in path order, as one float64 vector (for distances between two states)."""
    return np.concatenate([np.ravel(np.asarray(leaf, np.float64)) for leaf in flat_dict(tree).values()])
