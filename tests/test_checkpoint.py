import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jaxcifar import checkpoint, errors, train
from test_train import REPO, tiny_config

TIMED = {"epoch_time_s", "train_images_per_s", "eval_time_s"}


def flat(tree, prefix=""):
    if isinstance(tree, dict):
        return {k2: v2 for k, v in tree.items() for k2, v2 in flat(v, f"{prefix}/{k}").items()}
    return {prefix: np.asarray(tree)}


def assert_same_params(a, b):
    fa, fb = flat(a), flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


def untimed(workdir):
    lines = (Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in sorted(json.loads(line).items()) if k not in TIMED} for line in lines]


def assert_same_metrics(a, b):
    ma, mb = untimed(a), untimed(b)
    assert [r["epoch"] for r in ma] == [r["epoch"] for r in mb]
    for ra, rb in zip(ma, mb):
        assert {k: (ra[k], rb.get(k)) for k in ra if ra[k] != rb.get(k)} == {}, f"epoch {ra['epoch']}"


def cli(workdir, prepared, *overrides, wait=True):
    data_dir, cache_dir, _, md5_file = prepared
    env = dict(os.environ, TFDS_DATA_DIR=data_dir, JAXCIFAR_CACHE_DIR=cache_dir)
    cmd = [sys.executable, "-m", "jaxcifar.train", "--config", str(REPO / "configs/tiny.py"),
           "--workdir", str(workdir), "--config.log_every_steps=1", f"--config.data.md5_file={md5_file}", *overrides]
    if not wait:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def reference_run(prepared, tmp_path_factory):
    """The tiny config trained 4 epochs without interruption."""
    workdir = tmp_path_factory.mktemp("reference")
    train.train_and_evaluate(tiny_config(prepared, num_epochs=4, log_every_steps=1), str(workdir))
    return workdir


def test_stop_and_resume_in_a_new_process_is_bit_identical(prepared, reference_run, tmp_path):
    first = cli(tmp_path, prepared, "--config.num_epochs=2")
    assert first.returncode == 0, first.stderr[-2000:]
    second = cli(tmp_path, prepared, "--config.num_epochs=4")
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resumed from checkpoint at step" in second.stdout
    assert_same_params(checkpoint.read_saved(reference_run)[0]["train_state"]["params"],
                       checkpoint.read_saved(tmp_path)[0]["train_state"]["params"])
    assert_same_metrics(reference_run, tmp_path)  # no duplicated or missing epochs either
    assert len((tmp_path / "metrics.csv").read_text().splitlines()) == 1 + 4


def test_best_checkpoint_is_kept_apart(reference_run):
    history = [json.loads(line) for line in (reference_run / "metrics.jsonl").read_text().splitlines()]
    best = max(history, key=lambda r: r["test_accuracy"])  # the first epoch reaching the maximum
    best = next(r for r in history if r["test_accuracy"] == best["test_accuracy"])
    _, meta, step = checkpoint.read_saved(reference_run, best=True)
    assert step == best["step"] and meta["history"][-1]["test_accuracy"] == best["test_accuracy"]
    assert len(checkpoint.Checkpointer(reference_run).steps()) == 3  # keep_checkpoints


def test_another_architecture_is_refused(prepared, reference_run, tmp_path):
    import shutil
    shutil.copytree(reference_run, tmp_path / "w")
    r = cli(tmp_path / "w", prepared, "--config.num_epochs=5", "--config.model=nin")
    assert r.returncode == 2
    assert "different run (model: 'vgg_bn_drop' -> 'nin')" in r.stderr and "fresh --workdir" in r.stderr


