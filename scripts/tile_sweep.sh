#!/usr/bin/env bash
# Builds one libflash_attn2.so per tile configuration, for scripts/tile_sweep.py to time on a GPU.
# Runs anywhere nvcc is (no GPU needed): after one full build of BUILD (sm_90 is enough), each variant
# rebuilds only the translation units of the head dims it changes and relinks into OUT/NAME.so.
#
#   scripts/tile_sweep.sh BUILD OUT 'NAME=ROW[;ROW...]' ...
#   ROW: a kTileTable row as written in csrc/cuda/kernel_traits.cuh, e.g. '{128, 128, 64, 4, 64, 128, 8, 4, 2, 2, 2, 0, 31}'
#   A NAME with no '=' links the table as committed.
set -euo pipefail
cd "$(dirname "$0")/.."
build=$1 out=$2
shift 2
mkdir -p "$out"
out=$(realpath "$out")
traits=csrc/cuda/kernel_traits.cuh
cp "$traits" "$out/kernel_traits.orig"
trap 'cp "$out/kernel_traits.orig" "$traits"' EXIT
ninja -C "$build" flash_attn2 >/dev/null
link=$(ninja -C "$build" -t commands flash_attn2 | tail -1)
for spec in "$@"; do
  name=${spec%%=*}
  cp "$out/kernel_traits.orig" "$traits"
  objs=()
  if [[ $spec == *=* ]]; then
    IFS=';' read -ra rows <<<"${spec#*=}"
    for row in "${rows[@]}"; do
      d=$(sed -E 's/^\{([0-9]+),.*/\1/' <<<"$row")
      # The first row of head dim d is the main table's (the low-smem table comes after it).
      python3 - "$traits" "$d" "$row" <<'EOF'
import re, sys
path, d, row = sys.argv[1:]
text = open(path).read()
new, n = re.subn(r"\{%s, [0-9, ]*\}" % d, row, text, count=1)
assert n == 1, f"no table row for head dim {d}"
open(path, "w").write(new)
EOF
      for dir in fwd bwd; do for dt in bf16 fp16; do objs+=("CMakeFiles/flash_attn2.dir/generated/flash_${dir}_hdim${d}_${dt}.cu.o"); done; done
    done
  fi
  ((${#objs[@]})) && ninja -C "$build" "${objs[@]}" | grep -E "spill|error" || true
  (cd "$build" && eval "${link/-o libflash_attn2.so/-o $out/$name.so}")
  # Leave the build directory's objects as committed for the next variant.
  cp "$out/kernel_traits.orig" "$traits"
  ((${#objs[@]})) && ninja -C "$build" "${objs[@]}" >/dev/null
  echo "$name: $out/$name.so"
done
