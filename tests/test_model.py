"""Whole-model invariants: ScMoE dataflow, MTP wiring, cached/absorbed attention == full forward."""
from __future__ import annotations

import pytest
import torch
from infer_support import randomized

from longcat_flash.model import Transformer
from longcat_flash.presets import longcat_flash, tiny


class ContiguousCache:
    """Minimal LatentCache for one batch of equal-length sequences (the paged one lives in infer/)."""

    def __init__(self, absorb: bool = True) -> None:
        self.absorb = absorb
        self.latent: dict[int, torch.Tensor] = {}
        self.k_rope: dict[int, torch.Tensor] = {}

    def update(self, block, latent, k_rope):
        S = latent.shape[1]
        if block in self.latent:
            latent = torch.cat([self.latent[block], latent], dim=1)
            k_rope = torch.cat([self.k_rope[block], k_rope], dim=1)
        self.latent[block], self.k_rope[block] = latent, k_rope
        L = latent.shape[1]
        mask = torch.arange(L)[None, :] <= torch.arange(L - S, L)[:, None]  # (S, L) causal
        return latent, k_rope, mask.expand(latent.shape[0], S, L)



def test_output_fields():
    model = randomized()
    V = model.config.vocab_size
    ids = torch.randint(0, V, (2, 9))
    out = model(ids, with_mtp=True)
    assert out.logits.shape == (2, 9, V) and out.mtp_logits.shape == (2, 8, V)
    torch.testing.assert_close(model.model.norm(out.hidden), out.final_hidden)
    assert len(out.routing) == 2
    info = out.routing[0]
    assert info.probs.shape == (18, 12) and info.ids.shape == (18, 3)
    assert info.tokens_per_expert.shape == (12,) and info.ffn_experts_per_token.shape == (18,)
    torch.testing.assert_close(info.probs.sum(-1), torch.ones(18))


def test_scmoe_layer_matches_hand_written_dataflow():
    model = randomized()
    layer = model.model.layers[0]
    x = torch.randn(2, 6, 64)
    rope = model.model.rotary(torch.arange(6).expand(2, 6), x.dtype)
    out, _ = layer(x, rope)
    x1 = x + layer.self_attn[0](layer.input_layernorm[0](x), rope)
    s = layer.post_attention_layernorm[0](x1)
    m = layer.mlp.forward_reference(s)
    x2 = x1 + layer.mlps[0](s)
    x3 = x2 + layer.self_attn[1](layer.input_layernorm[1](x2), rope)
    torch.testing.assert_close(out, x3 + layer.mlps[1](layer.post_attention_layernorm[1](x3)) + m)


def test_mtp_reads_next_token_and_normed_hidden():
    model = randomized()
    ids = torch.randint(0, 256, (1, 7))
    out = model(ids, with_mtp=True)
    mtp = model.model.mtp
    rope = model.model.rotary(torch.arange(6)[None], torch.float32)
    z = mtp.eh_proj(torch.cat([mtp.enorm(mtp.embed_tokens(ids[:, 1:])), mtp.hnorm(out.final_hidden[:, :-1])], -1))
    z = z + mtp.self_attn(mtp.input_layernorm(z), rope)
    z = z + mtp.mlp(mtp.post_attention_layernorm(z))
    torch.testing.assert_close(out.mtp_logits, model.lm_head(mtp.norm(z)))


@pytest.mark.parametrize("absorb", [True, False])
def test_incremental_decode_equals_full_forward(absorb):
    model = randomized()
    ids = torch.randint(0, 256, (2, 10))
    full = model(ids).logits
    cache = ContiguousCache(absorb)
    prefill = model(ids[:, :4], cache=cache).logits
    steps = [prefill]
    for t in range(4, 10):
        steps.append(model(ids[:, t:t + 1], positions=torch.full((2, 1), t), cache=cache).logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-4)


