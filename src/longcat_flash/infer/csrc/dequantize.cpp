// Quantized weights dequantized into a full matrix, for GEMMs with many rows where the tile GEMMs do not run (fp32,
// no AMX); Python side: kernels.py. bf16 output goes through the row dequantizers the tile GEMMs use (weights.h),
// so both paths see the same values; fp32 output is computed here, 16 values at a time.
#include "simd.h"
#include "weights.h"

// Every row of a stacked weight through a bf16 row dequantizer; columns past the last whole 32 by `tail(r, k)`.
template <typename Rows, typename Tail>
static void bf16_rows(const Rows& rows, int64_t n, int64_t I, at::BFloat16* out, Tail&& tail) {
  at::parallel_for(0, n, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      rows(r, out + r * I, 32, 0, I / 32);
      for (int64_t k = I / 32 * 32; k < I; ++k) out[r * I + k] = static_cast<at::BFloat16>(tail(r, k));
    }
  });
}

// values (..., O, I) int8/fp8, scales (..., nO, nI) -> out (..., O, I).
template <typename W>
static void block_deq(const W* v, const float* s, int64_t rows, int64_t O, int64_t I, torch::Tensor out) {
  const BlockRows<W> block{v, s, I, O};
  if (out.scalar_type() == torch::kBFloat16) {
    bf16_rows(block, rows, I, out.data_ptr<at::BFloat16>(),
              [&](int64_t r, int64_t k) { return scalar(v[r * I + k]) * block.row_scales(r)[k / 128]; });
    return;
  }
  float* o = out.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* sr = block.row_scales(r);
      int64_t k = 0;
      for (; k + 16 <= I; k += 16)
        _mm512_storeu_ps(o + r * I + k, _mm512_mul_ps(load16(v + r * I + k), _mm512_set1_ps(sr[k / 128])));
      for (; k < I; ++k) o[r * I + k] = scalar(v[r * I + k]) * sr[k / 128];
    }
  });
}

torch::Tensor block_dequantize(torch::Tensor values, torch::Tensor scales, bool bf16) {
  TORCH_CHECK(values.is_contiguous() && scales.is_contiguous() && scales.scalar_type() == torch::kFloat);
  auto out = torch::empty(values.sizes(), values.options().dtype(bf16 ? torch::kBFloat16 : torch::kFloat));
  const int64_t O = values.size(-2), I = values.size(-1), rows = values.numel() / I;
  if (values.scalar_type() == torch::kChar)
    block_deq(values.data_ptr<int8_t>(), scales.data_ptr<float>(), rows, O, I, out);
  else
    block_deq(reinterpret_cast<const uint8_t*>(values.data_ptr()), scales.data_ptr<float>(), rows, O, I, out);
  return out;
}

// packed (..., O, I/2), scales and mins (..., O, I/G) -> out (..., O, I).
torch::Tensor group_dequantize(torch::Tensor packed, torch::Tensor scales, torch::Tensor mins, int64_t G, bool bf16) {
  const int64_t I = packed.size(-1) * 2, rows = packed.numel() / packed.size(-1), nG = I / G;
  TORCH_CHECK(packed.is_contiguous() && scales.is_contiguous() && mins.is_contiguous() && G % 32 == 0 &&
              I % G == 0 && scales.scalar_type() == torch::kBFloat16 && mins.scalar_type() == torch::kBFloat16);
  auto sizes = packed.sizes().vec();
  sizes.back() = I;
  auto out = torch::empty(sizes, packed.options().dtype(bf16 ? torch::kBFloat16 : torch::kFloat));
  const uint8_t* w = packed.data_ptr<uint8_t>();
  const at::BFloat16 *s = scales.data_ptr<at::BFloat16>(), *mn = mins.data_ptr<at::BFloat16>();
  if (bf16) {  // I is a multiple of 32: no tail
    bf16_rows(Int4Rows{w, s, mn, I, G}, rows, I, out.data_ptr<at::BFloat16>(), [](int64_t, int64_t) { return 0.0f; });
    return out;
  }
  float* o = out.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t c = 0; c < I; c += 32) {
        const __m512 d = _mm512_set1_ps(static_cast<float>(s[r * nG + c / G]));
        const __m512 m = _mm512_set1_ps(static_cast<float>(mn[r * nG + c / G]));
        __m512 lo, hi;
        load32(w + r * (I / 2) + c / 2, lo, hi);
        _mm512_storeu_ps(o + r * I + c, _mm512_fmadd_ps(lo, d, m));
        _mm512_storeu_ps(o + r * I + c + 16, _mm512_fmadd_ps(hi, d, m));
      }
  });
  return out;
}
