#!/usr/bin/env bash
# The one command of a GPU slot: train the runs the seed's table still lacks (scripts/gpu_plan.py reads results/),
# one after another, for as long as this call's budget lasts. Run again in the next call on the same (warm) machine,
# it resumes where the last call stopped: the run in progress from its checkpoint, the finished ones skipped.
#
#   scripts/gpu_run.sh --plan                             the queue and each run's estimate; touches no GPU
#   scripts/gpu_run.sh WHEELS_DIR DATA OUT_DIR [BUDGET_S]
#
# WHEELS_DIR  wheels of what the GPU image lacks (scripts/make_gpu_wheels.sh); installed without network
# DATA        cifar-10-binary.tar.gz, or a folder of its split parts (part-aa, ... + SHA256SUMS)
# OUT_DIR     receives only what comes back from the slot (at most 8 files): gpu_run.log and each run's result
#             JSON, rewritten after every epoch (a run cut short is a partial row); packed into results.tar if the
#             results would make more than 7 files
# BUDGET_S    seconds this call may take in all (default 540: one call of at most 9 minutes)
# From the environment: RUNS (NAME:SEED:DTYPE ..., default the queue of `gpu_plan.py queue results/`), SLOT_FLAGS
# (--config flags of every run; default below), BENCH=1 (the benchmark against PyTorch CUDA as a tail, when the
# queue is done and time is left), BENCH_ARGS, PYTHON, WORK, MD5_FILE, INSTALL=0 (nothing to install)
#
# Where a slot's time goes (issue 47): nothing runs before training but the setup (wheels, data joined and checked,
# tfds prepared and preprocessed on every core); runs save every 2 minutes rather than every epoch, keep no best/
# save, write the report at their end (SIGTERM: at once, with a save); seeds train one after another, each its own
# process: the persistent compilation cache in WORK compiles a config's program once. (Several seeds in one vmapped
# program ran slower on an H200 than one seed: 30,000 images/s summed for 4 against 42,646 for 1; docs/gpu.md.)
#
# Rehearsal on a CPU (minutes; RUNS names the tiny config, whose fake archive has its own MD5 list):
#   PYTHON=.venv/bin/python INSTALL=0 MD5_FILE=fake/md5sums.txt RUNS="tiny:0:float32 tiny:1:float32" \
#     scripts/gpu_run.sh - fake/cifar-10-binary.tar.gz OUT 300
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python3}
if [ "${1:-}" = --plan ]; then  # on the development machine: the project's venv, if PYTHON does not say
  [ -z "${PYTHON:-}" ] && [ -x "$repo/.venv/bin/python" ] && py=$repo/.venv/bin/python
  exec $py "$repo/scripts/gpu_plan.py" plan "${2:-$repo/results}"
