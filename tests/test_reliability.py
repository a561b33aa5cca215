"""One run per workdir, checkpoints that detect damage, and user errors as one-line messages (issue 15).

The cheap half: the lock, checkpoints of small random trees, the data and command-line errors. What needs a
trained run lives in test_checkpoint.py (resume refusals, concurrent trainings) and
test_evaluate_predict_report.py (predict's inputs).
"""

import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from jaxcifar import checkpoint, data, errors, evaluate, predict
from jaxcifar.workdir import WorkdirLock
from test_train import REPO, set_fields

# ---------------------------------------------------------------------------
# The workdir lock


def test_a_held_lock_refuses_a_second_holder_naming_the_first(tmp_path):
    with WorkdirLock(tmp_path) as first:
        assert first.stale is None
        with pytest.raises(errors.WorkdirError, match=rf"in use by another training run \(pid {os.getpid()} on host"):
            WorkdirLock(tmp_path).acquire()
    second = WorkdirLock(tmp_path).acquire()  # released cleanly: free, and nothing stale about it
    assert second.stale is None
    second.release()


HOLD_LOCK = ("import sys, time\nfrom jaxcifar.workdir import WorkdirLock\nWorkdirLock(sys.argv[1]).acquire()\n"
             "print('held', flush=True)\ntime.sleep(600)\n")


