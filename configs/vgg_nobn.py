"""VGG-Drop without BatchNorm (the original: 91.4 % when BN or Dropout is removed)."""

from jaxcifar.config import base_config


def get_config():
    c = base_config()
    c.batch_norm = False
    return c
