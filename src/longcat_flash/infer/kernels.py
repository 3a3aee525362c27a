"""x @ W^T for quantized W (quant.py's formats): references, and fused CPU kernels for decode and prefill.

Decode multiplies a few rows by each weight once, so its speed is the speed of reading the weight. The reference
(dequantize all of W, then F.linear) reads the quantized weight, writes a bf16 copy and reads that again: slower
than plain bf16. The kernels read the quantized weight once:
  int8/fp8 blocks  for each 128-row block of W, x is scaled by that block row's 128-column scales (a tiny (M, I)
                   product), then the weight rows stream by, 16 values at a time converted to fp32 and accumulated
                   with AVX-512 FMAs;
  int4 groups      16 bytes (32 codes) load as two 16-lane vectors (AND / shift), one FMA each makes them
                   scale * q + min in registers, then the same FMAs.
Both take two weight rows per pass (sharing every load of x), 8 rows of x at a time while a 128-row block stays in
L2, and run one parallel task per (expert, 128-row block): a single weight is the one-expert case, and a batch of
rows grouped by expert runs every hit expert in one call (`block_experts`, `group_experts`). Linear layers take
the kernel for up to MAX_KERNEL_ROWS rows (decode batches), expert stacks for up to that many rows per hit expert;
more rows (prefill, many streams) are compute-bound: each weight is dequantized once, in one compiled pass
straight to bf16 (`dequantize`, `group_dequantize`), for oneDNN's bf16 GEMM.

The kernels are C++ compiled on first use with torch.utils.cpp_extension (a minute or more, then cached). Without
a compiler, without AVX-512, or with LONGCAT_KERNELS=0, everything runs on the reference path.

Shapes: M rows, I in features, O out features, E experts, nO/nI the 128-block counts, G the int4 group.
"""
from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

BLOCK = 128
# Rows (per weight; per hit expert on average) up to which the kernels run. Their fp32 FMAs fall behind
# dequantize + oneDNN's bf16 GEMM beyond ~8 rows (one core: int8 4.7 GB/s of weights at 4 rows, 0.9 at 32,
# against 8.4 for the bf16 GEMM; bench_decode.py section (e)).
MAX_KERNEL_ROWS = 8

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

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

// y[m, o] = sum_k xs[m, k] * w[o, k] for rows o0..o1 of one 128-row block; xs already holds the block's scales.
// Two weight rows per pass share every load of xs (the loads, not the FMAs, bound this loop for M > 1).
template <typename W, int M>
static void block_rows(const float* xs, const W* w, int64_t o0, int64_t o1, int64_t I, int64_t O, float* y) {
  int64_t o = o0;
  for (; o + 2 <= o1; o += 2) {
    const W* r0 = w + o * I;
    const W* r1 = r0 + I;
    __m512 a0[M], a1[M];
    for (int m = 0; m < M; ++m) a0[m] = a1[m] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= I; k += 16) {
      __m512 w0 = load16(r0 + k), w1 = load16(r1 + k);
      for (int m = 0; m < M; ++m) {
        __m512 xv = _mm512_loadu_ps(xs + m * I + k);
        a0[m] = _mm512_fmadd_ps(w0, xv, a0[m]);
        a1[m] = _mm512_fmadd_ps(w1, xv, a1[m]);
      }
    }
    for (int m = 0; m < M; ++m) {
      float t0 = 0.f, t1 = 0.f;
      for (int64_t t = k; t < I; ++t) {
        t0 += xs[m * I + t] * scalar(r0[t]);
        t1 += xs[m * I + t] * scalar(r1[t]);
      }
      y[m * O + o] = _mm512_reduce_add_ps(a0[m]) + t0;
      y[m * O + o + 1] = _mm512_reduce_add_ps(a1[m]) + t1;
    }
  }
  for (; o < o1; ++o) {
    const W* row = w + o * I;
    __m512 acc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= I; k += 16) {
      __m512 wv = load16(row + k);
      for (int m = 0; m < M; ++m) acc[m] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(xs + m * I + k), acc[m]);
    }
    for (int m = 0; m < M; ++m) {
      float tail = 0.f;
      for (int64_t t = k; t < I; ++t) tail += xs[m * I + t] * scalar(row[t]);
      y[m * O + o] = _mm512_reduce_add_ps(acc[m]) + tail;
    }
  }
}

