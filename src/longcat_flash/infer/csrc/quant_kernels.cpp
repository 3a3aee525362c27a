// x @ W^T for quantized W (quant.py's formats) at decode, and a MoE layer's routed experts in one call; Python
// side: kernels.py.
#include "simd.h"
#include "weights.h"
#include "hits.h"

// y[m, o] = sum_k xs[m, k] * w[o, k] for rows o0..o1 of one 128-row block; xs already holds the block's scales.
// rows_per_pass(M) weight rows per pass (a pair shares every load of xs: the loads, not the FMAs, bound this loop
// for M > 1).
template <typename W, int M>
static void block_rows(const float* xs, const W* w, int64_t o0, int64_t o1, int64_t I, int64_t O, float* y) {
  constexpr int P = rows_per_pass(M);
  for (int64_t o = o0; o < o1; o += P) {
    const Pass<P, W> pass(w, o, o1, I);
    __m512 a[P][M];
    zero(a);
    int64_t k = 0;
    for (; k + 16 <= I; k += 16) {
      __m512 wv[P];
      UNROLL for (int j = 0; j < P; ++j) prefetch(pass.r[j] + k), wv[j] = load16(pass.r[j] + k);
      UNROLL for (int m = 0; m < M; ++m) {
        const __m512 xv = _mm512_loadu_ps(xs + m * I + k);
        UNROLL for (int j = 0; j < P; ++j) a[j][m] = _mm512_fmadd_ps(wv[j], xv, a[j][m]);
      }
    }
    UNROLL for (int m = 0; m < M; ++m)
      UNROLL for (int j = 0; j < P; ++j) {
        float tail = 0.f;
        for (int64_t t = k; t < I; ++t) tail += xs[m * I + t] * scalar(pass.r[j][t]);
        y[m * O + pass.at[j]] = _mm512_reduce_add_ps(a[j][m]) + tail;
      }
  }
}

// M rows of x against weight rows o0..o1, 8 rows of x at a time while those weight rows sit in L2 (W is read from
// memory once whatever M is): rows(c, n) writes rows c..c+n of x into out (fp32, row stride 128), which goes to
// columns o0..o1 of y (M, O) in X.
template <typename X, typename F>
static void by_eights(int64_t M, int64_t o0, int64_t o1, int64_t O, X* y, const std::vector<float>& out, F&& rows) {
  for (int64_t c = 0; c < M; c += 8) {
    with_rows(std::min<int64_t>(8, M - c), [&](auto n) { rows(c, n); });
    for (int64_t m = c; m < std::min<int64_t>(M, c + 8); ++m)
      for (int64_t o = o0; o < o1; ++o) y[m * O + o] = static_cast<X>(out[(m - c) * 128 + o - o0]);
  }
}

// Rows o0..o1 of W (O, I), inside one 128-row block, against M rows of x (M, I) into y (M, O); xs and out are the
// caller's scratch. s: the block scales (nO, nI) of fp8 weights, or null for plain ones.
template <typename W, typename X>
static void rows_task(int64_t M, const X* x, const W* w, const float* s, int64_t I, int64_t O, int64_t o0,
                      int64_t o1, X* y, std::vector<float>& xs, std::vector<float>& out) {
  const int64_t nI = (I + 127) / 128, b = o0 / 128;
  xs.resize(M * I);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < I; ++k) xs[m * I + k] = scalar(x[m * I + k]) * (s ? s[b * nI + k / 128] : 1.0f);
  by_eights(M, o0, o1, O, y, out, [&](int64_t c, auto n) {
    block_rows<W, decltype(n)::value>(xs.data() + c * I, w + o0 * I, 0, o1 - o0, I, 128, out.data());
  });
}

// f(h, o0, o1, xs, out) for each task: one per (hit expert h, `step` weight rows o0..o1), all in one parallel
// region, so that every hit expert's weights are read once; xs and out are each thread's scratch.
template <typename F>
static void for_tasks(const Hits& hits, int64_t O, int64_t step, F&& f) {
  const int64_t nT = (O + step - 1) / step;
  at::parallel_for(0, hits.size() * nT, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> xs, out(8 * 128);
    for (int64_t t = t0; t < t1; ++t) f(t / nT, t % nT * step, std::min(O, t % nT * step + step), xs, out);
  });
}

