"""Official-layout safetensors I/O: round trips, sharding, MTP quirks and clear errors."""
from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from longcat_flash.checkpoint.hf import LongcatFlash, model_directory
from longcat_flash.presets import tiny


@pytest.fixture
def saved(tmp_path):
    model = LongcatFlash(tiny())
    model.init_weights(0.1)
    model.routers()[0].e_score_correction_bias.normal_()
    model.save_pretrained(tmp_path)
    return model, tmp_path


def test_round_trip_is_exact_and_keeps_mtp(saved):
    model, path = saved
    loaded = LongcatFlash.from_pretrained(path)
    for key, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key
    ids = torch.randint(0, 256, (1, 8))
    assert torch.equal(loaded(ids, with_mtp=True).mtp_logits, model.eval()(ids, with_mtp=True).mtp_logits)


def test_official_key_names(saved):
    _, path = saved
    with safe_open(path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    for key in ["model.mtp.layers.0.enorm.m.weight", "model.mtp.layers.0.hnorm.m.weight",
                "model.mtp.layers.0.transformer_layer.mlp.down_proj.weight", "model.mtp.layers.0.eh_proj.weight",
                "model.mtp.layers.0.self_attn.kv_b_proj.weight", "model.mtp.embed_tokens.weight",
                "model.mtp.norm.weight", "model.layers.1.mlp.experts.7.gate_proj.weight",
                "model.layers.0.mlp.router.e_score_correction_bias", "model.layers.0.mlps.1.up_proj.weight"]:
        assert key in keys, key
    assert not any(".experts.8." in k for k in keys)  # exactly n_routed_experts, none for zero experts
    assert json.loads((path / "config.json").read_text())["num_nextn_predict_layers"] == 1


def test_sharded_save_with_index(tmp_path):
    model = LongcatFlash(tiny())
    model.save_pretrained(tmp_path, max_shard_bytes=200_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (tmp_path / "model.safetensors").exists()
    loaded = LongcatFlash.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    assert loaded.routers()[0].classifier.weight.dtype == torch.float32
    torch.testing.assert_close(loaded.lm_head.weight.float(), model.lm_head.weight.bfloat16().float())


def test_an_export_replaces_the_earlier_exports_files_and_no_others(tmp_path):
    """Every `model*.safetensors` in the folder was deleted as stale, a user's model_ema.safetensors too."""
    model = LongcatFlash(tiny())
    model.save_pretrained(tmp_path, max_shard_bytes=200_000)
    shards = sorted(p.name for p in tmp_path.glob("model-*-of-*.safetensors"))
    theirs = [tmp_path / "model_ema.safetensors", tmp_path / "model-v2.safetensors"]
    for path in theirs:
        path.write_bytes(b"the user's")
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.glob("model*.safetensors")) == sorted(
        ["model.safetensors", *(p.name for p in theirs)]) and shards
    assert all(path.read_bytes() == b"the user's" for path in theirs)


def test_a_part_left_by_an_export_killed_mid_write_goes_with_the_next_export(saved):
    """The killed writer cannot remove its hidden temporary (up to a shard's size); the next export does."""
    model, path = saved
    killed = ("import os, signal; from longcat_flash.checkpoint import hf; write = hf.write_safetensors\n"
              "def dying(*a, **k): write(*a, **k); os.kill(os.getpid(), signal.SIGKILL)\n"
              f"hf.write_safetensors = dying; hf.LongcatFlash.from_pretrained({str(path)!r})"
              f".save_pretrained({str(path)!r})")
    assert subprocess.run([sys.executable, "-c", killed]).returncode == -signal.SIGKILL
    assert len(list(path.glob(".model-part-*.tmp"))) == 1
    model.save_pretrained(path)
    assert not list(path.glob(".*.tmp"))
    assert torch.equal(LongcatFlash.from_pretrained(path).lm_head.weight, model.lm_head.weight)


def test_an_export_onto_a_full_disk_is_an_oserror_naming_the_model_folder(saved, monkeypatch):
    """safetensors' own error on a full disk was a traceback past the CLI's OSError handler; the message names the
    folder, not the hidden part file that is removed before anyone reads it."""
    from safetensors import SafetensorError

    from longcat_flash.checkpoint import safetensors_files

    def full(tensors, filename, metadata=None):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    model, path = saved
    monkeypatch.setattr(safetensors_files, "save_file", full)
    with pytest.raises(OSError, match=rf"^cannot write the model into {path}: .*No space left on device") as err:
        model.save_pretrained(path)
    assert ".tmp" not in str(err.value) and not list(path.glob(".*.tmp"))


def test_an_export_that_cannot_replace_the_model_says_so_and_leaves_no_part_behind(saved, monkeypatch):
    """A model file the user cannot replace (read-only, immutable): the error named the hidden temporary and left
    it there, a shard's size each time."""
    import os

    model, path = saved
    before = (path / "model.safetensors").read_bytes()
    replace = os.replace

    def refused(src, dst):
        if str(dst).endswith("model.safetensors"):
            raise PermissionError(1, "Operation not permitted", str(src), None, str(dst))
        replace(src, dst)

    monkeypatch.setattr(os, "replace", refused)
    with pytest.raises(OSError, match=rf"cannot write the model into {path}: Operation not permitted: .*"
                                      r"model\.safetensors'$"):
        model.save_pretrained(path)
    assert not list(path.glob(".*.tmp")) and (path / "model.safetensors").read_bytes() == before


def test_save_and_load_arguments_are_checked_before_any_work(saved):
    """torch.int8 as the dtype wrote a model of zeros (the name "int8" was refused); float16 turned weights past
    its range into inf, which the next load blamed on training; "200KB" as the shard size was a TypeError from
    deep inside."""
    model, path = saved
    with pytest.raises(ValueError, match=r"dtype must be one of .* got torch.int8"):
        model.save_pretrained(path / "int8", dtype=torch.int8)
    with pytest.raises(ValueError, match="max_shard_bytes must be a positive number of bytes, got '200KB'"):
        model.save_pretrained(path / "kb", max_shard_bytes="200KB")
    with torch.no_grad():
        model.lm_head.weight[0, 0] = 1e5
    with pytest.raises(ValueError, match=r"lm_head.weight holds values beyond float16's range .* bfloat16"):
        model.save_pretrained(path / "fp16", dtype="float16", max_shard_bytes=50_000)
    assert not list((path / "fp16").glob(".*.tmp"))  # the parts written before it went with the error


def test_a_folder_with_a_single_file_and_an_index_loads_the_single_file_as_transformers_does(tmp_path):
    import shutil

    sharded, single = LongcatFlash(tiny()), LongcatFlash(tiny())
    sharded.init_weights(0.1)
    single.init_weights(0.2)
    sharded.save_pretrained(tmp_path, max_shard_bytes=200_000)
    single.save_pretrained(tmp_path / "one")
    shutil.copy(tmp_path / "one" / "model.safetensors", tmp_path / "model.safetensors")  # both now
    assert torch.equal(LongcatFlash.from_pretrained(tmp_path).lm_head.weight, single.lm_head.weight)


def rewrite(path, edit):
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors")


def test_missing_tensor_names_the_key(saved):
    _, path = saved
    rewrite(path, lambda t: t.pop("model.layers.1.mlp.experts.3.up_proj.weight"))
    with pytest.raises(KeyError, match=r"model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight"):
        LongcatFlash.from_pretrained(path)


def test_a_partial_mtp_head_is_an_error_not_a_model_without_one(saved):
    _, path = saved  # only a checkpoint with no model.mtp.* weights at all reads as a model without the head
    rewrite(path, lambda t: t.pop("model.mtp.layers.0.eh_proj.weight"))
    with pytest.raises(KeyError, match=r"model\.mtp\.layers\.0\.eh_proj\.weight"):
        LongcatFlash.from_pretrained(path)


def test_a_config_without_the_mtp_head_loads_the_trunk_of_a_checkpoint_with_it(saved, caplog):
    """num_nextn_predict_layers 0 is how one drops the head (transformers skips its weights); it was refused."""
    model, path = saved
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 0}))
    loaded = LongcatFlash.from_pretrained(path)
    assert loaded.model.mtp is None and "holds model.mtp.* weights but config.json names no MTP head" in caplog.text
    ids = torch.randint(0, 256, (1, 8))
    assert torch.equal(loaded(ids).logits, model.eval()(ids).logits)


