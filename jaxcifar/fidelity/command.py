"""Training runs of a recipe on real CIFAR-10, in JAX (jaxcifar's trainer) or in the PyTorch port, with the
per-epoch numbers that compare them: train-mode loss and accuracy, eval-mode accuracy on the test set and on
training images, their gap G (train-mode training accuracy - eval-mode test accuracy), and (at chosen epochs)
eval accuracy with BatchNorm statistics re-estimated without dropout.

    python scripts/fidelity.py --side jax --seed 0 --out results/fidelity/jax-s0.json
    python scripts/fidelity.py --side torch --seed 0 --out results/fidelity/torch-s0.json
    python scripts/fidelity.py --side jax --seed 0 --set conv_impl=xla --out ...   # one change, for bisection
    python scripts/fidelity.py --side jax --seeds 0-7 --jobs 2 --out 'results/fidelity/jax-w0.25-s{seed}.json'
    python scripts/fidelity.py --table results/fidelity/*.json
    python scripts/fidelity.py --gaps results/fidelity/*-w0.25-*.json --window 5-10   # G per seed, mean +- s.e.

Defaults: configs/vgg_fast.py at width 0.25 over 10 epochs (its one-cycle schedule stretched to 10), one
thread. The JSON is rewritten after every epoch and the run's state is checkpointed in its workdir
(`--workdir`, default $JAXCIFAR_CACHE_DIR/fidelity/<out name>): the same command resumes a run that was cut
short from its last finished epoch, bit-identically (orbax on the JAX side, an npz of arrays on the PyTorch side).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from jaxcifar.data import cache
from jaxcifar import errors
from jaxcifar.run import files, machine
from jaxcifar.fidelity import comparison, runs, tables

REPO = Path(__file__).resolve().parents[2]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/fidelity.py", description=__doc__.splitlines()[0])
    p.add_argument("--side", choices=("jax", "torch"))
    p.add_argument("--config", default=str(REPO / "configs/vgg_fast.py"))
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", help="several runs, e.g. 0-7 or 0,3,5: one process per seed (--out needs {seed})")
    p.add_argument("--jobs", type=int, default=1, help="with --seeds: processes at once (one thread each)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="config override (repeatable)")
    p.add_argument("--variant", default="", help="label of this run's change (default: the --set items)")
    p.add_argument("--train-eval-images", type=int, default=10_000, help="training images evaluated in eval mode")
    p.add_argument("--recompute-bn-batches", type=int, default=100)
    p.add_argument("--recompute-at", default="last", help="epochs with BN re-estimation: 'last', 'all' or 1,5,10")
    p.add_argument("--same-stream", action="store_true",
                   help="torch side: replay jaxcifar's initialization, data order and flips for this seed "
                        "(dropout masks and kernels stay PyTorch's)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--archive", help="cifar-10-binary.tar.gz, if tfds has not prepared cifar10 yet")
    p.add_argument("--workdir", help="the run's checkpoints, for resuming (default $JAXCIFAR_CACHE_DIR/fidelity/<out "
                                     "name>); keep it outside the repository")
    p.add_argument("--stop-after", type=int, metavar="EPOCH",
                   help="stop once this epoch is saved (a long run split over sessions); the same command resumes")
    p.add_argument("--out")
    p.add_argument("--table", nargs="+", metavar="JSON", help="print the comparison table of these results")
    p.add_argument("--gaps", nargs="+", metavar="JSON", help="print G per seed and its mean +- s.e. per group")
    p.add_argument("--window", default="5-10", help="with --gaps: the epochs G averages over, e.g. 5-10")
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = parser()
    args = p.parse_args(argv)
    try:
        if args.table:
            comparison.check_run_files(args.table)
            print(tables.table(args.table))
            return 0
        if args.gaps:
            window = comparison.parse_window(args.window)
            comparison.check_run_files(args.gaps)
            print(tables.gap_summary(args.gaps, window))
            return 0
        if not (args.side and args.out):
            p.error("--side and --out are required to run")
        check_run_args(args)
        if args.seeds:
            return run_seeds(argv, parse_seeds(args.seeds), args.out, args.jobs)
        run_one(args)
    except errors.JaxcifarError as e:
        raise SystemExit(f"error: {e}") from None
    return 0


def run_one(args) -> None:
    """One run of one side, as `args` describe it; resumes from its workdir."""
    if args.side == "jax" and args.threads == 1:
        machine.use_one_thread()  # before JAX's backend starts
    config = runs.recipe_config(args.config, args.width, args.epochs, args.seed, args.set)
    if args.archive:
        config.data.archive = args.archive
    if args.side == "torch":
        runs.require_torch().set_num_threads(args.threads)  # before the data loads: a missing torch is said at once
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    variant = args.variant or ",".join(args.set + (["same-stream"] if args.same_stream else [])) or "recipe"
    # What makes a checkpoint this run's: a resume under any other of these would splice two runs.
    identity = {"tool": "fidelity", "side": args.side, "variant": variant, "seed": args.seed, "width": args.width,
                "num_epochs": args.epochs, "config": config.to_dict(), "same_stream": args.same_stream,
                "train_eval_images": args.train_eval_images, "recompute_bn_batches": args.recompute_bn_batches}
    identity["config"]["data"] = {k: v for k, v in identity["config"]["data"].items() if k == "preprocess"}
    dataset = cache.load_dataset(config, log=runs.say)
    n = args.train_eval_images
    measure = runs.Measurements((dataset.train_images[:n], dataset.train_labels[:n]),
                                recompute_epochs(args.recompute_at, args.epochs), args.recompute_bn_batches)
    result = {"side": args.side, "variant": variant, "seed": args.seed,
              "config_file": os.path.relpath(args.config, REPO), "overrides": args.set, "width": args.width,
              "num_epochs": args.epochs, "threads": args.threads, "commit": machine.git_commit(short=True) or "unknown",
              "cpu": machine.cpu_name(), "train_eval_images": n, "recompute_bn_batches": args.recompute_bn_batches,
              "config": config.to_dict(), "epochs": []}
    workdir = Path(args.workdir) if args.workdir else runs.default_workdir(out)
    label = f"{args.side} s{args.seed} {variant}"
    record = runs.RunRecord(workdir, identity, result_writer(result, out, label), args.stop_after)
    runs.say(f"[{label}] {args.epochs} epochs; every finished epoch is saved in {workdir} and written to {out} "
             "(Ctrl-C loses only the epoch under way: the same command resumes)")
    if args.side == "jax":
        runs.run_jax(config, dataset, measure, record)
    else:
        runs.run_torch(config, dataset, measure, record, args.same_stream)
    print(summary_line(label, record.rows, args.epochs, out, workdir), flush=True)


def summary_line(label: str, rows: list[dict], num_epochs: int, out: Path, workdir: Path) -> str:
    """The run's last line: complete or where it stopped, its last test accuracy, and where its files are."""
    last = rows[-1]  # at least epoch 1: --epochs and --stop-after are at least 1
    recomputed = (f" ({last['test_accuracy_recomputed_bn']:.2f} % with BatchNorm statistics re-estimated)"
                  if "test_accuracy_recomputed_bn" in last else "")
    status = ("complete" if last["epoch"] == num_epochs
              else f"stopped after epoch {last['epoch']} of {num_epochs} (the same command resumes from {workdir})")
    accuracy = f"test accuracy {last['test_accuracy']:.2f} %{recomputed} at epoch {last['epoch']}"
    return f"[{label}] {status}: {accuracy}; {out}"


