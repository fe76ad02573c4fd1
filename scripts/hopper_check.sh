#!/usr/bin/env bash
# The Hopper kernels on one GPU call, each step under its own time limit and run only if the call's deadline
# (BUDGET seconds from the start, default 570) leaves room for it; a step skipped is named. STEPS picks which
# run, in this order (default: all but ab_ws, bench and suite_default):
#   build          scripts/gpu_check.sh none (sm_90a, system g++)
#   wstests        the warp-specialised forward and backward tests (FLASH_ATTN2_FWD_WS / _BWD_WS=require)
#   san_ws         memcheck, racecheck, synccheck on the warp-specialised forward (FA2_SANITIZE=ws)
#   san_wsbwd      the same on the warp-specialised backward (FA2_SANITIZE=wsbwd)
#   san_widebwd    the same on the d256 backward (FA2_SANITIZE=widebwd), dQ by TMA reduce-adds and by red.add
#   widetests      the d256 backward tests (test_kernels.py -k "wide or 256")
#   kvtests        test_kvcache.py's CUDA tests (decode, paged caches, graphs, the plain op's split-KV path)
#   san_kvcache    memcheck, racecheck, synccheck on the split-KV / KV-cache cases (FA2_SANITIZE=kvcache)
#   decode_bench   the bench's decode rows and examples/generate (scripts/gpu_check.sh decode)
#   timeline       the decode step block by block (a -DFLASH_ATTN2_SPLITKV_TIMELINE build; splitkv_timeline.py;
#                  TIMELINE_CASES="B,Hkv,L;...": other rows)
#   gqa_probe      #11's GQA rows beside the same shapes without grouping, fwd and bwd, ours and cuDNN
#   ab_wide        Nq = 16 and 8 decode rows (64 / 32 packed rows): this tree vs BASE_SRC as in ab_base
#   ab_evict       the split-KV K/V loads evict-unchanged (FLASH_ATTN2_SPLITKV_EVICT_FIRST=0) vs evict-first, long rows
#                  (EVICT_CASES="B,Hkv,L;...": other rows)
#   decode_splits  the decode step's µs per forced num_splits (scripts/decode_splits.py; SPLITS_CASES="B,Hkv,L[,Nq];...",
#                  SPLITS="0,1,2,...", 0 = the launcher's choice)
#   ncu_decode     ncu's duration and DRAM throughput of the decode kernels (B = 1, Hkv = 8, L = 8k; DECODE_SHAPE=
#                  "B,Hkv,L" for another), then their
#                  warp stall reasons with caches and clocks as they run
#   ab_widedq      the d256 backward's dQ by TMA reduce-adds (B) vs red.add (A, FLASH_ATTN2_BWD_WS_DQ=red)
#   ab_widewsdq    the d256 dQ-warpgroup backward's dQ by TMA reduce-adds (B, the default) vs red.add (A,
#                  FLASH_ATTN2_BWD_WS_DQ=red)
#   ab_widetmaloads  the d256 dQ-warpgroup backward with Q and dO by the TMA (B, the default) vs the compute
#                  threads' cp.async (A, FLASH_ATTN2_BWD_WIDE_TMA_LOADS=0), settled
#   ab_widews      the d256 backward with a dQ warpgroup (B) vs the split-role kernel (A, FLASH_ATTN2_BWD_WIDE=2wg)
#   ab_detwide     the same in the deterministic mode (its rows "det"; the "none" rows: ab_widews again)
#   ab_persistent  the persistent WS forward (static or dynamic walk) vs one block per tile, dense and packed
#   ab_walkshort   the WS forward's default walk on masked / packed rows (B: dynamic at d64 / d128 up to 2048 query rows)
#                  vs a block per tile (A, FLASH_ATTN2_FWD_WS_WALK=tile), each case settled 300 ms
#   gridtests      test_cuda_grid_head_group (the grouped orders' results against the head-by-head order's)
#   ab_gridgroup   the grids in groups of 8 heads, tile by tile within a group (B, FLASH_ATTN2_FWD_GRID_GROUP=8 and
#                  _BWD_GRID_GROUP=8) vs head by head (A): causal and GQA rows, fwd and bwd, settled
#   ab_wsbwd       the WS backward vs flash_bwd_sm90_kernel, d64 and d128 (FLASH_ATTN2_BWD_WS=0 vs 1)
#   ab_wsdq        the WS backward's dQ by TMA reduce-adds vs red.add (FLASH_ATTN2_BWD_WS_DQ=red)
#   ab_det         the deterministic backward beside the default one, WS backward off and on
#   ab_qbuf        the WS forward's two Q buffers vs one (d128, persistent rows), and the dynamic walk with them
#   ab_blockn256   the d256 WS forward with 80-key tiles vs 64, forced (FLASH_ATTN2_FWD_WS_BLOCKN)
#   ab_prefetch    the WS kernels prefetching their tensor maps vs not (FLASH_ATTN2_WS_PREFETCH=0)
#   ab_softcap     the WS forward's softcap against a fixed offset vs the running max (FLASH_ATTN2_SOFTCAP_FIXED=0)
#   softtests      the variant tests (test_variants.py), then the softcap and option-combination ones on the portable
#                  kernels (FLASH_ATTN2_PORTABLE_KERNELS=1)
#   mufu           ops per clock per SM of ex2.approx, tanh.approx, both, and FMA, their f16 / bf16 forms (results per
#                  clock), and of ex2 with 4-16 warps per SM (scripts/mufu_rate.cu)
#   ncu_softcap    ncu (speed of light, pipes, warp stalls) on the d128 WS kernels, plain and softcap 50
#   ncu_bwd        ncu (speed of light, memory, pipes, warp stalls) on our backward and cuDNN's, d256 and d128,
#                  non-causal 8k: what bounds the d256 backward (0.78-0.90 of cuDNN), and cuDNN's kernel names
#   ncu_fa4        ncu (speed of light, pipes, instructions, warp stalls) on our d128 forward and backward beside
#                  FlashAttention-4's (installed by ../shared/tools/fa4-wheels.sh), non-causal 8k: where FA4's 1.12x
#                  (forward) and 1.15x (backward) per call come from (perf.md v27); NCU_IMPLS="fa4": FA4's alone
#   ncu_src_bwd    ncu's source counters on the d128 WS backward and FlashAttention-4's (NCU_IMPLS, as in ncu_fa4),
#                  non-causal 8k: stall samples per SASS instruction (CSV gzipped) and scripts/ncu_src_summary.py's
#                  summary (where the consumers wait; FA4: where its loop waits instead, perf.md v28);
#                  NCU_SRC_D=64: the d64 backward instead (its loop's instruction count is not its gap, perf.md v39)
#   bwd_probe      where the WS backward's consumer cycles go, per step and slot (scripts/bwd_probe.py) on BWD_PROBE_LIB
#                  (default /tmp/libs/p.so: a -DFLASH_ATTN2_BWD_TIMELINE build packed beside PREBUILT's libraries;
#                  PROBE_CASES="D,T/F,N;...": other cases)
#   ncu_src_bwdmod ncu's source counters on the d128 WS backward with softcap 50, causal 8k (where the softcap
#                  backward's consumers wait: 0.80 of the plain backward, perf.md v29)
#   ncu_src_widebwd  ncu's source counters on the d256 backward (non-causal 8k): stall samples per SASS
#                  instruction, to see where each of its three warpgroups waits (CSV gzipped)
#   ncu_src        ncu's source counters (stall samples per SASS instruction) on the d128 WS forward, plain (128-key
#                  tiles) and softcap 50, causal 8k: the per-instruction CSVs come back gzipped
#   clock_gqa      ours and cuDNN beside the SM clock and power on 16/16, 64/64 and 64/8 heads (N = 4k, causal, d128)
#   clock_cudnn    our forward and cuDNN's beside the SM clock and power (scripts/clock_ab.py), N = 8k
#   ab_ws          the WS forward vs flash_fwd_sm90_kernel
#   ab_base        this tree (B) vs the source tree in BASE_SRC (A; default .abbase, carried: e.g. `git archive main
#                  | tar -x -C .abbase`), built here (BASE_BG=1: in the background from the start), on the masked
#                  rows (causal, windows, packed), fwd and bwd
#   base           builds BASE_SRC's library (as the ab_base* steps do) for commands after this script that
#                  compare against it directly: $BASE_SRC/build/base/libflash_attn2.so
#   ab_base_grid   this tree vs BASE_SRC as in ab_base on the plain grid's rows (d64 / d128 / d256, non-causal 8k,
#                  causal 2k / 8k), forward and backward, settled
#   ab_gridshort   the backward grid in groups of 8 heads (B, =8; the d64 / d128 default here) vs head by head (A, =1) on
#                  causal 2k / 4k rows, plain and GQA (64 / 8 heads), d64 / d128 / d256, settled
#   ab_base_softcap  softcap 50 rows, this tree vs BASE_SRC as in ab_base, forward (d128) and backward
#   ab_base_decode the decode step (fwd_kvcache), this tree vs BASE_SRC as in ab_base, long caches and B = 1
#   suite          the whole suite with both WS kernels forced on (d64 forward included)
#   det            the deterministic tests on both kernel families (DET_ORDERS="spread head": under each grid order)
#   ab_detrotate   the deterministic backward's rotated walk on unmasked rows vs the walk from query tile 0
#                  (FLASH_ATTN2_DET_ROTATE=0)
#   ab_bwdbig      the WS backward's larger steps (the default, B: 80 queries at d128 on unmasked rows, 128 at d64)
#                  vs 64 (A, FLASH_ATTN2_BWD_WS_BLOCKM=64), dense and packed (the d128 causal rows run 64 on both)
#   ab_bwdm80mask  the 80-query d128 WS backward on masked rows (B, the default) vs 64 (A, FLASH_ATTN2_BWD_WS_M80_MASKED=0):
#                  causal, windows, packed causal
#   ab_bwdmodbig   the larger steps with score modifiers (B, the default: 128 at d64, 80 at d128) vs 64 (A,
#                  FLASH_ATTN2_BWD_WS_MOD_BIG=0)
#   ab_floor       the A/B harness's floor: the same build on both sides, backward rows, without and with
#                  --settle-ms 300 (each case run 300 ms before it is timed)
#   ab_detorder    the deterministic backward with a head's key tiles together (FLASH_ATTN2_DET_ORDER=head) vs spread
#   variants       the variant bench rows (with FlashAttention-4's softcap 50 / plain where it is installed)
#   bench          the quick grid with every SDPA backend and the variant rows, each case settled for
#                  BENCH_SETTLE_MS (default 300; 0: as before session 22)
#   gqa            the GQA bench rows
#   suite_default  the whole suite under the default kernel choice
#   BUDGET=540 STEPS="build wstests san_ws" scripts/hopper_check.sh      (OUT: the output folder)
#   PREBUILT=1 STEPS="wstests ab_base_grid" scripts/hopper_check.sh       (the libraries of this tree and its base
#                  built on the CPU machine by scripts/pack_prebuilt.sh, the call carrying [".abbase/prebuilt"]:
#                  nothing is built on the device; steps that build variants of their own, such as timeline,
#                  still do)
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/flash_attn2_hopper}
mkdir -p "$OUT"
start=$(date +%s)
budget=${BUDGET:-570}
steps=" ${STEPS:-build wstests san_ws san_wsbwd ab_persistent ab_wsbwd ab_wsdq ab_det suite det variants} "
left() { echo $(( budget - ($(date +%s) - start) )); }
# step NAME LIMIT: whether to run NAME now (selected, and LIMIT seconds still fit before the deadline).
step() {
  [[ $steps == *" $1 "* ]] || return 1
  if (( $(left) < $2 )); then echo "SKIPPED $1 (needs $2 s, $(left) s left)"; return 1; fi
  echo "--- $1 at $(( $(date +%s) - start )) s"
}
# The base tree of ab_base, built where it is; BASE_BG=1 starts that in the background beside this tree's build.
build_base() {
  ( cd "$1" && CC=/usr/bin/gcc CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++ cmake -S . -B build/base -G Ninja \
      -DFLASH_ATTN2_WITH_CUDA=ON -DFLASH_ATTN2_CUDA_ARCHS=90a -DCMAKE_CXX_COMPILER=/usr/bin/g++ \
      -DCMAKE_CUDA_HOST_COMPILER=/usr/bin/g++ >/dev/null && cmake --build build/base -j"$(nproc)" >/dev/null )
}
# PREBUILT=1: the libraries scripts/pack_prebuilt.sh built on the CPU machine (the call carries
# [".abbase/prebuilt"]): this tree's as b.so, the base's as a.so, unpacked to /tmp/libs; nothing is built here
# (leave `build` out of STEPS). PREBUILT_LIB=c.so: the steps test another library the archive holds instead of b.so.
# PREBUILT_TAR: another archive of libraries (a carried path) instead of .abbase/prebuilt/libs.tar.xz.
if [[ ${PREBUILT:-0} == 1 ]]; then
  mkdir -p /tmp/libs && tar -xJf "${PREBUILT_TAR:-.abbase/prebuilt/libs.tar.xz}" -C /tmp/libs ||
    { echo "PREBUILT=1: no ${PREBUILT_TAR:-.abbase/prebuilt/libs.tar.xz} (scripts/pack_prebuilt.sh, carried)"; exit 1; }
  echo "prebuilt: $(ls /tmp/libs)"