def test_a_config_that_leaves_the_mtp_field_out_has_the_head_its_files_hold(saved, caplog):
    """The official config's default is one head: left out of config.json over files holding it, the head was
    dropped (with a warning that config.json names none) and `longcat info` said "MTP head: none"."""
    model, path = saved
    config = json.loads((path / "config.json").read_text())
    del config["num_nextn_predict_layers"]
    (path / "config.json").write_text(json.dumps(config))
    loaded = LongcatFlash.from_pretrained(path)
    assert loaded.config.num_nextn_predict_layers == 1 and "names no MTP head" not in caplog.text
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
    rewrite(path, lambda t: [t.pop(k) for k in list(t) if k.startswith("model.mtp.")])  # as transformers saves
    assert LongcatFlash.from_pretrained(path).model.mtp is None


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_a_model_fused_for_inference_is_refused_before_anything_is_written(saved, quantize):
    """`load_engine(...)`'s model saved in place wrote stacked and scaled tensors under names no loader reads,
    over the checkpoint it came from."""
    from longcat_flash.infer.loader import load_for_inference

    _, path = saved
    before = (path / "model.safetensors").read_bytes()
    fused, _ = load_for_inference(path, dtype="float32", quantize=quantize)
    with pytest.raises(ValueError, match="a model fused or quantized for inference is not saved"):
        fused.save_pretrained(path)
    assert (path / "model.safetensors").read_bytes() == before


