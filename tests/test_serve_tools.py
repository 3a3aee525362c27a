"""Tool calls through the server, in-process (FastAPI's TestClient over a real engine) on a scripted checkpoint
that writes a weather call when prefilled with the call's opening and a final answer after ` ASSISTANT:`; and the
parser on its own, fed in every split."""
from __future__ import annotations

import contextlib
import json
import time

import pytest

from chat_support import scripted_checkpoint
from longcat_flash.serve.tools import ToolCallParser

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

OPEN, CLOSE = "<longcat_tool_call>", "</longcat_tool_call>"
NAMED_PREFILL = OPEN + '{"name": "get_weather", "arguments": '
SCRIPTS = {NAMED_PREFILL: '{"city": "Paris"}}' + CLOSE, " ASSISTANT:": "Sunny, 21 C."}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}}}}}
NAMED = {"type": "function", "function": {"name": "get_weather"}}
ASK = [{"role": "user", "content": "Weather in Paris?"}]


@contextlib.contextmanager
def scripted_server(out, scripts: dict[str, str]):
    """A TestClient over a real engine serving `scripted_checkpoint(out, scripts)`."""
    from fastapi.testclient import TestClient

    from longcat_flash.infer.engine import Engine
    from longcat_flash.infer.loader import load_for_inference
    from longcat_flash.serve.app import ServerConfig, create_app
    from longcat_flash.serve.bridge import AsyncEngine
    from longcat_flash.tokenizer import Tokenizer

    model_dir = scripted_checkpoint(out, scripts)
    model, _ = load_for_inference(model_dir, device="cpu")
    bridge = AsyncEngine(Engine(model)).start()
    app = create_app(bridge, Tokenizer.load(model_dir), ServerConfig("scripted", model.config.max_position_embeddings))
    try:
        with TestClient(app) as test_client:
            yield test_client
    finally:
        bridge.stop()


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    with scripted_server(tmp_path_factory.mktemp("scripted"), SCRIPTS) as test_client:
        yield test_client


def chat(client, **body):
    return client.post("/v1/chat/completions", json={"model": "scripted", "max_tokens": 32, **body})


def test_named_tool_choice_returns_a_tool_call_without_markup(client):
    r = chat(client, messages=ASK, tools=[WEATHER], tool_choice=NAMED)
    choice = r.json()["choices"][0]
    assert r.status_code == 200 and choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    [call] = choice["message"]["tool_calls"]
    assert call["id"].startswith("call_") and call["type"] == "function"
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}


