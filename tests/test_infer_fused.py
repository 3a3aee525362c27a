"""Each inference twin (infer/fused.py) computes what its model module computes."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from infer_support import (
    greedy_reference,
    one_thread,  # noqa: F401  (autouse fixture)
    prompts,
    randomized,
    record_kernel_calls,
)

from longcat_flash.infer import decode_ops, extension, kernels, quant
from longcat_flash.infer.cache import CacheConfig, PagedLatentCache
from longcat_flash.infer.engine import Engine, EngineConfig
from longcat_flash.infer.fused import (
    FusedMLA,
    FusedMLP,
    FusedMoE,
    FusedMTPHead,
    FusedRMSNorm,
    FusedScMoELayer,
    fuse_for_inference,
    rotate,
)
from longcat_flash.infer.sampling import SamplingParams
from longcat_flash.model.layers import RMSNorm, apply_rope


@pytest.fixture(scope="module")
def pair():
    model = randomized()
    fused = copy.deepcopy(model)
    assert fuse_for_inference(fused) > 0
    return model, fused


def test_every_module_has_its_twin(pair):
    _, fused = pair
    layer = fused.model.layers[0]
    assert all(isinstance(a, FusedMLA) for a in layer.self_attn) and isinstance(fused.model.mtp.self_attn, FusedMLA)
    assert isinstance(layer.mlps[0], FusedMLP) and isinstance(layer.mlp, FusedMoE)
    assert all(type(layer) is FusedScMoELayer for layer in fused.model.layers)  # the whole layer at decode
    assert type(fused.model.mtp) is FusedMTPHead  # the whole head at decode
    norms = [m for m in fused.modules() if isinstance(m, RMSNorm)]
    assert norms and all(type(m) is FusedRMSNorm for m in norms)  # the attention twins' latent norms too


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rope_is_bitwise_the_model_rope(dtype):
    """The compiled RoPE rounds each product and sum as torch's separate ops do: the same bits, for a split's
    strided view with heads (q), without heads (k), and a non-uniform view it copies first."""
    B, S, H, N, R = 2, 5, 4, 16, 32
    angles = torch.rand(B, S, R // 2) * 50
    rope = (angles.cos().to(dtype), angles.sin().to(dtype))
    q = (torch.randn(B, S, H, N + R) * 2).to(dtype)
    kv = (torch.randn(B, S, 24 + R) * 2).to(dtype)
    for x, r in ((q[..., N:], rope), (kv[..., 24:], rope), (q[:, :3, :, N:], tuple(t[:, :3] for t in rope))):
        expected = apply_rope(x, *r)  # the last: 3 of 5 positions, rows not evenly apart in memory
        assert torch.equal(rotate(x, r), expected)
        if kernels.kernel_available():
            assert decode_ops.rope(x, *r) is not None  # the kernel took it


@pytest.mark.skipif(not kernels.kernel_available(), reason="needs the compiled kernels")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_norm_and_rope_read_rows_where_they_lie(dtype):
    """RMSNorm and RoPE read a slice of wider rows in place (the projections' split, no copy first) and a contiguous
    tensor whose size-1 dimension reports another stride (heads moved before a length-1 sequence) row by row: the
    same bits as on a plain contiguous copy."""
    B, H, R, wide = 3, 4, 32, 80
    ext = extension.compiled()
    weight = torch.randn(R).to(dtype)
    angles = torch.rand(B, 1, R // 2) * 50
    rope = (angles.cos().to(dtype), angles.sin().to(dtype))
    rows = (torch.randn(B, 2, wide) * 2).to(dtype)[..., 16:16 + R]  # (B, 2, R): rows `wide` apart
    heads = (torch.randn(B, 1, H, R) * 2).to(dtype)
    moved = heads.transpose(1, 2)  # (B, H, 1, R), contiguous, its size-1 dimension's stride H * R
    assert not rows.is_contiguous() and moved.is_contiguous() and moved.stride(-2) != R
    assert torch.equal(ext.rms_norm(rows, weight, 1e-6), ext.rms_norm(rows.contiguous(), weight, 1e-6))
    assert torch.equal(ext.rms_norm(moved, weight, 1e-6), ext.rms_norm(heads, weight, 1e-6).transpose(1, 2))
    assert torch.equal(ext.rope(moved, *rope), ext.rope(heads, *rope).transpose(1, 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_norm_computes_the_model_norm(dtype):
    """One compiled op, the model's arithmetic (fp32 math, rounded to x's dtype before the weight), up to the last
    bit (the sum of squares runs in another order); rows of any length, one row (decode) or many."""
    for shape in [(1, 1, 1024), (3, 7, 520), (2, 300, 64)]:
        norm = RMSNorm(shape[-1], 1e-6).to(dtype)
        with torch.no_grad():
            norm.weight.copy_(torch.randn(shape[-1]))
        twin = FusedRMSNorm(norm)
        x = (torch.randn(shape) * 3).to(dtype)
        with torch.no_grad():
            expected, got = norm(x), twin(x)
        assert got.dtype == dtype
        ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -22  # relative, with one rounding more or less
        torch.testing.assert_close(got.float(), expected.float(), atol=1e-6, rtol=ulp * 2)
        if dtype == torch.bfloat16:  # one fp32 ulp rarely moves a bf16 rounding
            assert (got == expected).float().mean() > 0.99
        if kernels.kernel_available():
            assert decode_ops.rms_norm(x, norm.weight, norm.eps) is not None  # the kernel took it


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_swiglu_computes_the_model_swiglu(dtype):
    """silu(gate) * up in one compiled op, each op rounded as torch's: its exp is within a few fp32 ulp of torch's,
    so fp32 agrees to ~1e-6 and bf16 to the last bit nearly everywhere; gates far out on both sides, odd widths."""
    for shape in [(1, 1, 2 * 4096), (7, 3, 2 * 40), (2, 2 * 16)]:
        h = (torch.randn(shape) * 4).to(dtype)
        h[..., 0] = 100.0  # exp(-g) underflows
        h[..., 1] = -100.0  # exp(-g) overflows: silu -> -0
        gate, up = h.chunk(2, dim=-1)
        expected = F.silu(gate) * up
        got = decode_ops.swiglu(h)
        assert got.dtype == dtype and got.shape == expected.shape
        if dtype == torch.float32:
            torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
        else:
            torch.testing.assert_close(got.float(), expected.float(), atol=1e-6, rtol=2.0 ** -7)
            assert (got == expected).float().mean() > 0.99
        if kernels.kernel_available():
            torch.testing.assert_close(extension.compiled().swiglu(h), got, atol=0, rtol=0)  # the kernel's result


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_absorbed_attention_computes_the_python_path(pair, dtype, monkeypatch):
    """The compiled absorbed attention gives what FusedMLA's fp32 bmm path gives (up to the order of fp32 sums) and
    what the model's own absorbed path gives: several sequences and query positions, a causal mask with a ragged
    end, a row with no slot (zeros, as the model's nan_to_num gives), and the cache's strided views read in place."""
    model, fused = pair
    mla, twin = model.model.layers[0].self_attn[1], fused.model.layers[0].self_attn[1]
    mla, twin = copy.deepcopy(mla).to(dtype), copy.deepcopy(twin).to(dtype)
    assert twin.w_uk.dtype == twin.w_uv_t.dtype == dtype  # kv_b_proj's, the bytes the kernel reads
    B, S, L, H = 3, 4, 11, twin.n_heads
    N, R, C = twin.nope_dim, twin.rope_dim, twin.kv_lora_rank
    q = torch.randn(B, S, H, N + R).to(dtype)
    cached = torch.randn(B, L, C + R).to(dtype)  # as the cache's gather returns it: latent | k_rope per slot
    q_nope, q_rope, latent, k_rope = q[..., :N], q[..., N:], cached[..., :C], cached[..., C:]
    mask = torch.arange(L)[None, None, :] <= torch.tensor([[7, 8, 9, 10], [0, 1, 2, 3], [4, 5, 6, 7]])[:, :, None]
    mask[2, 1] = False  # a row with no slot
    with torch.no_grad():
        got = twin.attend_absorbed(q_nope, q_rope, latent, k_rope, mask)
        if kernels.kernel_available():
            kernel = decode_ops.absorbed_attention(q_nope, q_rope, latent, k_rope, mask, twin.w_uk, twin.w_uv_t,
                                                   twin.softmax_scale)
            fp32_weights = decode_ops.absorbed_attention(q_nope, q_rope, latent, k_rope, mask, twin.w_uk.float(),
                                                         twin.w_uv_t.float(), twin.softmax_scale)
            # the kernel took it, and reads bf16 weights as the fp32 values they are
            torch.testing.assert_close(kernel, fp32_weights, atol=0, rtol=0)
        with monkeypatch.context() as patch:
            patch.setattr(decode_ops, "absorbed_attention", lambda *args: None)
            python_path = twin.attend_absorbed(q_nope, q_rope, latent, k_rope, mask)
        # the model's: q's scale folded into the twin's q_b_proj, so its query here is the same q
        model_path = mla.attend_absorbed(q_nope, q_rope, latent, k_rope, mask)
    ok = mask.any(-1)  # the Python path leaves NaN where a row has no slot (the cache never asks for one)
    rounding = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.01, rtol=0.02)
    torch.testing.assert_close(got[ok], python_path[ok], **rounding)
    rows = slice(None) if kernels.kernel_available() else ok
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.02, rtol=0.05)
    torch.testing.assert_close(got[rows], model_path[rows], **tol)


def test_a_fused_attention_has_every_attribute_of_its_mla(pair):
    """FusedMLA is built as an MLA of the same config, so a field added to MLA reaches it too."""
    model, fused = pair
    mla, twin = model.model.layers[0].self_attn[0], fused.model.layers[0].self_attn[0]
    fields = {name: value for name, value in vars(mla).items() if not name.startswith("_") and name != "training"}
    folded = {"q_scale", "kv_scale"}  # 1.0 in the twin: folded into its weights
    assert {name: getattr(twin, name, "missing") for name in fields.keys() - folded} == {
        name: value for name, value in fields.items() if name not in folded}
    assert (twin.q_scale, twin.kv_scale) == (1.0, 1.0) and mla.q_scale != 1.0
    fused_away = {"q_a_proj", "kv_a_proj_with_mqa"}  # one qkv_a_proj in the twin
    assert {name for name, _ in mla.named_children()} - fused_away <= {name for name, _ in twin.named_children()}


@pytest.mark.parametrize("tokens", [1, 3, 40])  # host-routed MoE for few tokens, sorted dispatch for many
def test_fused_modules_match(pair, tokens):
    model, fused = pair
    x = torch.randn(1, tokens, 64)
    rope = model.model.rotary(torch.arange(tokens)[None], x.dtype)
    a, b = model.model.layers[1], fused.model.layers[1]
    with torch.no_grad():
        for ref, twin in ((a.self_attn[0], b.self_attn[0]), (a.mlps[1], b.mlps[1])):
            args = (x, rope) if isinstance(ref, type(a.self_attn[0])) else (x,)
            torch.testing.assert_close(twin(*args), ref(*args), atol=1e-5, rtol=1e-4)
        (out_a, info_a), (out_b, info_b) = a.mlp(x), b.mlp(x)
        torch.testing.assert_close(out_b, out_a, atol=1e-5, rtol=1e-4)
        assert torch.equal(info_a.ids, info_b.ids)


@pytest.mark.parametrize("k", [0, 2])
def test_fused_engine_matches_the_reference_model(pair, k):
    model, fused = pair
    ps = prompts((6, 13, 2), seed=11)
    params = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)
    expected = [greedy_reference(model, p, 8) for p in ps]
    engine = Engine(fused, EngineConfig(speculative=k, prefill_chunk=8, token_budget=64, page_size=4,
                                        cache_tokens=256, max_running=4))
    assert engine.generate(ps, params) == expected


@pytest.mark.skipif(not kernels.kernel_available(), reason="needs the compiled kernels")
def test_absorbed_decode_reads_the_paged_cache_in_place(pair, monkeypatch):
    """Sequences growing in turns over 2-token pages (each context scattered through the pool): the attention
    kernel reads every context row where it lies, through a read index, and greedy decoding is the reference's."""
    model, fused = pair
    build, reads = extension.compiled, []

    class Recorded:
        def __getattr__(self, name):
            fn = getattr(build(), name)
            if name == "mla_attend":  # (q_nope, q_rope, latent, k_rope, pool, write, read, ...): a block by itself
                return lambda *args: reads.append(args[6]) or fn(*args)
            if name == "decode_layer":  # (x, plan, cos, sin, mask, write, read, ...): a trunk layer's
                return lambda *args: reads.append(args[6]) or fn(*args)
            return fn

    monkeypatch.setattr(extension, "compiled", lambda: Recorded())
    ps = prompts((5, 9, 3), seed=12)
    params = SamplingParams(max_new_tokens=7, temperature=0.0, ignore_eos=True)
    engine = Engine(fused, EngineConfig(prefill_chunk=4, token_budget=64, page_size=2, cache_tokens=128,
                                        max_running=3))
    assert engine.generate(ps, params) == [greedy_reference(model, p, 7) for p in ps]
    assert reads and all(r is not None and r.dim() == 2 for r in reads)
    assert any(bool((r[:, 1:] - r[:, :-1] != 1).any()) for r in reads)  # pages out of order: not one slice


@pytest.mark.skipif(not kernels.kernel_available(), reason="needs the compiled kernels")
@pytest.mark.parametrize("fmt", ["fp32", "bf16", "int8", "int4"])
def test_compiled_decode_blocks_give_the_twins_bits(pair, fmt, monkeypatch):
    """An attention block's two halves, an MLP and a whole layer in one compiled call each (decode_ops.mla_project,
    mla_attend, mlp, decode_layer) give bit for bit what the twins give calling the kernels one by one: plain fp32
    and bf16 weights, int8 and int4; two sequences whose contexts lie scattered over 2-token pages; the new rows
    land in the same pool rows."""
    model, _ = pair
    dtype = torch.float32 if fmt == "fp32" else torch.bfloat16
    twin = copy.deepcopy(model).to(dtype)
    fuse_for_inference(twin)
    if fmt in ("int8", "int4"):
        quant.quantize_model(twin, fmt)
    attn, mlp = twin.model.layers[1].self_attn[1], twin.model.layers[1].mlps[0]
    cache = PagedLatentCache(CacheConfig.for_model(twin.config, max_tokens=32, page_size=2, dtype=dtype))
    for seq, n in ((0, 2), (1, 2), (0, 4), (1, 4), (0, 6)):  # pages interleaved between the two
        cache.ensure(seq, n)
    cache.pool.normal_()  # earlier context
    positions = torch.tensor([[5], [3]])
    view = cache.view([0, 1], positions)
    x = torch.randn(2, 1, twin.config.hidden_size).to(dtype)
    rope = twin.model.rotary(positions, dtype)
    before = cache.pool.clone()
    calls = record_kernel_calls(monkeypatch, {"mla_project", "mla_attend", "mlp"})
    with torch.no_grad():
        got = attn.attend(attn.project(x, rope), view, block=3), mlp(x)
        assert calls == ["mla_project", "mla_attend", "mlp"]
        stored, _ = cache.pool.clone(), cache.pool.copy_(before)
        monkeypatch.setattr(kernels, "linear_weights", lambda *args: None)
        monkeypatch.setattr(decode_ops, "mla_attend", lambda *args: None)
        want = attn.attend(attn.project(x, rope), view, block=3), mlp(x)
    assert calls == ["mla_project", "mla_attend", "mlp"]  # none of them the second time
    assert got[0].dtype == dtype and torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch.equal(stored, cache.pool) and not torch.equal(stored, before)

    # the whole layer in one call (FusedScMoELayer, decode_ops.decode_layer): both blocks (pools 2 and 3), the MoE
    # with its router, both MLPs, against the same layer call by call
    layer = twin.model.layers[1]
    monkeypatch.undo()
    calls = record_kernel_calls(monkeypatch, {"decode_layer", "mla_attend"})
    cache.pool.copy_(before)
    with torch.no_grad():
        (out, info), stored = layer(x, rope, view), cache.pool.clone()
        assert calls == ["decode_layer"]
        cache.pool.copy_(before)
        monkeypatch.setattr(layer, "plan_for", lambda *args: None)
        out_ref, info_ref = layer(x, rope, view)
    assert calls == ["decode_layer", "mla_attend", "mla_attend"]  # the blocks one by one the second time
    assert out.dtype == dtype and torch.equal(out, out_ref) and torch.equal(stored, cache.pool)
    assert torch.equal(info.ids, info_ref.ids) and torch.equal(info.probs, info_ref.probs)


@pytest.mark.skipif(not kernels.kernel_available(), reason="needs the compiled kernels")
@pytest.mark.parametrize("fmt", ["fp32", "bf16", "int4"])
def test_the_mtp_head_in_one_call_gives_its_twins_bits(pair, fmt, monkeypatch):
    """The speculative draft's MTP head in one compiled call (FusedMTPHead, decode_ops.mtp_head) gives bit for bit
    what its twins give one by one, for two rows of two positions each (the extend after an accepted draft) over
    scattered pages; the new rows land in the same rows of the head's own pool."""
    model, _ = pair
    dtype = torch.float32 if fmt == "fp32" else torch.bfloat16
    twin = copy.deepcopy(model).to(dtype)
    fuse_for_inference(twin)
    if fmt == "int4":
        quant.quantize_model(twin, fmt)
    head, cfg = twin.model.mtp, twin.config
    cache = PagedLatentCache(CacheConfig.for_model(cfg, max_tokens=32, page_size=2, dtype=dtype))
    for seq, n in ((0, 2), (1, 2), (0, 4), (1, 4), (0, 6)):  # pages interleaved between the two
        cache.ensure(seq, n)
    cache.pool.normal_()  # earlier context
    positions = torch.tensor([[4, 5], [2, 3]])
    view, rope = cache.view([0, 1], positions), twin.model.rotary(positions, dtype)
    ids = torch.randint(0, cfg.vocab_size, (2, 2))
    hidden = torch.randn(2, 2, cfg.hidden_size).to(dtype)
    before = cache.pool.clone()
    calls = record_kernel_calls(monkeypatch, {"mtp_head", "mla_attend"})
    with torch.no_grad():
        z, stored = head(ids, hidden, rope, view), cache.pool.clone()
        assert calls == ["mtp_head"]
        cache.pool.copy_(before)
        monkeypatch.setattr(head, "plan_for", lambda *args: None)
        want = head(ids, hidden, rope, view)
    assert calls == ["mtp_head", "mla_attend"]  # its attention block by itself the second time
    assert z.dtype == dtype and torch.equal(z, want)
    assert torch.equal(stored, cache.pool) and not torch.equal(stored[head.block], before[head.block])


@pytest.mark.skipif(not kernels.kernel_available(), reason="needs the compiled kernels")
def test_a_layer_keeps_its_decode_weights_only_while_they_are_its_weights(pair, monkeypatch):
    """FusedScMoELayer keeps its decode plan (the weights' part of the layer call) between calls; after a module
    swap (quantizing), a cast and a state-dict load with assign=True, its one-call decode still gives what the
    layer gives block by block with the weights it has now; a deep copy decodes as the original."""
    model, _ = pair
    twin = copy.deepcopy(model)
    fuse_for_inference(twin)
    layer = twin.model.layers[1]

    def decode(dtype: torch.dtype) -> torch.Tensor:
        cache = PagedLatentCache(CacheConfig.for_model(twin.config, max_tokens=16, page_size=4, dtype=dtype))
        cache.ensure(0, 4)
        cache.pool.copy_(torch.randn(cache.pool.shape, generator=torch.Generator().manual_seed(0)))
        positions = torch.tensor([[3]])
        view, rope = cache.view([0], positions), twin.model.rotary(positions, dtype)
        x = torch.randn(1, 1, twin.config.hidden_size, generator=torch.Generator().manual_seed(1)).to(dtype)
        before = cache.pool.clone()
        calls = record_kernel_calls(monkeypatch, {"decode_layer"})
        with torch.no_grad():
            kept = layer(x, rope, view)[0]
            cache.pool.copy_(before)
            with monkeypatch.context() as patch:
                patch.setattr(layer, "plan_for", lambda *args: None)
                block_by_block = layer(x, rope, view)[0]
        monkeypatch.undo()
        assert calls == ["decode_layer"] and kept.dtype == dtype and torch.equal(kept, block_by_block)
        return kept

    first = decode(torch.float32)
    assert torch.equal(decode(torch.float32), first)  # kept, the same
    twin.to(torch.bfloat16).to(torch.float32)  # new fp32 tensors, the weights rounded to bf16
    assert not torch.equal(decode(torch.float32), first)
    twin.to(torch.bfloat16)
    cast = decode(torch.bfloat16)
    quant.quantize_model(twin, "int8")
    quantized = decode(torch.bfloat16)
    assert not torch.equal(quantized, cast)
    state = twin.state_dict()
    state["model.layers.1.input_layernorm.0.weight"] = state["model.layers.1.input_layernorm.0.weight"] * 2
    twin.load_state_dict(state, assign=True)
    loaded = decode(torch.bfloat16)
    assert not torch.equal(loaded, quantized)
    twin = copy.deepcopy(twin)  # after decoding (a kept plan cannot be copied): the copy makes its own
    layer = twin.model.layers[1]
    assert torch.equal(decode(torch.bfloat16), loaded)


@pytest.mark.skipif(not kernels.kernel_available(), reason="needs the compiled kernels")
def test_a_layer_keeps_a_plan_per_batch_size(pair, monkeypatch):
    """A server's batch grows and shrinks as requests come and go: the layer makes its decode plan once per row
    count, not again each time a count comes back."""
    _, fused = pair
    twin = copy.deepcopy(fused)
    layer = twin.model.layers[0]
    cache = PagedLatentCache(CacheConfig.for_model(twin.config, max_tokens=32, page_size=4, dtype=torch.float32))
    for seq in range(2):
        cache.ensure(seq, 4)
    calls = record_kernel_calls(monkeypatch, {"layer_plan", "decode_layer"})
    with torch.no_grad():
        for B in (1, 2, 1, 2, 1):
            positions = torch.full((B, 1), 3)
            layer(torch.randn(B, 1, twin.config.hidden_size), twin.model.rotary(positions, torch.float32),
                  cache.view(list(range(B)), positions))
    assert calls.count("decode_layer") == 5 and calls.count("layer_plan") == 2


@pytest.mark.skipif(not kernels.kernel_available(), reason="needs the compiled kernels")
def test_a_layer_call_never_gives_its_experts_more_rows_than_they_take(pair):
    """12 fp32 rows: quantized linears take them (up to MAX_KERNEL_ROWS), plain experts only MAX_DENSE_ROWS per hit
    expert; with every token routed to the same FFN experts, the layer runs call by call instead of failing."""
    model, _ = pair
    twin = copy.deepcopy(model)
    fuse_for_inference(twin)
    experts = [n for n, m in twin.named_modules() if n.endswith("mlp.moe.experts")]
    quant.quantize_model(twin, "int8", keep=experts)
    layer = twin.model.layers[1]
    router = layer.mlp.moe.router
    with torch.no_grad():  # uniform probabilities; the bias picks the first top_k experts, all FFN experts
        router.classifier.weight.zero_()
        router.e_score_correction_bias.copy_(-torch.arange(router.e_score_correction_bias.numel()).float())
    cache = PagedLatentCache(CacheConfig.for_model(twin.config, max_tokens=64, page_size=4, dtype=torch.float32))
    for seq in range(12):
        cache.ensure(seq, 4)
    positions = torch.full((12, 1), 3)
    view, rope = cache.view(list(range(12)), positions), twin.model.rotary(positions, torch.float32)
    x = torch.randn(12, 1, twin.config.hidden_size)
    assert kernels.MAX_DENSE_ROWS < 12 <= kernels.MAX_KERNEL_ROWS
    with torch.no_grad():
        out, info = layer(x, rope, view)
    assert out.shape == x.shape and (info.ids == info.ids[0]).all() and bool((info.ids < layer.mlp.moe.n_ffn).all())


@pytest.mark.parametrize("fmt", ["int4", "int8"])
@pytest.mark.parametrize("tokens", [1, 3, 12, 192])
def test_quantized_moe_runs_its_routed_part_in_one_kernel_call(pair, fmt, tokens, monkeypatch):
    """With quantized experts, FusedMoE hands a few tokens' whole routed part to one kernel call (grouping by
    expert, gate_up, SwiGLU, down, the weighted sum with the zero experts' share); for prefill-sized batches
    (192 tokens: ~70 rows per expert) the kernel declines and each hit expert's weights are dequantized for its
    GEMMs, whatever its row count. Either way the result is what the per-expert loop through the same weights
    gives, for both kinds of zero expert."""
    _, fused = pair
    moe = copy.deepcopy(fused.model.layers[1].mlp)
    quant.quantize_model(moe, fmt)
    x = torch.randn(1, tokens, 64)
    calls = []
    moe_experts = kernels.moe_experts
    monkeypatch.setattr(kernels, "moe_experts", lambda *a: calls.append(r := moe_experts(*a)) or r)
    for zero_type in ("identity", "drop"):
        moe.moe.zero_type = zero_type
        calls.clear()
        with torch.no_grad():
            _, _, ids, weights = moe.begin(x)
            out, _ = moe(x)
            took = kernels.kernel_available() and tokens < 192
            assert len(calls) == 1 and (calls[0] is not None) == took
            with monkeypatch.context() as patch:  # apply_one per hit expert, in the same arithmetic: the kernel
                for limit in ("MAX_KERNEL_ROWS", "MAX_INT4_KERNEL_ROWS"):  # (int8 activations) or dequantized
                    patch.setattr(kernels, limit, 10**6 if took else 0)
                expected = moe._few(x.reshape(-1, 64), ids, weights).view_as(x)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