def test_a_folder_that_is_no_model_says_so_before_looking_for_a_tokenizer(tmp_path):
    (tmp_path / "readme.txt").write_text("notes")
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path} is not a model directory: it has no config.json"):
        model_directory(tmp_path)


def test_misshaped_tensor_names_key_and_shapes(saved):
    _, path = saved
    rewrite(path, lambda t: t.update({"model.norm.weight": torch.ones(65)}))
    with pytest.raises(ValueError, match=r"model\.norm\.weight.*\(65,\).*\(64,\)"):
        LongcatFlash.from_pretrained(path)


def test_unknown_tensor_is_an_error(saved):
    _, path = saved
    rewrite(path, lambda t: t.update({"model.layers.5.mlps.0.up_proj.weight": torch.ones(1)}))
    with pytest.raises(KeyError, match=r"model\.layers\.5"):
        LongcatFlash.from_pretrained(path)


@pytest.mark.parametrize("key", [
    "model.layers.0.mlp.experts.gate_up_proj",  # the stacked tensor beside the per-expert keys
    "model.mtp.enorm.weight",  # the native spelling of model.mtp.layers.0.enorm.m.weight beside it
])
def test_a_weight_given_twice_is_refused_naming_both_keys(saved, key):
    """A checkpoint holding per-expert keys and the stacked tensor too loaded silently, the later in the file
    overwriting the earlier (logits off by 3.6; transformers reads the per-expert ones)."""
    model, path = saved
    state = model.state_dict()
    rewrite(path, lambda t: t.update({key: torch.zeros_like(state[key])}))
    with pytest.raises(ValueError, match=r"checkpoint keys '.*' and '.*' both hold .*: one weight given twice"):
        LongcatFlash.from_pretrained(path)


