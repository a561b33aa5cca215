"""What a GPU slot trains, and what each run costs: the helper of scripts/gpu_run.sh.

    python scripts/gpu_plan.py queue RESULTS_DIR        -> the runs the seed's table still lacks, one NAME:SEED:DTYPE a line
    python scripts/gpu_plan.py plan RESULTS_DIR         -> the same queue for a person: config, seed, dtype, estimated s
    python scripts/gpu_plan.py estimates RESULTS_DIR [--runs NAME:SEED:DTYPE ...]
                                                        -> "NAME:SEED:DTYPE SECONDS" of the runs given, or of the queue
    python scripts/gpu_plan.py estimate NAME SEEDS DTYPE RESULTS_DIR
                                                        -> seconds that run needs (SEEDS trained one after another;
                                                           "0,1,2,3+" for seeds in one program, as vmap trained them)

The queue (issue 47): the original's table, 300-epoch rows, seed 0 of each in the order below, then seeds 1 and 2 in
the same order; after the `vgg` and `nin` rows of seed 0, `vgg_fast` in bf16 (4 seeds) until it has been measured,
since whether later rows train in bf16 depends on it (`table_dtype`). A row is there when a complete, full-width
result of that config and seed, from any machine, is in RESULTS_DIR.

The estimates come from what GPU runs measured, as their result files record it (each epoch's time, the start-up
before a process's first epoch, the bookkeeping between epochs), else from bench-gpu.json, and for a network never
run on a GPU from the VGG's figures scaled by the two networks' ratio on the CPU (bench-cpu.json).
"""

from __future__ import annotations

import functools
import json
import math
import runpy
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TABLE = ("vgg", "nin", "vgg_noflip", "nin_noflip", "vgg_nobn", "vgg_nodrop")
TABLE_SEEDS = (0, 1, 2)
BF16_CHECK = ("vgg_fast", (0, 1, 2, 3))  # bf16 against fp32's 4 seeds on the H200 (90.59 +- 0.25 %)
TRAIN_IMAGES, TEST_IMAGES = 50_000, 10_000
SAFETY = 1.1
# Measured on the H200 on 2026-12-04 (results/gpu/), for results files that predate the per-epoch timings:
# call 3's run summed up 318 s for 31 epochs whose times sum to 262.7 s, so 55 s of start-up, bookkeeping and the
# stop: ~1.5 s an epoch after ~10 s of start-up (a checkpoint with checksums every epoch, best/ saves, the report).
DEFAULT_BOOKKEEPING_S = 1.5
# The resume call took 93 s for 9 epochs whose times sum to 71.3 s: start-up is at most the other 21.7 s.
DEFAULT_STARTUP_S = 22.0


# ---------------------------------------------------------------------------------------------------------------
# What results/ holds


def load_results(results_dir: Path) -> list[dict]:
    """The run results (reproduce.py's files) directly in `results_dir`; benchmark files and others are left out."""
    out = []
    for path in sorted(Path(results_dir).glob("*.json")):
        try:
            r = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(r, dict) and "config_name" in r and "curve" in r:
            out.append(r)
    return out


@functools.lru_cache(maxsize=None)
def recipe(name: str):
    """configs/NAME.py's config, read once (the queue asks about each recipe many times)."""
    return runpy.run_path(str(REPO / "configs" / f"{name}.py"))["get_config"]()


def _dtype(r: dict) -> str:
    return r.get("dtype") or r.get("config", {}).get("dtype", "float32")


def _base_name(r: dict) -> str:
    """The recipe a result ran: its config_name less a '-bfloat16' tag."""
    return r["config_name"].removesuffix("-bfloat16")


def complete_seeds(results: list[dict], name: str, dtype: str | None = None) -> dict[int, float]:
    """{seed: final test accuracy} of the complete runs of recipe `name` at its own width and length (`dtype`: of that
    dtype only)."""
    c = recipe(name)
    out = {}
    for r in results:
        cfg = r.get("config", {})
        if (_base_name(r) != name or r.get("partial", True) or (dtype and _dtype(r) != dtype)
                or r.get("epochs_completed") != c.num_epochs or cfg.get("width", c.width) != c.width):
            continue
        for seed, acc in zip(r["seeds"], r.get("final_test_accuracies", [r["final_test_accuracy"]])):
            out[seed] = acc
    return out


def table_dtype(results: list[dict]) -> str:
    """bfloat16 once `vgg_fast` in bf16 (4 seeds) is within noise of fp32 on a GPU: means less than two standard
    errors of their difference apart; float32 until then."""
    name, seeds = BF16_CHECK
    gpu = [r for r in results if "cpu" not in r.get("device", "cpu").lower()]
    bf16, fp32 = complete_seeds(gpu, name, "bfloat16"), complete_seeds(gpu, name, "float32")
    if len(bf16) < len(seeds) or len(fp32) < 2:
        return "float32"
    a, b = list(bf16.values()), list(fp32.values())
    se = math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))
    return "bfloat16" if abs(statistics.mean(a) - statistics.mean(b)) < 2 * se else "float32"