def test_streamed_tool_call_reassembles_to_the_same_call(client):
    with client.stream("POST", "/v1/chat/completions", json={
            "model": "scripted", "max_tokens": 32, "messages": ASK, "tools": [WEATHER], "tool_choice": NAMED,
            "stream": True}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert all(not d.get("content") for d in deltas)  # no markup, no text
    calls = [tc for d in deltas for tc in d.get("tool_calls") or []]
    assert calls[0].keys() == {"index", "id", "type", "function"} and calls[0]["function"]["name"] == "get_weather"
    assert all(tc.keys() == {"index", "function"} for tc in calls[1:])
    assert "".join(tc["function"]["arguments"] for tc in calls) == '{"city": "Paris"}'
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_round_trip_with_the_tool_result_in_history(client):
    call = chat(client, messages=ASK, tools=[WEATHER], tool_choice=NAMED).json()["choices"][0]["message"]
    history = [*ASK, call, {"role": "tool", "tool_call_id": call["tool_calls"][0]["id"], "name": "get_weather",
                            "content": "21 C, sun"}]  # the function's name, as LangChain sends it
    answer = chat(client, messages=history, tools=[WEATHER]).json()
    assert answer["choices"][0]["message"] == {"role": "assistant", "content": "Sunny, 21 C.", "tool_calls": None}
    assert answer["choices"][0]["finish_reason"] == "stop"


def test_a_named_call_ends_the_reply_and_one_cut_by_max_tokens_finishes_with_length(client):
    """A named function is called once (OpenAI, vLLM): the reply ends at the call's closing tag, its 8th token,
    without waiting for the end of the turn (parallel_tool_calls or not). Cut before it, an agent sees the cut."""
    for parallel in (True, False):
        whole = chat(client, messages=ASK, tools=[WEATHER], tool_choice=NAMED, parallel_tool_calls=parallel).json()
        assert whole["choices"][0]["finish_reason"] == "tool_calls" and whole["usage"]["completion_tokens"] == 8
    cut = chat(client, messages=ASK, tools=[WEATHER], tool_choice=NAMED, max_tokens=7).json()["choices"][0]
    assert cut["finish_reason"] == "length" and not cut["message"]["tool_calls"]


def test_a_reply_the_parser_ends_counts_as_finished_not_cancelled(tmp_path):
    """With parallel calls off the server ends the reply at the first call's closing tag and cancels it on the
    engine (here the model would go on writing " more" to max_tokens); /metrics counted that as a client gone."""
    call = OPEN + '{"name":"get_weather","arguments":{"city":"Paris"}}' + CLOSE  # compact: it fits a lookup table
    with scripted_server(tmp_path, {" ASSISTANT:": call + " more more"}) as server:
        def counts():
            lines = server.get("/metrics").text.splitlines()
            return {name: float(next(line.split()[-1] for line in lines
                                     if line.startswith(f"longcat_requests_{name}_total ")))
                    for name in ("finished", "cancelled")}

        r = chat(server, messages=ASK, tools=[WEATHER], parallel_tool_calls=False, temperature=0, max_tokens=100,
                 ignore_eos=True).json()
        assert r["choices"][0]["finish_reason"] == "tool_calls" and r["usage"]["completion_tokens"] < 100, r
        deadline = time.monotonic() + 10  # the cancel reaches the engine's figures on its next turn
        while counts() == {"finished": 0, "cancelled": 0} and time.monotonic() < deadline:
            time.sleep(0.02)
        assert counts() == {"finished": 1, "cancelled": 0}


def test_parallel_tool_calls_off_stops_after_the_first_call(client):
    r = chat(client, messages=ASK, tools=[WEATHER], tool_choice=NAMED, parallel_tool_calls=False).json()
    assert r["choices"][0]["finish_reason"] == "tool_calls" and len(r["choices"][0]["message"]["tool_calls"]) == 1


def test_tool_choice_none_renders_the_tools_and_parses_nothing(client):
    """As vLLM by default, and as OpenAI's model sees them: the tools were dropped from the prompt."""
    plain = chat(client, messages=ASK).json()
    auto = chat(client, messages=ASK, tools=[WEATHER], max_tokens=1).json()
    none = chat(client, messages=ASK, tools=[WEATHER], tool_choice="none").json()
    assert none["usage"]["prompt_tokens"] == auto["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"]
    message = none["choices"][0]["message"]
    assert message["content"] == "Sunny, 21 C." and not message.get("tool_calls")


CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}


