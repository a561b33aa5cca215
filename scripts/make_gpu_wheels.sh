#!/usr/bin/env bash
# Fetch, for Python 3.12 on x86_64 Linux, the wheels a GPU image with JAX, flax, optax, orbax, numpy and pillow lacks;
# scripts/gpu_run.sh installs them from DEST without network.   Usage: scripts/make_gpu_wheels.sh DEST
set -euo pipefail
dest=${1:?usage: make_gpu_wheels.sh DEST}
mkdir -p "$dest"
py=${PYTHON:-python3}
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
for pkg in tensorflow-datasets array-record ml-collections dm-tree immutabledict simple-parsing docstring-parser \
           tensorflow-metadata googleapis-common-protos termcolor toml importlib-resources tqdm absl-py wrapt \
           matplotlib contourpy cycler fonttools kiwisolver pyparsing python-dateutil six tensorboardx protobuf packaging; do
  $py -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
    -d "$dest" "$pkg"
done
$py -m pip wheel -q --no-deps -w "$dest" promise  # published as an sdist only; pure Python
ls "$dest"
