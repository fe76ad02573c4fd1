// CUDA dispatch for the flash_attn2 ops: validates inputs, picks the compiled head-dim variant (and the kernels
// with score modifiers when softcap, ALiBi or dropout is on), prepares layouts, workspaces and parameters, and
// launches on the current stream of the inputs' device. Nothing here reads device memory: no host sync, so
// every op can be captured in a CUDA graph.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "checks.h"
#include "op_args.h"
#include "trivial_cases.h"
#include "cuda/flash_params.h"

namespace flash_attn2::cuda {
namespace {

#if defined(FLASH_ATTN2_SPLITKV_TIMELINE) || defined(FLASH_ATTN2_FWD_TIMELINE) || defined(FLASH_ATTN2_BWD_TIMELINE)
// Debug builds only: a kernel's timeline buffer (FwdParams::timeline: stamps or cycle counters, zeroed), appended to
// $FLASH_ATTN2_TIMELINE_FILE as one line per call after the kernel ran, after an optional header (synchronises);
// nothing where the variable is unset (scripts/splitkv_timeline.py, fwd_probe.py, bwd_probe.py read the lines).
struct TimelineDump {
  const char* file = std::getenv("FLASH_ATTN2_TIMELINE_FILE");
  at::Tensor buffer;
  // The buffer of `slots` counters for params.timeline, or nullptr where no file is asked for.
  unsigned long long* alloc(int64_t slots, const at::TensorOptions& like) {
    if (file == nullptr) return nullptr;
    buffer = at::zeros({slots}, like.dtype(at::kLong));
    return reinterpret_cast<unsigned long long*>(buffer.data_ptr<int64_t>());
  }
  void write(const char* header = "") const {
    if (file == nullptr) return;
    const at::Tensor host = buffer.cpu();
    std::FILE* f = std::fopen(file, "a");
    TORCH_CHECK(f != nullptr, "cannot open FLASH_ATTN2_TIMELINE_FILE ", file);
    std::fputs(header, f);
    const int64_t* v = host.data_ptr<int64_t>();
    for (int64_t i = 0; i < host.numel(); ++i)
      std::fprintf(f, i || header[0] ? " %lld" : "%lld", static_cast<long long>(v[i]));
    std::fprintf(f, "\n");
    std::fclose(f);
  }
};
#endif

constexpr int kMaxHeadDim = 256;
constexpr int kMinBwdBlockM = 64;  // the smallest query tile of any backward kernel (sizes dq_semaphore)

// max_batch: 65535 where a kernel of the op may put the batch in gridDim.y / .z; fwd_kvcache's kernels (the
// split-KV forward, the append, the combine) take any batch the 2^30 size limit allows.
void check_cuda_inputs(const char* op, const at::Tensor& q, const ConcreteShape& s, int64_t max_batch = 65535) {
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, op,
              ": CUDA kernels take float16 or bfloat16 inputs, got ", q.scalar_type(),
              "; cast first, e.g. q.to(torch.bfloat16) (float32/float64 run on the CPU kernel)");
  TORCH_CHECK(s.head_dim % 8 == 0 && s.head_dim > 0 && s.head_dim <= kMaxHeadDim, op,
              ": CUDA kernels need a head dim D that is a positive multiple of 8 and at most ", kMaxHeadDim,
              ", got D = ", s.head_dim);
  constexpr int64_t kLimit = std::numeric_limits<int>::max() / 2;
  max_batch = std::min(max_batch, kLimit);
  TORCH_CHECK(s.seqlen_q <= kLimit && s.seqlen_k <= kLimit && s.batch <= max_batch && s.heads_q <= kLimit, op,
              ": sizes exceed the CUDA kernels' limits (batch <= ", max_batch,
              ", heads and sequence lengths < 2^30), got "
              "B = ", s.batch, ", Hq = ", s.heads_q, ", Nq = ", s.seqlen_q, ", Nk = ", s.seqlen_k);
}

// The kernels read rows with 16-byte vector loads: the last dim must be contiguous and every row start 16-byte
// aligned. Anything else (a sliced head dim, an odd storage offset) is copied once into a contiguous tensor.
bool has_kernel_layout(const at::Tensor& t) {
  const int64_t elems_per_16b = 16 / t.element_size();
  const int64_t last = t.dim() - 1;
  bool ok = t.stride(last) == 1 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int64_t d = 0; d < last && ok; ++d) ok = t.size(d) == 1 || t.stride(d) % elems_per_16b == 0;
  return ok;
}
at::Tensor kernel_layout(const at::Tensor& t) { return has_kernel_layout(t) ? t : t.clone(at::MemoryFormat::Contiguous); }

