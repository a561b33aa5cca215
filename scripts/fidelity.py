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

if __name__ == "__main__":  # before the heavy imports: Ctrl-C while they load is one line too
    from jaxcifar import cli

    cli.interrupt_exits_quietly()

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SIGNIFICANT_SE = 2.0  # issue 21: a difference between the sides beyond this many standard errors gets localised


def parse_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def config_from_file(path) -> "ml_collections.ConfigDict":
    """get_config() of a config file such as configs/vgg_fast.py."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("config_file", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def load_config(path: str, width: float, epochs: int, seed: int, overrides: list[str]):
    c = config_from_file(path)
    c.width, c.num_epochs, c.seed = width, epochs, seed
    for item in overrides:
        key, _, value = item.partition("=")
        target = c
        *path_, last = key.split(".")
        for p in path_:
            target = target[p]
        if last not in target:
            raise SystemExit(f"error: --set {item}: the config has no field {key!r}")
        target[last] = parse_value(value)
    return c


class Resumable:
    """One run's per-epoch rows and where its state is checkpointed; refuses a workdir of another run."""

    def __init__(self, workdir: Path, identity: dict, record, stop_after: int | None = None):
        self.workdir, self.identity, self._record = workdir, identity, record
        self.stop_after = stop_after
        self.rows: list[dict] = []

    def epochs(self, num_epochs: int) -> range:
        """The epochs still to train in this process (all, or up to --stop-after)."""
        last = num_epochs if self.stop_after is None else min(num_epochs, self.stop_after)
        return range(len(self.rows) + 1, last + 1)

    def check(self, saved_identity: dict | None) -> None:
        if saved_identity is None:  # e.g. a `python -m jaxcifar.train` workdir
            raise SystemExit(f"error: {self.workdir} holds checkpoints that are not a fidelity run's (a "
                             "jaxcifar.train workdir?); pass another --workdir")
        if saved_identity != self.identity:
            differing = sorted(k for k in set(saved_identity) | set(self.identity)
                               if saved_identity.get(k) != self.identity.get(k))
            raise SystemExit(f"error: {self.workdir} holds the checkpoint of another run (differs in "
                             f"{', '.join(differing)}); pass another --workdir, or delete that one to start afresh")

    def resumed(self, rows: list[dict]) -> None:
        """Rows of the epochs the checkpoint holds; the JSON is rewritten from them (later rows were not saved)."""
        self.rows = list(rows)
        print(f"resumed from {self.workdir} after epoch {len(rows)}", file=sys.stderr, flush=True)
        self._record(self.rows, None)

    def record(self, row: dict) -> None:
        self.rows.append(row)
        self._record(self.rows, row)


