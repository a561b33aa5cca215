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
    """The run's images at the measured images/s of at most that many seeds at once (conservative), plus start-up."""
    k = len([s for s in seeds.split(",") if s])
    config = runpy.run_path(str(REPO / "configs" / f"{name}.py"))["get_config"]()
    entry = _models(bench_bf16 if dtype == "bfloat16" else bench_fp32).get(config.model)
    if not entry:
        return 10 ** 9
    by_k = {int(n): r["images_per_s"] for n, r in entry.get("replicas", {}).items()}
    by_k = by_k or {1: entry["jax"]["images_per_s"]}
    measured = sorted(by_k)
    images_per_s = by_k[max([n for n in measured if n <= k] or measured[:1])]
    images = k * config.num_epochs * (TRAIN_IMAGES + TEST_IMAGES / 3)  # evaluation runs ~3x faster than training
    return int(images / images_per_s * SAFETY + COMPILE_AND_START_S)


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
