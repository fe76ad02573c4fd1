// A TorchScript function compiled in C++ calls torch.ops.flash_attn2.fwd and reaches the op through the
// dispatcher. torch::jit::compile's built-in resolver maps `torch` to aten only, so this resolver adds the
// `torch.ops.<namespace>.<op>` spelling that Python's TorchScript already understands.
#include <gtest/gtest.h>
#include <torch/csrc/jit/api/compilation_unit.h>
#include <torch/csrc/jit/frontend/resolver.h>
#include <torch/csrc/jit/frontend/sugared_value.h>
#include <torch/script.h>

#include "flash_attn2/flash_attn2.h"
#include "reference.h"

namespace flash_attn2::testing {
namespace {

using torch::jit::BuiltinModule;
using torch::jit::GraphFunction;
using torch::jit::SourceRange;
using torch::jit::SugaredValue;

struct OpsNamespaces : SugaredValue {
  std::string kind() const override { return "torch.ops"; }
  std::shared_ptr<SugaredValue> attr(const SourceRange&, GraphFunction&, const std::string& ns) override {
    return std::make_shared<BuiltinModule>(ns);
  }
};

struct TorchWithOps : SugaredValue {
  std::string kind() const override { return "torch"; }
  std::shared_ptr<SugaredValue> attr(const SourceRange& loc, GraphFunction& m, const std::string& field) override {
    if (field == "ops") return std::make_shared<OpsNamespaces>();
    return BuiltinModule("aten").attr(loc, m, field);
  }
};

struct ResolverWithOps : torch::jit::Resolver {
  std::shared_ptr<SugaredValue> resolveValue(const std::string& name, GraphFunction&, const SourceRange&) override {
    return name == "torch" ? std::make_shared<TorchWithOps>() : nullptr;
  }
};

TEST(TorchScript, CompiledFunctionCallsTheOp) {
  auto unit = std::make_shared<torch::jit::CompilationUnit>();
  unit->define(std::nullopt, R"JIT(
def attend(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
    return torch.ops.flash_attn2.fwd(q, k, v, causal)

def attend_scaled(q: Tensor, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
    return torch.ops.flash_attn2.fwd_with_lse(q, k, v, False, 0.5)
)JIT",
               std::make_shared<ResolverWithOps>(), nullptr);
  const Inputs in = random_inputs({2, 4, 2, 19, 23, 16, true, at::kDouble, false}, at::kCPU);
  const at::Tensor out = unit->run_method("attend", in.q, in.k, in.v, true).toTensor();
  EXPECT_LT(max_abs_diff(out, std::get<0>(naive_attention(in.q, in.k, in.v, true))), 1e-12);

  const auto scaled = unit->run_method("attend_scaled", in.q, in.k, in.v).toTuple();
  const auto [ref_out, ref_lse] = naive_attention(in.q, in.k, in.v, false, 0.5);
  EXPECT_LT(max_abs_diff(scaled->elements()[0].toTensor(), ref_out), 1e-12);
  EXPECT_LT(max_abs_diff(scaled->elements()[1].toTensor(), ref_lse), 1e-12);
}

}  // namespace
}  // namespace flash_attn2::testing
