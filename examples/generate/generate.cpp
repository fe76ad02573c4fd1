// Greedy decoding with a small decoder-only transformer (LibTorch C++ modules, random weights, GQA) on
// flash_attn2: prefill with attention (fwd), then one token per step with attention_kvcache on
//   - a dense cache (B, Hkv, capacity, D) (a (B, capacity, Hkv, D) buffer, transposed),
//   - a paged cache (pages of 16 keys, (num_pages, 16, Hkv, D), shuffled block table),
// and, as the reference, a run that recomputes full causal attention over the whole sequence every step.
// On CUDA the dense and paged decode steps are captured once in a CUDA graph and replayed (cache_seqlens lives
// on the device and the step advances it), and each mode prints tokens/s. Exits non-zero unless the three runs
// produce identical tokens.
#include <flash_attn2/flash_attn2.h>
#include <torch/torch.h>

#if __has_include(<ATen/cuda/CUDAGraph.h>)
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAGuard.h>
#define HAVE_CUDA_GRAPHS 1
#endif

#include <chrono>
#include <iostream>
#include <optional>
#include <string>
#include <vector>

namespace {

struct Config {
  int64_t vocab = 512, dim = 256, layers = 2, heads = 4, kv_heads = 2, max_len = 128;
  int64_t head_dim() const { return dim / heads; }
};

struct Block : torch::nn::Module {
  explicit Block(const Config& c) : c(c) {
    norm1 = register_module("norm1", torch::nn::LayerNorm(torch::nn::LayerNormOptions({c.dim})));
    wq = register_module("wq", torch::nn::Linear(c.dim, c.dim));
    wkv = register_module("wkv", torch::nn::Linear(c.dim, 2 * c.kv_heads * c.head_dim()));
    wo = register_module("wo", torch::nn::Linear(c.dim, c.dim));
    norm2 = register_module("norm2", torch::nn::LayerNorm(torch::nn::LayerNormOptions({c.dim})));
    fc1 = register_module("fc1", torch::nn::Linear(c.dim, 4 * c.dim));
    fc2 = register_module("fc2", torch::nn::Linear(4 * c.dim, c.dim));
  }
  // (B, T, dim) -> q (B, H, T, D), k and v (B, Hkv, T, D): strided views of the projections, in `dtype`.
  std::vector<torch::Tensor> qkv(const torch::Tensor& h, torch::ScalarType dtype) {
    const int64_t B = h.size(0), T = h.size(1), D = c.head_dim();
    auto q = wq->forward(h).to(dtype).view({B, T, c.heads, D}).transpose(1, 2);
    auto kv = wkv->forward(h).to(dtype).view({B, T, 2, c.kv_heads, D}).permute({2, 0, 3, 1, 4});
    return {q, kv[0], kv[1]};
  }
  torch::Tensor finish(const torch::Tensor& x, const torch::Tensor& attn) {  // attn (B, H, T, D)
    const int64_t B = x.size(0), T = x.size(1);
    auto y = x + wo->forward(attn.to(x.scalar_type()).transpose(1, 2).reshape({B, T, c.dim}));
    return y + fc2->forward(torch::gelu(fc1->forward(norm2->forward(y))));
  }
  Config c;
  torch::nn::LayerNorm norm1{nullptr}, norm2{nullptr};
  torch::nn::Linear wq{nullptr}, wkv{nullptr}, wo{nullptr}, fc1{nullptr}, fc2{nullptr};
};

// Per-layer caches plus what attention_kvcache needs; `seqlens` is on the device and advanced by each step.
struct KvCache {
  std::vector<torch::Tensor> k, v;
  std::optional<torch::Tensor> block_table;
  torch::Tensor seqlens;
};

struct Model : torch::nn::Module {
  Model(const Config& c, torch::ScalarType attn_dtype) : c(c), attn_dtype(attn_dtype) {
    tok = register_module("tok", torch::nn::Embedding(c.vocab, c.dim));
    pos = register_module("pos", torch::nn::Embedding(c.max_len, c.dim));
    for (int64_t l = 0; l < c.layers; ++l) blocks.push_back(register_module("block" + std::to_string(l), std::make_shared<Block>(c)));
    norm = register_module("norm", torch::nn::LayerNorm(torch::nn::LayerNormOptions({c.dim})));
    head = register_module("head", torch::nn::Linear(c.dim, c.vocab));
  }
  torch::Tensor logits(const torch::Tensor& x) { return head->forward(norm->forward(x)); }