def run_jax(config, dataset, train_eval, recompute_at, recompute_batches, run: Resumable):
    import jax
    import numpy as np

    from jaxcifar import checkpoint, evaluate
    from jaxcifar.trainer import Trainer
    from jaxcifar import step as step_lib

    trainer = Trainer(config, dataset)
    state = trainer.init_state()
    ckpt = checkpoint.Checkpointer(run.workdir, keep=2)
    template = checkpoint.to_tree({"train_state": state})
    restored = ckpt.restore(template, check_meta=lambda meta: run.check(meta.get("run")),
                            log=lambda m: print(m, file=sys.stderr), set_aside_damaged=True)
    if restored is not None:
        tree, meta, _ = restored
        state = trainer.place(checkpoint.from_tree(state, tree["train_state"]))
        run.resumed(meta["rows"])
    logits_fn = jax.jit(lambda v, x: trainer.model.apply(v, x, train=False),
                        compiler_options=trainer.compiler_options)

    def accuracy(variables, images, labels, batch=500):
        correct = 0
        for s in range(0, len(labels), batch):
            correct += int((np.asarray(logits_fn(variables, images[s:s + batch])).argmax(-1)
                            == labels[s:s + batch]).sum())
        return 100.0 * correct / len(labels)

    try:
        for epoch in run.epochs(config.num_epochs):
            t0 = time.time()
            state, epoch_metrics, _ = trainer.train_epoch(state, epoch)
            (loss,), (conf,) = trainer.epoch_summary(epoch_metrics)
            train_time = time.time() - t0
            one = step_lib.replica(state, 0)
            variables = {"params": one.params, "batch_stats": one.batch_stats}
            row = epoch_row(epoch, loss, 100.0 * np.trace(conf) / conf.sum(),
                            accuracy(variables, dataset.test_images, dataset.test_labels),
                            accuracy(variables, *train_eval), train_time)
            if epoch in recompute_at:
                fresh = evaluate.recompute_batch_stats(trainer.model, variables, dataset.train_images,
                                                       recompute_batches, config.batch_size)
                row["test_accuracy_recomputed_bn"] = accuracy(fresh, dataset.test_images, dataset.test_labels)
                by_var, by_inverse_std, spread = dropout_statistics(trainer.model, variables, dataset.train_images,
                                                                    recompute_batches, config.batch_size)
                row["test_accuracy_dropout_bn_mean_var"] = accuracy(by_var, dataset.test_images, dataset.test_labels)
                row["test_accuracy_dropout_bn_mean_inverse_std"] = accuracy(by_inverse_std, dataset.test_images,
                                                                            dataset.test_labels)
                row["max_inverse_std_vs_var_relative"] = spread
            run.record(row)
            ckpt.save(int(state.step[0]), checkpoint.to_tree({"train_state": state}),
                      {"run": run.identity, "rows": run.rows})
            ckpt.wait()  # the row is durable only with its state
    finally:
        ckpt.close()


def epoch_row(epoch: int, loss: float, train_accuracy: float, test_accuracy: float, train_images_eval: float,
              train_time: float) -> dict:
    return {"epoch": epoch, "train_loss": float(loss), "train_accuracy": float(train_accuracy),
            "test_accuracy": float(test_accuracy), "gap": float(train_accuracy - test_accuracy),
            "train_images_eval_accuracy": float(train_images_eval), "train_time_s": float(train_time)}


def dropout_statistics(model, variables, images, num_batches: int, batch_size: int, seed: int = 0):
    """BatchNorm statistics of `num_batches` training batches with dropout on, as training sees them, averaged two
    ways: the variance (today's torch and jaxcifar) and, as torch7's 2015 BatchNormalization did, the inverse
    standard deviation. Returns both variable sets and the largest relative difference in the implied std.
    """
    import numpy as np
    from flax import traverse_util

    from jaxcifar import evaluate, trees

    batches = [trees.flat_dict(stats) for stats in evaluate.batch_statistics(
        model, variables, images, num_batches, batch_size, seed, dropout_seed=seed + 1000)]

    def epsilon(path):  # the convolutions' BatchNorm has eps 1e-3, the classifier's 1e-5 (models.py)
        return 1e-3 if "ConvBNReLU" in path else 1e-5

    mean_var, by_inverse_std, spread = {}, {}, 0.0
    for path in batches[0]:
        per_batch = [np.asarray(b[path]) for b in batches]
        mean_var[path] = by_inverse_std[path] = np.mean(np.stack(per_batch), 0)
        if path.endswith("/var"):
            eps = epsilon(path)
            inverse_std = np.mean([1 / np.sqrt(v + eps) for v in per_batch], 0)
            by_inverse_std[path] = torch7_var = 1 / inverse_std ** 2 - eps
            spread = max(spread, float(np.max(np.abs(np.sqrt(torch7_var + eps) / np.sqrt(mean_var[path] + eps) - 1))))
    mean_var, by_inverse_std = (traverse_util.unflatten_dict(t, sep="/") for t in (mean_var, by_inverse_std))
    return ({"params": variables["params"], "batch_stats": mean_var},
            {"params": variables["params"], "batch_stats": by_inverse_std}, spread)


