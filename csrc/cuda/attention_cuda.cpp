// CUDA dispatch for the flash_attn2 ops: validates inputs, picks the compiled head-dim variant, prepares
// layouts, workspaces and parameters, and launches on the current stream of the inputs' device.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "checks.h"
#include "trivial_cases.h"
#include "cuda/flash_params.h"

namespace flash_attn2::cuda {
namespace {

constexpr int kMaxHeadDim = 256;

void check_cuda_inputs(const char* op, const at::Tensor& q, const ConcreteShape& s) {
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, op,
              ": CUDA kernels take float16 or bfloat16 inputs, got ", q.scalar_type(),
              "; cast first, e.g. q.to(torch.bfloat16) (float32/float64 run on the CPU kernel)");
  TORCH_CHECK(s.head_dim % 8 == 0 && s.head_dim > 0 && s.head_dim <= kMaxHeadDim, op,
              ": CUDA kernels need a head dim D that is a positive multiple of 8 and at most ", kMaxHeadDim,
              ", got D = ", s.head_dim);
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  TORCH_CHECK(s.seqlen_q <= kIntMax && s.seqlen_k <= kIntMax && s.batch <= 65535 && s.heads_q <= kIntMax, op,
              ": sizes exceed the CUDA kernels' limits (batch <= 65535, heads and sequence lengths < 2^31), got "
              "B = ", s.batch, ", Hq = ", s.heads_q, ", Nq = ", s.seqlen_q, ", Nk = ", s.seqlen_k);
}

// The kernels read rows with 16-byte vector loads: the last dim must be contiguous and every row start 16-byte
// aligned. Anything else (a sliced head dim, an odd storage offset) is copied once into a contiguous tensor.
at::Tensor kernel_layout(const at::Tensor& t) {
  const int64_t elems_per_16b = 16 / t.element_size();
  bool ok = t.stride(3) == 1 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int d = 0; d < 3 && ok; ++d) ok = t.size(d) == 1 || t.stride(d) % elems_per_16b == 0;
  return ok ? t : t.clone(at::MemoryFormat::Contiguous);
}

int compiled_head_dim(int64_t d) {
  for (int candidate : {32, 64, 96, 128, 160, 192, 224, 256}) {
    if (d <= candidate) return candidate;
  }
  TORCH_CHECK(false, "flash_attn2: head dim ", d, " exceeds ", kMaxHeadDim);
}

template <template <typename, int> class Launcher, typename Params>
void dispatch(const Params& params, int64_t head_dim, cudaStream_t stream) {
  auto by_type = [&](auto element) {
    using T = decltype(element);
    switch (compiled_head_dim(head_dim)) {
      case 32: return Launcher<T, 32>::run(params, stream);
      case 64: return Launcher<T, 64>::run(params, stream);
      case 96: return Launcher<T, 96>::run(params, stream);
      case 128: return Launcher<T, 128>::run(params, stream);
      case 160: return Launcher<T, 160>::run(params, stream);
      case 192: return Launcher<T, 192>::run(params, stream);
      case 224: return Launcher<T, 224>::run(params, stream);
      default: return Launcher<T, 256>::run(params, stream);
    }
  };
  if (params.is_bf16) {
    by_type(__nv_bfloat16{});
  } else {
    by_type(__half{});
  }
}

template <typename T, int D>
struct FwdLauncher {
  static void run(const FwdParams& p, cudaStream_t s) { run_flash_fwd<T, D>(p, s); }
};
template <typename T, int D>
struct BwdLauncher {
  static void run(const BwdParams& p, cudaStream_t s) { run_flash_bwd<T, D>(p, s); }
};

void fill_forward_params(FwdParams& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const at::Tensor& out, const at::Tensor& lse, const ConcreteShape& s, bool causal,
                         std::optional<double> scale) {
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.q_batch_stride = q.stride(0);
  p.q_head_stride = q.stride(1);
  p.q_row_stride = q.stride(2);
  p.k_batch_stride = k.stride(0);
  p.k_head_stride = k.stride(1);
  p.k_row_stride = k.stride(2);
  p.v_batch_stride = v.stride(0);
  p.v_head_stride = v.stride(1);
  p.v_row_stride = v.stride(2);
  p.o_batch_stride = out.stride(0);
  p.o_head_stride = out.stride(1);
  p.o_row_stride = out.stride(2);
  p.batch = static_cast<int>(s.batch);
  p.heads_q = static_cast<int>(s.heads_q);
  p.heads_kv = static_cast<int>(s.heads_kv);
  p.seqlen_q = static_cast<int>(s.seqlen_q);
  p.seqlen_k = static_cast<int>(s.seqlen_k);
  p.head_dim = static_cast<int>(s.head_dim);
  const double sm_scale = softmax_scale(scale, s.head_dim);
  p.scale = static_cast<float>(sm_scale);
  p.scale_log2 = static_cast<float>(sm_scale * M_LOG2E);
  p.causal = causal;
  p.is_bf16 = q.scalar_type() == at::kBFloat16;
}

