"""preprocess against a direct, loop-by-loop transcription of torch7's definitions."""

import numpy as np
import pytest

from jaxcifar.data import preprocess


def reference_gaussian1d(size):
    # torch/image gaussian1D defaults: sigma 0.25, amplitude 1, mean 0.5, not normalized
    center = 0.5 * size + 0.5
    return np.array([np.exp(-(((i - center) / (0.25 * size)) ** 2) / 2) for i in range(1, size + 1)])


def reference_lcn_plane(plane, size=7):
    """SpatialContrastiveNormalization(1, gaussian1D(size)) on one plane, pixel by pixel."""
    k1 = reference_gaussian1d(size)
    k1 = k1 / k1.sum()
    k2 = np.outer(k1, k1)
    h, w = plane.shape
    r = size // 2

    def local(img):
        out = np.zeros((h, w))
        for y in range(h):
            for x in range(w):
                s = 0.0
                for dy in range(-r, r + 1):
                    for dx in range(-r, r + 1):
                        yy, xx = y + dy, x + dx
                        if 0 <= yy < h and 0 <= xx < w:
                            s += k2[dy + r, dx + r] * img[yy, xx]
                out[y, x] = s
        return out

    coef = local(np.ones((h, w)))
    centered = plane - local(plane) / coef
    std = np.sqrt(local(centered**2)) / coef
    std[std <= 1e-4] = 1e-4
    return centered / std


def test_gaussian_matches_torch_formula():
    np.testing.assert_allclose(preprocess.gaussian1d(7), reference_gaussian1d(7), rtol=1e-12)
    assert preprocess.gaussian1d(7).argmax() == 3 and preprocess.gaussian1d(7).max() == 1.0


def test_rgb2yuv_coefficients():
    rng = np.random.default_rng(0)
    img = rng.uniform(0, 255, (2, 4, 4, 3))
    yuv = preprocess.rgb2yuv(img)
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    np.testing.assert_allclose(yuv[..., 0], 0.299 * r + 0.587 * g + 0.114 * b)
    np.testing.assert_allclose(yuv[..., 1], -0.14713 * r - 0.28886 * g + 0.436 * b)
    np.testing.assert_allclose(yuv[..., 2], 0.615 * r - 0.51499 * g - 0.10001 * b)


def test_contrast_normalize_matches_pixel_loop_reference():
    rng = np.random.default_rng(1)
    planes = rng.uniform(0, 255, (3, 12, 12))
    planes[2, :6] = 17.0  # a flat region exercises the divisive threshold
    got = preprocess.contrast_normalize(planes)
    for i in range(3):
        np.testing.assert_allclose(got[i], reference_lcn_plane(planes[i]), atol=1e-8)


def test_constant_image_normalizes_to_zero():
    out = preprocess.contrast_normalize(np.full((2, 32, 32), 123.0))
    assert np.abs(out).max() < 1e-4


def test_normalize_standardizes_uv_with_train_stats():
    rng = np.random.default_rng(2)
    train = rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    test = rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    tr, te, stats = preprocess.normalize(train, test)
    assert tr.dtype == np.float32 and tr.shape == train.shape and te.shape == test.shape
    for c in (1, 2):
        assert abs(tr[..., c].astype(np.float64).mean()) < 1e-5
        assert abs(tr[..., c].astype(np.float64).std(ddof=1) - 1) < 1e-5
    # the test set uses the training statistics, not its own
    raw_u = preprocess.rgb2yuv(test)[..., 1]
    np.testing.assert_allclose(te[..., 1], (raw_u - stats.mean[0]) / stats.std[0], rtol=1e-5, atol=1e-5)
    assert abs(te[..., 1].mean()) > 1e-3
    # Y of the test set is its own local normalization
    np.testing.assert_allclose(te[..., 0], preprocess.contrast_normalize(preprocess.rgb2yuv(test)[..., 0]), atol=1e-5)


def test_apply_stats_reproduces_normalize_for_new_images():
    rng = np.random.default_rng(3)
    train = rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
    tr, te, stats = preprocess.normalize(train, train[:5])
    np.testing.assert_allclose(preprocess.apply_stats(train[:5], stats), tr[:5], atol=1e-5)
    restored = preprocess.NormalizationStats.from_json(stats.to_json())
    assert restored == stats


def test_rgb_option_standardizes_each_channel():
    rng = np.random.default_rng(4)
    train = rng.integers(0, 256, (30, 32, 32, 3), dtype=np.uint8)
    tr, _, stats = preprocess.normalize_rgb(train, train[:3])
    assert stats.method == "rgb"
    np.testing.assert_allclose(tr.reshape(-1, 3).astype(np.float64).mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(tr.reshape(-1, 3).astype(np.float64).std(0, ddof=1), 1, atol=1e-5)


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="uint8"):
        preprocess.normalize(np.zeros((2, 32, 32, 3), np.float32), np.zeros((2, 32, 32, 3), np.uint8))


def test_preprocessing_on_several_threads_gives_the_serial_bits(monkeypatch):
    # Chunks of images run on the cores (jaxcifar.data.parallel); the cache must hold the same bits as one thread wrote.
    rng = np.random.default_rng(3)
    train = rng.integers(0, 256, (2500, 32, 32, 3), dtype=np.uint8)  # 3 chunks, the last one short
    test = rng.integers(0, 256, (1100, 32, 32, 3), dtype=np.uint8)
    monkeypatch.setenv("JAXCIFAR_THREADS", "1")
    serial = preprocess.normalize(train, test)
    monkeypatch.setenv("JAXCIFAR_THREADS", "5")
    threaded = preprocess.normalize(train, test)
    for a, b in zip(serial[:2], threaded[:2]):
        assert a.dtype == b.dtype == np.float32 and np.array_equal(a, b)
    assert serial[2] == threaded[2]
