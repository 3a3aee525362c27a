"""Parameter bookkeeping vs an independent enumeration of the official checkpoint's tensors
(docs/architecture.md §3)."""
from __future__ import annotations

import json
import math

import pytest

from longcat_flash.analysis.params import info_command, param_report
from longcat_flash.config import ModelConfig
from longcat_flash.presets import bench, longcat_flash, small, tiny
from longcat_flash.train.config import build_config

BUFFER_SUFFIX = "e_score_correction_bias"  # stored in the checkpoint, not a parameter


def _mla_keys(prefix: str, c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """§3.2 self_attn tensors (+ the attention_bias biases on q_a, kv_a and o)."""
    h, d = c.num_attention_heads, c.hidden_size
    keys = {
        f"{prefix}.q_a_proj.weight": (c.q_lora_rank, d),
        f"{prefix}.q_a_layernorm.weight": (c.q_lora_rank,),
        f"{prefix}.q_b_proj.weight": (h * (c.qk_nope_head_dim + c.qk_rope_head_dim), c.q_lora_rank),
        f"{prefix}.kv_a_proj_with_mqa.weight": (c.kv_lora_rank + c.qk_rope_head_dim, d),
        f"{prefix}.kv_a_layernorm.weight": (c.kv_lora_rank,),
        f"{prefix}.kv_b_proj.weight": (h * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank),
        f"{prefix}.o_proj.weight": (d, h * c.v_head_dim),
    }
    if c.attention_bias:
        keys[f"{prefix}.q_a_proj.bias"] = (c.q_lora_rank,)
        keys[f"{prefix}.kv_a_proj_with_mqa.bias"] = (c.kv_lora_rank + c.qk_rope_head_dim,)
        keys[f"{prefix}.o_proj.bias"] = (d,)
    return keys


def _mlp_keys(prefix: str, hidden: int, inter: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.gate_proj.weight": (inter, hidden), f"{prefix}.up_proj.weight": (inter, hidden),
            f"{prefix}.down_proj.weight": (hidden, inter)}


def _layer_keys(i: int, c: ModelConfig) -> dict[str, tuple[int, ...]]:
    p, d, n_router = f"model.layers.{i}", c.hidden_size, c.n_routed_experts + c.zero_expert_num
    keys: dict[str, tuple[int, ...]] = {}
    for j in (0, 1):
        keys[f"{p}.input_layernorm.{j}.weight"] = (d,)
        keys[f"{p}.post_attention_layernorm.{j}.weight"] = (d,)
        keys.update(_mla_keys(f"{p}.self_attn.{j}", c))
        keys.update(_mlp_keys(f"{p}.mlps.{j}", d, c.ffn_hidden_size))
    keys[f"{p}.mlp.router.classifier.weight"] = (n_router, d)
    if c.router_bias:
        keys[f"{p}.mlp.router.classifier.bias"] = (n_router,)
    keys[f"{p}.mlp.router.{BUFFER_SUFFIX}"] = (n_router,)
    for e in range(c.n_routed_experts):  # zero experts have no tensors
        keys.update(_mlp_keys(f"{p}.mlp.experts.{e}", d, c.expert_ffn_hidden_size))
    return keys


def official_backbone_keys(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """§3.1 + §3.2: every non-MTP tensor of the official checkpoint for config `c`."""
    keys = {"model.embed_tokens.weight": (c.vocab_size, c.hidden_size), "model.norm.weight": (c.hidden_size,)}
    if not c.tie_word_embeddings:
        keys["lm_head.weight"] = (c.vocab_size, c.hidden_size)
    for i in range(c.num_layers):
        keys.update(_layer_keys(i, c))
    return keys


def official_mtp_keys(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """§3.3: the 17 MTP tensors (own embedding, no head)."""
    p, d = "model.mtp.layers.0", c.hidden_size
    keys = {"model.mtp.embed_tokens.weight": (c.vocab_size, d), f"{p}.enorm.m.weight": (d,),
            f"{p}.hnorm.m.weight": (d,), f"{p}.eh_proj.weight": (d, 2 * d), f"{p}.input_layernorm.weight": (d,),
            f"{p}.post_attention_layernorm.weight": (d,), "model.mtp.norm.weight": (d,)}
    keys.update(_mla_keys(f"{p}.self_attn", c))
    keys.update(_mlp_keys(f"{p}.transformer_layer.mlp", d, c.ffn_hidden_size))
    return keys


def _numel(keys: dict[str, tuple[int, ...]]) -> int:
    return sum(math.prod(shape) for name, shape in keys.items() if not name.endswith(BUFFER_SUFFIX))


def test_longcat_flash_headline_figures() -> None:
    r = param_report(longcat_flash())
    assert r.ffn_experts_target == 8
    for got, want in ((r.total, 560e9), (r.active_min, 18.6e9), (r.active_max, 31.3e9), (r.active_target, 27e9)):
        assert abs(got / want - 1) < 0.01, (got, want)


def test_longcat_flash_tensor_counts_match_the_checkpoint() -> None:
    c = longcat_flash()
    assert len(official_backbone_keys(c)) == 43_739
    assert len(official_mtp_keys(c)) == 17


@pytest.mark.parametrize("make", [tiny, small, bench, longcat_flash])
def test_total_and_mtp_equal_the_checkpoint_key_table(make) -> None:
    c = make()
    r = param_report(c)
    assert r.total == _numel(official_backbone_keys(c))
    assert r.mtp == _numel(official_mtp_keys(c))


@pytest.mark.parametrize("change", [dict(attention_bias=True), dict(router_bias=True),
                                    dict(tie_word_embeddings=True), dict(zero_expert_num=0, moe_topk=2)])
def test_optional_tensors_are_counted(change) -> None:
    c = tiny().replace(**change)
    assert param_report(c).total == _numel(official_backbone_keys(c))
    assert param_report(c).mtp == _numel(official_mtp_keys(c))


def test_no_mtp_head_counts_zero() -> None:
    assert param_report(tiny().replace(num_nextn_predict_layers=0)).mtp == 0


@pytest.mark.parametrize("make", [tiny, longcat_flash])
def test_active_is_total_minus_lookup_minus_unselected_experts(make) -> None:
    c = make()
    r = param_report(c, ffn_experts_target=2)
    expert = 3 * c.hidden_size * c.expert_ffn_hidden_size
    lookup = c.vocab_size * c.hidden_size
    assert r.active_min == r.total - lookup - c.num_layers * c.n_routed_experts * expert
    assert r.active_max - r.active_min == c.num_layers * c.moe_topk * expert
    assert r.active_target == r.active_min + c.num_layers * 2 * expert


def test_a_token_picks_at_least_topk_less_the_zero_experts() -> None:
    """With fewer zero experts than top-k, `info` printed an active count for 0 FFN experts and took a K_e no
    token can reach; a model without zero experts took any K_e, though every token uses all top-k."""
    c = tiny().replace(moe_topk=4, zero_expert_num=1)
    r = param_report(c, ffn_experts_target=3)
    assert r.active_min == r.active_target and "active/token, 3 FFN experts" in info_command(c)
    with pytest.raises(ValueError, match=r"ffn_experts_target \(--ffn-experts\) must be in \[3, 4\]"):
        param_report(c, ffn_experts_target=2.5)
    with pytest.raises(ValueError, match=r"must be in \[6, 6\]"):
        param_report(tiny().replace(zero_expert_num=0, moe_topk=6), ffn_experts_target=1)


def test_fewer_ffn_experts_than_top_k_cap_the_active_count() -> None:
    """With 2 FFN experts and top-3 a token uses at most 2; info counted 3 (at the 560B shape with 4 FFN experts,
    more active parameters than the model holds)."""
    c = tiny().replace(n_routed_experts=2, zero_expert_num=4, moe_topk=3)
    r = param_report(c)
    expert = 3 * c.hidden_size * c.expert_ffn_hidden_size
    assert (r.fewest_ffn_experts, r.most_ffn_experts) == (0, 2)
    assert r.active_max - r.active_min == c.num_layers * 2 * expert and r.active_max < r.total
    assert "active/token, 2 FFN experts" in info_command(c)
    with pytest.raises(ValueError, match=r"must be in \[0, 2\]"):
        param_report(c, ffn_experts_target=3)
    big = longcat_flash().replace(n_routed_experts=4, zero_expert_num=16)
    assert param_report(big).active_max < param_report(big).total
    with pytest.raises(ValueError, match="budget.target: K_e=2 FFN experts per token cannot be reached"):
        build_config("tiny", ["model.n_routed_experts=1", "model.zero_expert_num=4", "model.moe_topk=3",
                              "loss.balance_groups=1", "budget.target=2"])
    assert build_config("tiny", ["model.n_routed_experts=1", "model.zero_expert_num=4", "model.moe_topk=3",
                                 "loss.balance_groups=1"]).ffn_expert_target == 1  # the default 2/3 of top-k, capped


def test_tied_embedding_stays_active_as_the_head() -> None:
    c = tiny().replace(tie_word_embeddings=True)
    r = param_report(c)
    expert = 3 * c.hidden_size * c.expert_ffn_hidden_size
    assert r.lm_head == 0
    assert r.active_max == r.total - c.num_layers * (c.n_routed_experts - c.moe_topk) * expert


def test_kv_cache_bytes_per_token() -> None:
    r = param_report(longcat_flash())
    assert r.kv_cache_latent_bytes_per_token == 56 * 576 * 2 == 64_512  # docs/architecture.md §6.2
    assert r.kv_cache_expanded_bytes_per_token == 56 * 64 * (192 + 128) * 2
    assert param_report(longcat_flash(), bytes_per_value=1).kv_cache_latent_bytes_per_token == 32_256


def _matmul_weights(c: ModelConfig, ffn_experts: float) -> float:
    """Independent: 2-D tensors a token multiplies by; experts scaled to the K_e selected, no embedding."""
    keys = official_backbone_keys(c)
    if c.tie_word_embeddings:
        keys["lm_head.weight"] = keys["model.embed_tokens.weight"]
    total = 0.0
    for name, shape in keys.items():
        if len(shape) != 2 or name == "model.embed_tokens.weight":
            continue
        share = ffn_experts / c.n_routed_experts if ".mlp.experts." in name else 1.0
        total += share * math.prod(shape)
    return total


@pytest.mark.parametrize("make", [tiny, small])
def test_flops_per_token_is_two_per_active_weight_plus_attention(make) -> None:
    c = make()
    r0 = param_report(c)
    assert r0.flops_per_token == pytest.approx(2 * _matmul_weights(c, c.default_ffn_expert_target))
    n = min(1000, c.max_position_embeddings)
    r1 = param_report(c, context=n)
    per_key = 2 * (c.kv_lora_rank + c.qk_rope_head_dim) + 2 * c.kv_lora_rank
    attention = 2 * c.num_layers * c.num_attention_heads * n * per_key
    assert r1.attention_flops == attention
    assert r1.flops_per_token - r0.flops_per_token == pytest.approx(attention)


def test_bad_arguments_fail_early() -> None:
    with pytest.raises(ValueError, match="ffn_experts_target"):
        param_report(longcat_flash(), ffn_experts_target=13)
    with pytest.raises(ValueError, match="context"):
        param_report(longcat_flash(), context=-1)
    with pytest.raises(ValueError, match="context must be 0 to max_position_embeddings=512"):
        param_report(tiny(), context=513)  # positions the model cannot reach


def test_info_command_table_and_json() -> None:
    text = info_command(longcat_flash())
    assert "560.66 B" in text and "27.15 B" in text and "64,512 B" in text
    data = json.loads(info_command(longcat_flash(), context=4096, as_json=True))
    assert data["total"] == param_report(longcat_flash()).total and data["context"] == 4096


@pytest.mark.parametrize("change", [dict(), dict(attention_bias=True, router_bias=True), dict(zero_expert_num=0),
                                    dict(tie_word_embeddings=True)])
def test_report_equals_the_torch_model_and_its_checkpoint(change, tmp_path) -> None:
    from safetensors import safe_open

    from longcat_flash.checkpoint.hf import LongcatFlash

    cfg = tiny().replace(**change)
    model = LongcatFlash(cfg)
    report = param_report(cfg)
    assert report.total + report.mtp == model.num_parameters()
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert shapes == {**official_backbone_keys(cfg), **official_mtp_keys(cfg)}


def test_cli_info_json(capsys) -> None:
    from longcat_flash.cli import main

    main(["info", "longcat_flash", "--json"])
    figures = json.loads(capsys.readouterr().out)
    for key, expected in [("total", 560e9), ("active_min", 18.6e9), ("active_target", 27e9),
                          ("active_max", 31.3e9)]:
        assert abs(figures[key] / expected - 1) < 0.01, key


def test_cli_info_refuses_a_name_that_is_both_a_preset_and_a_checkpoint_here(tmp_path, monkeypatch, capsys) -> None:
    """`longcat info small` beside a trained ./small would describe the preset while the user meant the model."""
    from longcat_flash.cli import main

    (tmp_path / "small").mkdir()
    tiny().save_json(tmp_path / "small" / "config.json")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=r"both a preset and a checkpoint directory here; write \./small"):
        main(["info", "small"])
    main(["info", "./small", "--json"])
    assert json.loads(capsys.readouterr().out)["total"] == param_report(tiny()).total


def test_cli_info_on_a_run_directory_counts_at_the_runs_budget_target(tmp_path, capsys) -> None:
    """A run trained at budget.target=1 was described at the model's default K_e=2 of 3."""
    from longcat_flash.cli import main
    from longcat_flash.data.dataset_folders import RUN_CONFIG_FILE
    from longcat_flash.train.config import build_config

    run = tmp_path / "run"
    run.mkdir()
    cfg = build_config("tiny", ["budget.target=1"])
    cfg.model.save_json(run)
    (run / RUN_CONFIG_FILE).write_text(cfg.to_json())
    main(["info", str(run), "--json"])
    assert json.loads(capsys.readouterr().out)["ffn_experts_target"] == 1
    main(["info", str(run), "--json", "--ffn-experts", "2"])  # the flag still decides
    assert json.loads(capsys.readouterr().out)["ffn_experts_target"] == 2
    default = param_report(cfg.model).ffn_experts_target
    for odd in ([3], {}, True, "1"):  # a hand-edited file: a traceback from float(), or True read as K_e=1
        (run / RUN_CONFIG_FILE).write_text(json.dumps({"budget": {"target": odd}}))
        main(["info", str(run), "--json"])
        assert json.loads(capsys.readouterr().out)["ffn_experts_target"] == default  # unreadable: the model's


def test_cli_info_refuses_an_empty_name_and_names_a_config_that_is_not_text(tmp_path, monkeypatch) -> None:
    """`longcat info ""` described whatever config.json the current directory held; a config.json in UTF-16
    stopped with the codec's message, naming no file."""
    from longcat_flash.cli import main

    tiny().save_json(tmp_path / "config.json")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="no model given: name a preset"):
        main(["info", ""])
    (tmp_path / "config.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(SystemExit, match=r"config.json: not valid JSON \('utf-8' codec can't decode"):
        main(["info", str(tmp_path)])


def test_cli_info_reads_the_shape_of_a_pre_quantized_release(tmp_path, capsys) -> None:
    """info reads no weights, but refused the official FP8 release's config.json ("use the bf16 checkpoint ...
    with --quantize", a flag info does not have); loading such a checkpoint is still refused."""
    from longcat_flash.cli import main

    fp8 = {**tiny().to_dict(), "quantization_config": {"quant_method": "fp8", "fmt": "e4m3",
                                                       "weight_block_size": [128, 128]}}
    (tmp_path / "config.json").write_text(json.dumps(fp8))
    main(["info", str(tmp_path), "--json"])
    assert json.loads(capsys.readouterr().out)["total"] == param_report(tiny()).total
    with pytest.raises(ValueError, match="pre-quantized checkpoints are not loaded"):
        ModelConfig.from_json(tmp_path)