fi
usage="usage: gpu_run.sh WHEELS_DIR DATA OUT_DIR [BUDGET_S], or gpu_run.sh --plan"
die() { echo "gpu_run.sh: error: $*" >&2; exit 2; }
[ $# -ge 3 ] && [ $# -le 4 ] || die "$usage"
start=$(date +%s)
wheels=$1 data=$2 out=$3 budget=${4:-540}
[[ "$budget" =~ ^[0-9]+$ ]] && [ "$budget" -gt 0 ] || die "BUDGET_S=$budget: give the call's seconds, a positive integer"
if [ "${INSTALL:-1}" != 0 ] && [ ! -d "$wheels" ]; then
  die "no wheels folder $wheels: make it with scripts/make_gpu_wheels.sh, or set INSTALL=0 where all is installed"
fi
[ -e "$data" ] || die "no data at $data: give cifar-10-binary.tar.gz, or the folder of its parts and SHA256SUMS"
work=${WORK:-${TMPDIR:-/tmp}/jaxcifar-gpu}  # data, caches, run folders and what earlier calls finished: never OUT
slot_flags=${SLOT_FLAGS:-"--config.checkpoint_every_s=120 --config.save_best=false --config.report_every_epochs=0"}
min_start_s=60  # a run's start-up and compilation (~50 s for the VGG on an H200): less than this left, none starts
mkdir -p "$out" "$work"
exec > >(tee -a "$out/gpu_run.log") 2>&1
export TQDM_DISABLE=1  # progress bars would fill the log that comes back
left() { echo $(( budget - ($(date +%s) - start) )); }
echo "== gpu_run.sh $(date -u +%FT%TZ), budget ${budget} s, work dir $work"

if [ "${INSTALL:-1}" != 0 ] && [ ! -e "$work/.installed" ]; then
  echo "== installing dependencies from $wheels (no network)"
  $py -m pip install -q --no-index --find-links "$wheels" tensorflow-datasets array-record ml-collections \
    importlib-resources tqdm absl-py matplotlib tensorboardx
  $py -m pip install -q --no-index --no-deps --no-build-isolation -e "$repo" 2>/dev/null \
    || echo "export PYTHONPATH=$repo" > "$work/.pythonpath"
  touch "$work/.installed"
fi
# shellcheck disable=SC1091
[ -e "$work/.pythonpath" ] && . "$work/.pythonpath"

archive="$work/cifar-10-binary.tar.gz"
if [ -d "$data" ]; then
  [ -f "$data/SHA256SUMS" ] || die "$data has no SHA256SUMS: split the archive with ../shared/cifar10/split.sh"
  want=$(awk '$2 ~ /cifar-10-binary\.tar\.gz$/ {print $1}' "$data/SHA256SUMS")
  [ -n "$want" ] || die "$data/SHA256SUMS has no line for cifar-10-binary.tar.gz: split the archive again with split.sh"
  if [ ! -f "$archive" ] || [ "$(sha256sum "$archive" | cut -d' ' -f1)" != "$want" ]; then
    echo "== joining $data/part-* and checking SHA256SUMS"
    (cd "$data" && sha256sum -c --quiet --ignore-missing SHA256SUMS) || die "a part of $data is damaged; send it again"
    cat "$data"/part-* > "$archive.tmp"
    got=$(sha256sum "$archive.tmp" | cut -d' ' -f1)
    [ "$want" = "$got" ] || die "the joined archive's sha256 is $got, not $want: a part is missing; send every part"
    mv "$archive.tmp" "$archive"
  fi
else
  archive=$data
fi
export TFDS_DATA_DIR="$work/tfds" JAXCIFAR_CACHE_DIR="$work/cache"
md5=${MD5_FILE:+--md5-file $MD5_FILE}
train_md5=${MD5_FILE:+--config.data.md5_file=$MD5_FILE}  # training checks the prepared set against the same list
cd "$repo"
if [ ! -e "$work/.prepared" ]; then  # an earlier call of this slot prepared it from the same checked archive
  echo "== preparing CIFAR-10"
  # shellcheck disable=SC2086
  $py -m jaxcifar.prepare --archive "$archive" --preprocess $md5
  touch "$work/.prepared"
fi
echo "setup done after $(( $(date +%s) - start )) s"

# The runs with their estimates, "NAME:SEED:DTYPE SECONDS" a line, from one start of Python.
# shellcheck disable=SC2086
plan=$($py scripts/gpu_plan.py estimates results ${RUNS+--runs $RUNS})  # RUNS="": none
touch "$work/finished"
while read -r run need; do
  [ -n "$run" ] || continue
  IFS=: read -r name seed dtype <<<"$run"
  grep -qxF "$run" "$work/finished" && continue  # an earlier call of this slot finished it
  if [ "$(left)" -lt $((min_start_s + 15)) ]; then
    echo "== $(left) s left: too little to start $name seed $seed ($dtype); the next call starts it"
    break
  fi
  echo "== $name seed $seed ($dtype): ~${need} s estimated, $(left) s left in this call"
  tag=$name
  [ "$dtype" = float32 ] || tag="$name-$dtype"
  t0=$(date +%s) rc=0
  # shellcheck disable=SC2086
  timeout --signal=TERM --kill-after=30 "$(( $(left) - 15 ))" $py -m jaxcifar.train \
      --config "configs/$name.py" --workdir "$work/runs/$tag-s$seed" --config.seed="$seed" --config.dtype="$dtype" \
      --config.data.archive="$archive" $train_md5 $slot_flags --config.results.dir="$out" \
      --config.results.name="$name" || rc=$?
  echo "== $name seed $seed ($dtype): $(( $(date +%s) - t0 )) s, exit code $rc"
  case $rc in
    0) echo "$run" >> "$work/finished" ;;
    124|143) echo "== out of this call's time: its saved epochs are a partial row; the next call resumes it"; break ;;
    *) echo "== $name seed $seed failed (its error is above): on to the next run" ;;
  esac
done <<<"$plan"

if [ "${BENCH:-1}" != 0 ] && [ "$(left)" -gt 120 ]; then
  echo "== benchmark (a tail: the queue is done)"
  # shellcheck disable=SC2086
  timeout --signal=TERM "$(( $(left) - 15 ))" $py -m jaxcifar.bench ${BENCH_ARGS:-"--models vgg_bn_drop --compare-torch"} \
    --json "$out/bench-$($py -c 'import jax; print(jax.default_backend())')-float32.json" \
    || echo "benchmark ended early (exit code $?)"
fi
results=$(find "$out" -maxdepth 1 -name '*.json' | wc -l)
if [ "$results" -gt 7 ]; then  # what comes back is at most 8 files
  (cd "$out" && tar -cf results.tar ./*.json && rm -f ./*.json)
  echo "== $results result files packed into results.tar (tar -xf results.tar -C results/)"
fi
echo "== done after $(( $(date +%s) - start )) s; files in $out:"
ls -l "$out"
