"""cifar.torch's `provider.lua` preprocessing, reproduced with torch7's arithmetic.

Pixels are 0-255 floats (provider.lua never rescales), converted RGB -> YUV with
torch/image's `rgb2yuv`; the Y plane of every image goes through
`nn.SpatialContrastiveNormalization(1, image.gaussian1D(7))`; U and V are
standardized with the training set's mean and unbiased std, reused for the test set.

All maths runs in float64 (torch accumulated its means and stds in double) and the
results are returned as float32, channels last: (N, 32, 32, 3) in Y, U, V order.
Nothing here touches files or tfds.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from jaxcifar.data import parallel

# Bump when any function below changes its output: it keys the preprocessed cache.
PREPROCESS_VERSION = 1

# torch/image rgb2yuv coefficients (rows: Y, U, V; columns: R, G, B).
_RGB_TO_YUV = np.array(
    [
        [0.299, 0.587, 0.114],
        [-0.14713, -0.28886, 0.436],
        [0.615, -0.51499, -0.10001],
    ],
    dtype=np.float64,
)

# nn.SpatialDivisiveNormalization's nn.Threshold(threshold, thresval); the
# contrastive module forwards a misspelt `threshval`, so both stay at 1e-4.
_STD_THRESHOLD = 1e-4
_STD_REPLACEMENT = 1e-4

_CHUNK = 1024  # images per chunk, one thread's piece of work: bounds float64 temporaries, balances the cores


class NormalizationStats(NamedTuple):
    """What the test set and new images need from the training set."""

    method: str
    mean: tuple[float, ...]  # yuv: (mean_u, mean_v); rgb: per channel
    std: tuple[float, ...]

    def to_json(self) -> dict:
        return {"method": self.method, "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_json(cls, d: dict) -> "NormalizationStats":
        return cls(d["method"], tuple(float(v) for v in d["mean"]), tuple(float(v) for v in d["std"]))


def gaussian1d(size: int = 7, sigma: float = 0.25, amplitude: float = 1.0, mean: float = 0.5) -> np.ndarray:
    """torch/image `gaussian1D` (unnormalized, peak `amplitude`)."""
    center = mean * size + 0.5
    i = np.arange(1, size + 1, dtype=np.float64)
    return amplitude * np.exp(-(((i - center) / (sigma * size)) ** 2) / 2)


def rgb2yuv(images: np.ndarray) -> np.ndarray:
    """RGB -> YUV as torch/image, channels last; float64 for any input dtype."""
    images = np.asarray(images, dtype=np.float64)
    if images.shape[-1] != 3:
        raise ValueError(f"rgb2yuv expects channels last with 3 channels, got shape {images.shape}")
    return images @ _RGB_TO_YUV.T


def _separable_mean(planes: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """torch's mean estimator: zero-pad by k//2, 1D kernel along width, then along height."""
    k = kernel.shape[0]
    pad = k // 2
    h, w = planes.shape[-2:]
    padded = np.pad(planes, [(0, 0)] * (planes.ndim - 2) + [(pad, pad), (pad, pad)])
    rows = sum(kernel[i] * padded[..., :, i : i + w] for i in range(k))
    return sum(kernel[i] * rows[..., i : i + h, :] for i in range(k))


def contrast_normalize(y: np.ndarray, kernel: np.ndarray | None = None) -> np.ndarray:
    """`nn.SpatialContrastiveNormalization(1, kernel)` on each (H, W) plane of `y` (N, H, W).

    Subtractive step: x - conv(x) / conv(1), with the kernel scaled to sum 1 and
    zero padding, conv(1) correcting the borders. Divisive step on the result c:
    s = sqrt(conv(c^2)) / conv(1); s <= 1e-4 becomes 1e-4; output c / s.
    Each plane is its own computation: chunks run on the machine's cores, the result the same bits.
    """
    y = np.asarray(y, dtype=np.float64)
    if y.ndim != 3:
        raise ValueError(f"contrast_normalize expects (N, H, W) planes, got shape {y.shape}")
    normalize_planes = _plane_normalizer(y.shape[1:], kernel)
    out = np.empty_like(y)

    def one(span):
        out[span] = normalize_planes(y[span])

    parallel.map_ordered(one, parallel.spans(y.shape[0], _CHUNK))
    return out