@pytest.mark.parametrize("change, param", [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required", "tools": []}, "tool_choice"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"parameters": {"type": "object"}}}]}, "tools.0.function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
     "tools.0.function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "bad name", "parameters": {"type": "object"}}}]},
     "tools.0.function.name"),
    ({"tools": [WEATHER, WEATHER]}, "tools"),
    ({"tools": [{**WEATHER, "function": {**WEATHER["function"], "strict": True, "parameters": {
        "type": "object", "properties": {"city": {"$ref": "#/$defs/nowhere"}}}}}]},
     "tools.0.function.parameters"),  # cannot compile
    ({"messages": [*ASK, {"role": "assistant", "content": None, "tool_calls": [CALL]},
                   {"role": "tool", "tool_call_id": "call_9", "content": "x"}]}, "messages.2.tool_call_id"),
    ({"messages": [*ASK, {"role": "tool", "content": "x"}]}, "messages.1.tool_call_id"),
    ({"messages": [*ASK, {"role": "assistant", "content": None, "tool_calls": [CALL]},  # names another function
                   {"role": "tool", "tool_call_id": "call_1", "name": "get_time", "content": "x"}]}, "messages.2.name"),
    ({"messages": [*ASK, {"role": "assistant", "content": None}]}, "messages.1.content"),
    ({"messages": [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {**CALL, "function": {"name": "get_weather", "arguments": "{oops"}}]}]},
     "messages.1.tool_calls.0.function.arguments"),
    ({"messages": [*ASK, {"role": "assistant", "content": None, "tool_calls": [CALL]},  # answered twice
                   {"role": "tool", "tool_call_id": "call_1", "content": "x"},
                   {"role": "tool", "tool_call_id": "call_1", "content": "y"}]}, "messages.3.tool_call_id"),
    ({"messages": [*ASK, {"role": "assistant", "content": None, "tool_calls": [CALL, {**CALL, "id": "call_2"}]},
                   {"role": "tool", "tool_call_id": "call_2", "content": "x"}]}, "messages.2"),  # call_1 unanswered
    ({"messages": [*ASK, {"role": "assistant", "content": None, "tool_calls": [CALL, CALL]},  # one id twice
                   {"role": "tool", "tool_call_id": "call_1", "content": "x"}]}, "messages.1.tool_calls.1.id"),
    ({"messages": [*ASK, {"role": "assistant", "content": None, "tool_calls": [CALL]}, *ASK]}, "messages.1"),
    ({"messages": [*ASK, {"role": "assistant", "content": None, "tool_calls": [CALL]}]}, "messages.1"),  # at the end
])
def test_bad_tool_fields_are_400s_naming_the_field(client, change, param):
    r = chat(client, **{"messages": ASK, "tools": [WEATHER], **change})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and r.json()["error"]["message"]


@pytest.mark.parametrize("choice", ["none", "auto", "required"])
@pytest.mark.parametrize("parameters,where", [
    ({"type": "object", "properties": {"a": {"type": "strin"}}}, "(at properties.a.type): 'strin' is not valid"),
    ({"type": "object", "required": "a"}, "(at required): 'a' is not of type 'array'"),
    ({"type": "object", "properties": [1]}, "(at properties): [1] is not of type 'object'")])
def test_a_tool_schema_that_is_no_json_schema_is_refused_whatever_tool_choice(client, choice, parameters, where):
    """It was refused only when a forced call compiled it: an agent learnt of a broken tool turns after sending it."""
    bad = {"type": "function", "function": {"name": "f", "parameters": parameters}}
    r = chat(client, messages=ASK, tools=[WEATHER, bad], tool_choice=choice)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "tools.1.function.parameters"
    assert r.json()["error"]["message"].startswith(f"tools.1.function.parameters: not a valid JSON Schema {where}")


@pytest.mark.parametrize("parameters", [
    {"type": "object", "properties": {"a": {"type": "string", "pattern": "^\\p{L}+$"}}},  # ECMA-262, not Python's re
    {"type": "object", "properties": {"a": {"type": "array", "items": [{"type": "string"}]}}},  # draft-07 tuples
    {"type": "object", "properties": {"a": {"type": "number", "minimum": 0, "exclusiveMinimum": True}}}])  # draft 4
def test_a_tool_schema_of_an_older_draft_or_an_ecma_pattern_is_served(client, parameters):
    ok = {"type": "function", "function": {"name": "f", "parameters": parameters}}
    assert chat(client, messages=ASK, tools=[WEATHER, ok], tool_choice="auto").status_code == 200
    bad = {"type": "function", "function": {"name": "f", "parameters": {**parameters, "$schema": 5}}}
    r = chat(client, messages=ASK, tools=[WEATHER, bad], tool_choice="auto")
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools.1.function.parameters", r.text  # a 500


# ---- the parser alone ----

TEXT = f'Let me look.\n{OPEN}{{"name": "a", "arguments": {{"x": [1, "{CLOSE[:5]}"]}}}}{CLOSE}\n' \
       f'{OPEN}{{"name": "b"}}{CLOSE}\n'


def run(parser: ToolCallParser, pieces: list[str]) -> tuple[str, list]:
    events = [e for piece in pieces for e in parser.feed(piece)] + parser.finish()
    return "".join(e for e in events if isinstance(e, str)), [e for e in events if not isinstance(e, str)]


