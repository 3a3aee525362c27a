"""Per-request logit controls (presence / frequency / repetition penalties, logit_bias, min_p) inside continuous
batching: each greedy token equals the argmax of a hand computation on the model's own uncached forward, rows
without controls decode exactly as before, and with MTP speculation controlled requests still match."""
from __future__ import annotations

import pytest
import torch

from infer_support import greedy_reference, one_thread, prompts, randomized  # noqa: F401  (autouse fixture)
from longcat_flash.infer.engine import Engine, EngineConfig
from longcat_flash.infer.sampling import SamplingParams, probabilities

SMALL = dict(prefill_chunk=8, token_budget=64, page_size=4, cache_tokens=512, max_running=4)
N = 8
BIAS = ((5, 3.0),)  # makes token 5 the greedy choice, so that the penalties below have a repeat to act on
CONTROLS = [dict(logit_bias=BIAS), dict(logit_bias=BIAS, presence_penalty=1.0),
            dict(logit_bias=BIAS, frequency_penalty=1.2), dict(logit_bias=BIAS, repetition_penalty=3.0),
            dict(logit_bias=BIAS, repetition_penalty=0.5, presence_penalty=2.0),
            dict(presence_penalty=-1.0, frequency_penalty=0.7, repetition_penalty=1.4, logit_bias=((205, -2.5),))]


@pytest.fixture(scope="module")
def model():
    return randomized()


def hand_adjusted(logits: list[float], prompt: list[int], generated: list[int], *, presence_penalty=0.0,
                  frequency_penalty=0.0, repetition_penalty=1.0, logit_bias=()) -> list[float]:
    """The controls' documented semantics, written out token by token in plain Python."""
    out = list(logits)
    for t in set(prompt + generated):
        out[t] = out[t] / repetition_penalty if out[t] > 0 else out[t] * repetition_penalty
    for t in set(generated):
        out[t] -= presence_penalty + frequency_penalty * generated.count(t)
    for t, bias in logit_bias:
        out[t] += bias
    return out


@torch.no_grad()
def hand_greedy(model, prompt: list[int], n: int, controls: dict) -> list[int]:
    """Greedy decoding from the model's full forward (no cache), each step's logits adjusted by hand."""
    generated: list[int] = []
    for _ in range(n):
        logits = model(torch.tensor([prompt + generated])).logits[0, -1].float().tolist()
        adjusted = hand_adjusted(logits, prompt, generated, **controls)
        generated.append(max(range(len(adjusted)), key=adjusted.__getitem__))
    return generated


def greedy(**controls) -> SamplingParams:
    return SamplingParams(max_new_tokens=N, temperature=0.0, ignore_eos=True, **controls)


@pytest.mark.parametrize("k", [0, 2])  # plain decode; MTP speculation (off for the controlled rows)
def test_each_control_matches_the_hand_computation_in_a_mixed_batch(model, k):
    ps = prompts((6, 13, 4), seed=1)
    engine = Engine(model, EngineConfig(speculative=k, **SMALL))
    for controls in CONTROLS:
        got = engine.generate(ps, [greedy(), greedy(**controls), greedy()])
        assert got[1] == hand_greedy(model, ps[1], N, controls), controls
        assert [got[0], got[2]] == [greedy_reference(model, ps[0], N), greedy_reference(model, ps[2], N)]
    plain, biased, *penalized, mixed = [engine.generate([ps[1]], greedy(**c))[0] for c in [{}, *CONTROLS]]
    assert biased != plain and mixed != plain and all(o != biased for o in penalized)  # each control matters


def test_min_p_keeps_the_tokens_the_hand_computation_keeps(model):
    logits = torch.randn(2, 50)
    got = probabilities(logits, SamplingParams(temperature=0.7, min_p=0.2))
    probs = (logits / 0.7).softmax(-1)
    kept = probs >= 0.2 * probs.max(-1, keepdim=True).values
    torch.testing.assert_close(got, torch.where(kept, probs, 0.0) / (probs * kept).sum(-1, keepdim=True))