// x (R, I) rows grouped by expert, w (E, O, I), s (E, nO, nI) or null (plain weights), y (R, O). Tasks of 128
// rows (a scale block), 32 for plain weights (so that a small weight such as the router's spreads over threads).
template <typename W, typename X>
static void run(const Hits& hits, const X* x, const W* w, const float* s, int64_t I, int64_t O, X* y) {
  const int64_t nO = (O + 127) / 128, nI = (I + 127) / 128;
  for_tasks(hits, O, s ? 128 : 32, [&](int64_t h, int64_t o0, int64_t o1, auto& xs, auto& out) {
    const int64_t e = hits.id[h], r = hits.start[h];
    rows_task(hits.n[h], x + r * I, w + e * O * I, s ? s + e * nO * nI : s, I, O, o0, o1, y + r * O, xs, out);
  });
}

template <typename X>
static void fp8_typed(const Hits& hits, torch::Tensor x, torch::Tensor values, torch::Tensor scales, torch::Tensor y) {
  const int64_t I = x.size(1), O = values.size(-2);
  run(hits, x.data_ptr<X>(), reinterpret_cast<const uint8_t*>(values.data_ptr()), scales.data_ptr<float>(), I, O,
      y.data_ptr<X>());
}


// ---- int4 groups (quant.py; layout in weights.h)
// ---- int8 activations, for the int4 and int8 kernels.
// x rows rounded to int8 (quantize_rows).
struct Int8Rows {
  std::vector<int8_t> q;     // (M, width)
  std::vector<float> d, sum;  // (M, nG), then 16 zeros
  int64_t width = 0, nG = 0;
};

// Rows r.. of an Int8Rows.
struct Int8View {
  const int8_t* q;
  const float *d, *sum;
  int64_t width, nG;
  Int8View(const Int8Rows& x, int64_t r)
      : q(x.q.data() + r * x.width), d(x.d.data() + r * x.nG), sum(x.sum.data() + r * x.nG), width(x.width),
        nG(x.nG) {}
  Int8View from(int64_t r) const { Int8View v = *this; v.q += r * width, v.d += r * nG, v.sum += r * nG; return v; }
};

// x rows quantized to int8 per group of G columns (the last may be shorter), as llama.cpp's Q8 activations:
// xq = round(x / d), d = amax / 127, and the group's sum d * sum(xq) (int4's min term uses the quantized x's sum,
// not the exact one: then its result is exactly w . x_quantized, whose error scales with w, not with w - min).
// Rows are zero-padded to a multiple of 64 columns (int4: 128). In `int4_order`, each 128 values are stored in the
// order 64 packed int4 bytes unpack to (codes128: the low nibbles, values 0-15, 32-47, 64-79, 96-111, then the
// high ones, 16-31, 48-63, 80-95, 112-127).
template <typename X>
static void quantize_rows(const X* x, int64_t M, int64_t I, int64_t G, bool int4_order, Int8Rows& r) {
  const int64_t pad = int4_order ? 128 : 64;
  r.width = (I + pad - 1) / pad * pad, r.nG = (I + G - 1) / G;
  r.q.assign(M * r.width, 0), r.d.assign(M * r.nG + 16, 0.0f), r.sum.assign(M * r.nG + 16, 0.0f);  // 16 to spare:
  // the kernels read 16 lanes of d and sum where fewer are left, without a masked load
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < r.nG; ++g) {
      const int64_t n = std::min(G, I - g * G);
      const X* xg = x + m * I + g * G;
      __m512 amax = _mm512_setzero_ps();
      for (int64_t k = 0; k < n; k += 16)
        amax = _mm512_max_ps(amax, _mm512_abs_ps(x16(xg + k, tail16(n - k))));
      const float a = _mm512_reduce_max_ps(amax);
      const __m512 inv = _mm512_set1_ps(a > 0 ? 127.0f / a : 0.0f);
      __m512i sum = _mm512_setzero_si512();
      for (int64_t k = 0; k < n; k += 16) {
        static constexpr int64_t order[8] = {0, 64, 16, 80, 32, 96, 48, 112};  // int4: each 16 of 128 values
        const int64_t at = g * G + k, slot = int4_order ? at / 128 * 128 + order[at % 128 / 16] : at;
        const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(x16(xg + k, tail16(n - k)), inv));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(r.q.data() + m * r.width + slot), _mm512_cvtepi32_epi8(q));
        sum = _mm512_add_epi32(sum, q);
      }
      r.d[m * r.nG + g] = a / 127.0f;
      r.sum[m * r.nG + g] = a / 127.0f * static_cast<float>(_mm512_reduce_add_epi32(sum));
    }
}