def result_writer(result: dict, out: Path, label: str):
    """(rows, new row) -> the JSON rewritten atomically with `rows`, and the new row said in one line."""
    def write(rows, row):
        result["epochs"] = rows
        files.atomic_write(out, json.dumps(result, indent=1).encode(),
                            then="run the same command: it resumes from the last saved epoch")
        if row is None:
            return
        extra = "".join(f" {k.replace('test_accuracy_', '')} {row[k]:.2f}" for k in row
                        if k.startswith("test_accuracy_") or k.startswith("max_"))
        print(f"[{label}] epoch {row['epoch']}: train loss {row['train_loss']:.4f} "
              f"acc {row['train_accuracy']:.2f} | eval train-images {row['train_images_eval_accuracy']:.2f} "
              f"test {row['test_accuracy']:.2f} | G {row['gap']:+.2f}{extra} ({row['train_time_s']:.0f} s)", flush=True)

    return write


def parse_seeds(text: str) -> list[int]:
    """'0-7' or '0,2,5' -> seeds."""
    seeds = []
    try:
        for part in text.split(","):
            lo, dash, hi = part.partition("-")
            seeds += list(range(int(lo), int(hi) + 1)) if dash else [int(lo)]
    except ValueError:
        raise SystemExit(f"error: --seeds {text}: give seeds as 0-7 or 0,2,5") from None
    return seeds


