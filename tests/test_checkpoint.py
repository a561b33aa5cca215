"""checkpoint.py on small random trees: checksums that see damage, falling back from a damaged save, partial
restores, and which config changes make another run. Resuming a whole training run: test_train_resume.py."""

import subprocess
import sys

import numpy as np
import pytest

from jaxcifar.run import checkpoint, integrity, resume
from jaxcifar.errors import CheckpointDamaged, CheckpointError
from conftest import REPO, damage_every_data_file, flip_bytes_in_largest_file, set_fields


def random_tree(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"w": rng.standard_normal((256, 256)).astype(np.float32), "b": rng.standard_normal(7).astype(np.float32),
            "count": np.array(seed, np.int32)}


def save(workdir, trees: dict) -> None:
    ck = checkpoint.Checkpointer(workdir)
    try:
        for step, tree in trees.items():
            ck.save(step, tree, {"step": step})
        ck.wait()
    finally:
        ck.close()


def test_flipped_bits_are_detected_set_aside_and_fallen_back_from(tmp_path):
    trees = {1: random_tree(1), 2: random_tree(2)}
    save(tmp_path, trees)
    flip_bytes_in_largest_file(tmp_path / "checkpoints" / "2")
    unverified = checkpoint.read_saved(tmp_path)[0]  # orbax alone reads the damaged values without complaint
    assert not np.array_equal(np.asarray(unverified["w"]), trees[2]["w"])

    messages = []
    ck = checkpoint.Checkpointer(tmp_path)
    try:
        state, meta, step = ck.restore(random_tree(0), log=messages.append, set_aside_damaged=True)
        assert step == 1 and meta["step"] == 1
        np.testing.assert_array_equal(np.asarray(state["w"]), trees[1]["w"])
        assert ck.steps() == [1]
    finally:
        ck.close()
    assert len(messages) == 2, messages
    assert "checkpoint 2" in messages[0] and "fail their saved checksums (w)" in messages[0]
    assert "falling back" in messages[0] and "damaged-checkpoints" in messages[1]
    assert [p.name.split("-")[0] for p in (tmp_path / "damaged-checkpoints").iterdir()] == ["2"]  # kept, not deleted


def test_a_given_damaged_step_is_refused_not_replaced(tmp_path):
    save(tmp_path, {1: random_tree(1), 2: random_tree(2)})
    flip_bytes_in_largest_file(tmp_path / "checkpoints" / "2")
    ck = checkpoint.Checkpointer(tmp_path, read_only=True)
    try:
        with pytest.raises(CheckpointDamaged, match="checkpoint 2 .* fail their saved checksums"):
            ck.restore(random_tree(0), step=2)
    finally:
        ck.close()
    assert (tmp_path / "checkpoints" / "2").is_dir()


def test_a_partial_restore_reads_and_verifies_only_what_it_names(tmp_path):
    trees = {1: random_tree(1)}
    save(tmp_path, trees)
    ck = checkpoint.Checkpointer(tmp_path, read_only=True)
    try:
        state, _, _ = ck.restore({"b": np.zeros(7, np.float32)}, partial=True)
        assert list(state) == ["b"]
        np.testing.assert_array_equal(np.asarray(state["b"]), trees[1]["b"])
        flip_bytes_in_largest_file(tmp_path / "checkpoints" / "1")  # damages "w", which a partial restore of "b" skips
        assert list(ck.restore({"b": np.zeros(7, np.float32)}, partial=True)[0]) == ["b"]
        with pytest.raises(CheckpointDamaged, match=r"fail their saved checksums \(w\)"):
            ck.restore({"w": np.zeros((256, 256), np.float32)}, step=1, partial=True)
    finally:
        ck.close()