// x rows as fp32, from fp32 or bf16 (bf16 is the top half of an fp32).
static inline float as_float(float v) { return v; }
static inline float as_float(at::BFloat16 v) { return static_cast<float>(v); }

// One 128-row block of W against M rows of x, 8 rows at a time while the block sits in L2: W is read from memory
// once whatever M is.
template <typename W, int CH>
static void chunk(const float* xs, const W* w, int64_t rows, int64_t I, float* out) {
  block_rows<W, CH>(xs, w, 0, rows, I, 128, out);
}

// Block b (rows b*128..) of W (O, I) against M rows of x (M, I) into y (M, O); xs and out are the caller's scratch.
template <typename W, typename X>
static void block_task(int64_t M, const X* x, const W* w, const float* s, int64_t I, int64_t O, int64_t b, X* y,
                       std::vector<float>& xs, std::vector<float>& out) {
  const int64_t nI = (I + 127) / 128, o0 = b * 128, rows = std::min(O, o0 + 128) - o0;
  xs.resize(M * I);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < I; ++k) xs[m * I + k] = as_float(x[m * I + k]) * s[b * nI + k / 128];
  for (int64_t c = 0; c < M; c += 8) {
    const float* xc = xs.data() + c * I;
    const W* wb = w + o0 * I;
    switch (std::min<int64_t>(8, M - c)) {
      case 1: chunk<W, 1>(xc, wb, rows, I, out.data()); break;
      case 2: chunk<W, 2>(xc, wb, rows, I, out.data()); break;
      case 3: chunk<W, 3>(xc, wb, rows, I, out.data()); break;
      case 4: chunk<W, 4>(xc, wb, rows, I, out.data()); break;
      case 5: chunk<W, 5>(xc, wb, rows, I, out.data()); break;
      case 6: chunk<W, 6>(xc, wb, rows, I, out.data()); break;
      case 7: chunk<W, 7>(xc, wb, rows, I, out.data()); break;
      default: chunk<W, 8>(xc, wb, rows, I, out.data()); break;
    }
    for (int64_t m = c; m < std::min<int64_t>(M, c + 8); ++m)
      for (int64_t o = 0; o < rows; ++o) y[m * O + o0 + o] = static_cast<X>(out[(m - c) * 128 + o]);
  }
}

// The hit experts of a grouped batch: rows start[h]..start[h]+n[h] of x belong to expert id[h].
struct Hits {
  std::vector<int64_t> start, n, id;
  explicit Hits(torch::Tensor counts) {
    auto c = counts.to(torch::kLong).contiguous();
    const int64_t* p = c.data_ptr<int64_t>();
    for (int64_t e = 0, row = 0; e < c.numel(); row += p[e], ++e)
      if (p[e]) { start.push_back(row); n.push_back(p[e]); id.push_back(e); }
  }
  int64_t size() const { return static_cast<int64_t>(id.size()); }
};

// One task per (hit expert, 128-row block): every hit expert's weights are read once, in one parallel region.
// x (R, I) rows grouped by expert, w (E, O, I), s (E, nO, nI), y (R, O).
template <typename W, typename X>
static void run(const Hits& hits, const X* x, const W* w, const float* s, int64_t I, int64_t O, X* y) {
  const int64_t nO = (O + 127) / 128, nI = (I + 127) / 128;
  at::parallel_for(0, hits.size() * nO, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> xs, out(8 * 128);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t h = t / nO, b = t % nO, e = hits.id[h], r = hits.start[h];
      block_task(hits.n[h], x + r * I, w + e * O * I, s + e * nO * nI, I, O, b, y + r * O, xs, out);
    }
  });
}

