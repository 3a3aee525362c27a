"""Weight quantization: the formats (int8/fp8 blocks, int4 groups), the swapped modules, mixed-precision choice,
the compiled kernels against independent references, and the quantized engine and CLI end to end."""
from __future__ import annotations

import copy
import json
import os
import shutil

import pytest
import torch
from infer_support import greedy_reference, one_thread, prompts, randomized  # noqa: F401  (autouse fixture)

from longcat_flash.checkpoint.fresh import init_checkpoint
from longcat_flash.cli import main
from longcat_flash.infer import extension, kernels, quant
from longcat_flash.infer.engine import Engine, EngineConfig
from longcat_flash.infer.experts import HitExperts, PlainHitExperts, use_hit_experts
from longcat_flash.infer.fused import fuse_for_inference
from longcat_flash.infer.loader import load_for_inference
from longcat_flash.infer.sampling import SamplingParams
from longcat_flash.model.moe import Experts
from longcat_flash.presets import get_preset
from longcat_flash.tokenizer import Tokenizer

FORMATS = ["int8"] + (["fp8"] if hasattr(torch, "float8_e4m3fn") else [])
ALL = [*FORMATS, "int4"]


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
    _, scales = quant.quantize_blockwise(w, "int8")
    assert scales.shape == (3, 2, 1) and scales[1].min() > 30 * scales[0].max()


def test_quant_linear_matches_the_dequantized_reference():
    lin = torch.nn.Linear(256, 384, bias=True)
    q = quant.QuantLinear(lin, "int8")
    x = torch.randn(5, 256)
    if kernels.kernel_available():  # the decode kernel's arithmetic: x rounded to int8 steps
        expected = kernels.block_linear_reference(x, q.values, q.scales, lin.bias)
    else:  # the plain path (no kernels built): the dequantized weight times x itself
        expected = torch.nn.functional.linear(x, kernels.dequantize_reference(q.values, q.scales, x.dtype), lin.bias)
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


