#!/usr/bin/env bash
# One GPU call for the warp-specialised forward: build, its tests (FLASH_ATTN2_FWD_WS=require), sanitizers,
# A/B against the other Hopper forward (FLASH_ATTN2_FWD_WS=0 vs =1) over d64/128/256, then the whole suite with
# it off (the default turns it on for d128 / d256).
#   scripts/ws_check.sh        (OUT overrides the output folder; each step has its own time limit)
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/flash_attn2_ws}
mkdir -p "$OUT"
scripts/gpu_check.sh none 2>&1 | tail -3
export FLASH_ATTN2_LIBRARY=$PWD/build/gpu/libflash_attn2.so PYTHONPATH=$PWD/python PYTHONUNBUFFERED=1
lib=$FLASH_ATTN2_LIBRARY
timeout 90 python3 -m pytest python/tests/test_kernels.py python/tests/test_variants.py -q -rfE -k warp_specialised \
  -p no:cacheprovider >"$OUT/pytest_ws_require.log" 2>&1
echo "WS tests (require) rc $?: $(tail -1 "$OUT/pytest_ws_require.log")"
grep -E "^(FAILED|ERROR)" "$OUT/pytest_ws_require.log" | head -20
for tool in memcheck racecheck synccheck; do
  FA2_SANITIZE=ws timeout 90 compute-sanitizer --tool $tool --error-exitcode 9 python3 scripts/sanitize_cases.py \
    >"$OUT/${tool}_ws.log" 2>&1
  echo "$tool rc $?: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/${tool}_ws.log" | tail -1)"
done
timeout 150 python3 scripts/ab_forward.py $lib,FLASH_ATTN2_FWD_WS=0 $lib,FLASH_ATTN2_FWD_WS=1 --head-dims 64,128,256 \
  --lengths 2048,16384 --causal-lengths 2048,16384 ${AB_ARGS:-} | tee "$OUT/ab_ws.md"
# The persistent walk vs one tile per block (the kernel before it).
timeout 150 python3 scripts/ab_forward.py $lib,FLASH_ATTN2_FWD_WS=1,FLASH_ATTN2_FWD_WS_BLOCKS=all \
  $lib,FLASH_ATTN2_FWD_WS=1 --head-dims 64,128,256 --lengths 2048,16384 --causal-lengths 2048,16384 \
  | tee "$OUT/ab_persistent.md"
FLASH_ATTN2_FWD_WS=${SUITE_WS:-0} timeout 200 python3 -m pytest python/tests -q -rfE -p no:cacheprovider \
  -k "not (bad or errors or refused)" >"$OUT/pytest_suite.log" 2>&1
echo "whole suite with FLASH_ATTN2_FWD_WS=${SUITE_WS:-0} rc $?: $(tail -1 "$OUT/pytest_suite.log")"
grep -E "^(FAILED|ERROR)" "$OUT/pytest_suite.log" | head -20