template <typename X>
static void typed(const Hits& hits, torch::Tensor x, torch::Tensor values, torch::Tensor scales, torch::Tensor y) {
  const int64_t I = x.size(1), O = values.size(-2);
  const float* s = scales.data_ptr<float>();
  if (values.scalar_type() == torch::kChar)
    run(hits, x.data_ptr<X>(), values.data_ptr<int8_t>(), s, I, O, y.data_ptr<X>());
  else  // float8_e4m3fn, read as bytes
    run(hits, x.data_ptr<X>(), reinterpret_cast<const uint8_t*>(values.data_ptr()), s, I, O, y.data_ptr<X>());
}

// x (R, I) rows grouped by expert (counts (E,)), values (E, O, I), scales (E, nO, nI) -> (R, O); rows past
// sum(counts) are zero. A plain weight is the E = 1 case.
torch::Tensor block_experts(torch::Tensor x, torch::Tensor counts, torch::Tensor values, torch::Tensor scales) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && values.dim() == 3 && values.is_contiguous() &&
              scales.is_contiguous() && scales.scalar_type() == torch::kFloat && values.size(2) == x.size(1));
  auto y = torch::zeros({x.size(0), values.size(1)}, x.options());
  const Hits hits(counts);
  if (x.scalar_type() == torch::kBFloat16) typed<at::BFloat16>(hits, x, values, scales, y);
  else if (x.scalar_type() == torch::kFloat) typed<float>(hits, x, values, scales, y);
  else TORCH_CHECK(false, "block_experts: x must be float32 or bfloat16");
  return y;
}

// ---- int4 groups (quant.py): packed (O, I/2) bytes; in each 32-value chunk byte j holds value j in its low
// nibble and value j + 16 in its high nibble; w = scale[o, g] * q + min[o, g] for group g = k / G, q in 0..15.
static inline void load32(const uint8_t* p, __m512& lo, __m512& hi) {
  __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  lo = _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(15)));
  hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
}

// y[m, o] = sum_k x[m, k] * w[o, k] for weight rows o0..o1, two per pass sharing every load of x; M <= 8 rows of
// fp32 x. Per group and row, the 16 possible values scale * q + min form one register (one FMA); each code then
// becomes its value by a permute that reads the code's low 4 bits (no integer -> float conversion). Up to 4 rows
// of x, low and high halves accumulate separately (twice the independent FMA chains for small M).
template <int M>
static void int4_rows(const float* x, const uint8_t* w, const at::BFloat16* s, const at::BFloat16* mn,
                      int64_t o0, int64_t o1, int64_t I, int64_t G, float* y, int64_t ystride) {
  constexpr int S = M <= 4 ? 2 : 1;  // accumulators per (row, m)
  const int64_t nG = I / G, half = I / 2;
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t o = o0; o < o1; o += 2) {
    const int64_t p = std::min(o + 1, o1 - 1);  // the pair's second row (a lone last row pairs with itself)
    const uint8_t *r0 = w + o * half, *r1 = w + p * half;
    __m512 a0[S][M], a1[S][M];
    for (int k = 0; k < S; ++k)
      for (int m = 0; m < M; ++m) a0[k][m] = a1[k][m] = _mm512_setzero_ps();
    for (int64_t g = 0; g < nG; ++g) {
      const __m512 t0 = _mm512_fmadd_ps(iota, _mm512_set1_ps(static_cast<float>(s[o * nG + g])),
                                        _mm512_set1_ps(static_cast<float>(mn[o * nG + g])));
      const __m512 t1 = _mm512_fmadd_ps(iota, _mm512_set1_ps(static_cast<float>(s[p * nG + g])),
                                        _mm512_set1_ps(static_cast<float>(mn[p * nG + g])));
      for (int64_t c = g * G; c < (g + 1) * G; c += 32) {
        const __m512i v0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r0 + c / 2)));
        const __m512i v1 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r1 + c / 2)));
        const __m512 l0 = _mm512_permutexvar_ps(v0, t0), h0 = _mm512_permutexvar_ps(_mm512_srli_epi32(v0, 4), t0);
        const __m512 l1 = _mm512_permutexvar_ps(v1, t1), h1 = _mm512_permutexvar_ps(_mm512_srli_epi32(v1, 4), t1);
        for (int m = 0; m < M; ++m) {
          const __m512 xl = _mm512_loadu_ps(x + m * I + c), xh = _mm512_loadu_ps(x + m * I + c + 16);
          a0[0][m] = _mm512_fmadd_ps(l0, xl, a0[0][m]);
          a1[0][m] = _mm512_fmadd_ps(l1, xl, a1[0][m]);
          a0[S - 1][m] = _mm512_fmadd_ps(h0, xh, a0[S - 1][m]);
          a1[S - 1][m] = _mm512_fmadd_ps(h1, xh, a1[S - 1][m]);
        }
      }
    }
    for (int m = 0; m < M; ++m) {
      __m512 r0sum = a0[0][m], r1sum = a1[0][m];
      if (S == 2) { r0sum = _mm512_add_ps(r0sum, a0[S - 1][m]); r1sum = _mm512_add_ps(r1sum, a1[S - 1][m]); }
      y[m * ystride + o] = _mm512_reduce_add_ps(r0sum);
      if (p != o) y[m * ystride + p] = _mm512_reduce_add_ps(r1sum);
    }
  }
}