fi
# The base tree's library, once built (waiting for the background build, or building it now); empty if no tree.
base_lib() {
  if [[ ${PREBUILT:-0} == 1 ]]; then [[ -f /tmp/libs/a.so ]] && echo /tmp/libs/a.so; return 0; fi
  local base=${BASE_SRC:-.abbase}
  [[ -f $base/CMakeLists.txt ]] || return 0
  while [[ -f $base/building ]]; do sleep 2; done
  [[ -f $base/build/base/libflash_attn2.so ]] || build_base "$base"
  [[ -f $base/build/base/libflash_attn2.so ]] && echo "$PWD/$base/build/base/libflash_attn2.so"
}
if [[ ${BASE_BG:-0} == 1 && ($steps == *" ab_base "* || $steps == *" ab_base_decode "* || $steps == *" ab_wide "* ||
      $steps == *" ab_base_softcap "* || $steps == *" ab_base_grid "* || $steps == *" base "*) &&
      -f ${BASE_SRC:-.abbase}/CMakeLists.txt ]]; then
  touch "${BASE_SRC:-.abbase}/building"
  ( build_base "${BASE_SRC:-.abbase}"; rm -f "${BASE_SRC:-.abbase}/building" ) &
fi
if step build 150; then scripts/gpu_check.sh none 2>&1 | tail -4; fi
export FLASH_ATTN2_LIBRARY=$PWD/build/gpu/libflash_attn2.so PYTHONPATH=$PWD/python PYTHONUNBUFFERED=1
[[ ${PREBUILT:-0} == 1 ]] && export FLASH_ATTN2_LIBRARY=/tmp/libs/${PREBUILT_LIB:-b.so}
lib=$FLASH_ATTN2_LIBRARY
if step wstests 120; then
  timeout 120 python3 -m pytest python/tests/test_kernels.py python/tests/test_variants.py -q -rfE \
    -k warp_specialised -p no:cacheprovider >"$OUT/wstests.log" 2>&1
  echo "WS forward + backward tests (require) rc $?: $(tail -1 "$OUT/wstests.log")"
  grep -E "^(FAILED|ERROR)" "$OUT/wstests.log" | head -20