int compiled_head_dim(int64_t d) {
  for (int candidate : {32, 64, 96, 128, 160, 192, 224, 256}) {
    if (d <= candidate) return candidate;
  }
  TORCH_CHECK(false, "flash_attn2: head dim ", d, " exceeds ", kMaxHeadDim);
}

template <template <typename, int, bool> class Launcher, typename Params>
void dispatch(const Params& params, int64_t head_dim, cudaStream_t stream) {
  auto by_mod = [&](auto element, auto mod) {
    using T = decltype(element);
    constexpr bool M = decltype(mod)::value;
    switch (compiled_head_dim(head_dim)) {
      case 32: return Launcher<T, 32, M>::run(params, stream);
      case 64: return Launcher<T, 64, M>::run(params, stream);
      case 96: return Launcher<T, 96, M>::run(params, stream);
      case 128: return Launcher<T, 128, M>::run(params, stream);
      case 160: return Launcher<T, 160, M>::run(params, stream);
      case 192: return Launcher<T, 192, M>::run(params, stream);
      case 224: return Launcher<T, 224, M>::run(params, stream);
      default: return Launcher<T, 256, M>::run(params, stream);
    }
  };
  auto by_type = [&](auto element) {
    if (params.score_mod) by_mod(element, std::true_type{});
    else by_mod(element, std::false_type{});
  };
  if (params.is_bf16) {
    by_type(__nv_bfloat16{});
  } else {
    by_type(__half{});
  }
}

template <typename T, int D, bool M>
struct FwdLauncher {
  static void run(const FwdParams& p, cudaStream_t s) { run_flash_fwd<T, D, M>(p, s); }
};
template <typename T, int D, bool M>
struct SplitKvLauncher {  // reads its rules at run time: M is ignored
  static void run(const FwdParams& p, cudaStream_t s) { run_flash_splitkv<T, D>(p, s); }
};
template <typename T, int D, bool M>
struct BwdLauncher {
  static void run(const BwdParams& p, cudaStream_t s) { run_flash_bwd<T, D, M>(p, s); }
};

// Strides of q/k/v/out-like tensors as (batch, head, row): dense (B, H, N, D), or packed (T, H, D) with no
// batch stride.
struct Strides {
  index_t batch, head, row;
};
Strides strides_of(const at::Tensor& t, bool varlen) {
  if (varlen) return {0, t.stride(1), t.stride(0)};
  return {t.stride(0), t.stride(1), t.stride(2)};
}

// Dense or packed: the shapes and (for varlen) the offsets the kernels need.
struct Layout {
  ConcreteShape s;  // dense shape; for varlen: batch = B, seqlen_* = max_seqlen_*, head dims as usual
  bool varlen = false;
  const at::Tensor* cu_q = nullptr;
  const at::Tensor* cu_k = nullptr;
  int64_t total_q = 0, total_k = 0;
};