std::tuple<at::Tensor, at::Tensor> fwd_with_lse_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                     const at::Tensor& v_in, bool causal,
                                                     std::optional<double> scale) {
  constexpr const char* op = "flash_attn2::fwd_with_lse";
  const ConcreteShape s = concrete(check_forward_inputs(op, q_in, k_in, v_in, scale));
  check_cuda_inputs(op, q_in, s);
  const c10::cuda::CUDAGuard device_guard(q_in.device());

  auto [out, lse, done] = forward_outputs(q_in, s, causal);
  if (done) return {out, lse};
  const at::Tensor q = kernel_layout(q_in), k = kernel_layout(k_in), v = kernel_layout(v_in);
  FwdParams params{};
  fill_forward_params(params, q, k, v, out, lse, s, causal, scale);
  dispatch<FwdLauncher>(params, s.head_dim, at::cuda::getCurrentCUDAStream().stream());
  return {out, lse};
}

at::Tensor fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal,
                    std::optional<double> scale) {
  return std::get<0>(fwd_with_lse_cuda(q, k, v, causal, scale));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_cuda(const at::Tensor& dout_in, const at::Tensor& q_in,
                                                        const at::Tensor& k_in, const at::Tensor& v_in,
                                                        const at::Tensor& out_in, const at::Tensor& lse_in,
                                                        bool causal, std::optional<double> scale) {
  constexpr const char* op = "flash_attn2::bwd";
  const ConcreteShape s =
      concrete(check_backward_inputs(op, dout_in, q_in, k_in, v_in, out_in, lse_in, scale));
  check_cuda_inputs(op, q_in, s);
  const c10::cuda::CUDAGuard device_guard(q_in.device());

  at::Tensor dq = at::empty(q_in.sizes(), q_in.options());
  at::Tensor dk = at::empty(k_in.sizes(), k_in.options());
  at::Tensor dv = at::empty(v_in.sizes(), v_in.options());
  if (dq.numel() == 0 || dk.numel() == 0) {  // no queries or no keys: every gradient is zero
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  const at::Tensor q = kernel_layout(q_in), k = kernel_layout(k_in), v = kernel_layout(v_in);
  const at::Tensor out = kernel_layout(out_in), dout = kernel_layout(dout_in), lse = lse_in.contiguous();
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor dq_accum = at::zeros({s.batch, s.heads_q, s.seqlen_q, s.head_dim}, f32);
  at::Tensor softmax_d = at::empty({s.batch, s.heads_q, s.seqlen_q}, f32);

  BwdParams params{};
  fill_forward_params(params, q, k, v, out, lse, s, causal, scale);
  params.dout = dout.data_ptr();
  params.do_batch_stride = dout.stride(0);
  params.do_head_stride = dout.stride(1);
  params.do_row_stride = dout.stride(2);
  params.dq = dq.data_ptr();
  params.dk = dk.data_ptr();
  params.dv = dv.data_ptr();
  params.dq_batch_stride = dq.stride(0);
  params.dq_head_stride = dq.stride(1);
  params.dq_row_stride = dq.stride(2);
  params.dk_batch_stride = dk.stride(0);
  params.dk_head_stride = dk.stride(1);
  params.dk_row_stride = dk.stride(2);
  params.dv_batch_stride = dv.stride(0);
  params.dv_head_stride = dv.stride(1);
  params.dv_row_stride = dv.stride(2);
  params.dq_accum = dq_accum.data_ptr<float>();
  params.softmax_d = softmax_d.data_ptr<float>();
  dispatch<BwdLauncher>(params, s.head_dim, at::cuda::getCurrentCUDAStream().stream());
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(flash_attn2, CUDA, m) {
  m.impl("fwd", &fwd_cuda);
  m.impl("fwd_with_lse", &fwd_with_lse_cuda);
  m.impl("bwd", &bwd_cuda);
}

}  // namespace flash_attn2::cuda
