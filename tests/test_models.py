import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxcifar.nn import backends, layers, models


def init(model, batch=2, train=False):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(batch, 32, 32, 3)).astype(np.float32))
    # One compiled program: applied op by op, every layer's ops compile apart (13.7 s for this file's inits).
    variables = jax.jit(model.init, static_argnames="train")({"params": jax.random.key(0),
                                                              "dropout": jax.random.key(1)}, x, train=train)
    return variables, x


def compiled_apply(model, train: bool):
    """model.apply as one compiled program of (variables, x, dropout seed); in training mode it returns the logits."""
    def apply(variables, x, seed):
        if not train:
            return model.apply(variables, x, train=False)
        return model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(seed)}, mutable=["batch_stats"])[0]

    return jax.jit(apply)


def conv_params(cin, cout, k):
    return cin * cout * k * k + cout


def shapes(model, batch=2):
    """`init`'s variables and input as shapes alone (nothing computed): enough to count parameters."""
    x = jax.ShapeDtypeStruct((batch, 32, 32, 3), jnp.float32)
    return jax.eval_shape(lambda x: model.init({"params": jax.random.key(0)}, x, train=False), x), x


def test_vgg_parameter_count_and_output():
    variables, x = shapes(models.VGGBNDrop())
    channels = [3, 64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    convs = sum(conv_params(a, b, 3) for a, b in zip(channels[:-1], channels[1:]))
    bn = 2 * sum(channels[1:]) + 2 * 512
    linear = (512 * 512 + 512) + (512 * 10 + 10)
    assert models.count_params(variables["params"]) == convs + bn + linear == 14_991_946
    assert convs + linear == 14_982_474  # the 14.98 M weights of the convolutions and linear layers
    out = jax.eval_shape(lambda v, x: models.VGGBNDrop().apply(v, x, train=False), variables, x)
    assert out.shape == (2, 10) and out.dtype == jnp.float32


def test_nin_parameter_count_and_output():
    variables, x = shapes(models.NIN())
    layers = [(3, 192, 5), (192, 160, 1), (160, 96, 1), (96, 192, 5), (192, 192, 1), (192, 192, 1),
              (192, 192, 3), (192, 192, 1), (192, 10, 1)]
    expected = sum(conv_params(a, b, k) + 2 * b for a, b, k in layers)
    assert models.count_params(variables["params"]) == expected
    assert jax.eval_shape(lambda v, x: models.NIN().apply(v, x, train=False), variables, x).shape == (2, 10)


def test_ablations_and_width():
    no_bn, _ = shapes(models.VGGBNDrop(batch_norm=False, width=0.25))
    assert "batch_stats" not in no_bn or not jax.tree_util.tree_leaves(no_bn["batch_stats"])
    narrow, _ = shapes(models.VGGBNDrop(width=0.25))
    assert models.count_params(narrow["params"]) < 14_991_946 / 10
    variables, x = init(models.VGGBNDrop(dropout=False, width=0.25))
    train = compiled_apply(models.VGGBNDrop(dropout=False, width=0.25), train=True)
    np.testing.assert_array_equal(train(variables, x, 1), train(variables, x, 2))  # without dropout, deterministic


def test_init_follows_torch7():
    variables, _ = init(models.VGGBNDrop())
    p = variables["params"]
    k = np.asarray(p["ConvBNReLU_1"]["Conv_0"]["kernel"])  # 64 -> 64
    assert abs(k.std() / np.sqrt(2 / (9 * 64)) - 1) < 0.03
    assert np.all(np.asarray(p["ConvBNReLU_1"]["Conv_0"]["bias"]) == 0)
    scale = np.asarray(p["ConvBNReLU_1"]["TorchBatchNorm_0"]["scale"])
    assert scale.min() >= 0 and scale.max() <= 1 and 0.35 < scale.mean() < 0.65  # U(0, 1)
    w = np.asarray(p["Dense_0"]["kernel"])
    assert np.abs(w).max() <= 1 / np.sqrt(512) and np.abs(np.asarray(p["Dense_0"]["bias"])).max() > 0
    nin, _ = init(models.NIN())
    assert abs(np.asarray(nin["params"]["ConvBNReLU_1"]["Conv_0"]["kernel"]).std() - 0.05) < 0.002


def test_batchnorm_train_uses_batch_stats_and_updates_running_averages():
    bn = layers.TorchBatchNorm(epsilon=1e-5)
    x = jnp.asarray(np.random.default_rng(0).normal(3.0, 2.0, size=(64, 4, 4, 8)).astype(np.float32))
    v = bn.init(jax.random.key(0), x, train=False)
    v = {"params": {"scale": jnp.ones(8), "bias": jnp.zeros(8)}, "batch_stats": v["batch_stats"]}
    y, upd = bn.apply(v, x, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(np.asarray(y).reshape(-1, 8).mean(0), 0, atol=1e-4)
    flat = np.asarray(x, np.float64).reshape(-1, 8)
    np.testing.assert_allclose(upd["batch_stats"]["mean"], 0.1 * flat.mean(0), rtol=1e-4)
    np.testing.assert_allclose(upd["batch_stats"]["var"], 0.9 + 0.1 * flat.var(0, ddof=1), rtol=1e-4)  # unbiased
    # evaluation normalizes with the running statistics and changes nothing
    y_eval = bn.apply(v, x, train=False)
    np.testing.assert_allclose(y_eval, (np.asarray(x) - 0) / np.sqrt(1 + 1e-5), rtol=1e-5)


def test_dropout_only_in_training():
    model = models.VGGBNDrop(width=0.125)
    variables, x = init(model, batch=4)
    evaluate, train = compiled_apply(model, train=False), compiled_apply(model, train=True)
    np.testing.assert_array_equal(evaluate(variables, x, 1), evaluate(variables, x, 2))
    assert not np.allclose(train(variables, x, 1), train(variables, x, 2))


@pytest.mark.parametrize("hw,cin,cout,k,pad", [(2, 8, 16, 3, 1), (4, 5, 7, 3, 1), (8, 3, 4, 5, 2), (32, 3, 8, 3, 1)])
def test_matmul_conv_matches_lax(hw, cin, cout, k, pad):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(3, hw, hw, cin)).astype(np.float32))
    w = jnp.asarray(rng.normal(size=(k, k, cin, cout)).astype(np.float32))
    ref = lax.conv_general_dilated(x, w, (1, 1), [(pad, pad)] * 2, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(layers.conv_as_matmul(x, w, pad), ref, rtol=1e-4, atol=1e-4)
    gx = jax.grad(lambda x: (layers.conv_as_matmul(x, w, pad) ** 2).sum())(x)
    gx_ref = jax.grad(lambda x: (lax.conv_general_dilated(x, w, (1, 1), [(pad, pad)] * 2,
                                                          dimension_numbers=("NHWC", "HWIO", "NHWC")) ** 2).sum())(x)
    np.testing.assert_allclose(gx, gx_ref, rtol=1e-3, atol=1e-3)


def test_model_is_the_same_function_with_either_conv():
    a = models.VGGBNDrop(width=0.125, conv_impl="xla")
    b = models.VGGBNDrop(width=0.125, conv_impl="matmul")
    variables, x = init(a)
    np.testing.assert_allclose(compiled_apply(a, False)(variables, x, 0), compiled_apply(b, False)(variables, x, 0),
                               rtol=1e-4, atol=1e-4)


def torch_ceil_out(size, k, s):
    out = int(np.ceil((size - k) / s)) + 1
    if (out - 1) * s >= size:
        out -= 1
    return out


@pytest.mark.parametrize("size,k,s", [(32, 3, 2), (16, 3, 2), (8, 8, 1), (2, 2, 2), (5, 2, 2), (7, 3, 2)])
def test_ceil_pooling_sizes(size, k, s):
    x = jnp.ones((1, size, size, 2))
    assert layers.max_pool_ceil(x, k, s).shape[1] == torch_ceil_out(size, k, s)
    assert layers.avg_pool_ceil(x, k, s).shape[1] == torch_ceil_out(size, k, s)


def test_avg_pool_ceil_averages_only_the_part_inside():
    x = jnp.arange(16.0).reshape(1, 4, 4, 1) + 1
    got = np.asarray(layers.avg_pool_ceil(x, 3, 2))[0, :, :, 0]  # windows start at 0 and 2
    img = np.asarray(x)[0, :, :, 0]
    want = np.array([[img[r:r + 3, c:c + 3].mean() for c in (0, 2)] for r in (0, 2)])
    np.testing.assert_allclose(got, want)
    got_max = np.asarray(layers.max_pool_ceil(x, 3, 2))[0, :, :, 0]
    np.testing.assert_allclose(got_max, [[img[r:r + 3, c:c + 3].max() for c in (0, 2)] for r in (0, 2)])


@pytest.mark.parametrize("field,value", [("conv_impl", "auto"), ("pool_grad", "auto"), ("bn_grad", "auto"),
                                         ("dropout_bits", 0)])
def test_a_model_takes_concrete_step_choices_only(field, value):
    model = models.VGGBNDrop(width=1 / 16, **{field: value})  # "auto" is backends.step_choices' to resolve
    with pytest.raises(ValueError, match=rf"{field}={value!r}; choose one of .*backends.step_choices"):
        model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, jnp.zeros((2, 32, 32, 3)), train=True)


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown model 'resnet'"):
        models.create_model("resnet")