def test_zero_expert_stubs_are_ignored_on_load(tmp_path, caplog):
    """transformers 5.0-5.24 write zero gate/up tensors for the zero-expert ids (8-11 in `tiny`); loading skips them."""
    model = LongcatFlash(tiny())
    model.save_pretrained(tmp_path)
    shape = (model.config.expert_ffn_hidden_size, model.config.hidden_size)
    rewrite(tmp_path, lambda t: t.update({f"model.layers.{i}.mlp.experts.{e}.{proj}_proj.weight": torch.zeros(shape)
                                          for i in range(model.config.num_layers) for e in range(8, 12)
                                          for proj in ("gate", "up")}))
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert "model.layers.0.mlp.experts.11.gate_proj.weight" in f.keys()
    with caplog.at_level("INFO"):
        loaded = LongcatFlash.from_pretrained(tmp_path)
    assert sum("zero-expert" in r.message for r in caplog.records) == 1
    assert torch.equal(loaded.model.layers[0].mlp.experts.gate_up_proj, model.model.layers[0].mlp.experts.gate_up_proj)


@pytest.mark.parametrize("key, shape", [
    ("model.layers.0.mlp.experts.50.gate_proj.weight", (32, 64)),  # past every expert id (8 FFN + 4 zero)
    ("model.layers.0.mlp.experts.9.down_proj.weight", (64, 32)),  # a zero expert has no down projection
    ("model.layers.0.mlp.experts.9.up_proj.weight", (7, 7)),  # nor a gate/up matrix of another shape
    ("model.layers.5.mlp.experts.9.up_proj.weight", (32, 64)),  # nor one in a layer the model lacks
])
def test_expert_tensors_past_the_ffn_experts_are_refused_unless_zero_expert_stubs(saved, key, shape):
    """A checkpoint of 8 FFN + 4 zero experts read with a config of 4 + 8 loaded with experts 4-7 dropped."""
    _, path = saved
    rewrite(path, lambda t: t.update({key: torch.zeros(shape)}))
    with pytest.raises(KeyError, match=key.replace(".", r"\.")):
        LongcatFlash.from_pretrained(path)


