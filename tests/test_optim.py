"""torch7_sgd against a transcription of torch7 optim.sgd (2015) driven as train.lua drives it."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxcifar.nn import optim


class Torch7SGDReference:
    """optim.sgd's arithmetic, with train.lua's halving of config.learningRate every epoch_step epochs."""

    def __init__(self, lr, momentum, weight_decay, lr_decay, epoch_step, steps_per_epoch, dampening=None):
        self.lr, self.mom, self.wd, self.lrd = lr, momentum, weight_decay, lr_decay
        self.damp = momentum if dampening is None else dampening
        self.epoch_step, self.spe = epoch_step, steps_per_epoch
        self.eval_counter, self.dfdx, self.epoch = 0, None, 0

    def step(self, x, grad):
        if self.eval_counter % self.spe == 0:  # train(): a new epoch begins
            self.epoch += 1
            if self.epoch % self.epoch_step == 0:
                self.lr /= 2
        dfdx = grad + self.wd * x
        if self.mom != 0:
            if self.dfdx is None:
                self.dfdx = dfdx.copy()
            else:
                self.dfdx = self.mom * self.dfdx + (1 - self.damp) * dfdx
            dfdx = self.dfdx
        clr = self.lr / (1 + self.eval_counter * self.lrd)
        self.eval_counter += 1
        return x - clr * dfdx


def quadratic_grad(x, a, b):
    return a * (x - b)


@pytest.mark.parametrize("dampening", [None, 0.0])
def test_matches_torch7_reference_over_150_steps(dampening):
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0.5, 2, 6), rng.normal(size=6)
    kw = dict(momentum=0.9, weight_decay=5e-4, epoch_step=2, steps_per_epoch=10)
    ref = Torch7SGDReference(1.0, lr_decay=1e-3, dampening=dampening, **kw)
    tx = optim.torch7_sgd(learning_rate=1.0, learning_rate_decay=1e-3, dampening=dampening, **kw)
    x64 = rng.normal(size=6)
    params = {"w": jnp.asarray(x64, jnp.float32)}
    state = tx.init(params)
    update = jax.jit(tx.update)
    for n in range(150):
        g = quadratic_grad(np.asarray(params["w"], np.float64), a, b)
        x64 = ref.step(np.asarray(params["w"], np.float64), g)  # reference from the same point each step
        updates, state = update({"w": jnp.asarray(g, jnp.float32)}, state, params)
        params = optax.apply_updates(params, updates)
        np.testing.assert_allclose(np.asarray(params["w"]), x64, rtol=1e-5, atol=1e-6, err_msg=f"step {n}")
    assert int(state.count) == 150


def test_first_update_is_a_full_gradient_step():
    tx = optim.torch7_sgd(learning_rate=1.0, weight_decay=0.0, learning_rate_decay=0.0)
    params = {"w": jnp.array([1.0, 2.0])}
    updates, _ = tx.update({"w": jnp.array([0.5, -1.0])}, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], [-0.5, 1.0])


def test_weight_decay_reaches_every_parameter():
    tx = optim.torch7_sgd(learning_rate=1.0, weight_decay=0.1, learning_rate_decay=0.0, momentum=0.0)
    params = {"bn": {"scale": jnp.array([2.0])}, "bias": jnp.array([-3.0])}
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    np.testing.assert_allclose(updates["bn"]["scale"], [-0.2])
    np.testing.assert_allclose(updates["bias"], [0.3])


@pytest.mark.parametrize("epoch,expected", [(1, 1.0), (24, 1.0), (25, 0.5), (49, 0.5), (50, 0.25), (300, 2.0 ** -12)])
def test_learning_rate_by_epoch(epoch, expected):
    spe = 390
    lr = optim.learning_rate_fn(1.0, 0.0, schedule="torch_step", epoch_step=25, steps_per_epoch=spe)
    for step in ((epoch - 1) * spe, epoch * spe - 1):  # first and last update of the epoch
        assert float(lr(step)) == pytest.approx(expected, rel=1e-6)
    with_decay = optim.learning_rate_fn(1.0, 1e-7, schedule="torch_step", epoch_step=25, steps_per_epoch=spe)
    n = (epoch - 1) * spe
    assert float(with_decay(n)) == pytest.approx(expected / (1 + n * 1e-7), rel=1e-6)


def test_other_schedules():
    cos = optim.learning_rate_fn(0.4, 0.0, schedule="cosine", epoch_step=25, steps_per_epoch=10, total_steps=100)
    assert float(cos(0)) == pytest.approx(0.4) and float(cos(50)) == pytest.approx(0.2) and float(cos(100)) < 1e-6
    one = optim.learning_rate_fn(0.4, 0.0, schedule="onecycle", epoch_step=25, steps_per_epoch=10, total_steps=100)
    assert float(one(0)) == 0 and float(one(15)) == pytest.approx(0.4) and float(one(100)) == pytest.approx(0)
    with pytest.raises(ValueError, match="unknown schedule"):
        optim.torch7_sgd(schedule="exponential")
