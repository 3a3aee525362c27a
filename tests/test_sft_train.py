"""SFT training: document masking makes a packed forward equal separate forwards (trunk and MTP head); init_from
loads a checkpoint under non-shape overrides; a tokenizer without the chat markers grows the model, which still
loads in transformers; a short run learns and resumes bit for bit."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from sft_support import tagless_checkpoint, tiny_checkpoint, write_conversations

from longcat_flash.checkpoint.hf import LongcatFlash
from longcat_flash.data import IGNORE
from longcat_flash.model import Transformer
from longcat_flash.presets import tiny
from longcat_flash.tokenizer import TOOL_CALL_TOKENS, Tokenizer
from longcat_flash.train.config import build_config
from longcat_flash.train.losses import mtp_targets
from longcat_flash.train.metrics import read_metrics
from longcat_flash.train.checkpoints import resume_config
from longcat_flash.train.trainer import setup, train


def packed_and_separate(model: Transformer, lengths: list[int], documents: bool, names: list[int] | None = None):
    """names: each document's id in `documents` (0, 1, 2, ... by default)."""
    torch.manual_seed(1)
    parts = [torch.randint(0, 256, (1, n)) for n in lengths]
    ids = torch.cat(parts, dim=1)
    docs = torch.cat([torch.full((1, n), i) for i, n in zip(names or range(len(lengths)), lengths)], dim=1)
    with torch.no_grad():
        packed = model(ids, with_mtp=True, documents=docs if documents else None)
        alone = [model(p, with_mtp=True) for p in parts]
    return packed, alone


@pytest.mark.parametrize("documents,names", [(True, None), (False, None), (True, [0, 1, 0])],
                         ids=["masked", "mask-off", "an-id-again"])
def test_packed_forward_equals_separate_forwards(documents, names):
    """An id seen again after another ([0, 1, 0]) is a third document: its positions restarted while its tokens
    attended to the first document's, which matched neither reading."""
    model = Transformer(tiny()).eval()
    lengths = [9, 5, 12]
    packed, alone = packed_and_separate(model, lengths, documents, names)
    start, worst_logits, worst_mtp = 0, 0.0, 0.0
    for n, out in zip(lengths, alone):
        worst_logits = max(worst_logits, (packed.logits[:, start:start + n] - out.logits).abs().max().item())
        # the MTP head at t reads token t+1: within a document up to its second-last token
        worst_mtp = max(worst_mtp, (packed.mtp_logits[:, start:start + n - 1] - out.mtp_logits).abs().max().item())
        start += n
    if documents:
        assert worst_logits < 1e-5 and worst_mtp < 1e-5
    else:  # without the mask the later conversations see the earlier ones: the check above has teeth
        assert worst_logits > 1e-2 and worst_mtp > 1e-2


def test_mtp_targets_never_cross_a_document():
    targets = torch.arange(1, 9).view(1, 8)  # (B, S): token t+1 for input t
    docs = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2]])
    # MTP at t predicts targets[t+1] from token t+1: valid only when t and t+1 share a document
    assert mtp_targets(targets, docs).tolist() == [[2, 3, IGNORE, 5, 6, 7, IGNORE]]
    assert mtp_targets(targets).tolist() == [[2, 3, 4, 5, 6, 7, 8]]