def test_truncated_latest_checkpoint_falls_back(prepared, reference_run, tmp_path):
    import shutil
    workdir = tmp_path / "w"
    shutil.copytree(reference_run, workdir)
    latest = max(checkpoint.Checkpointer(workdir).steps())
    for f in (workdir / "checkpoints" / str(latest) / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    r = cli(workdir, prepared, "--config.num_epochs=4")
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"checkpoint {latest}" in r.stdout and "unreadable" in r.stdout
    assert "resumed from checkpoint at step" in r.stdout
    assert_same_params(checkpoint.read_saved(reference_run)[0]["train_state"]["params"],
                       checkpoint.read_saved(workdir)[0]["train_state"]["params"])
    assert_same_metrics(reference_run, workdir)
    assert (workdir / "damaged-checkpoints").is_dir()  # set aside, not deleted


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_then_resume_completes(prepared, reference_run, tmp_path, sig):
    proc = cli(tmp_path, prepared, "--config.num_epochs=4", wait=False)
    out = ""
    deadline = time.time() + 300
    while "loss=" not in out and time.time() < deadline:
        out += proc.stdout.read(1)
    proc.send_signal(sig)
    rest, _ = proc.communicate(timeout=300)
    assert proc.returncode == 128 + sig, (out + rest)[-2000:]
    assert f"stopped by {signal.Signals(sig).name}" in rest and "run the same command again" in rest
    assert checkpoint.Checkpointer(tmp_path).steps()
    r = cli(tmp_path, prepared, "--config.num_epochs=4")
    assert r.returncode == 0, r.stderr[-2000:]
    assert_same_params(checkpoint.read_saved(reference_run)[0]["train_state"]["params"],
                       checkpoint.read_saved(tmp_path)[0]["train_state"]["params"])
    assert_same_metrics(reference_run, tmp_path)


def test_kill_script_short(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "scripts/kill_test.py"), "--rounds", "2", "--epochs", "4",
                        "--root", str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0 and "PASS" in r.stdout, r.stdout[-3000:] + r.stderr[-2000:]


def test_a_second_training_in_the_same_workdir_is_refused(prepared, reference_run, tmp_path):
    import shutil
    workdir = tmp_path / "w"
    shutil.copytree(reference_run, workdir)
    shutil.rmtree(workdir / "checkpoints")  # the metrics of 4 epochs stay: training says it starts afresh
    shutil.rmtree(workdir / "best")
    first = cli(workdir, prepared, "--config.num_epochs=2", wait=False)
    lock = workdir / "train.lock"
    deadline = time.time() + 120
    while not (lock.exists() and lock.read_text().strip()) and time.time() < deadline and first.poll() is None:
        time.sleep(0.05)
    second = tiny_config(prepared, num_epochs=2, **{"optimizer.learning_rate": 0.1})
    with pytest.raises(errors.WorkdirError, match=rf"in use by another training run \(pid {first.pid} on host"):
        train.train_and_evaluate(second, str(workdir))
    out, _ = first.communicate(timeout=600)
    assert first.returncode == 0, out[-2000:]
    assert "holds the metrics of an earlier run but no checkpoint; starting afresh" in out
    # The first run's files are all its own: its learning rate, its two epochs, the same as the reference's first two.
    assert checkpoint.read_saved(workdir)[1]["config"]["optimizer"]["learning_rate"] == 0.5
    assert untimed(workdir) == untimed(reference_run)[:2]
    assert len((workdir / "metrics.discarded.jsonl").read_text().splitlines()) == 4
    assert lock.read_text() == ""  # released cleanly


@pytest.mark.parametrize("change,named", [({"seed": 1}, "seeds: [0] -> [1]"),
                                          ({"dropout_bits": 32}, "dropout_bits (step choice): 16 -> 32"),
                                          ({"flip": "none"}, "flip: 'batchflip' -> 'none'")])
def test_a_resume_that_would_be_another_run_is_refused(prepared, reference_run, tmp_path, change, named):
    import shutil
    shutil.copytree(reference_run, tmp_path / "w")
    config = tiny_config(prepared, num_epochs=5, **change)
    with pytest.raises(checkpoint.CheckpointError, match=re.escape(named)):
        train.train_and_evaluate(config, str(tmp_path / "w"))
    assert untimed(tmp_path / "w") == untimed(reference_run)  # nothing written


def test_evaluate_refuses_a_damaged_checkpoint(reference_run, tmp_path, capsys):
    import shutil

    from jaxcifar import evaluate
    from test_reliability import damage_every_data_file
    shutil.copytree(reference_run, tmp_path / "w")
    steps = checkpoint.Checkpointer(tmp_path / "w", read_only=True).steps()
    # Every data file damaged throughout, so that the parameters evaluate reads are hit too (it reads only
    # params and BatchNorm statistics; the checksum path of such a partial read: test_reliability.py).
    damage_every_data_file(tmp_path / "w" / "checkpoints" / str(steps[-1]))
    assert evaluate.main(["--workdir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert re.search(f"checkpoint {steps[-1]} .*(fail their saved checksums|is unreadable)", err), err
    assert f"pass --step with one of {steps[:-1]}" in err and "Traceback" not in err
