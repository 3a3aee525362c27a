// Quantized weights dequantized into a full matrix, for GEMMs with many rows (prefill); Python side: kernels.py.
#include "simd.h"
#include "weights.h"

// One pass, 16 values at a time, rounded to the output dtype as torch rounds.
template <typename X>
static inline void store16(X* p, __m512 v) { store_row(p, round_to<X>(v), 0xFFFF); }

// values (..., O, I) int8/fp8, scales (..., nO, nI) -> out (..., O, I).
template <typename W, typename X>
static void block_deq(const W* v, const float* s, int64_t rows, int64_t O, int64_t I, X* out) {
  const int64_t nO = (O + 127) / 128, nI = (I + 127) / 128;
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* sr = s + ((r / O) * nO + (r % O) / 128) * nI;
      const W* vr = v + r * I;
      X* orow = out + r * I;
      int64_t k = 0;
      for (; k + 16 <= I; k += 16) store16(orow + k, _mm512_mul_ps(load16(vr + k), _mm512_set1_ps(sr[k / 128])));
      for (; k < I; ++k) orow[k] = static_cast<X>(scalar(vr[k]) * sr[k / 128]);
    }
  });
}

template <typename X>
static void block_deq_typed(torch::Tensor values, torch::Tensor scales, torch::Tensor out) {
  const int64_t O = values.size(-2), I = values.size(-1), rows = values.numel() / I;
  if (values.scalar_type() == torch::kChar)
    block_deq(values.data_ptr<int8_t>(), scales.data_ptr<float>(), rows, O, I, out.data_ptr<X>());
  else
    block_deq(reinterpret_cast<const uint8_t*>(values.data_ptr()), scales.data_ptr<float>(), rows, O, I,
              out.data_ptr<X>());
}

torch::Tensor block_dequantize(torch::Tensor values, torch::Tensor scales, bool bf16) {
  TORCH_CHECK(values.is_contiguous() && scales.is_contiguous() && scales.scalar_type() == torch::kFloat);
  auto out = torch::empty(values.sizes(), values.options().dtype(bf16 ? torch::kBFloat16 : torch::kFloat));
  if (bf16) block_deq_typed<at::BFloat16>(values, scales, out);
  else block_deq_typed<float>(values, scales, out);
  return out;
}

// packed (..., O, I/2), scales and mins (..., O, I/G) -> out (..., O, I).
template <typename X>
static void group_deq(const uint8_t* w, const at::BFloat16* s, const at::BFloat16* mn, int64_t rows, int64_t I,
                      int64_t G, X* out) {
  const int64_t nG = I / G;
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t c = 0; c < I; c += 32) {
        const __m512 d = _mm512_set1_ps(static_cast<float>(s[r * nG + c / G]));
        const __m512 m = _mm512_set1_ps(static_cast<float>(mn[r * nG + c / G]));
        __m512 lo, hi;
        load32(w + r * (I / 2) + c / 2, lo, hi);
        store16(out + r * I + c, _mm512_fmadd_ps(lo, d, m));
        store16(out + r * I + c + 16, _mm512_fmadd_ps(hi, d, m));
      }
  });
}

torch::Tensor group_dequantize(torch::Tensor packed, torch::Tensor scales, torch::Tensor mins, int64_t G, bool bf16) {
  const int64_t I = packed.size(-1) * 2, rows = packed.numel() / packed.size(-1);
  TORCH_CHECK(packed.is_contiguous() && scales.is_contiguous() && mins.is_contiguous() && G % 32 == 0 &&
              I % G == 0 && scales.scalar_type() == torch::kBFloat16 && mins.scalar_type() == torch::kBFloat16);
  auto sizes = packed.sizes().vec();
  sizes.back() = I;
  auto out = torch::empty(sizes, packed.options().dtype(bf16 ? torch::kBFloat16 : torch::kFloat));
  const uint8_t* w = packed.data_ptr<uint8_t>();
  const at::BFloat16 *s = scales.data_ptr<at::BFloat16>(), *mn = mins.data_ptr<at::BFloat16>();
  if (bf16) group_deq(w, s, mn, rows, I, G, out.data_ptr<at::BFloat16>());
  else group_deq(w, s, mn, rows, I, G, out.data_ptr<float>());
  return out;
}
