// The ex2.approx rate one SM reaches with few warps (perf.md v32): the WS forward's softmax runs on one warp per
// SMSP while the other consumer's warps wait on their wgmma issue, so what one warp per SMSP can get out of the
// MUFU pipe bounds it (scripts/mufu_rate.cu measures 64 warps per SM). Cycles are the SM's own (clock64 in the
// kernel), so the rate is per SM clock whatever the GPU's clock. Build and run:
//   nvcc -O3 -arch=sm_90a -o /tmp/mufu_warps scripts/mufu_warps.cu && /tmp/mufu_warps
#include <cstdio>
#include <cstdlib>

#include <cuda_runtime.h>

#define CHECK(x)                                                                             \
  do {                                                                                       \
    cudaError_t e = (x);                                                                     \
    if (e != cudaSuccess) {                                                                  \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e)); \
      std::exit(1);                                                                          \
    }                                                                                        \
  } while (0)

constexpr int kIters = 2048;

// kMix: an FFMA beside each ex2 (the softmax's scale-and-subtract), on another chain.
template <int kChains, bool kMix>
__global__ void run(float* out, long long* cycles, float seed) {
  float x[kChains], y[kChains];
#pragma unroll
  for (int c = 0; c < kChains; ++c) {
    x[c] = seed * (threadIdx.x + c) * 1e-6f - 0.5f;
    y[c] = x[c];
  }
  __syncthreads();
  const long long t0 = clock64();
  for (int i = 0; i < kIters; ++i) {
#pragma unroll
    for (int c = 0; c < kChains; ++c) {
      asm volatile("ex2.approx.ftz.f32 %0, %0;" : "+f"(x[c]));
      if constexpr (kMix) y[c] = fmaf(y[c], 0.999f, 1e-3f);
    }
  }
  __syncthreads();
  const long long t1 = clock64();
  float s = 0.f;
#pragma unroll
  for (int c = 0; c < kChains; ++c) s += x[c] + y[c];
  if (s == 12345.f) out[0] = s;
  if (threadIdx.x == 0) cycles[blockIdx.x] = t1 - t0;
}

template <int kChains, bool kMix>
void measure(int sms, int warps, float* out, long long* cycles) {
  const int threads = 32 * warps;
  run<kChains, kMix><<<sms, threads>>>(out, cycles, 1.f);  // one block per SM (warm-up)
  CHECK(cudaGetLastError());
  run<kChains, kMix><<<sms, threads>>>(out, cycles, 1.f);
  CHECK(cudaDeviceSynchronize());
  long long* host = new long long[sms];
  CHECK(cudaMemcpy(host, cycles, sizeof(long long) * sms, cudaMemcpyDeviceToHost));
  double mean = 0.0;
  for (int i = 0; i < sms; ++i) mean += static_cast<double>(host[i]) / sms;
  delete[] host;
  const double ops = static_cast<double>(threads) * kChains * kIters;
  std::printf("| %d | %d | %s | %.2f |\n", warps, kChains, kMix ? "ex2 + ffma" : "ex2", ops / mean);
}

int main() {
  int dev = 0, sms = 0;
  CHECK(cudaGetDevice(&dev));
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  float* out = nullptr;
  long long* cycles = nullptr;
  CHECK(cudaMalloc(&out, sizeof(float)));
  CHECK(cudaMalloc(&cycles, sizeof(long long) * sms));
  std::printf("| warps per SM | chains per thread | ops | ex2 per SM clock |\n|---|---|---|---|\n");
  for (int warps : {4, 8, 12, 16, 32}) {
    measure<8, false>(sms, warps, out, cycles);
    measure<32, false>(sms, warps, out, cycles);
    measure<32, true>(sms, warps, out, cycles);
  }
  CHECK(cudaFree(out));
  CHECK(cudaFree(cycles));
  return 0;
}
