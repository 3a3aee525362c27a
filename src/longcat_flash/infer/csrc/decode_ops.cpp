// RMSNorm, SwiGLU, RoPE and absorbed MLA attention as the model computes them, one op each; Python side:
// decode_ops.py.
#include <algorithm>

#include "simd.h"

// ---- RMSNorm, as model/layers.py computes it (fp32, rounded to x's dtype before the weight): one op instead of
// eight small ones (~50 us at decode with two threads), 49 times per token on the bench preset.

template <typename X>
static void rms_rows(const X* x, int64_t stride, const X* w, X* y, int64_t rows, int64_t D, float eps) {
  at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const X* xr = x + r * stride;
      __m512 ss = _mm512_setzero_ps();
      for (int64_t k = 0; k < D; k += 16) {
        const __m512 v = x16(xr + k, tail16(D - k));
        ss = _mm512_fmadd_ps(v, v, ss);
      }
      const __m512 inv = _mm512_set1_ps(1.0f / std::sqrt(_mm512_reduce_add_ps(ss) / D + eps));
      for (int64_t k = 0; k < D; k += 16) {
        const __mmask16 n = tail16(D - k);
        __m512 v = _mm512_mul_ps(x16(xr + k, n), inv);
        v = _mm512_mul_ps(x16(w + k, n), round_to<X>(v));
        store_row(y + r * D + k, round_to<X>(v), n);
      }
    }
  });
}

// x itself if its rows (over the last dim, contiguous) lie evenly apart in memory, so that row i starts at
// i * row_stride(x), as in a split's view; else a contiguous copy.
static torch::Tensor evenly_spaced_rows(const torch::Tensor& x) {
  bool uniform = x.dim() >= 2 && x.stride(-1) == 1;
  for (int64_t i = 0; uniform && i + 2 < x.dim(); ++i) uniform = x.stride(i) == x.stride(i + 1) * x.size(i + 1);
  return uniform ? x : x.contiguous();
}

// The distance between x's rows, which lie evenly apart (evenly_spaced_rows): D when x is contiguous, whatever
// strides its size-1 dimensions report.
static int64_t row_stride(const torch::Tensor& x) {
  return x.is_contiguous() || x.dim() < 2 ? x.size(-1) : x.stride(-2);
}

// x (..., D), read in place where its rows lie evenly apart (a slice of a wider row: no copy first), and weight (D,)
// of one dtype, fp32 or bf16 -> (..., D) contiguous.
torch::Tensor rms_norm(torch::Tensor x_in, torch::Tensor weight, double eps) {
  const auto x = evenly_spaced_rows(x_in);
  TORCH_CHECK(x.stride(-1) == 1 && weight.is_contiguous() && weight.dim() == 1 && x.size(-1) == weight.size(0) &&
              x.scalar_type() == weight.scalar_type());
  auto y = torch::empty(x.sizes(), x.options());
  const int64_t D = x.size(-1), rows = x.numel() / std::max<int64_t>(D, 1);
  with_dtype(x, "rms_norm", [&](auto t) {
    using X = decltype(t);
    rms_rows(x.data_ptr<X>(), row_stride(x), weight.data_ptr<X>(), y.data_ptr<X>(), rows, D, eps);
  });
  return y;
}

// ---- SwiGLU of the MLPs: h (..., 2F) = [gate | up] of x's dtype, fp32 or bf16 -> (..., F), one op instead of
// chunk, silu and mul.
torch::Tensor swiglu(torch::Tensor h_in) {
  const auto h = h_in.contiguous();
  const int64_t F = h.size(-1) / 2, R = F ? h.numel() / (2 * F) : 0;
  auto sizes = h.sizes().vec();
  sizes.back() = F;
  auto a = torch::empty(sizes, h.options());
  with_dtype(h, "swiglu", [&](auto t) { swiglu_rows(h.data_ptr<decltype(t)>(), R, F, a.data_ptr<decltype(t)>()); });
  return a;
}

