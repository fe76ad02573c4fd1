#!/usr/bin/env bash
# Builds the sm_90a library of this tree and of a base revision HERE (no GPU needed) and packs both into
# .abbase/prebuilt/libs.tar.xz (a.so: the base, b.so: this tree), for a device call that carries
# [".abbase/prebuilt"] and runs `PREBUILT=1 scripts/hopper_check.sh` or scripts/ab_forward.py on them directly:
# that call then builds nothing (session 25: a build and a base build cost the device 100-200 s of each call;
# the same two builds take a few minutes on this 2-core machine, and the archive is about 8 MB).
#
#   scripts/pack_prebuilt.sh            (base: main)
#   scripts/pack_prebuilt.sh HEAD~1     (base: any revision git archive takes)
#   BASE_REF=none scripts/pack_prebuilt.sh   (this tree's library alone: b.so)
#
# This tree builds in build/cuda (configured here if missing), the base in .abbase/build/local from
# `git archive BASE_REF` (both ignored paths). Uncommitted changes of this tree are built too. .abbase then holds
# a build directory of about 60 MB: carry .abbase/prebuilt, not .abbase (the carry limit is 64 MiB).
set -euo pipefail
cd "$(dirname "$0")/.."
base_ref=${1:-${BASE_REF:-main}}
prefix=$(python3 -c "import torch; print(torch.utils.cmake_prefix_path)")
configure() {  # configure SRC BUILD: Release, CUDA on, sm_90a only (what the device runs)
  [[ -f $2/build.ninja && -f $2/CMakeFiles/rules.ninja ]] && return 0
  cmake -S "$1" -B "$2" -G Ninja -DFLASH_ATTN2_WITH_CUDA=ON -DFLASH_ATTN2_CUDA_ARCHS=90a \
    -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$prefix" >/dev/null
}
configure . build/cuda
if ! grep -q "FLASH_ATTN2_CUDA_ARCHS:STRING=90a$" build/cuda/CMakeCache.txt; then
  echo "build/cuda is not configured for sm_90a alone (FLASH_ATTN2_CUDA_ARCHS): remove it or reconfigure" >&2
  exit 1
fi
ninja -C build/cuda -j2 >/tmp/pack_prebuilt_tree.log 2>&1 || { tail -20 /tmp/pack_prebuilt_tree.log; exit 1; }
tmp=$(mktemp -d)
cp build/cuda/libflash_attn2.so "$tmp/b.so"
files=(b.so)
if [[ $base_ref != none ]]; then
  git rev-parse --verify -q "$base_ref^{commit}" >/dev/null || { echo "no revision $base_ref" >&2; exit 1; }
  # The base tree is re-extracted when the revision changes, its files stamped now (tar -m: with the commit's
  # time, older than objects built since, ninja would keep objects of the previous revision), so it is rebuilt
  # in full then; with the same revision, ninja has nothing to do.
  want=$(git rev-parse "$base_ref^{commit}")
  if [[ ! -f .abbase/REVISION || $(cat .abbase/REVISION) != "$want" ]]; then
    find .abbase -mindepth 1 -maxdepth 1 ! -name build ! -name prebuilt -exec rm -rf {} + 2>/dev/null || true
    mkdir -p .abbase && git archive "$want" | tar -x -m -C .abbase && echo "$want" >.abbase/REVISION
  fi
  configure .abbase .abbase/build/local
  ninja -C .abbase/build/local -j2 >/tmp/pack_prebuilt_base.log 2>&1 ||
    { tail -20 /tmp/pack_prebuilt_base.log; exit 1; }
  cp .abbase/build/local/libflash_attn2.so "$tmp/a.so"
  files+=(a.so)
fi
mkdir -p .abbase/prebuilt
tar -cJf .abbase/prebuilt/libs.tar.xz -C "$tmp" "${files[@]}"
rm -rf "$tmp"
tree=$(git rev-parse --short HEAD)$(git diff --quiet HEAD || echo ' + changes')
echo "packed ${files[*]} (base ${base_ref}, tree ${tree}): $(du -h .abbase/prebuilt/libs.tar.xz | cut -f1)"