@pytest.mark.parametrize("fmt", ALL)
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
    # fp32 -> 1 byte per weight (int4: 0.5625), the embedding kept: int4 saves the most
    assert report.saved_fraction > (0.65 if fmt == "int4" else 0.6)
    error = float((logits - reference).norm() / reference.norm())  # measured: 0.035, 0.094, 0.35
    assert error < {"int8": 0.08, "fp8": 0.2, "int4": 0.45}[fmt]  # e4m3 keeps 3 mantissa bits, int4 16 levels
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
    AVX-512 or AVX2, no C++ compiler); LONGCAT_KERNELS=0 is no reason to skip, so the tests using this fail with it."""
    capability = torch.backends.cpu.get_cpu_capability().lower()
    if "avx512" not in capability and capability != "avx2":
        pytest.skip("the block-quantized kernel needs a CPU with AVX-512 or AVX2")
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("the block-quantized kernel needs a C++ compiler to build")
    build, rows = extension.compiled, []

    class Counted:
        def __init__(self, ext) -> None:
            self.ext = ext

        def __getattr__(self, name):
            fn = getattr(self.ext, name)
            if not name.endswith("_experts"):
                return fn
            return lambda x, *args: rows.append(x.shape[0]) or fn(x, *args)

    monkeypatch.setattr(extension, "compiled", lambda: None if build() is None else Counted(build()))
    return rows


@pytest.mark.parametrize("fmt", [*FORMATS, "int4"])
def test_compiled_dequantization_equals_the_reference_bit_for_bit(fmt, kernel_rows):
    """The prefill's weights (dequantized once per long chunk; the tile GEMMs' panels fill through the same row
    code) are the reference's values, rounded to bf16 exactly as torch rounds: stacked experts, partial blocks and
    a tail past the last 32 columns. A conversion that rounded another way or swapped the halves of 32 values
    fails this."""
    assert extension.compiled() is not None
    torch.manual_seed(3)
    w = torch.randn(3, 300, 192 if fmt == "int4" else 520) * torch.logspace(-3, 1, 300)[:, None]
    if fmt == "int4":
        parts = quant.quantize_groupwise(w)
        compiled, reference = kernels.group_dequantize, kernels.group_dequantize_reference
    else:
        parts = quant.quantize_blockwise(w, fmt)
        compiled, reference = kernels.dequantize, kernels.dequantize_reference
    for dtype in (torch.bfloat16, torch.float32):
        got, want = compiled(*parts, dtype), reference(*parts, dtype)
        assert got.dtype == want.dtype == dtype and torch.equal(got, want)


@pytest.mark.parametrize("fmt", FORMATS)
def test_kernel_equals_the_reference(fmt, kernel_rows):
    """The compiled kernel == the dequantized weight times x (int8 weights: x rounded to int8 steps per 128
    columns, W8A8), in fp32 and bf16, for row counts up to its limit and an odd shape (partial blocks both ways);
    more than 8 rows per call (chunks and a remainder): the experts test. Against the exact product, int8
    activations cost under 1.5% relative error."""
    values, scales = quant.quantize_blockwise(torch.randn(301, 520), fmt)  # 45 rows in the last block: a lone row
    row_counts = (1, 3, 5, kernels.MAX_KERNEL_ROWS)
    for rows in row_counts:
        x = torch.randn(rows, 520)
        x[0, 130] = 0.0
        x[-1, 384:] = 0.0  # the last two blocks (one partial) all zeros: no step to divide by
        expected = kernels.block_linear_reference(x, values, scales)
        y = kernels.block_linear(x, values, scales)
        torch.testing.assert_close(y, expected, atol=1e-3, rtol=1e-4)
        exact = x @ kernels.dequantize_reference(values, scales, torch.float32).T
        assert float((y - exact).norm() / exact.norm()) < (0.015 if fmt == "int8" else 1e-5)
        half = kernels.block_linear(x.bfloat16(), values, scales)
        assert half.dtype == torch.bfloat16
        torch.testing.assert_close(half.float(), kernels.block_linear_reference(x.bfloat16().float(), values, scales),
                                   atol=0.2, rtol=1e-2)  # bf16 output rounding at magnitudes ~20
    assert kernel_rows == [rows for rows in row_counts for _ in ("fp32", "bf16")]  # all through the kernel


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_more_rows_than_the_kernel_takes_go_to_the_reference(fmt, kernel_rows):
    """Up to the format's row limit (int4's is higher: its kernel beats dequantize + GEMM at 32 fp32 rows, int8's
    does not) x meets the weight in the kernel; one row more (prefill-sized) takes the dequantized weight with x as
    it is."""
    parts = quant.quantize_weight(torch.randn(300, 512), fmt)
    limit = kernels.MAX_INT4_KERNEL_ROWS if fmt == "int4" else kernels.MAX_KERNEL_ROWS
    quant_linear = lambda x: quant.quant_linear(x, parts, fmt)  # noqa: E731
    quant_linear(torch.randn(limit, 512))
    assert kernel_rows == [limit]
    kernel_rows.clear()
    x = torch.randn(limit + 1, 512)
    torch.testing.assert_close(quant_linear(x), x @ quant.dequantize_weight(parts, fmt, torch.float32).T)
    assert kernel_rows == []


@pytest.mark.parametrize("fmt", ["int8", "fp8", "int4"])
def test_many_rows_meet_the_weight_dequantized_a_slice_at_a_time(fmt, monkeypatch):
    """Prefill-sized x meets a quantized weight dequantized DEQUANT_SLICE values at a time, each slice's GEMM
    writing its own columns: the same product as the whole weight dequantized at once, with a partial last slice
    (300 rows: 128 + 128 + 44), the bias, and x of any leading shape."""
    monkeypatch.setattr(kernels, "DEQUANT_SLICE", 128 * 512)  # slices of 128 rows
    parts = quant.quantize_weight(torch.randn(300, 512), fmt)
    bias = torch.randn(300)
    x = torch.randn(3, kernels.MAX_INT4_KERNEL_ROWS, 512)
    whole = x @ quant.dequantize_weight(parts, fmt, torch.float32).T + bias
    torch.testing.assert_close(quant.quant_linear(x, parts, fmt, bias), whole, atol=1e-4, rtol=1e-4)


def test_a_large_int4_weight_takes_the_kernel_for_any_number_of_fp32_rows(monkeypatch, kernel_rows):
    """An int4 weight of LARGE_INT4_WEIGHT values or more meets prefill-sized fp32 rows in the kernel (int8
    activations, as at decode), where its dequantized fp32 copy would leave the cache; bf16 rows, and an int8 weight
    as large, keep the row limit."""
    monkeypatch.setattr(kernels, "LARGE_INT4_WEIGHT", 512 * 512)  # the rule, on a weight small enough for a test
    rows = kernels.MAX_INT4_KERNEL_ROWS + 40
    x = torch.randn(rows, 512)
    parts = quant.quantize_weight(torch.randn(512, 512) * 0.02, "int4")
    y = quant.quant_linear(x, parts, "int4")
    assert kernel_rows == [rows]
    # the reference rounds x to int8 steps per group, as the kernel does
    reference = kernels.group_linear_reference(x, *(parts[k] for k in quant.KEYS["int4"]))
    assert float((y - reference).norm() / reference.norm()) < 1e-5
    kernel_rows.clear()
    small = quant.quantize_weight(torch.randn(511, 512) * 0.02, "int4")  # one row under the rule
    quant.quant_linear(x, small, "int4")
    quant.quant_linear(x.bfloat16(), parts, "int4")
    quant.quant_linear(x, quant.quantize_weight(torch.randn(512, 512) * 0.02, "int8"), "int8")
    assert kernel_rows == []


# ---- int4 groups ----

def unpack_by_hand(packed: torch.Tensor) -> torch.Tensor:
    """The documented layout, element by element: in each 32-value chunk, byte j holds value j (low nibble) and
    value j + 16 (high nibble)."""
    rows, half = packed.shape
    q = torch.empty(rows, half * 2, dtype=torch.long)
    for r in range(rows):
        for b in range(half):
            chunk, j = divmod(b, 16)
            q[r, chunk * 32 + j] = int(packed[r, b]) & 15
            q[r, chunk * 32 + j + 16] = int(packed[r, b]) >> 4
    return q


def dequantize_by_hand(packed, scales, mins) -> torch.Tensor:
    q = unpack_by_hand(packed).float()
    group = q.shape[1] // scales.shape[1]
    return q * scales.float().repeat_interleave(group, 1) + mins.float().repeat_interleave(group, 1)


def test_packing_follows_the_documented_layout():
    q = torch.randint(0, 16, (3, 64))
    packed = kernels.pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 32)
    assert int(packed[1, 17]) == int(q[1, 33]) | int(q[1, 49]) << 4  # chunk 1, byte 1: values 33 and 49
    assert torch.equal(unpack_by_hand(packed), q) and torch.equal(kernels.unpack_int4(packed).long(), q)


@pytest.mark.parametrize("in_features", [256, 96])  # groups of 64; 96 is no multiple of 64: groups of 32
def test_int4_round_trip_is_within_its_error_bound(in_features):
    """Each group is at least as close as plain min-max rounding (error <= half a step (max - min) / 15), and the
    stored codes decode, by an independent reading of the layout, to what the library dequantizes to."""
    w = torch.randn(40, in_features) * 0.05
    w[3, 5] = 1.0  # an outlier spoils only its own group
    packed, scales, mins = quant.quantize_groupwise(w)
    group = quant.group_size(in_features)
    assert group == (64 if in_features % 64 == 0 else 32)
    assert packed.shape == (40, in_features // 2) and scales.shape == mins.shape == (40, in_features // group)
    assert scales.dtype == mins.dtype == torch.bfloat16
    restored = dequantize_by_hand(packed, scales, mins)
    torch.testing.assert_close(quant.dequantize_groupwise(packed, scales, mins, torch.float32), restored)
    torch.testing.assert_close(kernels.group_dequantize_reference(packed, scales, mins, torch.float32), restored)
    groups, err = w.view(-1, group), (restored - w).view(-1, group)
    step = (groups.amax(-1) - groups.amin(-1)) / 15
    assert ((err ** 2).sum(-1) <= (groups.shape[1] * (step / 2) ** 2) * 1.02 + 1e-10).all()
    assert float(err.norm() / w.norm()) < 0.12
    rms = err.pow(2).mean(-1).sqrt()  # per group
    outlier = 3 * (in_features // group)  # row 3, group 0
    assert rms[outlier] > 3 * torch.cat([rms[:outlier], rms[outlier + 1:]]).max()


def test_int4_needs_rows_of_a_multiple_of_32(caplog):
    with pytest.raises(ValueError, match="multiple of 32"):
        quant.quantize_groupwise(torch.randn(8, 40))
    model = torch.nn.Sequential(torch.nn.Linear(40, 16), torch.nn.Linear(16, 64))
    model.config = None
    with caplog.at_level("WARNING"):
        report = quant.quantize_model(model, "int4")
    assert report.quantized == ["0", "1"] and model[0].fmt == "int8" and model[1].fmt == "int8"
    assert report.int8_fallback == ["0", "1"] and "2 of 2 units store int8" in caplog.text  # said, not silent


def test_int4_keeps_its_top_units_among_those_it_can_store(tmp_path):
    """keep_top with int4 ranked every unit by its int4 error, and a unit int4 cannot store (experts 48 wide) raised
    from deep inside instead of falling back to int8 as plain int4 does."""
    path = init_checkpoint(get_preset("tiny").replace(expert_ffn_hidden_size=48), tmp_path / "odd", dtype=torch.float32)
    calibration = torch.randint(0, 256, (1, 32))
    model, report = load_for_inference(path, quantize="int4", keep_top=1, calibration=calibration)
    assert report.int8_fallback and set(report.kept).isdisjoint(report.int8_fallback)
    assert report.kept and set(report.kept) <= set(quant.storable(model, "int4"))


@pytest.mark.parametrize("in_features", [192, 160, 544])  # groups of 64; of 32 with a last 32-value chunk;
# 17 groups of 32: a row's scales past one whole vector of 16
def test_int4_kernel_equals_the_reference(kernel_rows, in_features):
    """The compiled int4 kernel == x rounded to int8 steps per group (W4A8) times the hand-dequantized weight, fp32
    and bf16, every 8-row chunk size; a wrong nibble order, group index or activation order would fail this. And
    against the exact product, the int8 activations cost under 1.5% relative error."""
    packed, scales, mins = quant.quantize_groupwise(torch.randn(301, in_features))  # partial block, a lone row
    group = quant.group_size(in_features)
    weight = dequantize_by_hand(packed, scales, mins)
    row_counts = (1, 2, 7, kernels.MAX_INT4_KERNEL_ROWS)  # 8-row chunks: every size below, and full ones
    for rows in row_counts:
        x = torch.randn(rows, in_features)
        x[0, 7] = 0.0
        x[-1, :group] = 0.0  # a group of zeros: no step to divide by
        y = kernels.group_linear(x, packed, scales, mins)
        torch.testing.assert_close(y, kernels.int8_activations_reference(x, group) @ weight.T, atol=1e-4, rtol=1e-4)
        exact = x @ weight.T
        assert float((y - exact).norm() / exact.norm()) < 0.015
        x = x[:kernels.MAX_ROWS_BEFORE_TILES].bfloat16()  # more bf16 rows: the tile GEMM's (test_infer_tiles.py)
        half = kernels.group_linear(x, packed, scales, mins)
        assert half.dtype == torch.bfloat16
        torch.testing.assert_close(half.float(), kernels.group_linear_reference(x, packed, scales, mins).float(),
                                   atol=0.05, rtol=1e-2)
    assert kernel_rows == [n for rows in row_counts for n in (rows, min(rows, kernels.MAX_ROWS_BEFORE_TILES))]


def test_int8_activations_reference_rounds_each_group_to_its_own_step():
    x = torch.tensor([[0.5, -1.0, 0.25, 0.004, 100.0, 1.0, -3.0, 2.0]])
    xq = kernels.int8_activations_reference(x, 4)
    torch.testing.assert_close(xq[0, :4], torch.tensor([64, -127, 32, 1]) / 127)  # step 1/127: 0.004 -> 1 step
    torch.testing.assert_close(xq[0, 4:], torch.tensor([127, 1, -4, 3]) * (100 / 127))  # the outlier's own group


@pytest.mark.parametrize("fmt", ALL)
def test_fused_experts_kernel_equals_the_expert_loop(fmt, kernel_rows, monkeypatch):
    """One kernel call per projection over every hit expert == the per-expert loop through the same kernel (its
    arithmetic is tested above); rows past sum(counts) (zero-expert slots) are zero."""
    torch.manual_seed(3)
    gate_up, down = torch.randn(6, 64, 96) * 0.1, torch.randn(6, 96, 32) * 0.1
    experts = quant.QuantExperts(gate_up, down, fmt)
    counts = torch.tensor([3, 0, 9, 1, 0, 2])
    x = torch.randn(17, 96)
    with monkeypatch.context() as patch:
        patch.setattr(kernels, "MAX_KERNEL_ROWS", 16)  # expert 2's 9 rows through the kernel too
        loop = HitExperts.forward(experts, x, counts)  # the loop, one expert at a time
    kernel_rows.clear()
    torch.testing.assert_close(experts(x, counts), loop, atol=1e-4, rtol=1e-4)
    assert kernel_rows == [17, 17]  # gate_up and down, one call each
    assert experts(x, counts)[15:].abs().max() == 0
    torch.testing.assert_close(experts(x.bfloat16(), counts).float(), loop, atol=0.05, rtol=0.05)


def test_dequantize_kernels_equal_the_references():
    w = torch.randn(3, 200, 160)
    for fmt in ALL:
        parts = quant.quantize_weight(w, fmt)
        reference = (kernels.group_dequantize_reference if fmt == "int4" else kernels.dequantize_reference)
        for dtype in (torch.float32, torch.bfloat16):
            torch.testing.assert_close(quant.dequantize_weight(parts, fmt, dtype), reference(*parts.values(), dtype),
                                       atol=0, rtol=0)


def test_sensitive_units_stay_at_int8():
    """int4-mixed keeps the units int4 disturbs most (measured on their calibration inputs) at int8: here an
    input channel with extreme activations meeting small weights, which int4's group range cannot resolve."""
    model = randomized()
    fuse_for_inference(model)
    layer = model.model.layers[1]
    with torch.no_grad():
        layer.post_attention_layernorm[1].weight[5] *= 50  # channel 5 of mlps.1's input: extreme
        layer.mlps[1].gate_up_proj.weight[:, 5] *= 0.02
    choice = quant.choose_sensitive(model, torch.randint(0, 256, (2, 64)), "int4", fraction=0.05)
    assert choice.kept == ["model.layers.1.mlps.1.gate_up_proj"]
    assert next(iter(choice.quant_error)) == choice.kept[0] and len(choice.quant_error) == len(quant.candidates(model))
    report = quant.quantize_model(model, "int4", keep=choice.kept, keep_fmt="int8")
    assert model.get_submodule(choice.kept[0]).fmt == "int8" and choice.kept[0] not in report.quantized
    assert layer.mlps[1].down_proj.fmt == "int4"
    data_free = quant.choose_sensitive(randomized(), None, "int4", fraction=0.05)
    assert len(data_free.kept) >= 1 and not data_free.activation_amax