// ---- rotary embedding, as model/layers.py's apply_rope: rows of interleaved pairs (x0, x1), (x2, x3), ... ->
// [evens * cos - odds * sin | odds * cos + evens * sin], each product and sum rounded to x's dtype as torch's
// separate ops round them (built with -ffp-contract=off, so no FMA merges two of them). x: `rows` rows of R values,
// `stride` apart; cos/sin (N, R/2) for N positions, rows / N heads per position; y (rows, R) contiguous.
template <typename X>
static void rope_rows(const X* x, int64_t stride, const X* c, const X* sn, X* y, int64_t rows, int64_t N,
                      int64_t R) {
  const int64_t half = R / 2, heads = rows / N;
  for (int64_t i = 0; i < rows; ++i) {
    const X *xr = x + i * stride, *cr = c + i / heads * half, *sr = sn + i / heads * half;
    X* yr = y + i * R;
    for (int64_t j = 0; j < half; ++j) {
      const float e = xr[2 * j], o = xr[2 * j + 1], cj = cr[j], sj = sr[j];
      yr[j] = static_cast<X>(static_cast<float>(static_cast<X>(e * cj)) - static_cast<float>(static_cast<X>(o * sj)));
      yr[half + j] = static_cast<X>(static_cast<float>(static_cast<X>(o * cj)) +
                                    static_cast<float>(static_cast<X>(e * sj)));
    }
  }
}

// x (..., R) read in place where its rows lie evenly apart, cos/sin (N, R/2) -> (..., R) contiguous.
torch::Tensor rope(torch::Tensor x_in, torch::Tensor cos, torch::Tensor sin) {
  const auto x = evenly_spaced_rows(x_in);
  const int64_t R = x.size(-1), N = cos.numel() / (R / 2), rows = x.numel() / R, stride = row_stride(x);
  TORCH_CHECK(x.stride(-1) == 1 && R % 2 == 0 && cos.is_contiguous() && sin.is_contiguous() && N > 0 &&
              rows % N == 0 && cos.scalar_type() == x.scalar_type() && sin.scalar_type() == x.scalar_type());
  auto y = torch::empty(x.sizes(), x.options());
  with_dtype(x, "rope", [&](auto t) {
    using X = decltype(t);
    rope_rows(x.data_ptr<X>(), stride, cos.data_ptr<X>(), sin.data_ptr<X>(), y.data_ptr<X>(), rows, N, R);
  });
  return y;
}

// ---- MLA attention over the latent cache with W_UK and W_UV absorbed (docs/architecture.md §6.3), as
// FusedMLA.attend_absorbed computes it (fp32 throughout): one op per attention block instead of ~30 small ones.
// W_UK and W_UV^T are read in their own dtype, fp32 or bf16 (kv_b_proj's: a bf16 model's are half the bytes of an
// fp32 copy, ~1 MB a block; the values and the fp32 sums are the same). Per query row (b, s) and head h:
//   q_latent = q_nope[h] @ W_UK[h]                        (C)
//   score[l] = (q_latent . latent[l] + q_rope[h] . k_rope[l]) * scale, -inf where mask[b, s, l] is false
//   out[h]   = (softmax(score) @ latent) @ W_UV^T[h]       (V), zeros for a row with no slot
// One task per query row and group of up to HEADS heads, so that each latent row read (and converted to fp32)
// once serves every head of the group. Inputs of x's dtype are read through their row strides: rows (b, s, h) of
// q_nope / q_rope and rows (b, l) of latent / k_rope each lie evenly apart (evenly_spaced_rows). With a read index
// (B, L), latent and k_rope are the paged cache's pool (rows of every page) and row (b, l) is pool row read[b, l]:
// the context is read where it lies, not gathered into a copy first.
constexpr int64_t HEADS = 4;

// Row i of `rows` (row stride `stride`): rows[i], or rows[index[i]] through a read index.
template <typename X>
static inline const X* row_at(const X* rows, int64_t stride, const int64_t* index, int64_t i) {
  return rows + (index ? index[i] : i) * stride;
}

// s[j * n + l] (+)= q[j * C + 0:C] . row l[0:C] for J heads j and l < n (row_at): each row's values loaded once.
template <int J, typename X>
static void head_dots(const float* q, int64_t C, const X* rows, int64_t stride, const int64_t* index, int64_t n,
                      bool add, float* s) {
  for (int64_t l = 0; l < n; ++l) {
    const X* row = row_at(rows, stride, index, l);
    __m512 acc[J];
    for (int j = 0; j < J; ++j) acc[j] = _mm512_setzero_ps();
    for (int64_t k = 0; k < C; k += 16) {
      const __mmask16 m = tail16(C - k);
      const __m512 r = x16(row + k, m);
      for (int j = 0; j < J; ++j) acc[j] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, q + j * C + k), r, acc[j]);
    }
    for (int j = 0; j < J; ++j) s[j * n + l] = (add ? s[j * n + l] : 0.0f) + _mm512_reduce_add_ps(acc[j]);
  }
}

