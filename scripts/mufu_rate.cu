// Throughput of the special-function unit's instructions that the softmax and the softcap issue per score
// (ex2.approx, tanh.approx) against FMA, on the GPU this runs on: ops per clock per SM.
// The question it answers (perf.md v17): is the d128 softcap forward bound by a tanh that runs at a lower rate
// than ex2 on this GPU? Then (perf.md v32) the ex2 rate one SM reaches with few warps: the WS forward's softmax runs
// on one warp per SMSP while the other consumer's warps wait on their wgmma issue, so what one warp per SMSP gets
// out of the MUFU pipe bounds it. That table's cycles are the SM's own (clock64 in the kernel), so its rates are per
// SM clock whatever clock the GPU ran at. And (session 32) the half-precision forms: f16x2 / bf16x2 compile to two
// MUFU operations on sm_90 (perf.md v18, v31), but whether each of those runs at the f32 rate was never measured;
// the packed rows count two results per instruction. Build and run (the hopper_check step `mufu` does):
//   nvcc -O3 -arch=sm_90a -o /tmp/mufu_rate scripts/mufu_rate.cu && /tmp/mufu_rate
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

constexpr int kChains = 8;    // independent chains per thread, so that latency is hidden
constexpr int kIters = 4096;  // dependent steps per chain

enum Op { kEx2, kTanh, kEx2Tanh, kFma, kTanhF16x2, kTanhBf16x2, kEx2F16x2, kTanhF16 };

// The packed ops' chains run on 32-bit registers holding two halves.
template <Op op>
__device__ __forceinline__ unsigned step_packed(unsigned x) {
  unsigned y;
  if constexpr (op == kTanhF16x2) {
    asm volatile("tanh.approx.f16x2 %0, %1;" : "=r"(y) : "r"(x));
  } else if constexpr (op == kTanhBf16x2) {
    asm volatile("tanh.approx.bf16x2 %0, %1;" : "=r"(y) : "r"(x));
  } else if constexpr (op == kEx2F16x2) {
    asm volatile("ex2.approx.f16x2 %0, %1;" : "=r"(y) : "r"(x));
  } else {  // kTanhF16: one half per instruction (the low half; the high half is left as it is)
    unsigned short lo = static_cast<unsigned short>(x), r;
    asm volatile("tanh.approx.f16 %0, %1;" : "=h"(r) : "h"(lo));
    y = (x & 0xffff0000u) | r;
  }
  return y;
}

template <Op op>
__global__ void run_packed(float* out, float seed) {
  unsigned x[kChains];
#pragma unroll
  for (int c = 0; c < kChains; ++c) x[c] = 0x38003800u ^ ((threadIdx.x + c) & 0xff);  // about 0.5 in f16
  for (int i = 0; i < kIters; ++i) {
#pragma unroll
    for (int c = 0; c < kChains; ++c) x[c] = step_packed<op>(x[c]);
  }
  unsigned s = 0;
#pragma unroll
  for (int c = 0; c < kChains; ++c) s ^= x[c];
  if (s == 12345u + static_cast<unsigned>(seed)) out[0] = 1.f;  // never true; keeps the chains live
}

