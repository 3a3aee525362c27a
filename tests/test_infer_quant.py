"""Block-wise quantization: the format, the swapped modules, mixed-precision choice, and the CPU expert loop."""
from __future__ import annotations

import copy
import os
import shutil

import pytest
import torch
from infer_support import one_thread, randomized  # noqa: F401  (autouse fixture)

from longcat_flash.infer import kernels, quant
from longcat_flash.infer.experts import PlainHitExperts, use_hit_experts
from longcat_flash.model.moe import Experts

FORMATS = ["int8"] + (["fp8"] if hasattr(torch, "float8_e4m3fn") else [])


@pytest.mark.parametrize("fmt", FORMATS)
def test_blocks_have_their_own_scale(fmt):
    w = torch.randn(300, 260) * 0.02  # not multiples of 128: partial edge blocks
    w[5, 7] = 50.0  # an outlier spoils only block (0, 0)
    values, scales = quant.quantize_blockwise(w, fmt)
    assert values.shape == w.shape and scales.shape == (3, 3) and scales.dtype == torch.float32
    restored = quant.dequantize_blockwise(values, scales, torch.float32)
    tolerance = 0.02 if fmt == "int8" else 0.07  # int8: half a step of 1/127; e4m3: 3 mantissa bits
    outside = torch.ones_like(w, dtype=torch.bool)
    outside[:128, :128] = False
    rel = ((restored - w).abs() / w.abs().clamp(min=1e-3))[outside]
    assert rel.median() < tolerance
    assert scales[0, 0] > 100 * scales[1, 1]


def test_stacked_expert_weights_are_blocked_per_expert():
    w = torch.randn(3, 256, 128)
    w[1] *= 100
    values, scales = quant.quantize_blockwise(w, "int8")
    assert scales.shape == (3, 2, 1) and scales[1].min() > 30 * scales[0].max()


def test_quant_linear_matches_the_dequantized_reference():
    lin = torch.nn.Linear(256, 384, bias=True)
    q = quant.QuantLinear(lin, "int8")
    x = torch.randn(5, 256)
    expected = torch.nn.functional.linear(x, q.weight, lin.bias)
    torch.testing.assert_close(q(x), expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(q(x), lin(x), atol=0.05, rtol=0.05)


def test_hit_experts_equal_grouped_experts():
    experts = Experts(6, 64, 32)
    torch.nn.init.normal_(experts.gate_up_proj, 0, 0.1)
    torch.nn.init.normal_(experts.down_proj, 0, 0.1)
    loop = PlainHitExperts(experts.gate_up_proj.data, experts.down_proj.data)
    counts = torch.tensor([3, 0, 0, 5, 1, 0])
    x = torch.randn(9, 64)
    torch.testing.assert_close(loop(x, counts), experts(x, counts), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantized_model_stays_close_and_saves_memory(fmt):
    model = randomized()
    use_hit_experts(model)
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        reference = model(ids).logits
        report = quant.quantize_model(model, fmt)
        logits = model(ids).logits
    assert any(n.endswith("mlp.experts") for n in report.quantized) and "lm_head" in report.quantized
    assert not any("router" in n or "kv_b_proj" in n for n in report.quantized)
    assert report.saved_fraction > 0.6  # fp32 -> 1 byte per weight
    error = float((logits - reference).abs().max() / reference.abs().max())
    assert error < (0.1 if fmt == "int8" else 0.2)  # e4m3 keeps 3 mantissa bits
    assert isinstance(model.model.layers[0].mlp.experts, quant.QuantExperts)


def test_mixed_precision_keeps_the_extreme_units():
    model = randomized()
    with torch.no_grad():
        model.model.layers[1].mlps[0].down_proj.weight[0, :] *= 40  # large block error
        model.model.layers[0].self_attn[1].o_proj.weight.mul_(30)  # large inputs downstream (h)
    choice = quant.choose_kept(model, torch.randint(0, 256, (1, 16)), "int8", top=1)
    assert "model.layers.1.mlps.0.down_proj" in choice.kept
    assert len(choice.kept) <= 2 and set(choice.activation_amax) == set(choice.quant_error)
    before = copy.deepcopy(model)
    report = quant.quantize_model(model, "int8", keep=choice.kept)
    assert set(report.kept) == set(choice.kept)
    kept = model.get_submodule(choice.kept[0])
    assert type(kept) is type(before.get_submodule(choice.kept[0]))


@pytest.fixture
def kernel_rows(monkeypatch) -> list[int]:
    """Row counts of the calls that reached the compiled kernel. Skips where this machine cannot build it (no
    AVX-512, no C++ compiler); LONGCAT_KERNELS=0 is no reason to skip, so the tests using this fail with it."""
    if "avx512" not in torch.backends.cpu.get_cpu_capability().lower():
        pytest.skip("the block-quantized kernel needs a CPU with AVX-512")
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("the block-quantized kernel needs a C++ compiler to build")
    build, rows = kernels._extension, []

    class Counted:
        def __init__(self, ext) -> None:
            self.ext = ext

        def block_linear(self, x, values, scales):
            rows.append(x.shape[0])
            return self.ext.block_linear(x, values, scales)

    monkeypatch.setattr(kernels, "_extension", lambda: None if build() is None else Counted(build()))
    return rows


@pytest.mark.parametrize("fmt", FORMATS)
def test_kernel_equals_the_reference(fmt, kernel_rows):
    """The compiled kernel == dequantize + F.linear, in fp32 and bf16, for row counts up to its limit (every
    8-row chunk size and a remainder) and an odd shape (partial blocks both ways)."""
    values, scales = quant.quantize_blockwise(torch.randn(300, 520), fmt)
    row_counts = (1, 3, 8, 13, kernels.MAX_KERNEL_ROWS)
    for rows in row_counts:
        x = torch.randn(rows, 520)
        expected = kernels.block_linear_reference(x, values, scales)
        torch.testing.assert_close(kernels.block_linear(x, values, scales), expected, atol=1e-3, rtol=1e-4)
        half = kernels.block_linear(x.bfloat16(), values, scales)
        assert half.dtype == torch.bfloat16
        torch.testing.assert_close(half.float(), kernels.block_linear_reference(x.bfloat16().float(), values, scales),
                                   atol=0.2, rtol=1e-2)  # bf16 output rounding at magnitudes ~20
    assert kernel_rows == [rows for rows in row_counts for _ in ("fp32", "bf16")]  # all through the kernel


def test_more_rows_than_the_kernel_takes_go_to_the_reference(kernel_rows):
    values, scales = quant.quantize_blockwise(torch.randn(300, 520), "int8")
    x = torch.randn(kernels.MAX_KERNEL_ROWS + 1, 520)
    torch.testing.assert_close(kernels.block_linear(x, values, scales),
                               kernels.block_linear_reference(x, values, scales))
    assert kernel_rows == []