@pytest.mark.parametrize("size", [1, 2, 3, 7, len(TEXT)])
def test_parser_in_any_split_gives_the_calls_and_only_the_text(size):
    content, calls = run(ToolCallParser(), [TEXT[i:i + size] for i in range(0, len(TEXT), size)])
    assert content == "Let me look."
    assert [(c.index, c.name, json.loads(c.arguments)) for c in calls] == [(0, "a", {"x": [1, "</lon"]}),
                                                                          (1, "b", {})]


@pytest.mark.parametrize("size", [1, 4, 200])
def test_parser_reads_a_tag_inside_an_argument_string_as_text(size):
    """An argument may hold the tags' text (a schema's const can force it; an agent writing about this format
    does): the call ends at the first closing tag outside a JSON string, escaped quotes counted as text."""
    arguments = {"note": f'say \\"{CLOSE}\\" {OPEN}', "path": "a\\", "tail": CLOSE}
    text = f'{OPEN}{{"name": "write", "arguments": {json.dumps(arguments)}}}{CLOSE} after'
    content, calls = run(ToolCallParser(), [text[i:i + size] for i in range(0, len(text), size)])
    assert content == " after" and [(c.name, json.loads(c.arguments)) for c in calls] == [("write", arguments)]


@pytest.mark.parametrize("size", [1, 5, 300])
def test_a_malformed_call_stays_content_and_the_calls_after_it_are_read(size):
    """A block with an odd quote is no JSON: it ends at its first closing tag, as the docs say of invalid blocks
    (read as inside a string, it swallowed the valid call after it)."""
    bad = f'{OPEN}{{"name": "get", "arguments": {{"q": "5" tall"}}}}{CLOSE}'
    text = f'{bad}\n{OPEN}{{"name": "get", "arguments": {{"q": "x"}}}}{CLOSE}'
    content, calls = run(ToolCallParser(), [text[i:i + size] for i in range(0, len(text), size)])
    assert content == bad and [(c.name, json.loads(c.arguments)) for c in calls] == [("get", {"q": "x"})]


def test_a_block_nested_past_what_json_reads_is_content():
    """Checking whether a tag sits inside a string parsed the block: nested a thousand deep it raised RecursionError
    out of the reply (a 500), where such a block is content as generated."""
    for text in (OPEN + "[" * 1000 + '"' + CLOSE,
                 f'{OPEN}{{"name": "f", "arguments": {{"x": {"[" * 1000}{"]" * 1000}}}}}{CLOSE}'):
        assert run(ToolCallParser(), [text]) == (text, [])


@pytest.mark.parametrize("size", [1, 3, 100])
def test_parser_drops_the_whitespace_before_a_call_and_keeps_the_text_after_it(size):
    text = f'Done. \n{OPEN}{{"name": "f"}}{CLOSE} and more.'
    content, calls = run(ToolCallParser(), [text[i:i + size] for i in range(0, len(text), size)])
    assert content == "Done. and more." and [c.name for c in calls] == ["f"]  # it was "Done. \\n and more."


def test_parser_leaves_invalid_and_unterminated_blocks_as_text():
    bad = f"{OPEN}{{not json}}{CLOSE}"
    assert run(ToolCallParser(), [bad]) == (bad, [])
    assert run(ToolCallParser(), [f"x {OPEN}{{\"name\""]) == (f"x {OPEN}{{\"name\"", [])
    assert run(ToolCallParser(), ["a <longcat_t", "ool but not"]) == ("a <longcat_tool but not", [])