// Weight rows o0..o1 against M rows of fp32 x, 8 at a time while those rows sit in L2.
static void int4_task(int64_t M, const float* x, const uint8_t* w, const at::BFloat16* s, const at::BFloat16* mn,
                      int64_t o0, int64_t o1, int64_t I, int64_t G, float* y, int64_t O) {
  for (int64_t c = 0; c < M; c += 8) {
    const float* xc = x + c * I;
    float* yc = y + c * O;
    switch (std::min<int64_t>(8, M - c)) {
      case 1: int4_rows<1>(xc, w, s, mn, o0, o1, I, G, yc, O); break;
      case 2: int4_rows<2>(xc, w, s, mn, o0, o1, I, G, yc, O); break;
      case 3: int4_rows<3>(xc, w, s, mn, o0, o1, I, G, yc, O); break;
      case 4: int4_rows<4>(xc, w, s, mn, o0, o1, I, G, yc, O); break;
      case 5: int4_rows<5>(xc, w, s, mn, o0, o1, I, G, yc, O); break;
      case 6: int4_rows<6>(xc, w, s, mn, o0, o1, I, G, yc, O); break;
      case 7: int4_rows<7>(xc, w, s, mn, o0, o1, I, G, yc, O); break;
      default: int4_rows<8>(xc, w, s, mn, o0, o1, I, G, yc, O); break;
    }
  }
}

// x (R, I) rows grouped by expert (counts (E,)), packed (E, O, I/2) uint8, scales and mins (E, O, I/G) bf16
// -> (R, O) in x's dtype; rows past sum(counts) are zero. One task per (hit expert, 128 weight rows).
torch::Tensor group_experts(torch::Tensor x, torch::Tensor counts, torch::Tensor packed, torch::Tensor scales,
                            torch::Tensor mins, int64_t G) {
  const int64_t I = x.size(1), O = packed.size(1), nO = (O + 127) / 128;
  TORCH_CHECK(x.dim() == 2 && packed.dim() == 3 && packed.is_contiguous() && packed.size(2) * 2 == I &&
              packed.scalar_type() == torch::kByte && G % 32 == 0 && I % G == 0 &&
              scales.is_contiguous() && mins.is_contiguous() && scales.scalar_type() == torch::kBFloat16 &&
              mins.scalar_type() == torch::kBFloat16 && scales.size(2) == I / G);
  auto xf = x.to(torch::kFloat).contiguous();
  auto y = torch::zeros({x.size(0), O}, xf.options());
  const Hits hits(counts);
  const float* xp = xf.data_ptr<float>();
  const uint8_t* w = packed.data_ptr<uint8_t>();
  const at::BFloat16 *s = scales.data_ptr<at::BFloat16>(), *mn = mins.data_ptr<at::BFloat16>();
  float* yp = y.data_ptr<float>();
  const int64_t nG = I / G;
  at::parallel_for(0, hits.size() * nO, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t h = t / nO, b = t % nO, e = hits.id[h], r = hits.start[h];
      int4_task(hits.n[h], xp + r * I, w + e * O * (I / 2), s + e * O * nG, mn + e * O * nG, b * 128,
                std::min(O, b * 128 + 128), I, G, yp + r * O, O);
    }
  });
  return y.to(x.scalar_type());
}

