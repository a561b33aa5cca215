"""cli.py: every mistake in the training command line is one line, exit code 2, no traceback."""

import os
import subprocess
import sys

import pytest

from conftest import REPO


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
