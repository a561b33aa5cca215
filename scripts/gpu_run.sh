#!/usr/bin/env bash
# Run jaxcifar on a bare GPU machine that already has JAX (CUDA), flax, optax, orbax, numpy and pillow.
#
#   scripts/gpu_run.sh WHEELS_DIR DATA OUT_DIR [CONFIGS] [SEEDS]
#
# WHEELS_DIR  wheels of the remaining dependencies (tensorflow-datasets, array-record, ml-collections, ...);
#             installed without network
# DATA        cifar-10-binary.tar.gz, or a folder of its split parts (part-aa, part-ab, ... + SHA256SUMS)
# OUT_DIR     receives bench.json, results/*.json, the run logs and reports
# CONFIGS     comma-separated names of configs/*.py (default: vgg_fast)
# SEEDS       comma-separated seeds (default: 0,1,2)
# BENCH=0     skips the benchmark
set -euo pipefail
wheels=${1:?usage: gpu_run.sh WHEELS_DIR DATA OUT_DIR [CONFIGS] [SEEDS]}
data=${2:?DATA: archive or parts folder}
out=${3:?OUT_DIR}
configs=${4:-vgg_fast}
seeds=${5:-0,1,2}
repo=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
py=${PYTHON:-python3}

echo "== installing dependencies from $wheels (no network)"
$py -m pip install -q --no-index --find-links "$wheels" tensorflow-datasets array-record ml-collections \
  importlib-resources tqdm absl-py matplotlib
$py -m pip install -q --no-index --no-deps --no-build-isolation -e "$repo" 2>/dev/null \
  || export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"

if [ -d "$data" ]; then
  echo "== joining $data/part-* and checking SHA256SUMS"
  (cd "$data" && sha256sum -c --ignore-missing SHA256SUMS)
  cat "$data"/part-* > "$out/cifar-10-binary.tar.gz"
  want=$(grep 'cifar-10-binary.tar.gz' "$data/SHA256SUMS" | cut -d' ' -f1)
  got=$(sha256sum "$out/cifar-10-binary.tar.gz" | cut -d' ' -f1)
  [ "$want" = "$got" ] || { echo "error: joined archive sha256 $got != $want" >&2; exit 1; }
  archive="$out/cifar-10-binary.tar.gz"
else
  archive="$data"
fi

export TFDS_DATA_DIR="$out/tfds" JAXCIFAR_CACHE_DIR="$out/cache"
cd "$repo"
echo "== preparing CIFAR-10"
$py -m jaxcifar.data prepare --archive "$archive" --preprocess
$py -c 'import jax; print("devices:", jax.devices())'
if [ "${BENCH:-1}" != 0 ]; then
  echo "== benchmark"
  $py -m jaxcifar.bench --json "$out/bench-fp32.json" | tee "$out/bench-fp32.txt"
  $py -m jaxcifar.bench --dtype bfloat16 --batch 512 --json "$out/bench-bf16-b512.json" | tee "$out/bench-bf16.txt"
fi
echo "== training $configs x seeds $seeds"
$py scripts/reproduce.py --configs "$configs" --seeds "$seeds" --results "$out/results" --runs-dir "$out/runs" \
  --archive "$archive" --no-readme
echo "== done: results in $out/results"
