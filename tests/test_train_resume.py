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

from jaxcifar.data import cache
from jaxcifar.run import checkpoint, integrity, machine, resume, runlog, workdir as workdir_lib
from jaxcifar import errors, evaluate, train
from jaxcifar.errors import CheckpointError
from jaxcifar.run.signals import TrainingInterrupted
from jaxcifar.run.trainer import Trainer
from conftest import REPO, assert_same_leaves, damage_every_data_file, tiny_config


def assert_same_metrics(a, b):
    ma, mb = runlog.untimed_records(a), runlog.untimed_records(b)
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
    assert_same_leaves(checkpoint.read_saved(reference_run)[0]["train_state"]["params"],
                       checkpoint.read_saved(workdir)[0]["train_state"]["params"])
    assert_same_metrics(reference_run, workdir)
    assert (workdir / "damaged-checkpoints").is_dir()  # set aside, not deleted


def test_a_signal_saves_then_a_new_process_resumes_bit_identically_and_past_the_old_end(prepared, reference_run,
                                                                                        tmp_path):
    """SIGINT mid-run: the run saves and exits 130. The same command with a larger num_epochs resumes in a new process
    and trains past the first run's end: parameters and every epoch's metrics equal the uninterrupted reference's.
    (SIGTERM takes the same handler: test_signals.py; by the command line in test_distributed.py.)"""
    proc = cli(tmp_path, prepared, "--config.num_epochs=2", wait=False)
    out = ""
    deadline = time.time() + 300
    while "loss=" not in out and time.time() < deadline:
        out += proc.stdout.read(1)
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGINT, (out + rest)[-2000:]
    assert "SIGINT received: stopping after the compiled call in progress" in rest
    assert "jaxcifar: stopped by SIGINT at step " in rest and "saved (the same command resumes)" in rest
    assert checkpoint.Checkpointer(tmp_path).steps()
    r = cli(tmp_path, prepared, "--config.num_epochs=4")
    assert r.returncode == 0, r.stderr[-2000:]
    assert re.search(r"resumed from checkpoint at step (\d+), (during|after) epoch \d+ \(\d of 4 epochs done\)", r.stdout)
    assert_same_leaves(checkpoint.read_saved(reference_run)[0]["train_state"]["params"],
                       checkpoint.read_saved(tmp_path)[0]["train_state"]["params"])
    assert_same_metrics(reference_run, tmp_path)  # no duplicated or missing epochs either
    assert len((tmp_path / "metrics.csv").read_text().splitlines()) == 1 + 4


