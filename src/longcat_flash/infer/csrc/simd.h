// What every kernel here shares: headers, loads of 16 values with a tail mask, the integer dot product, software
// prefetch and the row-count dispatch. Passed to the compiler ahead of the .cpp files (extension.py), which also
// include it, so that each file reads on its own.
#ifndef LONGCAT_SIMD_H
#define LONGCAT_SIMD_H
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <type_traits>

// Ask for the weight bytes PREFETCH ahead of what a row reads now: the hardware prefetcher alone left the int4
// kernel at 6.1 GB/s on one core, software prefetch of both rows of a pair 4 KB ahead at 8.9 (1 KB: 6.6,
// 8 KB: 8.8; one row only: 8.6).
constexpr int64_t PREFETCH = 4096;
static inline void prefetch(const void* p) {
  _mm_prefetch(static_cast<const char*>(p) + PREFETCH, _MM_HINT_T0);
}

static inline __mmask16 tail16(int64_t n) { return n >= 16 ? 0xFFFF : (1u << n) - 1; }  // the first n of 16

// Up to 16 values (mask n) of a row of x as fp32.
static inline __m512 x16(const float* p, __mmask16 n) { return _mm512_maskz_loadu_ps(n, p); }
static inline __m512 x16(const at::BFloat16* p, __mmask16 n) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(n, p)), 16));
}

static inline __m512 round_bf16(__m512 v) {  // to the nearest bf16, ties to even, kept in fp32
  __m512i b = _mm512_castps_si512(v);
  __m512i odd = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  b = _mm512_add_epi32(b, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
  return _mm512_castsi512_ps(_mm512_and_si512(b, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

// acc + the sums of 4 adjacent u8 * s8 byte products, per int32 lane.
static inline __m512i dot4(__m512i acc, __m512i u, __m512i s) {
#ifdef __AVX512VNNI__
  return _mm512_dpbusd_epi32(acc, u, s);
#else  // u8 x s8 pairs to int16 (int4 codes, or |int8| <= 127, times |x| <= 127: no saturation), then to int32
  return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(u, s), _mm512_set1_epi16(1)));
#endif
}

// f(n) with n a compile-time row count 1..8 (std::integral_constant): the kernels keep accumulators per row of x
// in registers, so the count is a template argument.
template <typename F>
static inline void with_rows(int64_t n, F&& f) {
  switch (n) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    default: f(std::integral_constant<int, 8>{}); break;
  }
}
#endif  // LONGCAT_SIMD_H
