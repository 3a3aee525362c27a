// RMSNorm and RoPE as the model computes them, one op each; Python side: decode_ops.py.
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
