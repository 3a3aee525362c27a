"""The engine: continuous batching == one-at-a-time full forwards, speculation == plain greedy, seeds, cleanup."""
from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
import torch
from infer_support import greedy_reference, one_thread, prompts, randomized  # noqa: F401  (autouse fixture)

from longcat_flash.config import ModelConfig
from longcat_flash.infer.engine import NON_FINITE, Engine, EngineConfig, PromptRefused
from longcat_flash.infer.sampling import SamplingParams, probabilities
from longcat_flash.infer.scheduler import QueueFull
from longcat_flash.infer.speculative import Draft, MTPDrafter, verify

GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)
SMALL = dict(prefill_chunk=8, token_budget=64, page_size=4, cache_tokens=512, max_running=4)


@pytest.fixture(scope="module")
def model():
    return randomized()


@pytest.fixture(scope="module")
def reference(model):
    ps = prompts((5, 19, 3, 11, 26))
    return ps, [greedy_reference(model, p, GREEDY.max_new_tokens) for p in ps]


def run_joining(engine: Engine, ps: list[list[int]], params: SamplingParams) -> list[list[int]]:
    """Requests join one per step while others decode (continuous batching); returns each one's tokens."""
    out: dict[int, list[int]] = {}
    pending = list(ps)
    order = []
    while pending or engine.has_work():
        if pending:
            rid = engine.add_request(pending.pop(0), params)
            order.append(rid)
            out[rid] = []
        for o in engine.step():
            out[o.request_id] += o.new_tokens
    return [out[rid] for rid in order]


def test_continuous_batching_with_chunked_prefill_equals_full_forward(model, reference):
    ps, expected = reference
    engine = Engine(model, EngineConfig(**SMALL))
    assert run_joining(engine, ps, GREEDY) == expected
    assert engine.cache.used_pages == 0 and not engine.requests


@pytest.mark.parametrize("k", [1, 3])
def test_speculative_greedy_equals_plain_greedy(model, reference, k):
    ps, expected = reference
    engine = Engine(model, EngineConfig(speculative=k, **SMALL))
    assert engine.generate(ps, GREEDY) == expected
    assert engine.stats.drafts.drafted > 0 and engine.cache.used_pages == 0


class OracleDrafter(MTPDrafter):
    """Runs the real MTP head (so its cache is exercised) but proposes the known greedy continuation, with a
    wrong token every third round, so acceptance, rejection and rollback all happen."""

    def __init__(self, engine: Engine, continuation: dict[tuple[int, ...], list[int]]) -> None:
        super().__init__(engine.model, engine.cache, engine.drafter.k)
        self.engine, self.continuation, self.rounds = engine, continuation, itertools.count()

    def chain(self, seqs, z, positions, params, generators):
        real = super().chain(seqs, z, positions, params, generators)
        out = []
        for rid, d in zip(seqs, real):
            seq = self.engine.requests[rid].seq
            full = self.continuation[tuple(seq.tokens[: seq.prompt_len])] + [0] * self.k
            done = len(seq.tokens) - seq.prompt_len
            tokens = full[done:done + self.k]
            if next(self.rounds) % 3 == 2:
                tokens[-1] = (tokens[-1] + 1) % 256
            out.append(Draft(tokens, d.probs))  # greedy: verify reads no draft distribution
        return out


def test_speculative_with_accepted_drafts_equals_plain_greedy(model, reference):
    ps, expected = reference
    engine = Engine(model, EngineConfig(speculative=3, **SMALL))
    engine.drafter = OracleDrafter(engine, {tuple(p): e for p, e in zip(ps, expected)})
    assert run_joining(engine, ps, GREEDY) == expected
    d = engine.stats.drafts
    assert 0.5 < d.acceptance_rate < 1.0 and d.mean_accepted_length > 2.0
    assert engine.cache.used_pages == 0