@pytest.mark.parametrize("k", [0, 2])
def test_int4_engine_equals_greedy_of_the_same_quantized_model(k, monkeypatch):
    """With every row through the kernel (int8 activations), as decode rows are: the reference's full forwards
    would otherwise take the dequantized weights with exact activations."""
    monkeypatch.setattr(kernels, "MAX_INT4_KERNEL_ROWS", 10**6)
    model = randomized()
    fuse_for_inference(model)
    quant.quantize_model(model, "int4")
    ps = prompts((6, 13, 2), seed=12)
    expected = [greedy_reference(model, p, 8) for p in ps]
    engine = Engine(model, EngineConfig(speculative=k, prefill_chunk=8, token_budget=64, page_size=4,
                                        cache_tokens=256, max_running=4))
    assert engine.generate(ps, SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)) == expected


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("quant") / "tiny"
    main(["init", "--preset", "tiny", "--out", str(out), "--dtype", "float32"])
    return out


@pytest.mark.parametrize("quantize", ["int4", "int4-mixed"])
def test_generate_with_int4_from_the_cli(checkpoint, capsys, quantize):
    """`longcat generate --quantize int4` prints what the engine generates greedily from the int4 model."""
    main(["generate", "--model", str(checkpoint), "--prompt", "import os", "--max-new-tokens", "6", "--ignore-eos",
          "--json", "--quantize", quantize])
    record = json.loads(capsys.readouterr().out)
    model, report = load_for_inference(checkpoint, quantize=quantize)
    assert report.fmt == "int4" and bool(report.kept) == (quantize == "int4-mixed")
    tokenizer = Tokenizer.load(checkpoint)
    out = Engine(model).generate([tokenizer.encode("import os")],
                                 SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True))[0]
    assert record["completion_tokens"] == 6 and record["text"] == tokenizer.decode(out)


