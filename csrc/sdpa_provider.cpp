// The SDPA backend provider: while active, PyTorch's own flash-attention ops run on flash_attn2's kernels.
//
// torch.nn.attention.activate_flash_attention_impl("flash_attn2") (or flash_attn2::sdpa::activate() from C++)
// registers the adapters below for aten::_scaled_dot_product_flash_attention and its backward (the flash path of
// F.scaled_dot_product_attention) and aten::_flash_attention_forward / _backward (what varlen_attn and the SDPA op
// call) at the CUDA key; restore() drops the registrations and the dispatcher goes back to PyTorch's kernels.
// Each adapter keeps aten's contract: its layouts and return values, FlashAttention-2's bottom-right causal
// alignment and window rules, +inf log-sum-exp for rows that see no key, and dropout state drawn from the
// device's default generator and handed to the backward in aten's rng_state tensor. What flash_attn2 cannot do
// (below, `unsupported`) runs on PyTorch's stock kernel instead, so activation never makes a call fail.
//
// The same adapters are registered at the CPU key, where PyTorch has no kernel for these ops: with the provider
// active they run on flash_attn2's CPU kernel (which is how CI tests them without a GPU).
#include "flash_attn2/flash_attn2.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#ifdef FLASH_ATTN2_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/_flash_attention_backward_native.h>
#include <ATen/ops/_flash_attention_forward_native.h>
#include <ATen/ops/_scaled_dot_product_flash_attention_backward_native.h>
#include <ATen/ops/_scaled_dot_product_flash_attention_native.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#endif

#include <atomic>
#include <deque>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <string>

