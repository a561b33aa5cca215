"""VGG-BN-Drop with flips only, trained in 40 epochs instead of 300.

Same model, data, preprocessing and BatchFlip as configs/vgg.py; what changes is the schedule:
a one-cycle learning rate (linear warm-up over 15 % of the steps to the original's peak of 1, then
linear decay to 0) instead of halving every 25 epochs, no `learningRateDecay`, and label
smoothing 0.1. Target: >= 92.45 % test accuracy at the final epoch.
"""

from jaxcifar.config import fast_config


def get_config():
    return fast_config()
