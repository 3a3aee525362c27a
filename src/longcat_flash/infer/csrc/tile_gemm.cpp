// Quantized weights (and plain bf16 experts) times more rows than the GEMV kernels take (concurrent streams,
// prefill), on AMX tiles; Python side: kernels.py. Each task dequantizes (plain: copies) 128 rows of a weight to
// bf16 into a panel that stays in L2, then TDPBF16PS multiplies it by every row of x (packed once per call in the
// tiles' pair layout), accumulating in fp32. The panel is filled by the same row dequantizers as `dequantize`'s
// bf16 output (weights.h), so the result is oneDNN's bf16 GEMM on the dequantized weight up to the order of fp32
// sums, without writing a dequantized copy to memory and reading it back. For at most 32 rows of x (concurrent
// streams) a task fills 32 weight rows at a time in L1-sized chunks instead (pair_task).
#include <sys/syscall.h>
#include <unistd.h>

#include "hits.h"
#include "simd.h"
#include "weights.h"

#define AMX_TARGET __attribute__((target("amx-tile,amx-bf16")))

constexpr int64_t PANEL_ROWS = 128;  // weight rows per task: 4 blocks of 32, each 2 A tiles

// Whether this CPU has AMX tiles and the kernel lets the process use them (Linux asks each process to request
// the tile state once). Never in the AVX2 build (avx512_on_avx2.h): the tile code compiles there but does not run.
bool amx_available() {
#ifdef __AVX512F__
  static const bool ok = __builtin_cpu_supports("amx-tile") && __builtin_cpu_supports("amx-bf16") &&
                         syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  return ok;
#else
  return false;
#endif
}

// r[0..15], a 16 x 16 matrix of 32-bit values, transposed in place (a bf16 pair or an fp32 per value).
static inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // rows i..i+3, per 128-bit lane: columns 4L + 0..3
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int i = 0; i < 16; i += 8)
    for (int j = 0; j < 4; ++j) {
      t[i + j] = _mm512_shuffle_i32x4(r[i + j], r[i + j + 4], 0x88);
      t[i + j + 4] = _mm512_shuffle_i32x4(r[i + j], r[i + j + 4], 0xDD);
    }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0x88);
    r[j + 8] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0xDD);
  }
}

// Up to 16 rows of x -> one block of B tiles: per 32-column chunk c, 16 tile rows (column pairs) of 16 x rows x 2
// values (rows past `rows` zero).
static void pack_block(const at::BFloat16* x, int64_t rows, int64_t I, at::BFloat16* xb) {
  for (int64_t c = 0; c < I / 32; ++c) {
    __m512i r[16];
    for (int m = 0; m < 16; ++m) r[m] = m < rows ? _mm512_loadu_si512(x + m * I + c * 32) : _mm512_setzero_si512();
    transpose16(r);
    for (int p = 0; p < 16; ++p) _mm512_storeu_si512(xb + (c * 16 + p) * 32, r[p]);
  }
}