// 128 codes from 64 packed bytes (the last chunk of a row: its n < 64 bytes, the rest zero), as two vectors of
// bytes: the low nibbles (values 0-15, 32-47, 64-79, 96-111 of the 128) and the high ones (16-31, 48-63, 80-95,
// 112-127). One integer dot product of each with x in Int8Rows' int4 order leaves each 32-value chunk's sum in
// 4 int32 lanes: lanes 4c..4c+3 hold chunk c.
static inline void codes128(const uint8_t* p, int64_t n, __m512i& lo, __m512i& hi) {
  const __m512i v = n >= 64 ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi8((1ULL << n) - 1, p);
  const __m512i low = _mm512_set1_epi8(15);
  lo = _mm512_and_si512(v, low);
  hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
}

// The scales of a 128-value chunk's 4 lane quads from f, a row's group scales times x's steps: GK = 32, groups
// g..g+3 (past a row's last group, spare entries that meet chunk sums of 0); GK = 64, group g in lanes 0-7 and g + 1
// in lanes 8-15 (a spare entry where a row ends after 64 values); else (groups of 128 or more, counted) the group
// of the first 64 values in lanes 0-7 and of the last 64 (g_hi) in lanes 8-15.
template <int GK>
static inline __m512 chunk_scales(const float* f, int64_t g, int64_t g_hi) {
  if (GK == 32)
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3),
                                 _mm512_castps128_ps512(_mm_loadu_ps(f + g)));
  return halves(f[g], f[GK == 64 ? g + 1 : g_hi]);
}

// A task's group scales and mins (n values, bf16) as fp32 in dst, then 16 zeros: every later read of them is a
// whole vector, never a masked load (emulated element by element on AVX2, and most of a small weight's time there).
static void scales_fp32(const at::BFloat16* src, int64_t n, float* dst) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(dst + i, x16(src + i, 0xFFFF));
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
  std::fill(dst + n, dst + n + 16, 0.0f);
}