def test_padding_moves_neither_the_budget_controller_nor_the_auxiliary_losses():
    """A packed window's padding (one id, all routed to the same experts) was counted as routed data: padded to 128
    instead of 32, the same two conversations moved the router biases 4x as far and changed the z-loss, the balance
    loss and the FFN experts per token. Only the window's length may change now."""
    import numpy as np

    from longcat_flash.data.conversation_packing import pack
    from longcat_flash.train.budget import BudgetController
    from longcat_flash.train.optim import build_optimizer, init_parameters
    from longcat_flash.train.trainer import train_step

    rng = np.random.default_rng(0)
    conversations = [(rng.integers(3, 512, n), np.arange(n) >= n - 9) for n in (21, 10)]  # the last 9 trained
    results = []
    for seq_len in (32, 128):
        cfg = build_config("tiny", [f"data.seq_len={seq_len}", "data.batch_size=1", "dtype=float32",
                                    "loss.monitor_every=1"])
        torch.manual_seed(0)
        model = Transformer(cfg.model)
        optimizer = build_optimizer(model, cfg.optim, init_parameters(model, cfg.scaling, 0))
        controller = BudgetController(cfg.budget, cfg.model.num_layers, cfg.model.n_routed_experts,
                                      cfg.model.moe_topk, cfg.ffn_expert_target)
        data = pack(conversations, seq_len, pad_id=0, split="train")
        assert len(data) == 1  # both conversations in one window, then padding
        metrics = train_step(model, optimizer, controller, data.batch([0]), cfg, step=10)
        results.append((metrics, torch.stack([r.e_score_correction_bias for r in model.routers()])))
    (short, short_bias), (long, long_bias) = results
    for key in ("lm_loss", "mtp_loss", "z_loss", "balance_loss", "ffn_experts_per_token", "hidden_norm",
                "router_grad_ratio"):
        assert long[key] == pytest.approx(short[key], rel=1e-5), key
    assert long["ffn_experts_per_layer"] == short["ffn_experts_per_layer"]
    torch.testing.assert_close(long_bias, short_bias)


def test_the_auxiliary_losses_do_not_move_with_how_padding_falls_between_micro_batches():
    """With the padding left out, the z-loss was a mean per micro-batch averaged over them: a micro-batch of short
    conversations weighed its tokens more. Over the step's conversation tokens, grad_accum changes nothing."""
    import numpy as np

    from longcat_flash.data.conversation_packing import pack
    from longcat_flash.train.optim import build_optimizer, init_parameters
    from longcat_flash.train.trainer import train_step

    rng = np.random.default_rng(1)
    conversations = [(rng.integers(3, 512, n), np.arange(n) >= n - 6) for n in (60, 9, 30, 12)]
    data = pack(conversations, 64, pad_id=0, split="train")  # windows filled unevenly
    results = {}
    for accum in (1, len(data)):
        cfg = build_config("tiny", ["data.seq_len=64", f"data.batch_size={len(data)}", f"data.grad_accum={accum}",
                                    "dtype=float32", "loss.monitor_every=0"])
        torch.manual_seed(0)
        model = Transformer(cfg.model)
        optimizer = build_optimizer(model, cfg.optim, init_parameters(model, cfg.scaling, 0))
        results[accum] = train_step(model, optimizer, None, data.batch(range(len(data))), cfg, step=10)
    one, split = results.values()
    for key in ("lm_loss", "z_loss", "ffn_experts_per_token", "hidden_norm"):
        assert split[key] == pytest.approx(one[key], rel=1e-5), key


def sft_config(model: Path, data: Path, *extra: str):
    return build_config("sft", [f"init_from={model}", f"sft.data={data}", "data.seq_len=256", "data.batch_size=4",
                                "data.val_fraction=0.2", "data.val_batches=2", "dtype=float32", "max_steps=2",
                                "eval_every=0", "sample_tokens=4", "loss.monitor_every=0", *extra])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def conversations(tmp_path_factory) -> Path:
    return write_conversations(tmp_path_factory.mktemp("data") / "chat.jsonl", 150)


def test_init_from_loads_the_checkpoint_and_keeps_non_shape_overrides(tmp_path, checkpoint, conversations):
    cfg = sft_config(checkpoint, conversations, "model.rope_theta=5e5", "model.max_position_embeddings=1024")
    run = setup(cfg, tmp_path / "run", progress=False)
    assert run.cfg.model.rope_theta == 5e5 and run.cfg.model.max_position_embeddings == 1024
    saved = LongcatFlash.from_pretrained(checkpoint).state_dict()
    ours = run.model.state_dict()
    assert saved.keys() == ours.keys()
    assert all(torch.equal(saved[k], ours[k]) for k in saved)  # router biases included
    assert Tokenizer.load(tmp_path / "run").fingerprint == Tokenizer.load(checkpoint).fingerprint  # has the tags


