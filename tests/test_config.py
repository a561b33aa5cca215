"""config.validate: a config that cannot train is one line naming the field and the fix, before anything runs."""

import pytest

from jaxcifar import config as config_lib
from jaxcifar.errors import ConfigError


@pytest.mark.parametrize("field,value,says", [
    # inf passed these checks and failed as a NaN loss half a minute into training
    ("optimizer.learning_rate", float("inf"), "optimizer.learning_rate=inf must be a positive number"),
    ("optimizer.weight_decay", float("inf"), "optimizer.weight_decay=inf must be a number >= 0"),
    ("optimizer.learning_rate_decay", float("nan"), "optimizer.learning_rate_decay=nan must be a number >= 0"),
    # a width whose narrowest layer rounds to no channel trained a 1-channel network silently
    ("width", 1e-9, "width=1e-09 must be from 0.015625 (one channel in the narrowest layer)"),
])
def test_values_that_cannot_train_are_refused(field, value, says):
    c = config_lib.base_config()
    group, _, name = field.rpartition(".")
    (c[group] if group else c)[name] = value
    with pytest.raises(ConfigError, match=says.replace("(", r"\(").replace(")", r"\)")):
        config_lib.validate(c)


def test_a_compile_cache_that_is_not_a_folder_is_refused_not_ignored(tmp_path):
    c = config_lib.base_config()
    (tmp_path / "file").write_text("")
    c.compile_cache_dir = str(tmp_path / "file")
    with pytest.raises(ConfigError, match="compile_cache_dir=.* is not a folder"):
        config_lib.validate(c)
    for fine in ("", "none", str(tmp_path), str(tmp_path / "not-yet")):
        c.compile_cache_dir = fine
        config_lib.validate(c)
    c.width = 1 / 64  # the narrowest width that still has a channel everywhere
    config_lib.validate(c)