// ---- dequantization into a full matrix, for GEMMs with many rows (prefill): one pass, 16 values at a time.
static inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
static inline void store16(at::BFloat16* p, __m512 v) {  // round to nearest even, as torch does
  __m512i b = _mm512_castps_si512(v);
  __m512i odd = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  b = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(b));
}

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
"""


@functools.lru_cache(maxsize=1)
def _extension():
    """The compiled kernel module, or None (no compiler, no AVX-512, disabled, or the build failed)."""
    if os.environ.get("LONGCAT_KERNELS", "1") == "0" or "avx512" not in torch.backends.cpu.get_cpu_capability().lower():
        return None
    try:
        from torch.utils.cpp_extension import load_inline

        build = Path(os.environ.get("LONGCAT_KERNEL_CACHE", Path.home() / ".cache" / "longcat_flash" / "kernels"))
        build.mkdir(parents=True, exist_ok=True)
        return load_inline("longcat_quant_kernels", cpp_sources=_SOURCE,
                           functions=["block_experts", "group_experts", "block_dequantize", "group_dequantize"],
                           extra_cflags=["-O3", "-mavx512f", "-mavx512bw", "-mavx512dq", "-mfma", "-fopenmp"],
                           extra_ldflags=["-fopenmp"], build_directory=str(build), verbose=False)
    except Exception as err:  # noqa: BLE001  (any build problem: fall back, loudly once)
        log.warning("block-quantized kernel unavailable (%s); using the dequantize reference", err)
        return None


def kernel_available() -> bool:
    return _extension() is not None


def _cpu_ext(x: torch.Tensor, rows: int):
    """The extension, if it takes this call: CPU, fp32/bf16, 1..MAX_KERNEL_ROWS rows (else None)."""
    if 0 < rows <= MAX_KERNEL_ROWS and x.dtype in (torch.float32, torch.bfloat16) and x.device.type == "cpu":
        return _extension()
    return None


def _one_expert(x: torch.Tensor, experts: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], out_features: int,
                bias: torch.Tensor | None) -> torch.Tensor:
    """x (..., I) -> (..., O) through an experts kernel as its one-expert case: a plain weight."""
    rows = x.numel() // x.shape[-1]
    y = experts(x.reshape(rows, x.shape[-1]), torch.tensor([rows])).view(*x.shape[:-1], out_features)
    return y if bias is None else y + bias


def _deq_ext(t: torch.Tensor, dtype: torch.dtype):
    return _extension() if t.device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) else None


# ---- int8 / fp8 128x128 blocks ----

def dequantize_reference(values: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """values (..., O, I) int8/fp8, scales (..., nO, nI) fp32 -> (..., O, I) in dtype."""
    O, I = values.shape[-2:]
    expanded = scales.repeat_interleave(BLOCK, dim=-2)[..., :O, :].repeat_interleave(BLOCK, dim=-1)[..., :I]
    return (values.float() * expanded).to(dtype)


def dequantize(values: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """dequantize_reference, in one compiled pass on CPU (the prefill path runs it once per weight per chunk)."""
    ext = _deq_ext(values, dtype)
    if ext is None:
        return dequantize_reference(values, scales, dtype)
    return ext.block_dequantize(values.contiguous(), scales.contiguous(), dtype == torch.bfloat16)


def block_linear_reference(x: torch.Tensor, values: torch.Tensor, scales: torch.Tensor,
                           bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., I) -> (..., O) through the dequantized weight."""
    return F.linear(x, dequantize_reference(values, scales, x.dtype), bias)