// y[m, o] = sum_k x[m, k] * w[o, k] for weight rows o0..o1, rows_per_pass(M) at a time; M <= 8 rows.
// Per 128 values and row of x: two integer dot products (low and high nibbles), each chunk's sum scaled by its
// group's weight scale times x's step; the mins add sum_g min[o, g] * sum(x group g) at the end. s, mn: the rows'
// scales and mins in fp32 from row o0 (scales_fp32); f: scratch of 2 (8 nG + 16).
template <int M, int GK, typename Y>
static void int4_rows(Int8View x, const uint8_t* w, const float* s, const float* mn, int64_t o0, int64_t o1,
                      int64_t I, int64_t G, Y* y, int64_t ystride, float* f) {
  constexpr int P = rows_per_pass(M);
  const int64_t nG = x.nG, half = I / 2;
  for (int64_t o = o0; o < o1; o += P) {
    const Pass<P, uint8_t> pass(w, o, o1, half);
    float* fs[P];  // (M, nG) each: the pass's group scales times x's steps
    UNROLL for (int j = 0; j < P; ++j) {
      fs[j] = f + j * (8 * nG + 16);
      const float* sj = s + (pass.at[j] - o0) * nG;
      // whole vectors: past nG they write what the next m (or the spare 16) overwrites
      UNROLL for (int m = 0; m < M; ++m)
        for (int64_t g = 0; g < nG; g += 16)
          _mm512_storeu_ps(fs[j] + m * nG + g,
                           _mm512_mul_ps(_mm512_loadu_ps(sj + g), _mm512_loadu_ps(x.d + m * nG + g)));
    }
    __m512 a[P][M];
    zero(a);
    int64_t g = 0, g_end = G;  // groups of 128 or more: the chunk's first group, counted (a division per chunk
    for (int64_t k = 0; k < I; k += 128) {  // costs more than the rest of its work)
      __m512i lo[P], hi[P];
      UNROLL for (int j = 0; j < P; ++j)
        prefetch(pass.r[j] + k / 2), codes128(pass.r[j] + k / 2, std::min<int64_t>(64, (I - k) / 2), lo[j], hi[j]);
      if (GK) g = k / GK;
      else while (k >= g_end) ++g, g_end += G;
      const int64_t g_hi = GK ? g : std::min(k + 64 >= g_end ? g + 1 : g, nG - 1);  // (counted groups only)
      UNROLL for (int m = 0; m < M; ++m) {
        const int8_t* xm = x.q + m * x.width + k;
        const __m512i xl = _mm512_loadu_si512(xm), xh = _mm512_loadu_si512(xm + 64);
        UNROLL for (int j = 0; j < P; ++j)
          a[j][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(nibble_dot(lo[j], xl, hi[j], xh)),
                                    chunk_scales<GK>(fs[j] + m * nG, g, g_hi), a[j][m]);
      }
    }
    for (int64_t g = 0; g < nG; g += 16) {  // the mins' term, 16 groups at a time (past nG: x's sums masked to 0)
      const __mmask16 n = tail16(nG - g);
      UNROLL for (int m = 0; m < M; ++m) {
        const __m512 sum = _mm512_mask_mov_ps(_mm512_setzero_ps(), n, _mm512_loadu_ps(x.sum + m * nG + g));
        UNROLL for (int j = 0; j < P; ++j)
          a[j][m] = _mm512_fmadd_ps(_mm512_loadu_ps(mn + (pass.at[j] - o0) * nG + g), sum, a[j][m]);
      }
    }
    UNROLL for (int m = 0; m < M; ++m)
      UNROLL for (int j = 0; j < P; ++j) y[m * ystride + pass.at[j]] = static_cast<Y>(_mm512_reduce_add_ps(a[j][m]));
  }
}

// Weight rows o0..o1 against M rows of x, 8 at a time while those weight rows sit in L2; s and mn: the expert's
// bf16 scales and mins; scratch: 2 (128 nG + 16) + 2 (8 nG + 16) floats.
template <int GK, typename Y>
static void int4_task(Int8View x, int64_t M, const uint8_t* w, const at::BFloat16* s, const at::BFloat16* mn,
                      int64_t o0, int64_t o1, int64_t I, int64_t G, Y* y, int64_t O, float* scratch) {
  const int64_t nG = x.nG, values = (o1 - o0) * nG;
  float *sf = scratch, *mnf = sf + 128 * nG + 16, *f = mnf + 128 * nG + 16;
  scales_fp32(s + o0 * nG, values, sf);
  scales_fp32(mn + o0 * nG, values, mnf);
  for (int64_t c = 0; c < M; c += 8) {
    const Int8View xc = x.from(c);
    Y* yc = y + c * O;
    with_rows(std::min<int64_t>(8, M - c),
              [&](auto n) { int4_rows<decltype(n)::value, GK, Y>(xc, w, sf, mnf, o0, o1, I, G, yc, O, f); });
  }
}

template <typename X>
static void int4_typed(const Hits& hits, torch::Tensor x, torch::Tensor packed, torch::Tensor scales,
                       torch::Tensor mins, int64_t G, torch::Tensor y) {
  const int64_t I = x.size(1), O = packed.size(-2), nO = (O + 127) / 128, nG = I / G;
  const int64_t R = hits.rows_total();
  Int8Rows xq;
  quantize_rows(x.data_ptr<X>(), R, I, G, true, xq);
  const uint8_t* w = packed.data_ptr<uint8_t>();
  const at::BFloat16 *s = scales.data_ptr<at::BFloat16>(), *mn = mins.data_ptr<at::BFloat16>();
  X* yp = y.data_ptr<X>();
  at::parallel_for(0, hits.size() * nO, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> scratch(2 * (128 * xq.nG + 16) + 2 * (8 * xq.nG + 16));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t h = t / nO, b = t % nO, e = hits.id[h], r = hits.start[h];
      const auto task = G == 32 ? int4_task<32, X> : G == 64 ? int4_task<64, X> : int4_task<0, X>;
      task(Int8View(xq, r), hits.n[h], w + e * O * (I / 2), s + e * O * nG, mn + e * O * nG, b * 128,
           std::min(O, b * 128 + 128), I, G, yp + r * O, O, scratch.data());
    }
  });
}