def test_a_checkpoint_of_other_shapes_is_refused_and_not_set_aside(tmp_path):
    save(tmp_path, {1: random_tree(1)})
    other = {**random_tree(0), "w": np.zeros((128, 256), np.float32)}
    ck = checkpoint.Checkpointer(tmp_path)
    try:
        with pytest.raises(CheckpointError, match=r"w \(\(256, 256\), 'float32'\) -> \(\(128, 256\)") as e:
            ck.restore(other, set_aside_damaged=True)
        assert not isinstance(e.value, CheckpointDamaged)
    finally:
        ck.close()
    assert (tmp_path / "checkpoints" / "1").is_dir() and not (tmp_path / "damaged-checkpoints").exists()


def test_a_partial_save_written_into_after_its_deletion_is_deleted_too(tmp_path):
    """A failed orbax save reports its first failed write while its other writes go on; test_train_resume's full-disk
    run once found `best/<step>.orbax-checkpoint-tmp` left behind that way (CI, 2 cores)."""
    import threading
    import time

    save(tmp_path, {1: random_tree(1)})
    ck = checkpoint.Checkpointer(tmp_path)
    (tmp_path / "checkpoints" / "2.orbax-checkpoint-tmp").mkdir()
    late = tmp_path / "best" / "2.orbax-checkpoint-tmp" / "state.orbax-checkpoint-tmp"

    def write_in_flight():  # made after the first pass over the folders has deleted what it found
        time.sleep(0.3)
        late.mkdir(parents=True)
        (late / "d").write_bytes(b"partial")

    writer = threading.Thread(target=write_in_flight)
    writer.start()
    try:
        ck.remove_failed_saves()
    finally:
        writer.join()
        ck.close()
    assert not list(tmp_path.rglob("*.orbax-checkpoint-tmp*"))
    assert ck.steps() == [1]  # the complete save is kept


def test_checksums_see_every_bit_and_every_leaf_dtype():
    import jax.numpy as jnp

    tree = {"f": jnp.arange(1000, dtype=jnp.float32), "h": jnp.ones(5, jnp.bfloat16), "u": jnp.arange(3, dtype=jnp.uint32)}
    base = integrity.tree_checksums(tree)
    assert set(base) == {"f", "h", "u"}
    for bit in (0, 17, 31):  # one bit of one element, anywhere
        bits = np.asarray(tree["f"]).view(np.uint32).copy()
        bits[637] ^= np.uint32(1 << bit)
        assert integrity.tree_checksums({**tree, "f": jnp.asarray(bits.view(np.float32))})["f"] != base["f"]
    swapped = jnp.asarray(np.asarray(tree["f"])[::-1].copy())  # same values, other positions
    assert integrity.tree_checksums({**tree, "f": swapped})["f"] != base["f"]


DAMAGED_RESTORE = """
import sys, time
import numpy as np
from jaxcifar.run import checkpoint
template = {f"layer{i}": np.zeros((64, 64), np.float32) for i in range(48)}
ck = checkpoint.Checkpointer(sys.argv[1])
state, meta, step = ck.restore(template, log=print)
time.sleep(2)  # the failed restore's remaining reads finish on other threads meanwhile
ck.close()
print("restored step", step, flush=True)
"""


