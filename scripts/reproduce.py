"""Run configs x seeds, keep one JSON per run under results/, and rebuild the README's results and benchmark tables.

    python scripts/reproduce.py --configs vgg_fast,vgg --seeds 0,1,2 [--together] [--archive PATH] [--results results]
    python scripts/reproduce.py --from-workdir runs/vgg_fast-s0 --config-name vgg_fast
    python scripts/reproduce.py --table-only
    python scripts/reproduce.py --add-evaluation results/vgg_fast-seed0-cpu.json runs/eval-bn100.json

Each result holds the final-epoch accuracy of every seed the run trained (never the best epoch),
the per-epoch curve, wall time, images/s, device, versions, commit and the full config. With
--together the seeds of a config train at once in one program (--config.seeds) and share one
result file. The README table is regenerated from those files alone (mean +- std over all seeds),
so every number in it comes from a run.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from jaxcifar.run import files, results as results_lib
from jaxcifar.tools import pages

REPO = Path(__file__).resolve().parents[1]


def run_config(name: str, seeds: list[int], workdir: Path, extra: list[str]) -> float:
    seed_flag = f"--config.seed={seeds[0]}" if len(seeds) == 1 else f"--config.seeds={','.join(map(str, seeds))}"
    cmd = [sys.executable, "-m", "jaxcifar.train", "--config", str(REPO / "configs" / f"{name}.py"),
           "--workdir", str(workdir), seed_flag, *extra]
    print("+", " ".join(cmd), flush=True)
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO)
    # SIGTERM and SIGHUP reach this process alone (not its group, as Ctrl-C does): passed on, the training saves and
    # stops, and this waits for it; before, this exited at once and left the training running, holding its lock.
    forwarded = {sig: signal.signal(sig, lambda signum, frame: proc.send_signal(signum))
                 for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        # Ctrl-C reached the training too (one process group); it stops after saving, as it promises: wait for that
        # (subprocess.run would kill it a quarter of a second later, before its save). A second Ctrl-C kills it.
        print("reproduce: interrupted; waiting for the training to save (the same command resumes it)", file=sys.stderr,
              flush=True)
        try:
            proc.wait()
        finally:
            proc.kill()
        raise
    finally:
        for sig, previous in forwarded.items():
            signal.signal(sig, previous)
    if code in (129, 130, 143):  # SIGHUP, SIGINT, SIGTERM: it said so above, and saved
        print(f"reproduce: training {name} was stopped in {workdir}; the same command resumes it", file=sys.stderr)
        raise SystemExit(code)
    if code:  # its own message is above; the runs before it have their results written
        raise SystemExit(f"error: training {name} (seeds {','.join(map(str, seeds))}) in {workdir} ended with exit "
                         f"code {code} (its message is above); no result was written for it")
    return time.time() - t0


def result_from_workdir(workdir: Path, config_name: str, wall_time_s: float | None = None) -> dict:
    from jaxcifar.run import checkpoint

    if not (workdir / "metrics.jsonl").is_file():
        raise SystemExit(f"error: {workdir} has no metrics.jsonl: give the --workdir of a run of python -m "
                         "jaxcifar.train")
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    if not records:
        raise SystemExit(f"error: {workdir} has no finished epochs")
    _, meta, _ = checkpoint.read_saved(workdir)  # a damaged save: CheckpointError, one line from cli.run_command
    if not records[-1].get("seeds") and meta.get("seeds"):
        records[-1] = dict(records[-1], seeds=meta["seeds"])
    return results_lib.run_result(records, meta["config"], config_name, workdir, wall_time_s)


def write_atomically(path: Path, text: str) -> None:
    """`text` in `path`, whole or not at all (a truncated result or README would be a results file lost, or a page
    every later rebuild fails on)."""
    files.atomic_write(path, text.encode(), then=f"run the same command again ({path.name} is as it was)")


def add_evaluation(result_path: Path, evaluation_path: Path) -> dict:
    """The result at `result_path` with the test accuracy that `python -m jaxcifar.evaluate --recompute-bn-stats N
    --json EVALUATION` measured on the same run's final epoch (BatchNorm statistics re-estimated, a diagnostic);
    anything else is refused, naming what differs."""
    give = "give the file that scripts/reproduce.py or python -m jaxcifar.evaluate --json wrote"
    result, evaluation = (files.read_json(p, give) for p in (result_path, evaluation_path))
    seeds = evaluation.get("seeds", [evaluation.get("seed")])
    workdir = Path(str(evaluation.get("workdir")))
    problems = [problem for problem, ok in (
        (f"its split is {evaluation.get('split')!r}, not 'test'", evaluation.get("split") == "test"),
        ("it ran without --recompute-bn-stats", evaluation.get("recomputed_bn_batches")),
        (f"its workdir is {workdir}, not {result['workdir']}", workdir.resolve() == Path(result["workdir"]).resolve()),
        (f"its epoch is {evaluation.get('epoch')}, not {result['epochs_completed']}",
         evaluation.get("epoch") == result["epochs_completed"]),
        (f"its seeds are {seeds}, not {result['seeds']}", seeds == result["seeds"])) if not ok]
    if problems:
        raise SystemExit(f"error: {evaluation_path} is not an evaluation of {result_path}'s final epoch with "
                         f"re-estimated BatchNorm statistics: {'; '.join(problems)}; run python -m jaxcifar.evaluate "
                         f"--workdir {result['workdir']} --recompute-bn-stats 100 --json PATH and pass PATH")
    per_seed = evaluation.get("per_seed", [evaluation])
    result["recomputed_bn"] = {"batches": evaluation["recomputed_bn_batches"], "step": evaluation["step"],
                               "test_accuracies": [r["accuracy"] for r in per_seed]}
    write_atomically(Path(result_path), json.dumps(result, indent=1) + "\n")
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="vgg_fast", help="comma-separated names of configs/*.py")
    p.add_argument("--seeds", default="0", help="comma-separated seeds")
    p.add_argument("--together", action="store_true",
                   help="train a config's seeds at once in one program (--config.seeds), one result file")
    p.add_argument("--results", default=str(REPO / "results"))
    p.add_argument("--runs-dir", default=str(REPO / "runs"))
    p.add_argument("--archive", help="cifar-10-binary.tar.gz for offline preparation")
    p.add_argument("--num-epochs", type=int, help="override every config's num_epochs (smoke runs)")
    p.add_argument("--from-workdir", help="write the result of an existing workdir instead of training")
    p.add_argument("--config-name", help="with --from-workdir: the config's name")
    p.add_argument("--table-only", action="store_true", help="only rebuild the generated blocks of README.md and docs/")
    p.add_argument("--no-readme", action="store_true", help="do not touch README.md and docs/")
    p.add_argument("--add-evaluation", nargs=2, metavar=("RESULT", "EVALUATION"),
                   help="add to RESULT (results/*.json) the accuracy with re-estimated BatchNorm statistics that "
                        "`python -m jaxcifar.evaluate --recompute-bn-stats N --json EVALUATION` wrote for its final epoch")
    args = p.parse_args(argv)
    if args.table_only and args.no_readme:
        p.error("--table-only with --no-readme does nothing: drop one of them")
    if args.num_epochs is not None and args.num_epochs < 1:
        p.error(f"--num-epochs {args.num_epochs} must be at least 1")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s]
    except ValueError:
        p.error(f"--seeds {args.seeds}: give comma-separated integers, e.g. 0,1,2")
    results_dir = Path(args.results)
    if args.add_evaluation:
        result = add_evaluation(*map(Path, args.add_evaluation))
        bn = result["recomputed_bn"]
        print(f"{args.add_evaluation[0]}: added the test accuracy with BatchNorm statistics re-estimated from "
              f"{bn['batches']} batches, {pages.mean_std(bn['test_accuracies'])} (final: "
              f"{pages.mean_std(result['final_test_accuracies'])})")
    elif args.from_workdir:
        if not args.config_name:
            p.error("--from-workdir needs --config-name")
        print(results_lib.write_result(result_from_workdir(Path(args.from_workdir), args.config_name), results_dir))
    elif not args.table_only:
        extra = [f"--config.data.archive={args.archive}"] if args.archive else []
        if args.num_epochs is not None:
            extra.append(f"--config.num_epochs={args.num_epochs}")
        names = [c for c in args.configs.split(",") if c]
        missing = [name for name in names if not (REPO / "configs" / f"{name}.py").exists()]
        if missing:  # before any training: not after hours of the configs listed first
            p.error(f"no config configs/{missing[0]}.py")
        for name in names:
            for group in [seeds] if args.together else [[s] for s in seeds]:
                workdir = Path(args.runs_dir) / f"{name}-s{'-'.join(map(str, group))}"
                wall = run_config(name, group, workdir, extra)
                # Written as soon as the run ends: a session cut short keeps every finished run.
                print(results_lib.write_result(result_from_workdir(workdir, name, wall), results_dir), flush=True)
    if not args.no_readme:
        changed = pages.update_docs(results_dir)
        print(f"rebuilt from {results_dir}: " + (", ".join(str(p.relative_to(REPO)) for p in changed) or "nothing changed"))
    return 0


if __name__ == "__main__":
    from jaxcifar import cli

    cli.run_command(main)
