// RMSNorm, RoPE and absorbed MLA attention as the model computes them, one op each; Python side: decode_ops.py.
#include "simd.h"

// ---- RMSNorm, as model/layers.py computes it (fp32, rounded to x's dtype before the weight): one op instead of
// eight small ones (~50 us at decode with two threads), 49 times per token on the bench preset.
static inline void store_row(float* p, __m512 v, __mmask16 n) { _mm512_mask_storeu_ps(p, n, v); }
static inline void store_row(at::BFloat16* p, __m512 v, __mmask16 n) {  // v already holds a bf16 value
  _mm256_mask_storeu_epi16(p, n, _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(v), 16)));
}

template <typename X>
static void rms_rows(const X* x, const X* w, X* y, int64_t rows, int64_t D, float eps) {
  constexpr bool bf16 = std::is_same<X, at::BFloat16>::value;
  at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const X* xr = x + r * D;
      __m512 ss = _mm512_setzero_ps();
      for (int64_t k = 0; k < D; k += 16) {
        const __m512 v = x16(xr + k, tail16(D - k));
        ss = _mm512_fmadd_ps(v, v, ss);
      }
      const __m512 inv = _mm512_set1_ps(1.0f / std::sqrt(_mm512_reduce_add_ps(ss) / D + eps));
      for (int64_t k = 0; k < D; k += 16) {
        const __mmask16 n = tail16(D - k);
        __m512 v = _mm512_mul_ps(x16(xr + k, n), inv);
        v = _mm512_mul_ps(x16(w + k, n), bf16 ? round_bf16(v) : v);
        store_row(y + r * D + k, bf16 ? round_bf16(v) : v, n);
      }
    }
  });
}

// x (..., D) and weight (D,) of one dtype, fp32 or bf16 -> (..., D).
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous() && weight.dim() == 1 && x.size(-1) == weight.size(0) &&
              x.scalar_type() == weight.scalar_type());
  auto y = torch::empty_like(x);
  const int64_t D = x.size(-1), rows = x.numel() / std::max<int64_t>(D, 1);
  if (x.scalar_type() == torch::kBFloat16)
    rms_rows(x.data_ptr<at::BFloat16>(), weight.data_ptr<at::BFloat16>(), y.data_ptr<at::BFloat16>(), rows, D, eps);
  else if (x.scalar_type() == torch::kFloat)
    rms_rows(x.data_ptr<float>(), weight.data_ptr<float>(), y.data_ptr<float>(), rows, D, eps);
  else TORCH_CHECK(false, "rms_norm: x must be float32 or bfloat16");
  return y;
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

torch::Tensor rope(torch::Tensor x, int64_t rows, int64_t stride, torch::Tensor cos, torch::Tensor sin) {
  const int64_t R = x.size(-1), N = cos.numel() / (R / 2);
  TORCH_CHECK(x.stride(-1) == 1 && R % 2 == 0 && cos.is_contiguous() && sin.is_contiguous() && N > 0 &&
              rows % N == 0 && cos.scalar_type() == x.scalar_type() && sin.scalar_type() == x.scalar_type());
  auto y = torch::empty(x.sizes(), x.options());
  if (x.scalar_type() == torch::kBFloat16)
    rope_rows(x.data_ptr<at::BFloat16>(), stride, cos.data_ptr<at::BFloat16>(), sin.data_ptr<at::BFloat16>(),
              y.data_ptr<at::BFloat16>(), rows, N, R);
  else if (x.scalar_type() == torch::kFloat)
    rope_rows(x.data_ptr<float>(), stride, cos.data_ptr<float>(), sin.data_ptr<float>(), y.data_ptr<float>(), rows,
              N, R);
  else TORCH_CHECK(false, "rope: x must be float32 or bfloat16");
  return y;
}

// ---- MLA attention over the latent cache with W_UK and W_UV absorbed (docs/architecture.md §6.3), as
// FusedMLA.attend_absorbed computes it (fp32 throughout): one op per attention block instead of ~30 small ones.
// One task per query row (b, s, h):
//   q_latent = q_nope[h] @ W_UK[h]                        (C)
//   score[l] = (q_latent . latent[l] + q_rope[h] . k_rope[l]) * scale, -inf where mask[b, s, l] is false
//   out[h]   = (softmax(score) @ latent) @ W_UV^T[h]       (V), zeros for a row with no slot
// Inputs of x's dtype are read in place through their row strides: rows (b, s, h) of q_nope / q_rope and rows
// (b, l) of latent / k_rope must each lie evenly apart (decode_ops.py checks).
template <typename X>
static inline float dot(const float* a, const X* b, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t k = 0; k < n; k += 16) acc = _mm512_fmadd_ps(x16(a + k, tail16(n - k)), x16(b + k, tail16(n - k)), acc);
  return _mm512_reduce_add_ps(acc);
}
template <typename X>
static inline void axpy(float a, const X* x, float* y, int64_t n) {  // y += a * x
  const __m512 va = _mm512_set1_ps(a);
  for (int64_t k = 0; k < n; k += 16) {
    const __mmask16 m = tail16(n - k);
    _mm512_mask_storeu_ps(y + k, m, _mm512_fmadd_ps(va, x16(x + k, m), _mm512_maskz_loadu_ps(m, y + k)));
  }
}
template <typename X>
static inline void load_row(const X* x, float* y, int64_t n) {  // to fp32
  for (int64_t k = 0; k < n; k += 16) _mm512_mask_storeu_ps(y + k, tail16(n - k), x16(x + k, tail16(n - k)));
}

