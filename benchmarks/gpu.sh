#!/usr/bin/env bash
# On a CUDA machine: the CUDA tests and the benchmarks, results in benchmarks/results/*_cuda.json (+ .png) and logs
# in ${LOGS:-benchmarks/results/logs}. Usage: benchmarks/gpu.sh [step ...] with steps tests, tensor_products,
# lie_derivative, frame_averaging, audit (default: all, in that order). Each step runs under its own time limit
# (STEP_LIMIT seconds, default 600); a failed step does not stop the next one.
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
LOGS=${LOGS:-benchmarks/results/logs}
LIMIT=${STEP_LIMIT:-600}
mkdir -p "$LOGS"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, e3nn, torch_geometric as g; print('torch', torch.__version__, 'e3nn', e3nn.__version__, 'pyg', g.__version__)"
[ $# -eq 0 ] && set -- tests tensor_products lie_derivative frame_averaging audit
for name in "$@"; do
    case $name in
        tests) cmd=(python3 -m pytest -q tests/test_cuda.py) ;;
        tensor_products) cmd=(python3 benchmarks/tensor_products.py --device cuda --compiled grid dense --compile-L 7) ;;
        lie_derivative) cmd=(python3 benchmarks/lie_derivative.py --device cuda --sizes 10 30 100 300 1000) ;;
        frame_averaging) cmd=(python3 benchmarks/frame_averaging.py --device cuda --structures 32 256) ;;
        audit) cmd=(python3 benchmarks/audit.py --device cuda --models schnet e3nn) ;;
        *) echo "unknown step $name"; exit 2 ;;
    esac
    t0=$SECONDS
    timeout "$LIMIT" "${cmd[@]}" >"$LOGS/$name.log" 2>&1
    echo "== $name: exit $? in $((SECONDS - t0)) s"
    tail -n 30 "$LOGS/$name.log"
done