namespace flash_attn2 {
namespace sdpa {
namespace {

using Tensor3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using FlashFwdOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using SdpaFwdOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, c10::SymInt, c10::SymInt, at::Tensor,
                              at::Tensor, at::Tensor>;

std::atomic<int64_t> n_forward{0}, n_backward{0}, n_fallback_forward{0}, n_fallback_backward{0};

// ---- what flash_attn2 can run --------------------------------------------------------------------------------

bool device_capable(const at::Tensor& t) {
#ifdef FLASH_ATTN2_WITH_CUDA
  if (t.is_cuda()) return at::cuda::getDeviceProperties(t.get_device())->major >= 8;
#endif
  return t.is_cpu();
}

// Why flash_attn2 cannot run attention over these inputs as aten's flash kernel would (empty: it can).
// `rank` is 4 for the dense ops, 3 for packed sequences.
std::string unsupported(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t rank) {
  for (const at::Tensor* t : {&q, &k, &v}) {
    if (!t->defined()) return "an undefined input";
    if (t->scalar_type() != q.scalar_type()) return "q, k, v of different dtypes";
    if (t->device() != q.device()) return "q, k, v on different devices";
    if (t->dim() != rank) return "inputs of rank " + std::to_string(t->dim());
    if (t->size(-1) != q.size(-1)) return "different head dims";
    if (t->numel() > 0 && t->stride(-1) != 1) return "a last dim that is not contiguous";
  }
  if (q.scalar_type() != at::kHalf && q.scalar_type() != at::kBFloat16) {
    return std::string("dtype ") + c10::toString(q.scalar_type());
  }
  const int64_t d = q.size(-1);
  if (d % 8 != 0 || d <= 0 || d > 256) return "head dim " + std::to_string(d);
  if (!device_capable(q)) return "a device older than sm_80";
  return {};
}

bool capturing(const at::Tensor& t) {
#ifdef FLASH_ATTN2_WITH_CUDA
  if (t.is_cuda()) return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
#endif
  return false;
}

// ---- aten's conventions ----------------------------------------------------------------------------------------

// FlashAttention-2's window rules as aten's kernel applies them: negative or past every key = unbounded, causal
// = right bound 0, and causal again when only the right bound 0 remains.
AttentionOptions options_for(bool is_causal, std::optional<int64_t> left, std::optional<int64_t> right,
                             int64_t seqlen_k, std::optional<double> scale) {
  int64_t l = left.value_or(-1), r = right.value_or(-1);
  if (l < 0 || l >= seqlen_k) l = -1;
  if (is_causal) r = 0;
  if (r < 0 || (r >= seqlen_k && r > 0)) r = -1;
  AttentionOptions o;
  o.scale = scale;
  if (l == -1 && r == 0) {
    o.causal = true;
  } else {
    o.window_size = {l, r};
  }
  o.deterministic = at::globalContext().deterministicAlgorithms();
  return o;
}

// aten's flash kernel writes +inf (not log 0 = -inf) as the log-sum-exp of a row that sees no key. Such rows exist
// only when a sequence has fewer keys than queries under a right bound, or no keys: `may_have_empty_rows`.
void positive_inf_for_empty_rows(at::Tensor& lse, bool may_have_empty_rows) {
  if (!may_have_empty_rows || lse.numel() == 0) return;
  constexpr double inf = std::numeric_limits<double>::infinity();
  lse.nan_to_num_(std::numeric_limits<double>::quiet_NaN(), inf, inf);
}

// Results in the strides aten's meta functions report (empty_like of the matching input), which compiled graphs
// rely on; flash_attn2 already returns those whenever the input is dense.
at::Tensor like(const at::Tensor& result, const at::Tensor& input) {
  if (input.is_non_overlapping_and_dense() && result.strides() == input.strides()) return result;
  at::Tensor expected = at::empty_like(input);
  if (expected.strides() == result.strides()) return result;
  return expected.copy_(result);
}

// ---- dropout state ---------------------------------------------------------------------------------------------
//
// aten hands the backward an rng_state (2,) uint64 = [seed, offset] and an `unused` uint64 scalar. flash_attn2's
// forward fills both: [seed, offset] drawn from the device's default generator (advanced by what aten's kernel
// reserves, batch * heads * 32) and, in `unused`, a tag of the pair, so that the backward can tell a forward that
// ran here (whose dropout mask it must regenerate) from one that ran on the stock kernel (whose mask only the
// stock backward knows). The forward also remembers the pair on the host, keyed by rng_state's storage, so the
// backward of a recent forward finds it without reading the device; the tag is read only when that misses.

uint64_t tag_of(uint64_t seed, uint64_t offset) {
  return (seed * 0x9E3779B97F4A7C15ull) ^ (offset + 0x632BE59BD9B4E019ull) ^ 0x666c617368327632ull;  // "flash2v2"
}

struct DropoutState {
  std::optional<at::Tensor> ours;  // int64 CPU [seed, offset], what flash_attn2's kernels take
  at::Tensor rng_state, unused;    // what aten returns
};

// The host copy of recent states. A weak reference keeps the storage's address from being reused while its
// entry exists, so a match is the very tensor the forward returned (or a view of it), never a later one.
struct RememberedState {
  c10::weak_intrusive_ptr<c10::StorageImpl> storage;
  uint64_t seed, offset;
};
constexpr size_t kRememberedStates = 4096;
std::mutex g_states_mutex;
std::deque<RememberedState> g_states;

void remember(const at::Tensor& rng_state, uint64_t seed, uint64_t offset) {
  std::lock_guard<std::mutex> lock(g_states_mutex);
  if (g_states.size() == kRememberedStates) g_states.pop_front();
  g_states.push_back({rng_state.storage().getWeakStorageImpl(), seed, offset});
}

std::optional<at::Tensor> recall(const at::Tensor& rng_state) {
  if (!rng_state.defined() || !rng_state.has_storage()) return std::nullopt;
  const c10::StorageImpl* impl = rng_state.storage().unsafeGetStorageImpl();
  std::lock_guard<std::mutex> lock(g_states_mutex);
  for (auto it = g_states.rbegin(); it != g_states.rend(); ++it) {
    if (it->storage._unsafe_get_target() == impl && !it->storage.expired()) {
      return at::tensor({static_cast<int64_t>(it->seed), static_cast<int64_t>(it->offset)},
                        at::TensorOptions().dtype(at::kLong));
    }
  }
  return std::nullopt;
}

DropoutState draw_dropout_state(const at::Tensor& q, int64_t batch, int64_t heads, double dropout_p) {
  const auto u64 = q.options().dtype(at::kUInt64);
  if (dropout_p <= 0) return {std::nullopt, at::empty({2}, u64), at::empty({}, u64)};
  uint64_t seed = 0, offset = 0;
  if (q.is_cuda()) {
    at::Generator gen = at::globalContext().defaultGenerator(q.device());
    std::lock_guard<std::mutex> lock(gen.mutex());
    seed = gen.current_seed();
    offset = gen.get_offset();
    gen.set_offset(offset + static_cast<uint64_t>(batch * heads * 32));
  } else {
    const at::Tensor s = draw_rng_state(q.device());
    seed = static_cast<uint64_t>(s[0].item<int64_t>());
    offset = static_cast<uint64_t>(s[1].item<int64_t>());
  }
  const auto cpu = at::TensorOptions().dtype(at::kLong);
  const at::Tensor ours = at::tensor({static_cast<int64_t>(seed), static_cast<int64_t>(offset)}, cpu);
  const at::Tensor tag = at::scalar_tensor(static_cast<int64_t>(tag_of(seed, offset)), cpu);
  DropoutState state{ours, ours.to(q.device()).view(at::kUInt64), tag.to(q.device()).view(at::kUInt64)};
  remember(state.rng_state, seed, offset);
  return state;
}

// The [seed, offset] of a forward that ran here, or nothing when the state is not one flash_attn2 wrote, read back
// with the tag (three numbers from the device: a host synchronisation). recall() is tried first.
std::optional<at::Tensor> read_back_dropout_state(const at::Tensor& rng_state, const at::Tensor& unused) {
  if (!rng_state.defined() || !unused.defined() || rng_state.numel() != 2 || unused.numel() != 1 ||
      rng_state.element_size() != 8 || unused.element_size() != 8) {
    return std::nullopt;
  }
  const at::Tensor both =
      at::cat({rng_state.reshape({2}).view(at::kLong), unused.reshape({1}).view(at::kLong)}).cpu();
  const int64_t* p = both.const_data_ptr<int64_t>();
  if (static_cast<uint64_t>(p[2]) != tag_of(static_cast<uint64_t>(p[0]), static_cast<uint64_t>(p[1]))) {
    return std::nullopt;
  }
  return both.slice(0, 0, 2).clone();
}

// The dropout state a backward needs: from the host copy of a forward that ran here; else, outside CUDA-graph
// capture (no device reads there), read back and checked by its tag. Sets `why` when the backward is not ours.
std::optional<at::Tensor> backward_dropout_state(const at::Tensor& query, const at::Tensor& rng_state,
                                                 const at::Tensor& unused, std::string& why) {
  if (auto remembered = recall(rng_state)) return remembered;
  if (capturing(query)) {
    why = "dropout under CUDA graph capture whose forward did not run here";
    return std::nullopt;
  }
  auto state = read_back_dropout_state(rng_state, unused);
  if (!state) why = "dropout whose forward ran on PyTorch's kernel";
  return state;
}

// ---- fallbacks -------------------------------------------------------------------------------------------------

// PyTorch's SDPA flash kernels call aten::_flash_attention_forward / _backward through the dispatcher, which leads
// back into the adapters below: inside a fallback those go straight to PyTorch's kernel (and are not counted again).
thread_local bool t_in_stock = false;
struct InStock {
  bool saved = t_in_stock;
  InStock() { t_in_stock = true; }
  ~InStock() { t_in_stock = saved; }
};

[[noreturn]] void no_stock_kernel(const char* op, const std::string& why, const at::Tensor& q) {
  TORCH_CHECK(false, "aten::", op, " on ", q.device(), ": flash_attn2's SDPA provider cannot run ", why,
              ", and PyTorch has no kernel for this op there (its flash kernels are CUDA only)");
}

// ---- the adapters (aten's signatures) --------------------------------------------------------------------------

FlashFwdOut flash_attention_forward(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                    const std::optional<at::Tensor>& cum_seq_q,
                                    const std::optional<at::Tensor>& cum_seq_k, int64_t max_q, int64_t max_k,
                                    double dropout_p, bool is_causal, bool return_debug_mask,
                                    std::optional<double> scale, std::optional<int64_t> window_size_left,
                                    std::optional<int64_t> window_size_right,
                                    const std::optional<at::Tensor>& seqused_k,
                                    const std::optional<at::Tensor>& alibi_slopes) {
  const bool varlen = cum_seq_q.has_value();
  std::string why =
      t_in_stock ? "a call from inside PyTorch's kernel" : unsupported(query, key, value, varlen ? 3 : 4);
  if (why.empty() && varlen != cum_seq_k.has_value()) why = "only one of cum_seq_q / cum_seq_k";
  if (why.empty() && return_debug_mask) why = "return_debug_mask = True";
  if (why.empty() && seqused_k.has_value()) why = "seqused_k";
  if (why.empty() && alibi_slopes.has_value()) why = "alibi_slopes (aten's backward does not take them)";
  if (why.empty() && dropout_p > 0 && capturing(query)) why = "dropout under CUDA graph capture";
  if (!why.empty()) {
    if (!t_in_stock) ++n_fallback_forward;
#ifdef FLASH_ATTN2_WITH_CUDA
    if (query.is_cuda()) {
      return at::native::_flash_attention_forward(query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p,
                                                  is_causal, return_debug_mask, scale, window_size_left,
                                                  window_size_right, seqused_k, alibi_slopes);
    }
#endif
    no_stock_kernel("_flash_attention_forward", why, query);
  }
  ++n_forward;
  at::AutoDispatchBelowADInplaceOrView guard;
  const int64_t heads = query.size(-2);
  const int64_t batch = varlen ? cum_seq_q->numel() - 1 : query.size(0);
  const int64_t seqlen_k = varlen ? max_k : key.size(1);
  DropoutState rng = draw_dropout_state(query, batch, heads, dropout_p);
  AttentionOptions o = options_for(is_causal, window_size_left, window_size_right, seqlen_k, scale);
  o.set_dropout(dropout_p, rng.ours);
  at::Tensor out, lse;
  bool may_have_empty_rows = true;  // packed sequences: any sequence may have fewer keys than queries
  if (varlen) {
    std::tie(out, lse) = attention_varlen_with_lse(query, key, value, *cum_seq_q, *cum_seq_k, max_q, max_k, o);
  } else {
    std::tie(out, lse) =
        attention_with_lse(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), o);
    out = out.transpose(1, 2);
    const bool right_bound = o.causal || o.window_size[1] >= 0;
    may_have_empty_rows = key.size(1) == 0 || (right_bound && query.size(1) > key.size(1));
  }
  positive_inf_for_empty_rows(lse, may_have_empty_rows);
  return {like(out, query), lse, rng.rng_state, rng.unused, at::empty({0}, query.options())};
}

Tensor3 flash_attention_backward(const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
                                 const at::Tensor& value, const at::Tensor& out, const at::Tensor& logsumexp,
                                 const at::Tensor& cum_seq_q, const at::Tensor& cum_seq_k, int64_t max_q,
                                 int64_t max_k, double dropout_p, bool is_causal, const at::Tensor& rng_state,
                                 const at::Tensor& unused, std::optional<double> scale,
                                 std::optional<int64_t> window_size_left, std::optional<int64_t> window_size_right) {
  const bool varlen = cum_seq_q.defined();
  std::string why =
      t_in_stock ? "a call from inside PyTorch's kernel" : unsupported(query, key, value, varlen ? 3 : 4);
  if (why.empty() && varlen != cum_seq_k.defined()) why = "only one of cum_seq_q / cum_seq_k";
  std::optional<at::Tensor> seed_offset;
  if (why.empty() && dropout_p > 0) seed_offset = backward_dropout_state(query, rng_state, unused, why);
  if (!why.empty()) {
    if (!t_in_stock) ++n_fallback_backward;
#ifdef FLASH_ATTN2_WITH_CUDA
    if (query.is_cuda()) {
      return at::native::_flash_attention_backward(grad_out, query, key, value, out, logsumexp, cum_seq_q,
                                                   cum_seq_k, max_q, max_k, dropout_p, is_causal, rng_state, unused,
                                                   scale, window_size_left, window_size_right);
    }
#endif
    no_stock_kernel("_flash_attention_backward", why, query);
  }
  ++n_backward;
  at::AutoDispatchBelowADInplaceOrView guard;
  AttentionOptions o =
      options_for(is_causal, window_size_left, window_size_right, varlen ? max_k : key.size(1), scale);
  o.set_dropout(dropout_p, seed_offset);
  at::Tensor dq, dk, dv;
  if (varlen) {
    std::tie(dq, dk, dv) = attention_varlen_backward(grad_out, query, key, value, out, logsumexp, cum_seq_q,
                                                     cum_seq_k, max_q, max_k, o);
  } else {
    std::tie(dq, dk, dv) = attention_backward(grad_out.transpose(1, 2), query.transpose(1, 2), key.transpose(1, 2),
                                              value.transpose(1, 2), out.transpose(1, 2), logsumexp, o);
    dq = dq.transpose(1, 2);
    dk = dk.transpose(1, 2);
    dv = dv.transpose(1, 2);
  }
  return {like(dq, query), like(dk, key), like(dv, value)};
}

// q, k, v (B, H, N, D): the op F.scaled_dot_product_attention's flash path calls.
SdpaFwdOut sdpa_flash_forward(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                              double dropout_p, bool is_causal, bool return_debug_mask, std::optional<double> scale) {
  std::string why = unsupported(query, key, value, 4);
  if (why.empty() && return_debug_mask) why = "return_debug_mask = True";
  if (why.empty() && dropout_p > 0 && capturing(query)) why = "dropout under CUDA graph capture";
  if (!why.empty()) {
    ++n_fallback_forward;
#ifdef FLASH_ATTN2_WITH_CUDA
    if (query.is_cuda()) {
      InStock stock;
      return at::native::_scaled_dot_product_flash_attention_cuda(query, key, value, dropout_p, is_causal,
                                                                  return_debug_mask, scale);
    }
#endif
    no_stock_kernel("_scaled_dot_product_flash_attention", why, query);
  }
  ++n_forward;
  at::AutoDispatchBelowADInplaceOrView guard;
  const int64_t seqlen_q = query.size(2), seqlen_k = key.size(2);
  DropoutState rng = draw_dropout_state(query, query.size(0), query.size(1), dropout_p);
  AttentionOptions o = options_for(is_causal, std::nullopt, std::nullopt, seqlen_k, scale);
  o.set_dropout(dropout_p, rng.ours);
  auto [out, lse] = attention_with_lse(query, key, value, o);
  positive_inf_for_empty_rows(lse, seqlen_k == 0 || (o.causal && seqlen_q > seqlen_k));
  return {like(out, query), lse, at::Tensor(), at::Tensor(), c10::SymInt(seqlen_q), c10::SymInt(seqlen_k),
          rng.rng_state, rng.unused, at::empty({0}, query.options())};
}

Tensor3 sdpa_flash_backward(const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
                            const at::Tensor& value, const at::Tensor& out, const at::Tensor& logsumexp,
                            const at::Tensor& cum_seq_q, const at::Tensor& cum_seq_k, int64_t max_q, int64_t max_k,
                            double dropout_p, bool is_causal, const at::Tensor& philox_seed,
                            const at::Tensor& philox_offset, std::optional<double> scale) {
  if (!grad_out.defined()) return {at::Tensor(), at::Tensor(), at::Tensor()};
  std::string why = unsupported(query, key, value, 4);
  std::optional<at::Tensor> seed_offset;
  if (why.empty() && dropout_p > 0) seed_offset = backward_dropout_state(query, philox_seed, philox_offset, why);
  if (!why.empty()) {
    ++n_fallback_backward;
#ifdef FLASH_ATTN2_WITH_CUDA
    if (query.is_cuda()) {
      InStock stock;
      return at::native::_scaled_dot_product_flash_attention_backward_cuda(
          grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal,
          philox_seed, philox_offset, scale);
    }
#endif
    no_stock_kernel("_scaled_dot_product_flash_attention_backward", why, query);
  }
  ++n_backward;
  at::AutoDispatchBelowADInplaceOrView guard;
  AttentionOptions o = options_for(is_causal, std::nullopt, std::nullopt, key.size(2), scale);
  o.set_dropout(dropout_p, seed_offset);
  auto [dq, dk, dv] = attention_backward(grad_out, query, key, value, out, logsumexp, o);
  return {like(dq, query), like(dk, key), like(dv, value)};
}

// ---- activation ------------------------------------------------------------------------------------------------

std::mutex g_mutex;
std::unique_ptr<torch::Library> g_library;

// Registering over aten's kernels makes the dispatcher warn that a kernel is overridden; that is the point here.
class DropOverrideWarnings : public c10::WarningHandler {
 public:
  explicit DropOverrideWarnings(c10::WarningHandler* next) : next_(next) {}
  void process(const c10::Warning& w) override {
    if (w.msg().find("Overriding a previously registered kernel") != std::string::npos) return;
    next_->process(w);
  }

