#!/usr/bin/env bash
# One GPU call for the warp-specialised forward branch (wip/ws-all): build, its tests (FLASH_ATTN2_FWD_WS=require),
# sanitizers, A/B against the default kernels and ping-pong on/off, then the suite with it on.
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
  FA2_SANITIZE=ws timeout 60 compute-sanitizer --tool $tool --error-exitcode 9 python3 scripts/sanitize_cases.py \
    >"$OUT/${tool}_ws.log" 2>&1
  echo "$tool rc $?: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/${tool}_ws.log" | tail -1)"
done
timeout 120 python3 scripts/ab_forward.py $lib,FLASH_ATTN2_FWD_WS=0 $lib,FLASH_ATTN2_FWD_WS=1 --head-dims 64,128,256 \
  --lengths 2048,16384 --causal-lengths 2048,16384 | tee "$OUT/ab_ws.md"
timeout 60 python3 scripts/ab_forward.py $lib,FLASH_ATTN2_FWD_WS=1,FLASH_ATTN2_FWD_WS_PINGPONG=0 \
  $lib,FLASH_ATTN2_FWD_WS=1 --head-dims 128 --lengths 16384 --causal-lengths 8192 --mods none,softcap,dropout \
  | tee "$OUT/ab_pingpong.md"
FLASH_ATTN2_FWD_WS=1 timeout 200 python3 -m pytest python/tests -q -rfE -p no:cacheprovider \
  -k "not (bad or errors or refused)" >"$OUT/pytest_ws_on.log" 2>&1
echo "whole suite with FLASH_ATTN2_FWD_WS=1 rc $?: $(tail -1 "$OUT/pytest_ws_on.log")"
grep -E "^(FAILED|ERROR)" "$OUT/pytest_ws_on.log" | head -20