  // Full causal attention over tokens (B, T); with a cache, also writes every layer's K/V into it (prefill).
  torch::Tensor forward_full(const torch::Tensor& tokens, KvCache* cache = nullptr) {
    const int64_t B = tokens.size(0), T = tokens.size(1);
    auto x = tok->forward(tokens) + pos->forward(torch::arange(T, tokens.options())).unsqueeze(0);
    for (size_t l = 0; l < blocks.size(); ++l) {
      auto qkv = blocks[l]->qkv(blocks[l]->norm1->forward(x), attn_dtype);
      if (cache != nullptr) write_prefix(*cache, l, qkv[1], qkv[2]);
      x = blocks[l]->finish(x, flash_attn2::attention(qkv[0], qkv[1], qkv[2], /*causal=*/true));
    }
    if (cache != nullptr) cache->seqlens.fill_(T);
    return logits(x);
  }

  void write_prefix(KvCache& cache, size_t l, const torch::Tensor& k, const torch::Tensor& v) {
    const int64_t B = k.size(0), T = k.size(2);
    if (!cache.block_table) {
      cache.k[l].narrow(2, 0, T).copy_(k);
      cache.v[l].narrow(2, 0, T).copy_(v);
      return;
    }
    const int64_t page = cache.k[l].size(1);
    const auto t = torch::arange(T, torch::TensorOptions().dtype(torch::kLong).device(k.device()));
    for (int64_t b = 0; b < B; ++b) {
      const auto pages = cache.block_table->select(0, b).to(torch::kLong).index_select(0, t.div(page, "floor"));
      cache.k[l].index_put_({pages, t.remainder(page)}, k[b].transpose(0, 1));
      cache.v[l].index_put_({pages, t.remainder(page)}, v[b].transpose(0, 1));
    }
  }

  // One decode step: token (B, 1) at position cache.seqlens -> next token (B, 1); appends K/V, advances seqlens.
  torch::Tensor decode_step(const torch::Tensor& token, KvCache& cache) {
    auto x = tok->forward(token) + pos->forward(cache.seqlens.to(torch::kLong)).unsqueeze(1);
    flash_attn2::AttentionOptions causal;
    causal.set_causal(true);
    for (size_t l = 0; l < blocks.size(); ++l) {
      auto qkv = blocks[l]->qkv(blocks[l]->norm1->forward(x), attn_dtype);
      auto [out, lse] = flash_attn2::attention_kvcache(qkv[0], cache.k[l], cache.v[l], qkv[1], qkv[2], cache.seqlens,
                                                       cache.block_table, causal);
      x = blocks[l]->finish(x, out);
    }
    cache.seqlens.add_(1);
    return logits(x).argmax(-1);
  }

