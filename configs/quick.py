"""The five-minute try: the recipe's VGG with BatchNorm, without Dropout (the original's `vgg_nodrop`), at a quarter
of the width, with `vgg_fast`'s one-cycle schedule over 3 epochs.

Enough to see the network learn on a 2-core CPU, not to reach the recipe's accuracy (docs/results.md has what full
runs reach). Dropout is off because at this width and length it hides the learning: with it, this config measured
23.29 % test accuracy after 4 epochs (39.79 % train-mode accuracy; 2-core AMD EPYC, 7.1 min), since the BatchNorm
statistics gathered under dropout do not fit the eval-mode network early in training (docs/fidelity.md).
"""

from jaxcifar.config import fast_config


def get_config():
    c = fast_config()
    c.width = 0.25
    c.dropout = False
    c.num_epochs = 3
    return c
