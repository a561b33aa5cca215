"""cifar.torch's recipe (the original reports 92.45 %): VGG-BN-Dropout, BatchFlip, batch 128, 300 epochs,
torch7 SGD with lr 1 halved every 25 epochs."""

from jaxcifar.config import base_config


def get_config():
    return base_config()
