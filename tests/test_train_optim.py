"""Parameter groups, width transfer (identity at equal width), variance alignment, schedules, optimizer state."""
from __future__ import annotations

import math

import pytest
import torch

from longcat_flash.model import Transformer
from longcat_flash.train.config import OptimConfig, ScalingConfig, ScheduleConfig, aligned_model_config
from longcat_flash.train.optim import init_parameters, lr_factor, param_groups, param_kind, width_scale


def _model(cfg, scaling: ScalingConfig) -> tuple[Transformer, object]:
    torch.manual_seed(0)
    model = Transformer(cfg)
    return model, init_parameters(model, scaling)


def test_width_transfer_is_identity_at_equal_width(tiny_config):
    plain, _ = _model(tiny_config, ScalingConfig())
    same, scale = _model(tiny_config, ScalingConfig(proxy_width=tiny_config.hidden_size))
    assert scale.s == 1.0
    assert all(scale.lr_mult(k) == scale.var_mult(k) == 1.0 for k in ("embedding", "hidden", "unembedding", "vector"))
    for (name, a), b in zip(plain.state_dict().items(), same.state_dict().values()):
        assert torch.equal(a, b), name
    groups = param_groups(same, OptimConfig(), scale)
    assert all(g["lr_mult"] == 1.0 for g in groups)


def test_width_transfer_divides_hidden_lr_and_variance_by_s(tiny_config):
    base, _ = _model(tiny_config, ScalingConfig(init_std=0.02))
    wide, scale = _model(tiny_config, ScalingConfig(init_std=0.02, proxy_width=tiny_config.hidden_size // 4))
    assert scale.s == 4.0
    for (name, a), b in zip(base.named_parameters(), wide.parameters()):
        kind = param_kind(name, a)
        ratio = 0.5 if kind in ("hidden", "unembedding") else 1.0  # std / sqrt(4); same draws, scaled
        assert torch.allclose(b, a * ratio), name
    lr = {g["kind"]: g["lr_mult"] for g in param_groups(wide, OptimConfig(), scale)}
    assert lr == {"embedding": 1.0, "hidden": 0.25, "unembedding": 0.25, "vector": 1.0}


def test_every_parameter_in_exactly_one_group_and_decay_only_on_matrices(tiny_config):
    model = Transformer(tiny_config)
    groups = param_groups(model, OptimConfig(weight_decay=0.1), width_scale(None, 64))
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())
    decay = {g["kind"]: g["weight_decay"] for g in groups}
    assert decay == {"embedding": 0.0, "hidden": 0.1, "unembedding": 0.1, "vector": 0.0}
    names = {id(p): n for n, p in model.named_parameters()}
    kinds = {names[id(p)]: g["kind"] for g in groups for p in g["params"]}
    assert kinds["lm_head.weight"] == "unembedding" and kinds["model.embed_tokens.weight"] == "embedding"
    assert kinds["model.mtp.embed_tokens.weight"] == "embedding" and kinds["model.norm.weight"] == "vector"
    assert kinds["model.layers.0.mlp.experts.gate_up_proj"] == "hidden"


def test_variance_alignment_modes(tiny_config):
    assert aligned_model_config(tiny_config, "preset") == tiny_config
    on = aligned_model_config(tiny_config, "on")
    assert on.mla_scale_q_lora and on.mla_scale_kv_lora
    assert on.routed_scaling_factor == tiny_config.ffn_hidden_size / tiny_config.expert_ffn_hidden_size  # γ = m
    off = aligned_model_config(tiny_config, "off")
    assert not off.mla_scale_q_lora and off.routed_scaling_factor == 1.0 and off.q_lora_scale == 1.0


def test_schedules():
    cos = ScheduleConfig(kind="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(cos, 0, 100) == pytest.approx(0.1) and lr_factor(cos, 9, 100) == 1.0
    assert 0.999 < lr_factor(cos, 10, 100) < 1.0 and lr_factor(cos, 54, 100) == pytest.approx(0.55)
    wsd = ScheduleConfig(kind="wsd", warmup_steps=10, min_lr_ratio=0.0, decay_fraction=0.2)
    assert lr_factor(wsd, 50, 100) == 1.0 and lr_factor(wsd, 79, 100) == 1.0
    assert lr_factor(wsd, 80, 100) == pytest.approx(0.95) and lr_factor(wsd, 89, 100) == pytest.approx(0.5)
    assert lr_factor(ScheduleConfig(kind="constant", warmup_steps=0), 7, 10) == 1.0


@pytest.mark.parametrize("kind", ["cosine", "wsd"])
@pytest.mark.parametrize("max_steps", [3, 6, 10, 100])
def test_the_last_step_of_a_run_trains_at_min_lr_ratio(kind, max_steps):
    """The last step run is max_steps - 1: it stayed above min_lr_ratio (0.145 of the peak for a 100-step WSD to
    0.1), and a 6-step WSD run never left the peak."""
    cfg = ScheduleConfig(kind=kind, warmup_steps=2, min_lr_ratio=0.1, decay_fraction=0.2)
    factors = [lr_factor(cfg, step, max_steps) for step in range(max_steps)]
    assert factors[-1] == pytest.approx(0.1) and factors[1] == 1.0  # warmup's last step at the peak
    assert all(a >= b for a, b in zip(factors[1:], factors[2:]))  # never up again after the peak


def test_initialisation_does_not_depend_on_how_the_model_was_built_or_what_else_it_holds(tiny_config):
    """Rows are seeded by (seed, name, row): a model materialised from the meta device gets the values of one
    built directly, and a shallower model's layers equal the deeper one's (what lets every FSDP or expert shard
    fill only its own rows and still match the one-process model)."""
    direct, _ = _model(tiny_config, ScalingConfig())
    with torch.device("meta"):
        late = Transformer(tiny_config)
    late.to_empty(device="cpu")
    init_parameters(late, ScalingConfig())
    for (name, a), b in zip(direct.state_dict().items(), late.state_dict().values()):
        assert torch.equal(a, b), name
    shallow, _ = _model(tiny_config.replace(num_layers=1), ScalingConfig())
    assert torch.equal(shallow.model.layers[0].mlp.experts.gate_up_proj, direct.model.layers[0].mlp.experts.gate_up_proj)
    other_seed = Transformer(tiny_config)
    init_parameters(other_seed, ScalingConfig(), seed=1)
    assert not torch.equal(other_seed.lm_head.weight, direct.lm_head.weight)


def test_adam_epsilon_default_is_the_reports():
    assert OptimConfig().eps == 1e-16 and math.isclose(OptimConfig().betas[1], 0.95)
