// Debug builds' cycle probes: FwdProbe (flash_fwd_sm90_ws_kernel.cuh, -DFLASH_ATTN2_FWD_TIMELINE,
// scripts/fwd_probe.py) and BwdProbe (flash_bwd_sm90_kernel.cuh, -DFLASH_ATTN2_BWD_TIMELINE, scripts/bwd_probe.py).
// Lane 0 of each consumer warpgroup adds the SM clock cycles since its previous mark to one of kSlots counters of
// its (block, consumer) in the call's timeline buffer (FwdParams::timeline, allocated and written out by the host
// code under the same macro). ptxas moves arithmetic across the clock reads, so a slot's cycles are those between
// two reads as issued, not exactly the named step's (perf.md v32). kOn = false, the default builds: every call
// compiles to nothing.
#pragma once

#include <cstdint>

#include "cuda/flash_params.h"
#include "cuda/tile_primitives.cuh"  // FA2_DEVICE

namespace flash_attn2::cuda {

template <bool kOn, int kConsumers, int kSlots>
struct CycleProbe {
  unsigned long long* out;
  uint32_t t;
  FA2_DEVICE CycleProbe(unsigned long long* timeline, int c, bool lane)
      : out(timeline != nullptr && lane
                ? timeline + (static_cast<long long>(blockIdx.x) * kConsumers + c) * kSlots
                : nullptr) {
    t = static_cast<uint32_t>(clock());
  }
  FA2_DEVICE void mark(int slot) {
    const uint32_t now = static_cast<uint32_t>(clock());
    if (out != nullptr) atomicAdd(out + slot, static_cast<unsigned long long>(now - t));
    t = now;
  }
  FA2_DEVICE void add(int slot, unsigned long long v) const {
    if (out != nullptr) atomicAdd(out + slot, v);
  }
};

template <int kConsumers, int kSlots>
struct CycleProbe<false, kConsumers, kSlots> {
  FA2_DEVICE CycleProbe(const void*, int, bool) {}
  FA2_DEVICE void mark(int) {}
  FA2_DEVICE void add(int, unsigned long long) const {}
};

// The call's timeline buffer where a build has one (any *_TIMELINE macro), else nullptr.
FA2_DEVICE unsigned long long* probe_timeline(const FwdParams& p) {
#if defined(FLASH_ATTN2_SPLITKV_TIMELINE) || defined(FLASH_ATTN2_FWD_TIMELINE) || defined(FLASH_ATTN2_BWD_TIMELINE)
  return p.timeline;
#else
  (void)p;
  return nullptr;
#endif
}

}  // namespace flash_attn2::cuda