void fill_forward_params(FwdParams& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const at::Tensor& out, const at::Tensor& lse, const Layout& L, const Variant& var,
                         std::optional<double> scale) {
  const ConcreteShape& s = L.s;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  const Strides sq = strides_of(q, L.varlen), sk = strides_of(k, L.varlen), sv = strides_of(v, L.varlen),
                so = strides_of(out, L.varlen);
  p.q_batch_stride = sq.batch, p.q_head_stride = sq.head, p.q_row_stride = sq.row;
  p.k_batch_stride = sk.batch, p.k_head_stride = sk.head, p.k_row_stride = sk.row;
  p.v_batch_stride = sv.batch, p.v_head_stride = sv.head, p.v_row_stride = sv.row;
  p.o_batch_stride = so.batch, p.o_head_stride = so.head, p.o_row_stride = so.row;
  p.batch = static_cast<int>(s.batch);
  p.heads_q = static_cast<int>(s.heads_q);
  p.heads_kv = static_cast<int>(s.heads_kv);
  p.seqlen_q = static_cast<int>(s.seqlen_q);
  p.seqlen_k = static_cast<int>(s.seqlen_k);
  p.head_dim = static_cast<int>(s.head_dim);
  if (L.varlen) {
    p.cu_seqlens_q = L.cu_q->data_ptr<int>();
    p.cu_seqlens_k = L.cu_k->data_ptr<int>();
    p.total_q = static_cast<int>(L.total_q);
    p.total_k = static_cast<int>(L.total_k);
    p.stat_batch_stride = 0;
    p.stat_head_stride = L.total_q;
  } else {
    p.cu_seqlens_q = p.cu_seqlens_k = nullptr;
    p.total_q = p.total_k = 0;
    p.stat_batch_stride = s.heads_q * s.seqlen_q;
    p.stat_head_stride = s.seqlen_q;
  }
  const double sm_scale = softmax_scale(scale, s.head_dim);
  p.scale = static_cast<float>(sm_scale);
  p.scale_log2 = static_cast<float>(sm_scale * M_LOG2E);
  p.inv_scale = static_cast<float>(1.0 / sm_scale);
  // Windows wider than every sequence are unbounded (keeps the kernels' index sums in int range).
  p.window_left = var.window_left >= s.seqlen_k ? -1 : static_cast<int>(var.window_left);
  p.window_right = var.window_right >= s.seqlen_q ? -1 : static_cast<int>(var.window_right);
  const ScoreRule<float> rule = ScoreRule<float>::make(sm_scale, var.softcap, 0.0);
  p.softcap_in = rule.cap_in;
  p.softcap_out = rule.cap_out;
  p.alibi_slopes = var.alibi_slopes.defined() ? var.alibi_slopes.data_ptr<float>() : nullptr;
  p.alibi_batch_stride = var.alibi_slopes.defined() && var.alibi_slopes.dim() == 2 ? static_cast<int>(s.heads_q) : 0;
  if (var.dropout_p > 0) {
    const auto [seed, offset] = read_rng_state(var);  // a CPU tensor: no device sync
    p.dropout = Dropout::make(seed, offset, var.dropout_p);
    p.keep_scale = static_cast<float>(1.0 / (1.0 - var.dropout_p));
  } else {
    p.dropout = Dropout{};
    p.keep_scale = 1.f;
  }
  p.is_bf16 = q.scalar_type() == at::kBFloat16;
  p.score_mod = var.needs_score_mod();
}

// ALiBi slopes as the kernels read them: contiguous float32.
Variant prepare_variant(Variant var) {
  if (var.alibi_slopes.defined()) var.alibi_slopes = var.alibi_slopes.contiguous();
  return var;
}

constexpr int64_t kSplitKvBlocksPerSm = 2;  // split-KV blocks resident on an SM (up to ~102 KB of shared memory each)
int64_t current_sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// How many blocks split the keys of each (batch, kv head, packed row tile) in the split-KV kernel. requested > 0
// is taken as is; 0 takes the smallest n at the minimum of a cost in key tiles, counting only splits that get keys
// (n = 29 over 128 tiles is 26 splits of 5) and, with more than one split, at most one wave of two blocks per SM
// (more splits than that add partials and combine work to a grid that already fills the GPU). The cost of n is the
// larger of two models of the busiest SM:
//   latency: waves of two resident blocks per SM x (key tiles per split + a block's fixed cost of about one tile):
//     short splits are bound by each block's chain of loads, so a second block on the SM hides the first's;
//   bandwidth: blocks per SM x key tiles per split: one block streams as fast as the SM's share of the DRAM
//     bandwidth lets two, so doubling the blocks on busy SMs to halve each one's keys gains nothing. Only for
//     the 16-row tiles on dense caches or pages of a tile or more (whose rows are one stepped pointer): the
//     stages' rows of smaller pages (a page lookup per row) and the 64-row tiles (four times the math per key) are
//     bound by their own chains, where a second block on the SM still pays; so are the staggered loop's pages of
//     16-64, whose runs of 16 rows lie in scattered pages (16 x 8 x 8k, pages of 16: 137.6 us with one split
//     as if dense, 127.5 with two; perf.md v48),
// plus one tile when the partials need the combine. Before the bandwidth term, B = 16, Hkv = 8 (128 blocks on
// 132 SMs) took two splits, and one is faster at every cache length (19.9 vs 21.7 us at 1k, 124.2 vs 126.7 at 8k),
// but not with pages of 16 (paged / dense 0.67 at 8k) nor with 16 queries (238.6 vs 149.4 us at 8k; perf.md
// v23). FlashAttention-2's rule (the smallest n within 85% of the best wave efficiency) picked uneven splits,
// e.g. 29 over 128 tiles: an H200 sweep measured 17.5 us at B = 1, Hkv = 8, L = 8k, where 32 even splits take
// 15.4 (docs/perf.md v9). A split may be one tile: at B = 1, Hkv = 8, L = 1k, 16 splits of one tile took 7.5 us
// where 8 of two took 8.6 (perf.md v19).
// Depends on shapes only (never on cache_seqlens), so a captured CUDA graph stays valid.
int choose_num_splits(const ConcreteShape& s, const FwdParams& p, int64_t requested) {
  if (requested > 0) return static_cast<int>(std::min<int64_t>(requested, kMaxSplits));
  const int64_t blocks = splitkv_row_tiles(s.batch, s.heads_q, s.heads_kv, s.seqlen_q);
  const int64_t block_n =
      p.splitkv_stagger ? kSplitKvStaggerBlockN : splitkv_block_n(static_cast<int>(compiled_head_dim(s.head_dim)));
  const bool streams = splitkv_block_m(s.seqlen_q * (s.heads_q / s.heads_kv)) == kSplitKvBlockM &&
                       (p.block_table == nullptr || (int64_t{1} << p.page_size_log2) >= block_n);
  const int64_t tiles = (s.seqlen_k + block_n - 1) / block_n;
  const int64_t sms = current_sm_count(), slots = kSplitKvBlocksPerSm * sms;
  if (blocks >= slots || tiles < 4) return 1;
  const int64_t max_splits = std::min<int64_t>(kMaxSplits, tiles);
  constexpr int64_t kBlockCostTiles = 1, kCombineCostTiles = 1;
  int64_t best_n = 1, best_cost = std::numeric_limits<int64_t>::max();
  for (int64_t n = 1; n <= max_splits; ++n) {
    const int64_t per_split = (tiles + n - 1) / n, used = (tiles + per_split - 1) / per_split;
    if (used > 1 && blocks * used > slots) break;
    const int64_t latency = (blocks * used + slots - 1) / slots * (per_split + kBlockCostTiles);
    const int64_t bandwidth = streams ? (blocks * used + sms - 1) / sms * per_split : 0;
    const int64_t cost = std::max(latency, bandwidth) + (used > 1 ? kCombineCostTiles : 0);
    if (cost < best_cost) best_cost = cost, best_n = used;
  }
  return static_cast<int>(best_n);
}