def test_falling_back_from_an_unreadable_save_prints_one_warning(tmp_path):
    rng = np.random.default_rng(0)
    trees = {s: {f"layer{i}": rng.standard_normal((64, 64)).astype(np.float32) for i in range(48)} for s in (1, 2)}
    save(tmp_path, trees)
    damage_every_data_file(tmp_path / "checkpoints" / "2")  # so that many concurrent reads fail
    r = subprocess.run([sys.executable, "-c", DAMAGED_RESTORE, str(tmp_path)], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "restored step 1" in r.stdout
    assert r.stdout.count("warning:") == 1 and "checkpoint 2" in r.stdout
    assert "Traceback" not in r.stderr and "Event loop is closed" not in r.stderr, r.stderr[-3000:]


def configs(base: dict | None = None, **changes):
    """(saved config as a checkpoint's meta holds it, config now): base_config() with `base`, then `changes`."""
    from jaxcifar import config as config_lib

    saved = set_fields(config_lib.base_config(), base or {})
    return saved.to_dict(), set_fields(set_fields(config_lib.base_config(), base or {}), changes)


@pytest.mark.parametrize("field,value", [
    ("flip", "none"), ("dtype", "bfloat16"), ("label_smoothing", 0.1), ("optimizer.learning_rate", 0.1),
    ("optimizer.momentum", 0.5), ("optimizer.dampening", 0.0), ("optimizer.weight_decay", 0.0),
    ("optimizer.learning_rate_decay", 0.0), ("optimizer.epoch_step", 10), ("optimizer.schedule", "cosine"),
    ("data.preprocess", "rgb"), ("width", 0.5), ("batch_size", 64),
])
def test_a_change_that_makes_another_run_is_named(field, value):
    saved, now = configs(**{field: value})
    assert [d.split(":")[0] for d in resume.incompatible_fields(saved, now)] == [field]


def test_safe_changes_pass_and_num_epochs_counts_only_where_the_schedule_spans_the_run():
    saved, now = configs(num_epochs=400, log_every_steps=7, checkpoint_every_epochs=3, keep_checkpoints=9,
                         eval_batch_size=1000)
    assert resume.incompatible_fields(saved, now) == []
    saved, now = configs({"optimizer.schedule": "cosine"}, num_epochs=400)
    assert resume.incompatible_fields(saved, now) == ["num_epochs: 300 -> 400"]


def test_an_unretrieved_future_of_a_failed_save_logs_nothing(caplog):
    import asyncio
    import gc

    from jaxcifar.run import checkpoint  # noqa: F401 - its log filters

    async def a_failed_write():
        future = asyncio.get_running_loop().create_future()
        future.set_exception(OSError(28, "No space left on device"))  # as orbax's writes hold it, never awaited
        del future
        gc.collect()

    asyncio.run(a_failed_write())
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]


def test_a_read_refused_by_permissions_is_named_as_such_through_orbax_wrapping():
    from jaxcifar import errors

    try:
        try:
            raise ValueError("PERMISSION_DENIED: Error opening file: /w/checkpoints/12/state/d/abc: Permission denied")
        except ValueError:
            raise Exception("Encountered error while reading array index (0,) <bound method pybind11 ...>")  # noqa
    except Exception as e:  # noqa: BLE001 - as orbax raises it
        assert errors.failure_line(e) == "permission denied"
    assert errors.failure_line(OSError(28, "No space left on device")) == "no space left on device"
    assert errors.failure_line(TypeError("a bug\nsecond line")) == "TypeError: a bug"


def test_a_field_added_to_the_config_is_fixed_on_resume_without_touching_the_policy(monkeypatch):
    from jaxcifar import config as config_lib

    real_base = config_lib.base_config

    def base_with_a_new_field():
        c = real_base()
        c.augment_strength = 1.0  # someone adds a field that shapes the trained function, and forgets resume.py
        c.optimizer.nesterov = False
        return c

    monkeypatch.setattr(config_lib, "base_config", base_with_a_new_field)
    saved, now = configs(augment_strength=2.0)
    assert resume.incompatible_fields(saved, now) == ["augment_strength: 1.0 -> 2.0"]
    saved, now = configs(**{"optimizer.nesterov": True})
    assert resume.incompatible_fields(saved, now) == ["optimizer.nesterov: False -> True"]
    # A save from before the field existed counts as its default: the same run resumes, another one is refused.
    saved, now = configs(augment_strength=2.0)
    del saved["augment_strength"]
    assert resume.incompatible_fields(saved, now) == ["augment_strength: 1.0 -> 2.0"]
    saved, now = configs()
    del saved["augment_strength"]
    assert resume.incompatible_fields(saved, now) == []
    # What the policy lists as changeable stays changeable.
    saved, now = configs(save_best=False, checkpoint_every_s=120.0, report_every_epochs=0,
                         **{"results.dir": "/tmp/x", "data.archive": "/a.tar.gz", "steps_per_call": 8})
    assert resume.incompatible_fields(saved, now) == []