// Rows of y (R, O) for rows of x (R, I) grouped by `hits`, through the int4 experts: packed (E, O, I/2) uint8,
// scales and mins (E, O, I/G) bf16. x is quantized once; one task per (hit expert, 128 weight rows).
static void int4_into(const Hits& hits, torch::Tensor x, torch::Tensor packed, torch::Tensor scales,
                      torch::Tensor mins, int64_t G, torch::Tensor y) {
  const int64_t I = x.size(1);
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && packed.is_contiguous() && packed.size(-1) * 2 == I &&
              packed.scalar_type() == torch::kByte && (G == 32 || G % 64 == 0) && I % G == 0 &&
              scales.is_contiguous() && mins.is_contiguous() && scales.scalar_type() == torch::kBFloat16 &&
              mins.scalar_type() == torch::kBFloat16 && scales.size(-1) == I / G,
              "int4 experts: shapes, dtypes or layout do not fit");
  with_dtype(x, "int4 experts", [&](auto t) { int4_typed<decltype(t)>(hits, x, packed, scales, mins, G, y); });
}

// x (R, I) rows grouped by expert (counts (E,)), packed (E, O, I/2) uint8, scales and mins (E, O, I/G) bf16
// -> (R, O) in x's dtype; rows past sum(counts) are zero. Without counts, one plain weight (O, I/2) for x (..., I)
// -> (..., O) (a linear layer).
torch::Tensor group_experts(torch::Tensor x, c10::optional<torch::Tensor> counts, torch::Tensor packed,
                            torch::Tensor scales, torch::Tensor mins, int64_t G) {
  TORCH_CHECK(packed.dim() == (counts ? 3 : 2), "group_experts: packed must be (E, O, I/2) with counts, else (O, I/2)");
  Batch b(x, counts, packed.size(-2));
  int4_into(b.hits, b.rows, packed, scales, mins, G, b.y);
  return b.out;
}

// ---- int8 blocks x int8 activations (W8A8): x rounded to int8 per 128 columns (the weight blocks' width);
// per 64 columns, |w| (u8) meets x with w's sign (s8) in one integer dot-product instruction, summed in int32
// over a 128-column block, then scaled by the block's scale times x's step.

// Rows o0..o1 of one 128-row block of W (O, I) against M <= 8 rows of x; f (M, nI): block scale x x's step.
template <int M, typename Y>
static void int8_rows(Int8View x, const int8_t* w, const float* f, int64_t o0, int64_t o1, int64_t I, Y* y,
                      int64_t ystride) {
  constexpr int P = rows_per_pass(M);
  const int64_t nI = x.nG;
  for (int64_t o = o0; o < o1; o += P) {
    const Pass<P, int8_t> pass(w, o, o1, I);
    __m512 a[P][M];
    zero(a);
    for (int64_t kb = 0; kb < nI; ++kb) {
      __m512i acc[P][M];
      zero(acc);
      for (int64_t k = kb * 128; k < std::min(I, kb * 128 + 128); k += 64) {
        const __mmask64 n = I - k >= 64 ? ~0ULL : (1ULL << (I - k)) - 1;
        __m512i wv[P], u[P];
        UNROLL for (int j = 0; j < P; ++j)
          prefetch(pass.r[j] + k), wv[j] = _mm512_maskz_loadu_epi8(n, pass.r[j] + k), u[j] = _mm512_abs_epi8(wv[j]);
        UNROLL for (int m = 0; m < M; ++m) {
          const __m512i xv = _mm512_loadu_si512(x.q + m * x.width + k);
          UNROLL for (int j = 0; j < P; ++j) acc[j][m] = dot4(acc[j][m], u[j], signed_by(xv, wv[j]));
        }
      }
      UNROLL for (int m = 0; m < M; ++m) {
        const __m512 fm = _mm512_set1_ps(f[m * nI + kb]);
        UNROLL for (int j = 0; j < P; ++j) a[j][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[j][m]), fm, a[j][m]);
      }
    }
    UNROLL for (int m = 0; m < M; ++m)
      UNROLL for (int j = 0; j < P; ++j) y[m * ystride + pass.at[j]] = static_cast<Y>(_mm512_reduce_add_ps(a[j][m]));
  }
}

