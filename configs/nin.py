"""cifar.torch's Network-in-Network with BatchNorm and Dropout, same training recipe as VGG."""

from jaxcifar.config import base_config


def get_config():
    c = base_config()
    c.model = "nin"
    return c