template <Op op>
__device__ __forceinline__ float step(float x) {
  float y;
  if constexpr (op == kEx2) {
    asm volatile("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  } else if constexpr (op == kTanh) {
    asm volatile("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
  } else if constexpr (op == kEx2Tanh) {  // one of each per step: the softcap forward's pair per score
    float t;
    asm volatile("tanh.approx.f32 %0, %1;" : "=f"(t) : "f"(x));
    asm volatile("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(t));
  } else {
    y = fmaf(x, 0.999f, 1e-3f);
  }
  return y;
}

template <Op op>
__global__ void run(float* out, float seed) {
  float x[kChains];
#pragma unroll
  for (int c = 0; c < kChains; ++c) x[c] = seed * (threadIdx.x + c) * 1e-6f - 0.5f;
  for (int i = 0; i < kIters; ++i) {
#pragma unroll
    for (int c = 0; c < kChains; ++c) x[c] = step<op>(x[c]);
  }
  float s = 0.f;
#pragma unroll
  for (int c = 0; c < kChains; ++c) s += x[c];
  if (s == 12345.f) out[0] = s;  // never true; keeps the chains live
}

template <Op op>
double ops_per_clock_per_sm(const char* name, int sms, double clock_hz, float* out) {
  const int blocks = sms * 4, threads = 512;  // 64 warps per SM
  constexpr bool kPacked = op >= kTanhF16x2;
  auto launch = [&] {
    if constexpr (kPacked) run_packed<op><<<blocks, threads>>>(out, 1.f);
    else run<op><<<blocks, threads>>>(out, 1.f);
  };
  launch();  // warm-up
  CHECK(cudaGetLastError());
  cudaEvent_t a, b;
  CHECK(cudaEventCreate(&a));
  CHECK(cudaEventCreate(&b));
  CHECK(cudaEventRecord(a));
  launch();
  CHECK(cudaEventRecord(b));
  CHECK(cudaEventSynchronize(b));
  float ms = 0.f;
  CHECK(cudaEventElapsedTime(&ms, a, b));
  const double per_step = op == kEx2Tanh || (kPacked && op != kTanhF16) ? 2.0 : 1.0;  // results per step
  const double ops = static_cast<double>(blocks) * threads * kChains * kIters * per_step;
  const double rate = ops / (ms * 1e-3) / clock_hz / sms;
  std::printf("%-10s %8.3f ms  %7.2f ops per clock per SM\n", name, ms, rate);
  CHECK(cudaEventDestroy(a));
  CHECK(cudaEventDestroy(b));
  return rate;
}

// The few-warps table: one block per SM of `warps` warps, kChainsFew independent ex2 chains a thread (kMix: an FFMA
// beside each ex2 on another chain, the softmax's scale-and-subtract), timed by the SM's clock64.
constexpr int kItersFew = 2048;

template <int kChainsFew, bool kMix>
__global__ void run_few(float* out, long long* cycles, float seed) {
  float x[kChainsFew], y[kChainsFew];
#pragma unroll
  for (int c = 0; c < kChainsFew; ++c) {
    x[c] = seed * (threadIdx.x + c) * 1e-6f - 0.5f;
    y[c] = x[c];
  }
  __syncthreads();
  const long long t0 = clock64();
  for (int i = 0; i < kItersFew; ++i) {
#pragma unroll
    for (int c = 0; c < kChainsFew; ++c) {
      asm volatile("ex2.approx.ftz.f32 %0, %0;" : "+f"(x[c]));
      if constexpr (kMix) y[c] = fmaf(y[c], 0.999f, 1e-3f);
    }
  }
  __syncthreads();
  const long long t1 = clock64();
  float s = 0.f;
#pragma unroll
  for (int c = 0; c < kChainsFew; ++c) s += x[c] + y[c];
  if (s == 12345.f) out[0] = s;
  if (threadIdx.x == 0) cycles[blockIdx.x] = t1 - t0;
}

template <int kChainsFew, bool kMix>
void few_warps_row(int sms, int warps, float* out, long long* cycles) {
  const int threads = 32 * warps;
  run_few<kChainsFew, kMix><<<sms, threads>>>(out, cycles, 1.f);  // warm-up
  CHECK(cudaGetLastError());
  run_few<kChainsFew, kMix><<<sms, threads>>>(out, cycles, 1.f);
  CHECK(cudaDeviceSynchronize());
  long long* host = new long long[sms];
  CHECK(cudaMemcpy(host, cycles, sizeof(long long) * sms, cudaMemcpyDeviceToHost));
  double mean = 0.0;
  for (int i = 0; i < sms; ++i) mean += static_cast<double>(host[i]) / sms;
  delete[] host;
  const double ops = static_cast<double>(threads) * kChainsFew * kItersFew;
  std::printf("| %d | %d | %s | %.2f |\n", warps, kChainsFew, kMix ? "ex2 + ffma" : "ex2", ops / mean);
}

int main() {
  int dev = 0, sms = 0, khz = 0;
  CHECK(cudaGetDevice(&dev));
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  CHECK(cudaDeviceGetAttribute(&khz, cudaDevAttrClockRate, dev));
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, dev));
  std::printf("%s, %d SMs, clock %.0f MHz (the attribute's; rates assume the GPU ran at it)\n", prop.name, sms,
              khz / 1e3);
  float* out = nullptr;
  CHECK(cudaMalloc(&out, sizeof(float)));
  const double hz = khz * 1e3;
  const double ex2 = ops_per_clock_per_sm<kEx2>("ex2", sms, hz, out);
  const double tanh = ops_per_clock_per_sm<kTanh>("tanh", sms, hz, out);
  ops_per_clock_per_sm<kEx2Tanh>("tanh+ex2", sms, hz, out);
  ops_per_clock_per_sm<kFma>("fma", sms, hz, out);
  std::printf("tanh / ex2 rate: %.2f\n", tanh / ex2);
  // results per clock per SM: a packed op's two halves count as two
  const double th2 = ops_per_clock_per_sm<kTanhF16x2>("tanh.f16x2", sms, hz, out);
  const double tb2 = ops_per_clock_per_sm<kTanhBf16x2>("tanh.bf16x2", sms, hz, out);
  const double e2 = ops_per_clock_per_sm<kEx2F16x2>("ex2.f16x2", sms, hz, out);
  const double th1 = ops_per_clock_per_sm<kTanhF16>("tanh.f16", sms, hz, out);
  std::printf("results per clock vs f32 tanh: tanh.f16x2 %.2f, tanh.bf16x2 %.2f, tanh.f16 %.2f; ex2.f16x2 vs f32 ex2 %.2f\n",
              th2 / tanh, tb2 / tanh, th1 / tanh, e2 / ex2);
  long long* cycles = nullptr;
  CHECK(cudaMalloc(&cycles, sizeof(long long) * sms));
  std::printf("\n| warps per SM | chains per thread | ops | ex2 per SM clock |\n|---|---|---|---|\n");
  for (int warps : {4, 8, 16}) {  // one block per SM; 32 warps of 32 chains exceed the register file
    few_warps_row<8, false>(sms, warps, out, cycles);
    few_warps_row<32, false>(sms, warps, out, cycles);
    few_warps_row<32, true>(sms, warps, out, cycles);
  }
  CHECK(cudaFree(cycles));
  CHECK(cudaFree(out));
  return 0;
}