def test_the_recipes_windows_follow_the_context_the_overrides_set(checkpoint, conversations):
    """sft's windows are the recipe's 2048 tokens or the model's context if shorter, that context as --set leaves
    it: lowered below the checkpoint's 512 it was an error about a data.seq_len the user never set."""
    def windows(*overrides: str) -> int:
        return build_config("sft", [f"init_from={checkpoint}", f"sft.data={conversations}", *overrides]).data.seq_len

    assert windows() == 512
    assert windows("model.max_position_embeddings=128") == 128
    assert windows("model.max_position_embeddings=4096") == 2048
    assert windows("model.max_position_embeddings=128", "data.seq_len=64") == 64
    with pytest.raises(ValueError, match="data.seq_len must be <= model.max_position_embeddings=128"):
        windows("model.max_position_embeddings=128", "data.seq_len=256")


@pytest.mark.parametrize("override", ["data.source=/elsewhere", "data.max_bytes=5", "data.text_field=body",
                                      "data.tokenizer_sample_bytes=7", "data={'max_bytes': 5}"])
def test_what_sft_never_reads_is_refused(checkpoint, conversations, override):
    """They were recorded in train_config.json and did nothing: the corpus is not read when the tokenizer comes
    from init_from. (data.cache_dir is read: the tokenized conversations are cached there.)"""
    key = override.split("=")[0] if "{" not in override else "data.max_bytes"
    with pytest.raises(ValueError, match=f"{key} is not read by an SFT run"):
        build_config("sft", [f"init_from={checkpoint}", f"sft.data={conversations}", override])


def test_a_held_out_share_beside_held_out_conversations_is_refused(checkpoint, conversations, tmp_path):
    """With --val-data every row of --data is trained on: data.val_fraction was recorded and did nothing."""
    held_out = tmp_path / "val.jsonl"
    held_out.write_text(Path(conversations).read_text())
    given = [f"init_from={checkpoint}", f"sft.data={conversations}", "data.val_fraction=0.5"]
    with pytest.raises(ValueError, match="data.val_fraction is not read by an SFT run given --val-data"):
        build_config("sft", [*given, f"sft.val_data={held_out}"])
    assert build_config("sft", given).data.val_fraction == 0.5  # without it, the share is what is held out


def test_what_pre_training_never_reads_is_refused(tmp_path):
    for override in ("sft.overlong=skip", "sft.ignore_columns=id"):
        with pytest.raises(ValueError, match=f"{override.split('=')[0]} is not read by pre-training"):
            build_config("tiny", [override])
    assert build_config("tiny", ["data.source=c.jsonl", "data.max_bytes=5", "data.text_field=body"]).data.max_bytes == 5
    assert build_config("sft", ["sft.overlong=skip"]).sft.overlong == "skip"  # sft --print-config, before any data


def test_init_from_refuses_a_shape_changing_override(tmp_path, checkpoint, conversations):
    cfg = sft_config(checkpoint, conversations, "model.expert_ffn_hidden_size=16")
    with pytest.raises(ValueError, match=r"does not have the checkpoint's weight shapes.*expert_ffn_hidden_size=16"):
        setup(cfg, tmp_path / "run", progress=False)


def _edited(checkpoint: Path, out: Path, config: dict, weights=lambda w: w) -> Path:
    """A copy of `checkpoint` with config.json fields replaced and its weights passed through `weights`."""
    shutil.copytree(checkpoint, out)
    fields = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**fields, **config}))
    save_file(weights(load_file(out / "model.safetensors")), out / "model.safetensors")
    return out


