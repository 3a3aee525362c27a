"""/v1/completions for evaluators, in-process (TestClient, a tiny random model in fp32): prompt and generated
logprobs equal the model's own forward, echo, max_tokens 0, a list of prompts, n copies, all of it streamed too;
what we do not serve gets a 400."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402

from longcat_flash.infer.engine import Engine, EngineConfig  # noqa: E402
from longcat_flash.presets import tiny  # noqa: E402
from longcat_flash.serve import protocol as p  # noqa: E402
from longcat_flash.serve.app import ServerConfig, create_app  # noqa: E402
from longcat_flash.serve.bridge import AsyncEngine  # noqa: E402
from longcat_flash.tokenizer import stdlib_tokenizer  # noqa: E402

from infer_support import bos_adding, greedy_reference, one_thread, randomized  # noqa: E402,F401

CHUNK = 16  # prefill chunk: the long prompt below spans several
TEXTS = ["def f(x):", "import os\nfor name in os.listdir('.'):\n    print(name.upper(), len(name))\n", "x"]


@pytest.fixture(scope="module")
def served():
    tokenizer = stdlib_tokenizer(256)
    model = randomized(tiny().replace(vocab_size=tokenizer.vocab_size))
    engine = Engine(model, EngineConfig(max_running=8, prefill_chunk=CHUNK, token_budget=64, cache_tokens=4096))
    bridge = AsyncEngine(engine).start()
    app = create_app(bridge, tokenizer, ServerConfig(model_name="tiny", context=model.config.max_position_embeddings))
    with TestClient(app) as client:
        yield client, model, tokenizer, engine
    bridge.stop()


@torch.no_grad()
def forward_logprobs(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """The model's own forward, no cache: log p(ids[t] | ids[:t]) for t = 1..len(ids)-1, shape (len(ids)-1,)."""
    logprobs = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)  # (S, V)
    return logprobs[:-1].gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_a_prompt_filling_the_whole_context_can_be_scored_but_not_continued(served):
    """lm_eval's loglikelihood sends windows of exactly the context with max_tokens 0: nothing to generate."""
    client, model, _, _ = served
    context = model.config.max_position_embeddings
    ids = torch.randint(3, 256, (context,), generator=torch.Generator().manual_seed(0)).tolist()
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": ids, "max_tokens": 0, "echo": True,
                                             "logprobs": 0})
    assert r.status_code == 200, r.text
    ours = torch.tensor(r.json()["choices"][0]["logprobs"]["token_logprobs"][1:], dtype=torch.float32)
    torch.testing.assert_close(ours, forward_logprobs(model, ids), atol=1e-3, rtol=0)
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": ids, "max_tokens": 1})
    error = r.json()["error"]
    assert r.status_code == 400 and error["code"] == "context_length_exceeded" and error["param"] == "max_tokens"
    assert error["message"].startswith("max_tokens=1 plus the prompt's")  # it is max_tokens that does not fit


def test_special_token_text_in_a_raw_prompt_is_the_token(served):
    """lm_eval's untokenized rolling windows start with the bos text: one token, as vLLM reads it, or its slice of
    the logprobs would be shifted."""
    client, _, tokenizer, _ = served
    body = {"model": "tiny", "prompt": "<s>" + TEXTS[0], "max_tokens": 0, "echo": True, "logprobs": 0}
    answer = client.post("/v1/completions", json=body).json()
    assert answer["usage"]["prompt_tokens"] == 1 + len(tokenizer.encode(TEXTS[0]))
    assert len(answer["choices"][0]["logprobs"]["token_logprobs"]) == answer["usage"]["prompt_tokens"]
    body = {**body, "prompt": TEXTS[0] + "</s>" + TEXTS[0], "logprobs": 2}  # a special token with a score
    logprobs = client.post("/v1/completions", json=body).json()["choices"][0]["logprobs"]
    assert "</s>" in logprobs["tokens"]  # each token's text is a key of its top_logprobs, as it is in `tokens`
    assert all(token in top for token, top in zip(logprobs["tokens"], logprobs["top_logprobs"]) if top is not None)


