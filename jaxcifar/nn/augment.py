"""The augmentation room: what a training batch goes through inside `jit`, every step, from the step's own random
key. A new augmentation is a function here, a name in AUGMENTS and a config value; the step takes `Augment` whole.

- flips (`config.flip`): train.lua's BatchFlip (exactly half of each batch mirrored), independent coin flips, none;
- crops (`config.augment="crop_flip"`): each image padded by 4 zeros and a random 32x32 window of it kept, as
  pytorch-cifar trains; not the seed's recipe, which flips only (`augment="flip"`, the default).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

FLIP_MODES = ("batchflip", "independent", "none")
# augment -> the padding of its random crops (0: none)
AUGMENTS = {"flip": 0, "crop_flip": 4}
# The crop offsets' own stream within the augmentation key: the flips keep the key itself, so runs without crops
# draw exactly the flips they drew before crops existed.
CROP_STREAM = 1


@dataclasses.dataclass(frozen=True)
class Augment:
    """What `augment` does to a batch: resolved once from the config (`of_config`), hashable for `jit`."""

    flip: str = "batchflip"
    crop_padding: int = 0

    @classmethod
    def of_config(cls, config) -> "Augment":
        return cls(flip=config.flip, crop_padding=AUGMENTS[config.augment])


def augment(images, key, spec: Augment):
    """A training batch (N, H, W, C) cropped (when `spec` says so), then mirrored, from `key` alone."""
    if spec.crop_padding:
        images = random_crops(images, crop_offsets(jax.random.fold_in(key, CROP_STREAM), images.shape[0],
                                                   spec.crop_padding), spec.crop_padding)
    mask = flip_mask(key, images.shape[0], spec.flip)
    return jnp.where(mask[:, None, None, None], images[:, :, ::-1, :], images)


def flip_mask(key, batch_size: int, mode: str):
    """Which images of a batch are mirrored.

    'batchflip': torch's `randperm(bs):le(bs/2)`, exactly floor(bs/2) chosen at random;
    'independent': each image with probability 1/2; 'none': no flips.
    """
    if mode == "batchflip":
        return jax.random.permutation(key, batch_size) < batch_size // 2
    if mode == "independent":
        return jax.random.bernoulli(key, 0.5, (batch_size,))
    if mode == "none":
        return jnp.zeros((batch_size,), bool)
    raise ValueError(f"unknown flip mode {mode!r}; choose one of {', '.join(FLIP_MODES)}")


def crop_offsets(key, batch_size: int, padding: int):
    """(N, 2) top-left corners (row, column) of each image's window in its padded copy, uniform in [0, 2 * padding]."""
    return jax.random.randint(key, (batch_size, 2), 0, 2 * padding + 1)


def random_crops(images, offsets, padding: int):
    """Each image padded by `padding` zeros on every side, then the window of its own size at its offset kept."""
    n, h, w, c = images.shape
    padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    crop = jax.vmap(lambda image, at: jax.lax.dynamic_slice(image, (at[0], at[1], 0), (h, w, c)))
    return crop(padded, offsets)