def queue(results: list[dict]) -> list[tuple[str, int, str]]:
    """(config, seed, dtype) of every run the table lacks, in the order a slot trains them."""
    dtype = table_dtype(results)
    out = []
    for seed in TABLE_SEEDS:
        for name in TABLE:
            if seed not in complete_seeds(results, name):
                out.append((name, seed, dtype))
            if (seed, name) == (0, "nin"):
                done = complete_seeds(results, BF16_CHECK[0], "bfloat16")
                out += [(BF16_CHECK[0], s, "bfloat16") for s in BF16_CHECK[1] if s not in done]
    return out


# ---------------------------------------------------------------------------------------------------------------
# What a run costs


def _first_of_process(curve: list[dict], i: int) -> bool:
    """Whether epoch `i` of a curve was the first its process trained (it paid start-up and compilation): the record
    says so (startup_s) or, in older files, it is the first epoch or one much slower than the run's median."""
    e = curve[i]
    if "startup_s" in e or "bookkeeping_s" in e:
        return "startup_s" in e
    return i == 0 or e["epoch_time_s"] > 2 * statistics.median(x["epoch_time_s"] for x in curve)


def measured(results: list[dict], model: str, dtype: str, together: int) -> dict | None:
    """{epoch_s, compile_s, startup_s, bookkeeping_s} of GPU runs of `model` with `together` seeds in one program
    (dtype `dtype` if measured, else float32); None if no such run."""
    for want in (dtype, "float32"):
        runs = [r for r in results if "cpu" not in r.get("device", "cpu").lower()
                and r.get("config", {}).get("model") == model and r.get("config", {}).get("width") == 1.0
                and _dtype(r) == want and len(r["seeds"]) == together]
        if runs:
            break
    else:
        return None
    steady, first, startup, bookkeeping = [], [], [], []
    for r in runs:
        curve = r["curve"]
        for i, e in enumerate(curve):
            (first if _first_of_process(curve, i) else steady).append(e["epoch_time_s"])
            startup += [e["startup_s"]] if "startup_s" in e else []
            bookkeeping += [e["bookkeeping_s"]] if "bookkeeping_s" in e else []
    epoch_s = statistics.median(steady or first)
    return {"epoch_s": epoch_s, "compile_s": max([f - epoch_s for f in first] + [0.0]),
            "startup_s": max(startup) if startup else DEFAULT_STARTUP_S,
            "bookkeeping_s": statistics.median(bookkeeping) if bookkeeping else DEFAULT_BOOKKEEPING_S}


def _bench_model(path: Path, model: str) -> dict:
    try:
        return json.loads(path.read_text())["models"].get(model) or {}
    except (OSError, ValueError, KeyError, AttributeError):
        return {}


def from_bench(results_dir: Path, model: str) -> dict | None:
    """One seed's figures from bench-gpu.json (a train step's images/s and compile time), with the measured
    bookkeeping and start-up of the GPU runs, or the defaults."""
    entry = _bench_model(Path(results_dir) / "bench-gpu.json", model)
    one = entry.get("replicas", {}).get("1") or entry.get("jax")
    if not one:
        return None
    compile_s = one.get("compile_seconds") or entry.get("jax", {}).get("compile_seconds", {}).get("train step", 60.0)
    return {"epoch_s": (TRAIN_IMAGES + TEST_IMAGES / 3) / one["images_per_s"], "compile_s": compile_s,
            "startup_s": DEFAULT_STARTUP_S, "bookkeeping_s": DEFAULT_BOOKKEEPING_S}


def cpu_ratio(results_dir: Path, model: str, reference: str = "vgg_bn_drop") -> float | None:
    """`model`'s train step time over `reference`'s on the CPU (bench-cpu.json), to scale GPU figures with."""
    path = Path(results_dir) / "bench-cpu.json"
    a, b = _bench_model(path, model), _bench_model(path, reference)
    try:
        return a["jax"]["seconds"]["train step"] / b["jax"]["seconds"]["train step"]
    except (KeyError, TypeError, ZeroDivisionError):
        return None