def test_an_index_is_checked_against_its_shards(tmp_path):
    model = LongcatFlash(tiny())
    torch.nn.init.normal_(model.model.norm.weight)
    model.save_pretrained(tmp_path, max_shard_bytes=200_000)
    index_file = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    other = next(name for name in index["weight_map"].values() if name != index["weight_map"]["model.norm.weight"])
    for weight_map, error, message in [
            ({**index["weight_map"], "model.norm.weight": other}, KeyError, "maps 'model.norm.weight' to"),
            ({**index["weight_map"], "model.norm.weight": "../elsewhere.safetensors"}, ValueError, "outside"),
            (None, ValueError, "no weight_map")]:
        index_file.write_text(json.dumps({**index, "weight_map": weight_map}))
        with pytest.raises(error, match=message):
            LongcatFlash.from_pretrained(tmp_path)
    index_file.write_text("{not json")
    with pytest.raises(ValueError, match="index.json is not a JSON object"):
        LongcatFlash.from_pretrained(tmp_path)
    # "./name", which transformers reads, was "outside the checkpoint folder"
    index_file.write_text(json.dumps({**index, "weight_map": {k: f"./{v}" for k, v in index["weight_map"].items()}}))
    assert torch.equal(LongcatFlash.from_pretrained(tmp_path).model.norm.weight, model.model.norm.weight)
    index_file.write_text(json.dumps(index))
    (tmp_path / other).rename(tmp_path / "aside")  # a missing shard: it was the OS's "No such file or directory"
    with pytest.raises(FileNotFoundError, match=f"index.json names {other}, which is missing"):
        LongcatFlash.from_pretrained(tmp_path)  # reading the dtypes first (dtype auto), as `longcat generate` does
    (tmp_path / "aside").rename(tmp_path / other)
    # a key its shard holds but the index leaves out is read, as transformers and vLLM read every key of a shard
    index_file.write_text(json.dumps({**index, "weight_map": {k: v for k, v in index["weight_map"].items()
                                                             if k != "model.norm.weight"}}))
    assert torch.equal(LongcatFlash.from_pretrained(tmp_path).model.norm.weight, model.model.norm.weight)
    two = tmp_path / "two"  # two shards: the MTP head's keys beside the trunk's, left out of the index
    model.save_pretrained(two, max_shard_bytes=sum(t.numel() * t.element_size() for t in model.state_dict().values())
                          // 2 + 1)
    index = json.loads((two / "model.safetensors.index.json").read_text())
    trunk_shards = {v for k, v in index["weight_map"].items() if not k.startswith("model.mtp.")}
    kept = {k: v for k, v in index["weight_map"].items() if not k.startswith("model.mtp.") or v not in trunk_shards}
    assert not any(k.startswith("model.mtp.") for k in kept)
    (two / "model.safetensors.index.json").write_text(json.dumps({**index, "weight_map": kept}))
    loaded = LongcatFlash.from_pretrained(two)  # read as a head (the config read found none and dropped it)
    assert loaded.config.num_nextn_predict_layers == 1
    assert torch.equal(loaded.model.mtp.eh_proj.weight, model.model.mtp.eh_proj.weight)


def test_a_weight_that_is_not_floating_point_is_refused(saved):
    _, path = saved
    rewrite(path, lambda t: t.update({"model.norm.weight": torch.ones(64, dtype=torch.int64)}))
    with pytest.raises(ValueError, match="model.norm.weight.*int64"):
        LongcatFlash.from_pretrained(path)


def test_saving_a_config_transformers_ignores_says_so(tmp_path, caplog):
    with caplog.at_level("WARNING"):
        LongcatFlash(tiny()).save_pretrained(tmp_path / "release")
        assert "ignores" not in caplog.text
        LongcatFlash(tiny().replace(norm_topk_prob=True, router_bias=True)).save_pretrained(tmp_path / "other")
    assert "ignores router_bias=True, norm_topk_prob=True" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):  # no zero experts: their kind computes nothing, in transformers or here
        LongcatFlash(tiny().replace(zero_expert_num=0, zero_expert_type="drop")).save_pretrained(tmp_path / "none")
    assert "ignores" not in caplog.text


