"""VGG-BN without Dropout (the original: 91.4 % when BN or Dropout is removed)."""

from jaxcifar.config import base_config


def get_config():
    c = base_config()
    c.dropout = False
    return c