// y[j * C + 0:C] = sum_i a[j * n + i] * row i[0:C] for J heads j (row_at): each row's values loaded once, 16 * W
// columns at a time in registers. Rows whose weights are all 0 are skipped (masked cache slots may hold anything).
template <int J, typename X>
static void head_weighted_rows(const float* a, int64_t n, const X* rows, int64_t stride, const int64_t* index,
                               int64_t C, float* y) {
  constexpr int W = J == 1 ? 4 : 2;  // one head: four accumulators to hide the FMA latency
  for (int64_t c = 0; c < C; c += 16 * W) {
    __mmask16 m[W];
    __m512 acc[J][W];
    for (int w = 0; w < W; ++w) m[w] = C - c > 16 * w ? tail16(C - c - 16 * w) : 0;
    for (int j = 0; j < J; ++j)
      for (int w = 0; w < W; ++w) acc[j][w] = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; ++i) {
      bool any = false;
      for (int j = 0; j < J; ++j) any |= a[j * n + i] != 0.0f;
      if (!any) continue;
      __m512 r[W];
      const X* row = row_at(rows, stride, index, i);
      for (int w = 0; w < W; ++w) r[w] = x16(row + c + 16 * w, m[w]);
      for (int j = 0; j < J; ++j) {
        const __m512 aj = _mm512_set1_ps(a[j * n + i]);
        for (int w = 0; w < W; ++w) acc[j][w] = _mm512_fmadd_ps(aj, r[w], acc[j][w]);
      }
    }
    for (int j = 0; j < J; ++j)
      for (int w = 0; w < W; ++w) _mm512_mask_storeu_ps(y + j * C + c + 16 * w, m[w], acc[j][w]);
  }
}

template <typename X>
static inline void load_row(const X* x, float* y, int64_t n) {  // to fp32
  for (int64_t k = 0; k < n; k += 16) _mm512_mask_storeu_ps(y + k, tail16(n - k), x16(x + k, tail16(n - k)));
}

// Softmax of scale * p[0:L] where mask, in place; all zeros for a row with no slot.
static void masked_softmax(float* p, const bool* mask, int64_t L, float scale) {
  float top = -INFINITY, sum = 0.0f;
  for (int64_t l = 0; l < L; ++l) top = std::max(top, p[l] = mask[l] ? p[l] * scale : -INFINITY);
  if (top == -INFINITY) {
    std::fill(p, p + L, 0.0f);
    return;
  }
  for (int64_t l = 0; l < L; ++l) sum += (p[l] = std::exp(p[l] - top));
  for (int64_t l = 0; l < L; ++l) p[l] /= sum;
}

template <typename X, typename W>
struct Absorbed {
  const X *qn, *qr, *lat, *kr;
  int64_t qn_stride, qr_stride, lat_stride, kr_stride;
  const bool* mask;
  const int64_t* read;  // (B, L) pool rows, or null: latent / k_rope are (B, L, .)
  const W *w_uk, *w_uv_t;
  float scale;
  X* y;
  int64_t B, S, H, N, R, L, C, V;

  // Heads h0..h0+J of query row bs = (b, s); buf holds J * (2C + R + L) + max(N, V) floats.
  template <int J>
  void heads(int64_t bs, int64_t h0, float* buf) const {
    float *q_lat = buf, *rope = q_lat + J * C, *p = rope + J * R, *o_lat = p + J * L, *tmp = o_lat + J * C;
    const int64_t b = bs / S;
    for (int j = 0; j < J; ++j) {
      const int64_t row = bs * H + h0 + j;
      load_row(qn + row * qn_stride, tmp, N);
      head_weighted_rows<1>(tmp, N, w_uk + (h0 + j) * N * C, C, nullptr, C, q_lat + j * C);
      load_row(qr + row * qr_stride, rope + j * R, R);
    }
    const X *lat_b = read ? lat : lat + b * L * lat_stride, *kr_b = read ? kr : kr + b * L * kr_stride;
    const int64_t* index = read ? read + b * L : nullptr;
    head_dots<J>(q_lat, C, lat_b, lat_stride, index, L, false, p);
    head_dots<J>(rope, R, kr_b, kr_stride, index, L, true, p);
    for (int j = 0; j < J; ++j) masked_softmax(p + j * L, mask + bs * L, L, scale);
    head_weighted_rows<J>(p, L, lat_b, lat_stride, index, C, o_lat);
    for (int j = 0; j < J; ++j) {
      head_weighted_rows<1>(o_lat + j * C, C, w_uv_t + (h0 + j) * C * V, V, nullptr, V, tmp);
      X* yr = y + (bs * H + h0 + j) * V;  // y (B, S, H*V)
      for (int64_t v = 0; v < V; ++v) yr[v] = static_cast<X>(tmp[v]);
    }
  }

