"""ModelConfig validation and config.json round trips."""
from __future__ import annotations

import json

import pytest

from longcat_flash.config import ModelConfig
from longcat_flash.presets import PRESETS, get_preset, tiny


@pytest.mark.parametrize("field, value", [
    ("moe_topk", 13),  # 8 FFN + 4 zero experts < 13
    ("hidden_size", -64),
    ("num_layers", 0),
    ("zero_expert_num", -1),
    ("zero_expert_type", "mirror"),
    ("qk_rope_head_dim", 7),
    ("kv_lora_rank", 128),  # larger than hidden_size 64
    ("rms_norm_eps", 0.0),
    ("num_nextn_predict_layers", 2),
    ("eos_token_id", 999),
    ("eos_token_id", 2.5),  # wrong types read as another choice, or failed deep in a forward
    ("eos_token_id", (2, 999)),
    ("eos_token_id", (2, "3")),
    ("norm_topk_prob", "no"),
    ("num_nextn_predict_layers", True),
    ("zero_expert_num", True),
    ("rms_norm_eps", True),  # a bool is an int to Python: it read as 1 and was written to config.json as true
    ("routed_scaling_factor", False),
    ("rope_theta", 1.0),  # YaRN divided by log(theta) = 0 after a run's training (experiments/context_extension.py)
])
def test_bad_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        tiny().replace(**{field: value})


def test_json_round_trip(tmp_path):
    cfg = tiny().replace(zero_expert_type="drop", rope_theta=5e5)
    cfg.save_json(tmp_path)
    assert ModelConfig.from_json(tmp_path) == cfg


def test_several_eos_ids_survive_a_config_json_round_trip(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**tiny().to_dict(), "eos_token_id": [2, 7]}))
    cfg = ModelConfig.from_json(tmp_path)
    assert cfg.eos_token_ids == (2, 7)
    cfg.save_json(tmp_path / "again.json")
    assert json.loads((tmp_path / "again.json").read_text())["eos_token_id"] == [2, 7]


def test_reads_hf_aliases_and_rope_parameters():
    cfg = ModelConfig.from_dict({"hidden_size": 64, "num_layers": 1, "num_attention_heads": 2, "q_lora_rank": 32,
                                 "kv_lora_rank": 16, "num_local_experts": 4, "num_experts_per_tok": 2,
                                 "intermediate_size": 96, "rope_parameters": {"rope_type": "default",
                                                                               "rope_theta": 1234.0}})
    assert (cfg.n_routed_experts, cfg.moe_topk, cfg.ffn_hidden_size, cfg.rope_theta) == (4, 2, 96, 1234.0)


def test_unknown_field_and_unsupported_rope_are_errors():
    with pytest.raises(ValueError, match="unknown field 'hiden_size'"):
        ModelConfig.from_dict({"hiden_size": 64})
    with pytest.raises(ValueError, match="rope_type='dynamic' is not supported"):
        ModelConfig.from_dict({"rope_scaling": {"type": "dynamic", "factor": 4}})


def test_transformers_generic_config_keys_read_as_the_nothing_they_change():
    """`output_hidden_states`, `id2label`, `return_dict`... (any transformers PretrainedConfig may carry them) made
    the folder unloadable as unknown fields; those that would describe another model are still refused."""
    transformers = pytest.importorskip("transformers")
    ours = tiny().to_dict()
    generic = transformers.LongcatFlashConfig(
        output_hidden_states=True, return_dict=False, id2label={0: "no", 1: "yes"}, is_decoder=True,
        problem_type="single_label_classification", tokenizer_class="X").to_dict()
    own = transformers.LongcatFlashConfig().to_diff_dict()  # its model's fields
    extra = {k: v for k, v in generic.items() if k not in ours and k not in own}
    assert {"output_hidden_states", "id2label", "return_dict", "is_encoder_decoder"} <= extra.keys()
    assert ModelConfig.from_dict({**ours, **extra}) == ModelConfig.from_dict(ours)
    for key, value in (("is_encoder_decoder", True), ("mlp_bias", True), ("use_sliding_window", True),
                       ("pruned_heads", {"0": [1]})):
        with pytest.raises(ValueError, match=f"config.json: {key}=.* is not supported"):
            ModelConfig.from_dict({**ours, key: value})
    no_ops = {"mlp_bias": False, "use_sliding_window": False}
    assert ModelConfig.from_dict({**ours, **no_ops}) == ModelConfig.from_dict(ours)
    rope = {**ours.pop("rope_parameters"), "partial_rotary_factor": 1.0}
    ours.pop("rope_theta"), ours.pop("rope_scaling")
    assert ModelConfig.from_dict({**ours, "rope_parameters": rope}) == tiny()
    with pytest.raises(ValueError, match="rope_parameters.partial_rotary_factor=0.5 is not supported"):
        ModelConfig.from_dict({**ours, "rope_parameters": {**rope, "partial_rotary_factor": 0.5}})


