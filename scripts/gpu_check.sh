#!/usr/bin/env bash
# One call on a GPU machine: build (sm_90a by default), run the GoogleTest and pytest suites on the GPU (the
# CUDA kernel tests twice: default kernel selection, then the portable mma.sync kernels), compute-sanitizer
# memcheck and racecheck on small shapes (both selections), the backward kernels side by side
# (scripts/compare_kernels.py), then the benchmark. Prints a short summary last.
#   scripts/gpu_check.sh [all|tests|compare|bench|sanitize|decode|none]   (FLASH_ATTN2_CUDA_ARCHS, BENCH_ARGS, OUT
#   override). decode: the decode benchmark rows and examples/generate (built against an install of the build).
set -uo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
OUT=${OUT:-/tmp/flash_attn2_gpu}
mkdir -p "$OUT"
BUILD=${BUILD:-build/gpu}
summary=()

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader || true
# Build with the system g++ where there is one: a toolchain that links its own libstdc++ statically into
# shared objects (seen on the lent GPU machines' /opt/gcc) crashes when our library and Python's process
# share C++ streams. The compiler used is printed in the summary.
compiler=()
if [[ -x /usr/bin/g++ ]]; then
  # The environment's CC / CXX / CUDAHOSTCXX may name that toolchain: override all three.
  export CC=/usr/bin/gcc CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++
  compiler=(-DCMAKE_C_COMPILER=/usr/bin/gcc -DCMAKE_CXX_COMPILER=/usr/bin/g++ -DCMAKE_CUDA_HOST_COMPILER=/usr/bin/g++)
fi
start=$(date +%s)
if ! cmake -S . -B $BUILD -G Ninja -DFLASH_ATTN2_BUILD_TESTS=ON -DFLASH_ATTN2_WITH_CUDA=ON "${compiler[@]}" \
      -DFLASH_ATTN2_CUDA_ARCHS="${FLASH_ATTN2_CUDA_ARCHS:-90a}" >"$OUT/configure.log" 2>&1; then
  tail -40 "$OUT/configure.log"; exit 1
fi
if ! cmake --build $BUILD -j"$(nproc)" >"$OUT/build.log" 2>&1; then
  grep -E "error|Error" -A6 "$OUT/build.log" | head -80; exit 1
fi
summary+=("build: $(( $(date +%s) - start )) s with $(grep -m1 'CXX compiler identification' "$OUT/configure.log"); $(grep -c 'spill' "$OUT/build.log") ptxas spill warnings")
# ptxas serialises a kernel's wgmma when it must (C7520: a branch it takes to be divergent around them, C7512: too
# few registers, C7515: accumulators defined by other code in the pipeline, ...): the d64 WS backward ran 11-19%
# slow with C7520 for a session unnoticed (perf.md v15), and four A/B-only kernels sat with C7512 for thirteen
# (v43). Name every kernel any of them hits.
serialised=$(grep -E 'C75[0-9][0-9].*(serialized|serialised)' "$OUT/build.log" | grep -oE "function '[^']+'" | sort -u)
[[ -n $serialised ]] && summary+=("WGMMA SERIALISED by ptxas in: $(echo $serialised | tr '\n' ' ')")
# A toolchain that links libstdc++ statically into shared objects gives our library a second copy of the C++
# runtime next to the one Python's process already has; error messages built with it have crashed there.
if ! command -v readelf >/dev/null; then stdcxx="no readelf: libstdc++ linkage unknown"
elif readelf -d $BUILD/libflash_attn2.so | grep -q 'libstdc++'; then stdcxx="libstdc++ linked dynamically"
else
  stdcxx="libstdc++ NOT in NEEDED (linked statically?): error-path tests may crash in Python; linked by: $(
    ninja -C $BUILD -t commands flash_attn2 | tail -1 | sed 's/^.*&& //' | cut -c1-120)"
fi
summary+=("toolchain: $stdcxx")
export FLASH_ATTN2_LIBRARY=$PWD/$BUILD/libflash_attn2.so PYTHONPATH=$PWD/python PYTHONUNBUFFERED=1