  void run() const {
    const int64_t groups = (H + HEADS - 1) / HEADS;
    // Tasks run group by group (t = g * B*S + bs), so that a thread keeps its heads' W_UK and W_UV^T in cache.
    at::parallel_for(0, B * S * groups, 1, [&](int64_t t0, int64_t t1) {
      std::vector<float> buf(HEADS * (2 * C + R + L) + std::max(N, V));
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t h0 = t / (B * S) * HEADS, bs = t % (B * S);
        with_rows(std::min(HEADS, H - h0), [&](auto J) { heads<decltype(J)::value>(bs, h0, buf.data()); });
      }
    });
  }
};

// q_nope (B, S, H, N), q_rope (B, S, H, R), latent (B, L, C), k_rope (B, L, R): one dtype, fp32 or bf16, read in
// place where their rows lie evenly apart; mask (B, S, L) bool; w_uk (H, N, C) and w_uv_t (H, C, V): one dtype, fp32
// or bf16 -> (B, S, H*V).
// With `read` (B, L) int64: latent (P, C) and k_rope (P, R) are pool rows, row (b, l) being pool row read[b, l].
torch::Tensor absorbed_attention(torch::Tensor q_nope_in, torch::Tensor q_rope_in, torch::Tensor latent_in,
                                 torch::Tensor k_rope_in, torch::Tensor mask, torch::Tensor w_uk, torch::Tensor w_uv_t,
                                 double scale, c10::optional<torch::Tensor> read) {
  const auto q_nope = evenly_spaced_rows(q_nope_in), q_rope = evenly_spaced_rows(q_rope_in);
  const auto latent = evenly_spaced_rows(latent_in), k_rope = evenly_spaced_rows(k_rope_in);
  const int64_t qn_stride = row_stride(q_nope), qr_stride = row_stride(q_rope);
  const int64_t lat_stride = row_stride(latent), kr_stride = row_stride(k_rope);
  const int64_t B = q_nope.size(0), S = q_nope.size(1), H = q_nope.size(2), N = q_nope.size(3);
  const int64_t R = q_rope.size(3), C = latent.size(-1), V = w_uv_t.size(2);
  const int64_t L = read ? read->numel() / std::max<int64_t>(B, 1) : latent.size(1);
  const auto dtype = q_nope.scalar_type();
  TORCH_CHECK(q_rope.scalar_type() == dtype && latent.scalar_type() == dtype && k_rope.scalar_type() == dtype &&
              mask.scalar_type() == torch::kBool && mask.is_contiguous() && mask.numel() == B * S * L &&
              w_uv_t.scalar_type() == w_uk.scalar_type() && w_uk.is_contiguous() &&
              w_uv_t.is_contiguous() && w_uk.numel() == H * N * C && w_uv_t.numel() == H * C * V &&
              k_rope.size(-1) == R && q_nope.stride(3) == 1 && q_rope.stride(3) == 1 && latent.stride(-1) == 1 &&
              k_rope.stride(-1) == 1, "absorbed_attention: shapes, dtypes or strides do not fit");
  torch::Tensor index;
  if (read) {
    index = read->contiguous();
    const int64_t rows = latent.size(0);
    TORCH_CHECK(index.scalar_type() == torch::kLong && latent.dim() == 2 && k_rope.dim() == 2 &&
                k_rope.size(0) == rows && index.numel() == B * L,
                "absorbed_attention: read (B, L) int64 over pool rows latent (P, C) and k_rope (P, R)");
    const int64_t* at = index.data_ptr<int64_t>();  // a loop: two ATen reductions cost more than these few rows
    TORCH_CHECK(std::all_of(at, at + index.numel(), [&](int64_t i) { return i >= 0 && i < rows; }),
                "absorbed_attention: a read index outside the pool");
  }
  auto y = torch::empty({B, S, H * V}, q_nope.options());
  with_dtype(q_nope, "absorbed_attention", [&](auto t) {
    with_dtype(w_uk, "absorbed_attention", [&](auto w) {
      using X = decltype(t);
      using W = decltype(w);
      Absorbed<X, W>{q_nope.data_ptr<X>(), q_rope.data_ptr<X>(), latent.data_ptr<X>(), k_rope.data_ptr<X>(),
                     qn_stride, qr_stride, lat_stride, kr_stride, mask.data_ptr<bool>(),
                     read ? index.data_ptr<int64_t>() : nullptr, w_uk.data_ptr<W>(), w_uv_t.data_ptr<W>(),
                     static_cast<float>(scale), y.data_ptr<X>(), B, S, H, N, R, L, C, V}.run();
    });
  });
  return y;
}
