"""NIN-BN-Drop without flips (the original reports 90.4 %)."""

from jaxcifar.config import nin_config


def get_config():
    c = nin_config()
    c.flip = "none"
    return c
