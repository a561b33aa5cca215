"""cli.py: every mistake in the training command line is one line, exit code 2, no traceback."""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from jaxcifar import cli, errors
from conftest import REPO


@pytest.mark.parametrize("case", ["unknown field", "typo", "nested typo", "unknown group", "below a value",
                                  "missing config", "workdir under a file", "bad md5 line",
                                  "workdir too long to save in", "workdir name too long", "workdir not utf-8",
                                  "eleven classes", "infinite width", "huge seed",
                                  "empty seed entry", "config returns None", "config returns a dict",
                                  "config lacks fields", "config code raises AttributeError"])
def test_train_command_line_errors_are_one_line(tmp_path, case):
    (tmp_path / "file").write_text("")
    (tmp_path / "sums.md5").write_text("abc\n")
    args, expected = {
        "unknown field": (["--config.bogus=1"], "--config.bogus: configs/tiny.py has no field bogus; its fields are "
                                                "documented in configs/tiny.py and jaxcifar/config.py"),
        "typo": (["--config.num_epoch=2"], "--config.num_epoch: configs/tiny.py has no field num_epoch; did you mean "
                                           "--config.num_epochs?"),
        "nested typo": (["--config.optimizer.learning_rat=2"], "did you mean --config.optimizer.learning_rate?"),
        "unknown group": (["--config.optim.lr=2"], "--config.optim.lr: configs/tiny.py has no field optim; did you "
                                                   "mean --config.optimizer?"),
        "below a value": (["--config.width.x=2"], "--config.width.x: width in configs/tiny.py is a single value, not a "
                                                  "group of fields; give --config.width=VALUE"),
        "missing config": (["--config", "configs/nope.py"], "--config configs/nope.py: no such file"),
        "workdir under a file": (["--workdir", str(tmp_path / "file" / "x")], "cannot create --workdir"),
        "bad md5 line": ([f"--config.data.md5_file={tmp_path / 'sums.md5'}"], "sums.md5, line 1: 'abc'"),
        # A path that fits the file system's limit, but not with a save's folders below it: stopped before training.
        "workdir too long to save in": (["--workdir", _path_of_length(tmp_path, 4000)], "give a shorter --workdir path"),
        "workdir name too long": (["--workdir", str(tmp_path / ("x" * 300))], "File name too long"),
        "workdir not utf-8": (["--workdir", str(tmp_path / "run\udcff")], "holds bytes that are not UTF-8"),
        "eleven classes": (["--config.num_classes=11"], "num_classes=11; CIFAR-10 has 10 classes"),
        "infinite width": (["--config.width=inf"], "width=inf must be from 0.015625 (one channel in the narrowest layer) to 16"),
        "huge seed": (["--config.seeds=0,99999999999999999999"], "seeds=99999999999999999999 is out of range"),
        "empty seed entry": (["--config.seeds=1,,2"], "seeds='1,,2'; give comma-separated integers"),
        "config returns None": (["--config", _config_file(tmp_path, "None")], "get_config() returned None"),
        "config returns a dict": (["--config", _config_file(tmp_path, "{'model': 'vgg_bn_drop'}")],
                                  "get_config() returned a dict, not an ml_collections.ConfigDict"),
        "config lacks fields": (["--config", _config_file(tmp_path, "ml_collections.ConfigDict({'model': 'nin'})")],
                                "it lacks the fields augment, batch_norm, batch_size,"),
        # an error in the file's own code, of the type ml_collections also raises for an unknown override
        "config code raises AttributeError": (["--config", _config_file(tmp_path, "ml_collections.no_such_thing")],
                                              "cannot be loaded (AttributeError: module 'ml_collections' has no "
                                              "attribute 'no_such_thing'); fix the file"),
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
    if case == "bad md5 line":  # refused once the data is read, after the lock: the workdir is left as it was
        assert not (tmp_path / "w").exists()


def _config_file(folder, returned: str) -> str:
    path = folder / f"config{len(list(folder.glob('config*.py')))}.py"
    path.write_text(f"import ml_collections\n\n\ndef get_config():\n    return {returned}\n")
    return str(path)


def _path_of_length(root, length: int) -> str:
    path = str(root)
    while len(path) + 201 < length:
        path += "/" + "d" * 200
    return path + "/" + "e" * (length - len(path) - 1)


def test_help_lists_the_flags_and_where_the_fields_are_documented():
    r = subprocess.run([sys.executable, "-m", "jaxcifar.train", "--help"], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "--config:" in r.stdout and "--workdir:" in r.stdout  # the flags themselves, not only --helpfull
    assert "--config.FIELD=VALUE" in r.stdout and "jaxcifar/config.py" in r.stdout and "docs/training.md" in r.stdout


def test_a_failed_run_ends_on_its_error_and_a_summary_line(tmp_path, prepared):
    data_dir, cache_dir, _, md5_file = prepared
    r = subprocess.run([sys.executable, "-m", "jaxcifar.train", "--config", str(REPO / "configs/tiny.py"),
                        "--workdir", str(tmp_path / "run"), "--config.optimizer.learning_rate=1e30",
                        f"--config.data.data_dir={data_dir}", f"--config.data.cache_dir={cache_dir}",
                        f"--config.data.md5_file={md5_file}"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    errors_ = [line for line in r.stderr.replace("\r", "\n").splitlines() if line.startswith("error")]
    assert len(errors_) == 1 and "loss became nan" in errors_[0] and "Traceback" not in r.stderr
    assert r.stdout.strip().splitlines()[-1].startswith("jaxcifar: failed: 0 of 2 epochs; saved: nothing; ")
    assert "loss became nan" in (tmp_path / "run" / "log.txt").read_text()  # a run that trained keeps its log


def test_ctrl_c_outside_training_is_one_line_and_exit_130(tmp_path):
    # predict blocks opening a FIFO as an image: interrupted there, it says one line.
    import signal
    import time

    fifo = tmp_path / "input"
    os.mkfifo(fifo)  # opening it blocks: the command waits there until the signal
    proc = subprocess.Popen([sys.executable, "-m", "jaxcifar.predict", "--workdir", str(tmp_path), str(fifo)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while True:  # until the command has opened the pipe: past its imports, then blocked reading it
        try:
            writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError:
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()[1][-2000:]
            time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    os.close(writer)
    assert proc.returncode == 130, err[-2000:]
    assert err.strip() == "jaxcifar: interrupted (Ctrl-C)" and "Traceback" not in out + err


def test_ctrl_c_while_prepare_waits_for_another_preparation_is_one_line(tmp_path, fake_archive):
    # prepare waits for the preparation lock another process holds (here: this test): interrupted there, one line.
    import fcntl
    import signal

    archive_path, md5_file = fake_archive
    folder = tmp_path / "tfds" / "cifar10"
    folder.mkdir(parents=True)
    with open(folder / ".jaxcifar-prepare.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        proc = subprocess.Popen([sys.executable, "-m", "jaxcifar.prepare", "--data-dir", str(tmp_path / "tfds"),
                                 "--archive", str(archive_path), "--md5-file", str(md5_file)], cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        waiting = ""
        while "waiting for it" not in waiting and proc.poll() is None:
            waiting += proc.stdout.readline()
        assert "another process is preparing CIFAR-10" in waiting, waiting
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert err.strip() == "jaxcifar: interrupted (Ctrl-C)" and "Traceback" not in out + err


@pytest.mark.parametrize("where", ["archive", "md5 file"])
def test_a_device_or_pipe_given_as_the_archive_or_md5_list_is_refused_at_once(tmp_path, fake_archive, where):
    # /dev/zero was hashed without end (and a FIFO waited forever); as the MD5 list it was read whole, 6 GB in 8 s.
    from jaxcifar import errors
    from jaxcifar.data import archive

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for odd in ("/dev/zero", str(fifo)):
        with pytest.raises(errors.DataError, match="is not a regular file"):
            archive.read_archive(odd) if where == "archive" else archive.read_md5_file(odd)
    if where == "md5 file":
        big = tmp_path / "big"
        big.write_bytes(b"0" * (archive.MD5_FILE_LIMIT + 1))
        with pytest.raises(errors.DataError, match="too large for a list of MD5s"):
            archive.read_md5_file(big)


def test_ctrl_c_while_a_command_loads_is_one_line_too(tmp_path):
    import signal
    import time

    fifo = tmp_path / "input"
    os.mkfifo(fifo)  # should its imports be over by then, it waits on this
    proc = subprocess.Popen([sys.executable, "-m", "jaxcifar.predict", "--workdir", str(tmp_path), str(fifo)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)  # inside its imports of jax (2-3 s here), past the interpreter's own start
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.strip() == "jaxcifar: interrupted (Ctrl-C)", err[-2000:]


BUSY_COMMAND = """
import hashlib, time
from jaxcifar import cli
cli.interrupt_exits_quietly()
t0 = time.monotonic()
hashlib.pbkdf2_hmac("sha256", b"x", b"y", 20000)
rounds = int(20000 * 5.0 / max(time.monotonic() - t0, 1e-4))  # about 5 s in one call
print("busy", flush=True)
hashlib.pbkdf2_hmac("sha256", b"x", b"y", rounds)  # in C, releasing the GIL, as a compiled call or device sync
print("not interrupted", flush=True)
"""


def test_ctrl_c_exits_at_once_while_the_main_thread_is_in_one_long_call():
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-u", "-c", BUSY_COMMAND], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "busy"
    time.sleep(0.3)
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert time.monotonic() - sent < 2.0  # not after the 5 s call
    assert proc.returncode == 130 and err.strip() == "jaxcifar: interrupted (Ctrl-C)" and out == "", err[-2000:]


@pytest.mark.parametrize("raised,code,printed", [
    (SystemExit("error: --epochs 0 must be at least 1"), 2, "error: --epochs 0 must be at least 1"),
    (errors.DataError("no such archive x.tar.gz; give --archive"), 2, "error: no such archive x.tar.gz; give --archive"),
    (MemoryError(), 2, f"error: {errors.OUT_OF_MEMORY}"),
])
def test_a_commands_refusal_is_one_line_and_exit_code_2(capsys, raised, code, printed):
    def main():
        raise raised

    with pytest.raises(SystemExit) as exit_:
        cli.run_command(main)
    assert exit_.value.code == code and capsys.readouterr().err.strip() == printed


def test_a_bug_in_a_command_is_one_line_that_names_its_traceback_file(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the file goes without a workdir

    def main():
        raise KeyError("oops")

    with pytest.raises(SystemExit) as exit_:
        cli.run_command(main)
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 1 and err.startswith("error: unexpected KeyError: 'oops' (") and "\n" not in err
    kept = Path(err.split(" with ")[1].split(",")[0])
    assert kept.parent == tmp_path and "Traceback" in kept.read_text()
