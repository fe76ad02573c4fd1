#!/usr/bin/env bash
# One GPU call for the warp-specialised d128 backward (FLASH_ATTN2_BWD_WS): build, its tests
# (=require), sanitizers, A/B against flash_bwd_sm90_kernel, then the whole suite with it on.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/flash_attn2_wsbwd}
mkdir -p "$OUT"
scripts/gpu_check.sh none 2>&1 | tail -3
export FLASH_ATTN2_LIBRARY=$PWD/build/gpu/libflash_attn2.so PYTHONPATH=$PWD/python PYTHONUNBUFFERED=1
lib=$FLASH_ATTN2_LIBRARY
timeout 120 python3 -m pytest python/tests/test_kernels.py python/tests/test_variants.py -q -rfE \
  -k warp_specialised_backward -p no:cacheprovider >"$OUT/pytest_wsbwd_require.log" 2>&1
echo "WS backward tests (require) rc $?: $(tail -1 "$OUT/pytest_wsbwd_require.log")"
grep -E "^(FAILED|ERROR)|Error" "$OUT/pytest_wsbwd_require.log" | head -20
for tool in memcheck racecheck synccheck; do
  FA2_SANITIZE=wsbwd timeout 120 compute-sanitizer --tool $tool --error-exitcode 9 python3 scripts/sanitize_cases.py \
    >"$OUT/${tool}_wsbwd.log" 2>&1
  echo "$tool rc $?: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/${tool}_wsbwd.log" | tail -1)"
done
timeout 150 python3 scripts/ab_forward.py $lib,FLASH_ATTN2_BWD_WS=0 $lib,FLASH_ATTN2_BWD_WS=1 --direction bwd \
  --head-dims 128 --lengths 2048,16384 --causal-lengths 2048,16384 --mods none,softcap,dropout | tee "$OUT/ab_wsbwd.md"
FLASH_ATTN2_BWD_WS=1 timeout 200 python3 -m pytest python/tests -q -rfE -p no:cacheprovider \
  -k "not (bad or errors or refused)" >"$OUT/pytest_suite.log" 2>&1
echo "whole suite with FLASH_ATTN2_BWD_WS=1 rc $?: $(tail -1 "$OUT/pytest_suite.log")"
grep -E "^(FAILED|ERROR)" "$OUT/pytest_suite.log" | head -20
