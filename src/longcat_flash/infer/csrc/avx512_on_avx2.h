// The AVX-512 intrinsics the kernels use, on CPUs with only AVX2 + FMA (most AMD Zen 2/3, many Intel client
// parts): __m512 / __m512i are macros for a pair of 256-bit halves (lo: lanes 0-7 of fp32 / bytes 0-31), and each
// _mm512_* name the kernels call (and the few AVX512-VL/BW ones on 128- and 256-bit vectors) is a macro for a
// function here that gives the same lanes, bit for bit, as the instruction: FMAs stay fused, conversions round and
// truncate as it does, masked loads and stores touch only the lanes in the mask, the reductions add in the order
// GCC's avx512fintrin.h does. Only what the kernels use, in their forms (code under __AVX512BF16__ or
// __AVX512VNNI__ has its own fallback and is not emulated); the AVX-512 build (__AVX512F__) does not see any of
// it. Included by simd.h right after <immintrin.h>, whose own _mm512_* functions cannot be called without
// -mavx512f.
#ifndef LONGCAT_AVX512_ON_AVX2_H
#define LONGCAT_AVX512_ON_AVX2_H
#include <immintrin.h>

#ifndef __AVX512F__
#include <cstdint>

namespace on_avx2 {

struct m512 {  // 16 fp32
  __m256 lo, hi;
};
struct m512i {  // 512 bits of integers
  __m256i lo, hi;
};

// Masks: an 8-bit mask as the sign bits of 8 fp32/int32 lanes (bit i to lane i's top bit: all that maskload,
// maskstore and blendv read); lanes past the mask's tail are neither read nor written by the masked loads and
// stores below.
static inline __m256i lanes8(uint32_t bits) {
  const __m256i shift = _mm256_setr_epi32(31, 30, 29, 28, 27, 26, 25, 24);
  return _mm256_sllv_epi32(_mm256_set1_epi32(static_cast<int>(bits)), shift);
}
// Byte and 16-bit masked loads and stores (no AVX2 instruction): whole vectors directly, else element by element.
template <typename T, int N>
static inline void copy_masked(T* dst, const T* src, uint64_t mask) {
  for (int i = 0; i < N; ++i)
    if (mask >> i & 1) dst[i] = src[i];
}

// Loads, stores, set, casts.
static inline m512 mm512_loadu_ps(const void* p) {
  const float* f = static_cast<const float*>(p);
  return {_mm256_loadu_ps(f), _mm256_loadu_ps(f + 8)};
}
static inline m512i mm512_loadu_si512(const void* p) {
  const __m256i* v = static_cast<const __m256i*>(p);
  return {_mm256_loadu_si256(v), _mm256_loadu_si256(v + 1)};
}
static inline m512i mm512_load_si512(const void* p) {
  const __m256i* v = static_cast<const __m256i*>(p);
  return {_mm256_load_si256(v), _mm256_load_si256(v + 1)};
}
static inline void mm512_storeu_ps(void* p, m512 a) {
  float* f = static_cast<float*>(p);
  _mm256_storeu_ps(f, a.lo), _mm256_storeu_ps(f + 8, a.hi);
}
static inline void mm512_storeu_si512(void* p, m512i a) {
  __m256i* v = static_cast<__m256i*>(p);
  _mm256_storeu_si256(v, a.lo), _mm256_storeu_si256(v + 1, a.hi);
}
// 8 fp32 lanes under an 8-bit mask: a full or empty mask needs no masked instruction (AMD's VMASKMOVPS store is
// microcoded, tens of cycles), so only a row's partial tail pays for one.
static inline __m256 masked_load8(const float* f, uint32_t k) {
  if (k == 0xFF) return _mm256_loadu_ps(f);
  return k ? _mm256_maskload_ps(f, lanes8(k)) : _mm256_setzero_ps();
}
static inline void masked_store8(float* f, uint32_t k, __m256 a) {
  if (k == 0xFF) _mm256_storeu_ps(f, a);
  else if (k) _mm256_maskstore_ps(f, lanes8(k), a);
}
static inline m512 mm512_maskz_loadu_ps(__mmask16 k, const void* p) {
  const float* f = static_cast<const float*>(p);
  return {masked_load8(f, k & 0xFF), masked_load8(f + 8, k >> 8)};
}
static inline __m128 mm_maskz_loadu_ps(__mmask8 k, const void* p) {
  if ((k & 0xF) == 0xF) return _mm_loadu_ps(static_cast<const float*>(p));
  return _mm_maskload_ps(static_cast<const float*>(p), _mm256_castsi256_si128(lanes8(k & 0xF)));
}
static inline void mm512_mask_storeu_ps(void* p, __mmask16 k, m512 a) {
  float* f = static_cast<float*>(p);
  masked_store8(f, k & 0xFF, a.lo), masked_store8(f + 8, k >> 8, a.hi);
}
static inline m512i mm512_maskz_loadu_epi8(__mmask64 k, const void* p) {
  if (k == ~0ULL) return mm512_loadu_si512(p);
  alignas(32) int8_t b[64] = {};
  copy_masked<int8_t, 64>(b, static_cast<const int8_t*>(p), k);
  return mm512_load_si512(b);
}
static inline __m256i mm256_maskz_loadu_epi16(__mmask16 k, const void* p) {
  if (k == 0xFFFF) return _mm256_loadu_si256(static_cast<const __m256i*>(p));
  alignas(32) int16_t b[16] = {};
  copy_masked<int16_t, 16>(b, static_cast<const int16_t*>(p), k);
  return _mm256_load_si256(reinterpret_cast<const __m256i*>(b));
}
static inline void mm256_mask_storeu_epi16(void* p, __mmask16 k, __m256i a) {
  if (k == 0xFFFF) return _mm256_storeu_si256(static_cast<__m256i*>(p), a);
  alignas(32) int16_t b[16];
  _mm256_store_si256(reinterpret_cast<__m256i*>(b), a);
  copy_masked<int16_t, 16>(static_cast<int16_t*>(p), b, k);
}
static inline m512 mm512_set1_ps(float a) { return {_mm256_set1_ps(a), _mm256_set1_ps(a)}; }
static inline m512 mm512_setzero_ps() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
static inline m512i mm512_set1_epi8(char a) { return {_mm256_set1_epi8(a), _mm256_set1_epi8(a)}; }
static inline m512i mm512_set1_epi16(short a) { return {_mm256_set1_epi16(a), _mm256_set1_epi16(a)}; }
static inline m512i mm512_set1_epi32(int a) { return {_mm256_set1_epi32(a), _mm256_set1_epi32(a)}; }
static inline m512i mm512_setzero_si512() { return {_mm256_setzero_si256(), _mm256_setzero_si256()}; }
static inline m512i mm512_setr_epi32(int e0, int e1, int e2, int e3, int e4, int e5, int e6, int e7, int e8, int e9,
                                     int e10, int e11, int e12, int e13, int e14, int e15) {
  return {_mm256_setr_epi32(e0, e1, e2, e3, e4, e5, e6, e7), _mm256_setr_epi32(e8, e9, e10, e11, e12, e13, e14, e15)};
}
static inline m512i mm512_castps_si512(m512 a) { return {_mm256_castps_si256(a.lo), _mm256_castps_si256(a.hi)}; }
static inline m512 mm512_castsi512_ps(m512i a) { return {_mm256_castsi256_ps(a.lo), _mm256_castsi256_ps(a.hi)}; }
static inline __m256i mm512_castsi512_si256(m512i a) { return a.lo; }
// The upper bits of a widening cast are undefined; here zero.
static inline m512i mm512_castsi256_si512(__m256i a) { return {a, _mm256_setzero_si256()}; }
static inline m512 mm512_castps128_ps512(__m128 a) { return {_mm256_castps128_ps256(a), _mm256_setzero_ps()}; }
template <int imm>  // a with its 256-bit half imm replaced by b
static inline m512i mm512_inserti64x4(m512i a, __m256i b) { return imm & 1 ? m512i{a.lo, b} : m512i{b, a.hi}; }

// Lane-wise arithmetic, logic and shifts: each half on its own.
#define ON_AVX2_LANEWISE(name, T, op)                                     \
  static inline T name(T a, T b) { return {op(a.lo, b.lo), op(a.hi, b.hi)}; }
ON_AVX2_LANEWISE(mm512_add_ps, m512, _mm256_add_ps)
ON_AVX2_LANEWISE(mm512_sub_ps, m512, _mm256_sub_ps)
ON_AVX2_LANEWISE(mm512_mul_ps, m512, _mm256_mul_ps)
ON_AVX2_LANEWISE(mm512_div_ps, m512, _mm256_div_ps)
ON_AVX2_LANEWISE(mm512_max_ps, m512, _mm256_max_ps)
ON_AVX2_LANEWISE(mm512_min_ps, m512, _mm256_min_ps)
ON_AVX2_LANEWISE(mm512_add_epi16, m512i, _mm256_add_epi16)
ON_AVX2_LANEWISE(mm512_add_epi32, m512i, _mm256_add_epi32)
ON_AVX2_LANEWISE(mm512_and_si512, m512i, _mm256_and_si256)
ON_AVX2_LANEWISE(mm512_or_si512, m512i, _mm256_or_si256)
ON_AVX2_LANEWISE(mm512_madd_epi16, m512i, _mm256_madd_epi16)
ON_AVX2_LANEWISE(mm512_maddubs_epi16, m512i, _mm256_maddubs_epi16)
ON_AVX2_LANEWISE(mm512_unpacklo_epi32, m512i, _mm256_unpacklo_epi32)  // (within 128-bit lanes, as AVX-512's)
ON_AVX2_LANEWISE(mm512_unpackhi_epi32, m512i, _mm256_unpackhi_epi32)
ON_AVX2_LANEWISE(mm512_unpacklo_epi64, m512i, _mm256_unpacklo_epi64)
ON_AVX2_LANEWISE(mm512_unpackhi_epi64, m512i, _mm256_unpackhi_epi64)
#undef ON_AVX2_LANEWISE
static inline m512 mm512_fmadd_ps(m512 a, m512 b, m512 c) {  // a * b + c, one rounding
  return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
}
static inline m512 mm512_fnmadd_ps(m512 a, m512 b, m512 c) {  // -(a * b) + c, one rounding
  return {_mm256_fnmadd_ps(a.lo, b.lo, c.lo), _mm256_fnmadd_ps(a.hi, b.hi, c.hi)};
}
static inline m512 mm512_abs_ps(m512 a) {
  const __m256 m = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  return {_mm256_and_ps(a.lo, m), _mm256_and_ps(a.hi, m)};
}
static inline m512i mm512_abs_epi8(m512i a) { return {_mm256_abs_epi8(a.lo), _mm256_abs_epi8(a.hi)}; }
static inline m512i mm512_slli_epi32(m512i a, unsigned n) {
  return {_mm256_slli_epi32(a.lo, n), _mm256_slli_epi32(a.hi, n)};
}
static inline m512i mm512_srli_epi32(m512i a, unsigned n) {
  return {_mm256_srli_epi32(a.lo, n), _mm256_srli_epi32(a.hi, n)};
}
static inline m512i mm512_srli_epi16(m512i a, unsigned n) {
  return {_mm256_srli_epi16(a.lo, n), _mm256_srli_epi16(a.hi, n)};
}
template <int imm>  // to an integer, imm's rounding (round_ps's low 4 bits; no scaling: imm < 16)
static inline m512 mm512_roundscale_ps(m512 a) {
  static_assert(imm >= 0 && imm < 16, "roundscale with a scale is not emulated");
  return {_mm256_round_ps(a.lo, imm), _mm256_round_ps(a.hi, imm)};
}
// a * 2^floor(b), rounded once as VSCALEFPS rounds it: through double, where a * 2^k is exact for every finite
// fp32 a and |k| <= 400 (past which the fp32 result is 0 or inf anyway); cvtpd_ps is the one rounding.
static inline __m256 scalef8(__m256 a, __m256 b) {
  const __m256 k = _mm256_min_ps(_mm256_max_ps(_mm256_floor_ps(b), _mm256_set1_ps(-400.0f)), _mm256_set1_ps(400.0f));
  const __m256i ki = _mm256_cvtps_epi32(k);
  const auto four = [](__m128 a4, __m128i k4) {
    const __m256i e = _mm256_slli_epi64(_mm256_add_epi64(_mm256_cvtepi32_epi64(k4), _mm256_set1_epi64x(1023)), 52);
    return _mm256_cvtpd_ps(_mm256_mul_pd(_mm256_cvtps_pd(a4), _mm256_castsi256_pd(e)));
  };
  return _mm256_set_m128(four(_mm256_extractf128_ps(a, 1), _mm256_extracti128_si256(ki, 1)),
                         four(_mm256_castps256_ps128(a), _mm256_castsi256_si128(ki)));
}
static inline m512 mm512_scalef_ps(m512 a, m512 b) { return {scalef8(a.lo, b.lo), scalef8(a.hi, b.hi)}; }

// Masked lane selects and the byte subtract: the mask's bits as lanes.
static inline m512 mm512_mask_blend_ps(__mmask16 k, m512 a, m512 b) {  // b where k, else a
  return {_mm256_blendv_ps(a.lo, b.lo, _mm256_castsi256_ps(lanes8(k & 0xFF))),
          _mm256_blendv_ps(a.hi, b.hi, _mm256_castsi256_ps(lanes8(k >> 8)))};
}
static inline m512 mm512_mask_mov_ps(m512 src, __mmask16 k, m512 a) { return mm512_mask_blend_ps(k, src, a); }
static inline __mmask16 mm512_cmplt_epi32_mask(m512i a, m512i b) {
  return static_cast<__mmask16>(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(b.lo, a.lo))) |
                                _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(b.hi, a.hi))) << 8);
}