fi
if step softtests 200; then
  timeout 140 python3 -m pytest python/tests/test_variants.py -q -x -p no:cacheprovider >"$OUT/softtests.log" 2>&1
  echo "test_variants.py rc $?: $(tail -1 "$OUT/softtests.log")"
  FLASH_ATTN2_PORTABLE_KERNELS=1 timeout 60 python3 -m pytest python/tests/test_variants.py -q -x -p no:cacheprovider \
    -k "softcap or option_combinations" >"$OUT/softtests_portable.log" 2>&1
  echo "portable softcap tests rc $?: $(tail -1 "$OUT/softtests_portable.log")"
fi
if step widetests 120; then
  timeout 120 python3 -m pytest python/tests/test_kernels.py python/tests/test_variants.py -q -rfE \
    -k "wide or 256" -p no:cacheprovider >"$OUT/widetests.log" 2>&1
  echo "d256 tests rc $?: $(tail -1 "$OUT/widetests.log")"
  grep -E "^(FAILED|ERROR)" "$OUT/widetests.log" | head -20
fi
if step kvtests 200; then
  timeout 190 python3 -m pytest python/tests/test_kvcache.py -q -x -p no:cacheprovider -k "cuda or few_queries" \
    >"$OUT/kvtests.log" 2>&1
  echo "test_kvcache.py CUDA rc $?: $(tail -1 "$OUT/kvtests.log")"
  grep -E "^(FAILED|ERROR|E  )" "$OUT/kvtests.log" | head -12
fi
for what in ws wsbwd widebwd kvcache; do
  # About 30-60 s each (three tools); widebwd's seven configurations: about 100 s for racecheck alone.
  limit=100; [[ $what == widebwd ]] && limit=160
  step san_$what $(( limit + 60 )) || continue
  for tool in memcheck racecheck synccheck; do
    extra=(); [[ $tool == racecheck ]] && extra=(${RACECHECK_ARGS:-})  # e.g. "--racecheck-report hazard"
    FA2_SANITIZE=$what timeout $limit compute-sanitizer --tool $tool "${extra[@]}" --error-exitcode 9 python3 scripts/sanitize_cases.py \
      >"$OUT/san_${what}_$tool.log" 2>&1
    echo "$tool $what rc $?: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/san_${what}_$tool.log" | tail -1)"
    grep -E -A4 "^========= (Warning|Error)" "$OUT/san_${what}_$tool.log" | head -24
  done
done
if step decode_bench 160; then  # the decode rows of the bench and examples/generate (scripts/gpu_check.sh decode)
  OUT=$OUT/decode timeout 150 scripts/gpu_check.sh decode 2>&1 | tail -52
fi
if step timeline 200; then  # the decode step block by block, from a debug build that stamps time (splitkv_timeline.py)
  ( CC=/usr/bin/gcc CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++ cmake -S . -B build/timeline -G Ninja \
      -DFLASH_ATTN2_WITH_CUDA=ON -DFLASH_ATTN2_CUDA_ARCHS=90a -DCMAKE_CXX_COMPILER=/usr/bin/g++ \
      -DCMAKE_CUDA_HOST_COMPILER=/usr/bin/g++ -DCMAKE_CXX_FLAGS=-DFLASH_ATTN2_SPLITKV_TIMELINE \
      -DCMAKE_CUDA_FLAGS=-DFLASH_ATTN2_SPLITKV_TIMELINE >"$OUT/timeline_build.log" 2>&1 &&
    timeout 170 cmake --build build/timeline -j"$(nproc)" >>"$OUT/timeline_build.log" 2>&1 ) ||
    { echo "timeline build failed"; tail -20 "$OUT/timeline_build.log"; }
  [[ -f build/timeline/libflash_attn2.so ]] && FLASH_ATTN2_LIBRARY=$PWD/build/timeline/libflash_attn2.so timeout 60 \
    python3 scripts/splitkv_timeline.py ${TIMELINE_CASES:+--cases "$TIMELINE_CASES"} | tee "$OUT/timeline.md"
  [[ -f build/timeline/libflash_attn2.so ]] && echo "each step twice, the second's stamps (warm code):" &&
    FLASH_ATTN2_TIMELINE_TWICE=1 FLASH_ATTN2_LIBRARY=$PWD/build/timeline/libflash_attn2.so timeout 60 \
    python3 scripts/splitkv_timeline.py ${TIMELINE_CASES:+--cases "$TIMELINE_CASES"} | tee "$OUT/timeline_twice.md"