def recompute_epochs(text: str, epochs: int) -> set[int]:
    """--recompute-at's epochs: 'all', 'last' or a list such as 1,5,10 (each within the run)."""
    if text in ("all", "last"):
        return set(range(1, epochs + 1)) if text == "all" else {epochs}
    try:
        chosen = {int(e) for e in text.split(",")}
    except ValueError:
        raise SystemExit(f"error: --recompute-at {text}: give 'last', 'all' or epochs such as 1,5,10") from None
    if not all(1 <= e <= epochs for e in chosen):
        raise SystemExit(f"error: --recompute-at {text}: every epoch must be from 1 to --epochs {epochs}")
    return chosen


def check_run_args(args) -> None:
    """One line and exit code 2 for values that would fail mid-run or train nothing."""
    for flag, value in (("--epochs", args.epochs), ("--train-eval-images", args.train_eval_images),
                        ("--recompute-bn-batches", args.recompute_bn_batches), ("--jobs", args.jobs),
                        ("--threads", args.threads)):
        if value < 1:
            raise SystemExit(f"error: {flag} {value} must be at least 1")
    if args.stop_after is not None and args.stop_after < 1:
        raise SystemExit(f"error: --stop-after {args.stop_after} must be at least 1 (an epoch to stop after)")
    recompute_epochs(args.recompute_at, args.epochs)
    if args.seeds:
        parse_seeds(args.seeds)


def run_seeds(argv: list[str], seeds: list[int], out: str, jobs: int) -> int:
    """This command once per seed, `jobs` processes at a time (one thread each): K independent runs."""
    if "{seed}" not in out:
        raise SystemExit("error: with --seeds, --out needs a {seed} placeholder, e.g. results/fidelity/jax-s{seed}.json")
    base = drop_options(argv, ("--seeds", "--jobs", "--out", "--seed", "--workdir"))
    pending = [[sys.executable, "-m", __name__, *base, "--seed", str(k), "--out", out.format(seed=k)] for k in seeds]
    running, failed = [], []
    while pending or running:
        while pending and len(running) < jobs:
            running.append(subprocess.Popen(pending.pop(0)))
        time.sleep(2)
        for proc in [p for p in running if p.poll() is not None]:
            running.remove(proc)
            if proc.returncode:
                failed.append(" ".join(proc.args[3:]))
    for f in failed:
        print(f"error: failed: {f}", file=sys.stderr)
    print(f"fidelity: {len(seeds) - len(failed)} of {len(seeds)} runs ran without error ({out})"
          + (f"; {len(failed)} failed (above)" if failed else ""), flush=True)
    return 1 if failed else 0


def drop_options(argv: list[str], names: tuple[str, ...]) -> list[str]:
    """`argv` without the options `names` (and their values)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in names:
            skip = True
            continue
        if any(a.startswith(n + "=") for n in names):
            continue
        out.append(a)
    return out


if __name__ == "__main__":  # run_seeds starts one process per seed here
    from jaxcifar import cli

    cli.interrupt_exits_quietly()
    cli.run_command(main)