def block_linear(x: torch.Tensor, values: torch.Tensor, scales: torch.Tensor,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., I) -> (..., O): the kernel for up to MAX_KERNEL_ROWS rows on CPU, else dequantize + GEMM."""
    if _cpu_ext(x, x.numel() // x.shape[-1]) is None:
        return F.linear(x, dequantize(values, scales, x.dtype), bias)
    return _one_expert(x, lambda rows, counts: block_experts(rows, counts, values[None], scales[None]),
                       values.shape[0], bias)


def block_experts(x: torch.Tensor, counts: torch.Tensor, values: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x (R, I) rows grouped by expert, counts (E,), values (E, O, I), scales (E, nO, nI) -> (R, O), every hit
    expert in one kernel call (rows past sum(counts) are zero). Needs the kernel (see `experts_kernel`)."""
    return _extension().block_experts(x.contiguous(), counts, values, scales)


# ---- int4 groups ----

def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """packed (..., I/2) uint8 -> q (..., I) uint8 in 0..15: in each 32-value chunk, byte j holds value j in its
    low nibble and value j + 16 in its high nibble (16 bytes load as two 16-lane vectors)."""
    chunks = packed.unflatten(-1, (-1, 16))  # (..., I/32, 16)
    return torch.cat([chunks & 15, chunks >> 4], dim=-1).flatten(-2)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q (..., I) integers in 0..15, I a multiple of 32 -> (..., I/2) uint8; the inverse of unpack_int4."""
    lo, hi = q.to(torch.uint8).unflatten(-1, (-1, 2, 16)).unbind(-2)  # (..., I/32, 16) each
    return (lo | (hi << 4)).flatten(-2)


def group_dequantize_reference(packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                               dtype: torch.dtype) -> torch.Tensor:
    """packed (..., O, I/2), scales and mins (..., O, I/G) -> (..., O, I): scale * q + min per group."""
    q = unpack_int4(packed).float()
    group = q.shape[-1] // scales.shape[-1]
    w = q.unflatten(-1, (-1, group)) * scales.float()[..., None] + mins.float()[..., None]
    return w.flatten(-2).to(dtype)


def group_dequantize(packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                     dtype: torch.dtype) -> torch.Tensor:
    """group_dequantize_reference, in one compiled pass on CPU."""
    ext = _deq_ext(packed, dtype)
    if ext is None:
        return group_dequantize_reference(packed, scales, mins, dtype)
    group = packed.shape[-1] * 2 // scales.shape[-1]
    return ext.group_dequantize(packed.contiguous(), scales.contiguous(), mins.contiguous(), group,
                                dtype == torch.bfloat16)


def group_linear_reference(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                           bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, group_dequantize_reference(packed, scales, mins, x.dtype), bias)


def group_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., I) -> (..., O) for an int4 weight: the kernel for up to MAX_KERNEL_ROWS rows on CPU, else
    dequantize + GEMM."""
    if _cpu_ext(x, x.numel() // x.shape[-1]) is None:
        return F.linear(x, group_dequantize(packed, scales, mins, x.dtype), bias)
    return _one_expert(x, lambda rows, counts: group_experts(rows, counts, packed[None], scales[None], mins[None]),
                       packed.shape[0], bias)


def group_experts(x: torch.Tensor, counts: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
                  mins: torch.Tensor) -> torch.Tensor:
    """x (R, I) rows grouped by expert, counts (E,), packed (E, O, I/2), scales and mins (E, O, I/G) -> (R, O),
    every hit expert in one kernel call. Needs the kernel (see `experts_kernel`)."""
    group = packed.shape[-1] * 2 // scales.shape[-1]
    return _extension().group_experts(x.contiguous(), counts, packed, scales, mins, group)


def experts_kernel(x: torch.Tensor, counts: torch.Tensor) -> bool:
    """Whether the fused expert kernels take rows x (R, I) grouped by counts (E,): CPU, fp32/bf16, at most
    MAX_KERNEL_ROWS rows per hit expert on average (decode, concurrent streams); more (prefill) go through
    dequantize + GEMM per expert."""
    return _cpu_ext(x, 1) is not None and x.shape[0] <= MAX_KERNEL_ROWS * max(1, int(counts.count_nonzero()))
