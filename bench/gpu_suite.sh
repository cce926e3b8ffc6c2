#!/usr/bin/env bash
# One device command: install the carried wheels, run every `cuda` test file and the 1B runtime bench,
# each in its own process (AOTInductor compiles are CPU-bound; 16 cores run them side by side), logs
# under $OUT/logs, a summary last. Artifacts are cached under out/ (git-ignored) for the next call.
#   run: source .whl/setup.sh && bash bench/gpu_suite.sh [groups...]
#   (groups: kernels runtime e2e bench1b sdpa sdpa_chunk linear chunk)
set -u
OUT=${OUT:-out/gpu}
mkdir -p "$OUT/logs" out
export ETSPEC_CUDA_ART_CACHE=$PWD/out/cuda_art
groups=${*:-kernels runtime e2e bench1b}
declare -A cmd=(
  [kernels]="python -m pytest -m cuda -q -rA tests/kernels"
  [runtime]="python -m pytest -m cuda -q -rA tests/runtime/test_aoti_cuda.py tests/export/test_lower.py"
  [e2e]="python -m pytest -m cuda -q -rA -s tests/runner/test_cuda_e2e.py"
  [bench1b]="python bench/bench_runtime_1b.py"
  [sdpa]="python bench/bench_sdpa_midm.py"
  [sdpa_chunk]="python bench/bench_sdpa_chunk.py --sweep"
  [linear]="python bench/bench_linear_rows.py"
  [chunk]="python bench/bench_linear_rows.py --chunk"
)
for g in $groups; do
  ( start=$(date +%s); ${cmd[$g]} > "$OUT/logs/$g.log" 2>&1; rc=$?
    echo "$g rc=$rc $(( $(date +%s) - start ))s" > "$OUT/logs/$g.rc" ) &
done
wait
for g in $groups; do
  echo "=== $g: $(cat "$OUT/logs/$g.rc")"
  grep -E "passed|failed|error|Error" "$OUT/logs/$g.log" | tail -n 8
done
