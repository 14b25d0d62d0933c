#!/usr/bin/env bash
# The GPU figures of one prepared run (batched audits, MACE through cuEquivariance's kernels, tensor products against
# cuEquivariance and OpenEquivariance), on a CUDA machine whose python has torch, e3nn and torch-geometric.
# Packages it lacks come as wheels in WHEELS (default .whl, made by benchmarks/gpu_wheels.sh: ase, platformdirs,
# mace-torch and its needs, cuequivariance(-torch),
# setuptools-scm, and openequivariance's sdist) and cuEquivariance's CUDA kernels unpacked in OPS (default
# .whl/ops.tar.xz: cuequivariance-ops-cu13 + cuequivariance-ops-torch-cu13 0.13, xz-compressed to fit a transfer).
# Each step runs under its own limit; results go to benchmarks/results/*_cuda.json and, when OUT is set, to $OUT.
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 GEOLIE_DATASETS=$PWD/datasets
WHEELS=${WHEELS:-.whl}
SITE=${SITE:-/tmp/site}
mkdir -p "$SITE"
t0=$SECONDS
python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$WHEELS"/*.whl 2>&1 | tail -3
[ -f "$WHEELS/ops.tar.xz" ] && tar xJf "$WHEELS/ops.tar.xz" -C "$SITE"
export PYTHONPATH=$SITE:$PWD
echo "== installed in $((SECONDS - t0)) s"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, e3nn, torch_geometric as g; print('torch', torch.__version__, 'e3nn', e3nn.__version__, 'pyg', g.__version__)"
copy() { [ -n "${OUT:-}" ] && cp benchmarks/results/"$1"_cuda.json "$OUT"/ 2>/dev/null; true; }
step() {  # name limit command...
    local name=$1 limit=$2; shift 2
    local s=$SECONDS
    timeout "$limit" "$@" > "/tmp/$name.log" 2>&1
    echo "== $name: exit $? in $((SECONDS - s)) s"
    grep -E '^\||^cuEquivariance|Error|error' "/tmp/$name.log" | tail -40
    [ -n "${OUT:-}" ] && cp "/tmp/$name.log" "$OUT/$name.log"
}
step audit_gpu "${LIMIT_AUDIT:-170}" python3 benchmarks/audit_gpu.py --n 48 --repeat 1
copy audit_gpu
step mace_cueq "${LIMIT_MACE:-140}" python3 benchmarks/mace_cueq.py --n 4
copy mace_cueq
step tp_gpu_libraries "${LIMIT_TP:-110}" python3 benchmarks/tp_gpu_libraries.py --libs "gaunt (geolie)" cuEquivariance
copy tp_gpu_libraries
if ls "$WHEELS"/openequivariance-*.tar.gz >/dev/null 2>&1; then
    step oeq_install "${LIMIT_OEQ_INSTALL:-100}" python3 -m pip install --no-index --no-deps --no-build-isolation \
        --target "$SITE" "$WHEELS"/openequivariance-*.tar.gz
    mv benchmarks/results/tp_gpu_libraries_cuda.json /tmp/tp_main.json 2>/dev/null
    step tp_oeq "${LIMIT_OEQ:-90}" python3 benchmarks/tp_gpu_libraries.py --libs OpenEquivariance --C 32 64 --L 2 3 4 5
    mv benchmarks/results/tp_gpu_libraries_cuda.json benchmarks/results/tp_gpu_libraries_oeq_cuda.json 2>/dev/null
    mv /tmp/tp_main.json benchmarks/results/tp_gpu_libraries_cuda.json 2>/dev/null
    copy tp_gpu_libraries_oeq
fi
echo "== total $((SECONDS - t0)) s"