def test_pickle_checkpoints_are_refused(tmp_path):
    tiny().save_json(tmp_path)
    torch.save({"x": torch.ones(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="pickle files are never loaded"):
        LongcatFlash.from_pretrained(tmp_path)


def test_a_corrupt_weights_file_is_named(tmp_path):
    tiny().save_json(tmp_path)
    (tmp_path / "model.safetensors").write_text('{"not": "safetensors"}')
    with pytest.raises(ValueError, match="model.safetensors is not a readable safetensors file"):
        LongcatFlash.from_pretrained(tmp_path)


def test_tied_embeddings_round_trip(tmp_path):
    model = LongcatFlash(tiny().replace(tie_word_embeddings=True))
    model.save_pretrained(tmp_path)
    loaded = LongcatFlash.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_a_tied_checkpoint_may_also_store_its_embedding_as_the_lm_head(tmp_path):
    """Some writers keep lm_head.weight beside a tied embedding; transformers drops it, which is the same model only
    when it is a copy."""
    model = LongcatFlash(tiny().replace(tie_word_embeddings=True))
    model.save_pretrained(tmp_path)
    embedding = load_file(tmp_path / "model.safetensors")["model.embed_tokens.weight"]
    rewrite(tmp_path, lambda t: t.update({"lm_head.weight": embedding.clone()}))
    assert torch.equal(LongcatFlash.from_pretrained(tmp_path).lm_head.weight, model.lm_head.weight)
    rewrite(tmp_path, lambda t: t.update({"lm_head.weight": embedding + 1}))
    with pytest.raises(ValueError, match="lm_head.weight is not a copy of model.embed_tokens.weight: set "
                                         "tie_word_embeddings to false"):
        LongcatFlash.from_pretrained(tmp_path)


def test_a_tied_checkpoint_may_store_its_embedding_as_the_lm_head_alone(tmp_path):
    """safetensors' save_model keeps one name per shared tensor, the first in order: lm_head.weight. transformers
    loads such a file; here it was "checkpoint is missing 1 tensor(s): 'model.embed_tokens.weight'"."""
    model = LongcatFlash(tiny().replace(tie_word_embeddings=True))
    model.save_pretrained(tmp_path)
    rewrite(tmp_path, lambda t: t.update({"lm_head.weight": t.pop("model.embed_tokens.weight")}))
    loaded = LongcatFlash.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_a_non_finite_weight_is_refused_by_name(saved):
    """One NaN weight makes every logit NaN: greedy decoding printed nothing and sampling failed deep inside."""
    _, path = saved
    key = "model.layers.1.mlps.0.down_proj.weight"
    weight = load_file(path / "model.safetensors")[key]
    rewrite(path, lambda t: t[key].view(-1).__setitem__(3, float("nan")))
    with pytest.raises(ValueError, match=f"{key}' holds NaN or Inf values"):
        LongcatFlash.from_pretrained(path)
    rewrite(path, lambda t: t.update({key: weight.index_fill(1, torch.tensor([2]), 1e6)}))  # past fp16's 65504
    assert LongcatFlash.from_pretrained(path).state_dict()[key].abs().max() == 1e6
    with pytest.raises(ValueError, match=f"{key}' overflows torch.float16"):
        LongcatFlash.from_pretrained(path, dtype=torch.float16)


def test_a_checkpoint_of_mixed_dtypes_loads_in_its_main_one(saved):
    """A file with the norms in fp32 and the rest in bf16 (as some exporters write): loaded without a dtype, the
    model is bf16 throughout (the router fp32, as always), so no matmul meets two dtypes."""
    _, path = saved
    tensors = load_file(path / "model.safetensors")
    save_file({k: v.float() if "norm" in k else v.bfloat16() for k, v in tensors.items()}, path / "model.safetensors")
    loaded = LongcatFlash.from_pretrained(path)
    dtypes = {k: v.dtype for k, v in loaded.state_dict().items() if v.is_floating_point()}
    assert {d for k, d in dtypes.items() if ".router." not in k} == {torch.bfloat16}
    assert loaded(torch.randint(0, 256, (1, 5))).logits.dtype == torch.bfloat16


def test_a_float64_model_saves_and_loads_as_float64(saved, tmp_path):
    """A model saved after .double() was written in float64 and loaded back silently in fp32 (transformers loads
    it in float64), and dtype=torch.float64 was refused on both sides. Inference computes it in fp32."""
    from longcat_flash.infer.loader import load_for_inference

    model, _ = saved
    model.double().save_pretrained(tmp_path / "f64")
    loaded = LongcatFlash.from_pretrained(tmp_path / "f64")
    assert loaded.lm_head.weight.dtype == torch.float64
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    model.float().save_pretrained(tmp_path / "named", dtype=torch.float64)
    assert LongcatFlash.from_pretrained(tmp_path / "named", dtype="float64").lm_head.weight.dtype == torch.float64
    assert load_for_inference(tmp_path / "f64")[0].lm_head.weight.dtype == torch.float32


@pytest.mark.parametrize("config, message", [
    ([1, 2], "must hold a JSON object"),
    ({"quantization_config": {"quant_method": "fp8"}}, "pre-quantized checkpoints are not loaded"),
    ({"model_type": "deepseek_v3"}, "model_type='deepseek_v3' is not a LongCat-Flash model"),
    ({"num_hidden_layers": 10}, "num_hidden_layers=10 disagrees with num_layers=2"),  # 2 or 4 would be read
    ({"qk_head_dim": 24}, "qk_head_dim=24 disagrees"),
    ({"num_key_value_heads": 1}, "num_key_value_heads=1 disagrees with num_attention_heads=4"),
    ({"torch_dtype": "int8"}, "torch_dtype='int8' is not a floating-point dtype"),  # as transformers refuses it
])
def test_a_config_we_cannot_honour_is_refused_by_name(saved, config, message):
    _, path = saved
    raw = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config if isinstance(config, list) else {**raw, **config}))
    with pytest.raises(ValueError, match=message):
        LongcatFlash.from_pretrained(path)


