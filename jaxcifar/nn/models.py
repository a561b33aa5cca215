"""cifar.torch's models in Flax linen: VGG-BN-Dropout and Network-in-Network, built of layers.py's torch7 layers.

Initialization follows the torch7 modules of 2015: MSR normal for VGG convolutions,
N(0, 0.05) for NIN's, zero conv biases; `nn.Linear` U(-1/sqrt(fan_in), 1/sqrt(fan_in))
for weight and bias; BatchNormalization weight U(0, 1), bias 0.

BatchNorm follows torch's THNN arithmetic: batch mean and biased variance normalize in
training, the running variance is updated with the unbiased one, momentum 0.1. Its
running statistics live in the `batch_stats` collection and move only in training.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxcifar.nn.layers import Conv, Dropout, TorchBatchNorm, avg_pool_ceil, max_pool, torch_linear_init

MODEL_NAMES = ("vgg_bn_drop", "nin")


def scaled(channels: int, width: float) -> int:
    """A layer's channel count at width multiplier `width` (at least one)."""
    return max(1, int(round(channels * width)))


class ConvBNReLU(nn.Module):
    features: int
    kernel_size: int
    padding: int
    kernel_std: float
    batch_norm: bool
    conv_impl: str
    dtype: Any
    bn_grad: str = "closed_form"

    @nn.compact
    def __call__(self, x, train: bool):
        x = Conv(self.features, self.kernel_size, self.padding, self.kernel_std, self.conv_impl, self.dtype)(x)
        if self.batch_norm:
            x = TorchBatchNorm(epsilon=1e-3, grad=self.bn_grad)(x, train)
        return nn.relu(x)


# (channels or 'M', dropout after the block); cifar.torch's models/vgg_bn_drop.lua
VGG_LAYOUT = (
    (64, 0.3), (64, 0), "M",
    (128, 0.4), (128, 0), "M",
    (256, 0.4), (256, 0.4), (256, 0), "M",
    (512, 0.4), (512, 0.4), (512, 0), "M",
    (512, 0.4), (512, 0.4), (512, 0), "M",
)


class CifarNet(nn.Module):
    """Options shared by both networks: the seed's ablations and a width multiplier for fast tests."""

    num_classes: int = 10
    width: float = 1.0
    batch_norm: bool = True
    dropout: bool = True
    # How the step is computed: each alternative gives the same function, only speed differs. The defaults are
    # the portable ones; the Trainer builds with its backend's (backends.step_choices).
    conv_impl: str = "xla"
    dtype: Any = jnp.float32
    pool_grad: str = "first_max"
    bn_grad: str = "closed_form"
    dropout_bits: int = 16


class VGGBNDrop(CifarNet):

    @nn.compact
    def __call__(self, x, train: bool = False):
        drop = ((lambda r: functools.partial(Dropout(r, self.dropout_bits), train=train)) if self.dropout
                else (lambda r: lambda y: y))
        for layer in VGG_LAYOUT:
            if layer == "M":
                x = max_pool(x, 2, 2, self.pool_grad)
                continue
            channels, rate = layer
            c = scaled(channels, self.width)
            x = ConvBNReLU(c, 3, 1, math.sqrt(2.0 / (9 * c)), self.batch_norm, self.conv_impl, self.dtype,
                           self.bn_grad)(x, train)
            if rate:
                x = drop(rate)(x)
        x = x.reshape(x.shape[0], -1)
        hidden = scaled(512, self.width)
        x = drop(0.5)(x)
        x = self._linear(hidden, x)
        if self.batch_norm:
            x = TorchBatchNorm(epsilon=1e-5, grad=self.bn_grad)(x, train)
        x = nn.relu(x)
        x = drop(0.5)(x)
        return self._linear(self.num_classes, x).astype(jnp.float32)

    def _linear(self, features: int, x):
        init = torch_linear_init(x.shape[-1])
        return nn.Dense(features, dtype=self.dtype, kernel_init=init, bias_init=init)(x)


# (out channels, kernel, padding) per block, pools between; cifar.torch's models/nin.lua
NIN_LAYOUT = (
    (192, 5, 2), (160, 1, 0), (96, 1, 0), "max",
    (192, 5, 2), (192, 1, 0), (192, 1, 0), "avg",
    (192, 3, 1), (192, 1, 0), (None, 1, 0),
)


class NIN(CifarNet):

    @nn.compact
    def __call__(self, x, train: bool = False):
        for layer in NIN_LAYOUT:
            if layer in ("max", "avg"):
                x = max_pool(x, 3, 2, self.pool_grad) if layer == "max" else avg_pool_ceil(x, 3, 2)
                if self.dropout:
                    x = Dropout(0.5, self.dropout_bits)(x, train)
                continue
            channels, k, pad = layer
            c = self.num_classes if channels is None else scaled(channels, self.width)
            x = ConvBNReLU(c, k, pad, 0.05, self.batch_norm, self.conv_impl, self.dtype, self.bn_grad)(x, train)
        x = avg_pool_ceil(x, 8, 1)
        return x.reshape(x.shape[0], -1).astype(jnp.float32)


def create_model(name: str, **kwargs) -> nn.Module:
    if name == "vgg_bn_drop":
        return VGGBNDrop(**kwargs)
    if name == "nin":
        return NIN(**kwargs)
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")


def count_params(params) -> int:
    return int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(params)))


def init_variables(model: nn.Module, key, image_shape) -> dict:
    """{params, batch_stats} of `model` before training, for images of `image_shape` (H, W, C): the one place a
    network is initialised (a run's state, a restore template and the layer order all trace this)."""
    variables = model.init({"params": key}, jnp.zeros((1, *image_shape), jnp.float32), train=False)
    return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def batch_norm_epsilons(model: nn.Module, image_shape) -> dict[str, float]:
    """'ConvBNReLU_0/TorchBatchNorm_0' -> that layer's epsilon, read from the network itself (traced, nothing
    computed): the convolutions' BatchNorm and the classifier's differ (1e-3 and 1e-5 in the original)."""
    found = {}

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, TorchBatchNorm) and context.method_name == "__call__":
            found["/".join(context.module.path)] = context.module.epsilon
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(lambda key: init_variables(model, key, image_shape), jax.random.key(0))
    return found