@pytest.mark.parametrize("bits", [16, 32])
def test_dropout_rate_and_scaling(bits):
    x = jnp.ones((64, 32, 32, 8))
    for rate in (0.3, 0.5):
        y = layers.Dropout(rate, bits).apply({}, x, train=True, rngs={"dropout": jax.random.key(0)})
        kept = np.asarray(y) != 0
        assert abs(kept.mean() - (1 - rate)) < 0.005
        np.testing.assert_allclose(np.asarray(y)[kept], 1 / (1 - rate), rtol=1e-6)
    np.testing.assert_array_equal(layers.Dropout(0.5).apply({}, x, train=False), x)


def test_cpu_convolutions_are_compiled_by_xla_not_ynnpack():
    opts = backends.compiler_options()
    assert opts == {"xla_cpu_experimental_ynn_fusion_type": backends.CPU_LIBRARY_FUSIONS}
    assert backends.compiler_options("gpu") is None
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 16, 16, 32)).astype(np.float32))  # big enough for YNNPACK to want it
    w = jnp.asarray(rng.normal(size=(3, 3, 32, 32)).astype(np.float32))

    def conv(x, w):
        return lax.conv_general_dilated(x, w, (1, 1), [(1, 1)] * 2, dimension_numbers=("NHWC", "HWIO", "NHWC"))

    default, ours = jax.jit(conv).lower(x, w).compile(), jax.jit(conv, compiler_options=opts).lower(x, w).compile()
    if "__ynn_fusion" not in default.as_text():
        pytest.skip("this jaxlib does not hand convolutions to YNNPACK")
    assert "__ynn_fusion" not in ours.as_text()
    np.testing.assert_allclose(ours(x, w), default(x, w), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("size,k,s", [(32, 3, 2), (16, 2, 2), (5, 2, 2), (7, 3, 2), (8, 8, 1), (9, 2, 3)])
def test_pooling_matches_reduce_window_and_sends_gradient_to_the_first_maximum(size, k, s):
    rng = np.random.default_rng(0)
    x = jnp.asarray(np.maximum(rng.normal(size=(2, size, size, 3)), 0).astype(np.float32))  # ReLU'd: ties at 0
    out = torch_ceil_out(size, k, s)
    pad = [(0, 0), (0, max((out - 1) * s + k - size, 0)), (0, max((out - 1) * s + k - size, 0)), (0, 0)]
    ref_max = lax.reduce_window(x, -jnp.inf, lax.max, (1, k, k, 1), (1, s, s, 1), pad)
    max_pool = jax.jit(lambda x: layers.max_pool_ceil(x, k, s))  # op by op, an 8 x 8 window compiles 64 times
    np.testing.assert_array_equal(max_pool(x), ref_max)
    ref_sum = lax.reduce_window(x, 0.0, lax.add, (1, k, k, 1), (1, s, s, 1), pad)
    ref_count = lax.reduce_window(jnp.ones_like(x), 0.0, lax.add, (1, k, k, 1), (1, s, s, 1), pad)
    np.testing.assert_allclose(layers.avg_pool_ceil(x, k, s), ref_sum / ref_count, rtol=1e-6)
    # torch's backward: each window's gradient goes whole to its first maximum in row-major order
    dy = rng.normal(size=ref_max.shape).astype(np.float32)
    want = np.zeros(x.shape, np.float32)
    xn = np.asarray(x)
    for n in range(2):
        for c in range(3):
            for oy in range(out):
                for ox in range(out):
                    win = xn[n, oy * s:oy * s + k, ox * s:ox * s + k, c]
                    iy, ix = np.unravel_index(np.argmax(win), win.shape)  # argmax: first maximum
                    want[n, oy * s + iy, ox * s + ix, c] += dy[n, oy, ox, c]
    got = jax.jit(lambda x, dy: jax.vjp(max_pool, x)[1](dy)[0])(x, jnp.asarray(dy))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    # The alternative (pool_grad="xla"): one reduce_window, differentiated by JAX. The same values, and
    # XLA's select-and-scatter also keeps the first maximum of each window, ties included.
    np.testing.assert_array_equal(layers.max_pool_ceil_xla(x, k, s), ref_max)
    got_xla = jax.vjp(lambda x: layers.max_pool_ceil_xla(x, k, s), x)[1](jnp.asarray(dy))[0]
    np.testing.assert_allclose(got_xla, want, rtol=1e-6, atol=1e-6)
    # the average pool's gradient is the reduce_window sum's, divided by the counts
    g_avg = jax.grad(lambda x: (layers.avg_pool_ceil(x, k, s) * dy).sum())(x)
    g_ref = jax.grad(lambda x: (lax.reduce_window(x, 0.0, lax.add, (1, k, k, 1), (1, s, s, 1), pad)
                                / ref_count * dy).sum())(x)
    np.testing.assert_allclose(g_avg, g_ref, rtol=1e-5, atol=1e-6)


def test_batchnorm_gradient_matches_autodiff_of_its_formula():
    rng = np.random.default_rng(0)
    for shape in [(16, 4, 4, 6), (32, 5)]:
        x = jnp.asarray(rng.normal(1.0, 2.0, size=shape).astype(np.float32))
        scale, bias = jnp.asarray(rng.uniform(size=shape[-1]), jnp.float32), jnp.full(shape[-1], 0.3, jnp.float32)
        dy = jnp.asarray(rng.normal(size=shape).astype(np.float32))

        def plain(x, scale, bias):
            axes = tuple(range(x.ndim - 1))
            mean = x.mean(axes)
            return (x - mean) * (scale * lax.rsqrt(jnp.square(x - mean).mean(axes) + 1e-3)) + bias

        want = jax.vjp(plain, x, scale, bias)[1](dy)
        got = jax.vjp(lambda *a: layers.batch_normalize(*a, 1e-3)[0], x, scale, bias)[1](dy)
        alternative = jax.vjp(lambda *a: layers.batch_normalize_autodiff(*a, 1e-3)[0], x, scale, bias)[1](dy)
        for g, a, w in zip(got, alternative, want):
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(a, w, rtol=1e-5, atol=1e-6)  # bn_grad="autodiff" is the formula's own


@pytest.mark.parametrize("name", ["vgg_bn_drop", "nin"])
def test_every_step_choice_computes_the_same_function(name):
    """The models are differentiable in training mode, and each backend's choices (backends.STEP_CHOICES) give the
    training loss and gradient of the default build."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 32, 32, 3)).astype(np.float32))
    y = jnp.arange(8) % 10
    reference = dict(conv_impl="xla", pool_grad="first_max", bn_grad="closed_form", dropout_bits=16)
    base = models.create_model(name, width=0.125, **reference)
    variables = base.init({"params": jax.random.key(0)}, x, train=False)

    def loss_and_grad(model):
        def loss(params):
            logits, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, train=True,
                                    rngs={"dropout": jax.random.key(1)}, mutable=["batch_stats"])
            return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1).mean()

        value, grads = jax.jit(jax.value_and_grad(loss))(variables["params"])
        return float(value), np.concatenate([np.ravel(g) for g in jax.tree_util.tree_leaves(grads)])

    want_loss, want_grad = loss_and_grad(base)
    assert np.all(np.isfinite(want_grad)) and np.abs(want_grad).max() > 0  # differentiable in training mode
    for field, value in (("conv_impl", "small"), ("conv_impl", "matmul"), ("pool_grad", "xla"),
                         ("bn_grad", "autodiff")):
        got_loss, got_grad = loss_and_grad(models.create_model(name, width=0.125, **{**reference, field: value}))
        assert got_loss == pytest.approx(want_loss, rel=1e-5), (field, value)
        assert np.linalg.norm(got_grad - want_grad) <= 1e-4 * np.linalg.norm(want_grad), (field, value)
    # 32-bit dropout draws are other random numbers: the same function of its mask, with another mask.
    other_loss, _ = loss_and_grad(models.create_model(name, width=0.125, **{**reference, "dropout_bits": 32}))
    assert other_loss != want_loss and other_loss == pytest.approx(want_loss, rel=0.5)


@pytest.mark.parametrize("shape", [(3, 4, 4, 6), (5, 3, 3, 7)])  # 48 rows: 16 chunks; 45 rows: gcd(45, 16) = 1
def test_pointwise_conv_matches_lax_with_gradients(shape):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=shape).astype(np.float32))
    w = jnp.asarray(rng.normal(size=(1, 1, shape[-1], 5)).astype(np.float32))
    dy = jnp.asarray(rng.normal(size=shape[:3] + (5,)).astype(np.float32))

    def conv(x, w):
        return lax.conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    y, vjp = jax.vjp(lambda x, w: layers.pointwise_conv(x, w[0, 0]), x, w)
    y_ref, vjp_ref = jax.vjp(conv, x, w)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    for g, g_ref in zip(vjp(dy), vjp_ref(dy)):
        np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-5)


def test_nin_is_the_same_function_with_either_conv():
    a, b = models.NIN(width=0.125, conv_impl="xla"), models.NIN(width=0.125, conv_impl="small")
    variables, img = init(a)
    np.testing.assert_allclose(compiled_apply(a, False)(variables, img, 0), compiled_apply(b, False)(variables, img, 0),
                               rtol=1e-4, atol=1e-4)


def test_batch_norm_epsilons_are_read_from_the_network():
    # the original's: 1e-3 after every convolution, 1e-5 in VGG's classifier (vgg_bn_drop.lua, nin.lua)
    vgg = models.batch_norm_epsilons(models.VGGBNDrop(width=1 / 16), (32, 32, 3))
    assert vgg == {**{f"ConvBNReLU_{i}/TorchBatchNorm_0": 1e-3 for i in range(13)}, "TorchBatchNorm_0": 1e-5}
    nin = models.batch_norm_epsilons(models.NIN(width=1 / 16), (32, 32, 3))
    assert nin == {f"ConvBNReLU_{i}/TorchBatchNorm_0": 1e-3 for i in range(9)}
    assert models.batch_norm_epsilons(models.VGGBNDrop(width=1 / 16, batch_norm=False), (32, 32, 3)) == {}
