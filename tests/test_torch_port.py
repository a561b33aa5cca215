"""The PyTorch port used to measure fidelity computes what jaxcifar's models compute (needs the torch extra)."""

import jax
import numpy as np
import pytest

from jaxcifar.nn import models
from jaxcifar.fidelity import torch_port
from conftest import import_torch

torch = import_torch()


@pytest.mark.parametrize("name", ["vgg_bn_drop", "nin"])
def test_port_with_flax_weights_matches_the_flax_forward(name):
    model = models.create_model(name, width=1 / 16)
    x = np.random.default_rng(0).normal(size=(8, 32, 32, 3)).astype(np.float32)
    variables = model.init({"params": jax.random.key(0)}, x, train=False)
    # non-trivial running statistics, so eval mode tests their use too
    stats = jax.tree_util.tree_map(lambda s: s + 0.3 * np.abs(np.random.default_rng(1).normal(size=s.shape)),
                                   variables["batch_stats"])
    port = torch_port.build_model(name, width=1 / 16)
    torch_port.load_flax(port, variables["params"], stats)
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    port.eval()
    want = model.apply({"params": variables["params"], "batch_stats": stats}, x, train=False)
    np.testing.assert_allclose(port(xt).detach().numpy(), want, rtol=1e-4, atol=1e-4)
    # training-mode BatchNorm (batch statistics), dropout off on both sides
    port.train()
    for m in port.modules():
        if isinstance(m, torch.nn.Dropout):
            m.eval()
    want, _ = model.clone(dropout=False).apply({"params": variables["params"], "batch_stats": stats}, x,
                                               train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(port(xt).detach().numpy(), want, rtol=1e-4, atol=1e-4)


def test_port_initialization_follows_torch7():
    port = torch_port.build_model("vgg_bn_drop", width=0.5)
    convs = [m for m in port.modules() if isinstance(m, torch.nn.Conv2d)]
    first = convs[0].weight.detach().numpy()
    assert abs(first.std() - np.sqrt(2 / (9 * 32))) < 0.15 * np.sqrt(2 / (9 * 32))  # MSR: n = 3*3*out
    assert all(float(c.bias.detach().abs().max()) == 0 for c in convs)
    bn = next(m for m in port.modules() if isinstance(m, torch.nn.BatchNorm2d))
    w = bn.weight.detach().numpy()
    assert w.min() >= 0 and w.max() <= 1 and bn.eps == 1e-3


RECIPES = ("quick", "vgg_fast", "vgg", "nin", "vgg_noflip", "nin_noflip", "vgg_nobn", "vgg_nodrop", "tiny")


def _jax_parameter_shapes(config) -> list[tuple]:
    """The JAX network's parameter shapes in network order, each as torch stores it (weight then bias; a conv
    weight as out, in, kh, kw and a linear one as out, in)."""
    from flax import traverse_util

    from jaxcifar.nn import step as step_lib
    model = step_lib.build_model(config)
    variables = jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, np.zeros((1, 32, 32, 3), np.float32),
                                                  train=False))
    flat = traverse_util.flatten_dict(variables["params"], sep="/")
    shapes = []
    for layer in step_lib.layer_order(model, (32, 32, 3)):
        weight = flat.get(f"{layer}/kernel", flat.get(f"{layer}/scale"))
        shape = tuple(weight.shape)
        shapes += [shape[::-1] if len(shape) == 2 else (shape[3], shape[2], *shape[:2]) if len(shape) == 4 else shape,
                   tuple(flat[f"{layer}/bias"].shape)]
    return shapes


@pytest.mark.parametrize("recipe", RECIPES)
def test_the_port_builds_each_recipe_as_the_jax_side_does_and_steps_its_rate_alike(recipe):
    # The port's layouts and schedule are its own, written from the .lua files and train.lua: a mistake in either
    # side's shows here.
    import_torch()
    from jaxcifar.nn import step as step_lib
    from conftest import REPO
    from jaxcifar.config import load_config_file
    c = load_config_file(REPO / "configs" / f"{recipe}.py")
    for width in sorted({c.width, 0.25}):
        c.width = width
        port = torch_port.build_model(c.model, c.width, c.num_classes, c.batch_norm, c.dropout)
        assert [tuple(p.shape) for p in port.parameters()] == _jax_parameter_shapes(c), (recipe, width)
    steps_per_epoch = 50_000 // c.batch_size
    want = np.asarray(step_lib.learning_rate_schedule(c, steps_per_epoch)(np.arange(steps_per_epoch * c.num_epochs)))
    # The JAX side computes the rate in float32 (a few units of its 6e-8 rounding near a peak of 1), the port in
    # float64; a rate off by a step, an epoch or a halving differs by far more.
    np.testing.assert_allclose(torch_port.learning_rates(c, steps_per_epoch), want, rtol=2e-6, atol=3e-7)


@pytest.mark.parametrize("recipe_augment", ["flip", "crop_flip"])
def test_the_port_augments_as_the_jax_side_does_from_the_same_stream(recipe_augment):
    import jax.numpy as jnp

    from jaxcifar.nn import augment
    from jaxcifar import config as config_lib
    from jaxcifar.nn import step as step_lib
    from jaxcifar.fidelity.runs import JaxStream

    c = config_lib.base_config()
    c.batch_size, c.augment, c.seed = 16, recipe_augment, 3
    images = np.random.default_rng(0).normal(size=(16, 32, 32, 3)).astype(np.float32)
    stream = JaxStream(c, 16)
    port = torch_port.TorchRun(c, images, np.zeros(16, np.int32), c.seed, stream=stream)
    spec = augment.Augment.of_config(c)
    for step in (0, 5):
        port.step = step
        got = port.augment_batch(torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))).numpy()
        key = step_lib.step_keys_at(stream.rng, step)[0]
        want = np.asarray(augment.augment(jnp.asarray(images), key, spec)).transpose(0, 3, 1, 2)
        np.testing.assert_array_equal(got, want)
    # Without a stream the port draws its own crops: windows of the padded images, not all at one offset.
    port = torch_port.TorchRun(c, images, np.zeros(16, np.int32), c.seed)
    if recipe_augment == "crop_flip":
        assert len({tuple(o) for o in port.crop_offsets(16).tolist()}) > 1