template <typename X>
static void int8_experts(const Hits& hits, torch::Tensor x, torch::Tensor values, torch::Tensor scales,
                         torch::Tensor y) {
  const int64_t I = x.size(1), O = values.size(-2), nO = (O + 127) / 128, nI = (I + 127) / 128;
  const int64_t R = hits.rows_total();
  Int8Rows xq;
  quantize_rows(x.data_ptr<X>(), R, I, 128, false, xq);
  const int8_t* w = values.data_ptr<int8_t>();
  const float* s = scales.data_ptr<float>();
  X* yp = y.data_ptr<X>();
  at::parallel_for(0, hits.size() * nO, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> f;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t h = t / nO, b = t % nO, e = hits.id[h], r = hits.start[h], M = hits.n[h];
      const Int8View xr(xq, r);
      f.resize(M * nI);
      for (int64_t m = 0; m < M; ++m)
        for (int64_t kb = 0; kb < nI; ++kb) f[m * nI + kb] = s[(e * nO + b) * nI + kb] * xr.d[m * nI + kb];
      const int8_t* wb = w + (e * O + b * 128) * I;
      const int64_t rows = std::min<int64_t>(128, O - b * 128);
      for (int64_t c = 0; c < M; c += 8) {
        const Int8View xc = xr.from(c);
        const float* fc = f.data() + c * nI;
        X* yc = yp + (r + c) * O + b * 128;
        with_rows(std::min<int64_t>(8, M - c),
                  [&](auto n) { int8_rows<decltype(n)::value, X>(xc, wb, fc, 0, rows, I, yc, O); });
      }
    }
  });
}

// Rows of y (R, O) for rows of x (R, I) grouped by `hits`, through int8 or fp8 block experts: values (E, O, I),
// scales (E, nO, nI) fp32.
static void block_into(const Hits& hits, torch::Tensor x, torch::Tensor values, torch::Tensor scales, torch::Tensor y) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && values.is_contiguous() && scales.is_contiguous() &&
              scales.scalar_type() == torch::kFloat && values.size(-1) == x.size(1),
              "block experts: shapes, dtypes or layout do not fit");
  with_dtype(x, "block experts", [&](auto t) {
    using X = decltype(t);
    if (values.scalar_type() == torch::kChar) int8_experts<X>(hits, x, values, scales, y);
    else fp8_typed<X>(hits, x, values, scales, y);  // fp8: x pre-scaled, fp32 FMAs
  });
}

// x (R, I) rows grouped by expert (counts (E,)), values (E, O, I) int8 or fp8, scales (E, nO, nI) -> (R, O);
// rows past sum(counts) are zero. Without counts, one plain weight (O, I) for x (..., I) -> (..., O) (a linear
// layer).
torch::Tensor block_experts(torch::Tensor x, c10::optional<torch::Tensor> counts, torch::Tensor values,
                            torch::Tensor scales) {
  TORCH_CHECK(values.dim() == (counts ? 3 : 2), "block_experts: values must be (E, O, I) with counts, else (O, I)");
  Batch b(x, counts, values.size(-2));
  block_into(b.hits, b.rows, values, scales, b.y);
  return b.out;
}

// ---- plain weights (an unquantized model's linears and experts) in x's dtype, W read once at the memory's pace
// (oneDNN's bf16 GEMV at batch 1 reads it at about two thirds of that): fp32 as above; bf16 with the CPU's bf16
// pair dot product where it has one (no conversion: 32 weights per instruction), else as fp32.

