"""The compute-budget controller: the report's update rule, PID terms, zero experts fixed, convergence."""
from __future__ import annotations

import pytest
import torch

from longcat_flash.model import Router
from longcat_flash.presets import tiny
from longcat_flash.train.budget import BudgetController
from longcat_flash.train.config import BudgetConfig

E, Z, K, K_E, L = 8, 4, 3, 2.0, 2  # the tiny preset's router: 8 FFN + 4 zero experts, top-3


def make(cfg: BudgetConfig = BudgetConfig()) -> tuple[BudgetController, list[Router]]:
    return BudgetController(cfg, L, E, K, K_E), [Router(tiny()) for _ in range(L)]


def route(routers: list[Router], logits: torch.Tensor) -> torch.Tensor:
    """Synthetic routing: top-k of softmax(logits) + bias per layer -> counts (L, E+Z), as the model does."""
    probs = logits.softmax(-1)  # (L, T, E+Z)
    ids = [torch.topk(p + r.e_score_correction_bias, K, dim=-1).indices for p, r in zip(probs, routers)]
    return torch.stack([torch.bincount(i.flatten(), minlength=E + Z) for i in ids])


def test_proportional_step_is_the_report_formula():
    controller, routers = make(BudgetConfig(rate=0.5))
    counts = torch.tensor([[10, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0]] * L)  # 4 tokens: T_all = 12 / K
    delta = controller.update(routers, counts)
    t_all = counts[0].sum() / K
    expected = 0.5 * (K_E / (K * E) - counts[0, :E] / (K * t_all))  # Δb_i = μ (K_e/(K N) - T_i/(K T_all))
    assert torch.allclose(delta[0], expected.float())
    assert torch.equal(routers[1].e_score_correction_bias[:E], expected.float())


def test_zero_expert_biases_never_move():
    controller, routers = make(BudgetConfig(rate=2.0, ki=0.5, kd=0.5))
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        controller.update(routers, route(routers, torch.randn(L, 64, E + Z, generator=gen) * 3))
    for router in routers:
        assert torch.equal(router.e_score_correction_bias[E:], torch.zeros(Z))
        assert router.e_score_correction_bias[:E].abs().sum() > 0


def test_integral_is_clamped_and_derivative_uses_the_previous_error():
    controller, routers = make(BudgetConfig(rate=1.0, kp=0.0, ki=1.0, kd=0.0, integral_limit=0.05))
    counts = torch.zeros(L, E + Z, dtype=torch.long)
    counts[:, 0] = 100  # expert 0 takes every slot: error -(1 - 1/12), others +1/12
    for _ in range(10):
        controller.update(routers, counts)
    assert controller.integral.abs().max().item() == pytest.approx(0.05)
    pid, _ = make(BudgetConfig(rate=1.0, kp=0.0, ki=0.0, kd=1.0))
    first = pid.step(counts)
    assert torch.equal(first, torch.zeros_like(first))  # no derivative before there is a previous error
    balanced = torch.zeros(L, E + Z, dtype=torch.long)
    balanced[:, :] = 2  # 24 slots: every FFN expert has 2/24 = K_e / (K N), exactly on target: e = 0
    assert torch.allclose(pid.step(balanced), -pid.error(counts))


def test_rate_decays_by_steps_to_a_floor():
    controller, _ = make(BudgetConfig(rate=1.0, decay_every=10, decay_factor=0.5, min_rate_ratio=0.2))
    rates = []
    for _ in range(40):
        rates.append(controller.rate())
        controller.step(torch.ones(L, E + Z, dtype=torch.long))
    assert rates[0] == rates[9] == 1.0 and rates[10] == 0.5 and rates[20] == 0.25 and rates[30] == 0.2


def test_drives_imbalanced_counts_to_the_target():
    """Routers that prefer FFN experts (and a few of them strongly) converge to K_e FFN experts per token,
    with every FFN expert near its share, despite per-step sampling noise from a small batch."""
    controller, routers = make(BudgetConfig(rate=1.0, decay_every=100, decay_factor=0.5))
    gen = torch.Generator().manual_seed(0)
    skew = torch.cat([torch.linspace(2.0, 0.0, E), torch.full((Z,), -1.0)])  # FFN favoured, unevenly
    ffn_per_token, shares = [], []
    for _ in range(300):
        counts = route(routers, skew + torch.randn(L, 256, E + Z, generator=gen))
        ffn_per_token.append(counts[:, :E].sum() / (L * 256))
        shares.append(counts[:, :E] / counts.sum(-1, keepdim=True))
        controller.update(routers, counts)
    start = (ffn_per_token[0] - K_E) / K_E
    assert start > 0.3  # far above budget before control
    late = torch.stack(ffn_per_token[-50:])
    assert (late.mean() - K_E).abs() / K_E < 0.01
    rolling = late.unfold(0, 10, 1).mean(-1)  # 10-step means: single steps also carry the batch's sampling noise
    assert ((rolling - K_E).abs() / K_E).max() < 0.03
    share = torch.stack(shares[-50:]).mean(0)  # (L, E)
    assert torch.allclose(share, torch.full_like(share, K_E / (K * E)), rtol=0.15)


def test_sign_mode_takes_fixed_steps():
    controller, routers = make(BudgetConfig(mode="sign", rate=0.01))
    counts = torch.tensor([[10, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0]] * L)  # expert 0 over its share, 1..7 under
    delta = controller.update(routers, counts)
    assert torch.equal(delta[0], torch.tensor([-0.01] + [0.01] * (E - 1)))
    assert torch.equal(routers[0].e_score_correction_bias[E:], torch.zeros(Z))


@pytest.mark.parametrize("fields, message", [
    (dict(mode="sign", ki=0.5), "reads no gains"),  # the fixed step would ignore them
    (dict(kp=0.0), "would never move the biases"),
])
def test_settings_the_controller_would_ignore_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        BudgetConfig(**fields)
    BudgetConfig(**{**fields, **({"mode": "pid"} if "mode" in fields else {"enabled": False})})  # meant: accepted


def test_state_dict_round_trip_continues_identically():
    a, routers_a = make(BudgetConfig(ki=0.3, kd=0.2))
    gen = torch.Generator().manual_seed(1)
    batches = [route(routers_a, torch.randn(L, 32, E + Z, generator=gen)) for _ in range(6)]
    for counts in batches[:3]:
        a.update(routers_a, counts)
    b, _ = make(BudgetConfig(ki=0.3, kd=0.2))
    b.load_state_dict(a.state_dict())
    for counts in batches[3:]:
        assert torch.equal(a.step(counts), b.step(counts))


def test_bad_counts_and_state_shapes_are_named():
    controller, routers = make()
    with pytest.raises(ValueError, match="counts must be"):
        controller.step(torch.ones(3, E + Z))
    with pytest.raises(ValueError, match="expected 2 routers"):
        controller.update(routers[:1], torch.ones(L, E + Z))
    other = BudgetController(BudgetConfig(), 4, E, K, K_E)
    with pytest.raises(ValueError, match="shape"):
        controller.load_state_dict(other.state_dict())