// Conversions. Widening: each half from its 8 source elements. Narrowing: truncation (VPMOVDW, VPMOVDB).
static inline m512 mm512_cvtepi32_ps(m512i a) { return {_mm256_cvtepi32_ps(a.lo), _mm256_cvtepi32_ps(a.hi)}; }
static inline m512i mm512_cvtps_epi32(m512 a) { return {_mm256_cvtps_epi32(a.lo), _mm256_cvtps_epi32(a.hi)}; }
static inline m512i mm512_cvtepi8_epi32(__m128i a) {
  return {_mm256_cvtepi8_epi32(a), _mm256_cvtepi8_epi32(_mm_srli_si128(a, 8))};
}
static inline m512i mm512_cvtepu8_epi32(__m128i a) {
  return {_mm256_cvtepu8_epi32(a), _mm256_cvtepu8_epi32(_mm_srli_si128(a, 8))};
}
static inline m512i mm512_cvtepu16_epi32(__m256i a) {
  return {_mm256_cvtepu16_epi32(_mm256_castsi256_si128(a)), _mm256_cvtepu16_epi32(_mm256_extracti128_si256(a, 1))};
}
static inline __m256i mm512_cvtepi32_epi16(m512i a) {  // low 16 bits of each: pack (exact once masked), reorder
  const __m256i low = _mm256_set1_epi32(0xFFFF);
  const __m256i p = _mm256_packus_epi32(_mm256_and_si256(a.lo, low), _mm256_and_si256(a.hi, low));
  return _mm256_permute4x64_epi64(p, 0xD8);  // 0-3, 8-11, 4-7, 12-15 -> 0-15
}
static inline __m128i mm512_cvtepi32_epi8(m512i a) {  // low byte of each: 4 per 128-bit lane, then gathered
  const __m256i pick = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                        0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
  const __m256i join = _mm256_setr_epi32(0, 4, 0, 0, 0, 0, 0, 0);
  const __m256i lo = _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(a.lo, pick), join);
  const __m256i hi = _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(a.hi, pick), join);
  return _mm_unpacklo_epi64(_mm256_castsi256_si128(lo), _mm256_castsi256_si128(hi));
}