#ifdef __AVX512BF16__
// y[m, o] = sum_k x[m, k] * w[o, k] for weight rows o0..o1 (into y with row stride 128), M <= 8 rows of x, both
// bf16: per 32 values, one VDPBF16PS per weight row (each product exact in fp32, summed in fp32). One accumulator
// per row whatever M is, so that a row's sums do not depend on the rows beside it (a decode step of one row and a
// speculative verify of several give the same logits); two at batch 1 only were 5% faster on cached weights.
template <int M>
static void bf16_rows(const at::BFloat16* x, const at::BFloat16* w, int64_t o0, int64_t o1, int64_t I, float* y) {
  constexpr int P = rows_per_pass(M);
  for (int64_t o = o0; o < o1; o += P) {
    const Pass<P, at::BFloat16> pass(w, o, o1, I);
    __m512 a[P][M];
    zero(a);
    for (int64_t k = 0; k < I; k += 32) {
      const __mmask32 n = I - k >= 32 ? ~0u : (1u << (I - k)) - 1;
      __m512bh wv[P];
      for (int j = 0; j < P; ++j) prefetch(pass.r[j] + k), wv[j] = (__m512bh)_mm512_maskz_loadu_epi16(n, pass.r[j] + k);
      for (int m = 0; m < M; ++m) {
        const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(n, x + m * I + k);
        for (int j = 0; j < P; ++j) a[j][m] = _mm512_dpbf16_ps(a[j][m], wv[j], xv);
      }
    }
    for (int m = 0; m < M; ++m)
      for (int j = 0; j < P; ++j) y[m * 128 + pass.at[j] - o0] = _mm512_reduce_add_ps(a[j][m]);
  }
}
#endif

// Rows of y (R, O) for rows of x (R, I) grouped by `hits`, through plain experts w (E, O, I) of x's dtype.
static void dense_into(const Hits& hits, torch::Tensor x, torch::Tensor w, torch::Tensor y) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && w.is_contiguous() && w.scalar_type() == x.scalar_type() &&
              w.size(-1) == x.size(1), "dense experts: shapes, dtypes or layout do not fit");
  const int64_t I = x.size(1), O = w.size(-2);
#ifdef __AVX512BF16__
  if (x.scalar_type() == torch::kBFloat16) {
    const at::BFloat16 *xp = x.data_ptr<at::BFloat16>(), *wp = w.data_ptr<at::BFloat16>();
    at::BFloat16* yp = y.data_ptr<at::BFloat16>();
    for_tasks(hits, O, 32, [&](int64_t h, int64_t o0, int64_t o1, auto&, auto& out) {
      const int64_t e = hits.id[h], r = hits.start[h];
      by_eights(hits.n[h], o0, o1, O, yp + r * O, out, [&](int64_t c, auto n) {
        bf16_rows<decltype(n)::value>(xp + (r + c) * I, wp + (e * O + o0) * I, 0, o1 - o0, I, out.data());
      });
    });
    return;
  }
#endif
  with_dtype(x, "dense experts", [&](auto t) {
    using X = decltype(t);
    run<X, X>(hits, x.data_ptr<X>(), w.data_ptr<X>(), nullptr, I, O, y.data_ptr<X>());
  });
}

// x (R, I) rows grouped by expert (counts (E,)), w (E, O, I) of x's dtype (fp32 or bf16) -> (R, O); rows past
// sum(counts) are zero. Without counts, one plain weight (O, I) for x (..., I) -> (..., O) (a linear layer).
torch::Tensor dense_experts(torch::Tensor x, c10::optional<torch::Tensor> counts, torch::Tensor w) {
  TORCH_CHECK(w.dim() == (counts ? 3 : 2), "dense_experts: w must be (E, O, I) with counts, else (O, I)");
  Batch b(x, counts, w.size(-2));
  dense_into(b.hits, b.rows, w, b.y);
  return b.out;
}

// ---- a MoE layer's routed experts for a few tokens (decode, concurrent streams), in one call instead of ~25
// small ops: the slots grouped by expert on the host, the hit rows gathered, gate_up through the experts kernel,
// SwiGLU, down, and the sum over each token's slots with its gate weights, plus the zero experts' share.

// Any weight format's tensors: int4 (packed, scales, mins), int8/fp8 blocks (values, scales) or plain (w).
static void experts_into(const Hits& hits, torch::Tensor x, const std::vector<torch::Tensor>& w, torch::Tensor y) {
  if (w.size() == 3) int4_into(hits, x, w[0], w[1], w[2], w[0].size(-1) * 2 / w[1].size(-1), y);
  else if (w.size() == 2) block_into(hits, x, w[0], w[1], y);
  else dense_into(hits, x, w.at(0), y);
}

