"""A seconds-long run for tests and smoke checks: VGG at 1/16 width, 2 epochs, small batches."""

from jaxcifar.config import base_config


def get_config():
    c = base_config()
    c.width = 1 / 16
    c.batch_size = 32
    c.eval_batch_size = 64
    c.num_epochs = 2
    c.optimizer.learning_rate = 0.5
    c.log_every_steps = 5
    return c