def test_offsets_point_into_the_text_past_split_characters_and_special_tokens(served):
    """A character of several byte-level tokens, and `<s>` written in the prompt, shifted every later offset (the
    offsets summed the tokens' texts, U+FFFD for each part of a split character and "" for `<s>`)."""
    client, _, tokenizer, _ = served
    text = "<s>héllo wörld ✓ ok"
    answer = client.post("/v1/completions", json={"model": "tiny", "prompt": text, "max_tokens": 0, "echo": True,
                                                  "logprobs": 0}).json()["choices"][0]
    tokens, offsets = answer["logprobs"]["tokens"], answer["logprobs"]["text_offset"]
    assert answer["text"] == text and any("\ufffd" in t for t in tokens)  # the sample does split characters
    whole = [(t, at) for t, at in zip(tokens, offsets) if "\ufffd" not in t]
    assert all(text[at:at + len(t)] == t for t, at in whole) and whole[-1][1] == len(text) - len(whole[-1][0])


def test_offsets_index_the_echoed_text_when_a_prompt_of_ids_ends_inside_a_character(served):
    """The echoed prompt and the completion are decoded apart (as each is sent), but the offsets were counted as
    if decoded together: a prompt ending on part of a character shifted every generated token's offset."""
    client, _, tokenizer, _ = served
    *head, last = tokenizer.encode("a世")  # the last id is 世's last byte: the prompt ends inside the character
    answer = client.post("/v1/completions", json={"model": "tiny", "prompt": head, "max_tokens": 2, "echo": True,
                                                  "logit_bias": {str(last): 100}, "logprobs": 0}).json()["choices"][0]
    text, offsets, echoed = answer["text"], answer["logprobs"]["text_offset"], tokenizer.decode(head)
    assert text.startswith(echoed) and len(answer["logprobs"]["tokens"]) == len(head) + 2
    assert offsets[len(head)] == len(echoed)  # the first generated token starts where the completion does
    assert sorted(set(offsets)) == list(range(len(text)))  # every character of the text starts a token


def test_logprobs_are_rendered_off_the_event_loop(served, monkeypatch):
    """Rendering logprobs decodes every token and alternative: for a batch of long echoed prompts (lm_eval's
    loglikelihood) that took seconds on the event loop, stalling /health and every other stream."""
    from serve_support import on_a_loop

    from longcat_flash.serve import logprobs

    calls = []
    for scores in (logprobs.CompletionScores, logprobs.ChatScores):
        take = scores.take
        monkeypatch.setattr(scores, "take", lambda *args, take=take: calls.append(on_a_loop()) or take(*args))
    client = served[0]
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": "ab", "max_tokens": 2, "echo": True,
                                             "logprobs": 1})
    assert r.status_code == 200 and r.json()["choices"][0]["logprobs"]["tokens"], r.text
    for stream in (False, True):
        assert chat(client, logprobs=True, max_tokens=2, stream=stream).status_code == 200
    assert len(calls) >= 3 and not any(calls), calls


def test_chat_bytes_are_the_tokens_own_so_split_characters_join(served):
    """A token holding the first byte of "é" reads as U+FFFD; its `bytes` were those of U+FFFD (239, 191, 189)."""
    client, _, tokenizer, _ = served
    first, second = tokenizer.encode("é")  # two byte-level tokens in this vocabulary
    choice = chat(client, logprobs=True, logit_bias={str(first): 100}, max_tokens=1).json()["choices"][0]
    assert choice["logprobs"]["content"][0]["bytes"] == [0xC3]
    assert (tokenizer.token_bytes(first) + tokenizer.token_bytes(second)).decode() == "é"