fi
if step gqa_probe 120; then  # the GQA rows' shapes with and without grouping, ours and cuDNN (scripts/gqa_probe.py)
  for n in 4096 8192; do timeout 55 python3 scripts/gqa_probe.py --n $n | tee -a "$OUT/gqa_probe.md"; done
fi
if step ab_wide 150; then  # speculative decoding rows (Nq x group > 16): the row-split kernel (this tree) vs BASE_SRC
  if base=$(base_lib) && [[ -n $base ]]; then
    for nq in 16 8; do
      timeout 70 python3 scripts/ab_decode.py "$base" $lib --nq $nq \
        --cases "1,8,8192;16,8,8192;16,8,32768;4,8,32768;1,32,8192" | tee -a "$OUT/ab_wide.md"
    done
  else
    echo "ab_wide: no base library (source tree ${BASE_SRC:-.abbase})"
  fi
fi
if step ab_evict 130; then  # the split-KV K/V loads evict-unchanged (A) vs evict-first where one row tile reads them (B)
  timeout 120 python3 scripts/ab_decode.py $lib,FLASH_ATTN2_SPLITKV_EVICT_FIRST=0 $lib \
    --cases "${EVICT_CASES:-64,8,32768;16,8,131072;16,32,32768;1,32,131072;64,32,1024;1,8,8192;16,8,8192}" \
    | tee "$OUT/ab_evict.md"
fi
if step decode_splits 90; then  # the decode step's time per forced split count (CUDA graphs)
  timeout 90 python3 scripts/decode_splits.py ${SPLITS_CASES:+--cases "$SPLITS_CASES"} ${SPLITS:+--splits "$SPLITS"} \
    | tee "$OUT/decode_splits.md"
fi
if step ncu_decode 120; then  # per-kernel duration and DRAM throughput of the decode step
  cat >"$OUT/decode_step.py" <<'PY'