def test_unknown_quantize_names_the_choices(checkpoint):
    with pytest.raises(ValueError, match="int4-mixed"):
        load_for_inference(checkpoint, quantize="int3")


@pytest.mark.parametrize("fmt", ["int8", "fp8", "int4"])
def test_a_quantized_model_cast_keeps_its_weight_format(fmt):
    """Casting a quantized model (`.to(torch.bfloat16)`) changes the dtype it computes in, not its weight format:
    codes, scales and mins stay as quantization stored them, bit for bit, and the model still decodes."""
    model = randomized()
    fuse_for_inference(model)
    quant.quantize_model(model, fmt)
    stored = {(id(m), n): b.clone() for m in model.modules() if isinstance(m, quant.QuantizedStorage)
              for n, b in m.named_buffers(recurse=False)}
    model.to(torch.bfloat16)
    after = {(id(m), n): b for m in model.modules() if isinstance(m, quant.QuantizedStorage)
             for n, b in m.named_buffers(recurse=False)}
    assert stored and after.keys() == stored.keys()
    assert all(after[k].dtype == b.dtype and torch.equal(after[k], b) for k, b in stored.items())
    head = model.lm_head
    assert isinstance(head, quant.QuantLinear) and head.weight.dtype == torch.bfloat16
    params = SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True)
    engine = Engine(model, EngineConfig(page_size=2, cache_tokens=64))
    assert len(engine.generate(prompts((5,), seed=1), params)[0]) == 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_exact_linear_gives_a_row_the_same_result_in_any_batch(dtype):
    """The router's logits (kernels.row_exact_linear), and in bf16 every plain linear's decode rows (the same
    GEMV kernel): each row alone and among 2-64 rows, bit for bit. The bf16 kernel once summed a lone row in two
    accumulators and rows in company in one, so a speculative verify could leave plain greedy's tokens."""
    torch.manual_seed(0)
    weight = torch.randn(4096, 4096).to(dtype)  # bf16: another order of the sums flips ~1 in 10^4 rounded outputs
    x = torch.randn(64, 4096).to(dtype)
    alone = torch.cat([kernels.row_exact_linear(x[i:i + 1], weight) for i in range(8)])
    for rows in (2, 3, 5, 8, 33, 64):
        n = min(rows, 8)
        assert torch.equal(alone[:n], kernels.row_exact_linear(x[:rows], weight)[:n]), rows


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_speculative_equals_plain_greedy_with_quantized_activations_in_fp32(tmp_path, fmt):
    """A verify step routes a token among 2-3 rows where plain decode routes it alone; the int8 activations of the
    quantized experts turn a last-bit difference in the router's logits into another token within ~30 tokens
    (found on this random `small` model in fp32, 3 of 5 prompts, before the router went through the GEMV kernel)."""
    path = init_checkpoint(get_preset("small"), tmp_path / "small", dtype=torch.float32, seed=11, std=0.05)
    model, _ = load_for_inference(path, quantize=fmt)
    ps = prompts((3, 5, 9, 14, 20), vocab=8192, seed=4)
    sampling = SamplingParams(max_new_tokens=40, temperature=0.0, ignore_eos=True)
    plain = Engine(model, EngineConfig(max_running=1)).generate(ps, sampling)
    assert Engine(model, EngineConfig(max_running=1, speculative=2)).generate(ps, sampling) == plain


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return init_checkpoint(get_preset("tiny"), tmp_path_factory.mktemp("quant_options") / "tiny", dtype=torch.float32)