def test_draft_figures_count_only_what_reached_the_output(model, reference):
    """A round cut short by max_new_tokens counted every draft it accepted: `generate --max-new-tokens 2
    --speculative 16 --json` reported 9 tokens per verification forward."""
    ps, expected = reference
    engine = Engine(model, EngineConfig(speculative=8, **SMALL))
    engine.drafter = OracleDrafter(engine, {tuple(p): e for p, e in zip(ps, expected)})
    outs = engine.generate(ps, replace(GREEDY, max_new_tokens=3))
    assert outs == [e[:3] for e in expected]
    d = engine.stats.drafts
    assert d.emitted == sum(map(len, outs)) - len(ps)  # each request's first token comes from its prefill
    assert d.rounds == len(ps) and d.mean_accepted_length == 2 and d.acceptance_rate == 1.0  # 8 drafts, 2 used
    alone = Engine(model, EngineConfig(speculative=8, **SMALL))
    alone.generate(ps, replace(GREEDY, max_new_tokens=1))  # no round at all: no figures, not "every draft rejected"
    assert alone.stats.drafts.acceptance_rate is None and alone.stats.drafts.mean_accepted_length is None


def test_rejection_sampling_keeps_the_target_distribution():
    """Whatever the draft distribution q, the first emitted token follows the target p (Leviathan et al.)."""
    g = torch.Generator().manual_seed(0)
    target_logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 0.0, 0.0]])
    q = torch.tensor([0.1, 0.2, 0.3, 0.4])
    params = SamplingParams(temperature=1.0)
    counts = torch.zeros(4)
    n = 20000
    for _ in range(n):
        d = int(torch.multinomial(q, 1, generator=g))
        counts[verify(target_logits, Draft([d], q[None]), params, g)[0]] += 1
    p = probabilities(target_logits[0], params)
    assert (counts / n - p).abs().max() < 0.015


def test_seeded_sampling_is_reproducible_whatever_the_batch(model):
    ps = prompts((7, 12, 4), seed=5)
    params = SamplingParams(max_new_tokens=10, temperature=0.9, top_k=50, top_p=0.9, seed=1234, ignore_eos=True)
    alone = Engine(model, EngineConfig(**SMALL)).generate([ps[0]], params)[0]
    together = Engine(model, EngineConfig(**SMALL)).generate(ps, params)[0]
    speculative = Engine(model, EngineConfig(speculative=2, **SMALL))
    assert alone == together
    assert speculative.generate([ps[0]], params) == speculative.generate([ps[0]], params)
    other_seed = SamplingParams(**{**params.__dict__, "seed": 99})
    assert Engine(model, EngineConfig(**SMALL)).generate([ps[0]], other_seed)[0] != alone


def test_seeded_speculative_sampling_does_not_depend_on_prefill_chunking(model):
    """The chunking depends on the load (the token budget is shared), so a seed must not see it."""
    prompt = prompts((18,), seed=4)[0]
    params = SamplingParams(max_new_tokens=10, temperature=0.9, top_k=40, seed=7, ignore_eos=True)
    outs = [Engine(model, EngineConfig(speculative=2, **{**SMALL, "prefill_chunk": chunk})).generate([prompt], params)
            for chunk in (5, 8, 17, 32)]  # 17 leaves a last chunk of one prompt token
    assert outs[0] == outs[1] == outs[2] == outs[3]


@pytest.mark.parametrize("k", [0, 2])
def test_a_prompt_whose_last_chunk_is_one_token_is_prefilled_not_decoded(model, k):
    """A one-token last chunk ran as a decode step: a scoring request (max_new_tokens=0, lm_eval's loglikelihood)
    got a generated token, and a seeded speculating request drew drafts from a prompt token."""
    prompt = prompts((17,), seed=5)[0]
    seeded = SamplingParams(max_new_tokens=6, temperature=0.9, top_k=40, seed=3, ignore_eos=True)
    outs = []
    for chunk in (8, 32):  # 17 = 2 * 8 + 1
        engine = Engine(model, EngineConfig(speculative=k, **{**SMALL, "prefill_chunk": chunk}))
        scoring = engine.add_request(prompt, SamplingParams(max_new_tokens=0, prompt_logprobs=0))
        sampling = engine.add_request(prompt, seeded)
        outs.append(_run(engine, [scoring, sampling]))
        assert outs[-1][scoring] == [] and engine.stats.generated_tokens == seeded.max_new_tokens
    assert outs[0][sampling] == outs[1][sampling]