def _plane_normalizer(plane_shape: tuple[int, int], kernel: np.ndarray | None = None):
    """contrast_normalize's arithmetic for one chunk of (n, H, W) float64 planes."""
    kernel = gaussian1d(7) if kernel is None else np.asarray(kernel, dtype=np.float64)
    kernel = kernel / kernel.sum()
    coef = _separable_mean(np.ones(plane_shape), kernel)

    def normalize_planes(x: np.ndarray) -> np.ndarray:
        centered = x - _separable_mean(x, kernel) / coef
        std = np.sqrt(_separable_mean(centered * centered, kernel)) / coef
        std = np.where(std > _STD_THRESHOLD, std, _STD_REPLACEMENT)
        return centered / std

    return normalize_planes


def _check_uint8_images(name: str, images: np.ndarray) -> None:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{name} must be uint8 images (N, H, W, 3), got {images.dtype} {images.shape}")


def yuv_with_local_y(images: np.ndarray) -> np.ndarray:
    """RGB 0-255 -> YUV with the Y plane contrast-normalized (float64); U, V still raw. Chunks of images run on
    the machine's cores (each image is its own computation: the same bits as one pass)."""
    images = np.asarray(images)
    out = np.empty(images.shape, np.float64)
    normalize_planes = _plane_normalizer(images.shape[1:3])

    def one(span):
        yuv = rgb2yuv(images[span])
        yuv[..., 0] = normalize_planes(yuv[..., 0])
        out[span] = yuv

    parallel.map_ordered(one, parallel.spans(images.shape[0], _CHUNK))
    return out


def normalize(train_uint8: np.ndarray, test_uint8: np.ndarray):
    """cifar.torch's `Provider:normalize()`: returns (train, test, stats), float32 YUV."""
    _check_uint8_images("train_uint8", train_uint8)
    _check_uint8_images("test_uint8", test_uint8)
    train = yuv_with_local_y(train_uint8)
    uv = train[..., 1:].reshape(-1, 2)
    stats = NormalizationStats("yuv", tuple(uv.mean(axis=0)), tuple(uv.std(axis=0, ddof=1)))
    train = apply_stats(train, stats, local_y_done=True)
    test = apply_stats(test_uint8, stats)
    return train, test, stats


def normalize_rgb(train_uint8: np.ndarray, test_uint8: np.ndarray):
    """Plain per-channel standardization of RGB in [0, 1] (an experiment, not the original)."""
    _check_uint8_images("train_uint8", train_uint8)
    _check_uint8_images("test_uint8", test_uint8)
    flat = train_uint8.reshape(-1, 3).astype(np.float64) / 255.0
    stats = NormalizationStats("rgb", tuple(flat.mean(axis=0)), tuple(flat.std(axis=0, ddof=1)))
    return apply_stats(train_uint8, stats), apply_stats(test_uint8, stats), stats


def apply_stats(images: np.ndarray, stats: NormalizationStats, local_y_done: bool = False) -> np.ndarray:
    """Normalizes new images (uint8 RGB, or float64 YUV with `local_y_done`) with stored stats."""
    if stats.method == "yuv":
        yuv = np.asarray(images, dtype=np.float64) if local_y_done else yuv_with_local_y(images)
        mean, std = np.asarray(stats.mean), np.asarray(stats.std)
        out = np.empty(yuv.shape, np.float32)

        def one(span):  # elementwise: chunks on the cores, the same bits
            chunk = yuv[span].copy()
            chunk[..., 1:] = (chunk[..., 1:] - mean) / std
            out[span] = chunk

        parallel.map_ordered(one, parallel.spans(yuv.shape[0], _CHUNK))
        return out
    if stats.method == "rgb":
        rgb = np.asarray(images, dtype=np.float64) / 255.0
        return ((rgb - np.asarray(stats.mean)) / np.asarray(stats.std)).astype(np.float32)
    raise ValueError(f"unknown normalization method {stats.method!r}; expected 'yuv' or 'rgb'")


NORMALIZERS = {"yuv": normalize, "rgb": normalize_rgb}
