"""The AMX tile GEMMs (csrc/tile_gemm.cpp): quantized weights times more bf16 rows than the GEMV kernels take
(concurrent streams, prefill), with no dequantized copy of the weight in memory."""
from __future__ import annotations

import pytest
import torch
from infer_support import assert_bf16_gemm, record_kernel_calls

from longcat_flash.infer import kernels, quant
from longcat_flash.infer.experts import PlainHitExperts

pytestmark = pytest.mark.skipif(not kernels.tiles_available(),
                                reason="the tile GEMMs need a CPU with AMX and the compiled kernels")


@pytest.fixture
def tile_calls(monkeypatch) -> list[str]:
    """Names of the tile GEMM entry points called."""
    return record_kernel_calls(monkeypatch, {"block_experts_tiles", "group_experts_tiles", "dense_experts_tiles"})


@pytest.mark.parametrize("fmt,in_features", [("int4", 256), ("int4", 96), ("int8", 160), ("fp8", 96), ("int4", 320)])
@pytest.mark.parametrize("rows", [5, 16, 40, 100])  # x (2, rows): up to 32 rows of x the small-batch path
def test_linear_beyond_the_gemv_rows_is_the_bf16_gemm_on_the_dequantized_weight(fmt, in_features, rows,
                                                                                 tile_calls):
    """Odd shapes: 200 output rows (partial 16-, 32- and 128-row blocks), int4 groups of 64 and of 32, inputs of
    less than one chunk and of one and a half (320), row counts that leave a partial 16-row block of x."""
    torch.manual_seed(rows)
    linear = torch.nn.Linear(in_features, 200, bias=False).bfloat16()
    unit = quant.QuantLinear(linear, fmt)
    x = torch.randn(2, rows, in_features, dtype=torch.bfloat16)
    y = unit(x)
    assert tile_calls == [("group" if fmt == "int4" else "block") + "_experts_tiles"]
    assert_bf16_gemm(y.reshape(-1, 200), x.reshape(-1, in_features), unit.weight)


@pytest.mark.parametrize("fmt", ["int4", "int8", "plain"])
def test_every_hit_expert_in_one_call(fmt, tile_calls):
    """Rows grouped by expert, some experts with no rows, a few with one; rows past sum(counts) (zero-expert
    slots) come out zero; each expert's rows meet that expert's weight only. "plain": unquantized bf16 experts
    (bf16 prefill), the panel a copy of the weight's rows."""
    torch.manual_seed(1)
    gate_up, down = torch.randn(6, 128, 64) * 0.1, torch.randn(6, 64, 64) * 0.1
    counts = torch.tensor([40, 0, 1, 70, 0, 3])
    x = torch.randn(int(counts.sum()) + 5, 64, dtype=torch.bfloat16)
    if fmt == "plain":
        experts = PlainHitExperts(gate_up.bfloat16(), down.bfloat16())
        w = experts.gate_up_proj
        y, name = kernels.dense_experts(x, counts, w), "dense_experts_tiles"
    else:
        experts = quant.QuantExperts(gate_up, down, fmt)
        parts = experts.parts("gate_up_proj")
        fused = kernels.group_experts if fmt == "int4" else kernels.block_experts
        y, name = fused(x, counts, *parts.values()), ("group" if fmt == "int4" else "block") + "_experts_tiles"
        w = quant.dequantize_weight(parts, fmt, torch.bfloat16)  # (6, 128, 64)
    assert tile_calls == [name]
    start = 0
    for e, n in enumerate(counts.tolist()):
        if n:
            assert_bf16_gemm(y[start:start + n], x[start:start + n], w[e])
        start += n
    assert y[start:].abs().max() == 0
    tile_calls.clear()
    out = experts(x, counts)  # gate_up, SwiGLU, down: both projections through the tiles
    assert tile_calls == [name] * 2 and out[start:].abs().max() == 0


@pytest.mark.parametrize("fmt", ["int8", "fp8", "plain"])
def test_experts_whose_hidden_width_the_tiles_cannot_take_run_expert_by_expert(fmt, tile_calls):
    """expert_ffn_hidden_size 40 (not a multiple of 32): the tiles took gate_up's input (the model width) and were
    then handed the down projection's 40-wide rows, a RuntimeError from the quantized kernel and a None taken for
    the result of the plain one, so a bf16 prefill on an AMX CPU failed. Such experts run one by one, as they
    compute without the kernels."""
    torch.manual_seed(2)
    gate_up, down = torch.randn(4, 80, 64) * 0.1, torch.randn(4, 64, 40) * 0.1
    counts = torch.tensor([30, 0, 25, 9])
    x = torch.randn(int(counts.sum()), 64, dtype=torch.bfloat16)
    if fmt == "plain":
        experts = PlainHitExperts(gate_up.bfloat16(), down.bfloat16())
    else:
        experts = quant.QuantExperts(gate_up, down, fmt)
    out = experts(x, counts)
    project = experts.project if fmt == "plain" else experts.dequantized_project
    torch.testing.assert_close(out, experts.each_hit(x, counts, project), rtol=0, atol=0)


def test_decode_rows_fp32_and_long_prefill_stay_off_the_tiles(tile_calls):
    """The GEMV kernel keeps decode rows (up to MAX_ROWS_BEFORE_TILES in bf16, more in fp32); fp32 keeps
    its GEMM (the tiles would round x to bf16); a linear with more than MAX_TILE_ROWS rows goes back to dequantize +
    GEMM, faster there."""
    unit = quant.QuantLinear(torch.nn.Linear(64, 48), "int4")
    unit(torch.randn(kernels.MAX_ROWS_BEFORE_TILES, 64).bfloat16())
    unit(torch.randn(kernels.MAX_KERNEL_ROWS, 64))
    unit(torch.randn(kernels.MAX_KERNEL_ROWS + 1, 64))
    unit = quant.QuantLinear(torch.nn.Linear(64, 48).bfloat16(), "int4")
    x = torch.randn(kernels.MAX_TILE_ROWS + 1, 64).bfloat16()
    assert torch.equal(unit(x), torch.nn.functional.linear(x, unit.weight, unit.bias))
    assert tile_calls == []