def test_pages_all_return_after_finished_cancelled_and_preempted_requests(model):
    # 12 pages of 4 tokens cannot hold 4 sequences of ~24 tokens: preemption must happen.
    engine = Engine(model, EngineConfig(prefill_chunk=8, token_budget=64, page_size=4, cache_tokens=48,
                                        max_running=4, speculative=1))
    ps = prompts((9, 14, 5, 20, 3, 8), seed=6)
    params = SamplingParams(max_new_tokens=14, temperature=0.0, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in ps]
    for step in range(200):
        if not engine.has_work():
            break
        engine.step()
        if step == 3:
            assert engine.cancel(ids[1]) and engine.cache.capacity(ids[1]) == 0
        if step == 6:
            engine.cancel(ids[4])  # may still be waiting: cancelling a queued request works too
    assert not engine.has_work()
    assert engine.stats.preempted > 0 and engine.stats.cancelled == 2 and engine.stats.finished == 4
    assert engine.cache.used_pages == 0 and engine.cache.free_pages == engine.cache.config.num_pages - 1
    assert not engine.cache.tables and not engine.requests


@pytest.mark.parametrize("k", [0, 2])
def test_a_preempted_seeded_request_continues_exactly(model, k):
    """Recomputed after a preemption, a sequence runs its pending token in a decode step as it would have, so it
    draws the same random numbers and, speculating, verifies the drafts it had."""
    ps = prompts((9, 14, 6, 11), seed=9)
    params = [SamplingParams(max_new_tokens=16, temperature=0.9, top_k=40, seed=20 + j, ignore_eos=True)
              for j in range(4)]
    tight = Engine(model, EngineConfig(prefill_chunk=8, token_budget=64, page_size=4, cache_tokens=56, max_running=4,
                                       speculative=k))
    out = tight.generate(ps, params)
    assert tight.stats.preempted > 0
    assert out == [Engine(model, EngineConfig(speculative=k, **SMALL)).generate([p], [sp])[0]
                   for p, sp in zip(ps, params)]


def test_a_cache_smaller_than_the_context_caps_sequences_instead_of_hanging(model):
    """A sequence that outgrew the pool was preempted and re-queued forever; the pool now bounds the context."""
    engine = Engine(model, EngineConfig(cache_tokens=64, speculative=2))  # 4 pages of 16, 4 positions of drafts
    assert engine.max_context == 4 * 16 - 4 < model.config.max_position_embeddings
    rid = engine.add_request([5, 6, 7], SamplingParams(max_new_tokens=200, ignore_eos=True))
    out = _run(engine, [rid], steps=500)[rid]  # bounded: it used to spin
    assert len(out) == engine.max_context - 3 and not engine.has_work()
    with pytest.raises(ValueError, match="the KV cache's limit\\), which leaves no room to generate"):
        engine.add_request([5] * engine.max_context)
    with pytest.raises(ValueError, match="the KV cache's limit\\), which it does not fit"):  # not "no room to
        engine.add_request([5] * (engine.max_context + 1), SamplingParams(max_new_tokens=0))  # generate": none asked


def test_copies_need_one_stop_each(model):
    engine = Engine(model, EngineConfig(**SMALL))
    with pytest.raises(ValueError, match="3 SamplingParams and 1 stops"):
        engine.add_copies([5, 6, 7], [GREEDY] * 3, [None])
    assert not engine.has_work()


def test_copies_that_could_never_fit_the_pool_are_refused(model):
    """Their prompt's last chunk waited for pages no finished request could ever free."""
    engine = Engine(model, EngineConfig(prefill_chunk=8, token_budget=64, page_size=4, cache_tokens=56, max_running=4))
    prompt = prompts((30,), seed=2)[0]
    with pytest.raises(ValueError, match="copies of a 30-token prompt need .* cache pages"):
        engine.add_copies(prompt, [GREEDY] * 8)  # 8 pages for the prompt, 1 more per copy: 15 > 14
    assert engine.generate([prompt] * 1, GREEDY)  # one copy fits


def test_preempted_requests_still_match_the_reference(model):
    ps = prompts((9, 14, 5, 20), seed=7)
    expected = [greedy_reference(model, p, 14) for p in ps]
    engine = Engine(model, EngineConfig(prefill_chunk=8, token_budget=64, page_size=4, cache_tokens=40,
                                        max_running=4))
    assert engine.generate(ps, SamplingParams(max_new_tokens=14, temperature=0.0, ignore_eos=True)) == expected
    assert engine.stats.preempted > 0


