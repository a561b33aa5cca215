"""plan.py: the run's arithmetic (steps per epoch, calls, epochs left, where a resume stands and a stop lands)."""

import pytest

from jaxcifar import config as config_lib
from jaxcifar.run import plan
from jaxcifar.errors import ConfigError


def run_plan(**fields):
    c = config_lib.base_config()
    for k, v in fields.items():
        c[k] = v
    return plan.RunPlan.of(c, 1000, {"steps_per_call": 4})


def test_call_plan_groups_steps_by_their_place_in_the_epoch():
    assert plan.call_plan(0, 10, 4) == [4, 4, 1, 1]
    assert plan.call_plan(4, 10, 4) == [4, 1, 1]  # a resume at a call boundary continues the same grouping
    assert plan.call_plan(5, 10, 4) == [1, 1, 1, 1, 1]
    assert plan.call_plan(2, 12, 4) == [1, 1, 4, 4]
    assert plan.call_plan(0, 5, 1) == [1] * 5
    assert plan.call_plan(7, 7, 4) == []
    assert plan.call_plan(0, 5, 1000) == [5]  # more than an epoch: one call per epoch
    assert plan.call_plan(2, 5, 1000) == [1, 1, 1]


def test_the_plan_is_computed_once_from_the_config_the_data_and_the_step_choices():
    p = run_plan(batch_size=128, num_epochs=3, seeds="4, 2", log_every_steps=5)
    assert (p.seeds, p.replicas, p.steps_per_epoch, p.steps_per_call, p.num_epochs) == ((4, 2), 2, 7, 4, 3)
    assert p.calls(0) == [4, 1, 1, 1] and p.epoch_start(2) == 7
    assert list(p.epochs_left(0)) == [1, 2, 3] and list(p.epochs_left(7)) == [2, 3] and list(p.epochs_left(9)) == [2, 3]
    assert not p.epochs_left(21)
    assert (p.resume_point(14), p.resume_point(15)) == ("after epoch 2", "during epoch 3")
    assert p.log_boundary(4, 5) and p.log_boundary(6, 7) and not p.log_boundary(1, 4)
    with pytest.raises(ConfigError, match="batch_size=2000 exceeds the 1000 training images"):
        run_plan(batch_size=2000)


def test_a_stop_lands_where_the_announcement_says():
    p = run_plan(batch_size=100, log_every_steps=3)  # 10 steps an epoch, 4 per call
    assert p.stop_landing(None) == "stopping before the first step (nothing trained yet, so nothing to save)"
    assert p.stop_landing(20) == "stopping when epoch 2 has been evaluated and saved (step 20)"
    assert p.stop_landing(12) == ("stopping after the compiled call in progress (by step 16), then saving a "
                                  "checkpoint")
    assert "by step 20)" in p.stop_landing(18)  # not past the epoch's end
    assert p.stop_landing(12, processes=2) == ("stopping at the next log boundary, where the 2 processes agree (by "
                                               "step 16), then saving a checkpoint")


def test_a_stop_as_the_next_epoch_begins_speaks_of_that_epoch():
    # 0.1 s after "==> epoch 2" nothing of epoch 2 is dispatched yet: the stop lands after its first call, not "when
    # epoch 1 has been evaluated and saved" (epoch 1 is done with).
    p = run_plan(batch_size=100)  # 10 steps an epoch, 4 per call
    assert p.stop_landing(10, epoch=2) == ("stopping after the compiled call in progress (by step 14), then saving a "
                                           "checkpoint")
    assert p.stop_landing(10, epoch=None) == "stopping when epoch 1 has been evaluated and saved (step 10)"
    assert p.stop_landing(0, epoch=1).startswith("stopping after the compiled call in progress (by step 4)")