def test_init_from_a_tied_checkpoint_into_an_untied_run_starts_the_head_as_the_embedding(tmp_path, checkpoint):
    """`--set model.tie_word_embeddings=false` on a tied base (the way to train it under torchrun) was refused: its
    lm_head was "missing". The head now starts as the copy of the embedding it was, as its own parameter."""
    from longcat_flash.checkpoint import hf
    from longcat_flash.train.pretrained import load_pretrained

    tied = _edited(checkpoint, tmp_path / "tied", {"tie_word_embeddings": True},
                   lambda w: {k: v for k, v in w.items() if k != "lm_head.weight"})
    model = Transformer(hf.checkpoint_config(tied).replace(tie_word_embeddings=False))
    load_pretrained(model, tied)
    embedding = load_file(tied / "model.safetensors")["model.embed_tokens.weight"]
    assert torch.equal(model.lm_head.weight, embedding) and torch.equal(model.model.embed_tokens.weight, embedding)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    untied = _edited(checkpoint, tmp_path / "untied", {}, lambda w: {k: v for k, v in w.items()
                                                                     if k != "lm_head.weight"})
    with pytest.raises(KeyError, match="lm_head.weight"):  # an untied checkpoint's head is not made up
        load_pretrained(Transformer(hf.checkpoint_config(untied)), untied)


def _nan_embedding(w: dict) -> dict:
    w["model.embed_tokens.weight"][3, 5] = float("nan")
    return w


@pytest.mark.parametrize("config, weights, refusal", [
    ({"n_routed_experts": 4, "zero_expert_num": 8}, lambda w: w, "'model.layers.0.mlp.experts.4.down_proj.weight' "
     r"\(shape \(\d+, \d+\)\) has no place"),  # 8 FFN experts held, 4 named: experts 4-7 were dropped silently
    ({"tie_word_embeddings": True}, lambda w: {**w, "lm_head.weight": w["model.embed_tokens.weight"].clone()}, None),
    ({"tie_word_embeddings": True}, lambda w: w, "is not a copy of model.embed_tokens.weight"),
    ({"num_nextn_predict_layers": 0}, lambda w: w, None),  # the head config.json leaves out: read without it
    ({}, _nan_embedding, "'model.embed_tokens.weight' holds NaN or Inf"),
    ({}, lambda w: {k: v for k, v in w.items() if k != "model.layers.0.mlp.experts.5.down_proj.weight"},
     r"missing 1 tensor\(s\): 'model.layers.0.mlp.experts.5.down_proj.weight'"),  # it trained from random weights
    ({"vocab_size": 600}, lambda w: w, r"(has 512 rows, but its config.json says vocab_size=600|has shape \(512, )"),
], ids=["experts-past-the-config", "tied-with-a-copy", "tied-with-another-head", "mtp-left-out", "nan",
        "an-expert-missing", "config-vocab-past-the-rows"])
def test_init_from_reads_a_checkpoint_as_loading_it_does(tmp_path, checkpoint, config, weights, refusal):
    """init_from had its own key loop: it dropped FFN experts the config did not name, refused a tied model's copy
    of the embedding and an MTP head config.json leaves out (both read fine for inference), and took NaN weights."""
    from longcat_flash.checkpoint import hf
    from longcat_flash.train.pretrained import load_pretrained

    edited = _edited(checkpoint, tmp_path / "edited", config, weights)
    model = Transformer(hf.checkpoint_config(edited))
    if refusal:
        with pytest.raises((KeyError, ValueError), match=refusal):
            LongcatFlash.from_pretrained(edited)
        with pytest.raises((KeyError, ValueError), match=refusal):
            load_pretrained(model, edited)
        return
    load_pretrained(model, edited)
    loaded = LongcatFlash.from_pretrained(edited).state_dict()
    assert model.state_dict().keys() == loaded.keys()
    assert all(torch.equal(v, loaded[k]) for k, v in model.state_dict().items())


