"""cifar.torch's Network-in-Network with BatchNorm and Dropout, same training recipe (the original reports 91.9 %)."""

from jaxcifar.config import nin_config


def get_config():
    return nin_config()