def test_kill_script_short(fake_archive, reference_run, tmp_path):
    # The session's fake archive and its uninterrupted 4-epoch run: the same shapes and programs as the other tests.
    r = subprocess.run([sys.executable, str(REPO / "scripts/kill_test.py"), "--rounds", "1", "--epochs", "4",
                        "--max-delay", "1", "--root", str(tmp_path), "--archive", str(fake_archive[0]),
                        "--md5-file", str(fake_archive[1]), "--reference", str(reference_run)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0 and "PASS" in r.stdout, r.stdout[-3000:] + r.stderr[-2000:]
    assert " 1 SIGKILLs" in r.stdout, r.stdout  # the start was killed, not left to finish


def test_a_resumed_epoch_is_timed_whole_and_each_epoch_names_its_machine_and_commit(prepared, reference_run, tmp_path,
                                                                                    monkeypatch):
    """A stop inside epoch 2 saves the epoch's training time so far; the resumed epoch's record adds it, so its
    images/s and epoch time cover the whole epoch (they covered the part after the resume only)."""
    config = tiny_config(prepared, num_epochs=2, log_every_steps=1)
    train_epoch = Trainer.train_epoch

    def stopped_in_epoch_2(self, state, epoch, epoch_metrics=None, progress=None, should_stop=None):
        if epoch != 2:
            return train_epoch(self, state, epoch, epoch_metrics, progress, should_stop)
        should_stop.signum = signal.SIGINT  # as if Ctrl-C came during the epoch's first call
        return train_epoch(self, state, epoch, epoch_metrics, progress, lambda boundary: True)

    monkeypatch.setattr(Trainer, "train_epoch", stopped_in_epoch_2)
    with pytest.raises(TrainingInterrupted):
        train.train_and_evaluate(config, str(tmp_path))
    monkeypatch.undo()
    _, meta, step = checkpoint.read_saved(tmp_path)
    steps_per_epoch = meta["history"][0]["step"]
    assert steps_per_epoch < step < 2 * steps_per_epoch and meta["epoch_train_s"] > 0
    train.train_and_evaluate(config, str(tmp_path))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    resumed = records[1]
    train_s = resumed["epoch_time_s"] - resumed["eval_time_s"]
    assert train_s > meta["epoch_train_s"]
    assert resumed["train_images_per_s"] * train_s == pytest.approx(steps_per_epoch * config.batch_size, rel=1e-9)
    assert runlog.untimed_records(tmp_path) == runlog.untimed_records(reference_run)[:2]  # and it resumed exactly
    here = machine.run_context()
    assert [(r["machine"], r["commit"]) for r in records] == [(here["machine"], here["commit"])] * 2
    assert "1 x cpu (" in here["machine"] and here["commit"] == machine.git_commit()


def test_a_run_resumed_on_another_machine_or_by_other_code_says_so(tmp_path, capsys):
    here = {"machine": "1 x cpu (AMD EPYC, 2 cores)", "commit": "b" * 40}
    log = runlog.RunLog(tmp_path)
    resume.say_where_it_moved([{"epoch": 17, **here}], here, log.print)
    resume.say_where_it_moved([{"epoch": 3}], here, log.print)  # records from before they named either: silent
    assert capsys.readouterr().out == ""
    resume.say_where_it_moved([{"epoch": 17, "machine": "1 x cpu (Intel(R) Xeon(R) Processor, 2 cores)",
                                "commit": "a" * 40}], here, log.print)
    log.close()
    out = capsys.readouterr().out
    assert ("warning: this run's epoch 17 was trained on 1 x cpu (Intel(R) Xeon(R) Processor, 2 cores); it resumes on "
            "1 x cpu (AMD EPYC, 2 cores): its epoch times mix machines") in out
    assert f"note: this run's epoch 17 was trained by the code of commit {'a' * 40}; it resumes with {'b' * 40}" in out
    assert out in (tmp_path / "log.txt").read_text()


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
    assert runlog.untimed_records(workdir) == runlog.untimed_records(reference_run)[:2]
    assert len((workdir / "metrics.discarded.jsonl").read_text().splitlines()) == 4
    assert lock.read_text() == ""  # released cleanly


@pytest.mark.parametrize("change,named", [({"seed": 1}, "seeds: [0] -> [1]"),
                                          ({"dropout_bits": 32}, "dropout_bits (step choice): 16 -> 32"),
                                          ({"flip": "none"}, "flip: 'batchflip' -> 'none'")])
def test_a_resume_that_would_be_another_run_is_refused(prepared, reference_run, tmp_path, change, named):
    import shutil
    shutil.copytree(reference_run, tmp_path / "w")
    config = tiny_config(prepared, num_epochs=5, **change)
    with pytest.raises(CheckpointError, match=re.escape(named)):
        train.train_and_evaluate(config, str(tmp_path / "w"))
    assert runlog.untimed_records(tmp_path / "w") == runlog.untimed_records(reference_run)  # nothing written


def test_evaluate_refuses_a_damaged_checkpoint(reference_run, tmp_path, capsys):
    import shutil

    from jaxcifar import evaluate
    shutil.copytree(reference_run, tmp_path / "w")
    steps = checkpoint.Checkpointer(tmp_path / "w", read_only=True).steps()
    # Every data file damaged throughout, so that the parameters evaluate reads are hit too (it reads only
    # params and BatchNorm statistics; the checksum path of such a partial read: test_checkpoint.py).
    damage_every_data_file(tmp_path / "w" / "checkpoints" / str(steps[-1]))
    assert evaluate.main(["--workdir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert re.search(f"checkpoint {steps[-1]} .*(fail their saved checksums|is unreadable)", err), err
    assert f"pass --step with one of {steps[:-1]}" in err and "Traceback" not in err


# ---------------------------------------------------------------------------
# Saves that cannot be written: one line, a non-zero exit, no hang, nothing lost


def test_a_checkpoints_folder_that_cannot_be_written_stops_the_run_before_training(prepared, tmp_path):
    workdir = tmp_path / "w"
    workdir.mkdir()
    (workdir / "checkpoints").write_text("not a folder")
    r = cli(workdir, prepared, "--config.num_epochs=1")
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    err = r.stderr.strip()
    assert err.count("\n") == 0 and "checkpoints is a file, where the run keeps a folder" in err, err
    assert "==> epoch" not in r.stdout and (workdir / "checkpoints").read_text() == "not a folder"


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MB tmpfs: a tiny run fills it a few epochs in (root only, where mounting is allowed)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_stops_the_run_with_one_line_and_it_resumes_identically(prepared, reference_run, small_disk,
                                                                             tmp_path):
    import shutil
    workdir = small_disk / "w"
    r = cli(workdir, prepared, "--config.num_epochs=4", "--config.log_every_steps=100")
    assert r.returncode == 2, r.stdout[-3000:] + r.stderr[-3000:]
    lines = [line for line in r.stderr.splitlines() if line.startswith("error")]  # the rest: progress bars
    assert len(lines) == 1, r.stderr[-3000:]
    assert not re.search("Traceback|Exception|Error", r.stdout + r.stderr.replace(lines[0], "")), r.stderr[-3000:]
    # the disk fills during a save or while the report is written, as the sizes fall
    saving = re.fullmatch(r"error: no space left on device while saving step (\d+) to \S+; the last complete "
                          r"checkpoint is step (\d+) in \S+\. Free space.*", lines[0])
    writing = re.fullmatch(r"error: no space left on device while writing \S+; free space.*", lines[0])
    assert saving or writing, lines[0]
    assert not saving or int(saving.group(2)) < int(saving.group(1))
    assert not [p for p in workdir.rglob("*") if "tmp" in p.name]  # no temporary files left behind
    # nothing lost: the same command, with space again, ends where the uninterrupted run ended
    shutil.copytree(workdir, tmp_path / "w")
    r = cli(tmp_path / "w", prepared, "--config.num_epochs=4", "--config.log_every_steps=100")
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"resumed from checkpoint at step {saving.group(2) if saving else ''}" in r.stdout
    assert_same_leaves(checkpoint.read_saved(reference_run)[0]["train_state"]["params"],
                       checkpoint.read_saved(tmp_path / "w")[0]["train_state"]["params"])


def test_tensorboard_holds_every_logged_epoch_after_a_hard_stop_lost_its_events(prepared, reference_run, tmp_path):
    import shutil

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    workdir = tmp_path / "w"
    shutil.copytree(reference_run, workdir)
    for events in (workdir / "tensorboard").glob("events.out.tfevents.*"):  # a writer's buffer lost to kill -9
        events.write_bytes(events.read_bytes()[:len(events.read_bytes()) // 2])
    train.train_and_evaluate(tiny_config(prepared, num_epochs=5, log_every_steps=1), str(workdir))
    history = runlog.untimed_records(workdir)
    reader = EventAccumulator(str(workdir / "tensorboard"))
    reader.Reload()
    for tag in ("train_loss", "test_accuracy"):
        assert [(e.step, e.value) for e in reader.Scalars(tag)] == [
            (r["step"], pytest.approx(r[tag], rel=1e-6)) for r in history], tag


def test_tensorboard_holds_each_epoch_once_after_a_resume_from_an_earlier_save(prepared, reference_run, tmp_path):
    import shutil

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    workdir = tmp_path / "w"
    shutil.copytree(reference_run, workdir)
    steps = checkpoint.Checkpointer(workdir, read_only=True).steps()
    for s in steps[-2:]:  # as if the run died after logging epochs whose saves never reached the disk
        shutil.rmtree(workdir / "checkpoints" / str(s))
    shutil.rmtree(workdir / "best")
    train.train_and_evaluate(tiny_config(prepared, num_epochs=4, log_every_steps=1), str(workdir))
    events = EventAccumulator(str(workdir / "tensorboard"))
    events.Reload()
    for tag in events.Tags()["scalars"]:
        logged = [e.step for e in events.Scalars(tag)]
        assert logged == sorted(set(logged)) and len(logged) == 4, (tag, logged)
    assert len(list((workdir / "tensorboard").glob("events.out.tfevents.*"))) == 1  # one file, not one per start


# ---------------------------------------------------------------------------
# The meta is verified too, and only damage counts as damage


def _rewrite_meta(step_dir: Path, change) -> None:
    path = step_dir / "meta" / "metadata"
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


@pytest.mark.parametrize("damage", ["stats", "method", "method_name", "no checksums"])
def test_damage_to_the_meta_is_refused_by_evaluate_and_predict(reference_run, tmp_path, capsys, damage):
    import shutil

    from PIL import Image

    from jaxcifar import evaluate, predict
    workdir = tmp_path / "w"
    shutil.copytree(reference_run, workdir)
    step = checkpoint.Checkpointer(workdir, read_only=True).steps()[-1]

    def change(meta):
        if damage == "stats":  # one bit of one normalization statistic
            mean = np.float64(meta["stats"]["mean"][0])
            meta["stats"]["mean"][0] = float(np.frombuffer((mean.view(np.uint64) ^ np.uint64(1)).tobytes(), np.float64)[0])
        elif damage == "method":  # with damaged data too: the unknown method must not switch verification off
            meta["checksum_method"] = "u32-weighted-sum-x"
        elif damage == "no checksums":  # with damaged data too: no released version saved without them
            for key in ("checksum_method", "checksums", "meta_sha256"):
                del meta[key]
        else:
            meta["checksum_methoe"] = meta.pop("checksum_method")

    _rewrite_meta(workdir / "checkpoints" / str(step), change)
    if damage in ("method", "no checksums"):
        damage_every_data_file(workdir / "checkpoints" / str(step))
    assert evaluate.main(["--workdir", str(workdir)]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {step}" in err and ("SHA-256" in err or "checksum method" in err or "lacks" in err), err
    image = tmp_path / "x.png"
    Image.new("RGB", (32, 32), (200, 30, 90)).save(image)
    assert predict.main(["--workdir", str(workdir), str(image)]) == 2
    assert f"checkpoint {step}" in capsys.readouterr().err


def test_a_bug_in_the_restore_path_keeps_its_traceback_and_sets_nothing_aside(reference_run, tmp_path, monkeypatch):
    import shutil
    workdir = tmp_path / "w"
    shutil.copytree(reference_run, workdir)
    steps = checkpoint.Checkpointer(workdir, read_only=True).steps()

    def broken(tree, meta, where, partial=False):
        raise AttributeError("a bug in jaxcifar, not damage")

    template = checkpoint.read_saved(workdir)[0]
    monkeypatch.setattr(integrity, "verify_checksums", broken)
    ck = checkpoint.Checkpointer(workdir)
    try:
        with pytest.raises(AttributeError, match="a bug in jaxcifar"):
            ck.restore(template, set_aside_damaged=True)
    finally:
        ck.close()
    assert checkpoint.Checkpointer(workdir, read_only=True).steps() == steps
    assert not (workdir / "damaged-checkpoints").exists()


@pytest.mark.parametrize("copy", ["to an unused number", "over a later step"])
def test_a_save_whose_folder_names_another_step_is_damage(reference_run, tmp_path, capsys, copy):
    import shutil

    from jaxcifar import evaluate
    workdir = tmp_path / "w"
    shutil.copytree(reference_run, workdir)
    steps = checkpoint.Checkpointer(workdir, read_only=True).steps()
    folder = workdir / "checkpoints"
    if copy == "to an unused number":  # would be the newest: every resume would start from its older state
        shutil.copytree(folder / str(steps[0]), folder / "99999")
        wrong = 99999
    else:  # the newest save replaced by an older one under its name
        shutil.rmtree(folder / str(steps[-1]))
        shutil.copytree(folder / str(steps[0]), folder / str(steps[-1]))
        wrong = steps[-1]
    assert evaluate.main(["--workdir", str(workdir), "--step", str(wrong)]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {wrong}" in err and f"its meta records step {steps[0]}, not {wrong}" in err, err
    assert evaluate.main(["--workdir", str(workdir)]) == 2  # the newest: refused, naming the intact saves
    err = capsys.readouterr().err
    assert f"its meta records step {steps[0]}, not {wrong}" in err and "pass --step with one of" in err, err
    assert "--best (step" in err  # best/ holds an intact save too


def test_a_resume_or_an_evaluation_on_other_data_is_refused(reference_run, prepared, tmp_path, capsys):
    import shutil

    from jaxcifar.data import archive, fake_data, tfds_cifar10
    from jaxcifar import evaluate
    other, md5_file = fake_data.write_fake_archive(tmp_path / "archive", seed=7)  # same shapes, other images
    tfds_cifar10.prepare(str(tmp_path / "tfds"), str(other), archive.read_md5_file(md5_file), log=lambda m: None)
    workdir = tmp_path / "w"
    shutil.copytree(reference_run, workdir)
    before = (workdir / "metrics.jsonl").read_text()
    c = tiny_config(prepared, num_epochs=5, log_every_steps=1)
    c.data.data_dir, c.data.cache_dir, c.data.md5_file = str(tmp_path / "tfds"), str(tmp_path / "cache"), str(md5_file)
    with pytest.raises(CheckpointError, match=r"holds a run trained on other data \(dataset fingerprint "):
        train.train_and_evaluate(c, str(workdir))
    assert (workdir / "metrics.jsonl").read_text() == before  # nothing trained, nothing lost
    args = ["--workdir", str(workdir), "--data-dir", str(tmp_path / "tfds"), "--cache-dir", str(tmp_path / "cache")]
    assert evaluate.main(args) == 2
    assert "was trained on other data" in capsys.readouterr().err
    assert evaluate.main([*args, "--other-data"]) == 0
    assert "warning: evaluating on other data than the run trained on" in capsys.readouterr().err


def test_saves_interrupted_by_a_hard_stop_are_removed_on_the_next_start(reference_run, prepared, tmp_path, capsys):
    import shutil

    workdir = tmp_path / "w"
    shutil.copytree(reference_run, workdir)
    leftovers = [workdir / folder / "77.orbax-checkpoint-tmp-1796289032" for folder in ("checkpoints", "best")]
    for leftover in leftovers:  # what a second Ctrl-C during a save leaves
        (leftover / "state").mkdir(parents=True)
        (leftover / "state" / "part").write_bytes(b"x" * 100)
    complete = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    train.train_and_evaluate(tiny_config(prepared, num_epochs=4, log_every_steps=1), str(workdir))
    out = capsys.readouterr().out
    for leftover in leftovers:
        assert not leftover.exists() and f"removed {leftover}, a save that was stopped before its end" in out
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == [c for c in complete if "tmp" not in c]


def test_a_gpu_slots_run_saves_by_time_reports_at_the_end_and_rewrites_its_result_every_epoch(prepared, tmp_path,
                                                                                             monkeypatch):
    from jaxcifar.run import results

    written = []
    real_write = results.write_result
    monkeypatch.setattr(results, "write_result", lambda r, d: written.append(r) or real_write(r, d))
    out, workdir = tmp_path / "out", tmp_path / "run"
    c = tiny_config(prepared, num_epochs=3, checkpoint_every_s=3600.0, save_best=False, report_every_epochs=0,
                    **{"results.dir": str(out), "results.name": "tiny"})
    submitted = []
    real_submit = train.submit_report
    monkeypatch.setattr(train, "submit_report", lambda *a: submitted.append(a[0].history[-1]["epoch"]) or real_submit(*a))
    train.train_and_evaluate(c, str(workdir))
    per_epoch = Trainer(c, cache.load_dataset(c)).plan.steps_per_epoch
    # No save was due within the hour, none is a best/ save: the last epoch's is the only one. One report, at the end.
    assert workdir_lib.complete_steps(workdir / "checkpoints") == [3 * per_epoch]
    assert workdir_lib.complete_steps(workdir / "best") == []
    assert submitted == [3] and (workdir / "report.html").is_file()
    # The result after each epoch: a partial row until the last.
    assert [(r["epochs_completed"], r["partial"]) for r in written] == [(1, True), (2, True), (3, False)]
    final = json.loads((out / "tiny-seed0-cpu.json").read_text())
    assert final["dtype"] == "float32" and final["final_test_accuracy"] == written[-1]["final_test_accuracy"]
    assert "startup_s" in final["curve"][0] and all("bookkeeping_s" in e for e in final["curve"][1:])


def test_a_stop_at_an_epochs_end_saves_that_epoch_whatever_the_checkpoint_cadence(prepared, tmp_path, monkeypatch):
    workdir = tmp_path / "run"
    c = tiny_config(prepared, num_epochs=4, checkpoint_every_epochs=2)
    real_epoch = train.train_and_evaluate_epoch

    def epoch_then_signal(run, epoch, *args):
        record = real_epoch(run, epoch, *args)
        if epoch == 3:  # the signal comes as epoch 3 ends: a save was not due (every 2 epochs)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1.0)  # a watcher thread sets the stop flag (signal_watch.py): let it, as the save would
        return record

    monkeypatch.setattr(train, "train_and_evaluate_epoch", epoch_then_signal)
    with pytest.raises(TrainingInterrupted) as stopped:
        train.train_and_evaluate(c, str(workdir))
    per_epoch = Trainer(c, cache.load_dataset(c)).plan.steps_per_epoch
    assert stopped.value.step == 3 * per_epoch
    assert workdir_lib.complete_steps(workdir / "checkpoints")[-1] == 3 * per_epoch


@pytest.mark.parametrize("piece", ["meta", "state", "everything"])
def test_a_save_missing_a_piece_is_damage_set_aside_and_the_run_resumes_from_the_one_before(prepared, reference_run,
                                                                                             tmp_path, piece):
    import shutil
    workdir = tmp_path / "w"
    shutil.copytree(reference_run, workdir)
    latest = max(checkpoint.Checkpointer(workdir, read_only=True).steps())
    folder = workdir / "checkpoints" / str(latest)
    for part in folder.iterdir() if piece == "everything" else [folder / piece]:
        shutil.rmtree(part) if part.is_dir() else part.unlink()
    with pytest.raises(errors.JaxcifarError, match=f"checkpoint {latest} .* is unreadable"):
        evaluate.load_trained(workdir)  # a reader names it and the other saves
    train.train_and_evaluate(tiny_config(prepared, num_epochs=4, log_every_steps=1), str(workdir))
    assert (workdir / "damaged-checkpoints").is_dir()  # set aside, not deleted
    assert_same_leaves(checkpoint.read_saved(reference_run)[0]["train_state"]["params"],
                       checkpoint.read_saved(workdir)[0]["train_state"]["params"])


def test_a_hangup_during_preprocessing_stops_before_the_first_step_and_says_nothing_was_saved(prepared, tmp_path,
                                                                                             monkeypatch):
    # SIGHUP (a closed terminal, a dropped SSH session) is a stop like SIGTERM; one that comes before any step is
    # honoured before training, with no save (there is nothing to save), instead of after a step and a save.
    real_load = cache.load_dataset_once

    def load_then_hang_up(config, log):
        dataset = real_load(config, log)
        os.kill(os.getpid(), signal.SIGHUP)
        time.sleep(1.0)  # the watcher thread sets the flag (signal_watch.py)
        return dataset

    monkeypatch.setattr(cache, "load_dataset_once", load_then_hang_up)
    workdir = tmp_path / "run"
    with pytest.raises(TrainingInterrupted) as stopped:
        train.train_and_evaluate(tiny_config(prepared, num_epochs=2), str(workdir))
    assert (stopped.value.signum, stopped.value.step, stopped.value.saved) == (signal.SIGHUP, 0, False)
    assert workdir_lib.complete_steps(workdir / "checkpoints") == []
    assert "before training anything" in str(stopped.value)


@pytest.mark.parametrize("existed", [False, True])
def test_a_start_refused_after_the_lock_leaves_a_workdir_that_held_nothing_as_it_was(prepared, tmp_path, existed):
    # The fake set has 200 training images: a batch of 256 is refused once the data is read, after the lock and the
    # log and the checkpoint folders exist. They went on existing.
    workdir = tmp_path / "run"
    if existed:
        workdir.mkdir()
    with pytest.raises(errors.ConfigError, match="batch_size=256 exceeds the 200 training images"):
        train.train_and_evaluate(tiny_config(prepared, batch_size=256), str(workdir))
    assert (list(workdir.iterdir()) == []) if existed else not workdir.exists()


def test_a_refused_start_in_a_workdir_with_a_run_touches_nothing(prepared, reference_run, tmp_path):
    import shutil
    workdir = tmp_path / "w"
    shutil.copytree(reference_run, workdir)
    before = sorted(p.name for p in workdir.iterdir())
    with pytest.raises(errors.ConfigError, match="exceeds the 200 training images"):
        train.train_and_evaluate(tiny_config(prepared, num_epochs=4, batch_size=256), str(workdir))
    assert sorted(p.name for p in workdir.iterdir()) == before


def test_a_stop_during_the_last_epochs_evaluation_finishes_the_run(prepared, tmp_path, monkeypatch):
    # Everything was trained and the last epoch saves anyway: that is a finished run (exit 0), not a stopped one.
    real_epoch = train.train_and_evaluate_epoch

    def last_epoch_then_signal(run, epoch, *args):
        record = real_epoch(run, epoch, *args)
        if epoch == 2:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1.0)  # the watcher thread sets the stop flag (signal_watch.py)
        return record

    monkeypatch.setattr(train, "train_and_evaluate_epoch", last_epoch_then_signal)
    workdir = tmp_path / "run"
    train.train_and_evaluate(tiny_config(prepared, num_epochs=2), str(workdir))  # returns: no TrainingInterrupted
    assert runlog.saved_in(workdir).startswith("epoch 2 ")
