"""The torch7 layers cifar.torch's networks are built of, in Flax linen, and the kernels behind them: convolutions
(XLA's, or as matmuls where XLA:CPU is slow), torch's BatchNormalization (THNN's arithmetic, closed-form backward),
Dropout (16- or 32-bit draws), ceil-mode max and average pooling (a first-max backward on phase-split views).
Each takes a concrete choice of kernel; "auto" is resolved by backends.step_choices alone.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

CONV_IMPLS = ("xla", "matmul", "small")  # "small": matmuls on maps of <= AUTO_MATMUL_MAX_PIXELS and 1x1 kernels
POOL_GRADS = ("first_max", "xla")
BN_GRADS = ("closed_form", "autodiff")
DROPOUT_BITS = (16, 32)
# XLA:CPU's convolution is ~40x slower than the same work as a matmul on 2x2 maps; from 4x4 up
# its (Eigen) convolution wins.
AUTO_MATMUL_MAX_PIXELS = 4
WEIGHT_GRADIENT_CHUNKS = 16


def torch_linear_init(fan_in: int) -> Callable:
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


@jax.custom_vjp
def pointwise_conv(x, kernel):
    """A 1x1 convolution (NHWC, kernel (in, out)) as a matmul."""
    return x @ kernel


def _pointwise_conv_fwd(x, kernel):
    return x @ kernel, (x, kernel)


def _pointwise_conv_bwd(residuals, dy):
    # The weight gradient contracts over every pixel of the batch. As one matmul (or XLA's
    # convolution) XLA:CPU first transposes the activations, which costs more than the
    # arithmetic; as a batch of 16 partial matmuls, summed, it runs 2-3x faster.
    x, kernel = residuals
    cin, cout = kernel.shape
    rows = x.size // cin
    chunks = math.gcd(rows, WEIGHT_GRADIENT_CHUNKS)
    partial = lax.dot_general(x.reshape(chunks, rows // chunks, cin), dy.reshape(chunks, rows // chunks, cout),
                              (((1,), (1,)), ((0,), (0,))), preferred_element_type=jnp.float32)
    return dy @ kernel.T, partial.sum(0).astype(kernel.dtype)


pointwise_conv.defvjp(_pointwise_conv_fwd, _pointwise_conv_bwd)


def conv_as_matmul(x, kernel, padding: int):
    """Stride-1 'same'-style convolution as one im2col matmul (NHWC, HWIO)."""
    kh, kw, cin, cout = kernel.shape
    if kh == kw == 1 and padding == 0:
        return pointwise_conv(x, kernel[0, 0])
    n, h, w, _ = x.shape
    xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    oh, ow = h + 2 * padding - kh + 1, w + 2 * padding - kw + 1
    patches = jnp.concatenate([xp[:, i : i + oh, j : j + ow, :] for i in range(kh) for j in range(kw)], axis=-1)
    out = patches.reshape(n * oh * ow, kh * kw * cin) @ kernel.reshape(kh * kw * cin, cout)
    return out.reshape(n, oh, ow, cout)


def checked_choice(field: str, value, allowed: tuple):
    """`value`, checked: the models take concrete choices; "auto" is resolved by backends.step_choices alone."""
    if value not in allowed:
        raise ValueError(f"{field}={value!r}; choose one of {', '.join(map(str, allowed))} (backends.step_choices "
                         "resolves a config's \"auto\" for a backend)")
    return value


def use_matmul_conv(impl: str, spatial_pixels: int, kernel_size: int) -> bool:
    impl = checked_choice("conv_impl", impl, CONV_IMPLS)
    if impl == "matmul":
        return True
    if impl == "xla":
        return False
    return spatial_pixels <= AUTO_MATMUL_MAX_PIXELS or kernel_size == 1


class Conv(nn.Module):
    """torch `SpatialConvolution(in, out, k, k, 1, 1, pad, pad)` with bias."""

    features: int
    kernel_size: int
    padding: int
    kernel_std: float
    impl: str = "xla"  # one of CONV_IMPLS
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        k = self.kernel_size
        kernel = self.param("kernel", nn.initializers.normal(self.kernel_std), (k, k, x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        if use_matmul_conv(self.impl, x.shape[1] * x.shape[2], k):
            y = conv_as_matmul(x, kernel, self.padding)
        else:
            pad = [(self.padding, self.padding)] * 2
            y = lax.conv_general_dilated(x, kernel, (1, 1), pad, dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + bias.astype(self.dtype)


def _normalize(x, mean, var, scale, bias, epsilon: float):
    return (x - mean) * (scale * lax.rsqrt(var + epsilon)) + bias


def batch_normalize_autodiff(x, scale, bias, epsilon: float):
    """Training-mode batch normalization over all axes but the last: (y, batch mean, biased variance)."""
    axes = tuple(range(x.ndim - 1))
    mean = x.mean(axes)
    var = jnp.square(x - mean).mean(axes)
    return _normalize(x, mean, var, scale, bias, epsilon), mean, var


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_normalize(x, scale, bias, epsilon: float):
    """`batch_normalize_autodiff` with its gradient in closed form."""
    return batch_normalize_autodiff(x, scale, bias, epsilon)


def _batch_normalize_fwd(x, scale, bias, epsilon):
    y, mean, var = batch_normalize(x, scale, bias, epsilon)
    return (y, mean, var), (x, scale, mean, var)


def _batch_normalize_bwd(epsilon, residuals, cotangents):
    # The closed form (two reductions in one pass, then one elementwise pass) moves less memory
    # than autodiff's chain through mean and variance: 3-6 % of a CPU train step, measured. The
    # statistics only feed the running averages, which carry no gradient.
    x, scale, mean, var = residuals
    dy = cotangents[0]
    axes = tuple(range(x.ndim - 1))
    n = x.size // x.shape[-1]
    rstd = lax.rsqrt(var + epsilon)
    xhat = (x - mean) * rstd
    dbias, dscale = dy.sum(axes), (dy * xhat).sum(axes)
    dx = (scale * rstd) * (dy - dbias / n - xhat * (dscale / n))
    return dx, dscale, dbias


batch_normalize.defvjp(_batch_normalize_fwd, _batch_normalize_bwd)


class TorchBatchNorm(nn.Module):
    """torch7 (Spatial)BatchNormalization over all axes but the last."""

    epsilon: float = 1e-5
    momentum: float = 0.1  # torch's: running = (1 - m) * running + m * batch
    grad: str = "closed_form"  # one of BN_GRADS

    @nn.compact
    def __call__(self, x, train: bool):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.uniform(1.0), (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32)
        running_var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32)
        x32 = x.astype(jnp.float32)
        if not train:
            return _normalize(x32, running_mean.value, running_var.value, scale, bias, self.epsilon).astype(x.dtype)
        closed_form = checked_choice("bn_grad", self.grad, BN_GRADS) == "closed_form"
        normalize = batch_normalize if closed_form else batch_normalize_autodiff
        y, mean, var = normalize(x32, scale, bias, self.epsilon)
        if not self.is_initializing():
            n = x.size // c
            m = self.momentum
            running_mean.value = (1 - m) * running_mean.value + m * mean
            running_var.value = (1 - m) * running_var.value + m * var * (n / max(n - 1, 1))
        return y.astype(x.dtype)


class Dropout(nn.Module):
    """Inverted dropout (torch's nn.Dropout v2: kept units scaled by 1 / (1 - rate) in training).

    With `bits=16`, two draws per 32-bit threefry word halve the random-number work, the largest
    cost of dropout on CPU; the rate is then exact to 1/65536 (with 32, to 2^-32).
    """

    rate: float
    bits: int = 16  # one of DROPOUT_BITS

    @nn.compact
    def __call__(self, x, train: bool):
        if not train or self.rate == 0:
            return x
        key = self.make_rng("dropout")
        if checked_choice("dropout_bits", self.bits, DROPOUT_BITS) == 32:
            keep = jax.random.bits(key, x.shape, jnp.uint32) >= jnp.uint32(round(self.rate * 2.0 ** 32))
        else:
            n = x.size
            words = jax.random.bits(key, ((n + 1) // 2,), jnp.uint32)
            draws = lax.bitcast_convert_type(words, jnp.uint16).reshape(-1)[:n].reshape(x.shape)
            keep = draws >= jnp.uint16(round(self.rate * 65536))
        return jnp.where(keep, x / (1.0 - self.rate), jnp.zeros((), x.dtype)).astype(x.dtype)


def _phase_layout(x, window: int, stride: int, fill: float):
    """x padded (torch's ceil mode) and reshaped (n, rows, stride, cols, stride, c).

    Every offset of the pooling window is then a unit-stride view of it, so neither the pooling
    nor its gradient needs XLA:CPU's slow strided (interior-padded) gathers and scatters.
    """
    n, h, w, c = x.shape
    oh, ow = [(d + _ceil_pad(d, window, stride) - window) // stride + 1 for d in (h, w)]
    rh, rw = oh + (window - 1) // stride, ow + (window - 1) // stride
    xp = lax.pad(x, jnp.asarray(fill, x.dtype), [(0, 0, 0), (0, rh * stride - h, 0), (0, rw * stride - w, 0), (0, 0, 0)])
    return xp.reshape(n, rh, stride, rw, stride, c), (oh, ow)


def _window_views(xr, window: int, stride: int, out_hw):
    """(offset, view) for each window position in torch's scan order (rows, then columns)."""
    oh, ow = out_hw
    for i in range(window):
        ai, bi = divmod(i, stride)
        for j in range(window):
            aj, bj = divmod(j, stride)
            yield (ai, bi, aj, bj), xr[:, ai:ai + oh, bi, aj:aj + ow, bj, :]


def _reduce_windows(x, window: int, stride: int, fill: float, op):
    """`op` folded over every window offset of x padded with `fill` (torch's ceil mode)."""
    xr, out_hw = _phase_layout(x, window, stride, fill)
    return functools.reduce(op, (v for _, v in _window_views(xr, window, stride, out_hw)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def max_pool_ceil(x, window: int, stride: int):
    """torch `SpatialMaxPooling(k, k, s, s):ceil()`, no padding (NHWC).

    As in torch, the gradient goes to the first maximum of each window (rows, then columns),
    not split among ties as `jnp.max`'s would be; ties are common after a ReLU, and splitting
    them cost VGG's 32x32 pooling 7x the time.
    """
    return _reduce_windows(x, window, stride, -jnp.inf, jnp.maximum)


def _max_pool_fwd(x, window, stride):
    y = max_pool_ceil(x, window, stride)
    return y, (x, y)


def _max_pool_bwd(window, stride, residuals, dy):
    x, y = residuals
    n, h, w, c = x.shape
    xr, (oh, ow) = _phase_layout(x, window, stride, -jnp.inf)
    rh, rw = xr.shape[1], xr.shape[3]
    planes, found = {}, jnp.zeros(y.shape, bool)
    for (ai, bi, aj, bj), view in _window_views(xr, window, stride, (oh, ow)):
        first = (view == y) & ~found
        found = found | first
        g = jnp.pad(jnp.where(first, dy, 0), ((0, 0), (ai, rh - oh - ai), (aj, rw - ow - aj), (0, 0)))
        planes[bi, bj] = planes[bi, bj] + g if (bi, bj) in planes else g
    zero = jnp.zeros((n, rh, rw, c), dy.dtype)
    dxr = jnp.stack([jnp.stack([planes.get((bi, bj), zero) for bj in range(stride)], axis=3)
                     for bi in range(stride)], axis=2)
    dx = dxr.reshape(n, rh * stride, rw * stride, c)
    return (lax.pad(dx, jnp.zeros((), dx.dtype), [(0, 0, 0), (0, h - rh * stride, 0), (0, w - rw * stride, 0), (0, 0, 0)]),)


max_pool_ceil.defvjp(_max_pool_fwd, _max_pool_bwd)


def max_pool_ceil_xla(x, window: int, stride: int):
    """`max_pool_ceil` as one `lax.reduce_window`, differentiated by JAX (select-and-scatter).

    The initial value is a NumPy constant: JAX recognizes a max-reduction, and can differentiate it, only then.
    """
    pads = [(0, 0), *[(0, _ceil_pad(d, window, stride)) for d in x.shape[1:3]], (0, 0)]
    return lax.reduce_window(x, np.array(-np.inf, x.dtype), lax.max, (1, window, window, 1),
                             (1, stride, stride, 1), pads)


def max_pool(x, window: int, stride: int, grad: str = "first_max"):
    """torch's ceil-mode max pooling, its gradient as `grad` (one of POOL_GRADS) chooses."""
    pool = max_pool_ceil if checked_choice("pool_grad", grad, POOL_GRADS) == "first_max" else max_pool_ceil_xla
    return pool(x, window, stride)


def avg_pool_ceil(x, window: int, stride: int):
    """torch `SpatialAveragePooling(k, k, s, s):ceil()`: windows past the edge average their in-image part."""
    total = _reduce_windows(x, window, stride, 0.0, jnp.add)
    count = _reduce_windows(jnp.ones((1, *x.shape[1:3], 1), x.dtype), window, stride, 0.0, jnp.add)
    return total / count


def _ceil_pad(size: int, window: int, stride: int) -> int:
    out = -(-(size - window) // stride) + 1
    if (out - 1) * stride >= size:  # torch: the last window must start inside the image
        out -= 1
    return max((out - 1) * stride + window - size, 0)
