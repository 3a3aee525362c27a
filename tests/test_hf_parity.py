"""Parity with transformers' LongcatFlashForCausalLM, our numerical oracle, in both directions."""
from __future__ import annotations

import json
import logging

import pytest
import torch

from longcat_flash.checkpoint.hf import LongcatFlash
from longcat_flash.config import ModelConfig, RopeScaling

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.hf

CONFIGS = {
    "zero-experts": dict(hidden_size=64, num_layers=2, num_attention_heads=4, q_lora_rank=32, kv_lora_rank=16,
                         qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=8,
                         zero_expert_num=4, moe_topk=3),
    "no-zero-experts": dict(hidden_size=64, num_layers=2, num_attention_heads=2, q_lora_rank=48, kv_lora_rank=32,
                            qk_nope_head_dim=16, qk_rope_head_dim=4, v_head_dim=16, n_routed_experts=6,
                            zero_expert_num=0, moe_topk=2),
    "other-ranks": dict(hidden_size=96, num_layers=1, num_attention_heads=3, q_lora_rank=24, kv_lora_rank=40,
                        qk_nope_head_dim=12, qk_rope_head_dim=16, v_head_dim=20, n_routed_experts=5,
                        zero_expert_num=7, moe_topk=6, routed_scaling_factor=6.0, rope_theta=1.0e4),
    "wide-topk": dict(hidden_size=64, num_layers=3, num_attention_heads=4, q_lora_rank=16, kv_lora_rank=8,
                      qk_nope_head_dim=8, qk_rope_head_dim=2, v_head_dim=4, n_routed_experts=16,
                      zero_expert_num=8, moe_topk=12, routed_scaling_factor=0.5),
}
COMMON = dict(vocab_size=160, ffn_hidden_size=80, expert_ffn_hidden_size=24, max_position_embeddings=256)


def hf_model(cfg: dict) -> torch.nn.Module:
    """A transformers model with random weights that make routing and norms non-trivial."""
    rope = {"rope_type": "default", "rope_theta": cfg.pop("rope_theta", 1.0e7), **cfg.pop("rope_scaling", {})}
    config = transformers.LongcatFlashConfig(**COMMON, **cfg, head_dim=cfg["qk_rope_head_dim"],
                                             rope_parameters=rope)
    model = transformers.LongcatFlashForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.1 if "norm" in name else 0.15)
        for layer in model.model.layers:
            layer.mlp.router.e_score_correction_bias.normal_(0.0, 0.02)
    return model


@pytest.mark.parametrize("name", CONFIGS)
def test_transformers_checkpoint_loads_with_same_logits(name, tmp_path):
    reference = hf_model(dict(CONFIGS[name]))
    reference.save_pretrained(tmp_path)
    ours = LongcatFlash.from_pretrained(tmp_path)
    ids = torch.randint(0, 160, (2, 17))
    with torch.no_grad():
        expected = reference(ids).logits
    assert (ours(ids).logits - expected).abs().max() <= 1e-4


@pytest.mark.parametrize("name", CONFIGS)
def test_our_checkpoint_loads_in_transformers_with_same_logits(name, tmp_path):
    cfg = dict(CONFIGS[name])
    ours = LongcatFlash(ModelConfig(**COMMON, **cfg)).eval()
    ours.init_weights(0.15)
    with torch.no_grad():
        for router in ours.routers():
            router.e_score_correction_bias.normal_(0.0, 0.02)
    ours.save_pretrained(tmp_path, zero_expert_stubs=True)
    reference = transformers.LongcatFlashForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 160, (3, 11))
    with torch.no_grad():
        expected = reference(ids).logits
    assert (ours(ids).logits - expected).abs().max() <= 1e-4