@pytest.mark.parametrize("bos", [False, True])
def test_tokens_texts_bytes_and_offsets_read_as_the_text_does_under_a_sentencepiece_vocabulary(bos):
    """Each SentencePiece token was decoded alone, which strips a text's leading space: the reply " t t" had the
    tokens "t", "t" (their bytes joined to "tt"), and echoed offsets pointed at the spaces. With Llama 2's bos
    post-processor the echoed tokens lost their space still ("hellot t t")."""
    from tokenizer_support import sentencepiece_tokenizer

    from longcat_flash.infer.sampling import TokenLogprob
    from longcat_flash.serve.logprobs import ChatScores, CompletionScores

    tokenizer = sentencepiece_tokenizer(bos)
    prompt, t = tokenizer.encode("hello", add_special_tokens=True), tokenizer.backend.token_to_id("▁t")
    chat = ChatScores(generated=[TokenLogprob(t, -1.0), TokenLogprob(t, -1.0)])
    assert [(c.token, bytes(c.bytes)) for c in chat.take(tokenizer, 2).content] == [(" t", b" t")] * 2
    scores = CompletionScores(echo=prompt, echo_text=True, added=tokenizer.added)
    scores.prompt, scores.generated = [None] * len(prompt), [TokenLogprob(t, -1.0, ((t, -1.0),))] * 2
    echoed = scores.take(tokenizer, 2)
    text = "hello" + " t t"  # the choice's text: the prompt as sent, then what the reply reads
    assert "".join(echoed.tokens) == text and echoed.tokens[-1] in echoed.top_logprobs[-1]
    assert [text[at:at + len(token)] for at, token in zip(echoed.text_offset, echoed.tokens)] == echoed.tokens
    alone = ChatScores(generated=[TokenLogprob(t, -1.0)] * 2, began=False)  # after a prompt of no text: a start
    assert [c.token for c in alone.take(tokenizer, 2).content] == ["t", " t"]


def test_a_reply_reads_as_the_whole_sequence_decodes_under_a_sentencepiece_vocabulary():
    """Through the server: the completion of "hello" is the text after it in the decoded sequence, leading space
    included, and its logprob tokens join into that text (it was "t t t", tokens "t" x 3)."""
    from tokenizer_support import sentencepiece_tokenizer

    tokenizer = sentencepiece_tokenizer()
    model = randomized(tiny().replace(vocab_size=tokenizer.vocab_size))
    bridge = AsyncEngine(Engine(model, EngineConfig(max_running=2, cache_tokens=1024))).start()
    app = create_app(bridge, tokenizer, ServerConfig(model_name="sp", context=model.config.max_position_embeddings))
    t = tokenizer.backend.token_to_id("▁t")
    try:
        with TestClient(app) as client:
            replies = [client.post("/v1/completions", json={"model": "sp", "prompt": prompt, "max_tokens": 3,
                                                            "logit_bias": {str(t): 100}, "logprobs": 0}).json()
                       for prompt in ("hello", [tokenizer.bos_id])]  # a prompt of no text: the reply starts one
    finally:
        bridge.stop()
    after_text, alone = (reply["choices"][0] for reply in replies)
    assert after_text["text"] == " t t t" == "".join(after_text["logprobs"]["tokens"])
    assert alone["text"] == "t t t" == "".join(alone["logprobs"]["tokens"])


def test_prompt_logprobs_equal_the_models_forward(served):
    client, model, tokenizer, _ = served
    prompts = [tokenizer.encode(text) for text in TEXTS]
    assert max(map(len, prompts)) > 2 * CHUNK and min(map(len, prompts)) == 1
    body = {"model": "tiny", "prompt": prompts, "max_tokens": 0, "echo": True, "logprobs": 3}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert [c["index"] for c in answer["choices"]] == [0, 1, 2]
    assert answer["usage"] == {"prompt_tokens": sum(map(len, prompts)), "completion_tokens": 0,
                               "total_tokens": sum(map(len, prompts))}
    for ids, text, choice in zip(prompts, TEXTS, answer["choices"]):
        logprobs = choice["logprobs"]
        assert choice["text"] == text and choice["finish_reason"] == "length"
        assert "".join(logprobs["tokens"]) == text and len(logprobs["text_offset"]) == len(ids)
        assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
        ours = torch.tensor(logprobs["token_logprobs"][1:], dtype=torch.float32)
        torch.testing.assert_close(ours, forward_logprobs(model, ids), atol=1e-3, rtol=0)
        assert all(1 <= len(top) <= 4 for top in logprobs["top_logprobs"][1:])


