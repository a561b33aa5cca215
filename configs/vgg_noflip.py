"""VGG-BN-Drop without flips (the original reports 91.3 %)."""

from jaxcifar.config import base_config


def get_config():
    c = base_config()
    c.flip = "none"
    return c