def test_a_checkpoint_without_mtp_weights_fine_tunes_without_the_head(tmp_path, checkpoint, conversations):
    """config.json names the head, the files hold none (a transformers save): the run has no MTP head and no MTP
    loss, rather than failing on the missing weights or on the recipe's mtp_weight."""
    base = tmp_path / "base"
    shutil.copytree(checkpoint, base)
    weights = load_file(base / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("model.mtp.")}, base / "model.safetensors")
    cfg = sft_config(base, conversations)
    assert cfg.model.num_nextn_predict_layers == 0 and cfg.loss.mtp_weight == 0
    train(cfg, tmp_path / "run", progress=False)
    tuned = LongcatFlash.from_pretrained(tmp_path / "run")
    assert tuned.model.mtp is None and not any(k.startswith("model.mtp.") for k in tuned.state_dict())
    assert read_metrics(tmp_path / "run")[-1]["mtp_loss"] is None


def test_a_model_that_ends_turns_at_another_stop_token_tunes_and_keeps_it(tmp_path, checkpoint, conversations):
    """A ChatML-style model ends turns with a token only generation_config.json lists as eos (here `<s>`, id 1):
    sft refused every turn as "never learns to stop", and the saved config kept the tokenizer's eos alone."""
    base = tmp_path / "base"
    shutil.copytree(checkpoint, base)
    (base / "chat_template.jinja").write_text(
        "{% if tools %}tools: {{ tools | tojson }}\n{% endif %}{% for m in messages %}{{ m['role'] }}: "
        "{{ m['content'] or '' }}{% for c in m['tool_calls'] or [] %}<longcat_tool_call>{{ c['function'] | tojson }}"
        "</longcat_tool_call>{% endfor %}{% if m['role'] == 'assistant' %}<s>{% endif %}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}")
    (base / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 1]}))
    train(sft_config(base, conversations), tmp_path / "run", progress=False)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["eos_token_id"] == [2, 1]
    (base / "generation_config.json").unlink()  # now nothing stops at <s>: refused, naming the turn
    with pytest.raises(ValueError, match=r"messages\[\d\]: the chat template ends the assistant turn without a token"):
        train(sft_config(base, conversations), tmp_path / "refused", progress=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_tuned_model_is_written_in_the_dtype_its_base_was_stored_in(tmp_path, checkpoint, conversations, dtype):
    """A bf16 base came back as fp32 (twice the size), without its generation_config.json; so did an fp16 one."""
    from longcat_flash.checkpoint import hf
    from longcat_flash.checkpoint.safetensors_files import stored_dtype

    base = tmp_path / "base"
    shutil.copytree(checkpoint, base)
    hf.save_pretrained(LongcatFlash.from_pretrained(checkpoint), base, dtype=dtype)
    (base / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, "temperature": 0.6}))
    train(sft_config(base, conversations), tmp_path / "run", progress=False)
    assert stored_dtype(tmp_path / "run") == dtype
    assert json.loads((tmp_path / "run" / "config.json").read_text())["dtype"] == str(dtype).removeprefix("torch.")
    routers = {k: v.dtype for k, v in load_file(tmp_path / "run" / "model.safetensors").items() if ".router." in k}
    assert routers and set(routers.values()) == {torch.float32}  # fp32 by design, whatever the export
    assert (tmp_path / "run" / "generation_config.json").read_text() == (base / "generation_config.json").read_text()
    if dtype == torch.bfloat16:
        train(sft_config(base, conversations, "checkpoint.export_dtype=float32"), tmp_path / "fp32", progress=False)
        assert stored_dtype(tmp_path / "fp32") == torch.float32


