"""Fault test: SIGKILL the tiny training at random moments, restart it, and demand the same result.

    python scripts/kill_test.py --rounds 20

1. prepares a fake archive (or the given one) once and trains it uninterrupted (the reference, unless given);
2. for each round starts the same command in a second workdir, waits until it trains,
   kills it with SIGKILL after a random delay (often during a checkpoint save), and checks
   that the next start resumes with at most the epoch in progress lost;
3. lets the last start finish and compares final parameters (bit for bit) and the
   per-epoch metrics with the reference.
Exits non-zero on any failure; prints a one-line summary per round.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def train_command(workdir: Path, archive: Path, md5_file: Path, epochs: int) -> list[str]:
    return [sys.executable, "-m", "jaxcifar.train", "--config", str(REPO / "configs/tiny.py"),
            "--workdir", str(workdir), f"--config.num_epochs={epochs}", f"--config.data.archive={archive}",
            f"--config.data.md5_file={md5_file}", "--config.log_every_steps=1"]


def completed_epochs(workdir: Path) -> int:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return 0
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    complete = 0
    for line in lines:
        try:
            complete = json.loads(line)["epoch"]
        except (ValueError, KeyError):
            break  # a line cut by the kill
    return complete


def final_params(workdir: Path) -> dict:
    """{path: array} of the run's latest saved parameters."""
    from jaxcifar.run import checkpoint, trees

    params = checkpoint.read_saved(workdir)[0]["train_state"]["params"]
    return {path: np.asarray(leaf) for path, leaf in trees.flat_dict(params).items()}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--max-delay", type=float, default=5.0, help="longest wait after training starts, seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--root", help="working folder (default: a temporary one)")
    p.add_argument("--archive", help="a CIFAR-10-shaped archive to train on (default: a fake one, written here)")
    p.add_argument("--md5-file", help="with --archive: its md5sum list")
    p.add_argument("--reference", help="the workdir of an uninterrupted tiny run of --epochs on --archive "
                   "(default: trained here first)")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    rng = random.Random(args.seed)
    root = Path(args.root or tempfile.mkdtemp(prefix="jaxcifar-kill-"))
    env, archive, md5_file = prepare(root, args.archive, args.md5_file)
    command = functools.partial(train_command, archive=archive, md5_file=md5_file, epochs=args.epochs)
    reference = Path(args.reference) if args.reference else train_reference(root, command, env, args.epochs)
    workdir = root / "interrupted"
    failures, kills = [], 0
    for rnd in range(1, args.rounds + 1):
        killed, failure = kill_round(rnd, root, workdir, command, env, rng.uniform(0, args.max_delay))
        kills += killed
        failures += failure
    failures += compare_final(reference, workdir, command, env)
    status = "PASS" if not failures else "FAIL"
    print(f"{status}: {args.rounds} rounds, {kills} SIGKILLs; final parameters "
          f"{'identical' if not failures else 'checked'} to the uninterrupted run's; work in {root}")
    for f in failures:
        print("  " + f)
    return 0 if not failures else 1


def prepare(root: Path, archive: str | None, md5_file: str | None) -> tuple[dict, Path, Path]:
    """(the runs' environment, the archive, its md5 list), the archive prepared for tfds under `root`."""
    from jaxcifar.data import archive as archive_lib
    from jaxcifar.data import fake_data, tfds_cifar10

    env = dict(os.environ, TFDS_DATA_DIR=str(root / "tfds"), JAXCIFAR_CACHE_DIR=str(root / "cache"))
    env.setdefault("JAXCIFAR_COMPILE_CACHE", str(root / "xla"))
    if archive:
        archive, md5_file = Path(archive), Path(md5_file)
    else:
        archive, md5_file = fake_data.write_fake_archive(root / "archive", train_per_batch=60, test_records=60)
    tfds_cifar10.prepare(str(root / "tfds"), str(archive), archive_lib.read_md5_file(md5_file))
    return env, archive, md5_file


def train_reference(root: Path, command, env: dict, epochs: int) -> Path:
    reference = root / "reference"
    t0 = time.time()
    subprocess.run(command(reference), env=env, check=True, capture_output=True, text=True)
    print(f"reference: {epochs} epochs uninterrupted in {time.time() - t0:.1f} s", flush=True)
    return reference


def kill_round(rnd: int, root: Path, workdir: Path, command, env: dict, delay: float) -> tuple[bool, list[str]]:
    """One start of the run, SIGKILLed `delay` s after training starts: (killed, failures)."""
    before = completed_epochs(workdir)
    out_path = root / f"round-{rnd}.out"
    with open(out_path, "w") as out:
        proc = subprocess.Popen(command(workdir), env=env, stdout=out, stderr=subprocess.STDOUT)
        started = _wait_for_training_steps(out_path, proc, timeout=300)
        time.sleep(delay)
        finished = proc.poll() is not None
        if not finished:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
    resumed = re.search(r"resumed from checkpoint at step (\d+), \w+ epoch \d+ \((\d+) of", out_path.read_text())
    resumed_epoch = int(resumed.group(2)) if resumed else 0
    failures = []
    if resumed_epoch < max(before - 1, 0):
        failures.append(f"round {rnd}: resumed at epoch {resumed_epoch} but {before} epochs were logged")
    print(f"round {rnd:2d}: {'killed' if not finished else 'finished'} after {delay:.2f} s; "
          f"resumed at epoch {resumed_epoch} (had logged {before}); now {completed_epochs(workdir)} logged",
          flush=True)
    if not started:
        failures.append(f"round {rnd}: training never started; see {out_path}")
    return not finished, failures


def compare_final(reference: Path, workdir: Path, command, env: dict) -> list[str]:
    """The interrupted run finished, then compared with the uninterrupted one: parameters and per-epoch metrics."""
    from jaxcifar.run import runlog

    final = subprocess.run(command(workdir), env=env, capture_output=True, text=True)
    if final.returncode != 0:
        return [f"final run failed: {final.stderr[-2000:]}"]
    failures = []
    ref_params, got_params = final_params(reference), final_params(workdir)
    differing = [k for k in ref_params if not np.array_equal(ref_params[k], got_params.get(k))]
    if differing or ref_params.keys() != got_params.keys():
        failures.append(f"final parameters differ from the uninterrupted run in {differing[:5]}")
    if runlog.untimed_records(reference) != runlog.untimed_records(workdir):
        failures.append("per-epoch metrics differ from the uninterrupted run")
    return failures


def _wait_for_training_steps(out_path: Path, proc: subprocess.Popen, timeout: float) -> bool:
    """Waits until this start reports training steps (its progress bar shows a loss)."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if "loss=" in out_path.read_text(errors="replace"):
            return True
        time.sleep(0.02)
    return proc.poll() is not None


if __name__ == "__main__":
    from jaxcifar import cli

    cli.run_command(main)
