"""An unquantized model's weights through the GEMV kernel (kernels.dense_linear, kernels.dense_experts and the MoE
kernel with plain experts): what F.linear computes, for decode rows."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from infer_support import assert_bf16_gemm, one_thread, randomized, record_kernel_calls  # noqa: F401

from longcat_flash.infer import kernels
from longcat_flash.infer.experts import HitExperts, PlainHitExperts
from longcat_flash.infer.fused import FusedLinear, fuse_for_inference

pytestmark = pytest.mark.skipif(not kernels.kernel_available(), reason="needs the compiled kernels")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(200, 96), (33, 1000), (1, 17)])  # partial 32-row tasks, 32-value tails
@pytest.mark.parametrize("rows", [1, 3, kernels.MAX_DENSE_ROWS])
def test_a_linear_runs_decode_rows_through_the_kernel(dtype, shape, rows, monkeypatch):
    calls = record_kernel_calls(monkeypatch, {"dense_experts"})
    torch.manual_seed(rows)
    linear = torch.nn.Linear(shape[1], shape[0], bias=dtype == torch.float32).to(dtype)
    x = torch.randn(1, rows, shape[1]).to(dtype)
    y = FusedLinear(linear)(x)
    assert calls == ["dense_experts"] and y.shape == (1, rows, shape[0])
    if dtype == torch.bfloat16:
        assert_bf16_gemm(y[0], x[0], linear.weight)
    else:
        torch.testing.assert_close(y, F.linear(x, linear.weight, linear.bias), atol=1e-5, rtol=1e-5)


def test_more_rows_take_torchs_gemm(monkeypatch):
    calls = record_kernel_calls(monkeypatch, {"dense_experts"})
    linear = torch.nn.Linear(64, 48).bfloat16()
    x = torch.randn(2, kernels.MAX_DENSE_ROWS, 64).bfloat16()
    assert torch.equal(FusedLinear(linear)(x), F.linear(x, linear.weight, linear.bias))
    assert calls == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_hit_expert_in_one_call(dtype, monkeypatch):
    """Rows grouped by expert, experts with no rows, one with a single row; rows past sum(counts) (zero-expert
    slots) come out zero; each expert's rows meet that expert's weight only."""
    calls = record_kernel_calls(monkeypatch, {"dense_experts"})
    torch.manual_seed(2)
    gate_up, down = (torch.randn(5, 96, 40) * 0.2).to(dtype), (torch.randn(5, 40, 48) * 0.2).to(dtype)
    counts = torch.tensor([3, 0, 1, 8, 0])
    x = torch.randn(16, 40).to(dtype)  # 12 routed rows, 4 zero-expert slots
    y = kernels.dense_experts(x, counts, gate_up)
    assert y.shape == (16, 96) and not y[12:].any()
    for e, rows in ((0, slice(0, 3)), (2, slice(3, 4)), (3, slice(4, 12))):
        if dtype == torch.bfloat16:
            assert_bf16_gemm(y[rows], x[rows], gate_up[e])
        else:
            torch.testing.assert_close(y[rows], F.linear(x[rows], gate_up[e]), atol=1e-5, rtol=1e-5)
    experts = PlainHitExperts(gate_up, down)
    tol = {"atol": 2e-2, "rtol": 2e-2} if dtype == torch.bfloat16 else {"atol": 1e-5, "rtol": 1e-5}
    calls.clear()
    torch.testing.assert_close(experts(x, counts), HitExperts.forward(experts, x, counts), **tol)
    assert calls == ["dense_experts", "dense_experts"]


def test_fp32_beyond_the_gemv_rows_takes_the_experts_loop():
    torch.manual_seed(3)
    experts = PlainHitExperts(torch.randn(2, 32, 16), torch.randn(2, 16, 16))
    counts = torch.tensor([kernels.MAX_DENSE_ROWS + 4, kernels.MAX_DENSE_ROWS + 4])
    assert kernels.dense_experts(torch.randn(int(counts.sum()), 16), counts, experts.gate_up_proj) is None


@pytest.mark.parametrize("tokens", [1, 3, 12])
def test_a_bf16_moe_runs_its_routed_part_in_one_kernel_call(tokens, monkeypatch):
    """The whole routed part of a bf16 MoE (plain experts) in one call: the model's MoE up to bf16 rounding (the
    kernel sums each token's slots in fp32 and rounds once; the model rounds each expert's output)."""
    model = randomized().bfloat16()
    fused = copy.deepcopy(model)
    fuse_for_inference(fused)
    calls = record_kernel_calls(monkeypatch, {"moe_experts"})
    x = torch.randn(1, tokens, 64).bfloat16()
    with torch.no_grad():
        (expected, info), (out, fused_info) = model.model.layers[1].mlp(x), fused.model.layers[1].mlp(x)
    assert calls == ["moe_experts"] and torch.equal(info.ids, fused_info.ids)
    torch.testing.assert_close(out, expected, atol=2e-2, rtol=2e-2)
