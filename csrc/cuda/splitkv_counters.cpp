#include "cuda/splitkv_counters.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <unordered_map>

#include "cuda/cuda_check.cuh"

namespace flash_attn2::cuda {
namespace {

constexpr int64_t kSlotCounters = 256;   // counters per captured call (row tiles of a split-KV launch)
constexpr int64_t kChunkSlots = 256;     // slots per cudaMalloc (256 KB)
constexpr int64_t kMaxChunks = 64;       // 16384 captured calls per device, 16 MB; then the combine kernel

enum class Fold { kNever, kCaptured, kAlways };

Fold fold_policy() {
  const char* env = std::getenv("FLASH_ATTN2_SPLITKV_FOLD");
  if (env != nullptr && std::strcmp(env, "0") == 0) return Fold::kNever;
  if (env != nullptr && std::strcmp(env, "always") == 0) return Fold::kAlways;
  return Fold::kCaptured;
}

// Per device: chunks of zeroed slots handed out one per captured call and never returned.
struct Pool {
  std::vector<unsigned*> chunks;
  int64_t used = 0;  // slots handed out
};

// Allocates and zeroes a chunk while the calling thread may be capturing: relaxed capture mode for the
// cudaMalloc, and the memset on a private non-blocking stream (not captured), waited for here.
unsigned* new_chunk() {
  cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
  FA2_CUDA_CHECK(cudaThreadExchangeStreamCaptureMode(&mode));
  void* ptr = nullptr;
  cudaError_t err = cudaMalloc(&ptr, kChunkSlots * kSlotCounters * sizeof(unsigned));
  cudaStream_t side = nullptr;
  if (err == cudaSuccess) err = cudaStreamCreateWithFlags(&side, cudaStreamNonBlocking);
  if (err == cudaSuccess) err = cudaMemsetAsync(ptr, 0, kChunkSlots * kSlotCounters * sizeof(unsigned), side);
  if (err == cudaSuccess) err = cudaStreamSynchronize(side);
  if (side != nullptr) cudaStreamDestroy(side);
  cudaThreadExchangeStreamCaptureMode(&mode);  // back to the caller's mode
  if (err != cudaSuccess) {
    if (ptr != nullptr) cudaFree(ptr);
    (void)cudaGetLastError();  // an allocation failure only means no fold
    return nullptr;
  }
  return static_cast<unsigned*>(ptr);
}

unsigned* captured_slot(int device) {
  static std::mutex mu;
  static std::unordered_map<int, Pool> pools;
  std::lock_guard<std::mutex> lock(mu);
  Pool& pool = pools[device];
  if (pool.used == static_cast<int64_t>(pool.chunks.size()) * kChunkSlots) {
    if (static_cast<int64_t>(pool.chunks.size()) == kMaxChunks) return nullptr;
    unsigned* chunk = new_chunk();
    if (chunk == nullptr) return nullptr;
    pool.chunks.push_back(chunk);
  }
  const int64_t slot = pool.used++;
  return pool.chunks[slot / kChunkSlots] + (slot % kChunkSlots) * kSlotCounters;
}

}  // namespace

unsigned* splitkv_counters(const at::Tensor& like, int64_t row_tiles, std::vector<at::Tensor>& keep) {
  const Fold policy = fold_policy();
  if (policy == Fold::kNever || row_tiles <= 0) return nullptr;
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  FA2_CUDA_CHECK(cudaStreamIsCapturing(at::cuda::getCurrentCUDAStream().stream(), &status));
  if (status == cudaStreamCaptureStatusActive) {
    return row_tiles <= kSlotCounters ? captured_slot(like.get_device()) : nullptr;
  }
  if (policy != Fold::kAlways) return nullptr;
  keep.push_back(at::zeros({row_tiles}, like.options().dtype(at::kInt)));
  return reinterpret_cast<unsigned*>(keep.back().data_ptr<int>());
}

}  // namespace flash_attn2::cuda
