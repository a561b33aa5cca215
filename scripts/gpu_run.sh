#!/usr/bin/env bash
# The one command a GPU slot runs: benchmark, then train as many seeds and configs as fit in BUDGET_S.
#
#   scripts/gpu_run.sh WHEELS_DIR DATA OUT_DIR [BUDGET_S]
#
# WHEELS_DIR  wheels of what the GPU image lacks (scripts/make_gpu_wheels.sh); installed without network
# DATA        cifar-10-binary.tar.gz, or a folder of its split parts (part-aa, ... + SHA256SUMS)
# OUT_DIR     receives only what comes back from the slot, at most 8 small files: gpu_run.log,
#             bench-gpu-float32.json, bench-gpu-bfloat16.json and one results JSON per finished run
# BUDGET_S    seconds this call may take in all (default 540: one call of at most 9 minutes)
# STAGES      runs NAME:SEEDS:DTYPE, space-separated; "A|B" runs the first of A, B that fits the time left
# Also from the environment: BENCH=0 (no benchmark), BENCH16=0 (no bf16 one), VARIANTS (step variants to time,
# comma-separated names of bench.STEP_VARIANTS; "" for none), BENCH_ARGS, FORCE_STAGES=1, PYTHON, WORK, MD5_FILE,
# INSTALL=0 (the dependencies and this package are installed already: nothing is installed)
#
# Plan for one H100 or H200 in 540 s (each stage is estimated from the throughput the benchmark just measured and
# skipped, with a note in the log, when it would not end before the budget does; a run cut short by the
# budget is stopped cleanly and written as a partial result). Measured on an H200 on 2026-12-04 (docs/gpu.md):
#   setup      71 s    wheels; parts joined and checked; tfds prepared and preprocessed under $WORK, not OUT_DIR
#   benchmark  ~170 s  for VGG fp32 with --replicas 1,8 alone (compiles of 25-42 s each). The default adds NIN,
#                      bf16, PyTorch CUDA and every alternative of the step (backends.STEP_CHOICES): several
#                      minutes, too long for one call with training after it; set BENCH_ARGS and VARIANTS
#   vgg_fast   4 seeds in one program, 40 epochs: 334 s of training (8 did not fit: seeds at once run slower there)
#   then, while they fit, 3 seeds each in one program: vgg (300 epochs, 45 M images), vgg_fast in bf16,
#   nin (300), and the ablations vgg_noflip, vgg_nobn, vgg_nodrop, nin_noflip.
#
# Rehearsal on a CPU (the same stages, minutes long; FORCE_STAGES=1 runs the stages whatever the estimates, which
# assume full CIFAR-10 and the benchmarked model's full width; BENCH=0 skips the benchmark):
#   PYTHON=.venv/bin/python MD5_FILE=fake/md5sums.txt STAGES="tiny:0,1:float32" \
#     BENCH_ARGS="--models vgg_bn_drop --batch 8 --runs 1 --epoch-steps 2 --replicas 1,2" \
#     scripts/gpu_run.sh WHEELS fake/cifar-10-binary.tar.gz OUT 600
set -euo pipefail
start=$(date +%s)
wheels=${1:?usage: gpu_run.sh WHEELS_DIR DATA OUT_DIR [BUDGET_S]}
data=${2:?DATA: archive or parts folder}
out=${3:?OUT_DIR}
budget=${4:-540}
repo=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python3}
work=${WORK:-${TMPDIR:-/tmp}/jaxcifar-gpu}  # data, caches and run folders: never under OUT_DIR
stages=${STAGES:-"vgg_fast:0,1,2,3,4,5,6,7:float32|vgg_fast:0,1,2,3:float32|vgg_fast:0,1:float32 vgg:0,1,2:float32 vgg_fast:0,1,2:bfloat16 nin:0,1,2:float32
 vgg_noflip:0,1,2:float32 vgg_nobn:0,1,2:float32 vgg_nodrop:0,1,2:float32 nin_noflip:0,1,2:float32"}
bench_args=${BENCH_ARGS:-"--replicas 1,4,8 --compare-torch"}
variants=${VARIANTS-all}  # --step-variants NAMES of the fp32 benchmark ("" for none)
mkdir -p "$out" "$work"
exec > >(tee -a "$out/gpu_run.log") 2>&1
export TQDM_DISABLE=1  # progress bars would fill the log that comes back
left() { echo $(( budget - ($(date +%s) - start) )); }
# Why a timed stage ended early: out of time (timeout's 124) and a failure call for different fixes.
why() { if [ "$1" = 124 ]; then echo "ran out of its time"; else echo "failed (exit code $1)"; fi; }
echo "== gpu_run.sh $(date -u +%FT%TZ), budget ${budget} s, work dir $work"

if [ "${INSTALL:-1}" != 0 ]; then
  echo "== installing dependencies from $wheels (no network)"
  $py -m pip install -q --no-index --find-links "$wheels" tensorflow-datasets array-record ml-collections \
    importlib-resources tqdm absl-py matplotlib tensorboardx
  $py -m pip install -q --no-index --no-deps --no-build-isolation -e "$repo" 2>/dev/null \
    || export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
fi

if [ -d "$data" ]; then
  echo "== joining $data/part-* and checking SHA256SUMS"
  (cd "$data" && sha256sum -c --ignore-missing SHA256SUMS)
  cat "$data"/part-* > "$work/cifar-10-binary.tar.gz"
  want=$(grep 'cifar-10-binary.tar.gz' "$data/SHA256SUMS" | cut -d' ' -f1)
  got=$(sha256sum "$work/cifar-10-binary.tar.gz" | cut -d' ' -f1)
  [ "$want" = "$got" ] || { echo "error: joined archive sha256 $got != $want" >&2; exit 1; }
  archive="$work/cifar-10-binary.tar.gz"
else
  archive="$data"
fi
export TFDS_DATA_DIR="$work/tfds" JAXCIFAR_CACHE_DIR="$work/cache"
md5=${MD5_FILE:+--md5-file $MD5_FILE}
train_md5=${MD5_FILE:+--config.data.md5_file=$MD5_FILE}  # training checks the prepared set against the same list
cd "$repo"
echo "== preparing CIFAR-10"
# shellcheck disable=SC2086
$py -m jaxcifar.prepare --archive "$archive" --preprocess $md5
$py -c 'import jax, jaxlib; print("devices:", jax.devices(), "jax", jax.__version__, "jaxlib", jaxlib.__version__)'
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true
echo "setup done after $(( $(date +%s) - start )) s"

platform=$($py -c 'import jax; print("gpu" if jax.default_backend() == "gpu" else "cpu")')
bench32="$out/bench-$platform-float32.json" bench16="$out/bench-$platform-bfloat16.json"
if [ "${BENCH:-1}" != 0 ]; then
  echo "== benchmark"
  # shellcheck disable=SC2086
  timeout --signal=TERM "$(left)" $py -m jaxcifar.bench $bench_args ${variants:+--step-variants "$variants"} \
    --json "$bench32" || echo "benchmark (fp32) $(why $?); training uses the defaults"
  if [ "${BENCH16:-1}" != 0 ]; then
    # shellcheck disable=SC2086
    timeout --signal=TERM "$(( $(left) / 4 ))" $py -m jaxcifar.bench $bench_args --models vgg_bn_drop \
      --dtype bfloat16 --json "$bench16" || echo "benchmark (bf16) $(why $?)"
  fi
fi

# The fastest step settings the benchmark found for VGG, as --config flags.
overrides=$($py scripts/gpu_plan.py overrides "$bench32" || true)
echo "step settings from the benchmark: ${overrides:-the defaults of backends.STEP_CHOICES}"

for choices in $stages; do
  # A stage is one run, or alternatives "a|b|c" of which the first that fits the time left runs (more seeds first).
  stage=""
  for alternative in ${choices//|/ }; do
    IFS=: read -r name seeds dtype <<<"$alternative"
    need=$($py scripts/gpu_plan.py estimate "$name" "$seeds" "$dtype" "$bench32" "$bench16")
    if [ "$need" -le "$(left)" ] || [ "${FORCE_STAGES:-0}" = 1 ]; then stage=$alternative; break; fi
    echo "== skipping $name ($dtype, seeds $seeds): needs ~${need} s, $(left) s left"
  done
  if [ -z "$stage" ] && [ "$need" -ge 1000000000 ] && [ "$(left)" -gt 120 ]; then
    # No benchmark figure to estimate from (it failed or was skipped): the smallest alternative runs anyway;
    # the time left cuts it short if need be, and its finished epochs are still written.
    echo "== no estimate for $name ($dtype): running seeds $seeds for at most the $(left) s left"
    stage=$alternative
  fi
  [ -n "$stage" ] || continue
  echo "== $name ($dtype, seeds $seeds in one program): ~${need} s estimated, $(left) s left"
  runs="$work/runs" tag="$name"
  [ "$dtype" = float32 ] || tag="$name-$dtype"
  workdir="$runs/$tag-s${seeds//,/-}"
  # shellcheck disable=SC2086
  timeout --signal=TERM --kill-after=30 "$(( $(left) - 15 ))" $py -m jaxcifar.train \
      --config "configs/$name.py" --workdir "$workdir" --config.seeds="$seeds" --config.dtype="$dtype" \
      --config.data.archive="$archive" $train_md5 $overrides \
    || echo "$name $(why $?): its finished epochs are written as a partial result"
  if [ -s "$workdir/metrics.jsonl" ]; then
    $py scripts/reproduce.py --from-workdir "$workdir" --config-name "$tag" --results "$out" --no-readme
  fi
done
echo "== done after $(( $(date +%s) - start )) s; files in $out:"
ls -l "$out"
