"""The markdown tables of fidelity runs (their JSON files): each run's last epoch, G per group with the sides'
difference in standard errors, and the final accuracies of whole-schedule runs."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from jaxcifar.fidelity.comparison import (SIGNIFICANT_SE, beyond_criterion, format_mean_se, gap_groups, mean_se,
                                          side_difference)


def table(paths: list[str]) -> str:
    """A markdown table of each run's last epoch, then the mean of each (side, width, variant, epochs) group.
    A run that has not finished its first epoch (its file is written when it starts) has no row yet."""
    runs = [r for r in (json.loads(Path(p).read_text()) for p in paths) if r["epochs"]]
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


def epochs_done(runs: list, num_epochs: int) -> str:
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
        lines.append(f"| {side} | {width:g} | {variant} | {epochs_done(runs, epochs)} | {len(runs)} | "
                     f"{' / '.join(f'{g:.1f}' for g in gaps)} | {format_mean_se(*mean_se(gaps))} | {format_mean_se(*mean_se(tests))} |")
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
            cells += [format_mean_se(diff, se, "+"), f"{diff / se:+.1f}" if se else "-"]
            if beyond_criterion(diff, se):
                beyond.append(name)
        lines.append(f"| {width:g} | {variant} | {epochs_done(j + t, epochs)} | {len(j)} / {len(t)} | "
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
