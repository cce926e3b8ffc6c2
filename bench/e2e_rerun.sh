#!/usr/bin/env bash
# The 8B and 1B end-to-end measurements on one GPU box, in the order docs/PERFORMANCE.md asks for:
#   export  both k = KS exports, side by side on a GPU with room for both (with --linear-chunk they
#           tune only prefill's attention matmuls, so sharing the GPU picks none of the other kernels);
#   run     each shape alone: target-only, simulated and own-draft speculative (--lossless), eager and
#           with CUDA graphs, at 1K/16K/32K;
#   profile each shape's target_verify kernel table (1 and KS+1 rows; the 8B shape at 1K and 32K).
# After the exports, each shape is run then profiled, the 8B shape first.
# Logs and results land in DIR (default out/e2e_rerun). STEPS picks some of export, run, profile.
#   bash bench/bg.sh start rr bash bench/e2e_rerun.sh [DIR [STEPS...]]
# Environment: KS (default 5), MAX_SEQ (65536; 40960 on a GPU under 100 GB), EXPORT_ARGS (e.g.
# "--linear-chunk --sdpa-chunk": then no method tunes), CONTEXTS (1024,16384,32768), SHAPES ("llama-3.1-8b llama-3.2-1b": one of them alone
# where the GPU time is short; on an H100 the two exports run one after the other).
set -u
R=${1:-out/e2e_rerun}
shift $(($# > 0 ? 1 : 0))
steps=${*:-export run profile}
mkdir -p "$R"
unset OUT # a background job outlives the call whose $OUT it inherited; a later call copies $R
KS=${KS:-5}
mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -n 1)
# an 80 GB card exports the 8B shape at 40960 positions (peak 74.5 GiB), not at 65536
[ "$mib" -ge 100000 ] || MAX_SEQ=${MAX_SEQ:-40960}
MAX_SEQ=${MAX_SEQ:-65536}
common=(--ks "$KS" --max-seq "$MAX_SEQ")
SHAPES=${SHAPES:-llama-3.1-8b llama-3.2-1b}
source "$(dirname "$0")/steps.sh"
if [[ " $steps " == *" export "* ]]; then
  for s in $SHAPES; do # the checkpoints first: each export reads its own
    step "ckpt_$s" python bench/bench_e2e.py --shape "$s" --phase ckpt "${common[@]}"
  done
  # side by side only where both fit: on an 80 GB H100 the 8B export (max_seq_len 40960) peaks at
  # 74.5 GiB, and a 1B export beside it ran out of memory (docs/PERFORMANCE.md)
  for s in $SHAPES; do
    step "export_$s" python bench/bench_e2e.py --shape "$s" --phase export "${common[@]}" \
      "--export-args=${EXPORT_ARGS:-}" &
    [ "$mib" -ge 100000 ] || wait
  done
  wait
fi
# each shape's run, then its profile, in SHAPES' order
for s in $SHAPES; do
  art="out/e2e_$s/art_k$KS" # bench_e2e.py's --work for this max_seq_len
  [ "$MAX_SEQ" = 65536 ] || art="out/e2e_${s}_$MAX_SEQ/art_k$KS"
  [ -e "$art/manifest.json" ] || { echo "== $s skipped: no export in $art"; continue; }
  if [[ " $steps " == *" run "* ]]; then
    step "run_$s" python bench/bench_e2e.py --shape "$s" --phase run "${common[@]}" --peers none \
      --lossless --contexts "${CONTEXTS:-1024,16384,32768}" --out "$R"
  fi
  if [[ " $steps " == *" profile "* ]]; then
    ctx=1024,32768
    [ "$s" = llama-3.2-1b ] && ctx=1024
    step "profile_$s" python bench/profile_method.py "$art" --ctx "$ctx" --rows "1,$((KS + 1))" \
      --json "$R/profile_target_verify_$s.json"
  fi
done
