// Reading quant.py's weight formats, shared by the GEMV kernels (quant_kernels.cpp), the dequantization
// (dequantize.cpp) and the tile GEMMs (tile_gemm.cpp).
#ifndef LONGCAT_WEIGHTS_H
#define LONGCAT_WEIGHTS_H
#include "simd.h"

// 16 weights -> fp32. int8: sign-extend and convert. e4m3fn: rebuild the fp32 bit pattern (normal: exponent
// +120, mantissa << 20; subnormal: m * 2^-9), sign on top.
static inline __m512 load16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
static inline __m512 load16(const uint8_t* p) {
  __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  __m512i sign = _mm512_slli_epi32(_mm512_and_si512(v, _mm512_set1_epi32(0x80)), 24);
  __m512i em = _mm512_and_si512(v, _mm512_set1_epi32(0x7F));
  __m512 normal = _mm512_castsi512_ps(_mm512_add_epi32(_mm512_slli_epi32(em, 20), _mm512_set1_epi32(120 << 23)));
  __m512 sub = _mm512_mul_ps(_mm512_cvtepi32_ps(em), _mm512_set1_ps(1.0f / 512.0f));
  __m512 mag = _mm512_mask_blend_ps(_mm512_cmplt_epi32_mask(em, _mm512_set1_epi32(8)), normal, sub);
  return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(mag), sign));
}
// Plain weights (unquantized models' linears and experts): bf16 is the top half of an fp32.
static inline __m512 load16(const at::BFloat16* p) { return x16(p, 0xFFFF); }
static inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
static inline float scalar(int8_t v) { return static_cast<float>(v); }
static inline float scalar(at::BFloat16 v) { return static_cast<float>(v); }
static inline float scalar(float v) { return v; }
static inline float scalar(uint8_t v) {
  int em = v & 0x7F;
  float mag = (em >> 3) ? std::ldexp(1.0f + (em & 7) / 8.0f, (em >> 3) - 7) : (em & 7) * (1.0f / 512.0f);
  return (v & 0x80) ? -mag : mag;
}

// int4 groups: packed (O, I/2) bytes; in each 32-value chunk byte j holds value j in its low nibble and value
// j + 16 in its high nibble; w = scale[o, g] * q + min[o, g] for group g = k / G, q in 0..15.
static inline void load32(const uint8_t* p, __m512& lo, __m512& hi) {
  __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  lo = _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(15)));
  hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
}

// Weight rows as bf16, for the bf16 dequantization (dequantize.cpp) and the tile GEMMs' panels (tile_gemm.cpp): row
// o's chunks c0 <= c < c1 of 32 values to dst + (c - c0) * stride, each value rounded to bf16 from fp32 as torch
// rounds.
static inline __m512i bf16_lanes(__m512 v) {  // 16 values -> the 16-bit lanes of the low half
#ifdef __AVX512BF16__
  return _mm512_castsi256_si512((__m256i)_mm512_cvtneps_pbh(v));
#else
  return _mm512_castsi256_si512(_mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(round_bf16(v)), 16)));
#endif
}
// 32 values (lo: the first 16) -> 32 bf16 lanes. With AVX512-BF16, one instruction that rounds the same way (it
// flushes subnormals to zero, which no weight times its scale reaches); else three to five per 16.
static inline __m512i bf16x32(__m512 lo, __m512 hi) {
#ifdef __AVX512BF16__
  return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
#else
  return _mm512_inserti64x4(bf16_lanes(lo), _mm512_castsi512_si256(bf16_lanes(hi)), 1);
#endif
}

struct Int4Rows {  // packed (rows, I/2), scales and mins (rows, I/G) bf16 (experts stacked): w = scale * q + min
  const uint8_t* w;
  const at::BFloat16 *s, *mn;
  int64_t I, G;
  // Codes to fp32, one FMA each, two vectors to bf16 in one conversion (a 16-entry table per group, looked up with
  // a word permute, was ~2x slower: the permute and the unpacking all queue on one port).
  // The group is counted, not divided: a division per chunk cost more than the chunk.
  void operator()(int64_t o, at::BFloat16* dst, int64_t stride, int64_t c0, int64_t c1) const {
    const int64_t per = G / 32;
    const uint8_t* row = w + o * (I / 2);
    int64_t g = o * (I / G) + c0 / per, left = per - c0 % per;  // chunks left in group g
    __m512 d = _mm512_set1_ps(static_cast<float>(s[g])), m = _mm512_set1_ps(static_cast<float>(mn[g]));
    for (int64_t c = c0; c < c1; ++c) {
      if (left-- == 0) {
        ++g, left = per - 1;
        d = _mm512_set1_ps(static_cast<float>(s[g]));
        m = _mm512_set1_ps(static_cast<float>(mn[g]));
      }
      __m512 lo, hi;
      prefetch(row + c * 16);
      load32(row + c * 16, lo, hi);
      _mm512_storeu_si512(dst + (c - c0) * stride, bf16x32(_mm512_fmadd_ps(lo, d, m), _mm512_fmadd_ps(hi, d, m)));
    }
  }
};

template <typename W>
struct BlockRows {  // values (E, O, I) int8 or fp8, scales (E, nO, nI) fp32 per 128 x 128 block; row o of E * O
  const W* v;
  const float* s;
  int64_t I, O;
  const float* row_scales(int64_t o) const {
    return s + ((o / O) * ((O + 127) / 128) + (o % O) / 128) * ((I + 127) / 128);
  }
  void operator()(int64_t o, at::BFloat16* dst, int64_t stride, int64_t c0, int64_t c1) const {
    const float* so = row_scales(o);
    for (int64_t c = c0; c < c1; ++c) {
      const __m512 d = _mm512_set1_ps(so[c / 4]);
      const W* p = v + o * I + c * 32;
      prefetch(p);
      _mm512_storeu_si512(dst + (c - c0) * stride,
                          bf16x32(_mm512_mul_ps(load16(p), d), _mm512_mul_ps(load16(p + 16), d)));
    }
  }
};
struct PlainRows {  // plain bf16 weights (E, O, I): row o of E * O, copied as it is
  const at::BFloat16* w;
  int64_t I;
  void operator()(int64_t o, at::BFloat16* dst, int64_t stride, int64_t c0, int64_t c1) const {
    for (int64_t c = c0; c < c1; ++c) {
      prefetch(w + o * I + c * 32);
      _mm512_storeu_si512(dst + (c - c0) * stride, _mm512_loadu_si512(w + o * I + c * 32));
    }
  }
};
#endif  // LONGCAT_WEIGHTS_H
