"""x @ W^T for quantized W (quant.py's formats): references, and fused CPU kernels (csrc/quant_kernels.cpp,
csrc/dequantize.cpp) for decode and prefill; the same GEMV kernel for plain bf16/fp32 W at decode.

Decode multiplies a few rows by each weight once, so its speed is the speed of reading the weight. The reference
(dequantize all of W, then F.linear) reads the quantized weight, writes a bf16 copy and reads that again: slower
than plain bf16. The kernels read the quantized weight once:
  int8 blocks      W8A8: x is rounded to int8 once per call, per 128 columns (step amax / 127, llama.cpp's Q8
                   activations); per 64 columns |w| meets x with w's sign in one integer dot-product instruction
                   (AVX512-VNNI, else two AVX512-BW ones), summed in int32 over the block, then scaled by the
                   block's scale times x's step;
  fp8 blocks       x is scaled by each block row's 128-column scales (a tiny (M, I) product), then the weight rows
                   stream by, 16 values at a time converted to fp32 and accumulated with AVX-512 FMAs;
  int4 groups      W4A8: x rounded to int8 per weight group as above (stored in the order the codes unpack to),
                   and each 128 codes (a 64-byte line, low and high nibbles by AND / shift) meet 128 x bytes in two
                   integer dot products, each 32-value chunk's sum scaled by its group's scale times x's step; the
                   mins add min . sum(x group) per row.
The int8 activations cost nothing measurable: held-out perplexity through the decode path, int8 -0.09% and int4
+0.17%, against -0.08% and +0.18% with exact activations (bench_quant.py). With software prefetch (csrc/simd.h),
1.7x (int8) and 1.9x (int4) the weight GB/s of the fp32-FMA kernels they replace at batch 1, one thread
(docs/quantization_log.md).
All three take two weight rows per pass (sharing every load of x), 8 rows of x at a time while a 128-row block stays
in L2, and run one parallel task per (expert, 128-row block): a single weight is the one-expert case, and a batch of
rows grouped by expert runs every hit expert in one call (`block_experts`, `group_experts`); for a few tokens a MoE
layer's whole routed part (grouping, both projections, SwiGLU, the weighted sum) is one call (`moe_experts`). Linear
layers take the kernel for up to MAX_KERNEL_ROWS rows (decode batches; int4: MAX_INT4_KERNEL_ROWS; an int4 weight of
LARGE_INT4_WEIGHT values or more, any number of fp32 rows), expert stacks for up to that many rows per hit expert.
More rows (prefill, many streams) are compute-bound. In bf16 on a CPU with AMX, the tile GEMM (csrc/tile_gemm.cpp)
dequantizes 128 weight rows at a time into L2 and multiplies them with TDPBF16PS, writing and re-reading no bf16
copy of the weight: 1.1-6x dequantize + GEMM at 32 rows, 0.8-1x at 1024 in isolation (bench/bench_tiles.py).
Otherwise (fp32, no AMX) each weight is dequantized DEQUANT_SLICE values at a time, each slice in one compiled pass
(`dequantize`, `group_dequantize`) and then oneDNN's GEMM on it (`_dequantized_gemm`).
Plain (unquantized) weights take the same path for up to MAX_DENSE_ROWS rows (`dense_linear`, `dense_experts`,
and `moe_experts` with one tensor per projection): bf16 rows meet bf16 weights 32 values per pair dot-product
instruction (AVX512-BF16; else converted and fp32 FMAs, as fp32 weights), summed in fp32; tasks of 32 weight rows.
At batch 1 that reads a bf16 weight 1.3-1.8x as fast as oneDNN's GEMV (bench_decode.py's kernel table). bf16
experts beyond it take the tile GEMM, the panel a copy of the weight's rows.

The kernels are compiled on first use (extension.py): with AVX-512, or on a CPU with only AVX2 + FMA with the same
code on pairs of AVX2 vectors (csrc/avx512_on_avx2.h: the same results, no AMX tiles). Without a compiler, without
AVX2, or with LONGCAT_KERNELS=0, everything runs on the reference path.

Shapes: M rows, I in features, O out features, E experts, nO/nI the 128-block counts, G the int4 group.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import extension

BLOCK = 128
# Rows (per weight; per hit expert on average) up to which the GEMV kernels run where the tile GEMM does not take x
# (fp32, no AMX); beyond, dequantize + oneDNN's GEMM is faster. One core, GB/s of quantized weights, kernel (before
# prefetch) vs dequantize + GEMM: int8 3.9 vs 3.7 at 8 rows, 2.8 vs 0.8 at 12, 2.5 vs 2.3 at 16, 1.5 vs 2.3 at 32;
# int4 2.8 vs 2.7, 1.8 vs 1.1, 1.6 vs 1.3, 0.8 vs 1.1.
MAX_KERNEL_ROWS = 16
# The same for int4 groups, whose kernel multiplies int8 activations by int4 codes 32 pairs per instruction while
# the fallback writes an fp32 copy of the weight before its GEMM: fp32 rows, one thread, 2-core AVX2 CPU, ms, kernel
# vs group_dequantize + GEMM at 32 rows: (8192, 256) 6.0 vs 9.4, (256, 768) 0.41 vs 0.50, (1536, 256) 1.13 vs 1.11,
# (512, 256) 0.38 vs 0.35, (8192, 1024) 15.9 vs 34.0; at 64 rows 0.81-1.7x. 32 streams of the quickstart model's int4
# decode: 770 against 650 tok/s with the limit at 16. int8 stays at 16 (0.75-1.3x at 32 rows on the small shapes).
# python bench/bench_kernel_rows.py measures both.
MAX_INT4_KERNEL_ROWS = 32
# One int4 weight of at least this many values (its fp32 copy 16 MB, out of cache) takes the kernel for any number of
# fp32 rows: dequantize + GEMM writes and re-reads that copy, while the kernel's int8 products (32 per instruction)
# outrun fp32 FMAs. 2 threads, 2-core AVX2 CPU, kernel vs dequantize + GEMM, (8192, 1024) 1.64-1.73x at 256 rows,
# 1.37-1.72x at 1024; (1024, 4096) and (4096, 1024) 1.12-1.23x at 1024; smaller weights 0.63-1.09x at 256-1024
# rows, so they keep the row limit (bench_kernel_rows.py; the bench preset's dense MLPs are this large).
LARGE_INT4_WEIGHT = 1 << 22
# Values of a quantized weight dequantized at a time for the GEMM of more rows than the kernels take (4 MB in fp32):
# a (8192, 1024) int8 weight and 512 fp32 rows, 2 threads, 109 ms dequantized whole, 77.5 ms a slice at a time,
# 87.5 ms for the GEMM alone on a ready fp32 copy (which too is read from memory); (4096, 1024) 42.1 -> 36.3 ms,
# (1024, 4096) 34.0 -> 33.2 ms; int4 (8192, 256) 22.5 -> 18.7 ms.
DEQUANT_SLICE = 1 << 20
# Where the AMX tile GEMM takes x (bf16), its path for up to 32 rows (csrc/tile_gemm.cpp, pair_task) beats the GEMV
# kernel above this many rows of quantized weights: 2 threads, 12 different (8192, 1024) weights in turn, ms per
# weight, GEMV vs tiles: int4 0.52 vs 0.52 at 8 rows, 0.69 vs 0.52 at 12, 1.00 vs 0.51 at 16; int8 0.54 vs 0.73,
# 0.76 vs 0.75, 1.04 vs 0.73; at 1-4 rows the GEMV kernel is 2-5x as fast.
MAX_ROWS_BEFORE_TILES = 8
# The same for plain (unquantized) weights, against oneDNN's GEMM on them: bf16, 2 threads, the kernel reads
# 1.1-1.8x as fast at 1 to 4 rows, about as fast at 8, 0.5-0.6x at 16 (its products, not the memory, bound it).
MAX_DENSE_ROWS = 8
# The most rows one sequence's speculative verify step may hold with every product on a row-exact kernel: plain
# weights leave the GEMV kernel past MAX_DENSE_ROWS (for oneDNN's GEMM), quantized ones past MAX_ROWS_BEFORE_TILES in
# bf16 on a CPU with AMX (for the tile GEMM, exact activations) and MAX_KERNEL_ROWS otherwise; a quantized model
# keeps some plain weights (its kept units, int4-mixed's int8 ones aside). A probe (2026-12-06, AMX CPU, bf16,
# `small`): 9 rows and more gave other greedy tokens than one, unquantized and in every format; 8 never did.
MAX_EXACT_VERIFY_ROWS = min(MAX_DENSE_ROWS, MAX_ROWS_BEFORE_TILES, MAX_KERNEL_ROWS)
MAX_EXACT_ROWS = 256  # row_exact_linear: beyond a decode batch's and a speculative verify's rows (prefill: GEMM)
# Rows of one linear weight up to which the tile GEMM beats dequantize + oneDNN's GEMM (bf16, 2 threads, bench
# preset shapes, int4 / int8): 1.1-1.5x at 128 rows, 0.97-1.07x at 256, 0.90-0.99x at 512, 0.79-0.88x at 1024.
MAX_TILE_ROWS = 256

def kernel_available() -> bool:
    return extension.compiled() is not None


@functools.lru_cache(maxsize=1)
def tiles_available() -> bool:
    """Whether the AMX tile GEMMs run here (compiled kernels, a CPU with AMX, the process allowed to use it)."""
    ext = extension.compiled()
    return ext is not None and ext.amx_available()


def _tiles(x: torch.Tensor) -> bool:
    """Whether the tile GEMMs take rows x (..., I): bf16 (the tiles' dtype), I a multiple of 32, on CPU."""
    return x.dtype == torch.bfloat16 and x.is_cpu and x.shape[-1] % 32 == 0 and tiles_available()


def _cpu_ext(x: torch.Tensor, rows: int, limit: int | None = None):
    """The extension, if it takes this call: CPU, fp32/bf16, 1..limit (default MAX_KERNEL_ROWS) rows (else None).
    Decode calls this ~100 times a token: it reads only cheap tensor attributes."""
    limit = MAX_KERNEL_ROWS if limit is None else limit
    if 0 < rows <= limit and extension.takes(x):
        return extension.compiled()
    return None


def _quant_limit(x: torch.Tensor, codes: torch.Tensor) -> int:
    """The GEMV kernel's row limit for rows like x through a quantized weight whose codes are `codes` (int4: packed
    uint8): lower where the tile GEMM takes x."""
    if _tiles(x):
        return MAX_ROWS_BEFORE_TILES
    return MAX_INT4_KERNEL_ROWS if codes.dtype is torch.uint8 else MAX_KERNEL_ROWS


def _quant_ext(x: torch.Tensor, rows: int, codes: torch.Tensor):
    """_cpu_ext for `rows` rows x through a quantized weight (`_quant_limit`, asked only above the lower limit: at
    batch 1 this is on every linear's path)."""
    return _cpu_ext(x, rows, None if rows <= MAX_ROWS_BEFORE_TILES else _quant_limit(x, codes))


def _large_int4_ext(x: torch.Tensor, codes: torch.Tensor):
    """The extension for any number of fp32 rows x through one int4 weight of LARGE_INT4_WEIGHT values or more
    (codes: packed (O, I/2) uint8), else None."""
    if codes.dtype is torch.uint8 and codes.dim() == 2 and codes.numel() * 2 >= LARGE_INT4_WEIGHT \
            and x.dtype is torch.float32:
        return _cpu_ext(x, 1)  # no row limit: only the device and dtype are checked
    return None


def _weight_limit(x: torch.Tensor, weight: list[torch.Tensor]) -> int:
    """The GEMV kernel's row limit for rows like x through a weight as the kernels take it: one tensor (plain,
    MAX_DENSE_ROWS) or a quantized format's tensors, codes first (`_quant_limit`)."""
    return MAX_DENSE_ROWS if len(weight) == 1 else _quant_limit(x, weight[0])


def _linear(x: torch.Tensor, bias: torch.Tensor | None, kernel: str, weight: tuple,
            dequantized: Callable[[int, int], torch.Tensor]) -> torch.Tensor:
    """x (..., I) -> (..., O) through one quantized weight (`weight`: the kernel's arguments after x and counts):
    the GEMV kernel `kernel` for up to `_quant_limit` rows on CPU, its tile GEMM (`kernel`_tiles) for bf16 rows up
    to MAX_TILE_ROWS, else GEMMs on the weight dequantized a slice of rows at a time (dequantized(a, b): rows
    a..b, in x's dtype)."""
    rows = x.numel() // x.shape[-1]
    ext = _quant_ext(x, rows, weight[0]) or _large_int4_ext(x, weight[0])
    if ext is not None:  # no counts: one plain weight, x (..., I) as it is
        return _add(getattr(ext, kernel)(x, None, *weight), bias)
    if rows <= MAX_TILE_ROWS and _tiles(x):
        y = getattr(extension.compiled(), kernel + "_tiles")(x.reshape(-1, x.shape[-1]).contiguous(), None, *weight)
        return _add(y.view(*x.shape[:-1], y.shape[-1]), bias)
    return _dequantized_gemm(x, bias, weight[0].shape[0], dequantized)


def _dequantized_gemm(x: torch.Tensor, bias: torch.Tensor | None, out_features: int,
                      dequantized: Callable[[int, int], torch.Tensor]) -> torch.Tensor:
    """x (..., I) @ W.T + bias, on CPU W dequantized DEQUANT_SLICE values (whole 128-row blocks) at a time, each
    slice's GEMM writing its columns of the output: a slice stays in cache between its dequantization and its GEMM,
    where a whole large weight's copy goes to memory and back."""
    step = max(BLOCK, DEQUANT_SLICE // x.shape[-1] // BLOCK * BLOCK)
    if out_features <= step or not x.is_cpu:  # a GPU's memory keeps up with a whole copy
        return F.linear(x, dequantized(0, out_features), bias)
    x2 = x.reshape(-1, x.shape[-1])
    y = x2.new_empty(x2.shape[0], out_features)  # (M, O)
    for a in range(0, out_features, step):
        b = min(a + step, out_features)
        torch.mm(x2, dequantized(a, b).T, out=y[:, a:b])
    return _add(y.view(*x.shape[:-1], out_features), bias)


def linear_weights(x: torch.Tensor, *linears: torch.nn.Module) -> list[list[torch.Tensor]] | None:
    """Each linear's weight as the GEMV kernel takes it (`kernel_weight`: QuantLinear, FusedLinear) for rows x
    (..., I), or None where the kernel takes neither x nor every one of them: no kernel, too many rows, a bias, a
    plain weight in another dtype or another module. The compiled decode blocks (decode_ops) run on these."""
    rows = x.numel() // x.shape[-1]
    if _cpu_ext(x, rows, max(MAX_KERNEL_ROWS, MAX_INT4_KERNEL_ROWS)) is None:
        return None
    weights = [getattr(linear, "kernel_weight", lambda dtype: None)(x.dtype) for linear in linears]
    if any(w is None or rows > MAX_DENSE_ROWS and rows > _weight_limit(x, w) for w in weights):
        return None
    return weights


def _experts(kernel: str, x: torch.Tensor, counts: torch.Tensor, *weight: torch.Tensor | int) -> torch.Tensor | None:
    """Rows x (R, I) grouped by counts (E,) through every hit expert in one call: the GEMV kernel `kernel` for up
    to `_quant_limit` rows per hit expert on average, its tile GEMM beyond; None where the tiles do not take x (I
    not a multiple of 32: an expert's down projection, whose I is expert_ffn_hidden_size)."""
    if _gemv_rows(x, counts, _quant_limit(x, weight[0])):
        return getattr(extension.compiled(), kernel)(x.contiguous(), counts, *weight)
    return getattr(extension.compiled(), kernel + "_tiles")(x.contiguous(), counts, *weight) if _tiles(x) else None


def _add(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return y if bias is None else y + bias


def _deq_ext(t: torch.Tensor, dtype: torch.dtype):
    return extension.compiled() if extension.takes(t, dtype) else None


# ---- plain weights (an unquantized model's linears and experts) ----

def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), through the GEMV kernel for up to MAX_DENSE_ROWS rows on CPU with the weight
    in x's dtype: it reads the weight at the memory's pace, oneDNN's bf16 GEMV at ~60% of that at batch 1."""
    ext = _cpu_ext(x, x.numel() // x.shape[-1], MAX_DENSE_ROWS)
    if ext is None or weight.dtype is not x.dtype or not weight.is_contiguous():
        return F.linear(x, weight, bias)
    return _add(ext.dense_experts(x, None, weight), bias)


def row_exact_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) whose result for a row does not depend on the other rows, up to MAX_EXACT_ROWS
    rows on CPU (the GEMV kernel; a GEMM picks its kernel and its sums' order by shape). The router's logits: a
    token must get the same experts in a decode step of one row and in a speculative verify of several, or with
    int8 activations a last-bit difference grows into another token. Plain F.linear elsewhere."""
    ext = _cpu_ext(x, x.numel() // x.shape[-1], MAX_EXACT_ROWS)
    if ext is None or weight.dtype is not x.dtype:
        return F.linear(x, weight, bias)
    return _add(ext.dense_experts(x.contiguous(), None, weight.contiguous()), bias)


def dense_experts(x: torch.Tensor, counts: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """x (R, I) rows grouped by expert, counts (E,), weight (E, O, I) in x's dtype -> (R, O), every hit expert in
    one kernel call (rows past sum(counts) are zero): the GEMV kernel for up to MAX_DENSE_ROWS rows per hit expert
    on average, the tile GEMM for more in bf16 on a CPU with AMX (one call instead of a GEMM per hit expert: bench
    preset bf16 prefill of 1024 tokens ~1.3x faster); else None (fp32 prefill: the GEMM per expert)."""
    if _cpu_ext(x, 1) is None or weight.dtype != x.dtype:
        return None
    if _gemv_rows(x, counts, MAX_DENSE_ROWS):
        return extension.compiled().dense_experts(x.contiguous(), counts, weight.contiguous())
    if _tiles(x):
        return extension.compiled().dense_experts_tiles(x.contiguous(), counts, weight.contiguous())
    return None


# ---- int8 / fp8 128x128 blocks ----

def int8_activations_reference(x: torch.Tensor, group: int) -> torch.Tensor:
    """x (..., I) as the int8 and int4 kernels read it, in fp32: each group of `group` values (the last may be
    shorter) rounded to steps of amax / 127 (int8 codes times the step)."""
    I = x.shape[-1]
    xg = F.pad(x.float(), (0, -I % group)).unflatten(-1, (-1, group))  # (..., nG, G)
    amax = xg.abs().amax(-1, keepdim=True)
    inverse = torch.where(amax > 0, torch.full_like(amax, 127).div(amax), 0)  # a true division, as the kernel's
    codes = torch.round(xg * inverse)  # half to even, as the kernel's
    return (codes * (amax / 127)).flatten(-2)[..., :I]


def dequantize_reference(values: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """values (..., O, I) int8/fp8, scales (..., nO, nI) fp32 -> (..., O, I) in dtype."""
    O, I = values.shape[-2:]
    expanded = scales.repeat_interleave(BLOCK, dim=-2)[..., :O, :].repeat_interleave(BLOCK, dim=-1)[..., :I]
    return (values.float() * expanded).to(dtype)


def dequantize(values: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """dequantize_reference, in one compiled pass on CPU (the prefill path runs it on each slice of a weight)."""
    ext = _deq_ext(values, dtype)
    if ext is None:
        return dequantize_reference(values, scales, dtype)
    return ext.block_dequantize(values.contiguous(), scales.contiguous(), dtype == torch.bfloat16)


def block_linear_reference(x: torch.Tensor, values: torch.Tensor, scales: torch.Tensor,
                           bias: torch.Tensor | None = None) -> torch.Tensor:
    """What the block kernels compute, in fp32: the dequantized weight times x rounded to int8 steps per 128
    columns (int8 weights) or x itself (fp8)."""
    x_read = int8_activations_reference(x, BLOCK) if values.dtype == torch.int8 else x.float()
    y = F.linear(x_read, dequantize_reference(values, scales, torch.float32))
    return (y if bias is None else y + bias).to(x.dtype)


def block_linear(x: torch.Tensor, values: torch.Tensor, scales: torch.Tensor,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., I) -> (..., O): the kernel for up to `_quant_limit` rows on CPU, the tile GEMM for more bf16 rows,
    else dequantize + GEMM."""
    return _linear(x, bias, "block_experts", (values, scales),
                   lambda a, b: dequantize(values[a:b], scales[a // BLOCK:-(-b // BLOCK)], x.dtype))


def block_experts(x: torch.Tensor, counts: torch.Tensor, values: torch.Tensor, scales: torch.Tensor
                  ) -> torch.Tensor | None:
    """x (R, I) rows grouped by expert, counts (E,), values (E, O, I), scales (E, nO, nI) -> (R, O), every hit
    expert in one kernel call (rows past sum(counts) are zero): the GEMV kernel, or the tile GEMM for more rows;
    None where neither takes x (see `experts_kernel`)."""
    return _experts("block_experts", x, counts, values, scales)


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
    """What the int4 kernel computes, in fp32: x's groups rounded to int8 steps times the dequantized weight."""
    group = packed.shape[-1] * 2 // scales.shape[-1]
    y = F.linear(int8_activations_reference(x, group), group_dequantize_reference(packed, scales, mins, torch.float32))
    return (y if bias is None else y + bias).to(x.dtype)


def group_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., I) -> (..., O) for an int4 weight: the kernel for up to `_quant_limit` rows on CPU, the tile GEMM
    for more bf16 rows, else dequantize + GEMM."""
    group = packed.shape[-1] * 2 // scales.shape[-1]
    return _linear(x, bias, "group_experts", (packed, scales, mins, group),
                   lambda a, b: group_dequantize(packed[a:b], scales[a:b], mins[a:b], x.dtype))


def group_experts(x: torch.Tensor, counts: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
                  mins: torch.Tensor) -> torch.Tensor | None:
    """x (R, I) rows grouped by expert, counts (E,), packed (E, O, I/2), scales and mins (E, O, I/G) -> (R, O),
    every hit expert in one kernel call: the GEMV kernel, or the tile GEMM for more rows; None where neither takes
    x (see `experts_kernel`)."""
    return _experts("group_experts", x, counts, packed, scales, mins, packed.shape[-1] * 2 // scales.shape[-1])


def moe_experts(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, n_ffn: int, identity: bool,
                gate_up: list[torch.Tensor], down: list[torch.Tensor]) -> torch.Tensor | None:
    """A MoE layer's routed experts in one kernel call: x (T, D), ids (T, K) (ids >= n_ffn are zero experts, which
    add weight * x if `identity`, else nothing), weights (T, K) fp32, each projection's stacked tensors in the
    format's order (int4: packed, scales, mins; int8/fp8: values, scales) -> (T, D), the sum over each token's
    slots computed in fp32; plain weights are one tensor each (in x's dtype). None where the kernel does not take
    the call: no kernel, or more than `_quant_limit` (plain: MAX_DENSE_ROWS) rows per hit expert on average
    (prefill, where the tile GEMM, dequantize + GEMM or the GEMM is faster)."""
    ext = _cpu_ext(x, 1)
    limit = moe_row_limit(x, gate_up, down)
    if ext is None or ids.dtype != torch.long or weights.dtype != torch.float32 or limit is None:
        return None
    return ext.moe_experts(x, ids, weights, n_ffn, identity, gate_up, down, limit)


def moe_row_limit(x: torch.Tensor, gate_up: list[torch.Tensor], down: list[torch.Tensor]) -> int | None:
    """The rows per hit expert on average up to which the experts kernel takes rows like x through these stacked
    weights (plain: MAX_DENSE_ROWS; quantized: `_quant_limit`), or None: plain weights of another dtype than x's."""
    if len(gate_up) == 1 and not gate_up[0].dtype == down[0].dtype == x.dtype:
        return None
    return _weight_limit(x, gate_up)


def _gemv_rows(x: torch.Tensor, counts: torch.Tensor, limit: int) -> bool:
    """Whether rows x (R, I) grouped by counts (E,) are at most `limit` per hit expert on average."""
    return x.shape[0] <= limit * max(1, int(counts.count_nonzero()))


def experts_kernel(x: torch.Tensor, counts: torch.Tensor, codes: torch.Tensor) -> bool:
    """Whether the fused expert kernels take rows x (R, I) grouped by counts (E,) through quantized experts whose
    codes are `codes`: CPU, fp32/bf16, at most `_quant_limit` rows per hit expert on average (decode, concurrent
    streams), or more in bf16 on a CPU with AMX (the tile GEMM); else (fp32 prefill, no AMX) they go through
    dequantize + GEMM per expert."""
    return _cpu_ext(x, 1) is not None and (_gemv_rows(x, counts, _quant_limit(x, codes)) or _tiles(x))