class JaxStream:
    """jaxcifar's data order, flips and initialization for `config.seed`, for the PyTorch side to replay."""

    def __init__(self, config, num_examples: int):
        import jax

        from jaxcifar import batches
        from jaxcifar import step as step_lib

        self.config, self.n = config, num_examples
        self.rng = jax.random.key_data(jax.random.key(config.seed))
        self._order = jax.jit(step_lib.epoch_order, static_argnums=(2, 3))
        self._flips = jax.jit(lambda rng, step: batches.flip_mask(step_lib.step_keys_at(rng, step)[0], config.batch_size,
                                                               config.flip))

    def order(self, epoch):
        import numpy as np

        return np.asarray(self._order(self.rng, epoch, self.n, self.config.batch_size))

    def flips(self, step):
        import numpy as np

        return np.asarray(self._flips(self.rng, step))

    def initial_variables(self):
        from jaxcifar import step as step_lib

        model = step_lib.build_model(self.config)
        state = step_lib.init_train_state(self.config.seed, model, step_lib.build_optimizer(self.config, 1), (32, 32, 3))
        return state.params, state.batch_stats


def run_torch(config, dataset, train_eval, recompute_at, recompute_batches, run: Resumable, same_stream=False):
    import numpy as np

    from jaxcifar import torch_reference

    stream = JaxStream(config, len(dataset.train_labels)) if same_stream else None
    port = torch_reference.Run(config, dataset.train_images, dataset.train_labels, config.seed, stream=stream)
    if stream is not None:
        port.load_flax(*stream.initial_variables())
    saved = run.workdir / "state.npz"
    if saved.exists():
        with np.load(saved, allow_pickle=False) as arrays:
            meta = json.loads(str(arrays["meta"]))
            run.check(meta.get("run"))
            port.load_state_arrays(arrays)
        run.resumed(meta["rows"])
    for epoch in run.epochs(config.num_epochs):
        t0 = time.time()
        stats = port.train_epoch()
        train_time = time.time() - t0
        row = epoch_row(epoch, stats["loss"], stats["accuracy"], port.accuracy(dataset.test_images, dataset.test_labels),
                        port.accuracy(*train_eval), train_time)
        if epoch in recompute_at:
            row["test_accuracy_recomputed_bn"] = port.recompute_bn_accuracy(
                dataset.test_images, dataset.test_labels, recompute_batches)
        run.record(row)
        run.workdir.mkdir(parents=True, exist_ok=True)
        tmp = saved.with_suffix(".tmp")
        with open(tmp, "wb") as f:  # arrays and a JSON string only: np.load needs no pickle
            np.savez(f, meta=np.array(json.dumps({"run": run.identity, "rows": run.rows})), **port.state_arrays())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, saved)


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def table(paths: list[str]) -> str:
    """A markdown table of each run's last epoch, then the mean of each (side, width, variant, epochs) group."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    lines = ["| side | width | variant | seed | epochs | train loss | train acc (train mode) | eval acc, train images | "
             "eval acc, test | gap (train mode - test) | test, BN re-estimated without dropout | "
             "test, dropout-on BN stats: mean var / mean inverse std (torch7) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def cell(row, key):
        return f"{row[key]:.2f}" if key in row else ""

    groups: dict = {}
    for r in sorted(runs, key=lambda r: (r["width"], r["side"], r["variant"], r["seed"])):
        last = r["epochs"][-1]
        epochs = f"{last['epoch']}" if last["epoch"] == r["num_epochs"] else f"{last['epoch']} of {r['num_epochs']}"
        key = (r["side"], r["width"], r["variant"], epochs)
        groups.setdefault(key, []).append(last)
        torch7 = (f"{cell(last, 'test_accuracy_dropout_bn_mean_var')} / "
                  f"{cell(last, 'test_accuracy_dropout_bn_mean_inverse_std')}"
                  if "test_accuracy_dropout_bn_mean_var" in last else "")
        lines.append(f"| {r['side']} | {r['width']:g} | {r['variant']} | {r['seed']} | {epochs} | "
                     f"{last['train_loss']:.4f} | {last['train_accuracy']:.2f} | "
                     f"{last['train_images_eval_accuracy']:.2f} | {last['test_accuracy']:.2f} | "
                     f"{last['train_accuracy'] - last['test_accuracy']:+.2f} | "
                     f"{cell(last, 'test_accuracy_recomputed_bn')} | {torch7} |")
    for (side, width, variant, epochs), rows in groups.items():
        if len(rows) < 2:
            continue

        def mean(k):
            values = [r[k] for r in rows if k in r]
            return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""

        gap = statistics.mean(r["train_accuracy"] - r["test_accuracy"] for r in rows)
        lines.append(f"| **{side}** | **{width:g}** | **{variant}** | mean ± std of {len(rows)} | {epochs} | "
                     f"{statistics.mean(r['train_loss'] for r in rows):.4f} | {mean('train_accuracy')} | "
                     f"{mean('train_images_eval_accuracy')} | {mean('test_accuracy')} | {gap:+.2f} | "
                     f"{mean('test_accuracy_recomputed_bn')} | |")
    return "\n".join(lines)


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
    """This script once per seed, `jobs` processes at a time (one thread each): K independent runs."""
    if "{seed}" not in out:
        raise SystemExit("error: with --seeds, --out needs a {seed} placeholder, e.g. results/fidelity/jax-s{seed}.json")
    base = drop_options(argv, ("--seeds", "--jobs", "--out", "--seed", "--workdir"))
    pending = [[sys.executable, __file__, *base, "--seed", str(k), "--out", out.format(seed=k)] for k in seeds]
    running, failed = [], []
    while pending or running:
        while pending and len(running) < jobs:
            running.append(subprocess.Popen(pending.pop(0)))
        time.sleep(2)
        for proc in [p for p in running if p.poll() is not None]:
            running.remove(proc)
            if proc.returncode:
                failed.append(" ".join(proc.args[2:]))
    for f in failed:
        print(f"error: failed: {f}", file=sys.stderr)
    return 1 if failed else 0


def drop_options(argv: list[str], names: tuple[str, ...]) -> list[str]:
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


def gap_groups(paths: list[str], window: tuple[int, int], num_epochs: int | None = None) -> dict:
    """(side, width, variant, num_epochs) -> [(seed, G, last test accuracy, last epoch)] of the runs through the
    window (and of that schedule length, if given); G is the mean over the window's epochs of train-mode training
    accuracy - eval-mode test accuracy."""
    groups: dict = {}
    for p in paths:
        r = json.loads(Path(p).read_text())
        if num_epochs is not None and r["num_epochs"] != num_epochs:
            continue
        g = window_gap(r["epochs"], window)
        if g is None:
            continue  # not yet through the window
        last = r["epochs"][-1]
        key = (r["side"], r["width"], r["variant"], r["num_epochs"])
        groups.setdefault(key, []).append((r["seed"], g, last["test_accuracy"], last["epoch"]))
    for runs in groups.values():
        runs.sort()
    return groups


def window_gap(epochs: list[dict], window: tuple[int, int]) -> float | None:
    """G of one run: the mean over the window's epochs of train-mode training accuracy - eval-mode test accuracy
    (None before the run is through the window)."""
    lo, hi = window
    rows = {e["epoch"]: e for e in epochs}
    if not all(e in rows for e in range(lo, hi + 1)):
        return None
    return statistics.mean(rows[e]["train_accuracy"] - rows[e]["test_accuracy"] for e in range(lo, hi + 1))


def side_difference(jax_values: list[float], torch_values: list[float]) -> tuple[float, float | None]:
    """jax - torch of the means, and its standard error (independent samples; None with one value a side)."""
    (mj, sj), (mt, st) = mean_se(jax_values), mean_se(torch_values)
    return mj - mt, (sj ** 2 + st ** 2) ** 0.5 if sj is not None and st is not None else None


def beyond_criterion(diff: float, se: float | None) -> bool:
    """Whether a difference lies beyond SIGNIFICANT_SE of its standard errors (never without one)."""
    return bool(se) and abs(diff / se) > SIGNIFICANT_SE


def mean_se(values: list[float]) -> tuple[float, float | None]:
    """Mean and standard error of the mean (None for a single value)."""
    if len(values) < 2:
        return values[0], None
    return statistics.mean(values), statistics.stdev(values) / len(values) ** 0.5


def _fmt(mean: float, se: float | None, sign: str = "") -> str:
    return f"{mean:{sign}.2f}" if se is None else f"{mean:{sign}.2f} ± {se:.2f}"


def _epochs_done(runs: list, num_epochs: int) -> str:
    """'10' when every run finished, else e.g. '6/10 of 10': the last test accuracies are from those epochs."""
    done = {e for *_, e in runs}
    return f"{num_epochs}" if done == {num_epochs} else "/".join(str(e) for e in sorted(done)) + f" of {num_epochs}"


def gap_summary(paths: list[str], window: tuple[int, int], num_epochs: int | None = None) -> str:
    """G per seed and the final test accuracy, mean +- standard error per (side, width, variant, epochs) group;
    then, where both sides ran a variant with two or more seeds, the difference jax - torch in standard errors."""
    lo, hi = window
    groups = gap_groups(paths, window, num_epochs)
    lines = [f"| side | width | variant | epochs | seeds | G per seed (epochs {lo}-{hi}) | G mean ± s.e. | "
             "test accuracy at the last epoch, mean ± s.e. |", "|---|---|---|---|---|---|---|---|"]
    for (side, width, variant, epochs), runs in sorted(groups.items(), key=lambda kv: (kv[0][1:], kv[0][0])):
        gaps, tests = [g for _, g, _, _ in runs], [t for _, _, t, _ in runs]
        lines.append(f"| {side} | {width:g} | {variant} | {_epochs_done(runs, epochs)} | {len(runs)} | "
                     f"{' / '.join(f'{g:.1f}' for g in gaps)} | {_fmt(*mean_se(gaps))} | {_fmt(*mean_se(tests))} |")
    pairs = [(key, runs, groups[("torch", *key[1:])]) for key, runs in sorted(groups.items())
             if key[0] == "jax" and len(runs) > 1 and len(groups.get(("torch", *key[1:]), [])) > 1]
    if pairs:
        lines += ["", "| width | variant | epochs | seeds jax / torch | G: jax - torch | in standard errors | "
                      f"last test accuracy: jax - torch | in standard errors | beyond {SIGNIFICANT_SE:g} s.e. |",
                  "|---|---|---|---|---|---|---|---|---|"]
    for (_, width, variant, epochs), j, t in pairs:
        cells, beyond = [], []
        for column, name in ((1, "G"), (2, "test accuracy")):
            diff, se = side_difference([r[column] for r in j], [r[column] for r in t])
            cells += [_fmt(diff, se, "+"), f"{diff / se:+.1f}" if se else "-"]
            if beyond_criterion(diff, se):
                beyond.append(name)
        lines.append(f"| {width:g} | {variant} | {_epochs_done(j + t, epochs)} | {len(j)} / {len(t)} | "
                     f"{' | '.join(cells)} | {', '.join(beyond) or 'none'} |")
    return "\n".join(lines)


def final_accuracy_comparison(paths: list[str], num_epochs: int, tolerance: float = 1.0) -> str:
    """Finished runs of a num_epochs schedule, where both sides have one: last test accuracy per side (mean over
    seeds), jax - torch, the same with BatchNorm statistics re-estimated, and whether they are more than
    `tolerance` points apart (issue 21's criterion for the whole schedule, where a seed a side is what fits)."""
    groups: dict = {}
    for p in paths:
        r = json.loads(Path(p).read_text())
        if r["num_epochs"] == num_epochs and r["epochs"] and r["epochs"][-1]["epoch"] == num_epochs:
            groups.setdefault((r["width"], r["variant"]), {}).setdefault(r["side"], []).append(r["epochs"][-1])
    lines = [f"| width | variant | epochs | seeds jax / torch | last test accuracy: jax | torch | jax - torch | "
             f"test, BN re-estimated: jax - torch | more than {tolerance:g} point apart |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (width, variant), sides in sorted(groups.items()):
        if not ("jax" in sides and "torch" in sides):
            continue

        def mean(side, key):
            values = [row[key] for row in sides[side] if key in row]
            return statistics.mean(values) if len(values) == len(sides[side]) else None

        test_jax, test_torch = mean("jax", "test_accuracy"), mean("torch", "test_accuracy")
        recomputed_jax, recomputed_torch = (mean(s, "test_accuracy_recomputed_bn") for s in ("jax", "torch"))
        recomputed = (recomputed_jax - recomputed_torch
                      if recomputed_jax is not None and recomputed_torch is not None else None)
        apart = [name for name, d in (("test", test_jax - test_torch), ("re-estimated", recomputed))
                 if d is not None and abs(d) > tolerance]
        lines.append(f"| {width:g} | {variant} | {num_epochs} | {len(sides['jax'])} / {len(sides['torch'])} | "
                     f"{test_jax:.2f} | {test_torch:.2f} | {test_jax - test_torch:+.2f} | "
                     f"{'' if recomputed is None else f'{recomputed:+.2f}'} | {', '.join(apart) or 'no'} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def default_workdir(out: Path) -> Path:
    from jaxcifar import cache

    return Path(cache.default_cache_dir()) / "fidelity" / out.stem


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
    args = p.parse_args(argv)
    if args.table:
        print(table(args.table))
        return 0
    if args.gaps:
        lo, _, hi = args.window.partition("-")
        print(gap_summary(args.gaps, (int(lo), int(hi or lo))))
        return 0
    if not (args.side and args.out):
        p.error("--side and --out are required to run")
    check_run_args(args)
    if args.seeds:
        return run_seeds(argv, parse_seeds(args.seeds), args.out, args.jobs)

    if args.side == "jax" and args.threads == 1:  # must precede JAX's start
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1").strip()
    from jaxcifar import cache

    config = load_config(args.config, args.width, args.epochs, args.seed, args.set)
    if args.archive:
        config.data.archive = args.archive
    if args.side == "torch":
        import torch

        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    variant = args.variant or ",".join(args.set + (["same-stream"] if args.same_stream else [])) or "recipe"
    workdir = Path(args.workdir) if args.workdir else default_workdir(out)
    # What makes a checkpoint this run's: a resume under any other of these would splice two runs.
    identity = {"side": args.side, "variant": variant, "seed": args.seed, "width": args.width,
                "num_epochs": args.epochs, "config": config.to_dict(), "same_stream": args.same_stream,
                "train_eval_images": args.train_eval_images, "recompute_bn_batches": args.recompute_bn_batches}
    identity["config"]["data"] = {k: v for k, v in identity["config"]["data"].items() if k == "preprocess"}
    dataset = cache.load_dataset(config, log=lambda m: print(m, file=sys.stderr))
    n = args.train_eval_images
    train_eval = (dataset.train_images[:n], dataset.train_labels[:n])
    recompute_at = recompute_epochs(args.recompute_at, args.epochs)
    result = {"side": args.side, "variant": variant, "seed": args.seed,
              "config_file": os.path.relpath(args.config, REPO), "overrides": args.set, "width": args.width,
              "num_epochs": args.epochs, "threads": args.threads, "commit": git_commit(), "cpu": cpu_name(),
              "train_eval_images": n, "recompute_bn_batches": args.recompute_bn_batches, "config": config.to_dict(),
              "epochs": []}

    def record(rows, row):
        result["epochs"] = rows
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, out)
        if row is None:
            return
        extra = "".join(f" {k.replace('test_accuracy_', '')} {row[k]:.2f}" for k in row
                        if k.startswith("test_accuracy_") or k.startswith("max_"))
        print(f"[{args.side} s{args.seed} {variant}] epoch {row['epoch']}: train loss {row['train_loss']:.4f} "
              f"acc {row['train_accuracy']:.2f} | eval train-images {row['train_images_eval_accuracy']:.2f} "
              f"test {row['test_accuracy']:.2f} | G {row['gap']:+.2f}{extra} ({row['train_time_s']:.0f} s)", flush=True)

    run = Resumable(workdir, identity, record, args.stop_after)
    if args.side == "jax":
        run_jax(config, dataset, train_eval, recompute_at, args.recompute_bn_batches, run)
    else:
        run_torch(config, dataset, train_eval, recompute_at, args.recompute_bn_batches, run, args.same_stream)
    return 0


def cpu_name() -> str:
    """The processor's model name (the CPU changes between sessions and sets the speed)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    from jaxcifar import cli

    cli.run_command(main)
