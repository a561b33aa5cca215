"""The network and its step: models, the recipe (augmentation, loss), the optimizer, the compiled functions and evaluation, and how the step is built per backend. Pure: no files."""