def test_configs_written_by_other_code_read_as_transformers_reads_them():
    """transformers' layer count (two sublayers each) when `num_layers` is absent; a null or 0 YaRN ramp bound is
    its default, a 0 mscale none; the official remote-code config's deployment fields change nothing; a sliced
    pretraining_tp is refused."""
    base = tiny().to_dict()
    layers = base.pop("num_layers")
    assert ModelConfig.from_dict({**base, "num_hidden_layers": 2 * layers}).num_layers == layers
    yarn = {"rope_type": "yarn", "factor": 4, "original_max_position_embeddings": 128, "beta_fast": None,
            "beta_slow": None}
    written = {k: v for k, v in tiny().to_dict().items() if k not in ("rope_theta", "rope_scaling")}  # as 5.x does
    rope = ModelConfig.from_dict({**written, "rope_parameters": yarn}).rope_scaling
    assert (rope.beta_fast, rope.beta_slow) == (32.0, 1.0)
    zeros = {**yarn, "beta_fast": 0, "beta_slow": 0, "mscale": 0, "mscale_all_dim": 0.0}  # were refused
    assert ModelConfig.from_dict({**written, "rope_parameters": zeros}).rope_scaling == rope
    assert ModelConfig.from_dict({**tiny().to_dict(), "ep_size": 8, "params_dtype": "bfloat16",
                                  "pretraining_tp": 1}) == tiny()
    with pytest.raises(ValueError, match="pretraining_tp=2"):
        ModelConfig.from_dict({**tiny().to_dict(), "pretraining_tp": 2})


@pytest.mark.parametrize("fields, message", [
    ({"qk_rope_head_dim": "8"}, "qk_rope_head_dim must be a positive integer, got '8'"),
    ({"num_layers": None}, "num_layers must be a positive integer, got None"),
    ({"qk_nope_head_dim": None}, "qk_nope_head_dim must be a positive integer"),
    ({"num_attention_heads": None}, "num_attention_heads must be a positive integer, got None"),
    ({"head_dim": "__del__"}, "head_dim='__del__' must equal qk_rope_head_dim"),
    ({"intermediate_size": 256}, "intermediate_size=256 disagrees with ffn_hidden_size=128"),  # the last one won
    ({"num_experts_per_tok": 2}, "num_experts_per_tok=2 disagrees with moe_topk=3"),
])
def test_a_malformed_config_json_names_the_field(fields, message):
    """A wrong type reached the derived-key checks first and failed there as a TypeError; a null head count was
    blamed on num_key_value_heads; of two names of one field the later in the file won."""
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        ModelConfig.from_dict({**tiny().to_dict(), **fields})
    assert ModelConfig.from_dict({**tiny().to_dict(), "attention_dropout": 0.1}) == tiny()  # inference has none


def test_bad_json_file(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ModelConfig.from_json(tmp_path)
    # a bad value or field names the file: a command may read several (init_from and data.tokenizer, grow SRC)
    for fields, says in (({"moe_topk": 0}, "moe_topk must be a positive integer"),
                         ({"my_field": 1}, "unknown field 'my_field'")):
        (tmp_path / "config.json").write_text(json.dumps({**tiny().to_dict(), **fields}))
        with pytest.raises(ValueError, match=f"^{tmp_path / 'config.json'}: .*{says}"):
            ModelConfig.from_json(tmp_path)
    with pytest.raises(FileNotFoundError):
        ModelConfig.from_json(tmp_path / "nowhere")


@pytest.mark.hf
def test_transformers_accepts_our_config_json(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = tiny()
    cfg.save_json(tmp_path)
    hf = transformers.AutoConfig.from_pretrained(tmp_path)
    assert hf.model_type == "longcat_flash"
    assert (hf.num_layers, hf.n_routed_experts, hf.zero_expert_num, hf.head_dim) == (2, 8, 4, cfg.qk_rope_head_dim)
    assert ModelConfig.from_dict(json.loads(hf.to_json_string())) == cfg


def test_presets_are_valid_and_unknown_names_fail():
    for name in PRESETS:
        assert get_preset(name).num_layers > 0
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("huge")


def test_a_config_built_in_python_takes_the_json_forms_of_eos_ids_and_rope_scaling():
    """ModelConfig(eos_token_id=[2, 3]) was refused as not "a list of them", and rope_scaling given as a dict
    (as config.json holds it) failed later with an AttributeError."""
    from longcat_flash.config import RopeScaling

    assert tiny().replace(eos_token_id=[2, 3]).eos_token_ids == (2, 3)
    d = tiny().to_dict()  # an empty list, as config.json reads it: none (it was "a list of them, got ()")
    assert tiny().replace(eos_token_id=[]).eos_token_id is None
    assert ModelConfig.from_dict({**d, "eos_token_id": []}).eos_token_id is None
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}
    assert tiny().replace(rope_scaling=yarn).rope_scaling == RopeScaling(**yarn)
    with pytest.raises(ValueError, match="ModelConfig.rope_scaling: .*'type'; its fields: \\['rope_type'"):
        tiny().replace(rope_scaling={"type": "yarn"})