// The d128 16-row decode on dense caches and pages of 16 keys or more reads K and V staggered on 128-key tiles
// (SplitKvTraits::kStagger).
// Against the 64-key stages, three readings on H200s (perf.md v46, v47), graph timings, best of three
// alternations: B = 1 x 8 heads at 8k / 1k +5.8-6.5 / +7.2-10.2%, 16 x 8 x 8k with Nq = 4 +2.2-2.3%, the long
// rows (8k-128k keys, B up to 64) 0.999-1.008, where they read 0.997-1.003 of cuDNN against 0.991-1.003. A grid
// of a wave or more (two blocks an SM) over fewer than kStaggerMinKeys keys lost 0.6 / 0.9% (64 x 32 x 1k) and
// keeps the stages. FLASH_ATTN2_SPLITKV_STAGGER=0 keeps the stages everywhere, =1 staggers wherever it can (A/B
// runs, tests).
constexpr int64_t kStaggerMinKeys = 2048;
bool use_splitkv_stagger(const ConcreteShape& s, const FwdParams& p) {
  const bool fits = splitkv_stagger_fits(static_cast<int>(compiled_head_dim(s.head_dim)),
                                         s.seqlen_q * (s.heads_q / s.heads_kv), p.block_table != nullptr,
                                         p.page_size_log2);
  if (!fits || env_is("FLASH_ATTN2_SPLITKV_STAGGER", "0")) return false;
  if (env_is("FLASH_ATTN2_SPLITKV_STAGGER", "1")) return true;
  const int64_t blocks = splitkv_row_tiles(s.batch, s.heads_q, s.heads_kv, s.seqlen_q);
  return blocks < kSplitKvBlocksPerSm * current_sm_count() || s.seqlen_k >= kStaggerMinKeys;
}