def test_a_transformers_save_of_a_model_with_an_mtp_head_loads_without_the_head(tmp_path, caplog):
    """An official checkpoint fine-tuned in transformers comes back with config.json still naming the MTP head and
    no model.mtp.* weights (transformers has no MTP head): it is read as a model without one."""
    ours = LongcatFlash(ModelConfig(**COMMON, **CONFIGS["zero-experts"], num_nextn_predict_layers=1)).eval()
    ours.init_weights(0.15)
    ours.save_pretrained(tmp_path / "ours", zero_expert_stubs=True)
    reference = transformers.LongcatFlashForCausalLM.from_pretrained(tmp_path / "ours").eval()
    reference.save_pretrained(tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["num_nextn_predict_layers"] == 1
    with caplog.at_level(logging.WARNING, logger="longcat_flash.checkpoint.hf"):
        loaded = LongcatFlash.from_pretrained(tmp_path / "hf")
    assert loaded.config.num_nextn_predict_layers == 0 and loaded.model.mtp is None
    assert "no model.mtp.* weights" in caplog.text
    ids = torch.randint(0, 160, (2, 13))
    with torch.no_grad():
        assert (loaded(ids).logits - reference(ids).logits).abs().max() <= 1e-4


def test_a_transformers_checkpoint_whose_config_transformers_ignores_is_pointed_out(tmp_path, caplog):
    """transformers' LongcatFlash never renormalises the top-k gates: a checkpoint it wrote with norm_topk_prob
    true computes one model there and another here, which loading said nothing about."""
    cfg = dict(CONFIGS["zero-experts"])
    hf_model(dict(cfg)).save_pretrained(tmp_path / "release")
    with caplog.at_level(logging.WARNING, logger="longcat_flash.checkpoint.hf"):
        LongcatFlash.from_pretrained(tmp_path / "release")
    assert "ignores" not in caplog.text
    hf_model({**cfg, "norm_topk_prob": True}).save_pretrained(tmp_path / "renormalised")
    with caplog.at_level(logging.WARNING, logger="longcat_flash.checkpoint.hf"):
        LongcatFlash.from_pretrained(tmp_path / "renormalised")
    assert "written by transformers" in caplog.text and "ignores norm_topk_prob=True" in caplog.text


# Context extension: a model trained at 16 positions, read at up to 60 (docs/context_extension.md).
EXTENDED = {
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    "yarn-mscale": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "mscale": 1.0,
                    "mscale_all_dim": 0.707, "beta_fast": 16.0, "beta_slow": 2.0},
    "yarn-no-truncate": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16,
                         "truncate": False, "attention_factor": 1.3},
    "raised-theta": {},
}
EXTENDED_THETA = {"raised-theta": 5.0e5}


@pytest.mark.parametrize("name", EXTENDED)
def test_context_extension_matches_transformers_past_the_original_length(name, tmp_path):
    """Both directions, over 60 positions, with the yarn ramp, attention factor and softmax mscale in play."""
    scaling, theta = EXTENDED[name], EXTENDED_THETA.get(name, 1.0e4)
    cfg = dict(CONFIGS["other-ranks"], rope_theta=theta, rope_scaling=scaling)
    reference = hf_model(dict(cfg))
    reference.save_pretrained(tmp_path / "hf")
    ours = LongcatFlash.from_pretrained(tmp_path / "hf")
    assert ours.config.rope_scaling == RopeScaling(**scaling) and ours.config.rope_theta == theta
    ids = torch.randint(0, 160, (2, 60))
    with torch.no_grad():
        expected = reference(ids).logits
        assert (ours(ids).logits - expected).abs().max() <= 1e-4
        ours.save_pretrained(tmp_path / "ours", zero_expert_stubs=True)
        back = transformers.LongcatFlashForCausalLM.from_pretrained(tmp_path / "ours").eval()
        assert (back(ids).logits - expected).abs().max() <= 1e-4
        if scaling:  # the tolerance tells scalings apart: plain RoPE on the same weights is far off
            ours.model.rotary = type(ours.model.rotary)(cfg["qk_rope_head_dim"], theta, RopeScaling())
            assert (ours(ids).logits - expected).abs().max() > 1e-2
