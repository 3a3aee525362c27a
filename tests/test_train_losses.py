"""Each training loss against a hand-computed example (report §2.1.2, §3.1.3, MTP)."""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from longcat_flash.model import ModelOutput, RoutingInfo
from longcat_flash.train.config import LossConfig
from longcat_flash.train.losses import (balance_loss, chunked_lm_loss, hidden_z_loss, lm_loss,
                                        mtp_loss, training_losses)

# Two tokens, 4 FFN experts (D=2 groups of 2) + 2 zero experts, top-2, K_e = 1.
PROBS = torch.tensor([[0.4, 0.1, 0.1, 0.1, 0.2, 0.1],
                      [0.1, 0.1, 0.3, 0.1, 0.1, 0.3]])
IDS = torch.tensor([[0, 4],  # token 0: expert 0 (group 0) and a zero expert
                    [2, 3]])  # token 1: experts 2 and 3 (both group 1)


def test_lm_loss_is_cross_entropy():
    logits = torch.tensor([[[0.0, 0.0, math.log(2.0)]]])  # p(target=2) = 2/4
    assert lm_loss(logits, torch.tensor([[2]])).item() == pytest.approx(math.log(2.0))


def test_mtp_loss_predicts_the_token_after_next():
    # targets (B=1, S=3) = inputs shifted by one; mtp position t predicts targets[t + 1].
    targets = torch.tensor([[5, 1, 0]])
    mtp_logits = torch.full((1, 2, 3), -1e9)
    mtp_logits[0, 0, 1] = 0.0  # position 0 -> token targets[1] = 1, certain
    mtp_logits[0, 1, :] = 0.0  # position 1 -> targets[2] = 0, uniform over 3
    assert mtp_loss(mtp_logits, targets).item() == pytest.approx(math.log(3.0) / 2)


def test_hidden_z_loss_is_mean_squared_logsumexp_of_abs():
    hidden = torch.tensor([[[1.0, -1.0], [0.0, 0.0]]])  # (B=1, S=2, D=2)
    expected = ((1 + math.log(2)) ** 2 + math.log(2) ** 2) / 2  # lse(|z|) = log(2e), log 2
    assert hidden_z_loss(hidden).item() == pytest.approx(expected)


def test_balance_loss_hand_example():
    # selections per group: g0 = 1, g1 = 2, zero = 1 (T = 2, K = 2, K_e = 1, D = 2)
    # f = [2/(1*2)*1, 2/(1*2)*2, 1/((2-1)*2)*1] = [1, 2, 0.5];  P = [0.35, 0.30, 0.35]
    probs = PROBS.clone().requires_grad_()
    loss = balance_loss(probs, IDS, n_ffn=4, groups=2, target=1.0)
    assert loss.item() == pytest.approx(1 * 0.35 + 2 * 0.30 + 0.5 * 0.35)
    loss.backward()  # dL/dp_t,i = f_group(i) / T, the same for every token
    expected = torch.tensor([1.0, 1.0, 2.0, 2.0, 0.5, 0.5]) / 2
    assert torch.allclose(probs.grad, expected.expand(2, 6))


def test_balance_loss_is_one_at_the_target_split():
    # each token: one FFN expert (alternating groups) and one zero expert; uniform probabilities
    probs = torch.full((4, 6), 1 / 6)
    ids = torch.tensor([[0, 4], [2, 5], [1, 4], [3, 5]])
    assert balance_loss(probs, ids, n_ffn=4, groups=2, target=1.0).item() == pytest.approx(1.0)


def test_balance_loss_without_zero_experts_has_no_extra_group():
    probs = torch.tensor([[0.5, 0.25, 0.25, 0.0]])
    ids = torch.tensor([[0, 1]])  # both in group 0 of D=2; K_e = K = 2
    # f = [2/(2*1)*2, 0] = [2, 0];  P = [0.75, 0.25]
    assert balance_loss(probs, ids, n_ffn=4, groups=2, target=2.0).item() == pytest.approx(1.5)


def test_training_losses_weights_each_term():
    cfg = LossConfig(balance_alpha=0.1, balance_groups=2, z_weight=0.01, mtp_weight=0.5)
    logits = torch.zeros(1, 2, 4)  # uniform: lm = log 4
    mtp_logits = torch.zeros(1, 1, 4)  # mtp = log 4
    hidden = torch.zeros(1, 2, 3)  # z = (log 3)^2
    routing = [RoutingInfo(probs=PROBS, ids=IDS, n_ffn=4)]
    out = ModelOutput(logits=logits, hidden=hidden, final_hidden=hidden, routing=routing, mtp_logits=mtp_logits)
    terms = training_losses(out, torch.tensor([[0, 1]]), cfg, n_ffn=4, target=1.0)
    lm, z, lb = math.log(4), math.log(3) ** 2, 1.125
    assert terms.lm.item() == pytest.approx(lm) and terms.mtp.item() == pytest.approx(lm)
    assert terms.z.item() == pytest.approx(z) and terms.balance.item() == pytest.approx(lb)
    assert terms.total.item() == pytest.approx(lm + 0.5 * lm + 0.01 * z + 0.1 * lb)
    out.mtp_logits = None
    assert training_losses(out, torch.tensor([[0, 1]]), cfg, 4, 1.0).mtp is None


class LargestOutput(TorchDispatchMode):
    """The largest tensor any op produced (elements), forward and backward."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_chunked_cross_entropy_equals_the_whole_and_never_holds_all_logits():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    targets = torch.randint(0, 50, (2, 9))
    whole = lm_loss(head(hidden), targets)
    grads = torch.autograd.grad(whole, [hidden, head.weight])
    with LargestOutput() as watch:
        chunked = chunked_lm_loss(hidden, head, targets, chunk=4)
        chunked_grads = torch.autograd.grad(chunked, [hidden, head.weight])
    torch.testing.assert_close(chunked, whole)
    for a, b in zip(chunked_grads, grads):
        torch.testing.assert_close(a, b)
    assert watch.largest < 18 * 50  # no op ever made the (tokens, V) logits
    assert watch.largest >= 4 * 50  # but (chunk, V) ones, yes
