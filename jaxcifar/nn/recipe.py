"""The recipe a training step computes, resolved once from the config into one value the step takes whole: what a
batch goes through (augment.Augment) and the loss. The optimizer and its schedule are step.build_optimizer's; how the
step is built (the step choices) is backends.step_choices'.
"""

from __future__ import annotations

import dataclasses

import jax
import optax

from jaxcifar.nn.augment import Augment


@dataclasses.dataclass(frozen=True)
class Recipe:
    augment: Augment
    label_smoothing: float
    num_classes: int

    @classmethod
    def of_config(cls, config) -> "Recipe":
        return cls(Augment.of_config(config), float(config.label_smoothing), int(config.num_classes))

    def loss(self, logits, labels):
        """The mean cross-entropy of a batch against its labels, smoothed by `label_smoothing`: the loss training
        differentiates and the benchmark times."""
        targets = optax.smooth_labels(jax.nn.one_hot(labels, self.num_classes), self.label_smoothing)
        return optax.softmax_cross_entropy(logits, targets).mean()
