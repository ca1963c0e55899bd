// Fused paged attention for decode rows on CPU: each query attends to its own context, read in
// place from the block-paged K/V pool (no gather copies), with an online softmax per block.
//
//   q            [nd, H, D]                 one query token per request (float32 or bfloat16)
//   k/v_cache    [num_blocks, bs, Hkv, D]   the runner's per-layer pool (same dtype as q)
//   block_tables [nd, nb] int64             request r's context: blocks bt[r, 0..ceil(len/bs))
//   seq_lens     [nd] int64                 context length of request r (keys 0 .. len - 1)
//   returns      [nd, H, D]                 softmax(q k^T * scale) v, accumulated in float32
//
// One task per (request, K/V head): the H / Hkv query heads of a GQA group share each K/V row
// they read, so every K/V byte of a context is read once per step. Tasks run on ATen's
// intra-op thread pool (at::parallel_for), so torch.set_num_threads applies.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

// Row `src` (D elements) as float: the row itself for float32, else converted into `buf`.
inline const float* as_float(const float* src, int64_t, float*) { return src; }
template <typename T>
inline const float* as_float(const T* src, int64_t n, float* buf) {
  for (int64_t d = 0; d < n; ++d) buf[d] = static_cast<float>(src[d]);
  return buf;
}

template <typename scalar_t>
void decode_attention(const scalar_t* q, const scalar_t* k, const scalar_t* v,
                      const int64_t* block_tables, const int64_t* seq_lens, scalar_t* out,
                      int64_t nd, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                      int64_t block_size, int64_t nb, float scale) {
  const int64_t G = num_heads / num_kv_heads;
  const int64_t D = head_dim;
  const int64_t bs = block_size;
  const int64_t row = num_kv_heads * D;  // elements of one token's K (or V), all heads
  // no infinities anywhere (the file is built with -ffast-math): the running max starts at
  // the lowest finite float, whose exp() difference underflows to 0 like exp(-inf)
  const float lowest = std::numeric_limits<float>::lowest();
  at::parallel_for(0, nd * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * D), acc(G * D), buf(D), m(G), l(G), s(G * bs);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / num_kv_heads;
      const int64_t h = task % num_kv_heads;
      const int64_t len = seq_lens[r];
      const int64_t* bt = block_tables + r * nb;
      for (int64_t g = 0; g < G; ++g) {
        const scalar_t* qp = q + (r * num_heads + h * G + g) * D;
        for (int64_t d = 0; d < D; ++d) qf[g * D + d] = static_cast<float>(qp[d]) * scale;
      }
      std::fill(acc.begin(), acc.end(), 0.0f);
      std::fill(m.begin(), m.end(), lowest);
      std::fill(l.begin(), l.end(), 0.0f);
      const int64_t num_blocks = (len + bs - 1) / bs;
      for (int64_t b = 0; b < num_blocks; ++b) {
        const int64_t base = bt[b] * bs;
        const int64_t ntok = std::min(bs, len - b * bs);
        if (b + 1 < num_blocks) {  // the next block is elsewhere in the pool: fetch it early
          const int64_t next = bt[b + 1] * bs;
          for (int64_t t = 0; t < bs; ++t) {
            __builtin_prefetch(k + (next + t) * row + h * D);
            __builtin_prefetch(v + (next + t) * row + h * D);
          }
        }
        for (int64_t t = 0; t < ntok; ++t) {
          const float* kr = as_float(k + (base + t) * row + h * D, D, buf.data());
          for (int64_t g = 0; g < G; ++g) {
            const float* qg = qf.data() + g * D;
            float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (int64_t d = 0; d < D; ++d) dot += qg[d] * kr[d];
            s[g * bs + t] = dot;
          }
        }
        for (int64_t g = 0; g < G; ++g) {
          float* sg = s.data() + g * bs;
          float mx = m[g];
          for (int64_t t = 0; t < ntok; ++t) mx = std::max(mx, sg[t]);
          const float corr = std::exp(m[g] - mx);
          float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
          for (int64_t t = 0; t < ntok; ++t) {
            sg[t] = std::exp(sg[t] - mx);
            sum += sg[t];
          }
          l[g] = l[g] * corr + sum;
          m[g] = mx;
          float* ag = acc.data() + g * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) ag[d] *= corr;
        }
        for (int64_t t = 0; t < ntok; ++t) {
          const float* vr = as_float(v + (base + t) * row + h * D, D, buf.data());
          for (int64_t g = 0; g < G; ++g) {
            const float p = s[g * bs + t];
            float* ag = acc.data() + g * D;
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) ag[d] += p * vr[d];
          }
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        const float inv = 1.0f / l[g];
        scalar_t* op = out + (r * num_heads + h * G + g) * D;
        for (int64_t d = 0; d < D; ++d) op[d] = static_cast<scalar_t>(acc[g * D + d] * inv);
      }
    }
  });
}

torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor block_tables, torch::Tensor seq_lens,
                                     double scale) {
  TORCH_CHECK(q.device().is_cpu(), "paged_decode_attention runs on CPU tensors");
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.dim() == 4,
              "expected q [nd, H, D] and caches [num_blocks, bs, Hkv, D]");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() &&
                  k_cache.scalar_type() == v_cache.scalar_type(),
              "q and the caches must share a dtype");
  TORCH_CHECK(block_tables.scalar_type() == torch::kLong && seq_lens.scalar_type() == torch::kLong,
              "block_tables and seq_lens must be int64");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "k and v caches differ in shape");
  const int64_t nd = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t bs = k_cache.size(1), Hkv = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == D, "head_dim of q and the caches differ");
  TORCH_CHECK(H % Hkv == 0, "num_heads must be a multiple of num_kv_heads");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == nd && seq_lens.numel() == nd,
              "need one block table row and one seq_len per query");
  q = q.contiguous();
  k_cache = k_cache.contiguous();
  v_cache = v_cache.contiguous();
  block_tables = block_tables.contiguous();
  seq_lens = seq_lens.contiguous();
  const int64_t nb = block_tables.size(1);
  {
    const int64_t* lens = seq_lens.data_ptr<int64_t>();
    const int64_t* bt = block_tables.data_ptr<int64_t>();
    const int64_t num_blocks = k_cache.size(0);
    for (int64_t r = 0; r < nd; ++r) {
      TORCH_CHECK(lens[r] >= 1 && lens[r] <= nb * bs, "seq_len out of range for request ", r);
      for (int64_t b = 0; b < (lens[r] + bs - 1) / bs; ++b) {
        TORCH_CHECK(bt[r * nb + b] >= 0 && bt[r * nb + b] < num_blocks,
                    "block id out of range for request ", r);
      }
    }
  }
  auto out = torch::empty_like(q);
  const auto st = q.scalar_type();
  TORCH_CHECK(st == torch::kFloat || st == torch::kBFloat16 || st == torch::kHalf,
              "paged_decode_attention supports float32, bfloat16 and float16");
  const auto* bt = block_tables.data_ptr<int64_t>();
  const auto* lens = seq_lens.data_ptr<int64_t>();
  const float sc = static_cast<float>(scale);
  if (st == torch::kFloat) {
    decode_attention<float>(q.data_ptr<float>(), k_cache.data_ptr<float>(),
                            v_cache.data_ptr<float>(), bt, lens, out.data_ptr<float>(), nd, H, Hkv,
                            D, bs, nb, sc);
  } else if (st == torch::kBFloat16) {
    using T = c10::BFloat16;
    decode_attention<T>(q.data_ptr<T>(), k_cache.data_ptr<T>(), v_cache.data_ptr<T>(), bt, lens,
                        out.data_ptr<T>(), nd, H, Hkv, D, bs, nb, sc);
  } else {
    using T = c10::Half;
    decode_attention<T>(q.data_ptr<T>(), k_cache.data_ptr<T>(), v_cache.data_ptr<T>(), bt, lens,
                        out.data_ptr<T>(), nd, H, Hkv, D, bs, nb, sc);
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention,
        "Decode attention over a block-paged K/V pool (CPU, fused, online softmax)");
}