// Permutes across the halves: lane i = a[idx[i] % 16]; 128-bit lanes a[imm 0-1], a[imm 2-3], b[imm 4-5], b[imm 6-7].
static inline __m256 permute8(__m256i idx, m512 a) {
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(a.lo, idx), _mm256_permutevar8x32_ps(a.hi, idx),
                          _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));  // bit 3: from the upper half
}
static inline m512 mm512_permutexvar_ps(m512i idx, m512 a) { return {permute8(idx.lo, a), permute8(idx.hi, a)}; }
template <int i, int j>  // 128-bit lane i of a, then lane j of a (lanes 0-3)
static inline __m256i lanes_of(m512i a) {
  return _mm256_permute2x128_si256(i < 2 ? a.lo : a.hi, j < 2 ? a.lo : a.hi, (i & 1) | (2 + (j & 1)) << 4);
}
template <int imm>
static inline m512i mm512_shuffle_i32x4(m512i a, m512i b) {
  return {lanes_of<(imm & 3), (imm >> 2 & 3)>(a), lanes_of<(imm >> 4 & 3), (imm >> 6 & 3)>(b)};
}

// Reductions, in avx512fintrin.h's order: the halves, then the 128-bit lanes, then pairs 2 apart, then 1 apart.
static inline float mm512_reduce_add_ps(m512 a) {
  const __m256 t3 = _mm256_add_ps(a.hi, a.lo);
  const __m128 t6 = _mm_add_ps(_mm256_extractf128_ps(t3, 1), _mm256_castps256_ps128(t3));
  const __m128 t8 = _mm_add_ps(t6, _mm_shuffle_ps(t6, t6, _MM_SHUFFLE(1, 0, 3, 2)));
  return _mm_cvtss_f32(t8) + _mm_cvtss_f32(_mm_shuffle_ps(t8, t8, 1));
}
static inline float mm512_reduce_max_ps(m512 a) {  // (operand order kept: max_ps's NaN and -0 rules depend on it)
  const __m256 t3 = _mm256_max_ps(a.hi, a.lo);
  const __m128 t6 = _mm_max_ps(_mm256_extractf128_ps(t3, 1), _mm256_castps256_ps128(t3));
  const __m128 t8 = _mm_max_ps(t6, _mm_shuffle_ps(t6, t6, _MM_SHUFFLE(1, 0, 3, 2)));
  return _mm_cvtss_f32(_mm_max_ps(t8, _mm_shuffle_ps(t8, t8, _MM_SHUFFLE(0, 1, 0, 1))));
}
static inline int mm512_reduce_add_epi32(m512i a) {
  const __m256i t3 = _mm256_add_epi32(a.hi, a.lo);
  const __m128i t6 = _mm_add_epi32(_mm256_extracti128_si256(t3, 1), _mm256_castsi256_si128(t3));
  const __m128i t8 = _mm_add_epi32(t6, _mm_shuffle_epi32(t6, _MM_SHUFFLE(1, 0, 3, 2)));
  return _mm_cvtsi128_si32(t8) + _mm_extract_epi32(t8, 1);
}

}  // namespace on_avx2

