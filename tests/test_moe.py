"""The zero-expert MoE: grouped == reference, identity zero experts, selection-only bias."""
from __future__ import annotations

import copy

import pytest
import torch
from fake_accelerator import fake_accelerator, to_accelerator
from torch.utils._python_dispatch import TorchDispatchMode

from longcat_flash.model.moe import MoE
from longcat_flash.presets import tiny


def make_moe(**changes) -> MoE:
    cfg = tiny().replace(routed_scaling_factor=2.5, **changes)
    moe = MoE(cfg)
    torch.nn.init.normal_(moe.router.classifier.weight, 0.0, 0.3)  # peaked enough for varied routing
    for p in moe.experts.parameters():
        torch.nn.init.normal_(p, 0.0, 0.1)
    moe.router.e_score_correction_bias.normal_(0.0, 0.05)
    return moe


@pytest.mark.parametrize("changes", [{}, {"zero_expert_num": 0}, {"zero_expert_type": "drop"},
                                     {"norm_topk_prob": True}, {"moe_topk": 8, "zero_expert_num": 8}])
def test_grouped_equals_reference(changes):
    moe = make_moe(**changes)
    x = torch.randn(3, 7, 64, requires_grad=True)
    out, info = moe(x)
    ref = moe.forward_reference(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(out.square().sum(), [x, *moe.parameters()])
    ref_grads = torch.autograd.grad(ref.square().sum(), [x, *moe.parameters()])
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-5 * float(r.abs().max()), rtol=1e-4)
    assert info.ids.shape == (21, moe.router.top_k)
    assert int(info.tokens_per_expert.sum()) == 21 * moe.router.top_k


def test_experts_grouped_equals_loop():
    moe = make_moe()
    counts = torch.tensor([3, 0, 5, 1, 0, 2, 4, 1])  # empty groups included
    rows = torch.randn(int(counts.sum()), 64)
    torch.testing.assert_close(moe.experts(rows, counts), moe.experts.forward_reference(rows, counts))



@pytest.mark.parametrize("dim, hidden, dtype", [(50, 6, torch.float32), (64, 12, torch.bfloat16),
                                                (64, 32, torch.float64)])
def test_experts_run_widths_and_dtypes_the_grouped_gemm_does_not_take(dim, hidden, dtype):
    """F.grouped_mm needs rows of a multiple of 16 bytes and fp32/bf16/fp16: other hidden sizes (a transformers
    config may have any) and fp64 (gradcheck) take one GEMM per expert instead of failing."""
    experts = make_moe(hidden_size=dim, expert_ffn_hidden_size=hidden).experts.to(dtype)
    counts = torch.tensor([3, 0, 5, 1, 0, 2, 4, 1])
    rows = torch.randn(int(counts.sum()), dim, dtype=dtype)
    torch.testing.assert_close(experts(rows, counts), experts.forward_reference(rows, counts))


def test_moe_gradients_check_out_in_fp64():
    """The router and the experts compute in fp64 in an fp64 model, so finite differences can check them."""
    moe = make_moe(hidden_size=32, expert_ffn_hidden_size=8).double()
    assert moe.router.classifier.weight.dtype == torch.float64
    x = torch.randn(1, 5, 32, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: moe(x)[0], (x,))

def force_zero_experts(moe: MoE) -> None:
    moe.router.e_score_correction_bias[: moe.n_ffn] = -10.0  # FFN experts can never win the selection


def test_zero_experts_are_weight_times_identity():
    moe = make_moe()
    force_zero_experts(moe)
    x = torch.randn(2, 5, 64)
    probs, ids, weights = moe.router(x.view(-1, 64))
    assert bool((ids >= moe.n_ffn).all())
    out, info = moe(x)
    torch.testing.assert_close(out, (weights.sum(-1, keepdim=True) * x.view(-1, 64)).view_as(x))
    assert int(info.ffn_experts_per_token.sum()) == 0


def test_all_tokens_to_zero_experts_never_reach_a_gemm(monkeypatch):
    moe = make_moe()
    force_zero_experts(moe)
    seen = []
    real = moe.experts.forward
    monkeypatch.setattr(moe.experts, "forward", lambda rows, counts: seen.append(int(counts.sum())) or real(rows, counts))
    x = torch.randn(4, 64, requires_grad=True)
    out, _ = moe(x[None])
    out.sum().backward()
    assert seen == [0]
    assert moe.experts.gate_up_proj.grad is None or not moe.experts.gate_up_proj.grad.any()
    assert torch.isfinite(x.grad).all()


