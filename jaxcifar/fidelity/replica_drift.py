"""Does replica k of a `--config.seeds` program follow the single run of seed k? A per-step comparison on real data.

    python scripts/replica_drift.py --seeds 2,3 --steps 40 --out results/replicas/drift-w0.25.json

For each seed, three programs train from the same state, one update per call, side by side:
  replica   - the K-replica program (vmap over the seeds), replica k;
  single    - the plain single run of seed k;
  control   - the single run built another way that computes the same function (`--control bn_grad=autodiff`
              by default): its distance from `single` is what rounding alone does to this run.
Per step it records each program's loss and the relative parameter distance (|a - b| / |b - start|) of
replica and control from single. A different random stream (order, flips, dropout) shows at the first
step as an O(1e-2) loss difference; rounding starts at ~1e-7 and grows, as the control's does.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
from pathlib import Path

import numpy as np

from jaxcifar import errors
from jaxcifar.run import machine

REPO = Path(__file__).resolve().parents[2]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/replica_drift.py", description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(REPO / "configs/vgg_fast.py"))
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--seeds", default="2,3")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--control", default="bn_grad=autodiff", help="FIELD=VALUE: the same function built another way")
    p.add_argument("--leaves-at", type=int, default=2, help="at this step, also each parameter leaf's difference")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    for flag, value in (("--steps", args.steps), ("--threads", args.threads)):
        if value < 1:
            raise SystemExit(f"error: {flag} {value} must be at least 1")
    if args.threads == 1:
        machine.use_one_thread()  # before JAX's backend starts
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        raise SystemExit(f"error: --seeds {args.seeds}: give seeds as 2,3") from None
    try:
        programs = Programs.build(args.config, args.width, seeds, args.control)
    except errors.JaxcifarError as e:
        raise SystemExit(f"error: {e}") from None
    rows = []
    for step in range(1, args.steps + 1):
        row = programs.step(step)
        if step == args.leaves_at:
            row["leaves"] = programs.leaf_differences(0)
            print("largest per-leaf relative differences, replica - single, seed", seeds[0], ":",
                  "; ".join(f"{k} {v:.1e}" for k, v in list(row["leaves"].items())[:6]), flush=True)
        rows.append(row)
        say_step(row)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config_file": os.path.relpath(args.config, REPO), "width": args.width, "seeds": seeds,
                               "control": args.control, "cpu": machine.cpu_name(),
                               "commit": machine.git_commit(short=True) or "unknown", "steps_per_call": 1,
                               "rows": rows}, indent=1))
    last = rows[-1]["per_seed"]
    print(f"replica drift: {args.steps} steps of seeds {args.seeds}; at the last, parameters replica - single "
          f"{max(r['params_replica_vs_single'] or 0 for r in last):.1e} and control - single "
          f"{max(r['params_control_vs_single'] or 0 for r in last):.1e} at most (relative); {out}", flush=True)
    return 0


@dataclasses.dataclass
class Programs:
    """The three programs of each seed, their states and metrics, and where the singles started."""

    seeds: list[int]
    multi: object
    single: object
    control: object
    states: dict  # "multi" -> one state; "single", "control" -> a state per seed
    metrics: dict
    orders: dict
    start_trees: list  # the singles' initial parameters, numpy trees

    @functools.cached_property
    def start_vectors(self) -> list:
        """`start_trees` flat, computed once (every step measures the distance travelled from them)."""
        from jaxcifar.run import trees

        return [trees.flat_vector(t) for t in self.start_trees]

    @classmethod
    def build(cls, config_file: str, width: float, seeds: list[int], control_change: str) -> "Programs":
        import jax

        from jaxcifar.data import cache
        from jaxcifar.nn import step as step_lib
        from jaxcifar.fidelity import runs
        from jaxcifar.run.trainer import Trainer

        def config(*overrides, flag="--set"):
            return runs.recipe_config(config_file, width, 10, seeds[0], ["steps_per_call=1", *overrides], flag)

        control_config = config(control_change, flag="--control")  # first: refused before the data loads
        dataset = cache.load_dataset(config(), log=lambda m: print(m, file=sys.stderr))
        shape = dataset.train_images.shape[1:]
        multi = Trainer(config(f"seeds={','.join(map(str, seeds))}"), dataset)
        single, control = Trainer(config(), dataset), Trainer(control_config, dataset)
        states = {"multi": multi.init_state()}
        for name, t in (("single", single), ("control", control)):
            states[name] = [t.place(step_lib.init_replicas([s], t.model, t.tx, shape)) for s in seeds]
        metrics = {"multi": multi.zero_metrics(), "single": [single.zero_metrics() for _ in seeds],
                   "control": [control.zero_metrics() for _ in seeds]}
        orders = {"multi": multi.epoch_order(states["multi"].key_data, 1),
                  "single": [single.epoch_order(s.key_data, 1) for s in states["single"]]}
        for k in range(len(seeds)):  # the same batches: the stream is the seed's
            assert np.array_equal(np.asarray(orders["multi"][k]), np.asarray(orders["single"][k][0])), seeds[k]
        start_trees = [jax.tree_util.tree_map(np.asarray, step_lib.replica(s.params, 0)) for s in states["single"]]
        return cls(seeds, multi, single, control, states, metrics, orders, start_trees)

    def step(self, step: int) -> dict:
        """One update of every program; the row of losses and parameter distances from the singles."""
        from jaxcifar.run import trees
        from jaxcifar.nn import step as step_lib

        s, m = self.states, self.metrics
        s["multi"], m["multi"] = self.multi.run_steps(s["multi"], m["multi"], self.orders["multi"], 1)
        row = {"step": step, "per_seed": []}
        for k, seed in enumerate(self.seeds):
            order = self.orders["single"][k]
            s["single"][k], m["single"][k] = self.single.run_steps(s["single"][k], m["single"][k], order, 1)
            s["control"][k], m["control"][k] = self.control.run_steps(s["control"][k], m["control"][k], order, 1)
            want = trees.flat_vector(s["single"][k].params)
            travelled = np.linalg.norm(want - self.start_vectors[k])

            def distance(params):  # relative to the distance travelled (None before the first update moves anything)
                return float(np.linalg.norm(trees.flat_vector(params) - want) / travelled) if travelled else None

            loss_s = float(m["single"][k]["last_loss"][0])
            row["per_seed"].append({
                "seed": seed, "loss_single": loss_s,
                "loss_replica_minus_single": float(m["multi"]["last_loss"][k]) - loss_s,
                "loss_control_minus_single": float(m["control"][k]["last_loss"][0]) - loss_s,
                "params_replica_vs_single": distance(step_lib.replica(s["multi"].params, k)),
                "params_control_vs_single": distance(s["control"][k].params)})
        return row

    def leaf_differences(self, k: int) -> dict:
        """{leaf: |replica - single| / |single - start|} of seed k's parameter leaves, largest first."""
        from jaxcifar.run import trees
        from jaxcifar.nn import step as step_lib

        got = trees.flat_dict(step_lib.replica(self.states["multi"].params, k))
        want = trees.flat_dict(step_lib.replica(self.states["single"][k].params, 0))
        start = trees.flat_dict(self.start_trees[k])
        out = {}
        for path, g in got.items():
            w = np.asarray(want[path])
            moved = np.linalg.norm(w - np.asarray(start[path]))
            if moved > 0:
                out[path] = float(np.linalg.norm(np.asarray(g) - w) / moved)
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def say_step(row: dict) -> None:
    mean_gap = abs(np.mean([r["loss_replica_minus_single"] for r in row["per_seed"]]))
    print(f"step {row['step']}: |mean loss, replicas - singles| {mean_gap:.2e}; per seed (replica, control) - single: "
          + "; ".join(f"s{r['seed']} loss {r['loss_replica_minus_single']:+.1e} / {r['loss_control_minus_single']:+.1e}"
                      f" params {r['params_replica_vs_single'] or 0:.1e} / {r['params_control_vs_single'] or 0:.1e}"
                      for r in row["per_seed"]), flush=True)
