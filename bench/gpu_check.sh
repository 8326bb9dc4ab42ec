#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU and no network:
#
#     bash bench/gpu_check.sh            # results under $OUT (if set) or out/gpu_check/
#
# It installs carried wheels from .whl/ (if any), builds the native extension in place, runs every GPU
# test (pytest -m gpu) and the GPU micro-benchmarks, and stops within ~8 minutes (each step has a
# timeout). The machine's python3 must already hold torch (with CUDA), numpy and pytest.
#
# Wheels to carry (Python 3.12, manylinux x86_64) when the image lacks them: cffi and pycparser always;
# cuda-bindings (the test oracle) only if `python3 -c "import cuda.bindings"` fails there. Fetch them
# on a networked machine, in the repo root:
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl cffi pycparser
#
# Adding a step: write a function step_NAME that returns nonzero on failure, and append NAME to STEPS
# (keep the total under 8 minutes; give it a `timeout`). Every step's output goes to the log.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${OUT:-$ROOT/out/gpu_check}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

STEPS=(install build info pytest_gpu bench_native_map bench_gpu_attention)

step_install() {
    if compgen -G ".whl/*.whl" > /dev/null; then
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/vmem-site .whl/*.whl || return 1
        export PYTHONPATH="/tmp/vmem-site${PYTHONPATH:+:$PYTHONPATH}"
    fi
    $PY -c "import cffi, torch, numpy, pytest; print('cffi', cffi.__version__, 'torch', torch.__version__, \
'cuda', torch.cuda.is_available())"
}

step_build() {
    # in place, no pip: the build needs only cffi and a C compiler
    rm -f vmem/_native/_vmem_cffi*.so
    timeout 120 $PY -c "import sys; sys.path.insert(0, 'vmem/_native'); import build; \
build.ffibuilder.compile(tmpdir='.', verbose=False)" || return 1
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
    $PY -c "import vmem; print('vmem', vmem.__version__, 'native ok')"
}

step_info() {
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
    $PY -c "from vmem.backends import get_backend; b = get_backend('cuda'); print(b, b.info())"
}

step_pytest_gpu() {
    timeout 240 $PY -m pytest -q -m gpu -p no:cacheprovider -o addopts="" tests \
        --junitxml="$OUT/pytest_gpu.xml"
}

step_bench_native_map() {
    timeout 150 $PY bench/native_map.py --backend cuda --repeats 5 \
        --json "$OUT/native_map_cuda.json" --png "$OUT/native_map_cuda.png"
}

step_bench_gpu_attention() {
    # decode + prefill with unmodified kernels on vmem's CUDA tensors vs a paged layout
    timeout 200 $PY bench/gpu_attention.py --json "$OUT/gpu_attention.json" --png "$OUT/gpu_attention.png"
}

status=0
: > "$LOG"
for s in "${STEPS[@]}"; do
    t0=$(date +%s)
    echo "=== step $s" | tee -a "$LOG"
    if "step_$s" >> "$LOG" 2>&1; then r=ok; else r=FAILED; status=1; fi
    echo "=== step $s: $r ($(( $(date +%s) - t0 )) s)" | tee -a "$LOG"
    if [ "$s" = build ] && [ "$r" = FAILED ]; then break; fi
done
tail -n 40 "$LOG"
exit $status
