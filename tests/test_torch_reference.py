"""The PyTorch port used to measure fidelity computes what jaxcifar's models compute (needs the torch extra)."""

import jax
import numpy as np
import pytest

from jaxcifar import models, torch_reference
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
    port = torch_reference.build_model(name, width=1 / 16)
    torch_reference.load_flax(port, variables["params"], stats)
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
    port = torch_reference.build_model("vgg_bn_drop", width=0.5)
    convs = [m for m in port.modules() if isinstance(m, torch.nn.Conv2d)]
    first = convs[0].weight.detach().numpy()
    assert abs(first.std() - np.sqrt(2 / (9 * 32))) < 0.15 * np.sqrt(2 / (9 * 32))  # MSR: n = 3*3*out
    assert all(float(c.bias.detach().abs().max()) == 0 for c in convs)
    bn = next(m for m in port.modules() if isinstance(m, torch.nn.BatchNorm2d))
    w = bn.weight.detach().numpy()
    assert w.min() >= 0 and w.max() <= 1 and bn.eps == 1e-3