def test_stop_conditions(model, reference):
    ps, expected = reference
    engine = Engine(model, EngineConfig(**SMALL))
    first = expected[0]
    stop_at = first[4]
    out = engine.generate([ps[0]], SamplingParams(max_new_tokens=12, temperature=0.0, stop_token_ids=(stop_at,)))
    assert out[0] == first[: first.index(stop_at) + 1]
    rid = engine.add_request(ps[0], GREEDY, stop=lambda ids: len(ids) == 3)
    outs = []
    while engine.has_work():
        outs += [o for o in engine.step() if o.request_id == rid]
    assert sum(len(o.new_tokens) for o in outs) == 3 and outs[-1].finish_reason == "stop"


def test_generation_ends_at_any_of_several_eos_ids(model, reference, monkeypatch):
    """config.json may list several eos ids (transformers reads a list); each one ends a sequence."""
    ps, expected = reference
    first = expected[0]
    never = next(t for t in range(model.config.vocab_size) if t not in first)
    cfg = ModelConfig.from_dict({**model.config.to_dict(), "eos_token_id": [never, first[3]]})
    monkeypatch.setattr(model, "config", cfg)
    out = Engine(model, EngineConfig(**SMALL)).generate([ps[0]], SamplingParams(max_new_tokens=12, temperature=0.0))
    assert out[0] == first[: first.index(first[3]) + 1]


def test_bad_prompts_are_rejected(model):
    engine = Engine(model, EngineConfig(**SMALL))
    V = model.config.vocab_size
    for bad, match in (([], "at least one"), ([5] * 512, "context"), ([V], "token ids"), ([5] * 600, "context")):
        with pytest.raises(ValueError, match=match):
            engine.add_request(bad)


def _run(engine: Engine, ids: list[int], steps: int = 10**6) -> dict[int, list[int]]:
    """Step until done (or `steps` steps); each request id's generated tokens."""
    out: dict[int, list[int]] = {rid: [] for rid in ids}
    for _ in range(steps):
        if not engine.has_work():
            break
        for o in engine.step():
            out[o.request_id] += o.new_tokens
    return out


def test_forked_copies_equal_independent_seeded_requests_and_share_the_prompt_pages(model):
    # 18 prompt tokens on pages of 4: 4 full pages shared by the copies, the partial fifth copied per copy.
    engine = Engine(model, EngineConfig(**SMALL))
    prompt = prompts((18,), seed=3)[0]
    seeded = [SamplingParams(max_new_tokens=10, temperature=0.9, top_k=40, seed=5 + j, ignore_eos=True)
              for j in range(4)]
    ids = engine.add_copies(prompt, seeded)
    first = _run(engine, ids, steps=3)  # prefill chunks of 8: the prompt is done, and forked, at step 3
    tables = [engine.cache.tables[rid] for rid in ids]
    assert all(t[:4] == tables[0][:4] for t in tables) and len({t[4] for t in tables}) == 4
    rest = _run(engine, ids)
    forked = {rid: first[rid] + rest[rid] for rid in ids}
    assert engine.cache.used_pages == 0 and engine.stats.prompt_tokens == len(prompt)
    independent = Engine(model, EngineConfig(**SMALL)).generate([prompt] * 4, seeded)
    assert [forked[rid] for rid in ids] == independent
    assert len({tuple(t) for t in independent}) > 1  # the seeds really differ


@pytest.mark.parametrize("length", [18, 16])  # 16: the prompt ends on a page boundary (pages of 4)
def test_forked_copies_speculate_as_independent_seeded_requests_do(model, length):
    prompt = prompts((length,), seed=3)[0]
    seeded = [SamplingParams(max_new_tokens=10, temperature=0.9, top_k=40, seed=5 + j, ignore_eos=True)
              for j in range(3)]
    forked = Engine(model, EngineConfig(speculative=2, **SMALL))
    ids = forked.add_copies(prompt, seeded)
    out = _run(forked, ids)
    independent = Engine(model, EngineConfig(speculative=2, **SMALL))
    assert [out[rid] for rid in ids] == independent.generate([prompt] * 3, seeded)
    assert forked.stats.drafts.rounds == independent.stats.drafts.rounds  # every copy drafted, every step
    assert forked.cache.used_pages == 0