def test_parser_passes_the_arguments_on_as_written_and_refuses_what_is_not_json():
    """Re-encoded by Python, a number past a double's range became -Infinity, which no JSON parser reads. A block
    naming its arguments otherwise (`"parameters"`) was a call with `{}`: the model's arguments lost, silently."""
    written = '{"x": -62308724E61415272, "y": 0.10000000000000000555, "z": "\\u00e9"}'
    _, calls = run(ToolCallParser(), [f'{OPEN} {{ "arguments" : {written} , "name": "f" }} {CLOSE}',
                                      f'{OPEN}{{"id": "x", "type": "function", "name": "g", "arguments": {{}}}}{CLOSE}'])
    assert [(c.name, c.arguments) for c in calls] == [("f", written), ("g", "{}")]  # other members passed over
    for bad in ('{"name": "f", "arguments": {"x": NaN}}', '{"name": "f", "arguments": {"x": 1}} tail',
                '{"name": "f", "arguments": {"x": 1},}', '{"name": "f", "arguments": [1]}', '{"name": ""}',
                '{"name": "f", "parameters": {"x": 1}}', '{"args": {"x": 1}, "name": "f"}'):
        assert run(ToolCallParser(), [f"{OPEN}{bad}{CLOSE}"]) == (f"{OPEN}{bad}{CLOSE}", [])


def test_parser_with_prefill_and_no_parallel_calls():
    parser = ToolCallParser(prefill=NAMED_PREFILL, parallel=False)
    content, calls = run(parser, ['{"city": "Paris"}}', CLOSE, f'{OPEN}{{"name": "b"}}{CLOSE}'])
    assert parser.done and content == "" and [c.name for c in calls] == ["get_weather"]



UNCLOSED = f'ok {OPEN}{{"name": "f", never closed'


@pytest.mark.parametrize("text, last, content, calls, reason, stop", [
    (f"ok {OPEN}no call ra( more{CLOSE} after", None, f"ok {OPEN}no call ", 0, "stop", "ra("),  # no call in it
    (f'ok {OPEN}{{"name": "f", "arguments": {{"q": "ra("}}}}{CLOSE}', "stop", "ok", 1, "tool_calls", "ra("),  # a call
    (f'ok {OPEN}{{"name": "f", ra( never closed', "stop", f'ok {OPEN}{{"name": "f", ', 0, "stop", "ra("),
    (f'ok {OPEN}{{"name": "f", ra( never closed', "length", f'ok {OPEN}{{"name": "f", ', 0, "length", "ra("),
    (f'{OPEN}{{"name": "f", "arguments": {{}}}}{CLOSE}{OPEN}\n{{"name": "g", ', "length", OPEN, 1, "length", "\n"),
    (UNCLOSED, "length", UNCLOSED, 0, "length", OPEN),  # the tags are markup: a stop string never matches them
    (UNCLOSED, "length", UNCLOSED, 0, "length", "call>"),  # nor a part of one
])
def test_stop_strings_cut_a_block_handed_back_as_content(text, last, content, calls, reason, stop):
    """Stop strings are not looked for inside call blocks (serve/text.py); a block the parser then handed back as
    content carried them to the client, and the reply ran on to max_tokens. Scanning it, a stop string equal to
    the opening tag matched the tag: a reply cut by max_tokens finished with "stop" and an empty content. A reply
    that max_tokens cut finishes with "length" even where a stop string came first (with calls made, it finished
    with "tool_calls", and an agent ran them as if the last block had not been cut)."""
    import asyncio

    from longcat_flash.serve.replies import parsed

    async def pieces():  # (text, finish reason, tokens so far), as Generation.pieces yields them
        for i, char in enumerate(text):
            yield char, last if i == len(text) - 1 else None, i + 1

    async def read() -> tuple[list, str | None]:
        events, finish = [], None
        async for got, finish, _ in parsed(pieces(), ToolCallParser(), stop=[stop]):
            events += got
        return events, finish

    events, finish = asyncio.run(read())
    assert "".join(e for e in events if isinstance(e, str)) == content and finish == reason
    assert len([e for e in events if not isinstance(e, str)]) == calls