def test_generated_logprobs_and_greedy_text_unchanged(served):
    client, model, tokenizer, _ = served
    body = {"model": "tiny", "prompt": TEXTS[0], "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    plain = client.post("/v1/completions", json=body).json()["choices"][0]
    scored = client.post("/v1/completions", json={**body, "logprobs": 2}).json()["choices"][0]
    echoed = client.post("/v1/completions", json={**body, "logprobs": 2, "echo": True}).json()["choices"][0]
    assert plain["logprobs"] is None and scored["text"] == plain["text"] and echoed["text"] == TEXTS[0] + plain["text"]
    assert echoed["logprobs"]["token_logprobs"][-6:] == scored["logprobs"]["token_logprobs"]
    prompt = tokenizer.encode(TEXTS[0])
    ids = prompt + greedy_reference(model, prompt, 6)
    reference = forward_logprobs(model, ids)[len(prompt) - 1:]
    torch.testing.assert_close(torch.tensor(scored["logprobs"]["token_logprobs"]), reference, atol=1e-3, rtol=0)
    for chosen, top in zip(scored["logprobs"]["token_logprobs"], scored["logprobs"]["top_logprobs"]):
        assert chosen == max(top.values())  # greedy: the chosen token is the likeliest (lm-eval's is_greedy)


@pytest.mark.parametrize("change, words", [
    ({"max_tokens": 0}, "only with echo"), ({"n": 33}, "n"), ({"n": 0}, "n"),
    ({"prompt": ["a"] * 5, "n": 26}, "at most 128 choices"), ({"logprobs": 21}, "logprobs"), ({"logprobs": -1}, "logprobs"), ({"prompt": ["a"] * 129}, "at most"),
    ({"prompt": ["a", ""]}, "prompt.1: must not be empty"), ({"prompt": [[1, 2], [10**9]]}, "token ids"),
    ({"response_format": {"type": "xml"}}, "response_format"), ({"best_of": 3}, "best_of"),
    ({"n": 2, "best_of": 1}, "best_of: 1 is fewer than n (2)"), ({"n": 2, "best_of": 3}, "best_of: 3 is more than n"),
    ({"suffix": ""}, "suffix: insertion (text the completion must lead up to) is not supported by this server"),
])
def test_what_we_do_not_serve_is_refused(served, change, words):
    r = served[0].post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2, **change})
    assert r.status_code == 400 and words in r.json()["error"]["message"], r.text
    assert r.json()["error"]["code"] == "invalid_value"  # as every other refused value


def test_a_text_prompt_gets_the_bos_its_tokenizer_adds_as_in_vllm(served):
    """A Llama-style tokenizer's post-processor adds bos to a raw prompt in transformers and vLLM (and in our
    /tokenize): a completions prompt here got none, so the same model continued another prompt. The echoed text stays
    the prompt as sent; the added bos is a token there with no text."""
    _, model, tokenizer, _ = served
    tokenizer = bos_adding(tokenizer)
    bridge = AsyncEngine(Engine(model, EngineConfig(max_running=2, cache_tokens=1024))).start()
    app = create_app(bridge, tokenizer, ServerConfig(model_name="tiny", context=model.config.max_position_embeddings))
    plain = tokenizer.encode(TEXTS[0])
    try:
        with TestClient(app) as client:
            body = {"model": "tiny", "prompt": TEXTS[0], "max_tokens": 0, "echo": True, "logprobs": 0}
            answer = client.post("/v1/completions", json=body).json()
            assert answer["usage"]["prompt_tokens"] == 1 + len(plain)
            choice = answer["choices"][0]
            assert choice["text"] == TEXTS[0] and choice["logprobs"]["tokens"][0] == ""
            assert choice["logprobs"]["text_offset"][:2] == [0, 0] and "".join(choice["logprobs"]["tokens"]) == TEXTS[0]
            torch.testing.assert_close(torch.tensor(choice["logprobs"]["token_logprobs"][1:]),
                                       forward_logprobs(model, [tokenizer.bos_id, *plain]), atol=1e-3, rtol=0)
            tokenized = client.post("/tokenize", json={"model": "tiny", "prompt": TEXTS[0]}).json()
            assert tokenized["tokens"] == [tokenizer.bos_id, *plain]  # the ids the completions prompt became
            for change in ({"add_special_tokens": False}, {"prompt": plain}):  # vLLM's switch; ids are as sent
                answer = client.post("/v1/completions", json={**body, **change}).json()
                assert answer["usage"]["prompt_tokens"] == len(plain)
    finally:
        bridge.stop()


def test_best_of_equal_to_n_is_served():
    """Nothing to rank: every candidate is returned. With n >= 2 no best_of was accepted (1 was "fewer than n",
    n itself "only 1")."""
    for n in (1, 2, 3):
        assert p.CompletionRequest(prompt="x", n=n, best_of=n).best_of == n
        assert p.ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], n=n, best_of=n).n == n


