#!/usr/bin/env bash
# One GPU call for wip/session9 (the persistent warp-specialised forward and the deferred deterministic dQ
# releases, neither GPU-tested when written): scripts/ws_check.sh (build, WS tests, sanitizers, A/B incl.
# persistent vs one tile per block, the suite with WS off), then the deterministic tests on both kernel
# families and the variant rows (deterministic bwd vs plain). The warp-specialised backward (merged from
# wip/ws-bwd) needs a second call: scripts/ws_bwd_check.sh.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/flash_attn2_s9}
mkdir -p "$OUT"
OUT=$OUT SUITE_WS=${SUITE_WS:-1} bash scripts/ws_check.sh   # the suite with WS on for every head dim
export FLASH_ATTN2_LIBRARY=$PWD/build/gpu/libflash_attn2.so PYTHONPATH=$PWD/python PYTHONUNBUFFERED=1
for portable in 0 1; do
  FLASH_ATTN2_PORTABLE_KERNELS=$portable timeout 120 python3 -m pytest python/tests -q -k "determin" \
    -p no:cacheprovider >"$OUT/det$portable.log" 2>&1
  echo "deterministic tests, portable=$portable rc $?: $(tail -1 "$OUT/det$portable.log")"
done
timeout 150 python3 -m flash_attn2.bench --device cuda --variants-only 2>&1 | grep -E "^\|" | tee "$OUT/variants.md"