@pytest.mark.parametrize("options, message", [
    ({"quantize": "int4-mixed", "keep_top": 2}, "keep_top applies to int8 / fp8 / int4, not to int4-mixed"),
    ({"keep_top": 2}, "keep_top keeps units of a quantized model in its dtype: give quantize"),
    ({"quantize": "int8", "calibration": torch.ones(1, 8, dtype=torch.long)}, "calibration ids pick the units"),
    ({"calibration": torch.ones(1, 8, dtype=torch.long)}, "calibration ids pick the units"),  # read by nothing
    ({"quantize": "int8", "keep_fraction": 0.3}, "keep_fraction applies to int4-mixed only"),
    ({"quantize": "int4-mixed", "keep_fraction": 0.0}, r"keep_fraction must be in \(0, 1\]"),
    ({"quantize": "int4-mixed", "keep_fraction": True}, r"keep_fraction must be in \(0, 1\]"),  # read as 1.0
    ({"quantize": "int8", "keep_top": True, "calibration": torch.ones(1, 8, dtype=torch.long)},  # read as 1
     "keep_top must be an integer >= 0, got True"),
    ({"quantize": "int8", "keep_top": 1, "calibration": torch.arange(10)}, "integer token ids of shape"),
    ({"quantize": "int8", "keep_top": 1, "calibration": torch.rand(1, 10)}, "integer token ids of shape"),
    ({"quantize": "int8", "keep_top": 1, "calibration": torch.ones(1, 1, dtype=torch.long)}, "2 to 512 tokens"),
    ({"quantize": "int8", "keep_top": 1, "calibration": torch.ones(1, 600, dtype=torch.long)}, "2 to 512 tokens"),
])
def test_quantization_options_a_format_would_ignore_or_cannot_use_are_refused_before_loading(
        options, message, tiny_checkpoint, monkeypatch):
    monkeypatch.setattr("longcat_flash.infer.loader.LongcatFlash.from_pretrained",
                        lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(ValueError, match=message):
        load_for_inference(tiny_checkpoint, **options)


def test_a_numpy_keep_fraction_is_a_number():
    """The bool check first written for keep_fraction refused np.float32(0.3) as out of (0, 1]."""
    import numpy as np

    from longcat_flash.infer.loader import _check_keep_options

    _check_keep_options("int4-mixed", 0, np.float32(0.3), None)  # no error
    with pytest.raises(ValueError, match=r"keep_fraction must be in \(0, 1\]"):
        _check_keep_options("int4-mixed", 0, np.float32(1.5), None)
