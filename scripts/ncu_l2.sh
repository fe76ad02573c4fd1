#!/usr/bin/env bash
# Where the d128 forward's L2 traffic comes from: ncu's L2 and L1/TEX throughput broken down into their
# sub-metrics, sectors by source unit and operation, hit rate and DRAM bytes, for our WS forward (the default, and
# under each environment given as an argument) and FlashAttention-4's (where flash_attn.cute imports), one launch
# each, non-causal 8k, B = 2, 16 heads (perf.md v29).
#   OUT=dir bash scripts/ncu_l2.sh "FLASH_ATTN2_FWD_WS_QBUF=1" "FLASH_ATTN2_FWD_WS_BLOCKS=all"
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/ncu_l2}
mkdir -p "$OUT"
[[ -d /tmp/fa4sc ]] && export PYTHONPATH=/tmp/fa4sc:${PYTHONPATH:-}
m=breakdown:lts__throughput.avg.pct_of_peak_sustained_elapsed
m+=,breakdown:l1tex__throughput.avg.pct_of_peak_sustained_elapsed
m+=,lts__t_sectors_srcunit_tex.sum,lts__t_sectors_srcunit_ltcfabric.sum,lts__t_sectors.sum
m+=,lts__t_sectors_srcunit_tex_op_read.sum,lts__t_sectors_srcunit_tex_op_write.sum,lts__t_requests_srcunit_tex.sum
m+=,lts__t_sector_hit_rate.pct,dram__bytes_read.sum,dram__bytes_write.sum,gpu__time_duration.sum
m+=,sm__cycles_elapsed.avg.per_second
run() {  # name, impl, environment assignments...
  local name=$1 impl=$2; shift 2
  env "$@" timeout 150 ncu --metrics "$m" -k regex:flash_fwd_sm90 -c 1 \
    python3 scripts/profile_case.py --d 128 --n 8192 --impl "$impl" >"$OUT/ncu_l2_$name.txt" 2>&1
  echo "== $name ($impl $*) rc $?"
  grep -E "^  [a-zA-Z_].*\(|^    [a-z].*(sum|pct|second)" "$OUT/ncu_l2_$name.txt" | cut -c1-160
}
run ours ours
i=0
for e in "$@"; do i=$((i + 1)); run "ours_env$i" ours "$e"; done
python3 -c "import flash_attn.cute" 2>/dev/null && run fa4 fa4