import torch, flash_attn2
import os
b, hkv, n = (int(x) for x in os.environ.get("DECODE_SHAPE", "1,8,8192").split(","))
q = torch.randn(b, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
k, v = (torch.randn(b, hkv, n, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
for _ in range(2):
    flash_attn2.attention_kvcache(q, k, v)
torch.cuda.synchronize()
PY
  timeout 110 ncu --metrics gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,dram__bytes_read.sum,sm__warps_active.avg.pct_of_peak_sustained_active \
    python3 "$OUT/decode_step.py" >"$OUT/ncu_decode.txt" 2>&1
  echo "ncu decode rc $?"; grep -E "splitkv|combine|gpu__time|dram__|warps_active" "$OUT/ncu_decode.txt" | head -40
  # Where the warps wait, with caches and clocks left as they run (is the tail's time code fetched cold?)
  timeout 100 ncu --cache-control none --clock-control none -k regex:"splitkv|combine" --section WarpStateStats \
    python3 "$OUT/decode_step.py" >"$OUT/ncu_decode_stalls.txt" 2>&1
  echo "ncu decode stalls rc $?"
  grep -E "flash_splitkv|splitkv_combine|Stall|stall|Warp Cycles Per" "$OUT/ncu_decode_stalls.txt" | head -40
  m=""; for r in no_instruction long_scoreboard barrier membar wait short_scoreboard lg_throttle imc_miss selected; do
    m+="smsp__average_warps_issue_stalled_${r}_per_issue_active.ratio,"; done
  timeout 100 ncu --cache-control none --clock-control none -k regex:"splitkv|combine" --metrics "${m%,}" \
    python3 "$OUT/decode_step.py" >"$OUT/ncu_decode_stall_metrics.txt" 2>&1
  echo "ncu decode stall metrics rc $?"
  grep -E "flash_splitkv|splitkv_combine|stalled|ERR" "$OUT/ncu_decode_stall_metrics.txt" | sed 's/  */ /g' | head -60
fi
if step ab_persistent 130; then  # the persistent walk (B: static where uniform, dynamic where masked / packed)
  timeout 130 python3 scripts/ab_forward.py $lib,FLASH_ATTN2_FWD_WS=1,FLASH_ATTN2_FWD_WS_BLOCKS=all \
    $lib,FLASH_ATTN2_FWD_WS=1,FLASH_ATTN2_FWD_WS_WALK=dynamic --head-dims 64,128,256 --lengths 2048,16384 --causal-lengths 2048,16384 \
    --mods none,varlen | tee "$OUT/ab_persistent.md"  # vs one tile per block (A)
fi
if step ab_walkshort 100; then  # masked rows: the dynamic walk, their default at d64 / d128 (B), vs a block per tile (A)
  timeout 100 python3 scripts/ab_forward.py $lib,FLASH_ATTN2_FWD_WS_WALK=tile $lib --head-dims 64,128 --lengths 2048 \
    --causal-lengths 2048,8192 --mods none,varlen --settle-ms 300 | tee "$OUT/ab_walkshort.md"
fi
if step gridtests 60; then
  timeout 60 python3 -m pytest python/tests/test_kernels.py -q -rfE -k grid_head_group -p no:cacheprovider \
    >"$OUT/gridtests.log" 2>&1
  echo "grid order tests rc $?: $(tail -1 "$OUT/gridtests.log")"
  grep -E "^(FAILED|ERROR)" "$OUT/gridtests.log" | head -20
fi
if step ab_gridgroup 200; then  # the grid's order: groups of 8 heads (B) vs head by head (A), masked and GQA rows
  for dir in fwd bwd; do
    timeout 95 python3 scripts/ab_forward.py $lib,FLASH_ATTN2_FWD_GRID_GROUP=1,FLASH_ATTN2_BWD_GRID_GROUP=1 \
      $lib,FLASH_ATTN2_FWD_GRID_GROUP=8,FLASH_ATTN2_BWD_GRID_GROUP=8 \
      --direction $dir --head-dims 64,128 --lengths 8192 --causal-lengths 2048,8192,16384 --mods none,gqa \
      --settle-ms 300 | tee -a "$OUT/ab_gridgroup.md"
  done
fi
if step ab_gridshort 100; then  # the backward grid in groups of 8 heads (B, the default there) vs head by head (A)
  timeout 95 python3 scripts/ab_forward.py $lib,FLASH_ATTN2_BWD_GRID_GROUP=1 $lib,FLASH_ATTN2_BWD_GRID_GROUP=8 --direction bwd --head-dims 64,128,256 \
    --lengths "" --causal-lengths 2048,4096 --mods none,gqa --settle-ms 300 | tee -a "$OUT/ab_gridshort.md"
fi
if step ab_wsbwd 130; then  # the warp-specialised backward (B) vs flash_bwd_sm90_kernel (A), d64 and d128
  timeout 130 python3 scripts/ab_forward.py $lib,FLASH_ATTN2_BWD_WS=0 $lib,FLASH_ATTN2_BWD_WS=1 --direction bwd \
    --head-dims 64,128 --lengths 2048,16384 --causal-lengths 2048,16384 --mods none,softcap,dropout \
    | tee "$OUT/ab_wsbwd.md"
fi
if step ab_widews 110; then  # the d256 backward: the dQ warpgroup (B) vs the split-role kernel (A)
  timeout 110 python3 scripts/ab_forward.py $lib,FLASH_ATTN2_BWD_WIDE=2wg $lib --direction bwd --head-dims 256 \
    --lengths 2048,8192,16384 --causal-lengths 2048,8192,16384 --mods none,softcap,dropout,varlen \
    | tee "$OUT/ab_widews.md"
fi
if step ab_detwide 120; then  # the d256 deterministic backward: the dQ-warpgroup kernel (B) vs the split-role (A)
  timeout 120 python3 scripts/ab_forward.py $lib,FLASH_ATTN2_BWD_WIDE=2wg $lib --direction bwd --head-dims 256 \
    --lengths 2048,8192 --causal-lengths 2048,8192 --mods none,det | tee "$OUT/ab_detwide.md"
fi
if step ab_widedq 100; then  # the d256 backward's dQ: TMA reduce-adds (B) vs red.add (A), split-role kernel
  timeout 100 python3 scripts/ab_forward.py $lib,FLASH_ATTN2_BWD_WIDE=2wg,FLASH_ATTN2_BWD_WS_DQ=red \
    $lib,FLASH_ATTN2_BWD_WIDE=2wg --direction bwd --head-dims 256 --lengths 2048,8192,16384 --causal-lengths 2048,8192,16384 --mods none,softcap,varlen \
    | tee "$OUT/ab_widedq.md"
fi
if step ab_widewsdq 100; then  # the d256 dQ-warpgroup kernel's dQ: TMA reduce-adds through one box (B) vs red.add (A)
  timeout 100 python3 scripts/ab_forward.py $lib,FLASH_ATTN2_BWD_WS_DQ=red $lib --direction bwd --head-dims 256 \
    --lengths 2048,8192,16384 --causal-lengths 2048,8192,16384 --mods none,softcap,varlen --settle-ms 300 | tee "$OUT/ab_widewsdq.md"
fi
if step ab_widetmaloads 100; then  # the d256 Q / dO loads: one thread's TMA copies (B) vs 256 threads' cp.async (A)
  timeout 100 python3 scripts/ab_forward.py $lib,FLASH_ATTN2_BWD_WIDE_TMA_LOADS=0 $lib --direction bwd --head-dims 256 \
    --lengths 2048,16384 --causal-lengths 8192 --mods none,softcap,varlen --settle-ms 300 | tee "$OUT/ab_widetmaloads.md"
fi
if step ab_wsdq 100; then  # the WS backward's dQ: TMA reduce-adds (B) vs red.add (A)
  timeout 100 python3 scripts/ab_forward.py $lib,FLASH_ATTN2_BWD_WS_DQ=red $lib --direction bwd \
    --head-dims 128 --lengths 2048,16384 --causal-lengths 2048,16384 --mods none,softcap | tee "$OUT/ab_wsdq.md"
fi
if step ab_det 120; then  # the deterministic backward (det) beside the default (none), WS off (A) and on (B)
  timeout 120 python3 scripts/ab_forward.py $lib,FLASH_ATTN2_BWD_WS=0 $lib,FLASH_ATTN2_BWD_WS=1 --direction bwd \
    --head-dims 64,128 --lengths 2048,16384 --causal-lengths 2048,16384 --mods none,det | tee "$OUT/ab_det.md"
fi
if step ab_qbuf 150; then  # the WS forward: two Q buffers (B) vs one (A, FLASH_ATTN2_FWD_WS_QBUF=1), then the
  # dynamic walk (B) vs one block per tile (A) on the causal rows now that the next tile's Q can land early
  timeout 70 python3 scripts/ab_forward.py $lib,FLASH_ATTN2_FWD_WS_QBUF=1 $lib --head-dims 128 \
    --lengths 1024,2048,4096,8192 --causal-lengths "" --mods none | tee "$OUT/ab_qbuf.md"
  timeout 80 python3 scripts/ab_forward.py $lib $lib,FLASH_ATTN2_FWD_WS_WALK=dynamic --head-dims 128 \
    --lengths "" --causal-lengths 2048,4096,16384 --mods none,varlen | tee -a "$OUT/ab_qbuf.md"
fi
if step ab_blockn256 100; then  # d256 WS forward: key tiles of 80 (B) vs 64 (A), forced (FLASH_ATTN2_FWD_WS_BLOCKN)
  timeout 100 python3 scripts/ab_forward.py $lib,FLASH_ATTN2_FWD_WS_BLOCKN=64 $lib,FLASH_ATTN2_FWD_WS_BLOCKN=80 \
    --head-dims 256 --lengths 2048,8192,16384 --causal-lengths 2048,8192,16384 --mods none,varlen \
    | tee "$OUT/ab_blockn256.md"
fi
if step ab_prefetch 120; then  # the WS kernels prefetching their tensor maps (B) vs not (A): short blocks first
  timeout 60 python3 scripts/ab_forward.py $lib,FLASH_ATTN2_WS_PREFETCH=0 $lib --head-dims 64,128,256 \
    --lengths 2048 --causal-lengths 2048,16384 --mods none | tee "$OUT/ab_prefetch.md"
  timeout 60 python3 scripts/ab_forward.py $lib,FLASH_ATTN2_WS_PREFETCH=0 $lib --direction bwd --head-dims 128 \
    --lengths 2048 --causal-lengths 2048,16384 --mods none | tee -a "$OUT/ab_prefetch.md"
fi
if step ab_softcap 130; then  # softcap 50: P against a fixed offset (B) vs the running max (A), d256 (d128: B = A)
  timeout 130 python3 scripts/ab_forward.py $lib,FLASH_ATTN2_SOFTCAP_FIXED=0 $lib --head-dims 128,256 \
    --lengths 2048,8192,16384 --causal-lengths 2048,8192,16384 --mods softcap,none | tee "$OUT/ab_softcap.md"
fi
if step mufu 40; then  # ex2 / tanh / FMA issue rates on this GPU (is the d128 softcap forward's tanh half-rate?)
  /usr/local/cuda/bin/nvcc -O3 -arch=sm_90a -o /tmp/mufu_rate scripts/mufu_rate.cu && timeout 30 /tmp/mufu_rate \
    | tee "$OUT/mufu.txt"
fi
if step ncu_softcap 200; then  # why softcap 50 runs at 0.81 / 0.76 of plain (#7): ncu on both, forward and backward
  for mod in plain softcap; do
    args="--d 128 --n 8192 --causal"; [[ $mod == softcap ]] && args="$args --softcap 50"
    for k in flash_fwd_sm90_ws_kernel flash_bwd_sm90_ws_kernel; do
      timeout 90 ncu --section SpeedOfLight --section ComputeWorkloadAnalysis --section WarpStateStats \
        --section InstructionStats --section LaunchStats -k regex:$k -c 1 python3 scripts/profile_case.py $args \
        >"$OUT/ncu_${mod}_${k}.txt" 2>&1
      echo "ncu $mod $k rc $?"
      grep -E "Duration|Compute \(SM\) Throughput|Issue Slots Busy|Stall|Executed Ipc|Registers Per|Pipe" \
        "$OUT/ncu_${mod}_${k}.txt" | head -24
    done
  done
fi
if step ncu_bwd 240; then  # what bounds the d256 backward, beside cuDNN's and the d128 one
  for d in 256 128; do
    for impl in ours cudnn; do
      sel=(-k regex:flash_bwd_sm90 -c 1); [[ $impl == cudnn ]] && sel=(-c 12)  # cuDNN: every launch, names unknown
      timeout 100 ncu --section SpeedOfLight --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
        --section WarpStateStats --section LaunchStats --section Occupancy "${sel[@]}" \
        python3 scripts/profile_case.py --d $d --n 8192 --impl $impl >"$OUT/ncu_bwd_${impl}_d$d.txt" 2>&1
      echo "ncu bwd $impl d$d rc $?"
      grep -E "^  [a-z_].*\(|Duration|Compute \(SM\) Throughput|Memory Throughput|L2 Cache Throughput|L1/TEX Hit|L2 Hit|Issue Slots Busy|Warp Cycles Per Issued|Registers Per|Shared Memory Config|Block Size|Grid Size|Pipe|Stall" \
        "$OUT/ncu_bwd_${impl}_d$d.txt" | grep -v -E "elementwise|distribution|vectorized" | head -60
    done
  done
fi
if step ncu_fa4 300; then  # our d128 forward and backward beside FlashAttention-4's, same sections
  [[ -d /tmp/fa4sc ]] && export PYTHONPATH=/tmp/fa4sc:$PYTHONPATH  # installed by ../shared/tools/fa4-wheels.sh
  for impl in ${NCU_IMPLS:-ours fa4}; do  # NCU_IMPLS=fa4: FlashAttention-4 only (no build of ours needed)
    sel=(-k regex:"flash_(fwd|bwd)_sm90" -c 2); [[ $impl == fa4 ]] && sel=(-c 12)  # FA4: every launch (names unknown)
    # FA4 keeps the PTX it compiles (CUTE_DSL_KEEP_PTX), for reading here: ptxas -arch sm_90a turns it into its SASS.
    rm -rf /tmp/fa4ptx && mkdir -p /tmp/fa4ptx
    CUTE_DSL_KEEP_PTX=1 CUTE_DSL_DUMP_DIR=/tmp/fa4ptx timeout 140 ncu --section SpeedOfLight \
      --section ComputeWorkloadAnalysis --section InstructionStats --section WarpStateStats --section SchedulerStats \
      --section LaunchStats --section MemoryWorkloadAnalysis "${sel[@]}" \
      python3 scripts/profile_case.py --d 128 --n 8192 --impl $impl >"$OUT/ncu_fa4_${impl}.txt" 2>&1
    echo "ncu $impl d128 rc $?"
    [[ $impl == fa4 ]] && tar -czf "$OUT/fa4_ptx.tgz" -C /tmp fa4ptx && ls /tmp/fa4ptx | head
    grep -E "^  [a-zA-Z_].*\(|Duration|SM Frequency|Compute \(SM\) Throughput|Executed Ipc A|Issue Slots Busy|Executed Instructions  |Warp Cycles Per Issued|Registers Per|Block Size|Grid Size|Dynamic Shared|L2 Cache Throughput|Stall" \
      "$OUT/ncu_fa4_${impl}.txt" | grep -v -E "distribution|vectorized" | head -70
  done
fi
# ncu_source NAME LIMIT KERNEL_REGEX PROFILE_CASE_ARGS...: one launch of the kernel under ncu's source counters
# (and the stall reasons per issued instruction), its per-SASS-instruction export as $OUT/NAME.csv.gz and
# scripts/ncu_src_summary.py's summary of it as $OUT/NAME.md.
ncu_source() {
  local name=$1 limit=$2 kernel=$3
  shift 3
  timeout "$limit" ncu --section SpeedOfLight --section WarpStateStats --section SourceCounters \
    --metrics regex:smsp__average_warps_issue_stalled_.*_per_issue_active.ratio -k regex:"$kernel" -c 1 -f \
    -o "/tmp/$name" python3 scripts/profile_case.py "$@" >"$OUT/$name.log" 2>&1
  echo "ncu source counters, $name: rc $?"
  grep -E "Duration|Issue Slots Busy|Warp Cycles Per Issued" "$OUT/$name.log" | head -6
  timeout 60 ncu --import "/tmp/$name.ncu-rep" --page source --csv --print-source sass 2>&1 | gzip >"$OUT/$name.csv.gz"
  python3 scripts/ncu_src_summary.py "$OUT/$name.csv.gz" --top 15 | tee "$OUT/$name.md"
}
if step ncu_src_bwd 200; then  # where the d128 backward's consumers wait, ours and FlashAttention-4's (perf.md v28)
  [[ -d /tmp/fa4sc ]] && export PYTHONPATH=/tmp/fa4sc:$PYTHONPATH  # installed by ../shared/tools/fa4-wheels.sh
  for impl in ${NCU_IMPLS:-ours fa4}; do
    kernel=flash_bwd_sm90_ws; [[ $impl == fa4 ]] && kernel=BackwardSm90
    ncu_source ncu_src_bwd${NCU_SRC_D:-128}_$impl 90 $kernel --d ${NCU_SRC_D:-128} --n 8192 --impl $impl
  done
fi
if step bwd_probe 120; then  # the WS backward's consumer cycles by slot (BwdProbe), beside the unprobed time
  FLASH_ATTN2_LIBRARY=${BWD_PROBE_LIB:-/tmp/libs/p.so} timeout 110 python3 scripts/bwd_probe.py \
    ${PROBE_CASES:+--cases "$PROBE_CASES"} | tee "$OUT/bwd_probe.md"
fi
if step ncu_src_bwdmod 120; then  # where the softcap backward waits (#7: 0.80 of plain at d128 causal 8k, perf.md v29)
  ncu_source ncu_src_bwd_softcap 100 flash_bwd_sm90_ws --d 128 --n 8192 --causal --softcap 50
fi
if step ncu_src_widebwd 150; then  # where the d256 backward's warpgroups wait (cuDNN: 1.19x per clock, perf.md v25)
  ncu_source ncu_src_widebwd 100 flash_bwd_sm90_wide_ws --d 256 --n 8192
fi
if step ncu_src 200; then  # where the softcap forward's consumer warps stall, per SASS instruction (#7)
  for mod in plain softcap; do
    args=(--d 128 --n 8192 --causal); [[ $mod == softcap ]] && args+=(--softcap 50)
    FLASH_ATTN2_FWD_WS_BLOCKN=128 ncu_source ncu_src_$mod 90 flash_fwd_sm90_ws_kernel "${args[@]}"
  done
fi
if step clock_gqa 200; then  # ours and cuDNN beside the clock on the gqa_probe shapes: does the gap with more heads
  for hh in 16/16 64/64 64/8; do  # (0.90-0.97 of cuDNN at 16 heads, 0.79-0.86 at 64, perf.md v20) follow the power?
    timeout 45 python3 scripts/clock_ab.py cudnn $lib --d 128 --n 4096 --batch 4 --heads ${hh%/*} --heads-kv ${hh#*/} \
      --causal --rounds 1 | tee -a "$OUT/clock_gqa.md"
  done
fi
if step clock_cudnn 150; then  # our forward and cuDNN's beside the SM clock and power, d64 / d128 / d256, N = 8k
  for d in 64 128 256; do
    for c in "" --causal; do
      timeout 40 python3 scripts/clock_ab.py cudnn $lib --d $d --n 8192 --rounds 1 $c | tee -a "$OUT/clock_cudnn.md"
    done
  done
fi
if step ab_base 300; then  # this tree (B) vs BASE_SRC (A): kernel changes that need no run-time switch
  blib=$(base_lib)
  if [[ -n $blib ]]; then
    echo "base library built at $(( $(date +%s) - start )) s"
    timeout 100 python3 scripts/ab_forward.py "$blib" $lib --head-dims 64,128,256 --lengths 2048 \
      --causal-lengths 2048,16384 --mods none,window,varlen | tee "$OUT/ab_base.md"
    timeout 80 python3 scripts/ab_forward.py "$blib" $lib --direction bwd --head-dims 64,128 --lengths "" \
      --causal-lengths 2048,16384 --mods none,window | tee -a "$OUT/ab_base.md"
  else
    echo "ab_base: no base library (source tree ${BASE_SRC:-.abbase})"
  fi
fi
if step base 200; then  # the base tree's library, for direct comparisons after this script
  blib=$(base_lib)
  echo "base library: ${blib:-none (source tree ${BASE_SRC:-.abbase})} at $(( $(date +%s) - start )) s"
fi
if step ab_base_grid 200; then  # this tree (B) vs BASE_SRC (A) on the plain grid's rows, settled, fwd and bwd
  blib=$(base_lib)
  if [[ -n $blib ]]; then
    for dir in fwd bwd; do
      timeout 95 python3 scripts/ab_forward.py "$blib" $lib --direction $dir --head-dims 64,128,256 --lengths 8192 \
        --causal-lengths 2048,8192 --mods none --settle-ms 300 | tee -a "$OUT/ab_base_grid.md"
    done
  else
    echo "ab_base_grid: no base library (source tree ${BASE_SRC:-.abbase})"
  fi
fi
if step ab_base_softcap 150; then  # softcap 50 rows, this tree (B) vs BASE_SRC (A): forward and backward
  blib=$(base_lib)
  if [[ -n $blib ]]; then
    timeout 60 python3 scripts/ab_forward.py "$blib" $lib --head-dims 128 --lengths 8192 \
      --causal-lengths 8192 --mods none,softcap | tee "$OUT/ab_base_softcap.md"
    timeout 80 python3 scripts/ab_forward.py "$blib" $lib --direction bwd --head-dims 64,128,256 --lengths 8192 \
      --causal-lengths 8192 --mods none,softcap | tee -a "$OUT/ab_base_softcap.md"
  else
    echo "ab_base_softcap: no base library (source tree ${BASE_SRC:-.abbase})"
  fi
fi
if step ab_base_decode 170; then  # the decode step, this tree (B) vs BASE_SRC (A), long caches and B = 1 (170 s: with
  # BASE_BG=1 the base tree is built beside this one and is ready by now; call 7 of session 19 skipped it at 240)
  blib=$(base_lib)
  if [[ -n $blib ]]; then
    timeout 150 python3 scripts/ab_decode.py "$blib" $lib \
      --cases "1,8,1024;1,8,8192;1,8,32768;1,32,8192;16,8,8192;16,8,32768;64,8,8192;16,32,8192" | tee "$OUT/ab_base_decode.md"
  else
    echo "ab_base_decode: no base library (source tree ${BASE_SRC:-.abbase})"
  fi
fi
if step ab_ws 100; then  # the (now persistent) WS forward vs the other Hopper forward
  timeout 100 python3 scripts/ab_forward.py $lib,FLASH_ATTN2_FWD_WS=0 $lib,FLASH_ATTN2_FWD_WS=1 \
    --head-dims 64,128,256 --lengths 2048,16384 --causal-lengths 2048,16384 | tee "$OUT/ab_ws.md"
fi
if step suite 280; then
  FLASH_ATTN2_FWD_WS=1 FLASH_ATTN2_BWD_WS=1 timeout 270 python3 -m pytest python/tests -q -rfE -p no:cacheprovider \
    -k "not (bad or errors or refused)" >"$OUT/suite.log" 2>&1
  echo "whole suite with FLASH_ATTN2_FWD_WS=1 FLASH_ATTN2_BWD_WS=1 rc $?: $(tail -1 "$OUT/suite.log")"
  grep -E "^(FAILED|ERROR)" "$OUT/suite.log" | head -20
fi
if step det 60; then  # about 30 s a grid order; DET_ORDERS="spread head": the deterministic grid orders to test (default: the default one)
  for order in ${DET_ORDERS:-default}; do
    for portable in 0 1; do
      FLASH_ATTN2_DET_ORDER=$order FLASH_ATTN2_PORTABLE_KERNELS=$portable timeout 60 python3 -m pytest python/tests \
        -q -k "determin" -p no:cacheprovider >"$OUT/det${order}_$portable.log" 2>&1
      echo "deterministic tests, order $order, portable=$portable rc $?: $(tail -1 "$OUT/det${order}_$portable.log")"
    done
  done
fi
if step ab_bwdbig 150; then  # the WS backward's larger steps (B, the default: 80 queries at d128, 128 at d64) vs 64 (A)
  timeout 140 python3 scripts/ab_forward.py $lib,FLASH_ATTN2_BWD_WS_BLOCKM=64 $lib --direction bwd --head-dims 64,128 \
    --lengths 2048,8192,16384 --causal-lengths 2048,8192 --mods none,varlen | tee "$OUT/ab_bwdbig.md"
fi
if step ab_bwdm80mask 130; then  # the 80-query d128 WS backward on masked rows (B) vs 64 queries a step (A)
  timeout 120 python3 scripts/ab_forward.py $lib,FLASH_ATTN2_BWD_WS_M80_MASKED=0 $lib --direction bwd --head-dims 128 \
    --lengths 8192 --causal-lengths 2048,8192,16384 --mods none,window,varlen | tee "$OUT/ab_bwdm80mask.md"
fi
if step ab_bwdmodbig 100; then  # score modifiers: 128 queries a step at d64, 80 at d128 (B) vs 64 (A)
  timeout 90 python3 scripts/ab_forward.py $lib,FLASH_ATTN2_BWD_WS_MOD_BIG=0 $lib --direction bwd --head-dims 64,128 \
    --lengths 2048,8192 --causal-lengths 8192 --mods none,softcap,alibi,dropout | tee "$OUT/ab_bwdmodbig.md"
fi
if step ab_floor 130; then  # same code on both sides: how far B/A strays from 1 without and with a settle time
  for settle in 0 300; do
    echo "settle ${settle} ms:"
    timeout 60 python3 scripts/ab_forward.py $lib $lib --direction bwd --head-dims 64,128 --lengths 2048,8192 \
      --causal-lengths 8192 --mods none,softcap --settle-ms $settle | tee -a "$OUT/ab_floor.md"
  done
fi
if step ab_detrotate 200; then  # the deterministic backward's rotated walk (B, unmasked rows) vs from query tile 0 (A)
  timeout 190 python3 scripts/ab_forward.py $lib,FLASH_ATTN2_DET_ROTATE=0 $lib --direction bwd --head-dims 64,128,256 \
    --lengths 2048,4096,8192 --causal-lengths 2048 --mods none,det | tee "$OUT/ab_detrotate.md"
fi
if step ab_detorder 200; then  # the deterministic backward's grid: a head's key tiles together (B) vs spread over heads (A)
  timeout 190 python3 scripts/ab_forward.py $lib,FLASH_ATTN2_DET_ORDER=spread $lib,FLASH_ATTN2_DET_ORDER=head \
    --direction bwd --head-dims 64,128,256 --lengths 2048,8192 --causal-lengths 2048,8192 --mods none,det \
    | tee "$OUT/ab_detorder.md"
fi
if step variants 150; then  # settled as the bench step runs them (unsettled, a baseline timed first ran fast: v34)
  [[ -d /tmp/fa4sc ]] && export PYTHONPATH=/tmp/fa4sc:$PYTHONPATH  # FA4's softcap rows, where it is installed
  timeout 150 python3 -m flash_attn2.bench --device cuda --variants-only --settle-ms "${BENCH_SETTLE_MS:-300}" 2>&1 |
    grep -E "^\|" | tee "$OUT/variants.md"
fi
if step bench 210; then  # the quick grid beside every SDPA backend (and FlashAttention-4), with the variant rows
  [[ -d /tmp/fa4sc ]] && export PYTHONPATH=/tmp/fa4sc:$PYTHONPATH  # installed by ../shared/tools/fa4-wheels.sh
  timeout 210 python3 -m flash_attn2.bench --device cuda --quick --head-dims 64,128,256 --variants \
    --settle-ms "${BENCH_SETTLE_MS:-300}" --out "$OUT/bench.md" >"$OUT/bench.log" 2>&1  # settled: at the power cap
  echo "bench rc $?"; cat "$OUT/bench.md" 2>/dev/null || tail -30 "$OUT/bench.log"
fi
if step gqa 90; then  # the GQA rows (32/8 and 64/8 heads, D = 128, causal, N = 4k / 8k) beside every backend
  [[ -d /tmp/fa4sc ]] && export PYTHONPATH=/tmp/fa4sc:$PYTHONPATH
  timeout 90 python3 -m flash_attn2.bench --device cuda --gqa-only --settle-ms "${BENCH_SETTLE_MS:-300}" 2>&1 | grep -E "^\|" | tee "$OUT/gqa.md"
fi
if step suite_default 280; then  # the whole suite under the default kernel choice
  timeout 270 python3 -m pytest python/tests -q -rfE -p no:cacheprovider -k "not (bad or errors or refused)" \
    >"$OUT/suite_default.log" 2>&1
  echo "whole suite, default kernels, rc $?: $(tail -1 "$OUT/suite_default.log")"
  grep -E "^(FAILED|ERROR)" "$OUT/suite_default.log" | head -20
fi
echo "done at $(( $(date +%s) - start )) s"
