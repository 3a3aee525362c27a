"""RoPE scaling (context extension): config.json fields as transformers reads them, YaRN tables equal to
transformers' own, clear errors for bad values, and the inference engine on a YaRN model."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from infer_support import greedy_reference, one_thread, prompts, randomized  # noqa: F401  (autouse fixture)

from longcat_flash.config import ModelConfig, RopeScaling
from longcat_flash.infer.engine import Engine, EngineConfig
from longcat_flash.infer.fused import fuse_for_inference
from longcat_flash.infer.sampling import SamplingParams
from longcat_flash.model.layers import RotaryEmbedding
from longcat_flash.presets import tiny

YARN = RopeScaling(rope_type="yarn", factor=4.0, original_max_position_embeddings=16, mscale=1.0,
                   mscale_all_dim=1.0)


def yarn_tiny(**scaling) -> ModelConfig:
    return tiny().replace(max_position_embeddings=64, rope_theta=1.0e4,
                          rope_scaling=RopeScaling(**scaling) if scaling else YARN)


def test_yarn_config_round_trips_through_config_json(tmp_path):
    cfg = yarn_tiny()
    cfg.save_json(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())["rope_parameters"]
    assert written == {"rope_type": "yarn", "rope_theta": 1.0e4, "factor": 4.0, "original_max_position_embeddings": 16,
                       "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0, "truncate": True}
    assert ModelConfig.from_json(tmp_path) == cfg


@pytest.mark.parametrize("cfg", [yarn_tiny(), tiny().replace(rope_theta=5.0e4)], ids=["yarn", "plain"])
def test_config_json_also_holds_the_rope_keys_readers_before_transformers_5_read(cfg):
    """Only `rope_parameters` was written: transformers 4.x and the official remote code (and vLLM and SGLang,
    which read the same keys) found no rope_theta and no rope_scaling there and ran the model at base 1e7 (their
    default) without YaRN: other logits, without a word."""
    legacy = cfg.to_dict()
    del legacy["rope_parameters"]
    assert ModelConfig.from_dict(legacy) == cfg
    assert legacy["rope_theta"] == cfg.rope_theta
    assert (legacy["rope_scaling"] is None) == (cfg.rope_scaling == RopeScaling())
    # both spellings edited apart would be two models, one here and one there: refused, not one silently winning
    edited = cfg.to_dict()
    edited["rope_parameters"] = {**edited["rope_parameters"], "rope_theta": 7.0e4}
    with pytest.raises(ValueError, match="rope_parameters and the top-level rope_theta disagree"):
        ModelConfig.from_dict(edited)
    edited = cfg.to_dict()
    edited["rope_parameters"] = {**edited["rope_parameters"], "rope_type": "yarn", "factor": 2.0,
                                 "original_max_position_embeddings": 256}
    with pytest.raises(ValueError, match="rope_parameters and the top-level rope_scaling disagree"):
        ModelConfig.from_dict(edited)


def test_a_rope_theta_only_in_rope_parameters_is_not_dropped_for_the_legacy_rope_scaling():
    """transformers reads a non-empty top-level rope_scaling before rope_parameters, at the default base when
    there is no top-level rope_theta: a base given only in rope_parameters was dropped without a word."""
    edited = yarn_tiny().to_dict()
    del edited["rope_theta"]
    with pytest.raises(ValueError, match=r"rope_theta disagree .*1000\.0; rope_theta: 10000000\.0 \(not given"):
        ModelConfig.from_dict({**edited, "rope_parameters": {**edited["rope_parameters"], "rope_theta": 1.0e3}})
    default = ModelConfig.from_dict({**edited, "rope_parameters": {**edited["rope_parameters"], "rope_theta": 1.0e7}})
    assert default == yarn_tiny().replace(rope_theta=1.0e7)
    inside = {**edited, "rope_scaling": {**edited["rope_scaling"], "rope_theta": 1.0e4}}  # the base in rope_scaling
    assert ModelConfig.from_dict(inside) == yarn_tiny()


@pytest.mark.parametrize("empty", [None, {}], ids=["null", "empty"])
def test_an_empty_rope_parameters_leaves_the_legacy_keys_to_say_the_rope(empty):
    """`rope_parameters: null` beside a YaRN rope_scaling, which transformers loads as YaRN, was refused as a
    disagreement with plain RoPE."""
    legacy = {**yarn_tiny().to_dict(), "rope_parameters": empty}
    assert ModelConfig.from_dict(legacy) == yarn_tiny()


@pytest.mark.hf
def test_transformers_reads_our_yarn_config_and_we_read_its_legacy_spelling(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = yarn_tiny()
    cfg.save_json(tmp_path)
    hf = transformers.AutoConfig.from_pretrained(tmp_path)
    assert hf.rope_parameters["rope_type"] == "yarn" and hf.rope_parameters["factor"] == 4.0
    assert ModelConfig.from_dict(json.loads(hf.to_json_string())) == cfg
    # the pre-5.0 spelling: top-level rope_theta and rope_scaling {"type": ...}, no original length given
    legacy = {**tiny().to_dict(), "rope_theta": 5.0e4, "rope_scaling": {"type": "yarn", "factor": 2.0}}
    del legacy["rope_parameters"]
    ours = ModelConfig.from_dict(legacy)
    theirs = transformers.LongcatFlashConfig(**legacy).rope_parameters
    assert (ours.rope_theta, ours.rope_scaling.factor) == (theirs["rope_theta"], theirs["factor"]) == (5.0e4, 2.0)
    assert ours.rope_scaling.original_max_position_embeddings == theirs["original_max_position_embeddings"] == 512


@pytest.mark.hf
@pytest.mark.parametrize("scaling", [
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    {"rope_type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096, "beta_fast": 8.0,
     "beta_slow": 0.5},
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 100, "truncate": False},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "mscale": 1.0,
     "mscale_all_dim": 0.5},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "attention_factor": 0.9},
])
def test_yarn_frequencies_and_attention_factor_equal_transformers(scaling):
    """The ramp (which frequencies are interpolated) and the cos/sin factor, element by element."""
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = tiny().replace(qk_rope_head_dim=32, rope_theta=1.0e4, max_position_embeddings=1 << 17,
                         rope_scaling=RopeScaling(**scaling))
    hf = transformers.LongcatFlashConfig(**{k: v for k, v in cfg.to_dict().items() if k != "architectures"})
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](hf)
    rotary = RotaryEmbedding.from_config(cfg)
    assert torch.equal(rotary.inv_freq, inv_freq)  # to the bit: an ulp moves a sharp model's logits by 1e-3
    assert rotary.attention_scaling == pytest.approx(attention_factor, rel=1e-12)
    assert not torch.allclose(rotary.inv_freq, RotaryEmbedding(32, 1.0e4, RopeScaling()).inv_freq)
    cos, _ = rotary(torch.zeros(1, 1), torch.float32)
    assert cos.flatten()[0].item() == pytest.approx(attention_factor)


@pytest.mark.parametrize("dim, theta", [(32, 1.0e4), (64, 1.0e7), (16, 123456.7)])
def test_plain_frequencies_equal_transformers_to_the_bit(dim, theta):
    transformers = pytest.importorskip("transformers")
    from transformers.models.longcat_flash.modeling_longcat_flash import LongcatFlashRotaryEmbedding

    cfg = tiny().replace(qk_rope_head_dim=dim, rope_theta=theta)
    hf = transformers.LongcatFlashConfig(**{k: v for k, v in cfg.to_dict().items() if k != "architectures"})
    assert torch.equal(RotaryEmbedding.from_config(cfg).inv_freq, LongcatFlashRotaryEmbedding(hf).inv_freq)


def test_softmax_scale_gets_the_yarn_mscale_only_with_mscale_all_dim():
    plain = tiny().softmax_scale
    assert plain == tiny().qk_head_dim ** -0.5
    assert yarn_tiny(rope_type="yarn", factor=4.0, original_max_position_embeddings=16).softmax_scale == plain
    mscale = 0.1 * 0.5 * torch.tensor(4.0).log().item() + 1.0
    got = yarn_tiny(rope_type="yarn", factor=4.0, original_max_position_embeddings=16, mscale_all_dim=0.5)
    assert got.softmax_scale == pytest.approx(plain * mscale ** 2)


@pytest.mark.parametrize("rope, message", [
    ({"rope_type": "linear", "factor": 2.0}, r"rope_type='linear' is not supported; choose one of \('default', "),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0},  # not "unknown keys"
     r"rope_parameters.rope_type='llama3' is not supported; choose one of \('default', "),
    ({"rope_type": "yarn"}, "rope_parameters.factor is required for rope_type='yarn'"),
    ({"rope_type": "yarn", "factor": 0.5}, "factor must be >= 1"),
    ({"rope_type": "yarn", "factor": "4"}, "factor must be a positive finite number"),
    ({"rope_type": "yarn", "factor": 2.0, "beta_fast": 1.0, "beta_slow": 2.0}, "beta_fast=1.0 must exceed beta_slow"),
    ({"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 1024},
     "original_max_position_embeddings=1024 exceeds max_position_embeddings=512"),
    ({"rope_type": "yarn", "factor": 2.0, "low_freq_factor": 1.0}, r"rope_parameters.low_freq_factor is not supported"),
    ({"rope_type": "default", "factor": 2.0}, "rope_scaling.factor=2.0 only applies with rope_type='yarn'"),
    ([1, 2], "rope_parameters must be an object"),
])
def test_bad_rope_values_are_clear_errors(rope, message):
    raw = {**{k: v for k, v in tiny().to_dict().items() if k not in ("rope_theta", "rope_scaling")},
           "rope_parameters": rope}
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_dict(raw)


def test_a_yarn_model_decodes_through_the_engine_as_its_full_forward():
    """Paged cache, absorbed decode, fused modules and MTP drafts all read the one rotary table and scale."""
    model = randomized(yarn_tiny())
    fused = copy.deepcopy(model)
    fuse_for_inference(fused)
    ps = prompts((20, 9), seed=5)
    params = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)
    expected = [greedy_reference(model, p, 12) for p in ps]
    for k in (0, 2):
        engine = Engine(fused, EngineConfig(speculative=k, prefill_chunk=8, token_budget=64, page_size=4,
                                            cache_tokens=128, max_running=4))
        assert engine.generate(ps, params) == expected
