// src/longcat_flash/infer/csrc/avx512_on_avx2.h against scalar references written from Intel's pseudo-code of each
// instruction (tests/test_infer_avx512_on_avx2.py builds it with -mavx2 and runs it): random and special values
// (NaN, infinities, subnormals), every mask; masked loads and stores next to an unreadable page. Argument: the
// number of random rounds. Prints the count of checks and failures (the first 30 by name); exits 1 on a failure.
#include <immintrin.h>
#include "avx512_on_avx2.h"
#include <sys/mman.h>
#include <unistd.h>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <cstdint>
#include <cstdlib>
#include <climits>
#include <algorithm>
#include <random>

static std::mt19937_64 rng(42);
static long fails = 0, checks = 0;
#define CHECK(cond, ...) do { ++checks; if (!(cond)) { if (fails++ < 30) { printf(__VA_ARGS__); printf("\n"); } } } while (0)

static uint32_t fbits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static float bitsf(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static bool same(float a, float b) { return fbits(a) == fbits(b) || (std::isnan(a) && std::isnan(b)); }
static float rfloat() {
  switch (rng() % 8) {
    case 0: { float s[] = {0.f, -0.f, INFINITY, -INFINITY, NAN, 1e-45f, -1e-45f, 1.17549435e-38f, 3.4e38f, -3.4e38f, 1.f, -1.f, 0.5f, 2.5f, -2.5f, 3.5f};
              return s[rng() % 16]; }
    case 1: return bitsf(static_cast<uint32_t>(rng()));  // any bits
    case 2: return bitsf(static_cast<uint32_t>(rng()) & 0x807FFFFF);  // subnormals
    default: return std::ldexp(static_cast<float>(static_cast<int32_t>(rng())) / 2147483648.0f, static_cast<int>(rng() % 60) - 30);
  }
}
struct V { float f[16]; };
static __m512 ld(const float* p) { return _mm512_loadu_ps(p); }
static void st(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
static void sti(void* p, __m512i v) { _mm512_storeu_si512(p, v); }

static float maxps(float a, float b) { return a > b ? a : b; }
static float minps(float a, float b) { return a < b ? a : b; }
static int32_t cvtps(float x) {
  if (std::isnan(x) || x >= 2147483648.0f || x < -2147483648.0f) return INT32_MIN;
  return static_cast<int32_t>(std::nearbyint(x));
}

int main(int argc, char** argv) {
  const int rounds = argc > 1 ? atoi(argv[1]) : 200000;
  for (int iter = 0; iter < rounds; ++iter) {
    float a[16], b[16], c[16], r[16];
    for (int i = 0; i < 16; ++i) a[i] = rfloat(), b[i] = rfloat(), c[i] = rfloat();
    int32_t ia[16], ib[16], ir[16];
    for (int i = 0; i < 16; ++i) ia[i] = static_cast<int32_t>(rng()), ib[i] = static_cast<int32_t>(rng());
    if (iter % 3 == 0) for (int i = 0; i < 16; ++i) ia[i] = static_cast<int32_t>(rng() % 64) - 32;
    const __mmask16 k = static_cast<__mmask16>(rng());
    // float lane-wise
    st(r, _mm512_add_ps(ld(a), ld(b))); for (int i = 0; i < 16; ++i) CHECK(same(r[i], a[i] + b[i]), "add %d", i);
    st(r, _mm512_sub_ps(ld(a), ld(b))); for (int i = 0; i < 16; ++i) CHECK(same(r[i], a[i] - b[i]), "sub");
    st(r, _mm512_mul_ps(ld(a), ld(b))); for (int i = 0; i < 16; ++i) CHECK(same(r[i], a[i] * b[i]), "mul");
    st(r, _mm512_div_ps(ld(a), ld(b))); for (int i = 0; i < 16; ++i) CHECK(same(r[i], a[i] / b[i]), "div");
    st(r, _mm512_max_ps(ld(a), ld(b))); for (int i = 0; i < 16; ++i) CHECK(fbits(r[i]) == fbits(maxps(a[i], b[i])), "max");
    st(r, _mm512_min_ps(ld(a), ld(b))); for (int i = 0; i < 16; ++i) CHECK(fbits(r[i]) == fbits(minps(a[i], b[i])), "min");
    st(r, _mm512_fmadd_ps(ld(a), ld(b), ld(c))); for (int i = 0; i < 16; ++i) CHECK(same(r[i], std::fma(a[i], b[i], c[i])), "fmadd");
    st(r, _mm512_fnmadd_ps(ld(a), ld(b), ld(c))); for (int i = 0; i < 16; ++i) CHECK(same(r[i], std::fma(-a[i], b[i], c[i])), "fnmadd");
    st(r, _mm512_abs_ps(ld(a))); for (int i = 0; i < 16; ++i) CHECK(fbits(r[i]) == (fbits(a[i]) & 0x7FFFFFFF), "abs_ps");
    st(r, _mm512_roundscale_ps(ld(a), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    for (int i = 0; i < 16; ++i) CHECK(same(r[i], std::nearbyint(a[i])), "roundscale %g -> %g", a[i], r[i]);
    {  // scalef: finite b (the kernels' n), any a
      float bb[16];
      for (int i = 0; i < 16; ++i) bb[i] = iter % 2 ? std::nearbyint(static_cast<float>(static_cast<int>(rng() % 700) - 350) + (rng() % 4) * 0.25f) : b[i];
      st(r, _mm512_scalef_ps(ld(a), ld(bb)));
      for (int i = 0; i < 16; ++i) {
        if (!std::isfinite(bb[i]) || std::isnan(a[i]) || std::isinf(a[i])) continue;
        const double fl = std::floor(static_cast<double>(bb[i]));
        const int kk = fl > 1000 ? 1000 : fl < -1000 ? -1000 : static_cast<int>(fl);
        CHECK(same(r[i], std::ldexp(a[i], kk)), "scalef %a * 2^%g -> %a want %a", a[i], bb[i], r[i], std::ldexp(a[i], kk));
      }
    }
    // reductions (GCC's order)
    {
      float t3[8], t6[4], t8[4];
      for (int i = 0; i < 8; ++i) t3[i] = a[8 + i] + a[i];
      for (int i = 0; i < 4; ++i) t6[i] = t3[4 + i] + t3[i];
      for (int i = 0; i < 4; ++i) t8[i] = t6[i] + t6[(i + 2) % 4];
      CHECK(same(_mm512_reduce_add_ps(ld(a)), t8[0] + t8[1]), "reduce_add_ps");
      for (int i = 0; i < 8; ++i) t3[i] = maxps(a[8 + i], a[i]);
      for (int i = 0; i < 4; ++i) t6[i] = maxps(t3[4 + i], t3[i]);
      for (int i = 0; i < 4; ++i) t8[i] = maxps(t6[i], t6[(i + 2) % 4]);
      CHECK(fbits(_mm512_reduce_max_ps(ld(a))) == fbits(maxps(t8[0], t8[1])), "reduce_max_ps");
      uint32_t s = 0;
      for (int i = 0; i < 16; ++i) s += static_cast<uint32_t>(ia[i]);
      CHECK(_mm512_reduce_add_epi32(_mm512_loadu_si512(ia)) == static_cast<int32_t>(s), "reduce_add_epi32");
    }
    // masks
    st(r, _mm512_mask_blend_ps(k, ld(a), ld(b))); for (int i = 0; i < 16; ++i) CHECK(fbits(r[i]) == fbits(k >> i & 1 ? b[i] : a[i]), "blend");
    st(r, _mm512_mask_mov_ps(ld(a), k, ld(b))); for (int i = 0; i < 16; ++i) CHECK(fbits(r[i]) == fbits(k >> i & 1 ? b[i] : a[i]), "mask_mov");
    {
      __mmask16 m = _mm512_cmplt_epi32_mask(_mm512_loadu_si512(ia), _mm512_loadu_si512(ib)), want = 0;
      for (int i = 0; i < 16; ++i) want |= (ia[i] < ib[i]) << i;
      CHECK(m == want, "cmplt");
      int8_t x8[64], y8[64], o8[64];
      for (int i = 0; i < 64; ++i) x8[i] = rng(), y8[i] = rng();
      sti(o8, _mm512_abs_epi8(_mm512_loadu_si512(x8)));
      for (int i = 0; i < 64; ++i) CHECK(o8[i] == (x8[i] == -128 ? -128 : static_cast<int8_t>(std::abs(x8[i]))), "abs_epi8");
      // maddubs (u8 x s8 pairs, saturated to int16), madd (int16 pairs to int32)
      int16_t o16[32];
      sti(o16, _mm512_maddubs_epi16(_mm512_loadu_si512(x8), _mm512_loadu_si512(y8)));
      for (int i = 0; i < 32; ++i) {
        int v = static_cast<uint8_t>(x8[2 * i]) * y8[2 * i] + static_cast<uint8_t>(x8[2 * i + 1]) * y8[2 * i + 1];
        CHECK(o16[i] == std::max(-32768, std::min(32767, v)), "maddubs");
      }
      int16_t p16[32], q16[32];
      memcpy(p16, x8, 64), memcpy(q16, y8, 64);
      sti(ir, _mm512_madd_epi16(_mm512_loadu_si512(p16), _mm512_loadu_si512(q16)));
      for (int i = 0; i < 16; ++i) CHECK(ir[i] == static_cast<int32_t>(static_cast<uint32_t>(p16[2*i] * q16[2*i]) + static_cast<uint32_t>(p16[2*i+1] * q16[2*i+1])), "madd");
      sti(o16, _mm512_add_epi16(_mm512_loadu_si512(p16), _mm512_loadu_si512(q16)));
      for (int i = 0; i < 32; ++i) CHECK(o16[i] == static_cast<int16_t>(static_cast<uint16_t>(p16[i]) + static_cast<uint16_t>(q16[i])), "add_epi16");
      sti(o16, _mm512_srli_epi16(_mm512_loadu_si512(p16), 4));
      for (int i = 0; i < 32; ++i) CHECK(static_cast<uint16_t>(o16[i]) == static_cast<uint16_t>(p16[i]) >> 4, "srli16");
    }
    // conversions
    st(r, _mm512_cvtepi32_ps(_mm512_loadu_si512(ia))); for (int i = 0; i < 16; ++i) CHECK(same(r[i], static_cast<float>(ia[i])), "cvtepi32_ps");
    sti(ir, _mm512_cvtps_epi32(ld(a))); for (int i = 0; i < 16; ++i) CHECK(ir[i] == cvtps(a[i]), "cvtps_epi32 %g %d", a[i], ir[i]);
    {
      int16_t h[16]; int8_t q[16]; uint8_t u8[16]; uint16_t u16[16];
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(h), _mm512_cvtepi32_epi16(_mm512_loadu_si512(ib)));
      for (int i = 0; i < 16; ++i) CHECK(h[i] == static_cast<int16_t>(ib[i]), "cvtepi32_epi16");
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm512_cvtepi32_epi8(_mm512_loadu_si512(ib)));
      for (int i = 0; i < 16; ++i) CHECK(q[i] == static_cast<int8_t>(ib[i]), "cvtepi32_epi8");
      memcpy(u8, ib, 16), memcpy(u16, ib, 32);
      sti(ir, _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(u8))));
      for (int i = 0; i < 16; ++i) CHECK(ir[i] == static_cast<int8_t>(u8[i]), "cvtepi8");
      sti(ir, _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(u8))));
      for (int i = 0; i < 16; ++i) CHECK(ir[i] == u8[i], "cvtepu8");
      sti(ir, _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(u16))));
      for (int i = 0; i < 16; ++i) CHECK(ir[i] == u16[i], "cvtepu16");
    }
    // shifts, logic, permutes
    {
      const unsigned n = rng() % 33;
      sti(ir, _mm512_slli_epi32(_mm512_loadu_si512(ib), n)); for (int i = 0; i < 16; ++i) CHECK(static_cast<uint32_t>(ir[i]) == (n > 31 ? 0 : static_cast<uint32_t>(ib[i]) << n), "slli");
      sti(ir, _mm512_srli_epi32(_mm512_loadu_si512(ib), n)); for (int i = 0; i < 16; ++i) CHECK(static_cast<uint32_t>(ir[i]) == (n > 31 ? 0 : static_cast<uint32_t>(ib[i]) >> n), "srli");
      sti(ir, _mm512_add_epi32(_mm512_loadu_si512(ia), _mm512_loadu_si512(ib))); for (int i = 0; i < 16; ++i) CHECK(ir[i] == static_cast<int32_t>(static_cast<uint32_t>(ia[i]) + static_cast<uint32_t>(ib[i])), "add_epi32");
      sti(ir, _mm512_and_si512(_mm512_loadu_si512(ia), _mm512_loadu_si512(ib))); for (int i = 0; i < 16; ++i) CHECK(ir[i] == (ia[i] & ib[i]), "and");
      sti(ir, _mm512_or_si512(_mm512_loadu_si512(ia), _mm512_loadu_si512(ib))); for (int i = 0; i < 16; ++i) CHECK(ir[i] == (ia[i] | ib[i]), "or");
      st(r, _mm512_permutexvar_ps(_mm512_loadu_si512(ib), ld(a))); for (int i = 0; i < 16; ++i) CHECK(fbits(r[i]) == fbits(a[ib[i] & 15]), "permutexvar");
      st(r, _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3), _mm512_castps128_ps512(_mm_loadu_ps(a))));
      for (int i = 0; i < 16; ++i) CHECK(fbits(r[i]) == fbits(a[i / 4]), "setr/castps128/permutexvar");
      sti(ir, _mm512_unpacklo_epi32(_mm512_loadu_si512(ia), _mm512_loadu_si512(ib)));
      for (int L = 0; L < 4; ++L) for (int j = 0; j < 2; ++j) CHECK(ir[4*L+2*j] == ia[4*L+j] && ir[4*L+2*j+1] == ib[4*L+j], "unpacklo32");
      sti(ir, _mm512_unpackhi_epi32(_mm512_loadu_si512(ia), _mm512_loadu_si512(ib)));
      for (int L = 0; L < 4; ++L) for (int j = 0; j < 2; ++j) CHECK(ir[4*L+2*j] == ia[4*L+2+j] && ir[4*L+2*j+1] == ib[4*L+2+j], "unpackhi32");
      sti(ir, _mm512_unpacklo_epi64(_mm512_loadu_si512(ia), _mm512_loadu_si512(ib)));
      for (int L = 0; L < 4; ++L) CHECK(ir[4*L] == ia[4*L] && ir[4*L+1] == ia[4*L+1] && ir[4*L+2] == ib[4*L] && ir[4*L+3] == ib[4*L+1], "unpacklo64");
      sti(ir, _mm512_unpackhi_epi64(_mm512_loadu_si512(ia), _mm512_loadu_si512(ib)));
      for (int L = 0; L < 4; ++L) CHECK(ir[4*L] == ia[4*L+2] && ir[4*L+1] == ia[4*L+3] && ir[4*L+2] == ib[4*L+2] && ir[4*L+3] == ib[4*L+3], "unpackhi64");
      auto shuf = [&](int imm, __m512i v) {
        sti(ir, v);
        const int sel[4] = {imm & 3, imm >> 2 & 3, imm >> 4 & 3, imm >> 6 & 3};
        for (int L = 0; L < 4; ++L) for (int j = 0; j < 4; ++j) CHECK(ir[4*L+j] == (L < 2 ? ia : ib)[4*sel[L]+j], "shuffle_i32x4 %x", imm);
      };
      shuf(0x88, _mm512_shuffle_i32x4(_mm512_loadu_si512(ia), _mm512_loadu_si512(ib), 0x88));
      shuf(0xDD, _mm512_shuffle_i32x4(_mm512_loadu_si512(ia), _mm512_loadu_si512(ib), 0xDD));
      shuf(0x1B, _mm512_shuffle_i32x4(_mm512_loadu_si512(ia), _mm512_loadu_si512(ib), 0x1B));
      shuf(0x72, _mm512_shuffle_i32x4(_mm512_loadu_si512(ia), _mm512_loadu_si512(ib), 0x72));
      sti(ir, _mm512_inserti64x4(_mm512_loadu_si512(ia), _mm512_castsi512_si256(_mm512_loadu_si512(ib)), 1));
      for (int i = 0; i < 16; ++i) CHECK(ir[i] == (i < 8 ? ia[i] : ib[i - 8]), "inserti64x4 1");
      sti(ir, _mm512_inserti64x4(_mm512_loadu_si512(ia), _mm512_castsi512_si256(_mm512_loadu_si512(ib)), 0));
      for (int i = 0; i < 16; ++i) CHECK(ir[i] == (i < 8 ? ib[i] : ia[i]), "inserti64x4 0");
      sti(ir, _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(ia))));
      for (int i = 0; i < 8; ++i) CHECK(ir[i] == ia[i], "castsi256_si512");
      sti(ir, _mm512_set1_epi32(ia[0])); for (int i = 0; i < 16; ++i) CHECK(ir[i] == ia[0], "set1_epi32");
      int16_t h[32]; sti(h, _mm512_set1_epi16(static_cast<short>(ib[0]))); for (int i = 0; i < 32; ++i) CHECK(h[i] == static_cast<short>(ib[0]), "set1_epi16");
      int8_t q[64]; sti(q, _mm512_set1_epi8(static_cast<char>(ib[1]))); for (int i = 0; i < 64; ++i) CHECK(q[i] == static_cast<char>(ib[1]), "set1_epi8");
    }
  }
  // Masked loads and stores next to an unreadable page: only the lanes in the mask are touched.
  const long page = sysconf(_SC_PAGESIZE);
  char* mem = static_cast<char*>(mmap(nullptr, 2 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  mprotect(mem + page, page, PROT_NONE);
  char* end = mem + page;
  for (int n = 0; n <= 16; ++n) {
    const __mmask16 k = n >= 16 ? 0xFFFF : (1u << n) - 1;
    float* f = reinterpret_cast<float*>(end) - n;
    for (int i = 0; i < n; ++i) f[i] = i + 1.5f;
    float r[16];
    st(r, _mm512_maskz_loadu_ps(k, f)); for (int i = 0; i < 16; ++i) CHECK(r[i] == (i < n ? i + 1.5f : 0.0f), "maskz_loadu_ps");
    for (int i = 0; i < n; ++i) f[i] = 0;
    _mm512_mask_storeu_ps(f, k, _mm512_set1_ps(7.0f)); for (int i = 0; i < n; ++i) CHECK(f[i] == 7.0f, "mask_storeu_ps");
    uint16_t* h = reinterpret_cast<uint16_t*>(end) - n;
    for (int i = 0; i < n; ++i) h[i] = 1000 + i;
    uint16_t o[16];
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), _mm256_maskz_loadu_epi16(k, h));
    for (int i = 0; i < 16; ++i) CHECK(o[i] == (i < n ? 1000 + i : 0), "maskz_loadu_epi16");
    _mm256_mask_storeu_epi16(h, k, _mm256_set1_epi16(9)); for (int i = 0; i < n; ++i) CHECK(h[i] == 9, "mask_storeu_epi16");
    if (n <= 4) {
      float* g = reinterpret_cast<float*>(end) - n;
      for (int i = 0; i < n; ++i) g[i] = 2.0f + i;
      float r4[4]; _mm_storeu_ps(r4, _mm_maskz_loadu_ps(static_cast<__mmask8>(k & 15), g));
      for (int i = 0; i < 4; ++i) CHECK(r4[i] == (i < n ? 2.0f + i : 0.0f), "_mm_maskz_loadu_ps");
    }
  }
  for (int n = 0; n <= 64; ++n) {
    const __mmask64 k = n >= 64 ? ~0ULL : (1ULL << n) - 1;
    int8_t* p = reinterpret_cast<int8_t*>(end) - n;
    for (int i = 0; i < n; ++i) p[i] = static_cast<int8_t>(i * 3 + 1);
    int8_t o[64];
    sti(o, _mm512_maskz_loadu_epi8(k, p)); for (int i = 0; i < 64; ++i) CHECK(o[i] == (i < n ? static_cast<int8_t>(i * 3 + 1) : 0), "maskz_loadu_epi8");
  }
  // Non-prefix masks on an ordinary buffer.
  for (int iter = 0; iter < 1000; ++iter) {
    const __mmask16 k = static_cast<__mmask16>(rng());
    const __mmask64 k64 = rng();
    float src[16], dst[16], r[16];
    for (int i = 0; i < 16; ++i) src[i] = i + 0.25f, dst[i] = -1.0f;
    st(r, _mm512_maskz_loadu_ps(k, src)); for (int i = 0; i < 16; ++i) CHECK(r[i] == (k >> i & 1 ? src[i] : 0.0f), "maskz_loadu_ps any");
    _mm512_mask_storeu_ps(dst, k, ld(src)); for (int i = 0; i < 16; ++i) CHECK(dst[i] == (k >> i & 1 ? src[i] : -1.0f), "mask_storeu_ps any");
    uint16_t hs[16], hd[16], ho[16];
    for (int i = 0; i < 16; ++i) hs[i] = 500 + i, hd[i] = 7;
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(ho), _mm256_maskz_loadu_epi16(k, hs));
    for (int i = 0; i < 16; ++i) CHECK(ho[i] == (k >> i & 1 ? hs[i] : 0), "maskz_loadu_epi16 any");
    _mm256_mask_storeu_epi16(hd, k, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(hs)));
    for (int i = 0; i < 16; ++i) CHECK(hd[i] == (k >> i & 1 ? hs[i] : 7), "mask_storeu_epi16 any");
    int8_t bs[64], bo[64];
    for (int i = 0; i < 64; ++i) bs[i] = static_cast<int8_t>(i + 1);
    sti(bo, _mm512_maskz_loadu_epi8(k64, bs)); for (int i = 0; i < 64; ++i) CHECK(bo[i] == (k64 >> i & 1 ? bs[i] : 0), "maskz_loadu_epi8 any");
  }
  printf("%ld checks, %ld failures\n", checks, fails);
  return fails != 0;
}