// out (T, D) = sum over token t's slots of weight * y[row] (FFN slots) + (zero slots' weights) * x[t] if
// `identity`; in fp32, rounded once.
template <typename X>
static void combine(const X* x, const X* y, const std::vector<std::vector<std::pair<int64_t, float>>>& slots,
                    const std::vector<float>& zero, bool identity, int64_t D, X* out) {
  at::parallel_for(0, static_cast<int64_t>(slots.size()), 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> acc(D);
    for (int64_t t = t0; t < t1; ++t) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      if (identity) for (int64_t d = 0; d < D; ++d) acc[d] = zero[t] * static_cast<float>(x[t * D + d]);
      for (const auto& [row, w] : slots[t])
        for (int64_t d = 0; d < D; ++d) acc[d] += w * static_cast<float>(y[row * D + d]);
      for (int64_t d = 0; d < D; ++d) out[t * D + d] = static_cast<X>(acc[d]);
    }
  });
}

// x (T, D), ids (T, K) int64 (ids >= n_ffn are zero experts), weights (T, K) fp32, each projection's tensors as
// experts_into takes them -> (T, D) in x's dtype; or an undefined tensor (None) when the hit experts average
// more than max_rows rows each, where dequantize + GEMM is faster (the caller's other path).
torch::Tensor moe_experts(torch::Tensor x, torch::Tensor ids, torch::Tensor weights, int64_t n_ffn, bool identity,
                          std::vector<torch::Tensor> gate_up, std::vector<torch::Tensor> down, int64_t max_rows) {
  const int64_t T = x.size(0), D = x.size(1), K = ids.size(1);
  TORCH_CHECK(x.dim() == 2 && ids.dim() == 2 && ids.size(0) == T && ids.scalar_type() == torch::kLong &&
              weights.sizes() == ids.sizes() && weights.scalar_type() == torch::kFloat,
              "moe_experts: x (T, D), ids (T, K) int64 and weights (T, K) float32 expected");
  auto ids_c = ids.contiguous();
  auto w_c = weights.contiguous();
  const int64_t* id = ids_c.data_ptr<int64_t>();
  const float* wt = w_c.data_ptr<float>();
  std::vector<std::vector<int64_t>> by_expert(n_ffn);  // slots (t * K + k) per FFN expert, in slot order
  std::vector<float> zero(T, 0.0f);
  for (int64_t i = 0; i < T * K; ++i) {
    TORCH_CHECK(id[i] >= 0, "moe_experts: negative expert id");
    if (id[i] < n_ffn) by_expert[id[i]].push_back(i);
    else zero[i / K] += wt[i];
  }
  Hits hits;
  std::vector<int64_t> token;  // the token of each grouped row
  std::vector<std::vector<std::pair<int64_t, float>>> slots(T);  // per token: (grouped row, gate weight)
  for (int64_t e = 0; e < n_ffn; ++e) {
    for (const int64_t i : by_expert[e]) {
      slots[i / K].emplace_back(static_cast<int64_t>(token.size()), wt[i]);
      token.push_back(i / K);
    }
    hits.add(e, static_cast<int64_t>(by_expert[e].size()));
  }
  const int64_t R = hits.rows_total();
  if (R > max_rows * std::max<int64_t>(1, hits.size())) return torch::Tensor();
  auto xc = x.contiguous();
  auto rows = xc.index_select(0, torch::tensor(token, torch::kLong));  // (R, D) grouped by expert
  auto h = torch::empty({R, gate_up[0].size(-2)}, x.options());
  experts_into(hits, rows, gate_up, h);
  auto a = torch::empty({R, h.size(1) / 2}, x.options());
  auto y = torch::empty({R, D}, x.options());
  auto out = torch::empty_like(xc);
  with_dtype(x, "moe_experts", [&](auto t) {
    using X = decltype(t);
    swiglu_rows(h.data_ptr<X>(), R, a.size(1), a.data_ptr<X>());
    experts_into(hits, a, down, y);
    combine(xc.data_ptr<X>(), y.data_ptr<X>(), slots, zero, identity, D, out.data_ptr<X>());
  });
  return out;
}