@pytest.mark.parametrize("prompt", [["ok", ""], [[1], []], ["ok", "x" * (p.MAX_PROMPT_CHARS + 1)], [[1, 2], "ab"],
                                    ["ab", [1, 2]], ["ab", 5]])
def test_a_refused_prompt_of_several_is_named_by_its_index(served, prompt):
    """It was named `prompt.prompt.1` (a long one not at all; one of another kind than the first blamed the first)."""
    r = served[0].post("/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt.1", r.text
    assert r.json()["error"]["message"].startswith("prompt.1: "), r.text


def test_a_prompt_of_several_past_the_context_or_the_vocabulary_is_named_by_its_index(served):
    """A prompt of several that did not fit the context, or held an id past the vocabulary, was "the prompt"."""
    client, model, _, _ = served
    context, vocab = model.config.max_position_embeddings, model.config.vocab_size
    for prompt, param, words in (([[5] * 10, [5] * (context + 1)], "prompt.1", "prompt.1: the prompt has"),
                                 ([[1, 2], [3, vocab]], "prompt.1", "prompt.1: prompt token ids must be in"),
                                 ([[5] * (context - 1), [5]], "max_tokens", "plus prompt.0's")):
        r = client.post("/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 2})
        error = r.json()["error"]
        assert r.status_code == 400 and error["param"] == param and words in error["message"], r.text


def streamed(client, path: str, body: dict) -> tuple[list[dict], dict | None]:
    """The choice chunks of a streamed response, in arrival order, and its usage (the last chunk's)."""
    chunks, usage = [], None
    with client.stream("POST", path, json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200, r.read()
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    for line in lines[:-1]:
        event = json.loads(line)
        chunks += event["choices"]
        usage = event.get("usage") or usage
    return chunks, usage


def reassembled(chunks: list[dict]) -> dict[int, dict]:
    """Completion chunks joined per choice index: text, logprobs lists, the finish reason."""
    out: dict[int, dict] = {}
    for c in chunks:
        choice = out.setdefault(c["index"], {"text": "", "finish_reason": None, "logprobs": None})
        choice["text"] += c["text"]
        choice["finish_reason"] = c["finish_reason"] or choice["finish_reason"]
        if c["logprobs"] is not None:
            joined = choice["logprobs"] or {key: [] for key in c["logprobs"]}
            choice["logprobs"] = {key: joined[key] + c["logprobs"][key] for key in joined}
    return out


def test_n_copies_share_the_prompt_sample_apart_and_repeat_with_a_seed(served):
    client, _, tokenizer, engine = served
    body = {"model": "tiny", "prompt": TEXTS[:2], "max_tokens": 6, "n": 3, "seed": 11, "ignore_eos": True}
    before = engine.stats.prompt_tokens
    answer = client.post("/v1/completions", json=body).json()
    prompts = [tokenizer.encode(text) for text in TEXTS[:2]]
    assert engine.stats.prompt_tokens - before == sum(map(len, prompts))  # each prompt prefilled once, not n times
    assert [c["index"] for c in answer["choices"]] == list(range(6))
    assert answer["usage"]["prompt_tokens"] == sum(map(len, prompts)) and answer["usage"]["completion_tokens"] == 36
    texts = [c["text"] for c in answer["choices"]]
    assert len(set(texts[:3])) > 1 and len(set(texts[3:])) > 1  # copies sample apart
    assert [c["text"] for c in client.post("/v1/completions", json=body).json()["choices"]] == texts  # seeded
    for j in range(3):  # copy j is the request with seed + j
        alone = client.post("/v1/completions", json={**body, "n": 1, "seed": 11 + j}).json()["choices"]
        assert [alone[0]["text"], alone[1]["text"]] == [texts[j], texts[3 + j]]


def test_streamed_completions_equal_the_whole_answer_with_echo_logprobs_and_n(served):
    client = served[0]
    body = {"model": "tiny", "prompt": [TEXTS[0], TEXTS[2]], "max_tokens": 5, "n": 2,
            "seed": 3, "ignore_eos": True, "echo": True, "logprobs": 2, "stop": ["\n"]}
    whole = client.post("/v1/completions", json=body).json()
    chunks, usage = streamed(client, "/v1/completions", body)
    assert reassembled(chunks) == {c["index"]: {key: c[key] for key in ("text", "finish_reason", "logprobs")}
                                   for c in whole["choices"]}
    assert usage == whole["usage"]
    for choice in whole["choices"]:  # the token texts spell the text (a stop string's token may run past its
        tokens, text = choice["logprobs"]["tokens"], choice["text"]  # end, as in vLLM), each offset where it starts
        assert "".join(tokens).startswith(text) and len(tokens) == len(choice["logprobs"]["token_logprobs"])
        for token, at in zip(tokens, choice["logprobs"]["text_offset"]):
            assert "\ufffd" in token or text[at:at + len(token)] == token[:len(text) - at]
    first = next(c for c in chunks if c["index"] == 0)
    assert first["text"].startswith(TEXTS[0]) and first["logprobs"]["token_logprobs"][0] is None  # echo leads


def test_chat_n_streamed_or_not(served):
    client = served[0]
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 5, "n": 2, "seed": 5, "ignore_eos": True,
            "logprobs": True}
    whole = client.post("/v1/chat/completions", json=body).json()
    assert [c["index"] for c in whole["choices"]] == [0, 1] and whole["usage"]["completion_tokens"] == 10
    chunks, usage = streamed(client, "/v1/chat/completions", body)
    assert usage == whole["usage"]
    for choice in whole["choices"]:
        mine = [c for c in chunks if c["index"] == choice["index"]]
        assert mine[0]["delta"]["role"] == "assistant" and mine[-1]["finish_reason"] == choice["finish_reason"]
        assert "".join(c["delta"].get("content") or "" for c in mine) == choice["message"]["content"]
        assert [t for c in mine for t in (c["logprobs"] or {}).get("content") or []] == choice["logprobs"]["content"]


# ---- chat logprobs and sampling controls over HTTP

MESSAGES = [{"role": "user", "content": "def f(x):"}]


def chat(client, **fields):
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 5, "temperature": 0, "ignore_eos": True, **fields}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return r


def test_chat_logprobs_equal_the_models_forward_streamed_or_not(served):
    client, model, tokenizer, _ = served
    choice = chat(client, logprobs=True, top_logprobs=2).json()["choices"][0]
    content = choice["logprobs"]["content"]
    prompt = tokenizer.encode(tokenizer.apply_chat_template(MESSAGES), allow_special=True)
    generated = greedy_reference(model, prompt, 5)
    reference = forward_logprobs(model, prompt + generated)[len(prompt) - 1:]
    torch.testing.assert_close(torch.tensor([c["logprob"] for c in content]), reference, atol=1e-3, rtol=0)
    assert [c["token"] for c in content] == [tokenizer.decode([t]) for t in generated]
    for entry, token in zip(content, generated):
        assert entry["bytes"] == list(tokenizer.token_bytes(token)) and len(entry["top_logprobs"]) == 2
        assert entry["top_logprobs"][0]["logprob"] == entry["logprob"]  # greedy: the chosen is the likeliest
    streamed = []
    with client.stream("POST", "/v1/chat/completions", json={
            "model": "tiny", "messages": MESSAGES, "max_tokens": 5, "temperature": 0, "ignore_eos": True,
            "logprobs": True, "top_logprobs": 2, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                streamed += (json.loads(line[6:])["choices"][0]["logprobs"] or {}).get("content") or []
    assert streamed == content
    assert chat(client).json()["choices"][0]["logprobs"] is None


def test_chat_logit_bias_forces_a_token_and_controls_are_validated(served):
    client, _, tokenizer, _ = served
    token = tokenizer.encode("Z")[0]
    choice = chat(client, logit_bias={str(token): 100}, logprobs=True).json()["choices"][0]
    assert [c["token"] for c in choice["logprobs"]["content"]] == ["Z"] * 5  # logprobs stay the raw ones
    for bad, param in [({"logit_bias": {str(10**6): 1}}, "logit_bias"), ({"logit_bias": {"x": 1}}, "logit_bias"),
                       ({"presence_penalty": 2.5}, "presence_penalty"), ({"min_p": -0.1}, "min_p"),
                       ({"repetition_penalty": 0}, "repetition_penalty"), ({"top_logprobs": 2}, "top_logprobs"),
                       ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"), ({"n": 33}, "n"),
                       ({"response_format": {"type": "json_schema", "json_schema": {}}}, "response_format"),
                       ({"functions": [{"name": "f"}]}, "functions"), ({"function_call": "auto"}, "function_call")]:
        r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES, **bad})
        assert r.status_code == 400 and param in r.json()["error"]["message"], (bad, r.text)


def test_whole_replies_are_serialised_off_the_event_loop(served, monkeypatch):
    """16 echoed prompts of 4000 tokens with logprobs make a 34 MB reply: encoded on the event loop (FastAPI's
    jsonable_encoder, then json.dumps) it stalled /health for 3.5 s and other streams for 11 s."""
    from serve_support import on_a_loop
    from starlette.responses import JSONResponse

    replies = []
    render = JSONResponse.render

    def recorded(self, content):
        if isinstance(content, dict) and "choices" in content:
            replies.append(on_a_loop())
        return render(self, content)

    monkeypatch.setattr(JSONResponse, "render", recorded)
    client = served[0]
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": "ab", "max_tokens": 2, "echo": True,
                                             "logprobs": 1})
    assert r.status_code == 200 and r.json()["choices"][0]["text"].startswith("ab")
    assert chat(client, max_tokens=2).json()["choices"][0]["message"]["role"] == "assistant"
    assert replies == [False, False]


