"""cifar.torch's recipe: VGG-BN-Dropout, BatchFlip, batch 128, 300 epochs, torch7 SGD (lr 1, halved every 25)."""

from jaxcifar.config import base_config


def get_config():
    return base_config()