// The 2 x 2 C tiles (fp32, weight rows x rows of x) in buf -> y (M, O) rows t*16.., columns o0.., transposed on
// the way and rounded to bf16.
static void store_tiles(const float* buf, int64_t o0, int64_t O, int64_t M, int64_t t, at::BFloat16* y) {
  for (int a = 0; a < 2 && o0 + a * 16 < O; ++a)
    for (int b = 0; b < 2; ++b) {
      __m512i r[16];
      for (int i = 0; i < 16; ++i) r[i] = _mm512_load_si512(buf + (a * 2 + b) * 256 + i * 16);
      transpose16(r);
      for (int n = 0; n < 16 && (t + b) * 16 + n < M; ++n)
        store_row(y + ((t + b) * 16 + n) * O + o0 + a * 16, round_bf16(_mm512_castsi512_ps(r[n])),
                  tail16(O - o0 - a * 16));
    }
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// C tiles 0-3 += A (weight rows 0-15 at a, 16-31 at a + 16 * 32) times B (x's blocks at b0, b1): one 32-value chunk.
AMX_TARGET static inline void dot_chunk(const at::BFloat16* a, const at::BFloat16* b0, const at::BFloat16* b1) {
  _tile_loadd(4, a, 64);
  _tile_loadd(5, a + 16 * 32, 64);
  _tile_loadd(6, b0, 64);
  _tile_loadd(7, b1, 64);
  _tile_dpbf16ps(0, 4, 6);
  _tile_dpbf16ps(1, 4, 7);
  _tile_dpbf16ps(2, 5, 6);
  _tile_dpbf16ps(3, 5, 7);
}

// C tiles 0-3 (weight rows o0.., rows t * 16.. of x) through buf into y.
AMX_TARGET static inline void flush_tiles(float* buf, int64_t o0, int64_t O, int64_t M, int64_t t, at::BFloat16* y) {
  _tile_stored(0, buf, 64);  // (the tile number is an immediate: no loop)
  _tile_stored(1, buf + 256, 64);
  _tile_stored(2, buf + 512, 64);
  _tile_stored(3, buf + 768, 64);
  store_tiles(buf, o0, O, M, t, y);
}

// Weight rows o0..o0+PANEL_ROWS (of O; `deq`'s row row0 + o) into the panel ([block][c][32][32] bf16), then times
// the M rows of x packed in xb (nT blocks of 16, an even count) -> y (M, O): tiles 0-3 accumulate C, 4-5 hold A
// (weight rows), 6-7 B (rows of x).
template <typename Deq>
AMX_TARGET static void panel_task(const Deq& deq, int64_t row0, int64_t o0, int64_t O, int64_t I,
                                  const at::BFloat16* xb, int64_t nT, int64_t M, at::BFloat16* y,
                                  at::BFloat16* panel, float* buf) {
  const int64_t nC = I / 32, blocks = (std::min(PANEL_ROWS, O - o0) + 31) / 32;
  for (int64_t r = 0; r < blocks * 32; ++r) {
    at::BFloat16* dst = panel + ((r / 32) * nC * 32 + r % 32) * 32;
    if (o0 + r < O) deq(row0 + o0 + r, dst, 32 * 32, 0, nC);
    else for (int64_t c = 0; c < nC; ++c) _mm512_storeu_si512(dst + c * 32 * 32, _mm512_setzero_si512());
  }
  for (int64_t t = 0; t < nT; t += 2) {
    const at::BFloat16 *b0 = xb + t * nC * 16 * 32, *b1 = b0 + nC * 16 * 32;
    for (int64_t k = 0; k < blocks; ++k) {
      const at::BFloat16* a = panel + k * nC * 32 * 32;
      _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
      for (int64_t c = 0; c < nC; ++c) dot_chunk(a + c * 32 * 32, b0 + c * 16 * 32, b1 + c * 16 * 32);
      flush_tiles(buf, o0 + k * 32, O, M, t, y);
    }
  }
}

// panel_task for at most 32 rows of x (one pair of blocks), where the panel's trip through L2 cost more than the
// products: each 32 weight rows are filled CHUNK values at a time into `chunk`, which stays in L1 while the tiles
// read it, and C stays in the tiles across all of I.
constexpr int64_t CHUNK = 8;  // 32-value chunks per fill: 32 rows x 256 values bf16 = 16 KB
template <typename Deq>
AMX_TARGET static void pair_task(const Deq& deq, int64_t row0, int64_t o0, int64_t O, int64_t I,
                                 const at::BFloat16* xb, int64_t M, at::BFloat16* y, at::BFloat16* chunk, float* buf) {
  const int64_t nC = I / 32, rows = std::min(PANEL_ROWS, O - o0);
  const at::BFloat16 *b0 = xb, *b1 = xb + nC * 16 * 32;
  const __m512i zero = _mm512_setzero_si512();
  for (int64_t k = 0; k < rows; k += 32) {
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    for (int64_t c0 = 0; c0 < nC; c0 += CHUNK) {
      const int64_t c1 = std::min(nC, c0 + CHUNK);
      for (int64_t r = 0; r < 32; ++r) {
        if (k + r < rows) deq(row0 + o0 + k + r, chunk + r * 32, 32 * 32, c0, c1);
        else for (int64_t c = c0; c < c1; ++c) _mm512_storeu_si512(chunk + (c - c0) * 32 * 32 + r * 32, zero);
      }
      for (int64_t c = c0; c < c1; ++c) dot_chunk(chunk + (c - c0) * 32 * 32, b0 + c * 16 * 32, b1 + c * 16 * 32);
    }
    flush_tiles(buf, o0 + k, O, M, 0, y);
  }
}

// Tasks t0..t1 of a call (hit expert h = t / nB, weight rows b * PANEL_ROWS.. for b = t % nB) on this thread's
// tiles; expert e's row o is `deq`'s row e * O + o.
template <typename Deq>
AMX_TARGET static void run_tasks(const Hits& hits, const std::vector<int64_t>& block0, const Deq& deq, int64_t O,
                                 int64_t I, const at::BFloat16* xb, at::BFloat16* y, int64_t t0, int64_t t1) {
  TileConfig cfg;
  for (int i = 0; i < 8; ++i) cfg.rows[i] = 16, cfg.colsb[i] = 64;
  _tile_loadconfig(&cfg);
  std::vector<at::BFloat16> panel;
  alignas(64) at::BFloat16 chunk[32 * CHUNK * 32];
  alignas(64) float buf[4 * 256];
  const int64_t nB = (O + PANEL_ROWS - 1) / PANEL_ROWS;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t h = t / nB, nT = block0[h + 1] - block0[h];
    const at::BFloat16* xh = xb + block0[h] * 16 * I;
    if (nT == 2) {
      pair_task(deq, hits.id[h] * O, t % nB * PANEL_ROWS, O, I, xh, hits.n[h], y + hits.start[h] * O, chunk, buf);
      continue;
    }
    panel.resize(PANEL_ROWS * I);
    panel_task(deq, hits.id[h] * O, t % nB * PANEL_ROWS, O, I, xh, nT, hits.n[h], y + hits.start[h] * O,
               panel.data(), buf);
  }
  _tile_release();
}