def test_the_prompt_renders_the_tools_as_given_and_the_results_in_call_order():
    """What the model was fine-tuned on (`longcat sft` and transformers render tools as the data has them, and the
    results in the order of the calls, which the prompt pairs by position): a client's key order and schema stay,
    and results sent in another order are put in the calls' order."""
    from longcat_flash.serve import protocol as p
    from longcat_flash.serve.prompts import chat_prompt
    from longcat_flash.serve.tools import plan_tools
    from longcat_flash.tokenizer import stdlib_tokenizer

    tokenizer = stdlib_tokenizer(600)
    tool = {"type": "function", "function": {"description": "Weather.", "name": "wx", "strict": False,
                                             "parameters": {"properties": {"c": {"type": "string"}}}}}
    calls = [{"id": f"call_{c}", "type": "function", "function": {"name": "wx", "arguments": f'{{"c": "{c}"}}'}}
             for c in ("Paris", "Oslo")]
    results = [{"role": "tool", "tool_call_id": f"call_{c}", "content": f"{c}: sunny"} for c in ("Paris", "Oslo")]
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": calls}]
    body = p.ChatCompletionRequest.model_validate({"model": "m", "messages": [*history, *results[::-1]],
                                                   "tools": [tool]})
    prompt = tokenizer.decode(chat_prompt(tokenizer, body, plan_tools(body), 4096), skip_special_tokens=False)
    assert prompt == tokenizer.apply_chat_template([*history, *results], tools=[tool])

def test_what_a_models_own_template_cannot_show_or_the_server_cannot_parse_is_refused():
    """A served model with its own template (plain ChatML, Qwen's, Llama's): tools it does not render, calls it
    writes in another format than the one the server parses, calls and results of the history it drops were all
    accepted and silently lost. A template that tests `'tool_calls' in message` failed on every chat, since the
    server rendered its messages with their null fields."""
    from longcat_flash.serve import protocol as p
    from longcat_flash.serve.errors import APIError
    from longcat_flash.serve.prompts import chat_prompt
    from longcat_flash.serve.tools import plan_tools
    from longcat_flash.tokenizer import DEFAULT_CHAT_TEMPLATE, Tokenizer, stdlib_tokenizer

    backend = stdlib_tokenizer(600).backend

    def prompt(template: str, **fields) -> str:
        tokenizer = Tokenizer(backend, chat_template=template)
        body = p.ChatCompletionRequest.model_validate({"model": "m", "messages": ASK, **fields})
        return tokenizer.decode(chat_prompt(tokenizer, body, plan_tools(body), 4096), skip_special_tokens=False)

    def refused(template: str, **fields) -> str:
        with pytest.raises(APIError, match="this model's chat template") as refusal:
            prompt(template, **fields)
        return refusal.value.body.param

    turns = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] or '' }}{{ CALLS }}"
             "{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    chatml = turns.replace("{{ CALLS }}", "")
    qwen = "{% if tools %}{{ tools | tojson }}{% endif %}" + turns.replace("{{ CALLS }}", (
        "{% for c in m['tool_calls'] or [] %}<tool_call>{{ c['function'] | tojson }}</tool_call>{% endfor %}")
    ).replace("{% for m in messages %}", "{% for m in messages if m['role'] != 'tool' %}")  # and no results
    llama = turns.replace("{{ CALLS }}", "{% if 'tool_calls' in m %}{{ m['tool_calls'] | length }} calls{% endif %}")
    assert "Paris" in prompt(llama)  # no null fields: `'tool_calls' in m` holds only where there are calls
    named = {"type": "function", "function": {"name": "get_weather"}}
    search = {"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}}
    assert refused(chatml, tools=[WEATHER]) == "tools"
    assert refused(chatml, tools=[WEATHER], tool_choice=named) == "tools"  # the prefill names it
    assert refused(chatml, tools=[search], messages=[{"role": "user", "content": "please search"}]) == "tools"
    assert refused(qwen, tools=[WEATHER]) == "tools"  # shown, but its calls would never be parsed
    history = [*ASK, {"role": "assistant", "content": "Let me look.", "tool_calls": [CALL]},
               {"role": "tool", "tool_call_id": "call_1", "content": "21 C"}]
    assert refused(chatml, messages=history) == "messages.1.tool_calls"
    assert refused(qwen, messages=history) == "messages.2"  # the call is shown, its result is not
    assert "21 C" in prompt(DEFAULT_CHAT_TEMPLATE, messages=history, tools=[WEATHER])  # ours shows them all