def figures(results: list[dict], results_dir: Path, model: str, dtype: str, together: int = 1) -> tuple[dict, str]:
    """(figures, where they come from) for one run of `model`: the GPU runs' own measurements first."""
    got = measured(results, model, dtype, together)
    if got:
        return got, f"GPU runs of {model}"
    got = from_bench(results_dir, model) if together == 1 else None
    if got:
        return got, "bench-gpu.json"
    reference = "vgg_bn_drop"
    base = (measured(results, reference, dtype, together) or from_bench(results_dir, reference)) if together == 1 \
        else measured(results, reference, dtype, together)
    ratio = cpu_ratio(results_dir, model, reference)
    if base and ratio and model != reference:
        return dict(base, epoch_s=base["epoch_s"] * ratio), f"{reference}'s GPU figures x {ratio:.2f} (CPU ratio)"
    return {}, "nothing measured"


def estimate(name: str, seeds: list[int], dtype: str, results_dir: Path, together: bool = False,
             results: list[dict] | None = None, compiled: bool = False) -> int:
    """Seconds that `name` takes for `seeds`, one run after another (the persistent compilation cache compiles the
    first only; none if `compiled`: an earlier run of the slot compiled it), or all in one program (`together`);
    10**9 when nothing measured allows an estimate. `results`: results_dir's, when the caller has read them."""
    results = load_results(results_dir) if results is None else results
    c = recipe(name)
    f, _ = figures(results, results_dir, c.model, dtype, len(seeds) if together else 1)
    if not f:
        return 10 ** 9
    runs = 1 if together else len(seeds)
    one = f["startup_s"] + c.num_epochs * (f["epoch_s"] + f["bookkeeping_s"])
    return int((runs * one + (0 if compiled else f["compile_s"])) * SAFETY)


def estimated(runs: list[tuple[str, int, str]], results_dir: Path) -> list[tuple[str, int, str, int, str]]:
    """Each run (NAME, SEED, DTYPE) in slot order with its estimated seconds and where its figures come from; a
    config's program compiles once in a slot (the persistent cache), so its later seeds pay no compilation."""
    results, compiled, out = load_results(results_dir), set(), []
    for name, seed, dtype in runs:
        seconds = estimate(name, [seed], dtype, results_dir, results=results, compiled=(name, dtype) in compiled)
        compiled.add((name, dtype))
        out.append((name, seed, dtype, seconds, figures(results, results_dir, recipe(name).model, dtype)[1]))
    return out


def parse_run(text: str) -> tuple[str, int, str]:
    """NAME:SEED:DTYPE of a run (gpu_run.sh's RUNS), checked: SystemExit with one line naming what is wrong."""
    parts = text.split(":")
    if (len(parts) != 3 or not (REPO / "configs" / f"{parts[0]}.py").is_file() or not parts[1].isdigit()
            or parts[2] not in ("float32", "bfloat16")):
        raise SystemExit(f"gpu_plan.py: error: run {text!r}: give NAME:SEED:DTYPE, NAME one of configs/*.py, SEED an "
                         "integer, DTYPE float32 or bfloat16 (e.g. vgg:0:float32)")
    return parts[0], int(parts[1]), parts[2]


def main(argv: list[str]) -> int:
    if argv[:1] == ["queue"] and len(argv) == 2:
        for name, seed, dtype in queue(load_results(Path(argv[1]))):
            print(f"{name}:{seed}:{dtype}")
    elif argv[:1] == ["plan"] and len(argv) == 2:
        rows = estimated(queue(load_results(Path(argv[1]))), Path(argv[1]))
        print(f"{'config':<12} {'seed':>4}  {'dtype':<9} {'estimate':>9}  figures from")
        for name, seed, dtype, seconds, where in rows:
            shown = f"{seconds} s" if seconds < 10 ** 9 else "unknown"
            print(f"{name:<12} {seed:>4}  {dtype:<9} {shown:>9}  {where}")
        total = sum(seconds for *_, seconds, _ in rows if seconds < 10 ** 9)
        print(f"gpu_run.sh: {len(rows)} runs queued, about {total / 60:.0f} min of GPU time in all" if rows else
              "gpu_run.sh: the table is complete; nothing queued")
    elif argv[:1] == ["estimates"] and len(argv) >= 2:
        results_dir = Path(argv[1])
        given = argv[2:][:1] == ["--runs"]
        runs = [parse_run(r) for r in argv[3:]] if given else queue(load_results(results_dir))
        for name, seed, dtype, seconds, _ in estimated(runs, results_dir):
            print(f"{name}:{seed}:{dtype} {seconds}")
    elif argv[:1] == ["estimate"] and len(argv) == 5:
        together = argv[2].endswith("+")
        seeds = [int(s) for s in argv[2].rstrip("+").split(",") if s]
        print(estimate(argv[1], seeds, argv[3], Path(argv[4]), together))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except BrokenPipeError:  # `--plan | head`: the reader has what it wanted
        sys.stderr.close()
        sys.exit(0)
