"""Helpers of scripts/gpu_run.sh: what the benchmark it just ran says about the training runs that follow.

    python scripts/gpu_plan.py overrides BENCH_JSON             -> --config flags of the fastest step settings
    python scripts/gpu_plan.py estimate CONFIG SEEDS DTYPE BENCH_FP32 BENCH_BF16
                                                                -> seconds that run needs (10**9 if unknown)
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAIN_IMAGES, TEST_IMAGES = 50_000, 10_000
COMPILE_AND_START_S = 60  # per run: process start, data load, compilation (the bench's compile times are ~20-40 s)
SAFETY = 1.1


def _models(path: str) -> dict:
    try:
        return json.loads(Path(path).read_text())["models"]
    except (OSError, ValueError, KeyError):
        return {}


def overrides(bench_json: str) -> str:
    models = _models(bench_json)
    entry = models.get("vgg_bn_drop") or next(iter(models.values()), {})
    fastest = entry.get("step_variants", {}).get("fastest", {})
    return " ".join(f"--config.{k}={v}" for k, v in fastest.items())


def estimate(name: str, seeds: str, dtype: str, bench_fp32: str, bench_bf16: str) -> int:
    """The run's images at the measured images/s of that many seeds, plus the loop around its steps and start-up."""
    k = len([s for s in seeds.split(",") if s])
    config = runpy.run_path(str(REPO / "configs" / f"{name}.py"))["get_config"]()
    entry = _models(bench_bf16 if dtype == "bfloat16" else bench_fp32).get(config.model)
    if not entry:
        return 10 ** 9
    images = k * config.num_epochs * (TRAIN_IMAGES + TEST_IMAGES / 3)  # evaluation runs ~3x faster than training
    steps = config.num_epochs * (TRAIN_IMAGES // config.batch_size)
    seconds = images / images_per_s(entry, k) + steps * loop_s_per_step(entry)
    return int(seconds * SAFETY + COMPILE_AND_START_S)


def images_per_s(entry: dict, k: int) -> float:
    """Summed images/s of `k` seeds at once: the slower of the measured counts nearest below and above `k`. More seeds
    need not mean more images/s: on an H200, 1 seed ran 42,646 images/s, 8 seeds 37,661 and 4 about 30,000."""
    by_k = {int(n): r["images_per_s"] for n, r in entry.get("replicas", {}).items()}
    by_k = by_k or {1: entry["jax"]["images_per_s"]}
    below, above = [n for n in by_k if n <= k], [n for n in by_k if n >= k]
    nearest = ([max(below)] if below else []) + ([min(above)] if above else [])
    return min(by_k[n] for n in nearest)


def loop_s_per_step(entry: dict) -> float:
    """Seconds per step of the training loop outside the steps (the bench's epoch_loop): 39 % of an epoch on an H200,
    where a step takes 3 ms; about 2 % on a CPU."""
    loop = entry.get("jax", {}).get("epoch_loop")
    if not loop:
        return 0.0
    return max(loop["seconds"] - loop["bare_steps_seconds"], 0.0) / loop["steps"]


def main(argv: list[str]) -> int:
    if argv[:1] == ["overrides"] and len(argv) == 2:
        print(overrides(argv[1]))
    elif argv[:1] == ["estimate"] and len(argv) == 6:
        print(estimate(*argv[1:]))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