@pytest.mark.parametrize("k", [0, 2])
def test_min_p_one_samples_the_argmax(model, k):
    """min_p = 1 keeps only the likeliest token: sampling at temperature 1 reproduces greedy decoding."""
    ps = prompts((7,), seed=2)
    params = SamplingParams(max_new_tokens=N, temperature=1.0, min_p=1.0, seed=3, ignore_eos=True)
    assert Engine(model, EngineConfig(speculative=k, **SMALL)).generate(ps, params)[0] == \
        greedy_reference(model, ps[0], N)


def test_seeded_sampling_without_controls_is_unchanged(model):
    """A seeded sampled request draws the same tokens whether its batch holds controlled requests or not."""
    ps = prompts((6, 9), seed=4)
    seeded = SamplingParams(max_new_tokens=N, temperature=0.9, top_p=0.9, seed=11, ignore_eos=True)
    alone = Engine(model, EngineConfig(**SMALL)).generate([ps[0]], seeded)[0]
    mixed = Engine(model, EngineConfig(**SMALL)).generate(ps, [seeded, greedy(frequency_penalty=2.0)])[0]
    assert mixed == alone


def test_settings_that_overflow_the_logits_harm_no_other_request(model):
    """logits / 1e-39 overflowed to inf, the draw raised, and every request in the step failed with it: a tiny
    temperature decodes greedily, and no penalty leaves a logit at +inf."""
    ps = prompts((6, 9), seed=5)
    seeded = SamplingParams(max_new_tokens=N, temperature=0.9, seed=11, ignore_eos=True)
    tiny = SamplingParams(max_new_tokens=N, temperature=1e-39, ignore_eos=True)
    alone = Engine(model, EngineConfig(**SMALL)).generate([ps[1]], seeded)[0]
    assert Engine(model, EngineConfig(**SMALL)).generate(ps, [tiny, seeded]) == \
        [greedy_reference(model, ps[0], N), alone]
    huge = torch.tensor([[3e38, 1e38, 0.0]])  # past the greedy cut-off, the shift still keeps it finite
    assert probabilities(huge, SamplingParams(temperature=2e-5)).tolist() == [[1.0, 0.0, 0.0]]
    # a tiny repetition penalty divided positive logits into +inf: the same NaN draw failed the whole step
    overflowing = SamplingParams(max_new_tokens=N, temperature=1.0, seed=3, repetition_penalty=1e-40, ignore_eos=True)
    assert Engine(model, EngineConfig(**SMALL)).generate(ps, [overflowing, seeded])[1] == alone


@pytest.mark.parametrize("bad", [dict(presence_penalty=2.5), dict(frequency_penalty=-3.0),
                                 dict(repetition_penalty=0.0), dict(min_p=1.5), dict(logit_bias=((1, 101.0),)),
                                 dict(logit_bias=tuple((i, 1.0) for i in range(301))),
                                 # wrong types that used to pass and fail inside a step (logprobs=True reached topk)
                                 dict(logprobs=True), dict(top_k=True), dict(max_new_tokens=True), dict(seed="3"),
                                 dict(seed=2**70), dict(stop_token_ids="ab"), dict(stop_token_ids=(1.5,)),
                                 dict(logit_bias=((1.5, 5.0),)), dict(repetition_penalty=float("inf")),
                                 dict(ignore_eos="no"),
                                 # None, an OpenAI client's "default": a TypeError from a comparison
                                 dict(temperature=None), dict(top_p=None), dict(min_p="0.1")])
