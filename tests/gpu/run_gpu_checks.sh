#!/usr/bin/env bash
# GPU checks of the multi-scale deformable attention op, for a machine with an NVIDIA GPU (under 5 minutes):
#   1. builds sparse_detr._C with its CUDA kernels for this card (FORCE_CUDA=1, TORCH_CUDA_ARCH_LIST = its
#      compute capability), in place;
#   2. runs tests/test_ms_deform_attn.py (the CUDA twins included; Detectron2 is not needed, see light.py);
#   3. benchmarks the CUDA kernel against the grid_sample reference and, when it builds there, the peer
#      torch-ms-deform-attn 0.1.1 (its sdist is taken from .cache/peer_sdist: nothing is downloaded);
#   4. writes everything to $OUT (the device tool's folder) or else .cache/gpu_results/: summary.md (device,
#      steps, test summary, benchmark table) and the logs.
# On the device tool, from this checkout (the peer's sdist fetched here first, it is git-ignored):
#   .venv/bin/python -m pip download --no-deps --no-build-isolation --no-binary :all: \
#       torch-ms-deform-attn==0.1.1 -d .cache/peer_sdist
#   run(command="bash tests/gpu/run_gpu_checks.sh", carry=[".cache/peer_sdist"], timeout_s=420)
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
RESULTS="${OUT:-$ROOT/.cache/gpu_results}"
mkdir -p "$RESULTS"
SUMMARY="$RESULTS/summary.md"
PEER_DIR="$(mktemp -d)"
export PYTHONUNBUFFERED=1
DEADLINE=$(( $(date +%s) + 285 ))  # the whole script stays under 5 minutes
step() { echo "- $*" | tee -a "$SUMMARY"; }
budget() { local left=$(( DEADLINE - $(date +%s) )); echo $(( left < $1 ? (left > 5 ? left : 5) : $1 )); }

: >"$SUMMARY"
"$PY" - <<'PY' | tee -a "$SUMMARY"
import torch
assert torch.cuda.is_available(), "no GPU visible"
p = torch.cuda.get_device_properties(0)
print(f"# GPU checks: {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB; torch {torch.__version__} "
      f"(CUDA {torch.version.cuda})\n")
PY
[ "${PIPESTATUS[0]}" -eq 0 ] || { step "no usable GPU: stopping"; exit 1; }
CAP="$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')"
export FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$CAP}" MAX_JOBS="${MAX_JOBS:-$(nproc)}"
[ -n "${CUDA_HOME:-}" ] || { [ -d /usr/local/cuda ] && export CUDA_HOME=/usr/local/cuda; }

# The peer builds in the background meanwhile (its CUDA kernels take a while).
SDIST="$(ls .cache/peer_sdist/torch_ms_deform_attn-0.1.1.tar.gz 2>/dev/null || true)"
if [ -n "$SDIST" ]; then
  (timeout "$(budget 200)" "$PY" -m pip install -q --no-build-isolation --no-deps --no-index --target "$PEER_DIR" "$SDIST" \
    >"$RESULTS/peer_build.log" 2>&1; echo $? >"$RESULTS/peer_build.rc") &
  PEER_PID=$!
fi

start=$(date +%s)
if timeout "$(budget 170)" "$PY" setup.py -q build_ext --inplace >"$RESULTS/build.log" 2>&1; then
  step "build: sparse_detr._C with CUDA kernels for sm_${CAP/./} in $(( $(date +%s) - start )) s"
else
  step "build FAILED (exit $?): see build.log"; tail -30 "$RESULTS/build.log"; exit 1
fi

# Tests that start a fresh interpreter need the whole package (Detectron2): they ran on the CPU machines.
timeout "$(budget 90)" "$PY" tests/gpu/light.py -m pytest -q -rs -p no:cacheprovider tests/test_ms_deform_attn.py \
  -k "not extension_hidden and not baseline_instruction" >"$RESULTS/tests.log" 2>&1
rc=$?
step "tests/test_ms_deform_attn.py (exit $rc): $(tail -1 "$RESULTS/tests.log")"
grep -E "^(FAILED|ERROR)" "$RESULTS/tests.log" | head -20 | tee -a "$SUMMARY"

if [ -n "$SDIST" ]; then
  wait "$PEER_PID"
  step "peer build: exit $(cat "$RESULTS/peer_build.rc") (peer_build.log)"
else
  step "peer: .cache/peer_sdist/torch_ms_deform_attn-0.1.1.tar.gz not carried; benchmark without it"
fi

echo -e "\n## Op benchmark (CUDA)\n" >>"$SUMMARY"
timeout "$(budget 60)" "$PY" tests/gpu/light.py projects/SparseDETR/benchmark_ops.py --device cuda --repeats 20 --warmup 3 \
  --peer-path "$PEER_DIR" --output "$RESULTS/benchmark_cuda.md" >"$RESULTS/benchmark.log" 2>&1
rc=$?
if [ $rc -eq 0 ]; then cat "$RESULTS/benchmark_cuda.md" >>"$SUMMARY"; else step "benchmark FAILED (exit $rc)"; tail -20 "$RESULTS/benchmark.log" | tee -a "$SUMMARY"; fi
cat "$SUMMARY"