// The split-KV path (flash_splitkv_kernel.cuh): params already hold the inputs; adds the partial buffers.
void launch_splitkv(FwdParams& params, const ConcreteShape& s, int64_t requested_splits, const at::Tensor& q) {
  params.splitkv_stagger = use_splitkv_stagger(s, params);
  params.num_splits = choose_num_splits(s, params, requested_splits);
  at::Tensor out_accum, lse_accum;
  if (params.num_splits > 1) {
    const auto f32 = q.options().dtype(at::kFloat);
    out_accum = at::empty({params.num_splits, s.batch, s.heads_q, s.seqlen_q, s.head_dim}, f32);
    lse_accum = at::empty({params.num_splits, s.batch, s.heads_q, s.seqlen_q}, f32);
    params.out_accum = out_accum.data_ptr<float>();
    params.lse_accum = lse_accum.data_ptr<float>();
  }
  // out_accum / lse_accum are freed by the caching allocator after the launch on this stream: safe.
#ifdef FLASH_ATTN2_SPLITKV_TIMELINE
  // Debug builds only: every block's stamps, as one line per call after "split_blocks combine_blocks num_splits"
  // (scripts/splitkv_timeline.py).
  const int64_t split_blocks = splitkv_row_tiles(s.batch, s.heads_q, s.heads_kv, s.seqlen_q) * params.num_splits;
  const int64_t combine_blocks =  // a row each, up to 65535 heads and batches (splitkv_combine.cuh)
      params.num_splits > 1
          ? s.seqlen_q * std::min<int64_t>(s.heads_q, 65535) * std::min<int64_t>(s.batch, 65535)
          : 0;
  TimelineDump timeline;
  params.timeline = timeline.alloc((split_blocks + combine_blocks) * kTimelineSlots, q.options());
#endif
  dispatch<SplitKvLauncher>(params, s.head_dim, at::cuda::getCurrentCUDAStream().stream());
#ifdef FLASH_ATTN2_SPLITKV_TIMELINE
  const std::string header = std::to_string(split_blocks) + " " + std::to_string(combine_blocks) + " " +
                             std::to_string(params.num_splits);
  timeline.write(header.c_str());
#endif
}

// The dense forward takes the split-KV kernel for few queries (decoding through the plain op): the main
// kernels' 128-row query tiles would idle, and their grid would leave most SMs empty.
bool use_splitkv(const Layout& L, const Variant& var) {
  return !L.varlen && var.dropout_p == 0 && L.s.seqlen_q <= kSplitKvBlockM;
}

// FwdParams::zeroed_ints and scratch_bytes (uninitialised bytes) for one call: tensors from the caching
// allocator, kept until the call returns (the launches that use them are queued on the call's stream by then, so
// freeing them is safe).
struct CallBuffers {
  at::TensorOptions options;
  std::vector<at::Tensor> keep;
  static int* zeroed_ints(void* ctx, int n) {
    auto* self = static_cast<CallBuffers*>(ctx);
    self->keep.push_back(at::zeros({n}, self->options));
    return self->keep.back().data_ptr<int>();
  }
  static void* scratch(void* ctx, int64_t n) {
    auto* self = static_cast<CallBuffers*>(ctx);
    self->keep.push_back(at::empty({n}, self->options.dtype(at::kByte)));
    return self->keep.back().data_ptr();
  }
};

// The grid's head grouping (FwdParams::grid_head_group): the variable's value (0 or 1: head by head; A/B runs,
// tests), or -1, the launcher's choice, when unset or empty.
int grid_head_group(const char* name) {
  const char* v = std::getenv(name);
  return v == nullptr || v[0] == '\0' ? -1 : std::max(0, std::atoi(v));
}

Tensor2 run_forward(const char* op, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                    at::Tensor out, at::Tensor lse, const Layout& L, const Variant& var_in,
                    std::optional<double> scale) {
  const Variant var = prepare_variant(var_in);
  const at::Tensor q = kernel_layout(q_in), k = kernel_layout(k_in), v = kernel_layout(v_in);
  FwdParams params{};
  fill_forward_params(params, q, k, v, out, lse, L, var, scale);
  params.grid_head_group = grid_head_group("FLASH_ATTN2_FWD_GRID_GROUP");
  if (use_splitkv(L, var)) {
    launch_splitkv(params, L.s, 0, q);
  } else {
    CallBuffers buffers{q.options().dtype(at::kInt), {}};
    params.zeroed_ints = &CallBuffers::zeroed_ints;
    params.zeroed_ints_ctx = &buffers;
    params.scratch_bytes = &CallBuffers::scratch;
#ifdef FLASH_ATTN2_FWD_TIMELINE
    // Debug builds only: the WS forward's per-consumer cycle counters (FwdProbe), one line per call
    // (scripts/fwd_probe.py).
    const int64_t probe_blocks = (L.s.seqlen_q + 63) / 64 * L.s.heads_q * L.s.batch;  // >= any grid of the kernel
    TimelineDump timeline;
    params.timeline = timeline.alloc(probe_blocks * kFwdProbeConsumers * kFwdProbeSlots, q.options());
#endif
    dispatch<FwdLauncher>(params, L.s.head_dim, at::cuda::getCurrentCUDAStream().stream());
#ifdef FLASH_ATTN2_FWD_TIMELINE
    timeline.write();
#endif
  }
  return {out, lse};
}

