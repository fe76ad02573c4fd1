// The one place the flash_attn2 schemas are defined. Kernels register per dispatch key in their own files:
// cpu/attention_cpu.cpp (CPU), cuda/attention_cuda.cpp (CUDA), meta.cpp (Meta), autograd.cpp (Autograd).
#include <torch/library.h>

TORCH_LIBRARY(flash_attn2, m) {
  m.def("fwd(Tensor q, Tensor k, Tensor v, bool causal=False, float? scale=None) -> Tensor");
  m.def("fwd_with_lse(Tensor q, Tensor k, Tensor v, bool causal=False, float? scale=None) -> (Tensor, Tensor)");
  m.def(
      "bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, bool causal=False, "
      "float? scale=None) -> (Tensor, Tensor, Tensor)");
}