def test_absorbed_equals_naive_attention():
    model = randomized()
    attn = model.model.layers[1].self_attn[0]
    x = torch.randn(2, 5, 64)
    rope = model.model.rotary(torch.arange(5).expand(2, 5), x.dtype)
    q_nope, q_rope = attn.queries(x, rope)
    latent, k_rope = attn.latents(x, rope)
    mask = torch.ones(5, 5, dtype=torch.bool).tril().expand(2, 5, 5)
    naive = attn.attend_naive(q_nope, q_rope, latent, k_rope, mask)
    torch.testing.assert_close(attn.attend_absorbed(q_nope, q_rope, latent, k_rope, mask), naive,
                               atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(attn(x, rope), naive, atol=1e-5, rtol=1e-4)


def test_variance_alignment_scales_the_queries_and_the_latent():
    """Report §2.3.1: with the same weights, the queries come out sqrt(D/Q) larger and the cached latent
    sqrt(D/C) larger than without the scales (tiny: D 64, Q 32, C 16)."""
    cfg = tiny()
    on = randomized(cfg)
    off = Transformer(cfg.replace(mla_scale_q_lora=False, mla_scale_kv_lora=False))
    off.load_state_dict(on.state_dict())
    x = torch.randn(2, 5, 64)
    rope = on.model.rotary(torch.arange(5).expand(2, 5), x.dtype)
    attn_on, attn_off = on.model.layers[0].self_attn[0], off.model.layers[0].self_attn[0]
    for scaled, plain in zip(attn_on.queries(x, rope), attn_off.queries(x, rope)):
        torch.testing.assert_close(scaled, plain * 2 ** 0.5)
    torch.testing.assert_close(attn_on.latents(x, rope)[0], attn_off.latents(x, rope)[0] * 2.0)
    torch.testing.assert_close(attn_on.latents(x, rope)[1], attn_off.latents(x, rope)[1])  # k_rope unscaled


def test_full_shape_builds_on_meta_device():
    with torch.device("meta"):
        model = Transformer(longcat_flash())
    assert 560e9 < model.num_parameters() < 563e9  # 560.7B trunk + 1.2B MTP head


def test_tied_embeddings_are_one_matrix():
    """The head reads the embedding matrix, also after it changes, and it is counted once."""
    cfg = tiny()
    model = Transformer(cfg.replace(tie_word_embeddings=True))
    assert Transformer(cfg).num_parameters() - model.num_parameters() == cfg.vocab_size * cfg.hidden_size
    with torch.no_grad():
        model.model.embed_tokens.weight[7].mul_(3.0)  # what a training step on the embedding does to a row
        out = model(torch.randint(0, 256, (1, 4)))
    torch.testing.assert_close(out.logits, out.final_hidden @ model.model.embed_tokens.weight.T)


def test_with_mtp_needs_a_head():
    model = Transformer(tiny().replace(num_nextn_predict_layers=0))
    with pytest.raises(ValueError, match="num_nextn_predict_layers"):
        model(torch.zeros(1, 3, dtype=torch.long), with_mtp=True)


def test_a_tied_model_built_on_meta_trains_one_matrix():
    """tie_word_embeddings: the lm_head and the embedding stay one parameter through meta -> to_empty (how the
    trainer builds its model), so a training step moves both alike; a copy of the embedding as the head would
    train as an untied model and be saved as if tied."""
    with torch.device("meta"):
        model = Transformer(tiny().replace(tie_word_embeddings=True))
    model.to_empty(device="cpu")
    model.init_weights()
    model.init_buffers()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    before = model.lm_head.weight.detach().clone()
    tokens = torch.randint(3, model.config.vocab_size, (2, 16))
    model(tokens).logits.float().logsumexp(-1).mean().backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert torch.isfinite(model.lm_head.weight).all() and not torch.equal(model.lm_head.weight, before)
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)


def test_a_model_materialised_from_meta_has_its_rotary_table():
    """to_empty leaves every tensor uninitialised; the rotary table is computed from the config, so to_empty
    rebuilds it (a user's meta -> to_empty -> init_weights got a garbage table and wrong logits)."""
    cfg = tiny()
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    torch.testing.assert_close(model.model.rotary.inv_freq, Transformer(cfg).model.rotary.inv_freq, rtol=0, atol=0)


def test_the_rotary_table_stays_fp32_in_a_bf16_model():
    model = Transformer(tiny()).to(torch.bfloat16)
    assert model.model.rotary.inv_freq.dtype == torch.float32


def test_the_forward_runs_on_the_meta_device():
    """Shapes (and FLOP counts) of any preset without memory: the 560B model's forward on meta."""
    with torch.device("meta"):
        model = Transformer(tiny())
        out = model(torch.zeros(2, 16, dtype=torch.long), with_mtp=True)
    V = tiny().vocab_size
    assert out.logits.shape == (2, 16, V) and out.logits.is_meta and out.mtp_logits.shape == (2, 15, V)


@pytest.mark.parametrize("call, message", [
    (lambda m, ids: m(ids, torch.arange(4)), r"positions must have input_ids' shape \(4, 4\)"),
    (lambda m, ids: m(ids.float()), "input_ids must be integer token ids"),
    (lambda m, ids: m(ids > 100), "input_ids must be integer token ids"),
    (lambda m, ids: m(ids + m.config.vocab_size), r"ids outside the vocabulary \(0 to 511\)"),
    (lambda m, ids: m(-1 - ids), "ids outside the vocabulary"),
    (lambda m, ids: m(ids[0]), r"of shape \(batch, tokens\).*shape \(4,\)"),
    (lambda m, ids: m(ids[:0]), "both at least 1"),
    (lambda m, ids: m(ids[:, :1], with_mtp=True), "with_mtp needs at least 2 tokens"),
])
def test_inputs_of_the_wrong_shape_are_refused_by_name(call, message):
    """positions=torch.arange(S) broadcast one position per row: silently wrong logits when B == S; float, bool or
    1-D ids and an empty batch failed deep inside attention; ids past the vocabulary in the embedding, unnamed."""
    model = randomized()
    with pytest.raises(ValueError, match=message):
        call(model, torch.randint(0, 200, (4, 4)))
