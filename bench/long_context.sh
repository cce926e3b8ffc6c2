#!/usr/bin/env bash
# The long-context runs on the GPU box, one after another (one export on the GPU at a time):
#   1. Gemma-4-31B's widths with 12 layers (two 5 sliding + 1 full periods), max_seq_len 128K, k = 5:
#      export, then 4K and 64K prompts: target-only, simulated and own-draft speculative, the own-draft
#      tokens checked against target-only's (bench_e2e.py --lossless);
#   2. the K = V head_dim-512 full layer's verify attention at 4K..128K, etspec::sdpa_midm_shared_kv
#      against what --no-midm-sdpa runs (bench_sdpa_midm.py);
#   3. Llama-3.2-1B's shape at max_seq_len 128K with a 120K-token prompt, same checks.
# Each step logs to DIR/<step>.log; the results files land in DIR (default out/long_context). STEPS
# picks some of gemma4 (1), sdpa (2), 1b (3); default all. EXPORT_ARGS go to both exports (e.g.
# "--linear-chunk --sdpa-chunk": prefill through the fixed-config kernels, nothing autotuned).
#   bash bench/bg.sh start lc bash bench/long_context.sh [DIR [STEPS...]]; then: bash bench/bg.sh wait 590
set -u
R=${1:-out/long_context}
shift $(($# > 0 ? 1 : 0))
steps=${*:-gemma4 sdpa 1b}
mkdir -p "$R"
unset OUT # a background job outlives the call whose $OUT it inherited; a later call copies $R
source "$(dirname "$0")/steps.sh"
g4=(--shape gemma-4-31b-12l --max-seq 131072 --ks 5 --work out/lc_gemma4)
l1=(--shape llama-3.2-1b --max-seq 131072 --ks 5 --work out/lc_1b)
run=(--peers none --lossless --tag 128k --out "$R")
if [[ " $steps " == *" gemma4 "* ]]; then
  # a failed export is not retried by the run step (it would export again)
  step export_gemma4 python bench/bench_e2e.py "${g4[@]}" --phase export "--export-args=${EXPORT_ARGS:-}" &&
    step run_gemma4 python bench/bench_e2e.py "${g4[@]}" --contexts 4096,65536 "${run[@]}"
fi
if [[ " $steps " == *" sdpa "* ]]; then
  step sdpa_gemma4 python bench/bench_sdpa_midm.py --models gemma4-31b-full --out "$R"
fi
if [[ " $steps " == *" 1b "* ]]; then
  step export_1b python bench/bench_e2e.py "${l1[@]}" --phase export "--export-args=${EXPORT_ARGS:-}" &&
    step run_1b python bench/bench_e2e.py "${l1[@]}" --contexts 122880 "${run[@]}"
fi
