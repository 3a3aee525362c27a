"""x @ W^T for a block-quantized W (quant.py's format): a reference twin and a fused CPU kernel for decode.

Decode multiplies a few rows by each weight once, so its speed is the speed of reading the weight. The reference
(dequantize all of W, then F.linear) reads the int8 weight, writes a bf16 copy and reads that again: slower than
plain bf16. The kernel reads the int8/fp8 weight once: for each 128-row block of W it scales x by that block row's
128-column scales (a tiny (M, I) product), then streams the weight rows, converting 16 values at a time to fp32 and
accumulating x . w with AVX-512 FMAs, 8 rows of x at a time while the block stays in L2, parallel over block rows.
It takes up to MAX_KERNEL_ROWS rows (decode batches); prefill is compute-bound and takes the reference path,
where oneDNN's bf16 GEMM wins.

The kernel is C++ compiled on first use with torch.utils.cpp_extension (about 30 s, then cached). Without a
compiler, without AVX-512, or with LONGCAT_KERNELS=0, everything runs on the reference path.

Shapes: M rows, I in features, O out features, nO/nI the 128-block counts.
"""
from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

BLOCK = 128
MAX_KERNEL_ROWS = 32

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

template <typename W, typename X>
static void run(int64_t M, const X* x, const W* w, const float* s, int64_t I, int64_t O, X* y) {
  const int64_t nO = (O + 127) / 128, nI = (I + 127) / 128;
  at::parallel_for(0, nO, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> xs(M * I), out(8 * 128);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t o0 = b * 128, rows = std::min(O, o0 + 128) - o0;
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
  });
}

template <typename X>
static void typed(torch::Tensor x, torch::Tensor values, torch::Tensor scales, torch::Tensor y) {
  const int64_t M = x.size(0), I = x.size(1), O = values.size(0);
  const float* s = scales.data_ptr<float>();
  if (values.scalar_type() == torch::kChar)
    run(M, x.data_ptr<X>(), values.data_ptr<int8_t>(), s, I, O, y.data_ptr<X>());
  else  // float8_e4m3fn, read as bytes
    run(M, x.data_ptr<X>(), reinterpret_cast<const uint8_t*>(values.data_ptr()), s, I, O, y.data_ptr<X>());
}

torch::Tensor block_linear(torch::Tensor x, torch::Tensor values, torch::Tensor scales) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && values.dim() == 2 && values.is_contiguous() &&
              scales.is_contiguous() && scales.scalar_type() == torch::kFloat);
  auto y = torch::empty({x.size(0), values.size(0)}, x.options());
  if (x.scalar_type() == torch::kBFloat16) typed<at::BFloat16>(x, values, scales, y);
  else if (x.scalar_type() == torch::kFloat) typed<float>(x, values, scales, y);
  else TORCH_CHECK(false, "block_linear: x must be float32 or bfloat16");
  return y;
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
        return load_inline("longcat_block_linear", cpp_sources=_SOURCE, functions=["block_linear"],
                           extra_cflags=["-O3", "-mavx512f", "-mavx512bw", "-mfma", "-fopenmp"],
                           extra_ldflags=["-fopenmp"], build_directory=str(build), verbose=False)
    except Exception as err:  # any build problem: fall back, loudly once
        log.warning("block-quantized kernel unavailable (%s); using the dequantize reference", err)
        return None


def kernel_available() -> bool:
    return _extension() is not None


def dequantize(values: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """values (..., O, I) int8/fp8, scales (..., nO, nI) fp32 -> (..., O, I) in dtype."""
    O, I = values.shape[-2:]
    expanded = scales.repeat_interleave(BLOCK, dim=-2)[..., :O, :].repeat_interleave(BLOCK, dim=-1)[..., :I]
    return (values.float() * expanded).to(dtype)


def block_linear_reference(x: torch.Tensor, values: torch.Tensor, scales: torch.Tensor,
                           bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., I) -> (..., O) through the dequantized weight."""
    return F.linear(x, dequantize(values, scales, x.dtype), bias)


def block_linear(x: torch.Tensor, values: torch.Tensor, scales: torch.Tensor,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., I) -> (..., O): the kernel for up to MAX_KERNEL_ROWS rows on CPU, else the reference."""
    rows = x.numel() // x.shape[-1]
    supported = x.dtype in (torch.float32, torch.bfloat16) and x.device.type == "cpu"
    ext = _extension() if 0 < rows <= MAX_KERNEL_ROWS and supported else None
    if ext is None:
        return block_linear_reference(x, values, scales, bias)
    y = ext.block_linear(x.reshape(rows, x.shape[-1]).contiguous(), values, scales)
    y = y.view(*x.shape[:-1], values.shape[0])
    return y if bias is None else y + bias
