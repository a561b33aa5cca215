"""trees.py: the one {path: leaf} view of a pytree, and the names checkpoints store leaves under."""

import subprocess
import sys

import jax
import numpy as np

from jaxcifar.run import checkpoint, trees
from jaxcifar.data import fake_data
from jaxcifar.run.trainer import Trainer
from conftest import REPO, tiny_config


def jax_paths(tree) -> list[str]:
    """Leaf paths as jax's own flattening names them (how checkpoints of earlier versions keyed their checksums)."""
    return ["/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
            for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def test_a_saved_runs_paths_are_jaxs_paths_and_keep_the_key_datas_saved_name(prepared):
    trainer = Trainer(tiny_config(prepared), fake_data.random_preprocessed(64))
    tree = checkpoint.to_tree({"train_state": trainer.init_state(), "epoch_metrics": trainer.zero_metrics()})
    flat = trees.flat_dict(tree)
    assert sorted(flat) == sorted(jax_paths(tree))  # the checksums of earlier saves still find their leaves
    assert "train_state/rng" in flat and not any("key_data" in p for p in flat)  # the layout replicas-1 names
    assert "train_state/params/ConvBNReLU_0/Conv_0/kernel" in flat
    restored = checkpoint.from_tree(trainer.state_shapes(), tree["train_state"])
    np.testing.assert_array_equal(np.asarray(restored.key_data), np.asarray(tree["train_state"]["rng"]))


def test_flat_dict_orders_paths_whatever_the_insertion_order():
    a = {"b": {"y": np.ones(2), "x": np.zeros(1)}, "a": np.arange(3)}
    b = {"a": np.arange(3), "b": {"x": np.zeros(1), "y": np.ones(2)}}
    assert list(trees.flat_dict(a)) == list(trees.flat_dict(b)) == ["a", "b/x", "b/y"]
    np.testing.assert_array_equal(trees.flat_vector(a), [0, 1, 2, 0, 1, 1])
    assert trees.flat_dict({"empty": {}, "w": np.ones(1)}).keys() == {"w"}


def test_models_and_config_import_each_other_in_one_direction_only():
    code = ("import sys, jaxcifar.nn.models; assert 'jaxcifar.config' not in sys.modules, 'models imports config'; "
            "import jaxcifar.config; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "ok", r.stderr[-2000:]