def test_logprobs_are_bounded_per_reply(served, monkeypatch):
    """Each scored token carries logprobs + 1 entries in every copy: 4 echoed prompts of 4000 ids with n=32 and
    logprobs 20 (a 40 KB request) built a 312 MB reply, and a chat reply of 2 x 3000 generated tokens with
    top_logprobs 20 built 8.9 MB, more with a longer context. Past the bound, a 400 naming logprobs; at it, the
    reply; streamed, generated tokens are sent as they come and do not count."""
    assert p.MAX_LOGPROB_ENTRIES >= 128 * 4096 * 2  # an evaluator's batch: 128 4096-token prompts, logprobs 1, echoed
    # and max_tokens 1 (lm_eval's loglikelihood requests): the echoed and the generated entries are bounded apart
    client, _, _, _ = served
    monkeypatch.setattr(p, "MAX_LOGPROB_ENTRIES", 4 * 50 * 2 * 3)
    ids = [[7 + (i * 5 + j) % 200 for i in range(50)] for j in range(4)]
    ask = {"model": "tiny", "prompt": ids, "max_tokens": 0, "echo": True, "n": 2}
    r = client.post("/v1/completions", json={**ask, "logprobs": 3})
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == "logprobs", r.text
    assert error["message"].startswith("logprobs: 200 echoed prompt tokens x n=2 x 4 entries a token is 1600 "
                                       "entries; at most 1200 of each in one reply")
    r = client.post("/v1/completions", json={**ask, "logprobs": 2})  # 1200: at the bound
    assert r.status_code == 200 and len(r.json()["choices"]) == 8, r.text
    assert client.post("/v1/completions", json={**ask, "logprobs": 3, "echo": False, "max_tokens": 1}).status_code == 200
    scored = client.post("/v1/completions", json={**ask, "logprobs": 2, "max_tokens": 1})  # as lm_eval scores
    assert scored.status_code == 200, scored.text[:300]  # 1200 echoed entries and 24 generated: each kind bounded
    r = client.post("/v1/completions", json={**ask, "logprobs": 2, "echo": False, "max_tokens": 60})  # 4 x 60 x 2 x 3
    assert r.status_code == 400 and "240 generated tokens (the token limit) x n=2 x 3" in r.text, r.text[:300]

    long = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100, "n": 2,
            "logprobs": True, "top_logprobs": 5}  # up to 2 x 100 x 6 = 1200: at the bound
    assert client.post("/v1/chat/completions", json=long).status_code == 200
    r = client.post("/v1/chat/completions", json={**long, "top_logprobs": 6})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs", r.text
    assert r.json()["error"]["message"].startswith("logprobs: 100 generated tokens (the token limit) x n=2 x 7 "
                                                   "entries a token is 1400 entries")
    assert client.post("/v1/chat/completions", json={**long, "top_logprobs": 6, "logprobs": False}).status_code == 400
    r = client.post("/v1/chat/completions", json={**long, "top_logprobs": 6, "stream": True})
    assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")