// The kernels' names for them.
#define __m512 on_avx2::m512
#define __m512i on_avx2::m512i
#define _mm512_loadu_ps on_avx2::mm512_loadu_ps
#define _mm512_loadu_si512 on_avx2::mm512_loadu_si512
#define _mm512_load_si512 on_avx2::mm512_load_si512
#define _mm512_storeu_ps on_avx2::mm512_storeu_ps
#define _mm512_storeu_si512 on_avx2::mm512_storeu_si512
#define _mm512_maskz_loadu_ps on_avx2::mm512_maskz_loadu_ps
#define _mm_maskz_loadu_ps on_avx2::mm_maskz_loadu_ps
#define _mm512_mask_storeu_ps on_avx2::mm512_mask_storeu_ps
#define _mm512_maskz_loadu_epi8 on_avx2::mm512_maskz_loadu_epi8
#define _mm256_maskz_loadu_epi16 on_avx2::mm256_maskz_loadu_epi16
#define _mm256_mask_storeu_epi16 on_avx2::mm256_mask_storeu_epi16
#define _mm512_set1_ps on_avx2::mm512_set1_ps
#define _mm512_setzero_ps on_avx2::mm512_setzero_ps
#define _mm512_set1_epi8 on_avx2::mm512_set1_epi8
#define _mm512_set1_epi16 on_avx2::mm512_set1_epi16
#define _mm512_set1_epi32 on_avx2::mm512_set1_epi32
#define _mm512_setzero_si512 on_avx2::mm512_setzero_si512
#undef _mm512_setr_epi32  // (a macro in avx512fintrin.h)
#define _mm512_setr_epi32 on_avx2::mm512_setr_epi32
#define _mm512_castps_si512 on_avx2::mm512_castps_si512
#define _mm512_castsi512_ps on_avx2::mm512_castsi512_ps
#define _mm512_castsi512_si256 on_avx2::mm512_castsi512_si256
#define _mm512_castsi256_si512 on_avx2::mm512_castsi256_si512
#define _mm512_castps128_ps512 on_avx2::mm512_castps128_ps512
#define _mm512_inserti64x4(a, b, imm) on_avx2::mm512_inserti64x4<(imm)>(a, b)
#define _mm512_add_ps on_avx2::mm512_add_ps
#define _mm512_sub_ps on_avx2::mm512_sub_ps
#define _mm512_mul_ps on_avx2::mm512_mul_ps
#define _mm512_div_ps on_avx2::mm512_div_ps
#define _mm512_max_ps on_avx2::mm512_max_ps
#define _mm512_min_ps on_avx2::mm512_min_ps
#define _mm512_add_epi32 on_avx2::mm512_add_epi32
#define _mm512_and_si512 on_avx2::mm512_and_si512
#define _mm512_or_si512 on_avx2::mm512_or_si512
#define _mm512_madd_epi16 on_avx2::mm512_madd_epi16
#define _mm512_add_epi16 on_avx2::mm512_add_epi16
#define _mm512_maddubs_epi16 on_avx2::mm512_maddubs_epi16
#define _mm512_unpacklo_epi32 on_avx2::mm512_unpacklo_epi32
#define _mm512_unpackhi_epi32 on_avx2::mm512_unpackhi_epi32
#define _mm512_unpacklo_epi64 on_avx2::mm512_unpacklo_epi64
#define _mm512_unpackhi_epi64 on_avx2::mm512_unpackhi_epi64
#define _mm512_fmadd_ps on_avx2::mm512_fmadd_ps
#define _mm512_fnmadd_ps on_avx2::mm512_fnmadd_ps
#define _mm512_abs_ps on_avx2::mm512_abs_ps
#define _mm512_abs_epi8 on_avx2::mm512_abs_epi8
#define _mm512_slli_epi32 on_avx2::mm512_slli_epi32
#define _mm512_srli_epi32 on_avx2::mm512_srli_epi32
#define _mm512_srli_epi16 on_avx2::mm512_srli_epi16
#define _mm512_roundscale_ps(a, imm) on_avx2::mm512_roundscale_ps<(imm)>(a)
#define _mm512_scalef_ps on_avx2::mm512_scalef_ps
#define _mm512_mask_blend_ps on_avx2::mm512_mask_blend_ps
#define _mm512_mask_mov_ps on_avx2::mm512_mask_mov_ps
#define _mm512_cmplt_epi32_mask on_avx2::mm512_cmplt_epi32_mask
#define _mm512_cvtepi32_ps on_avx2::mm512_cvtepi32_ps
#define _mm512_cvtps_epi32 on_avx2::mm512_cvtps_epi32
#define _mm512_cvtepi8_epi32 on_avx2::mm512_cvtepi8_epi32
#define _mm512_cvtepu8_epi32 on_avx2::mm512_cvtepu8_epi32
#define _mm512_cvtepu16_epi32 on_avx2::mm512_cvtepu16_epi32
#define _mm512_cvtepi32_epi16 on_avx2::mm512_cvtepi32_epi16
#define _mm512_cvtepi32_epi8 on_avx2::mm512_cvtepi32_epi8
#define _mm512_permutexvar_ps on_avx2::mm512_permutexvar_ps
#define _mm512_shuffle_i32x4(a, b, imm) on_avx2::mm512_shuffle_i32x4<(imm)>(a, b)
#define _mm512_reduce_add_ps on_avx2::mm512_reduce_add_ps
#define _mm512_reduce_max_ps on_avx2::mm512_reduce_max_ps
#define _mm512_reduce_add_epi32 on_avx2::mm512_reduce_add_epi32
#endif  // !__AVX512F__
#endif  // LONGCAT_AVX512_ON_AVX2_H
