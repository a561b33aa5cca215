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

if __name__ == "__main__":  # before the heavy imports: Ctrl-C while they load is one line too
    from jaxcifar import cli

    cli.interrupt_exits_quietly()

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(REPO / "configs/vgg_fast.py"))
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--seeds", default="2,3")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--control", default="bn_grad=autodiff", help="FIELD=VALUE: the same function built another way")
    p.add_argument("--leaves-at", type=int, default=2, help="at this step, also each parameter leaf's difference")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.threads == 1:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1").strip()
    import jax
    import numpy as np

    sys.path.insert(0, str(REPO / "scripts"))
    import fidelity

    from jaxcifar import cache, trees
    from jaxcifar import step as step_lib
    from jaxcifar.trainer import Trainer

    seeds = [int(s) for s in args.seeds.split(",")]
    field, _, value = args.control.partition("=")

    def config(**fields):
        c = fidelity.load_config(args.config, args.width, 10, seeds[0], [])
        c.steps_per_call = 1
        for k, v in fields.items():
            c[k] = v
        return c

    dataset = cache.load_dataset(config(), log=lambda m: print(m, file=sys.stderr))
    multi = Trainer(config(seeds=args.seeds), dataset)
    single = Trainer(config(), dataset)
    control = Trainer(config(**{field: fidelity.parse_value(value)}), dataset)

    state_m, metrics_m = multi.init_state(), multi.zero_metrics()
    singles = [single.place(step_lib.init_replicas([s], single.model, single.tx, (32, 32, 3))) for s in seeds]
    controls = [control.place(step_lib.init_replicas([s], control.model, control.tx, (32, 32, 3))) for s in seeds]
    starts = [trees.flat_vector(s.params) for s in singles]
    starts_tree = [jax.tree_util.tree_map(np.asarray, step_lib.replica(s.params, 0)) for s in singles]

    def leaf_differences(got, want, start) -> dict:
        """{leaf: |got - want| / |want - start|} over the parameter leaves, largest first."""
        out = {}
        want, start = trees.flat_dict(want), trees.flat_dict(start)
        for path, g in trees.flat_dict(got).items():
            w = np.asarray(want[path])[0] if np.ndim(want[path]) == np.ndim(g) + 1 else np.asarray(want[path])
            moved = np.linalg.norm(w - start[path])
            if moved > 0:
                out[path] = float(np.linalg.norm(np.asarray(g) - w) / moved)
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))
    metrics_s = [single.zero_metrics() for _ in seeds]
    metrics_c = [control.zero_metrics() for _ in seeds]
    order_m = multi.epoch_order(state_m.key_data, 1)
    orders = [single.epoch_order(s.key_data, 1) for s in singles]
    for k in range(len(seeds)):  # the same batches: the stream is the seed's
        assert np.array_equal(np.asarray(order_m[k]), np.asarray(orders[k][0])), seeds[k]
    rows = []
    for step in range(1, args.steps + 1):
        state_m, metrics_m = multi.run_steps(state_m, metrics_m, order_m, 1)
        row = {"step": step, "per_seed": []}
        for k in range(len(seeds)):
            singles[k], metrics_s[k] = single.run_steps(singles[k], metrics_s[k], orders[k], 1)
            controls[k], metrics_c[k] = control.run_steps(controls[k], metrics_c[k], orders[k], 1)
            want = trees.flat_vector(singles[k].params)
            travelled = np.linalg.norm(want - starts[k])
            loss_s = float(metrics_s[k]["last_loss"][0])
            row["per_seed"].append({
                "seed": seeds[k], "loss_single": loss_s,
                "loss_replica_minus_single": float(metrics_m["last_loss"][k]) - loss_s,
                "loss_control_minus_single": float(metrics_c[k]["last_loss"][0]) - loss_s,
                # relative to the distance travelled (None before the first update moves anything: lr starts at 0)
                "params_replica_vs_single": (float(np.linalg.norm(trees.flat_vector(step_lib.replica(state_m.params, k)) - want)
                                                   / travelled) if travelled else None),
                "params_control_vs_single": (float(np.linalg.norm(trees.flat_vector(controls[k].params) - want) / travelled)
                                             if travelled else None)})
        if step == args.leaves_at:
            row["leaves"] = leaf_differences(step_lib.replica(state_m.params, 0), singles[0].params, starts_tree[0])
            print("largest per-leaf relative differences, replica - single, seed", seeds[0], ":",
                  "; ".join(f"{k} {v:.1e}" for k, v in list(row["leaves"].items())[:6]), flush=True)
        rows.append(row)
        mean_gap = abs(np.mean([r["loss_replica_minus_single"] for r in row["per_seed"]]))
        print(f"step {step}: |mean loss, replicas - singles| {mean_gap:.2e}; per seed (replica, control) - single: "
              + "; ".join(f"s{r['seed']} loss {r['loss_replica_minus_single']:+.1e} / {r['loss_control_minus_single']:+.1e}"
                          f" params {r['params_replica_vs_single'] or 0:.1e} / {r['params_control_vs_single'] or 0:.1e}"
                          for r in row["per_seed"]), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config_file": os.path.relpath(args.config, REPO), "width": args.width, "seeds": seeds,
                               "control": args.control, "cpu": fidelity.cpu_name(), "commit": fidelity.git_commit(),
                               "steps_per_call": 1, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    from jaxcifar import cli

    cli.run_command(main)