// y (R, O) = x (R, I) bf16 through `deq`'s weight, rows grouped by `hits`: x packed once, then one task per
// (hit expert, PANEL_ROWS weight rows).
template <typename Deq>
static void tile_gemm(const Hits& hits, torch::Tensor x, const Deq& deq, int64_t O, torch::Tensor y) {
  const int64_t I = x.size(1);
  std::vector<int64_t> block0{0};  // each hit expert's first 16-row block of packed x; an even count each
  for (int64_t h = 0; h < hits.size(); ++h) block0.push_back(block0.back() + (hits.n[h] + 31) / 32 * 2);
  auto xb = torch::empty({block0.back() * 16 * I}, x.options());
  at::BFloat16* xbp = xb.data_ptr<at::BFloat16>();
  const at::BFloat16* xp = x.data_ptr<at::BFloat16>();
  at::parallel_for(0, block0.back(), 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t h = std::upper_bound(block0.begin(), block0.end(), b) - block0.begin() - 1;
      const int64_t row = (b - block0[h]) * 16;  // within expert h's rows
      pack_block(xp + (hits.start[h] + row) * I, std::min<int64_t>(16, hits.n[h] - row), I, xbp + b * 16 * I);
    }
  });
  const int64_t nB = (O + PANEL_ROWS - 1) / PANEL_ROWS;
  at::parallel_for(0, hits.size() * nB, 1, [&](int64_t t0, int64_t t1) {
    run_tasks(hits, block0, deq, O, I, xbp, y.data_ptr<at::BFloat16>(), t0, t1);
  });
}

