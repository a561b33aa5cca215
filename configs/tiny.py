"""A seconds-long run for tests and smoke checks: VGG at 1/16 width, 2 epochs, small batches."""

from jaxcifar.config import base_config


def get_config():
    c = base_config()
    c.width = 1 / 16
    c.batch_size = 32
    c.eval_batch_size = 64
    c.num_epochs = 2
    # One step per compiled call: a run this short is mostly compilation. With the CPU's 4 steps per call
    # (backends.STEP_CHOICES) the first call took 16 s, with one step 7 s (Sapphire Rapids, this config).
    # Tests of grouped steps set steps_per_call themselves.
    c.steps_per_call = 1
    c.optimizer.learning_rate = 0.5
    c.log_every_steps = 5
    return c
