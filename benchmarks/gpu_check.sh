#!/usr/bin/env bash
# Everything that needs a GPU, in one command on a fresh GPU machine (torch with CUDA, triton,
# nvcc, ninja, pybind11 present; no network), inside one time budget:
#
#   bash benchmarks/gpu_check.sh              # results in benchmarks/results/ (and $OUT), logs in $OUT
#   KDOPS_GPU_BUDGET_S=560 bash benchmarks/gpu_check.sh
#   KDOPS_GPU_STEPS="errors tests fuzz" bash benchmarks/gpu_check.sh   # some steps only
#   KDOPS_GPU_STEPS="bench" KDOPS_GPU_BENCH_OPS="attention_loss" bash benchmarks/gpu_check.sh
#
# Steps (KDOPS_GPU_STEPS, default all; the build always runs): errors, bench, profile, recipes,
# gains (also needs KDOPS_GPU_GAINS=1), tests, fuzz.
#
# 1. build: kdops with its CUDA kernels for this GPU's architecture only;
# 2. bench: the fused variants (cuda, triton) of every op benchmark, then eager/compile of the
#    cases no stored results file has (the prototype ops), on a quiet GPU; and where the time of
#    the slow fused ops goes (benchmarks.profile_ops: their kernels, from torch.profiler);
# 3. recipes: the device's matmul rates (the yardstick of the correlation GEMMs), the per-call
#    overhead and the recipe benchmark (and with KDOPS_GPU_GAINS=1 the multi-seed gains
#    benchmark, benchmarks.gains);
# 4. tests: the CUDA and Triton cases of the test suite (5 processes side by side) and, beside
#    them, the deep fuzz run of channel_kl / pixel_kl on the cuda and triton backends: lanes of
#    500-example chunks with distinct hypothesis seeds until the time is up, counted in
#    fuzz-summary.log (a chunk cut by the deadline counts for nothing).
#
# Every step has a time limit cut to what the budget leaves (steps after it keep a reserve), a
# step that fails does not stop the later ones, and the benchmarks write their results files
# after every case: a short lease still brings back whatever finished. Results files and logs
# are copied to $OUT. Exit status: 0 when every test process and fuzz chunk that ran passed.
set -uo pipefail
cd "$(dirname "$0")/.."
# Logs gather in a scratch folder and reach $OUT as one archive (a lease brings back a limited
# number of files: dozens of fuzz-chunk logs once crowded out the results files).
LOGS=$(mktemp -d /tmp/kdops-gpu-check.XXXX)
export PYTHONUNBUFFERED=1
started=$(date +%s)
budget=${KDOPS_GPU_BUDGET_S:-560}
left() { echo $(( budget - ($(date +%s) - started) )); }
steps=" ${KDOPS_GPU_STEPS:-errors bench profile recipes gains tests fuzz} "
want() { [[ "$steps" == *" $1 "* ]]; }