if [[ $what == all || $what == tests ]]; then
  ctest --test-dir $BUILD -j4 --timeout 600 --output-on-failure >"$OUT/ctest.log" 2>&1
  grep -E "Failed|\*\*\*" "$OUT/ctest.log" | head -40
  summary+=("ctest: $(grep -E 'tests passed' "$OUT/ctest.log")")
  FLASH_ATTN2_PORTABLE_KERNELS=1 $BUILD/cpp_tests/test_cuda_kernels >"$OUT/ctest_portable.log" 2>&1
  rc=$?
  FLASH_ATTN2_PORTABLE_KERNELS=1 python3 -m pytest python/tests/test_variants.py -q -rfE -p no:cacheprovider \
    -k "cuda" >"$OUT/pytest_variants_portable.log" 2>&1
  grep -E "^(FAILED|ERROR)" "$OUT/pytest_variants_portable.log" | head -20
  summary+=("pytest variants, portable kernels: $(tail -1 "$OUT/pytest_variants_portable.log")")
  # The warp-specialised forward is the default for d128 / d256 on sm_90 (d64: FLASH_ATTN2_FWD_WS=1), the
  # warp-specialised backward for d128. The other Hopper kernels (flash_fwd_sm90_kernel, flash_bwd_sm90_kernel)
  # still run where the TMA cannot address the tensors: run the CUDA tests with them instead
  # (FLASH_ATTN2_FWD_WS=0 FLASH_ATTN2_BWD_WS=0), the d128 overlapped forward loop forced everywhere; then with
  # the warp-specialised forward on for every head dim it has.
  FLASH_ATTN2_FWD_WS=0 FLASH_ATTN2_BWD_WS=0 FLASH_ATTN2_FWD_OVERLAP=1 python3 -m pytest python/tests/test_kernels.py \
    python/tests/test_variants.py -q -rfE -p no:cacheprovider -k "cuda" >"$OUT/pytest_overlap.log" 2>&1
  grep -E "^(FAILED|ERROR)" "$OUT/pytest_overlap.log" | head -20
  summary+=("pytest kernels + variants, WS forward and backward off, d128 forward overlapped everywhere: $(tail -1 "$OUT/pytest_overlap.log")")
  FLASH_ATTN2_FWD_WS=1 python3 -m pytest python/tests/test_kernels.py python/tests/test_variants.py \
    python/tests/test_sdpa_provider.py python/tests/test_ops.py -q -rfE -p no:cacheprovider -k "cuda" \
    >"$OUT/pytest_ws.log" 2>&1
  grep -E "^(FAILED|ERROR)" "$OUT/pytest_ws.log" | head -20
  summary+=("pytest kernels + variants + provider + ops, warp-specialised forward on for d64 too: $(tail -1 "$OUT/pytest_ws.log")")
  grep -E "FAILED|Failure" "$OUT/ctest_portable.log" | head -20
  summary+=("CUDA kernel tests, portable kernels (rc $rc): $(grep -E '^\[  PASSED  \]|tests? FAILED' "$OUT/ctest_portable.log" | tr '\n' ' ')")
  # The error-path tests run in their own process, so that a crash there (see "toolchain") cannot hide the
  # results of the others.
  errors_k="bad or errors or refused"
  python3 -m pytest python/tests -q -rfE -p no:cacheprovider -k "not ($errors_k)" >"$OUT/pytest.log" 2>&1
  grep -E "^(FAILED|ERROR)|Error|assert" "$OUT/pytest.log" | head -40
  summary+=("pytest: $(tail -1 "$OUT/pytest.log")")
  python3 -m pytest python/tests -q -rfE -p no:cacheprovider -k "$errors_k" >"$OUT/pytest_errors.log" 2>&1
  rc=$?
  summary+=("pytest error paths (rc $rc): $(tail -1 "$OUT/pytest_errors.log")")
fi
if [[ $what == all || $what == sanitize ]]; then
  for portable in 0 1; do
    for tool in memcheck racecheck; do
      FLASH_ATTN2_PORTABLE_KERNELS=$portable compute-sanitizer --tool $tool --error-exitcode 9 \
        python3 scripts/sanitize_cases.py >"$OUT/$tool$portable.log" 2>&1
      summary+=("$tool, portable=$portable (rc $?): $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/$tool$portable.log" | tail -1)")
    done
  done
  for ws in ws wsbwd; do  # the warp-specialised forward and backward (TMA, mbarriers, named barriers)
    for tool in memcheck racecheck synccheck; do
      FA2_SANITIZE=$ws compute-sanitizer --tool $tool --error-exitcode 9 python3 scripts/sanitize_cases.py \
        >"$OUT/${tool}_$ws.log" 2>&1
      summary+=("$tool, FA2_SANITIZE=$ws (rc $?): $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/${tool}_$ws.log" | tail -1)")
    done
  done
fi
if [[ $what == all || $what == compare ]]; then
  python3 scripts/compare_kernels.py >"$OUT/compare.log" 2>&1
  summary+=("compare_kernels rc $?")
  cat "$OUT/compare.log"
fi
if [[ $what == all || $what == bench ]]; then
  # FlashAttention-4's columns, where ../shared/tools/fa4-wheels.sh installed it on this machine.
  [[ -d /tmp/fa4sc ]] && export PYTHONPATH=/tmp/fa4sc:${PYTHONPATH:-}
  python3 -m flash_attn2.bench --device cuda ${BENCH_ARGS:---variants} --out "$OUT/bench.md" >"$OUT/bench.log" 2>&1
  summary+=("bench rc $?")
  grep -E "^check|^CUDA" "$OUT/bench.log"
  cat "$OUT/bench.md" 2>/dev/null || tail -30 "$OUT/bench.log"
fi
if [[ $what == decode ]]; then
  cmake --install $BUILD --prefix /tmp/fa2_install >/dev/null
  prefix="/tmp/fa2_install;$(python3 -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')"
  if cmake -S examples/generate -B $BUILD/generate -G Ninja -DCMAKE_PREFIX_PATH="$prefix" "${compiler[@]}" \
      >"$OUT/generate_build.log" 2>&1 && cmake --build $BUILD/generate >>"$OUT/generate_build.log" 2>&1; then
    LD_LIBRARY_PATH=/tmp/fa2_install/lib:${LD_LIBRARY_PATH:-} $BUILD/generate/generate 2>&1 | tee "$OUT/generate.log"
    summary+=("examples/generate rc ${PIPESTATUS[0]}: $(tail -1 "$OUT/generate.log")")
    while IFS= read -r line; do summary+=("  $line"); done < <(grep "tokens/s" "$OUT/generate.log")
  else
    tail -20 "$OUT/generate_build.log"
    summary+=("examples/generate: build failed")
  fi
  python3 -m flash_attn2.bench --device cuda --decode-only --out "$OUT/decode.md" >"$OUT/decode.log" 2>&1
  summary+=("decode bench rc $?")
  grep -E "^check|^decode|^skip" "$OUT/decode.log"
  cat "$OUT/decode.md" 2>/dev/null || tail -30 "$OUT/decode.log"
fi
echo "=== summary"
printf '%s\n' "${summary[@]}"
