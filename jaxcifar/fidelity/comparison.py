"""The statistics that compare the two sides: G (train-mode training accuracy - eval-mode test accuracy, averaged
over a window of epochs) per run, means with standard errors per group, and the criterion for a difference; and the
checks of what the tools that compute them are given (run files, the window)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from jaxcifar import errors
from jaxcifar.run import files

SIGNIFICANT_SE = 2.0  # a difference between the sides beyond this many standard errors gets localised


def window_gap(epochs: list[dict], window: tuple[int, int]) -> float | None:
    """G of one run: the mean over the window's epochs of train-mode training accuracy - eval-mode test accuracy
    (None before the run is through the window)."""
    lo, hi = window
    rows = {e["epoch"]: e for e in epochs}
    if not all(e in rows for e in range(lo, hi + 1)):
        return None
    return statistics.mean(rows[e]["train_accuracy"] - rows[e]["test_accuracy"] for e in range(lo, hi + 1))


def gap_groups(paths: list[str], window: tuple[int, int], num_epochs: int | None = None) -> dict:
    """(side, width, variant, num_epochs) -> [(seed, G, last test accuracy, last epoch)] of the runs through the
    window (and of that schedule length, if given)."""
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


def mean_se(values: list[float]) -> tuple[float, float | None]:
    """Mean and standard error of the mean (None for a single value)."""
    if len(values) < 2:
        return values[0], None
    return statistics.mean(values), statistics.stdev(values) / len(values) ** 0.5


def side_difference(jax_values: list[float], torch_values: list[float]) -> tuple[float, float | None]:
    """jax - torch of the means, and its standard error (independent samples; None with one value a side)."""
    (mj, sj), (mt, st) = mean_se(jax_values), mean_se(torch_values)
    return mj - mt, (sj ** 2 + st ** 2) ** 0.5 if sj is not None and st is not None else None


def beyond_criterion(diff: float, se: float | None) -> bool:
    """Whether a difference lies beyond SIGNIFICANT_SE of its standard errors (never without one)."""
    return bool(se) and abs(diff / se) > SIGNIFICANT_SE


def format_mean_se(mean: float, se: float | None, sign: str = "") -> str:
    """'12.50 ± 1.15', or '12.50' without a standard error; sign "+" for differences."""
    return f"{mean:{sign}.2f}" if se is None else f"{mean:{sign}.2f} ± {se:.2f}"


RUN_FIELDS = ("side", "width", "variant", "seed", "num_epochs", "epochs")  # what the tables read of a run's JSON


def check_run_files(paths: list[str], fields: tuple[str, ...] = RUN_FIELDS) -> None:
    """One line (errors.JaxcifarError) naming the first of `paths` that is not a run's JSON as fidelity.py --out
    writes it (with `fields`), before any table."""
    for path in paths:
        run = files.read_json(path, "give the files that scripts/fidelity.py --out wrote")
        missing = [k for k in fields if k not in run] if isinstance(run, dict) else list(fields)
        if missing:
            raise errors.JaxcifarError(f"{path} is not a fidelity run's JSON (it lacks {', '.join(missing)}); give "
                                       "the files that scripts/fidelity.py --out wrote")


def parse_window(text: str) -> tuple[int, int]:
    """--window: '5-10' or '7' -> (first, last) epoch."""
    lo, _, hi = text.partition("-")
    try:
        window = int(lo), int(hi or lo)
    except ValueError:
        raise errors.JaxcifarError(f"--window {text}: give epochs as 5-10 or 7") from None
    if not 1 <= window[0] <= window[1]:
        raise errors.JaxcifarError(f"--window {text}: the first epoch must be at least 1 and not after the last")
    return window
