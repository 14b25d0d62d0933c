#!/usr/bin/env bash
# Prepare .whl/ for benchmarks/gpu_figures.sh on a machine with pip access (the device machine has none): the wheels
# the device image lacks, for its Python 3.12 / torch 2.11+cu130, and cuEquivariance's CUDA kernel packages unpacked
# and xz-compressed (73 MB as wheels, 28 MB as .tar.xz: a transfer carries at most 64 MiB with the working tree).
# Add /.whl/ to .git/info/exclude and carry ".whl" in the device call.
set -eu
cd "$(dirname "$0")/.."
mkdir -p .whl /tmp/gpu_ops_wheels /tmp/gpu_ops_unpacked
plat=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps "${plat[@]}" -d .whl ase platformdirs cuequivariance==0.13.0 \
    cuequivariance-torch==0.13.0 mace-torch==0.3.16 configargparse GitPython gitdb smmap lmdb matscipy orjson \
    prettytable wcwidth torch-ema setuptools-scm
python3 -m pip download -q --no-deps "${plat[@]}" -d /tmp/gpu_ops_wheels cuequivariance-ops-cu13==0.13.0 \
    cuequivariance-ops-torch-cu13==0.13.0
for w in /tmp/gpu_ops_wheels/*.whl; do (cd /tmp/gpu_ops_unpacked && unzip -qo "$w"); done
tar cJf .whl/ops.tar.xz -C /tmp/gpu_ops_unpacked .
python3 -m pip download -q --no-deps --no-binary=:all: -d .whl openequivariance==0.7.0
du -sh .whl