def test_out_of_range_controls_are_refused(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_a_failed_request_leaves_the_engine_usable_and_prompts_are_checked(model):
    engine = Engine(model, EngineConfig(**SMALL))
    for prompt, error in (([1.5, 2.0], TypeError), ([True, False], TypeError), ("hello", TypeError),
                          ([1, 2], ValueError)):  # the last: stop_token_ids past the vocabulary
        with pytest.raises(error):
            engine.generate([prompt], greedy(stop_token_ids=(10**6,)) if error is ValueError else greedy())
    with pytest.raises(ValueError, match="2 prompts but 1 SamplingParams"):
        engine.generate([[1, 2], [3, 4]], [greedy()])
    assert not engine.has_work() and not engine.requests
    assert engine.generate([[1, 2]], greedy()) == Engine(model, EngineConfig(**SMALL)).generate([[1, 2]], greedy())
    with pytest.raises(ValueError, match="EngineConfig.page_size"):
        EngineConfig(page_size=0)
    with pytest.raises(ValueError, match=r"token_budget=8 cannot fit max_running=4 decoding rows of 3 tokens each "
                                         r"\(1 \+ speculative\): give at least 12"):
        EngineConfig(max_running=4, token_budget=8, speculative=2)  # refused here, not when an Engine is built


def test_a_step_that_fails_leaves_no_request_behind(model, monkeypatch):
    """Engine.generate used to leave its requests queued, so every later call failed the same way."""
    engine = Engine(model, EngineConfig(**SMALL))
    with monkeypatch.context() as patch:
        patch.setattr(engine, "_forward", lambda *args: (_ for _ in ()).throw(RuntimeError("boom")))
        with pytest.raises(RuntimeError, match="boom"):
            engine.generate([[1, 2], [3, 4]], greedy())
    assert not engine.requests and not engine.has_work() and engine.cache.used_pages == 0
    assert engine.generate([[1, 2]], greedy()) == Engine(model, EngineConfig(**SMALL)).generate([[1, 2]], greedy())


def test_the_python_api_takes_the_forms_users_pass_and_names_the_wrong_ones(model):
    """A dict logit_bias (OpenAI's form) was refused, a list of lists made the params unhashable; a grammar given as
    text failed inside a step; a tuple of params was "add_copies needs ..."; a bad prompt in a batch was not named."""
    assert SamplingParams(logit_bias={5: 1.0}) == SamplingParams(logit_bias=[[5, 1.0]]) == \
        SamplingParams(logit_bias=((5, 1.0),))
    hash(SamplingParams(logit_bias=[[5, 1.0]]))
    with pytest.raises(ValueError, match="grammar must be None or an infer.grammar.Grammar"):
        SamplingParams(grammar="json")
    engine = Engine(model, EngineConfig(**SMALL))
    assert engine.generate([[1, 2], [3, 4]], (greedy(), greedy())) == engine.generate([[1, 2], [3, 4]], greedy())
    with pytest.raises(TypeError, match="params must be a SamplingParams or a list of one per prompt"):
        engine.generate([[1, 2]], {"temperature": 0})
    with pytest.raises(ValueError, match=r"prompts\[1\]: prompt token ids must be in"):
        engine.generate([[1, 2], [3, -1]], greedy())
    assert not engine.requests


def test_logit_bias_ids_are_checked_against_the_vocabulary(model):
    with pytest.raises(ValueError, match="logit_bias"):
        Engine(model, EngineConfig(**SMALL)).add_request([1, 2], greedy(logit_bias=((10**6, 1.0),)))


def test_greedy_requests_leave_the_callers_global_generator_as_it_was(model):
    """Each request drew its generator's seed from the global one, greedy too (which draws nothing from it): a
    script's torch.rand after a greedy generate changed, and an unseeded sampled request's tokens depended on
    whether a greedy one sat before it in the batch."""
    engine = Engine(model, EngineConfig(max_running=4))
    greedy, sampled = SamplingParams(max_new_tokens=4, temperature=0.0), SamplingParams(max_new_tokens=6)
    first, second = prompts((5, 7))
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    engine.generate([first, second], greedy)
    assert torch.equal(torch.rand(3), expected)
    torch.manual_seed(0)
    alone = engine.generate([second], sampled)[0]
    torch.manual_seed(0)
    assert engine.generate([first, second], [greedy, sampled])[1] == alone
