"""The run's arithmetic in one room: how many steps an epoch has, how they are grouped into compiled calls, which
epochs are left, where a resumed run stands and where a stop lands. `RunPlan` is computed once, by the Trainer, from
the config, the training set's size and the resolved step choices; the loop, the stop announcement, resume and the
benchmark read it, and nothing else recomputes it.
"""

from __future__ import annotations

import dataclasses
import math

from jaxcifar import config as config_lib
from jaxcifar.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class RunPlan:
    seeds: tuple[int, ...]  # the runs trained together, one replica each
    num_epochs: int
    batch_size: int
    steps_per_epoch: int  # full batches of the training set; the partial one is dropped
    steps_per_call: int  # updates per compiled call (backends.step_choices); more than an epoch's: one per epoch
    log_every_steps: int  # where every process checks the loss and a stop (log boundaries)

    @classmethod
    def of(cls, config, num_train: int, choices: dict) -> "RunPlan":
        steps = num_train // config.batch_size
        if steps < 1:
            raise ConfigError(f"bad config: batch_size={config.batch_size} exceeds the {num_train} training images")
        return cls(tuple(config_lib.seed_list(config)), int(config.num_epochs), int(config.batch_size), steps,
                   int(choices["steps_per_call"]), int(config.log_every_steps))

    @property
    def replicas(self) -> int:
        return len(self.seeds)

    def epoch_start(self, epoch: int) -> int:
        """The step at which `epoch` (1-based) begins."""
        return (epoch - 1) * self.steps_per_epoch

    def calls(self, done: int) -> list[int]:
        """How many steps each call runs from step `done` of an epoch to its end.

        Multi-step calls start at multiples of `steps_per_call` counted from the epoch's start, so a run resumed at
        any step groups its updates exactly as an uninterrupted one does (a multi-step program may round differently
        from single calls in the last bit). More than an epoch's steps per call: one call per epoch.
        """
        return call_plan(done, self.steps_per_epoch, self.steps_per_call)

    def log_boundary(self, before: int, done: int) -> bool:
        """Whether a call from step `before` to `done` of an epoch crossed a log boundary or ended the epoch."""
        every = self.log_every_steps
        return done // every > before // every or done == self.steps_per_epoch

    def epochs_left(self, step: int) -> range:
        """The epochs (1-based) left to train from `step`: from the one it falls in to `num_epochs`."""
        return range(step // self.steps_per_epoch + 1, self.num_epochs + 1)

    def resume_point(self, step: int) -> str:
        """'after epoch 3' for a step at an epoch's end, 'during epoch 4' for one inside it."""
        epoch, into = divmod(step, self.steps_per_epoch)
        return f"after epoch {epoch}" if into == 0 else f"during epoch {epoch + 1}"

    def stop_landing(self, dispatched: int | None, processes: int = 1, epoch: int | None = None) -> str:
        """What a stop signal's acknowledgement says happens next, when the loop has dispatched up to `dispatched`
        (None: nothing yet) of `epoch` (the epoch being trained; None between epochs); with several processes a
        stop lands on the next log boundary, where they all ask."""
        if dispatched is None:
            return "stopping before the first step (nothing trained yet, so nothing to save)"
        per_epoch = self.steps_per_epoch
        epoch_end = math.ceil(dispatched / per_epoch) * per_epoch
        if dispatched == epoch_end and epoch is not None and self.epoch_start(epoch) == dispatched:
            epoch_end = dispatched + per_epoch  # the next epoch has begun: its first call lands the stop
        elif dispatched == epoch_end:
            return f"stopping when epoch {dispatched // per_epoch} has been evaluated and saved (step {dispatched})"
        if processes == 1:
            return (f"stopping after the compiled call in progress (by step "
                    f"{min(dispatched + self.steps_per_call, epoch_end)}), then saving a checkpoint")
        every, into = self.log_every_steps, dispatched - (epoch_end - per_epoch)
        boundary = min(epoch_end, epoch_end - per_epoch + (into // every + 1) * every + self.steps_per_call - 1)
        return (f"stopping at the next log boundary, where the {processes} processes agree (by step {boundary}), "
                "then saving a checkpoint")


def call_plan(first: int, steps: int, steps_per_call: int) -> list[int]:
    """RunPlan.calls for an epoch of `steps` from step `first`, calls of `steps_per_call`."""
    steps_per_call = min(steps_per_call, steps)
    plan, i = [], first
    while i < steps:
        k = steps_per_call if i % steps_per_call == 0 and i + steps_per_call <= steps else 1
        plan.append(k)
        i += k
    return plan