def test_the_lock_of_a_killed_run_is_taken_over_and_named(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(errors.WorkdirError, match=f"pid {holder.pid} "):
            WorkdirLock(tmp_path).acquire()
    finally:
        holder.kill()  # SIGKILL: no chance to release
        holder.wait()
    lock = WorkdirLock(tmp_path).acquire()
    try:
        assert lock.stale is not None and f"pid {holder.pid} " in lock.stale
    finally:
        lock.release()


# ---------------------------------------------------------------------------
# Checkpoint checksums


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


def flip_bytes_in_largest_file(step_dir: Path, count: int = 8) -> None:
    files = [f for f in (step_dir / "state").rglob("*") if f.is_file()]
    largest = max(files, key=lambda f: f.stat().st_size)
    blob = bytearray(largest.read_bytes())
    for i in range(len(blob) // 2, len(blob) // 2 + 8 * count, 8):
        blob[i] ^= 0xFF
    largest.write_bytes(bytes(blob))


def damage_every_data_file(step_dir: Path) -> None:
    """64 bytes flipped across each of a save's data files: every array's bytes are hit."""
    for f in (step_dir / "state").rglob("*"):
        if f.is_file() and "/d/" in str(f):
            blob = bytearray(f.read_bytes())
            for i in range(0, len(blob), max(1, len(blob) // 64)):
                blob[i] ^= 0x5A
            f.write_bytes(bytes(blob))


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
        with pytest.raises(checkpoint.CheckpointDamaged, match="checkpoint 2 .* fail their saved checksums"):
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
        with pytest.raises(checkpoint.CheckpointDamaged, match=r"fail their saved checksums \(w\)"):
            ck.restore({"w": np.zeros((256, 256), np.float32)}, step=1, partial=True)
    finally:
        ck.close()


def test_a_checkpoint_of_other_shapes_is_refused_and_not_set_aside(tmp_path):
    save(tmp_path, {1: random_tree(1)})
    other = {**random_tree(0), "w": np.zeros((128, 256), np.float32)}
    ck = checkpoint.Checkpointer(tmp_path)
    try:
        with pytest.raises(checkpoint.CheckpointError, match=r"w \(\(256, 256\), 'float32'\) -> \(\(128, 256\)") as e:
            ck.restore(other, set_aside_damaged=True)
        assert not isinstance(e.value, checkpoint.CheckpointDamaged)
    finally:
        ck.close()
    assert (tmp_path / "checkpoints" / "1").is_dir() and not (tmp_path / "damaged-checkpoints").exists()


def test_checksums_see_every_bit_and_every_leaf_dtype():
    import jax.numpy as jnp

    tree = {"f": jnp.arange(1000, dtype=jnp.float32), "h": jnp.ones(5, jnp.bfloat16), "u": jnp.arange(3, dtype=jnp.uint32)}
    base = checkpoint.tree_checksums(tree)
    assert set(base) == {"f", "h", "u"}
    for bit in (0, 17, 31):  # one bit of one element, anywhere
        bits = np.asarray(tree["f"]).view(np.uint32).copy()
        bits[637] ^= np.uint32(1 << bit)
        assert checkpoint.tree_checksums({**tree, "f": jnp.asarray(bits.view(np.float32))})["f"] != base["f"]
    swapped = jnp.asarray(np.asarray(tree["f"])[::-1].copy())  # same values, other positions
    assert checkpoint.tree_checksums({**tree, "f": swapped})["f"] != base["f"]


DAMAGED_RESTORE = """
import sys, time
import numpy as np
from jaxcifar import checkpoint
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


# ---------------------------------------------------------------------------
# Resume refusals: which settings a resumed run may change


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
    assert [d.split(":")[0] for d in checkpoint.incompatible_fields(saved, now)] == [field]


def test_safe_changes_pass_and_num_epochs_counts_only_where_the_schedule_spans_the_run():
    saved, now = configs(num_epochs=400, log_every_steps=7, checkpoint_every_epochs=3, keep_checkpoints=9,
                         eval_batch_size=1000)
    assert checkpoint.incompatible_fields(saved, now) == []
    saved, now = configs({"optimizer.schedule": "cosine"}, num_epochs=400)
    assert checkpoint.incompatible_fields(saved, now) == ["num_epochs: 300 -> 400"]


# ---------------------------------------------------------------------------
# Data errors


def test_a_given_archive_that_does_not_exist_is_an_error_even_when_prepared(prepared, capsys):
    data_dir, _, _, md5_file = prepared
    rc = data.main(["prepare", "--archive", "/nonexistent.tar.gz", "--data-dir", data_dir, "--md5-file", md5_file])
    assert rc == 2 and "/nonexistent.tar.gz does not exist" in capsys.readouterr().err


def test_a_prepared_set_is_checked_against_the_expected_archive(prepared, capsys):
    data_dir, _, _, md5_file = prepared
    assert data.main(["prepare", "--data-dir", data_dir]) == 2  # the official set expected, a fake one prepared
    err = capsys.readouterr().err
    assert "another archive than the official CIFAR-10 archive" in err and "200 train / 50 test images" in err
    assert data.main(["prepare", "--data-dir", data_dir, "--md5-file", md5_file]) == 0
    assert "NOT the official CIFAR-10" in capsys.readouterr().out


def test_an_md5_file_line_error_names_the_file_and_line(tmp_path, capsys):
    bad = tmp_path / "sums.md5"
    bad.write_text(f"{'0' * 32}  data_batch_1.bin\nnot-a-digest\n")
    assert data.main(["prepare", "--md5-file", str(bad), "--data-dir", str(tmp_path / "tfds")]) == 2
    err = capsys.readouterr().err
    assert f"{bad}, line 2: 'not-a-digest'" in err and "Traceback" not in err


# ---------------------------------------------------------------------------
# The training command line: one line, exit code 2, no traceback


@pytest.mark.parametrize("case", ["unknown field", "missing config", "workdir under a file", "bad md5 line"])
def test_train_command_line_errors_are_one_line(tmp_path, case):
    (tmp_path / "file").write_text("")
    (tmp_path / "sums.md5").write_text("abc\n")
    args, expected = {
        "unknown field": (["--config.bogus=1"], "--config.bogus: the config has no field 'bogus'"),
        "missing config": (["--config", "configs/nope.py"], "--config configs/nope.py: no such file"),
        "workdir under a file": (["--workdir", str(tmp_path / "file" / "x")], "cannot create --workdir"),
        "bad md5 line": ([f"--config.data.md5_file={tmp_path / 'sums.md5'}"], "sums.md5, line 1: 'abc'"),
    }[case]
    base = {"--config": "configs/tiny.py", "--workdir": str(tmp_path / "w")}
    for flag in ("--config", "--workdir"):
        if flag in args:
            base[flag] = args[args.index(flag) + 1]
            args = [a for a in args if a not in (flag, base[flag])]
    cmd = [sys.executable, "-m", "jaxcifar.train", *[x for kv in base.items() for x in kv], *args]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, TFDS_DATA_DIR=str(tmp_path / "tfds")))
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines() == [f"error: {r.stderr.strip()[7:]}"] and expected in r.stderr, r.stderr
    if case == "bad md5 line":  # a run that fails on its data says why in its log too
        assert expected in (tmp_path / "w" / "log.txt").read_text()


# ---------------------------------------------------------------------------
# Reading tools


def test_evaluate_on_an_empty_folder_writes_nothing(tmp_path, capsys):
    assert evaluate.main(["--workdir", str(tmp_path)]) == 2
    assert "no checkpoints in" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def png_header(path: Path, width: int, height: int) -> Path:
    """A PNG that declares `width` x `height` pixels (Pillow decides from the header alone)."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return path


def test_predict_reads_its_inputs_before_loading_a_model(tmp_path, capsys):
    bomb = png_header(tmp_path / "bomb.png", 20000, 20000)
    rc = predict.main(["--workdir", str(tmp_path / "no-such-run"), str(tmp_path / "missing.png"), str(bomb)])
    err = capsys.readouterr().err
    assert rc == 1  # the files' errors, found before the (absent) model would have been loaded
    assert "missing.png: no such file" in err and "bomb.png: refused" in err and "Traceback" not in err
    assert "no-such-run" not in err
