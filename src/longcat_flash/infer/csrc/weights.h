// Reading quant.py's weight formats as fp32, shared by the GEMV kernels (quant_kernels.cpp) and the
// dequantization (dequantize.cpp).
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
static inline float scalar(int8_t v) { return static_cast<float>(v); }
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
#endif  // LONGCAT_WEIGHTS_H
