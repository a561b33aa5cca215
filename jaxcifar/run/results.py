"""A run's result file (results/NAME-seedS-{cpu,gpu}.json): its final-epoch accuracy per seed, the per-epoch curve,
the times, the machine, the code and the config. scripts/reproduce.py builds the README's tables from these files;
training writes its own after every epoch when `--config.results.dir` is set, so a run cut short is a partial row.
"""

from __future__ import annotations

import itertools
import json
import statistics
from pathlib import Path

from jaxcifar.run import files, machine

# Per-epoch fields a result's curve keeps; the timing ones (startup_s, bookkeeping_s) when the records have them.
CURVE_FIELDS = ("epoch", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "learning_rate", "epoch_time_s",
                "train_images_per_s")
CURVE_TIMINGS = ("eval_time_s", "startup_s", "bookkeeping_s")


def run_result(records: list[dict], config: dict, config_name: str, workdir: Path | str,
               wall_time_s: float | None = None) -> dict:
    """The result of a run whose finished epochs are `records` (metrics.jsonl's) and whose config is `config`."""
    final = records[-1]
    seeds = final.get("seeds") or [config["seed"]]
    per_seed = final.get("per_seed", {"test_accuracy": [final["test_accuracy"]]})
    info = machine.machine_info()
    return {
        "config_name": config_name, "seed": seeds[0], "seeds": seeds, "workdir": str(workdir),
        "dtype": config.get("dtype", "float32"),
        "epochs_completed": final["epoch"], "epochs_configured": config["num_epochs"],
        "partial": final["epoch"] < config["num_epochs"],
        "final_test_accuracy": final["test_accuracy"], "final_test_accuracies": per_seed["test_accuracy"],
        "final_train_accuracy": final["train_accuracy"], "final_train_loss": final["train_loss"],
        "curve": [{k: r[k] for k in CURVE_FIELDS + CURVE_TIMINGS if k in r} for r in records],
        "wall_time_s": wall_time_s if wall_time_s is not None else sum(r["epoch_time_s"] for r in records),
        "train_images_per_s": statistics.median(r["train_images_per_s"] for r in records),
        # What trained the epochs, as each record says (a record from before records said so: this machine and
        # checkout, the best guess left).
        "device": epochs_by(records, "machine", machine.device_label(info)),
        "commit": epochs_by(records, "commit", info["commit"]),
        "versions": {k: info[k] for k in ("python", "jax", "flax")}, "date": info["date"],
        "config": config,
    }


def epochs_by(records: list[dict], field: str, unrecorded: str | None) -> str | None:
    """The value of `field` (machine or commit) the epochs were trained with: one value, or each with its epochs
    ('A (epochs 1-17), B (epochs 18-40)') when the run moved; `unrecorded` stands for records without it."""
    spans = [(value, [r["epoch"] for r in span])
             for value, span in itertools.groupby(records, key=lambda r: r.get(field, unrecorded))]
    if len(spans) == 1:
        return spans[0][0]
    return ", ".join(f"{v} (epoch{f's {e[0]}-{e[-1]}' if len(e) > 1 else f' {e[0]}'})" for v, e in spans)


def result_path(result: dict, results_dir: Path) -> Path:
    """NAME-seedS-TAG.json, or NAME-seedsA-B-TAG.json for seeds trained together; TAG: cpu or gpu."""
    tag = "cpu" if "cpu" in result["device"].lower() else "gpu"
    seeds = result.get("seeds", [result["seed"]])
    which = f"seed{seeds[0]}" if len(seeds) == 1 else f"seeds{'-'.join(map(str, seeds))}"
    return Path(results_dir) / f"{result['config_name']}-{which}-{tag}.json"


def write_result(result: dict, results_dir: Path) -> Path:
    """Writes `result` whole or not at all (a truncated result would be a row lost); returns its path."""
    path = result_path(result, results_dir)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise files.write_failed(e, path.parent, "run the same command again") from None
    files.atomic_write(path, (json.dumps(result, indent=1) + "\n").encode(),
                        then=f"run the same command again ({path.name} is as it was)")
    return path