def test_pages_all_return_after_forked_copies_finish_are_cancelled_and_preempted(model):
    # 14 pages of 4 tokens cannot hold 3 groups of copies growing to ~24 tokens each: preemption must happen.
    engine = Engine(model, EngineConfig(prefill_chunk=8, token_budget=64, page_size=4, cache_tokens=56,
                                        max_running=9))  # room for the three groups' 9 copies at once
    ps = prompts((9, 14, 6), seed=8)
    params = [SamplingParams(max_new_tokens=12 + j, temperature=0.8, seed=j, ignore_eos=True) for j in range(3)]
    groups = [engine.add_copies(p, params) for p in ps]
    for step in range(300):
        if not engine.has_work():
            break
        engine.step()
        if step == 4:
            assert engine.cancel(groups[0][1]) == [groups[0][1]]  # a forked copy alone
        if step == 5:
            assert engine.cancel(groups[1][0])  # the first copy: shared pages stay with the others
    assert not engine.has_work()
    assert engine.stats.preempted > 0 and engine.stats.cancelled >= 2
    assert engine.cache.used_pages == 0 and engine.cache.free_pages == engine.cache.config.num_pages - 1
    assert not engine.cache.tables and not engine.requests


def test_copies_count_against_max_running(model):
    """n copies are n sequences decoding: a group is admitted only when its copies fit beside the running ones
    (they ran past max_running, 10 groups of 10 copies as 40 sequences on a limit of 4); one larger than the
    limit runs alone. The outputs are those of independent seeded requests either way."""
    engine = Engine(model, EngineConfig(**SMALL))  # max_running=4
    ps = prompts((6, 9, 4, 7), seed=2)
    params = [SamplingParams(max_new_tokens=6, temperature=0.9, seed=j, ignore_eos=True) for j in range(3)]
    groups = [engine.add_copies(p, params) for p in ps] + [engine.add_copies(ps[0], params * 2)]  # 6 > 4
    out, most = {rid: [] for g in groups for rid in g}, 0
    while engine.has_work():
        for o in engine.step():
            out[o.request_id] += o.new_tokens
        running = len(engine.scheduler.running)
        most = max(most, running)
        assert running <= 4 or {s.id for s in engine.scheduler.running} <= set(groups[-1]), running
    assert most == 6  # the big group, alone
    with pytest.raises(ValueError, match=r"9 copies are more than this engine queues at once \(max_running \+ "
                                         r"max_waiting = 8\)"):
        Engine(model, EngineConfig(**SMALL, max_waiting=4)).add_copies(ps[0], params * 3)  # never a QueueFull
    independent = Engine(model, EngineConfig(**SMALL)).generate([p for p in ps for _ in params], params * len(ps))
    assert [out[rid] for g in groups[:-1] for rid in g] == independent


def test_several_prompts_are_admitted_all_or_none(model):
    """The server queues a request's prompts together: one that did not fit was refused after the others had been
    admitted, which the server then cancelled, so /metrics counted a 429 as clients that left and its prompts'
    tokens as admitted. Now a refusal (no room, or a bad prompt, named by its index) admits none of them."""
    engine = Engine(model, EngineConfig(**SMALL, max_waiting=1))  # 4 running + 1 waiting
    ps = prompts((5, 6, 7), seed=3)
    [running] = engine.add_jobs([(ps[0], [GREEDY])])
    with pytest.raises(QueueFull):
        engine.add_jobs([(ps[1], [GREEDY] * 2), (ps[2], [GREEDY] * 3)])  # 5 sequences; room for 4
    unknown_token = replace(GREEDY, logit_bias=((model.config.vocab_size, 1.0),))
    with pytest.raises(PromptRefused, match="logit_bias") as refused:
        engine.add_jobs([(ps[1], [GREEDY]), (ps[2], [unknown_token])])
    assert refused.value.index == 1
    assert list(engine.requests) == running and engine.stats.prompt_tokens == 5 and engine.stats.cancelled == 0
    groups = engine.add_jobs([(ps[1], [GREEDY] * 2), (ps[2], [GREEDY] * 2)])
    assert [len(g) for g in groups] == [2, 2] and engine.stats.prompt_tokens == 5 + 6 + 7


def test_cancelling_a_first_copy_before_its_prefill_cancels_the_waiting_copies(model):
    engine = Engine(model, EngineConfig(**SMALL))
    ids = engine.add_copies(prompts((5,))[0], [GREEDY] * 3)
    assert engine.cancel(ids[0]) == ids and not engine.requests and not engine.has_work()


