"""FLOPs of the networks, counted analytically from their shapes, and this device's measured matmul peak: what the
benchmark's achieved GFLOP/s and fraction of peak are computed from."""

from __future__ import annotations

import functools

from jaxcifar.tools.timing import timed


def forward_flops(model, image_shape=(32, 32, 3)) -> int:
    """Multiply-adds x 2 of every convolution and dense layer for one image (analytic, from shapes)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from jaxcifar.nn import layers

    total = []

    def count(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        mod = context.module
        if context.method_name == "__call__" and isinstance(mod, (layers.Conv, nn.Dense)):
            x = args[0]
            cin = x.shape[-1]
            if isinstance(mod, layers.Conv):
                total.append(2 * out.shape[1] * out.shape[2] * mod.kernel_size ** 2 * cin * out.shape[-1])
            else:
                total.append(2 * cin * out.shape[-1])
        return out

    x = jnp.zeros((1, *image_shape), jnp.float32)
    with nn.intercept_methods(count):
        jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
    return int(sum(total))


def train_flops(model) -> int:
    """Forward + backward (input and weight gradients): 3x the forward FLOPs."""
    return 3 * forward_flops(model)


def matmul_peak_gflops(dtype: str = "float32", size: int | None = None, runs: int = 5) -> float:
    import jax
    import jax.numpy as jnp

    size = size or (2048 if jax.default_backend() == "cpu" else 8192)
    a = jnp.ones((size, size), dtype)
    f = jax.jit(lambda a: a @ a)
    _, t = timed(lambda: f(a).block_until_ready(), runs)
    return 2 * size ** 3 / t / 1e9
