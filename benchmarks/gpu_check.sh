#!/usr/bin/env bash
# Everything that needs a GPU, in one command, on a fresh GPU machine (torch with CUDA, triton,
# nvcc, ninja, pybind11 present; no network), in under 8 minutes:
#
#   bash benchmarks/gpu_check.sh            # results in benchmarks/results/, logs in $OUT or /tmp
#
# 1. builds kdops with its CUDA kernels (pip install --no-build-isolation --no-deps -e .);
# 2. runs the test suite's CUDA and Triton cases (GPU tests that skip on CPU machines);
# 3. the op benchmarks (benchmarks.run), the per-call overhead and the recipe benchmark
#    (and with KDOPS_GPU_GAINS=1 the multi-seed gains benchmark, benchmarks.gains);
# 4. copies the results files to $OUT (the device tool brings that folder back) and prints
#    where each went. Commit benchmarks/results/<gpu>*.json and rerun `python -m benchmarks.report`.
#
# Each step has its own time limit, and a step that fails does not stop the later ones: a
# short lease still brings back whatever finished. The exit status is that of the tests.
set -uo pipefail
cd "$(dirname "$0")/.."
LOGS="${OUT:-/tmp/kdops-gpu-check}"
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}"
started=$(date +%s)
step() {  # step NAME SECONDS COMMAND...: run with a limit, log to $LOGS/NAME.log, report
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  timeout "$limit" "$@" >"$LOGS/$name.log" 2>&1
  local rc=$?
  echo "[gpu_check] $name: exit $rc in $(( $(date +%s) - t0 )) s (log $LOGS/$name.log)"
  tail -n 3 "$LOGS/$name.log" | sed "s/^/[gpu_check]   /"
  return $rc
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
step build 240 python -m pip install --no-build-isolation --no-deps -e . || { echo "[gpu_check] build failed"; exit 1; }
step info 60 python -m kdops.info
step tests 200 python -m pytest tests -q -x -k "cuda or triton" -p no:cacheprovider
tests_rc=$?
step ops 150 python -m benchmarks.run --repeats 20
step overhead 40 python -m benchmarks.overhead --device cuda
step recipes 150 python -m benchmarks.recipes --device cuda
# Optional (KDOPS_GPU_GAINS=1): the multi-seed gains benchmark on the GPU, the toy data sets'
# students at a few ms per step; results in benchmarks/results/nvidia-*-gains.json.
if [ -n "${KDOPS_GPU_GAINS:-}" ]; then
  step gains 300 python -m benchmarks.gains --device cuda --threads 1 --work-dir "${TMPDIR:-/tmp}/kdops-gains"
fi
if [ -n "${OUT:-}" ]; then
  cp benchmarks/results/nvidia-*.json "$OUT"/ 2>/dev/null || true
fi
echo "[gpu_check] done in $(( $(date +%s) - started )) s; results: $(ls benchmarks/results/nvidia-*.json 2>/dev/null | tr '\n' ' ')"
exit $tests_rc