# step NAME LIMIT RESERVE COMMAND...: run COMMAND for at most min(LIMIT, time left − RESERVE) s.
step() {
  local name=$1 limit=$2 reserve=$3; shift 3
  local allowed=$(( $(left) - reserve )); (( allowed < limit )) && limit=$allowed
  if (( limit < 10 )); then echo "[gpu_check] $name: skipped (budget spent)"; return 124; fi
  local t0=$(date +%s)
  timeout "$limit" "$@" >"$LOGS/$name.log" 2>&1
  local rc=$?
  echo "[gpu_check] $name: exit $rc in $(( $(date +%s) - t0 )) s of $limit (log $name.log)"
  tail -n 4 "$LOGS/$name.log" | sed "s/^/[gpu_check]   /"
  return $rc
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
arch=$(python -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
ncpu=$(nproc)

# --- 1. build --------------------------------------------------------------------------------
# KDOPS_GPU_VARIANT_ENV (e.g. "KDOPS_PORTABLE=1"): a second build with that environment, in a
# copy of the sources beside the first, whose argument errors cuda_error_repro checks too.
variant_env=${KDOPS_GPU_VARIANT_ENV:-}
if [ -n "$variant_env" ]; then
  variant_dir=/tmp/kdops-variant; rm -rf "$variant_dir"; mkdir -p "$variant_dir"
  cp -r csrc kdops models benchmarks setup.py requirements*.txt "$variant_dir"/
  rm -f "$variant_dir"/kdops/_C*.so
  ( cd "$variant_dir" && env $variant_env TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS=$(( ncpu / 2 )) \
      timeout 200 python setup.py build_ext --inplace >"$LOGS/build-variant.log" 2>&1 ) &
  variant_pid=$!
  jobs=$(( ncpu / 2 ))
else
  jobs=$ncpu
fi
TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS="$jobs" \
  step build 240 100 python -m pip install --no-build-isolation --no-deps -e . \
  || echo "[gpu_check] build failed: the cuda cases below skip, the triton ones still run"
if [ -n "$variant_env" ]; then
  wait "$variant_pid"; echo "[gpu_check] variant build ($variant_env): exit $?"; tail -n 2 "$LOGS/build-variant.log"
fi
step info 30 90 python -m kdops.info
# An argument error inside a CUDA op once crashed the process (H200, torch 2.11): say so first.
want errors && step cuda-errors 90 90 python -m benchmarks.cuda_error_repro --gdb
if want errors && [ -n "$variant_env" ]; then
  ( cd "$variant_dir" && PYTHONPATH="$variant_dir" timeout 60 python -m benchmarks.cuda_error_repro ) \
    >"$LOGS/cuda-errors-variant.log" 2>&1
  echo "[gpu_check] argument errors with the variant build ($variant_env):"; sed "s/^/[gpu_check]   /" "$LOGS/cuda-errors-variant.log" | grep -v "^\[gpu_check\]   \s" | head -n 30
fi

# --- 2. op benchmarks on a quiet GPU ---------------------------------------------------------
# KDOPS_GPU_BENCH_OPS (e.g. "attention_loss class_attention_loss"): only those ops' cases.
want bench && step bench-fused 150 230 python -m benchmarks.run --variants ${KDOPS_GPU_BENCH_VARIANTS:-cuda triton} \
  ${KDOPS_GPU_BENCH_OPS:+--ops $KDOPS_GPU_BENCH_OPS} --repeats 20
want profile && step profile 60 210 python -m benchmarks.profile_ops

# --- 3. matmul rates, per-call overhead and recipes -----------------------------------------
want bench && [ ! -f benchmarks/results/nvidia-h200-matmul.json ] && step matmul-rate 20 195 python -m benchmarks.matmul_rate
want recipes && step overhead 25 190 python -m benchmarks.overhead --device cuda
want recipes && step recipes 90 170 python -m benchmarks.recipes --device cuda
# Optional (KDOPS_GPU_GAINS=1): the multi-seed gains benchmark on the GPU, the toy data sets'
# students at a few ms per step; results in benchmarks/results/nvidia-*-gains.json.
if want gains && [ -n "${KDOPS_GPU_GAINS:-}" ]; then
  step gains 300 170 python -m benchmarks.gains --device cuda --threads 1 --work-dir "${TMPDIR:-/tmp}/kdops-gains"
fi

# --- 4. tests and the deep fuzz run, side by side --------------------------------------------
tests_deadline=$(( started + budget - 15 ))
# pytest-xdist, where present, runs each group in two workers and replaces a worker that crashes
# (the crash is then one failed test, and the group goes on).
xdist=(); python -c "import xdist" 2>/dev/null && xdist=(-n 2 --max-worker-restart 20)
run_tests() {  # NAME FILES...: one pytest process over FILES, CUDA and Triton cases only
  local name=$1; shift
  timeout $(( tests_deadline - $(date +%s) )) python -m pytest "$@" -rfE -p no:cacheprovider \
    "${xdist[@]}" -v -k "cuda or triton" >"$LOGS/tests-$name.log" 2>&1
  local rc=$? log="$LOGS/tests-$name.log"
  echo "[gpu_check] tests-$name: exit $rc ($(tail -n 1 "$log" | cut -c1-120)); so far $(grep -c " PASSED " "$log") passed, $(grep -c " FAILED " "$log") failed, $(grep -c " SKIPPED " "$log") skipped"
}
chunk_examples=${KDOPS_GPU_FUZZ_CHUNK:-500}
fuzz_lane() {  # BACKEND LANE: chunks of $chunk_examples examples of the softmax-KL fuzz tests until the deadline
  local backend=$1 lane=$2 chunk=0
  while (( $(date +%s) + 20 < tests_deadline )); do
    local seed=$(( 100000 * lane + chunk ))
    KDOPS_FUZZ_EXAMPLES=$chunk_examples KDOPS_FUZZ_SEED=random KDOPS_FUZZ_SHRINK=0 timeout $(( tests_deadline - $(date +%s) )) \
      python -m pytest tests/fuzz/test_softmax_kl.py -q -p no:cacheprovider -k "cuda-$backend" \
      --hypothesis-seed="$seed" >"$LOGS/fuzz-$backend-$lane-$chunk.log" 2>&1
    echo "$backend seed=$seed exit=$? $(tail -n 1 "$LOGS/fuzz-$backend-$lane-$chunk.log")" >>"$LOGS/fuzz-chunks.log"
    chunk=$(( chunk + 1 ))
  done
}
t0=$(date +%s)
pids=()
# One CPU thread per process: the test workers and fuzz lanes already fill the cores, and
# torch's default (a thread per core in each of 16 processes) oversubscribes them; the fuzz
# oracles run in float64 on the CPU (a CUDA fuzz example cost ~0.1 s with the default).
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
if want tests; then
run_tests correlation tests/ops/test_correlation.py tests/ops/test_correlation_api.py tests/triton/test_correlation_triton.py & pids+=($!)
run_tests prototypes tests/ops/test_prototypes.py tests/ops/test_prototypes_api.py tests/triton/test_prototypes_triton.py & pids+=($!)
run_tests softmax-kl tests/ops/test_softmax_kl.py tests/ops/test_softmax_kl_regressions.py tests/triton/test_softmax_kl_triton.py & pids+=($!)
run_tests attention tests/ops/test_attention.py tests/ops/test_attention_api.py $(ls tests/triton/test_attention*.py 2>/dev/null) & pids+=($!)
run_tests resized-kl tests/ops/test_resized_pixel_kl.py tests/triton/test_resized_pixel_kl_triton.py & pids+=($!)
run_tests rest tests --ignore=tests/ops/test_correlation.py --ignore=tests/ops/test_correlation_api.py \
  --ignore=tests/triton/test_correlation_triton.py --ignore=tests/ops/test_prototypes.py \
  --ignore=tests/ops/test_prototypes_api.py --ignore=tests/triton/test_prototypes_triton.py \
  --ignore=tests/ops/test_softmax_kl.py --ignore=tests/ops/test_softmax_kl_regressions.py \
  --ignore=tests/triton/test_softmax_kl_triton.py --ignore=tests/ops/test_attention.py \
  --ignore=tests/ops/test_attention_api.py $(ls tests/triton/test_attention*.py 2>/dev/null | sed 's/^/--ignore=/') \
  --ignore=tests/ops/test_resized_pixel_kl.py --ignore=tests/triton/test_resized_pixel_kl_triton.py & pids+=($!)
fi
# One core per process: 6 test processes, the rest fuzz lanes, most of them on Triton (issue 7's
# deep run needs it; the CUDA kernels share their numerics code with the CPU ones fuzzed here).
# With the tests (2 xdist workers each) 6 cores are left for fuzz lanes; without them, all.
if want fuzz; then
  if want tests; then lanes=$(( ncpu - 12 )); else lanes=$(( ncpu - 1 )); fi; (( lanes < 2 )) && lanes=2
  [ -n "${KDOPS_GPU_FUZZ_LANES:-}" ] && lanes=$KDOPS_GPU_FUZZ_LANES
  cuda_lanes=$(( lanes / 3 )); (( cuda_lanes < 1 )) && cuda_lanes=1; triton_lanes=$(( lanes - cuda_lanes ))
  for lane in $(seq 1 "$triton_lanes"); do fuzz_lane triton "$lane" & pids+=($!); done
  for lane in $(seq 1 "$cuda_lanes"); do fuzz_lane cuda "$lane" & pids+=($!); done
fi
tests_rc=0
for pid in "${pids[@]}"; do wait "$pid"; done
echo "[gpu_check] tests + fuzz: $(( $(date +%s) - t0 )) s"
grep -h "^FAILED\|crashed while running" "$LOGS"/tests-*.log | sort -u | head -n 30 | cut -c1-250 | sed "s/^/[gpu_check]   /"
grep -l " FAILED \|^FAILED" "$LOGS"/tests-*.log >/dev/null 2>&1 && tests_rc=1
python - "$LOGS/fuzz-chunks.log" "$chunk_examples" <<'EOF' | tee "$LOGS/fuzz-summary.log"
import collections, re, sys
passed, failed, skipped = collections.Counter(), collections.Counter(), collections.Counter()
for line in open(sys.argv[1]) if __import__("os").path.exists(sys.argv[1]) else []:
    backend, seed, status = line.split()[:3]
    if status == "exit=0" and re.search(r"\b3 passed\b", line):
        passed[backend] += 1
    elif status == "exit=0" and re.search(r"\b3 skipped\b", line):  # e.g. the extension not built
        skipped[backend] += 1
    elif status not in ("exit=124", "exit=143"):  # a chunk cut by the deadline counts for nothing
        failed[backend] += 1
for backend in sorted(set(passed) | set(failed) | set(skipped)):
    print(f"[gpu_check] fuzz softmax_kl on {backend}: {int(sys.argv[2]) * passed[backend]} examples per test "
          f"(channel_kl, pixel_kl, bad inputs) in {passed[backend]} passing chunks; "
          f"{failed[backend]} failing chunks, {skipped[backend]} skipped chunks")
sys.exit(1 if sum(failed.values()) else 0)
EOF
fuzz_rc=${PIPESTATUS[0]}
failing=$(grep -l "Falsifying\|FAILED\|Error" "$LOGS"/fuzz-*-*.log 2>/dev/null | head -n 3)
for log in $failing; do
  echo "[gpu_check] failing fuzz log $(basename "$log"):"
  grep -A 30 "Falsifying\|^E " "$log" | head -n 40 | sed "s/^/[gpu_check]   /"
done

if [ -n "${OUT:-}" ]; then
  cp benchmarks/results/nvidia-*.json "$OUT"/ 2>/dev/null || true
  tar -czf "$OUT/logs.tar.gz" -C "$LOGS" . && echo "[gpu_check] logs: \$OUT/logs.tar.gz"
  cp "$LOGS"/fuzz-summary.log "$LOGS"/build.log "$OUT"/ 2>/dev/null || true
  for log in $failing; do cp "$log" "$OUT"/; done
fi
echo "[gpu_check] done in $(( $(date +%s) - started )) s; results: $(ls benchmarks/results/nvidia-*.json 2>/dev/null | tr '\n' ' ')"
(( tests_rc || fuzz_rc )) && exit 1
exit 0