def test_missing_chat_markers_grow_the_vocabulary_and_load_in_transformers(tmp_path, conversations):
    transformers = pytest.importorskip("transformers")
    old = tagless_checkpoint(tmp_path / "old")
    old_vocab = Tokenizer.load(old).vocab_size
    cfg = sft_config(old, conversations)
    run = setup(cfg, tmp_path / "setup", progress=False)
    tags = [run.tokenizer.encode(t, allow_special=True) for t in TOOL_CALL_TOKENS]
    assert tags == [[old_vocab], [old_vocab + 1]] and run.cfg.model.vocab_size == old_vocab + 2
    before = LongcatFlash.from_pretrained(old).state_dict()
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.mtp.embed_tokens.weight"):
        grown = run.model.state_dict()[name]
        assert torch.equal(grown[:old_vocab], before[name])
        assert torch.allclose(grown[old_vocab:], before[name].mean(0).expand(2, -1))  # new rows: the mean row

    train(cfg, tmp_path / "out", progress=False)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == old_vocab + 2
    ours = LongcatFlash.from_pretrained(tmp_path / "out").eval()
    ours.save_pretrained(tmp_path / "stubs", zero_expert_stubs=True)  # what transformers' loader needs
    reference = transformers.LongcatFlashForCausalLM.from_pretrained(tmp_path / "stubs").eval()
    ids = torch.tensor([[5, old_vocab, 17, 40, old_vocab + 1, 2]])
    with torch.no_grad():
        assert (ours(ids).logits - reference(ids).logits).abs().max() <= 1e-4
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert hf_tokenizer.encode("<longcat_tool_call>", add_special_tokens=False) == [old_vocab]


def test_the_same_api_call_resumes_a_run_whose_vocabulary_grew(tmp_path, conversations):
    """train(cfg, out, resume="auto") with the config that started the run: the run had grown the vocabulary by
    the chat markers and saved that, and the resume check refused the same call as a model change."""
    old = tagless_checkpoint(tmp_path / "old")
    cfg = sft_config(old, conversations, "max_steps=2", "checkpoint.save_every=1")
    train(cfg, tmp_path / "run", resume="auto", progress=False)
    assert train(dataclasses.replace(cfg, max_steps=3), tmp_path / "run", resume="auto", progress=False)["steps"] == 3
    assert resume_config(tmp_path / "run").model.vocab_size == Tokenizer.load(old).vocab_size + 2


def test_sft_run_learns_and_resumes_bit_for_bit(tmp_path, checkpoint, conversations):
    cfg = sft_config(checkpoint, conversations, "max_steps=8", "eval_every=4", "checkpoint.save_every=4",
                     "optim.lr=3e-3")
    out = tmp_path / "run"
    train(cfg, out, progress=False)
    full = read_metrics(out)
    assert len(full) == 8 and full[-1]["val_loss"] < full[3]["val_loss"] < full[0]["lm_loss"]
    assert full[-1]["lm_loss"] < full[0]["lm_loss"] and full[-1]["mtp_loss"] < full[0]["mtp_loss"]
    assert all(r["budget_rate"] > 0 for r in full)  # the budget controller stays on
    shutil.rmtree(out / "checkpoints" / "step_00000008")  # as if killed after the step-4 checkpoint
    train(resume_config(out), out, resume=True, progress=False)
    resumed = read_metrics(out)

    def losses(records):
        return [(r["step"], r["loss"], r["lm_loss"], r["mtp_loss"], r["grad_norm"], r.get("val_loss"))
                for r in records]

    assert losses(resumed) == losses(full)


def test_every_trained_token_weighs_the_same_whatever_the_micro_batches(tmp_path, checkpoint, conversations):
    """Windows hold different numbers of assistant tokens: the loss is their mean over the whole step, so
    splitting the step into micro-batches changes nothing (and no more does splitting it over ranks:
    tests/test_sft_cli.py runs world 2)."""
    def run(name: str, accum: int) -> list[tuple]:
        train(sft_config(checkpoint, conversations, "max_steps=3", f"data.grad_accum={accum}"), tmp_path / name,
              progress=False)
        return [v for r in read_metrics(tmp_path / name) for v in (r["lm_loss"], r["mtp_loss"])]

    whole, split = run("whole", 1), run("split", 4)
    assert whole == pytest.approx(split, rel=1e-5)
