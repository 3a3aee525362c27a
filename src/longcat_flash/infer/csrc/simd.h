// What the kernels here share: headers, loads and stores of 16 values with a tail mask, exp and SwiGLU (the MoE op
// and the MLPs'), the integer dot product, software prefetch, the row-count dispatch and the unrolling hint. Passed
// to the compiler ahead of the .cpp files (extension.py), which also include it, so that each file reads on its own.
#ifndef LONGCAT_SIMD_H
#define LONGCAT_SIMD_H
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include "avx512_on_avx2.h"  // AVX2 + FMA CPUs: the AVX-512 intrinsics below on pairs of AVX2 vectors

#include <type_traits>

// Ask for the weight bytes PREFETCH ahead of what a row reads now: the hardware prefetcher alone left the int4
// kernel at 6.1 GB/s on one core, software prefetch of both rows of a pair 4 KB ahead at 8.9 (1 KB: 6.6,
// 8 KB: 8.8; one row only: 8.6).
constexpr int64_t PREFETCH = 4096;
static inline void prefetch(const void* p) {
  _mm_prefetch(static_cast<const char*>(p) + PREFETCH, _MM_HINT_T0);
}

// Weight rows read per pass of a kernel over M rows of x. One row is one sequential stream: at batch 1, reading two
// rows side by side (two streams 2-8 KB apart) left a bf16 GEMV at 10.7 GB/s on one Zen 4 core, one row at a time
// at 21 (a plain sum: 24.5); over 2-4 rows of x, one row at a time still read 1.1-1.5x faster (two cores, every
// format). From 8 rows of x on, a pair of weight rows sharing every load of x is as fast or faster (int8: 1.15x).
constexpr int rows_per_pass(int M) { return M <= 4 ? 1 : 2; }

// Before a loop over a pass's rows or over the rows of x (compile-time counts): in the AVX2 build, unrolled in full
// so that its accumulators stay in registers. GCC left these loops rolled there (each AVX-512 op is two or more AVX2
// ones): on a 2-core AVX2 EPYC, fp32 weights over 2-4 rows of x read 1.4-1.5x faster unrolled, 8 rows 1.15x; int8
// and int4 1.0-1.2x; one row unchanged. The AVX-512 build, measured without it, is left as is.
#ifdef __AVX512F__
#define UNROLL
#else
#define UNROLL _Pragma("GCC unroll 16")
#endif

// The P weight rows of a pass from row o (of w, rows of I values): their first values r and indices at; past o1
// (a lone last row) the pass repeats row o1 - 1.
template <int P, typename W>
struct Pass {
  const W* r[P];
  int64_t at[P];
  Pass(const W* w, int64_t o, int64_t o1, int64_t I) {
    UNROLL for (int j = 0; j < P; ++j) at[j] = std::min(o + j, o1 - 1), r[j] = w + at[j] * I;
  }
};

// Every accumulator of a pass, a[j][m] for weight row j and row m of x, set to zero.
template <int P, int M>
static inline void zero(__m512 (&a)[P][M]) {
  UNROLL for (int j = 0; j < P; ++j)
    UNROLL for (int m = 0; m < M; ++m) a[j][m] = _mm512_setzero_ps();
}
template <int P, int M>
static inline void zero(__m512i (&a)[P][M]) {
  UNROLL for (int j = 0; j < P; ++j)
    UNROLL for (int m = 0; m < M; ++m) a[j][m] = _mm512_setzero_si512();
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

// v rounded to X's precision (bf16: to the nearest, ties to even; fp32: v itself), kept in fp32.
template <typename X>
static inline __m512 round_to(__m512 v) {
  if constexpr (std::is_same<X, at::BFloat16>::value) return round_bf16(v);
  else return v;
}

// f(X()) with X the C++ type of t's dtype: float or at::BFloat16, the two every kernel here takes.
template <typename F>
static inline void with_dtype(const torch::Tensor& t, const char* op, F&& f) {
  if (t.scalar_type() == torch::kBFloat16) f(at::BFloat16());
  else if (t.scalar_type() == torch::kFloat) f(0.0f);
  else TORCH_CHECK(false, op, ": inputs must be float32 or bfloat16");
}

// Up to 16 values (mask n) of v to a row; for bf16, v already holds a bf16 value (round_to).
static inline void store_row(float* p, __m512 v, __mmask16 n) { _mm512_mask_storeu_ps(p, n, v); }
static inline void store_row(at::BFloat16* p, __m512 v, __mmask16 n) {
  _mm256_mask_storeu_epi16(p, n, _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(v), 16)));
}