def test_generation_config_eos_ids_end_generation_too(saved):
    """transformers' generate stops at generation_config.json's eos ids; a chat model's end of turn (`<|im_end|>`)
    is often listed only there, and it was never read."""
    from longcat_flash.checkpoint.hf import checkpoint_config

    saved = saved[1]
    (saved / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7], "temperature": 0.7}))
    assert checkpoint_config(saved).eos_token_ids == (2, 7)
    assert LongcatFlash.from_pretrained(saved).config.eos_token_ids == (2, 7)
    (saved / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 10**9]}))
    with pytest.raises(ValueError, match=r"generation_config.json: ModelConfig.eos_token_id=.* outside the vocab"):
        checkpoint_config(saved)
    (saved / "generation_config.json").write_text("{oops")
    with pytest.raises(ValueError, match="generation_config.json: not valid JSON"):
        checkpoint_config(saved)


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # dynamo's import
def test_a_compiled_model_saves_as_the_model_it_wraps_and_dtypes_may_be_named(saved, tmp_path):
    """save_pretrained(torch.compile(model)) wrote every key as `_orig_mod.…`, which nothing could load; and
    from_pretrained(dtype="bfloat16") failed inside torch (transformers takes dtype names)."""
    from longcat_flash.checkpoint import hf

    model, _ = saved
    hf.save_pretrained(torch.compile(model), tmp_path / "compiled")
    loaded = LongcatFlash.from_pretrained(tmp_path / "compiled")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    model.save_pretrained(tmp_path / "bf16", dtype="bfloat16")
    assert LongcatFlash.from_pretrained(tmp_path / "bf16").lm_head.weight.dtype == torch.bfloat16
    assert LongcatFlash.from_pretrained(tmp_path / "compiled", dtype="bfloat16").lm_head.weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype must be one of"):
        LongcatFlash.from_pretrained(tmp_path / "compiled", dtype="bf16")


def test_a_random_model_leaves_the_callers_generator_as_it_was():
    """random_model reseeded the global generator: a notebook's torch.manual_seed before it no longer held after."""
    from longcat_flash.checkpoint.fresh import random_model

    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    first = random_model(tiny(), seed=7)
    assert torch.equal(torch.rand(3), expected)
    assert torch.equal(random_model(tiny(), seed=7).lm_head.weight, first.lm_head.weight)  # the seed still decides


def test_a_device_this_machine_lacks_is_one_line(saved):
    """from_pretrained(device="cuda") on a CPU-only torch was torch's AssertionError from deep inside a copy."""
    from longcat_flash.device import DeviceError

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(DeviceError, match="--device cuda: CUDA is not available on this machine"):
        LongcatFlash.from_pretrained(saved[1], device="cuda")


def test_a_layer_count_transformers_reads_as_half_is_pointed_out(saved, caplog):
    """num_hidden_layers equal to num_layers (SGLang's spelling) reads here as num_layers, and transformers builds
    half as many layers from it: other logits there, without a word."""
    model, path = saved
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": config["num_layers"]}))
    assert LongcatFlash.from_pretrained(path).config.num_layers == config["num_layers"]
    half = config["num_layers"] // 2
    assert f"transformers' LongcatFlash takes num_hidden_layers as two per layer and builds {half}" in caplog.text