Tensor3 run_backward(const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in,
                     const at::Tensor& v_in, const at::Tensor& out_in, const at::Tensor& lse_in, const Layout& L,
                     const Variant& var_in, std::optional<double> scale) {
  const Variant var = prepare_variant(var_in);
  const ConcreteShape& s = L.s;
  at::Tensor dq = empty_like_input(q_in);
  at::Tensor dk = empty_like_input(k_in);
  at::Tensor dv = empty_like_input(v_in);
  if (dq.numel() == 0 || dk.numel() == 0) {  // no queries or no keys: every gradient is zero
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  const at::Tensor q = kernel_layout(q_in), k = kernel_layout(k_in), v = kernel_layout(v_in);
  const at::Tensor out = kernel_layout(out_in), dout = kernel_layout(dout_in), lse = lse_in.contiguous();
  const auto f32 = q.options().dtype(at::kFloat);
  const int64_t stat_rows = L.varlen ? s.heads_q * L.total_q : s.batch * s.heads_q * s.seqlen_q;
  // Zero-filled by the preprocessing kernel beside D (BwdParams::pre_zeroes_dq; FLASH_ATTN2_BWD_PRE_ZERO=0: here).
  const bool pre_zeroes_dq = !env_is("FLASH_ATTN2_BWD_PRE_ZERO", "0");
  at::Tensor dq_accum = pre_zeroes_dq ? at::empty({stat_rows, s.head_dim}, f32) : at::zeros({stat_rows, s.head_dim}, f32);
  at::Tensor row_stats = at::empty({2, stat_rows}, f32);  // D and the LSE in log2 units (the preprocessing kernel's)
  at::Tensor semaphore;

  BwdParams params{};
  fill_forward_params(params, q, k, v, out, lse, L, var, scale);
  const Strides sdo = strides_of(dout, L.varlen), sdq = strides_of(dq, L.varlen), sdk = strides_of(dk, L.varlen),
                sdv = strides_of(dv, L.varlen);
  params.dout = dout.data_ptr();
  params.do_batch_stride = sdo.batch, params.do_head_stride = sdo.head, params.do_row_stride = sdo.row;
  params.dq = dq.data_ptr();
  params.dk = dk.data_ptr();
  params.dv = dv.data_ptr();
  params.dq_batch_stride = sdq.batch, params.dq_head_stride = sdq.head, params.dq_row_stride = sdq.row;
  params.dk_batch_stride = sdk.batch, params.dk_head_stride = sdk.head, params.dk_row_stride = sdk.row;
  params.dv_batch_stride = sdv.batch, params.dv_head_stride = sdv.head, params.dv_row_stride = sdv.row;
  params.dq_accum = dq_accum.data_ptr<float>();
  params.pre_zeroes_dq = pre_zeroes_dq;
  params.softmax_d = row_stats.data_ptr<float>();
  params.lse_log2 = params.softmax_d + stat_rows;
  params.dq_semaphore = nullptr;
  params.dq_semaphore_tiles = 0;
  params.grid_head_group = grid_head_group("FLASH_ATTN2_BWD_GRID_GROUP");  // the deterministic mode keeps its order
  if (var.deterministic) {
    const int64_t tiles = (s.seqlen_q + kMinBwdBlockM - 1) / kMinBwdBlockM;
    semaphore = at::zeros({s.batch, s.heads_q, std::max<int64_t>(tiles, 1)}, q.options().dtype(at::kInt));
    params.dq_semaphore = semaphore.data_ptr<int>();
    params.dq_semaphore_tiles = static_cast<int>(std::max<int64_t>(tiles, 1));
    // A head's key tiles together (1.0-1.56x the spread order, perf.md v21); FLASH_ATTN2_DET_ORDER=spread for A/B.
    params.dq_order_by_head = env_is("FLASH_ATTN2_DET_ORDER", "spread") ? 0 : 1;
  }
#ifdef FLASH_ATTN2_BWD_TIMELINE
  // Debug builds only: the WS backward's per-consumer cycle counters (BwdProbe), one line per call
  // (scripts/bwd_probe.py).
  const int64_t probe_blocks = (s.seqlen_k + 63) / 64 * s.heads_q * s.batch;  // >= any grid of the kernel
  TimelineDump timeline;
  params.timeline = timeline.alloc(probe_blocks * kBwdProbeConsumers * kBwdProbeSlots, q.options());
#endif
  dispatch<BwdLauncher>(params, s.head_dim, at::cuda::getCurrentCUDAStream().stream());
#ifdef FLASH_ATTN2_BWD_TIMELINE
  timeline.write();
#endif
  return {dq, dk, dv};
}

Tensor2 fwd_with_lse_cuda(FA2_FWD_PARAMS) {
  constexpr const char* op = "flash_attn2::fwd_with_lse";
  Layout L;
  L.s = concrete(check_forward_inputs(op, q, k, v, scale));
  const Variant var = check_variant(op, q, L.s.batch, L.s.heads_q, causal, FA2_OPTION_ARGS);
  check_cuda_inputs(op, q, L.s);
  const c10::cuda::CUDAGuard device_guard(q.device());
  auto [out, lse, done] = forward_outputs(q, L.s, var);
  if (done) return {out, lse};
  return run_forward(op, q, k, v, out, lse, L, var, scale);
}

at::Tensor fwd_cuda(FA2_FWD_PARAMS) { return std::get<0>(fwd_with_lse_cuda(FA2_FWD_ARGS)); }

Tensor3 bwd_cuda(FA2_BWD_PARAMS) {
  constexpr const char* op = "flash_attn2::bwd";
  Layout L;
  L.s = concrete(check_backward_inputs(op, dout, q, k, v, out, lse, scale));
  const Variant var = check_variant(op, q, L.s.batch, L.s.heads_q, causal, FA2_BWD_OPTION_ARGS);
  check_cuda_inputs(op, q, L.s);
  const c10::cuda::CUDAGuard device_guard(q.device());
  return run_backward(dout, q, k, v, out, lse, L, var, scale);
}

Layout varlen_layout(const AttentionShape& shape, const at::Tensor& cu_q, const at::Tensor& cu_k,
                     const c10::SymInt& max_q, const c10::SymInt& max_k) {
  Layout L;
  const ConcreteShape packed = concrete(shape);
  L.s = packed;
  L.s.seqlen_q = max_q.expect_int();
  L.s.seqlen_k = max_k.expect_int();
  L.varlen = true;
  L.cu_q = &cu_q;
  L.cu_k = &cu_k;
  L.total_q = packed.seqlen_q;
  L.total_k = packed.seqlen_k;
  return L;
}

void check_varlen_cuda(const char* op, const at::Tensor& q, const Layout& L) {
  check_cuda_inputs(op, q, L.s);
  TORCH_CHECK(L.total_q <= std::numeric_limits<int>::max() / 2 && L.total_k <= std::numeric_limits<int>::max() / 2,
              op, ": packed token counts must be < 2^30, got Tq = ", L.total_q, ", Tk = ", L.total_k);
}

Tensor2 fwd_varlen_with_lse_cuda(FA2_VARLEN_FWD_PARAMS) {
  constexpr const char* op = "flash_attn2::fwd_varlen_with_lse";
  const AttentionShape shape =
      check_varlen_inputs(op, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale);
  const Variant var = check_variant(op, q, shape.batch, shape.heads_q, causal, FA2_OPTION_ARGS);
  const at::Tensor cu_q = cu_seqlens_q.contiguous(), cu_k = cu_seqlens_k.contiguous();
  const Layout L = varlen_layout(shape, cu_q, cu_k, max_seqlen_q, max_seqlen_k);
  check_varlen_cuda(op, q, L);
  const c10::cuda::CUDAGuard device_guard(q.device());
  at::Tensor out = empty_like_input(q);
  at::Tensor lse = at::empty({L.s.heads_q, L.total_q}, q.options().dtype(at::kFloat));
  if (out.numel() == 0 || L.s.batch == 0) return {out, lse.fill_(-std::numeric_limits<float>::infinity())};
  if (L.total_k == 0 || L.s.seqlen_k == 0) {
    out.zero_();
    lse.fill_(-std::numeric_limits<float>::infinity());
    return {out, lse};
  }
  return run_forward(op, q, k, v, out, lse, L, var, scale);
}

at::Tensor fwd_varlen_cuda(FA2_VARLEN_FWD_PARAMS) { return std::get<0>(fwd_varlen_with_lse_cuda(FA2_VARLEN_FWD_ARGS)); }

Tensor3 bwd_varlen_cuda(FA2_VARLEN_BWD_PARAMS) {
  constexpr const char* op = "flash_attn2::bwd_varlen";
  const AttentionShape shape = check_varlen_backward_inputs(op, dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                                                            max_seqlen_q, max_seqlen_k, scale);
  const Variant var = check_variant(op, q, shape.batch, shape.heads_q, causal, FA2_BWD_OPTION_ARGS);
  const at::Tensor cu_q = cu_seqlens_q.contiguous(), cu_k = cu_seqlens_k.contiguous();
  const Layout L = varlen_layout(shape, cu_q, cu_k, max_seqlen_q, max_seqlen_k);
  check_varlen_cuda(op, q, L);
  const c10::cuda::CUDAGuard device_guard(q.device());
  if (L.s.batch == 0 || L.s.seqlen_q == 0 || L.s.seqlen_k == 0) {
    return {empty_like_input(q).zero_(), empty_like_input(k).zero_(), empty_like_input(v).zero_()};
  }
  return run_backward(dout, q, k, v, out, lse, L, var, scale);
}

Tensor2 fwd_kvcache_cuda(FA2_KVCACHE_PARAMS) {
  constexpr const char* op = "flash_attn2::fwd_kvcache";
  const KvCacheShape ks = check_kvcache_inputs(op, q, k_cache, v_cache, k_new, v_new, cache_seqlens, block_table,
                                               scale, num_splits);
  const Variant var = prepare_variant(check_variant(op, q, ks.s.batch, ks.s.heads_q, causal, window_size, softcap,
                                                    alibi_slopes, 0.0, std::nullopt));
  Layout L;
  L.s = concrete(ks.s);
  check_cuda_inputs(op, q, L.s, /*max_batch=*/std::numeric_limits<int>::max());
  for (const auto& [name, cache] : {std::pair{"k_cache", &k_cache}, std::pair{"v_cache", &v_cache}}) {
    TORCH_CHECK(has_kernel_layout(*cache), op, ": ", name, " has strides ", cache->strides(),
                "; the caches are written in place, so they need a contiguous last dim and 16-byte aligned rows "
                "(any layout whose other strides are multiples of 8 elements)");
  }
  const c10::cuda::CUDAGuard device_guard(q.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
  at::Tensor out = empty_like_input(q);
  at::Tensor lse = at::empty({L.s.batch, L.s.heads_q, L.s.seqlen_q}, q.options().dtype(at::kFloat));
  const at::Tensor qk = kernel_layout(q);
  FwdParams params{};
  fill_forward_params(params, qk, k_cache, v_cache, out, lse, L, var, scale);
  at::Tensor table;
  if (ks.paged) {  // (num_pages, page_size, Hkv, D): the page stride stands in for the batch stride
    table = block_table->contiguous();
    params.k_batch_stride = k_cache.stride(0), params.k_row_stride = k_cache.stride(1), params.k_head_stride = k_cache.stride(2);
    params.v_batch_stride = v_cache.stride(0), params.v_row_stride = v_cache.stride(1), params.v_head_stride = v_cache.stride(2);
    params.block_table = table.data_ptr<int>();
    params.block_table_batch_stride = table.stride(0);
    const int64_t page = ks.page_size.expect_int();
    params.page_size_log2 = 0;
    while ((int64_t{1} << params.page_size_log2) < page) ++params.page_size_log2;
    params.num_pages = static_cast<int>(ks.num_pages.expect_int());
    TORCH_CHECK(params.num_pages > 0 || L.s.seqlen_k == 0, op, ": the paged caches hold no pages");
  }
  at::Tensor lens;
  if (cache_seqlens.has_value() && cache_seqlens->defined()) {
    lens = cache_seqlens->contiguous();
    params.cache_seqlens = lens.data_ptr<int>();
  }
  params.seqlen_k_new = static_cast<int>(ks.seqlen_new.expect_int());
  if (params.seqlen_k_new > 0 && L.s.batch > 0 && L.s.heads_kv > 0) {
    const at::Tensor kn = kernel_layout(*k_new), vn = kernel_layout(*v_new);
    AppendParams a{};
    a.k_new = kn.data_ptr();
    a.v_new = vn.data_ptr();
    a.kn_batch_stride = kn.stride(0), a.kn_head_stride = kn.stride(1), a.kn_row_stride = kn.stride(2);
    a.vn_batch_stride = vn.stride(0), a.vn_head_stride = vn.stride(1), a.vn_row_stride = vn.stride(2);
    a.seqlen_new = params.seqlen_k_new;
    run_kvcache_append(params, a, stream);
  }
  if (out.numel() == 0) return {out, lse};
  if (L.s.seqlen_k == 0) {
    out.zero_();
    lse.fill_(-std::numeric_limits<float>::infinity());
    return {out, lse};
  }
  launch_splitkv(params, L.s, num_splits, qk);
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(flash_attn2, CUDA, m) {
  m.impl("fwd_kvcache", &fwd_kvcache_cuda);
  m.impl("fwd", &fwd_cuda);
  m.impl("fwd_with_lse", &fwd_with_lse_cuda);
  m.impl("bwd", &bwd_cuda);
  m.impl("fwd_varlen", &fwd_varlen_cuda);
  m.impl("fwd_varlen_with_lse", &fwd_varlen_with_lse_cuda);
  m.impl("bwd_varlen", &bwd_varlen_cuda);
}

}  // namespace flash_attn2::cuda