// e^x on 16 lanes within ~2 fp32 ulp (Cephes' expf): x = n ln2 + r, e^r by a degree-6 polynomial, times 2^n.
// x is clamped to [-104, 100], past which e^x is 0 or inf in fp32 anyway (and r stays small).
static inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(100.0f)), _mm512_set1_ps(-104.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  for (const float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// Rows h (R, 2F) = [gate | up] -> a (R, F): silu(gate) * up, each op rounded to X as torch's two ops round them.
template <typename X>
static void swiglu_rows(const X* h, int64_t R, int64_t F, X* a) {
  at::parallel_for(0, R, std::max<int64_t>(1, 16384 / std::max<int64_t>(F, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t f = 0; f < F; f += 16) {
        const __mmask16 n = tail16(F - f);
        const __m512 g = x16(h + r * 2 * F + f, n);
        __m512 s = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
        s = _mm512_mul_ps(round_to<X>(s), x16(h + r * 2 * F + F + f, n));
        store_row(a + r * F + f, round_to<X>(s), n);
      }
  });
}

// a in lanes 0-7, b in lanes 8-15.
static inline __m512 halves(float a, float b) {
#ifdef __AVX512F__
  return _mm512_mask_mov_ps(_mm512_set1_ps(a), 0xFF00, _mm512_set1_ps(b));
#else  // the two AVX2 halves themselves, no blend
  return {_mm256_set1_ps(a), _mm256_set1_ps(b)};
#endif
}

// x (s8) with w's signs (-x where w < 0): with |w| (u8), the operands of dot4 for the product of two s8 vectors.
static inline __m512i signed_by(__m512i x, __m512i w) {
#ifdef __AVX512F__
  return _mm512_mask_sub_epi8(x, _mm512_movepi8_mask(w), _mm512_setzero_si512(), x);
#else  // VPSIGNB: also 0 where w is 0, whose product is 0 anyway
  return {_mm256_sign_epi8(x.lo, w.lo), _mm256_sign_epi8(x.hi, w.hi)};
#endif
}

// acc + the sums of 4 adjacent u8 * s8 byte products, per int32 lane.
static inline __m512i dot4(__m512i acc, __m512i u, __m512i s) {
#ifdef __AVX512VNNI__
  return _mm512_dpbusd_epi32(acc, u, s);
#else  // u8 x s8 pairs to int16 (int4 codes, or |int8| <= 127, times |x| <= 127: no saturation), then to int32
  return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(u, s), _mm512_set1_epi16(1)));
#endif
}

// One 128-value chunk of int4 codes (lo, hi: u8 <= 15) against int8 x (xl, xh): per int32 lane, the sums of 4
// adjacent products of lo and xl plus 4 of hi and xh. Without VNNI the two int16 pair sums are added before the
// widening (exact: 4 * 15 * 127 < 2^15), one widening instead of two.
static inline __m512i nibble_dot(__m512i lo, __m512i xl, __m512i hi, __m512i xh) {
#ifdef __AVX512VNNI__
  return dot4(dot4(_mm512_setzero_si512(), lo, xl), hi, xh);
#else
  const __m512i pairs = _mm512_add_epi16(_mm512_maddubs_epi16(lo, xl), _mm512_maddubs_epi16(hi, xh));
  return _mm512_madd_epi16(pairs, _mm512_set1_epi16(1));
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