  Config c;
  torch::ScalarType attn_dtype;
  torch::nn::Embedding tok{nullptr}, pos{nullptr};
  std::vector<std::shared_ptr<Block>> blocks;
  torch::nn::LayerNorm norm{nullptr};
  torch::nn::Linear head{nullptr};
};

KvCache make_cache(const Config& c, int64_t batch, bool paged, torch::ScalarType dtype, torch::Device device) {
  KvCache cache;
  const auto opts = torch::TensorOptions().dtype(dtype).device(device);
  const int64_t D = c.head_dim(), page = 16, per_seq = c.max_len / page;
  if (paged) {
    const int64_t pages = batch * per_seq + 5;  // spare pages: the table does not cover the whole pool
    cache.block_table = torch::randperm(pages, torch::TensorOptions().dtype(torch::kLong))
                            .narrow(0, 0, batch * per_seq)
                            .view({batch, per_seq})
                            .to(torch::kInt)
                            .to(device);
    for (int64_t l = 0; l < c.layers; ++l) {
      cache.k.push_back(torch::zeros({pages, page, c.kv_heads, D}, opts));
      cache.v.push_back(torch::zeros({pages, page, c.kv_heads, D}, opts));
    }
  } else {
    for (int64_t l = 0; l < c.layers; ++l) {  // (B, capacity, Hkv, D) buffers seen as (B, Hkv, capacity, D)
      cache.k.push_back(torch::zeros({batch, c.max_len, c.kv_heads, D}, opts).transpose(1, 2));
      cache.v.push_back(torch::zeros({batch, c.max_len, c.kv_heads, D}, opts).transpose(1, 2));
    }
  }
  cache.seqlens = torch::zeros({batch}, torch::TensorOptions().dtype(torch::kInt).device(device));
  return cache;
}

void synchronize(torch::Device device) {
  if (device.is_cuda()) torch::cuda::synchronize();
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Greedy decoding with the cache; on CUDA the step is captured in a CUDA graph and replayed.
torch::Tensor generate_cached(Model& model, const torch::Tensor& prompt, int64_t steps, bool paged, bool use_graph,
                              const char* name) {
  const auto device = prompt.device();
  KvCache cache = make_cache(model.c, prompt.size(0), paged, model.attn_dtype, device);
  auto token = model.forward_full(prompt, &cache).select(1, prompt.size(1) - 1).argmax(-1, true);  // (B, 1)
  std::vector<torch::Tensor> out{token.clone()};
  synchronize(device);
  auto t0 = std::chrono::steady_clock::now();
  int64_t timed = steps;  // decode steps inside the timed region
  bool graphed = false;
#ifdef HAVE_CUDA_GRAPHS
  if (use_graph && device.is_cuda()) {
    // Warm up on a side stream (allocations, cuBLAS handles), then capture one step: it reads `token` and
    // `cache.seqlens` and writes the next token back into `token`; replays repeat it with the current values.
    auto side = at::cuda::getStreamFromPool();
    at::cuda::CUDAGraph graph;
    {
      at::cuda::CUDAStreamGuard guard(side);
      token.copy_(model.decode_step(token, cache));  // a real first step
      out.push_back(token.clone());
      graph.capture_begin();
      token.copy_(model.decode_step(token, cache));
      graph.capture_end();  // capturing ran nothing: seqlens and token are as before the capture
    }
    synchronize(device);
    t0 = std::chrono::steady_clock::now();  // replays only: the first step and the capture are set-up
    timed = steps - 1;
    for (int64_t s = 2; s < steps + 1; ++s) {
      graph.replay();
      out.push_back(token.clone());
    }
    graphed = true;
  }
#endif
  if (!graphed) {
    for (int64_t s = 1; s < steps + 1; ++s) {
      token = model.decode_step(token, cache);
      out.push_back(token.clone());
    }
  }
  synchronize(device);
  const double secs = seconds_since(t0);
  std::cout << name << (graphed ? " (CUDA graph replays)" : "") << ": " << timed * prompt.size(0) / secs
            << " tokens/s (" << timed << " steps, batch " << prompt.size(0) << ")\n";
  return torch::cat(out, 1).cpu();
}

torch::Tensor generate_recompute(Model& model, const torch::Tensor& prompt, int64_t steps) {
  auto seq = prompt;
  synchronize(prompt.device());
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t s = 0; s < steps + 1; ++s) {
    auto next = model.forward_full(seq).select(1, seq.size(1) - 1).argmax(-1, true);
    seq = torch::cat({seq, next}, 1);
  }
  synchronize(prompt.device());
  std::cout << "recompute full attention: " << steps * prompt.size(0) / seconds_since(t0) << " tokens/s\n";
  return seq.narrow(1, prompt.size(1), steps + 1).cpu();
}

}  // namespace

int main() {
  torch::manual_seed(0);
  torch::NoGradGuard no_grad;
  const torch::Device device = torch::cuda::is_available() ? torch::kCUDA : torch::kCPU;
  // float16 attention on CUDA (the kernels take 16-bit inputs; float16's 10-bit mantissa keeps the cached and
  // recomputed logits close enough for greedy decoding to agree); float32 on the CPU.
  const auto attn_dtype = device.is_cuda() ? torch::kHalf : torch::kFloat;
  Config c;
  Model model(c, attn_dtype);
  model.to(device);
  model.eval();
  const int64_t batch = 4, prompt_len = 24, steps = c.max_len - prompt_len - 1;
  const auto prompt = torch::randint(c.vocab, {batch, prompt_len}, torch::TensorOptions().dtype(torch::kLong).device(device));

  const auto reference = generate_recompute(model, prompt, steps);
  const auto dense = generate_cached(model, prompt, steps, /*paged=*/false, /*use_graph=*/true, "dense cache");
  const auto paged = generate_cached(model, prompt, steps, /*paged=*/true, /*use_graph=*/true, "paged cache (pages of 16)");
  const auto dense_eager = generate_cached(model, prompt, steps, false, false, "dense cache, eager");
  const bool same = torch::equal(reference, dense) && torch::equal(reference, paged) && torch::equal(reference, dense_eager);
  std::cout << "device " << device << ": first tokens " << reference.narrow(1, 0, 8) << "\n"
            << (same ? "tokens identical across recompute, dense, paged"
                     : "MISMATCH between recompute / dense / paged tokens")
            << "\n";
  if (!same) {
    std::cout << "dense differs at " << (reference != dense).nonzero().narrow(0, 0, std::min<int64_t>(5, (reference != dense).nonzero().size(0))) << "\n"
              << "paged differs at " << (reference != paged).nonzero().narrow(0, 0, std::min<int64_t>(5, (reference != paged).nonzero().size(0))) << "\n";
  }
  return same ? 0 : 1;
}