def test_a_waiting_copy_cancelled_before_the_prefill_frees_its_reservation(model):
    """The first copy's prefill kept reserving pages for a copy cancelled while it waited (a stale fork count),
    so on a tight pool its last chunk could stall or preempt others for pages nobody would use."""
    engine = Engine(model, EngineConfig(**SMALL))
    ids = engine.add_copies(prompts((5,))[0], [GREEDY] * 3)
    assert engine.cancel(ids[2]) == [ids[2]]
    assert engine.requests[ids[0]].seq.forks == 1  # the pages reserved at the prompt's end: one copy's
    out = {rid: [] for rid in ids[:2]}
    while engine.has_work():
        for o in engine.step():
            out[o.request_id] += o.new_tokens
    assert out[ids[0]] == out[ids[1]] and out[ids[0]]  # the other copy still forks and runs
    assert engine.cache.used_pages == 0


@pytest.mark.parametrize("k", [0, 2])
def test_a_request_whose_logits_are_not_finite_fails_alone(k):
    """Activations that overflow (or a NaN weight) give NaN logits: greedy decoding emitted token 0 for ever and
    sampling failed inside torch.multinomial, taking the whole batch with it. Such a request now ends with an
    error naming the cause, and the others in its batch go on as if it had never been there."""
    broken = randomized()
    poison = 7
    with torch.no_grad():
        broken.model.embed_tokens.weight[poison] = float("inf")  # only sequences holding it see NaN
    healthy, sick = prompts((9, 6))
    sick = sick + [poison]
    engine = Engine(broken, EngineConfig(speculative=k, **SMALL))
    sampled = SamplingParams(max_new_tokens=6, temperature=1.0, seed=4, ignore_eos=True)
    alone = engine.generate([healthy], sampled)[0]
    assert poison not in alone  # the seed keeps the healthy request away from the poisoned token
    rids = [engine.add_request(p, sampled) for p in (healthy, sick)]
    outs = {rid: [] for rid in rids}
    while engine.has_work():
        for o in engine.step():
            outs[o.request_id].append(o)
    assert [t for o in outs[rids[0]] for t in o.new_tokens] == alone
    (end,) = outs[rids[1]]
    assert (end.finished, end.new_tokens, end.finish_reason, end.error_code) == (True, [], "error", NON_FINITE)
    assert end.error.startswith("the model's logits are NaN or Inf after 0 generated tokens (its activations "
                                "overflowed float32")
    assert engine.cache.used_pages == 0 and not engine.requests
    with pytest.raises(ValueError, match="prompt 1: the model's logits are NaN or Inf"):  # it returned [] for it
        engine.generate([healthy, sick], sampled)
    assert engine.cache.used_pages == 0 and not engine.requests


def test_generate_takes_more_prompts_than_the_queue_and_runs_alone(model, reference):
    """generate() raised QueueFull past max_waiting prompts (vLLM's takes any number), and a request queued
    before it with add_request made it fail with a bare KeyError, that request's tokens lost."""
    ps, expected = reference
    engine = Engine(model, EngineConfig(**{**SMALL, "max_waiting": 2}))
    assert engine.generate(ps, GREEDY) == expected
    rid = engine.add_request(ps[0], GREEDY)
    with pytest.raises(ValueError, match="engine holds 1 requests added with add_request"):
        engine.generate(ps[:1], GREEDY)
    assert list(engine.requests) == [rid]
    engine.cancel(rid)
    with pytest.raises(TypeError, match="config must be an EngineConfig"):  # an AttributeError from inside
        Engine(model, {"max_running": 1})
    for asked in ({"logprobs": 2}, {"prompt_logprobs": 0}):  # computed, then dropped without a word
        with pytest.raises(ValueError, match="generate\\(\\) returns token ids alone, so logprobs and prompt_logprobs"):
            engine.generate(ps[:1], replace(GREEDY, **asked))


def test_a_cache_shorter_than_the_context_says_why(model, caplog):
    """With MTP drafts a 512-token cache said it "holds less than the model's context (512)": the draft room was
    the reason, unnamed."""
    context = model.config.max_position_embeddings
    Engine(model, EngineConfig(cache_tokens=context, speculative=2))
    assert f"sequences are limited to {context - 4} tokens, fewer than the model's context ({context})" in caplog.text
    assert f"holds {context} positions" in caplog.text and "keeps 4 for its drafts" in caplog.text
