// Counters for the split-KV kernel's folded combine (FwdParams::splitkv_counters): one per packed row tile,
// zero when a call starts. The kernel leaves them zero (the last block of a row tile resets its counter), so a
// buffer serves any number of calls as long as no two of them run at once.
//
// Who folds:
//   - a call being captured into a CUDA graph takes a buffer of its own, for good: a graph's replays are
//     ordered with each other, and nothing else ever uses that buffer. Buffers come from a per-device pool
//     allocated with cudaMalloc and zeroed outside the capture. (Two instances of one captured graph run at
//     the same time would share it, as they share the graph's memory pool anyway.)
//   - an eager call runs the separate combine kernel: its launch latency hides under the call's own host
//     overhead, and a buffer zeroed per call would cost a launch of its own;
//   - FLASH_ATTN2_SPLITKV_FOLD=always: eager calls fold too, with counters zeroed per call from the caching
//     allocator (tests run the folded kernel through it); =0: nothing folds (A/B runs).
// nullptr: run the combine kernel (no fold wanted, more row tiles than a buffer holds, or the pool is full).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace flash_attn2::cuda {

unsigned* splitkv_counters(const at::Tensor& like, int64_t row_tiles, std::vector<at::Tensor>& keep);

}  // namespace flash_attn2::cuda