 private:
  c10::WarningHandler* next_;
};

// One adapter for aten's op at the CUDA key (where it replaces PyTorch's kernel) and the CPU key (where PyTorch
// has none).
template <typename Fn>
void register_adapter(torch::Library& lib, const char* op, Fn* fn) {
#ifdef FLASH_ATTN2_WITH_CUDA
  lib.impl(op, torch::dispatch(c10::DispatchKey::CUDA, fn));
#endif
  lib.impl(op, torch::dispatch(c10::DispatchKey::CPU, fn));
}

}  // namespace

void activate() {
  std::lock_guard<std::mutex> lock(g_mutex);
  if (g_library) return;
  DropOverrideWarnings quiet(c10::WarningUtils::get_warning_handler());
  c10::WarningUtils::WarningHandlerGuard guard(&quiet);
  auto lib = std::make_unique<torch::Library>(torch::Library::IMPL, "aten", std::nullopt, __FILE__, __LINE__);
  register_adapter(*lib, "_flash_attention_forward", &flash_attention_forward);
  register_adapter(*lib, "_flash_attention_backward", &flash_attention_backward);
  register_adapter(*lib, "_scaled_dot_product_flash_attention", &sdpa_flash_forward);
  register_adapter(*lib, "_scaled_dot_product_flash_attention_backward", &sdpa_flash_backward);
  g_library = std::move(lib);
}

void restore() {
  std::lock_guard<std::mutex> lock(g_mutex);
  g_library.reset();
}

bool is_active() {
  std::lock_guard<std::mutex> lock(g_mutex);
  return g_library != nullptr;
}

Counters counters() {
  return {n_forward.load(), n_backward.load(), n_fallback_forward.load(), n_fallback_backward.load()};
}

namespace {

// flash_attn2::_sdpa_provider(action): "activate", "restore" or "status"; returns [active, forward, backward,
// fallback_forward, fallback_backward] after the action. How Python's provider registration reaches the above.
std::vector<int64_t> sdpa_provider_op(c10::string_view action) {
  if (action == "activate") {
    activate();
  } else if (action == "restore") {
    restore();
  } else {
    TORCH_CHECK(action == "status", "flash_attn2::_sdpa_provider: action is '", action,
                "'; expected 'activate', 'restore' or 'status'");
  }
  const Counters c = counters();
  return {is_active() ? 1 : 0, c.forward, c.backward, c.fallback_forward, c.fallback_backward};
}

}  // namespace
}  // namespace sdpa

TORCH_LIBRARY_IMPL(flash_attn2, CompositeExplicitAutograd, m) { m.impl("_sdpa_provider", &sdpa::sdpa_provider_op); }

}  // namespace flash_attn2