template <typename X>
static void absorbed_rows(const X* qn, int64_t qn_stride, const X* qr, int64_t qr_stride, const X* lat,
                          int64_t lat_stride, const X* kr, int64_t kr_stride, const bool* mask, const float* w_uk,
                          const float* w_uv_t, float scale, X* y, int64_t B, int64_t S, int64_t H, int64_t N,
                          int64_t R, int64_t L, int64_t C, int64_t V) {
  at::parallel_for(0, B * S * H, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> buf(N + R + 2 * C + L + V);
    float *q = buf.data(), *rope = q + N, *q_lat = rope + R, *o_lat = q_lat + C, *p = o_lat + C, *out = p + L;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t h = t % H, bs = t / H, b = bs / S;  // row t = (b, s, h)
      load_row(qn + t * qn_stride, q, N);
      load_row(qr + t * qr_stride, rope, R);
      std::fill(q_lat, q_lat + C, 0.0f);
      for (int64_t n = 0; n < N; ++n) axpy(q[n], w_uk + (h * N + n) * C, q_lat, C);
      const bool* m = mask + bs * L;
      float top = -INFINITY;
      for (int64_t l = 0; l < L; ++l) {
        const int64_t row = b * L + l;
        p[l] = m[l] ? (dot(q_lat, lat + row * lat_stride, C) + dot(rope, kr + row * kr_stride, R)) * scale
                    : -INFINITY;
        top = std::max(top, p[l]);
      }
      std::fill(o_lat, o_lat + C, 0.0f);
      std::fill(out, out + V, 0.0f);
      if (top != -INFINITY) {
        float sum = 0.0f;
        for (int64_t l = 0; l < L; ++l) sum += (p[l] = std::exp(p[l] - top));
        for (int64_t l = 0; l < L; ++l)
          if (p[l] != 0.0f) axpy(p[l] / sum, lat + (b * L + l) * lat_stride, o_lat, C);
        for (int64_t c = 0; c < C; ++c) axpy(o_lat[c], w_uv_t + (h * C + c) * V, out, V);
      }
      X* yr = y + t * V;  // y (B, S, H*V): row t holds head h of position (b, s)
      for (int64_t v = 0; v < V; ++v) yr[v] = static_cast<X>(out[v]);
    }
  });
}

// q_nope (B, S, H, N), q_rope (B, S, H, R), latent (B, L, C), k_rope (B, L, R): one dtype, fp32 or bf16, read
// through the given row strides; mask (B, S, L) bool; w_uk (H, N, C), w_uv_t (H, C, V) fp32 -> (B, S, H*V).
torch::Tensor absorbed_attention(torch::Tensor q_nope, int64_t qn_stride, torch::Tensor q_rope, int64_t qr_stride,
                                 torch::Tensor latent, int64_t lat_stride, torch::Tensor k_rope, int64_t kr_stride,
                                 torch::Tensor mask, torch::Tensor w_uk, torch::Tensor w_uv_t, double scale) {
  const int64_t B = q_nope.size(0), S = q_nope.size(1), H = q_nope.size(2), N = q_nope.size(3);
  const int64_t R = q_rope.size(3), L = latent.size(1), C = latent.size(2), V = w_uv_t.size(2);
  const auto dtype = q_nope.scalar_type();
  TORCH_CHECK(q_rope.scalar_type() == dtype && latent.scalar_type() == dtype && k_rope.scalar_type() == dtype &&
              mask.scalar_type() == torch::kBool && mask.is_contiguous() && mask.numel() == B * S * L &&
              w_uk.scalar_type() == torch::kFloat && w_uv_t.scalar_type() == torch::kFloat && w_uk.is_contiguous() &&
              w_uv_t.is_contiguous() && w_uk.numel() == H * N * C && w_uv_t.numel() == H * C * V &&
              k_rope.size(2) == R && q_nope.stride(3) == 1 && q_rope.stride(3) == 1 && latent.stride(2) == 1 &&
              k_rope.stride(2) == 1, "absorbed_attention: shapes, dtypes or strides do not fit");
  auto y = torch::empty({B, S, H * V}, q_nope.options());
  if (dtype == torch::kBFloat16)
    absorbed_rows(q_nope.data_ptr<at::BFloat16>(), qn_stride, q_rope.data_ptr<at::BFloat16>(), qr_stride,
                  latent.data_ptr<at::BFloat16>(), lat_stride, k_rope.data_ptr<at::BFloat16>(), kr_stride,
                  mask.data_ptr<bool>(), w_uk.data_ptr<float>(), w_uv_t.data_ptr<float>(), scale,
                  y.data_ptr<at::BFloat16>(), B, S, H, N, R, L, C, V);
  else if (dtype == torch::kFloat)
    absorbed_rows(q_nope.data_ptr<float>(), qn_stride, q_rope.data_ptr<float>(), qr_stride, latent.data_ptr<float>(),
                  lat_stride, k_rope.data_ptr<float>(), kr_stride, mask.data_ptr<bool>(), w_uk.data_ptr<float>(),
                  w_uv_t.data_ptr<float>(), scale, y.data_ptr<float>(), B, S, H, N, R, L, C, V);
  else TORCH_CHECK(false, "absorbed_attention: inputs must be float32 or bfloat16");
  return y;
}