def test_drop_zero_experts_contribute_nothing():
    moe = make_moe(zero_expert_type="drop")
    force_zero_experts(moe)
    out, _ = moe(torch.randn(1, 6, 64))
    assert torch.equal(out, torch.zeros_like(out))


def test_bias_changes_selection_but_not_gate_values():
    moe = make_moe()
    moe.router.e_score_correction_bias.zero_()
    x = torch.randn(10, 64)
    probs, ids, weights = moe.router(x)
    moe.router.e_score_correction_bias[5] = 1.0  # expert 5 now always wins a slot
    probs_b, ids_b, weights_b = moe.router(x)
    torch.testing.assert_close(probs_b, probs)
    assert bool((ids_b == 5).any(-1).all()) and not torch.equal(ids_b.sort(-1).values, ids.sort(-1).values)
    torch.testing.assert_close(weights_b, probs.gather(1, ids_b) * moe.router.scale)


def test_router_stays_fp32_in_bf16_model():
    moe = make_moe().to(torch.bfloat16)
    assert moe.router.classifier.weight.dtype == torch.float32
    assert moe.router.e_score_correction_bias.dtype == torch.float32
    assert moe.experts.gate_up_proj.dtype == torch.bfloat16
    out, info = moe(torch.randn(1, 4, 64, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and info.probs.dtype == torch.float32


def test_router_is_fp32_in_a_model_built_under_a_bf16_default_dtype():
    """The guard ran only on casts: a model built under torch.set_default_dtype(torch.bfloat16) routed in bf16."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        moe = make_moe()
    finally:
        torch.set_default_dtype(default)
    assert moe.experts.gate_up_proj.dtype == torch.bfloat16
    assert moe.router.classifier.weight.dtype == moe.router.e_score_correction_bias.dtype == torch.float32


def test_router_computes_in_fp32_under_bf16_autocast():
    """Training runs the model under bf16 autocast (on a GPU, on AVX-512 CPUs): the router must still route on
    fp32 logits, or near-tied experts flip with the precision."""
    router = make_moe().router
    x = torch.randn(64, 64)
    probs, ids, weights = router(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        probs_ac, ids_ac, weights_ac = router(x)
    assert probs_ac.dtype == torch.float32
    assert torch.equal(probs_ac, probs) and torch.equal(ids_ac, ids) and torch.equal(weights_ac, weights)

class HostReads(TorchDispatchMode):
    """Records the ops that make a GPU wait for the host to read a value: `.item()`/`.tolist()`, and the ops
    whose output size depends on the data (nonzero, masked_select, bincount, unique, repeat_interleave
    without output_size)."""

    SYNCING = {"_local_scalar_dense", "nonzero", "masked_select", "bincount", "_unique2", "unique_dim",
               "repeat_interleave"}

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.SYNCING and not (name == "repeat_interleave" and (kwargs or {}).get("output_size")):
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("changes", [{}, {"zero_expert_num": 0}])
def test_one_process_moe_never_reads_the_device_off_the_cpu(changes):
    """On an accelerator (tests/fake_accelerator.py's stand-in) the one-process MoE never waits for the host,
    forward or backward: the zero slots are not cut off by a row count read back from the device; the grouped
    GEMMs stop at the last group end instead, and the result equals the CPU's (which does cut, for free)."""
    moe = make_moe(**changes)
    x = torch.randn(3, 7, 64)
    want, want_info = moe(x.requires_grad_())
    want_grad = torch.autograd.grad(want.square().sum(), x)[0]
    with fake_accelerator() as device:
        placed = to_accelerator(copy.deepcopy(moe))
        xd = x.detach().to(device).requires_grad_()
        with HostReads() as reads:
            out, info = placed(xd)
            grad = torch.autograd.grad(out.square().sum() + info.probs.sum() * 0, xd)[0]
        assert reads.seen == []
        torch.testing.assert_close(out.cpu(), want, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(grad.cpu(), want_grad, atol=1e-6, rtol=1e-5)
        assert torch.equal(info.tokens_per_expert.cpu(), want_info.tokens_per_expert)