// (R, O) for x (R, I) bf16 and a weight with O rows: zeros past the hit experts' rows.
static torch::Tensor tile_output(const Hits& hits, torch::Tensor x, int64_t O) {
  TORCH_CHECK(amx_available(), "tile GEMM: this CPU or process has no AMX tiles");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == torch::kBFloat16 && x.size(1) % 32 == 0,
              "tile GEMM: x must be contiguous bf16 (R, I), I a multiple of 32");
  auto y = torch::empty({x.size(0), O}, x.options());
  y.narrow(0, hits.rows_total(), x.size(0) - hits.rows_total()).zero_();
  return y;
}

// group_experts (quant_kernels.cpp) for more rows: x (R, I) bf16 rows grouped by expert (counts (E,)), packed
// (E, O, I/2), scales and mins (E, O, I/G) bf16 -> (R, O) bf16; without counts, one plain weight (O, I/2).
torch::Tensor group_experts_tiles(torch::Tensor x, c10::optional<torch::Tensor> counts, torch::Tensor packed,
                                  torch::Tensor scales, torch::Tensor mins, int64_t G) {
  const Hits hits = Hits::of(counts, x.size(0));
  const int64_t I = x.size(1), O = packed.size(-2);
  TORCH_CHECK(packed.dim() == (counts ? 3 : 2) && packed.is_contiguous() && packed.scalar_type() == torch::kByte &&
              packed.size(-1) * 2 == I && G % 32 == 0 && I % G == 0 && scales.is_contiguous() &&
              mins.is_contiguous() && scales.scalar_type() == torch::kBFloat16 &&
              mins.scalar_type() == torch::kBFloat16 && scales.size(-1) == I / G,
              "group_experts_tiles: shapes, dtypes or layout do not fit");
  auto y = tile_output(hits, x, O);
  tile_gemm(hits, x, Int4Rows{packed.data_ptr<uint8_t>(), scales.data_ptr<at::BFloat16>(),
                              mins.data_ptr<at::BFloat16>(), I, G}, O, y);
  return y;
}

// block_experts (quant_kernels.cpp) for more rows: x (R, I) bf16, values (E, O, I) int8 or fp8, scales
// (E, nO, nI) fp32 -> (R, O) bf16; without counts, one plain weight (O, I).
torch::Tensor block_experts_tiles(torch::Tensor x, c10::optional<torch::Tensor> counts, torch::Tensor values,
                                  torch::Tensor scales) {
  const Hits hits = Hits::of(counts, x.size(0));
  const int64_t I = x.size(1), O = values.size(-2);
  TORCH_CHECK(values.dim() == (counts ? 3 : 2) && values.is_contiguous() && values.size(-1) == I &&
              scales.is_contiguous() && scales.scalar_type() == torch::kFloat,
              "block_experts_tiles: shapes, dtypes or layout do not fit");
  auto y = tile_output(hits, x, O);
  if (values.scalar_type() == torch::kChar)
    tile_gemm(hits, x, BlockRows<int8_t>{values.data_ptr<int8_t>(), scales.data_ptr<float>(), I, O}, O, y);
  else
    tile_gemm(hits, x, BlockRows<uint8_t>{reinterpret_cast<const uint8_t*>(values.data_ptr()),
                                          scales.data_ptr<float>(), I, O}, O, y);
  return y;
}

// dense_experts (quant_kernels.cpp) for more rows: x (R, I) bf16 rows grouped by expert (counts (E,)), w (E, O, I)
// bf16 -> (R, O) bf16. The panels are copies of the weight's rows.
torch::Tensor dense_experts_tiles(torch::Tensor x, c10::optional<torch::Tensor> counts, torch::Tensor w) {
  const Hits hits = Hits::of(counts, x.size(0));
  const int64_t I = x.size(1), O = w.size(-2);
  TORCH_CHECK(w.dim() == (counts ? 3 : 2) && w.is_contiguous() && w.size(-1) == I &&
              w.scalar_type() == torch::kBFloat16, "dense_experts_tiles: shapes, dtypes or layout do not fit");
  auto y = tile_output(hits, x, O);
  tile_gemm(hits, x, PlainRows{w.data_ptr<at::BFloat16>(), I}, O, y);
  return y;
}
