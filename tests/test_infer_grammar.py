"""Constrained decoding in the engine, from random weights at temperature 1: every output parses and validates
whatever else shares the batch (unconstrained rows, n copies, MTP speculation), and without the mask it would not."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from infer_support import one_thread, randomized  # noqa: F401  (autouse fixture)
from tokenizer_support import sentencepiece_tokenizer

from longcat_flash.infer.engine import Engine, EngineConfig
from longcat_flash.infer.grammar import GrammarCompiler, GrammarError, check_schema
from longcat_flash.infer.sampling import SamplingParams
from longcat_flash.presets import tiny
from longcat_flash.tokenizer import stdlib_tokenizer

# Bounded strings, arrays and numbers, so that a random model finishes well within the token limit.
NAME = {"type": "string", "maxLength": 12}
SCHEMAS = [
    {"type": "object", "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 150}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {
        "unit": {"enum": ["celsius", "fahrenheit", "kelvin"]},
        "readings": {"type": "array", "items": {"type": "number", "minimum": -50, "maximum": 50},
                     "minItems": 1, "maxItems": 4},
        "ok": {"type": "boolean"}},
     "required": ["unit", "readings", "ok"], "additionalProperties": False},
    {"type": "object", "properties": {
        "owner": {"type": "object", "properties": {"name": NAME, "tags": {"type": "array", "items": NAME,
                                                                          "maxItems": 3}},
                  "required": ["name"], "additionalProperties": False},
        "kind": {"enum": ["a", "b"]}, "note": {"anyOf": [NAME, {"type": "null"}]}},
     "required": ["owner", "kind"], "additionalProperties": False},
]
MAX_TOKENS = 160


@pytest.fixture(scope="module")
def setup():
    tokenizer = stdlib_tokenizer(256)
    model = randomized(tiny().replace(vocab_size=tokenizer.vocab_size + 7))  # ids the tokenizer lacks: never allowed
    return tokenizer, model, GrammarCompiler(tokenizer, model.config.vocab_size)


def constrained(compiler: GrammarCompiler, schema: dict, seed: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=MAX_TOKENS, temperature=1.0, seed=seed,
                          grammar=compiler.json_schema(schema))


def run(engine: Engine, jobs: list[tuple[list[int], list[SamplingParams]]]) -> dict[int, tuple[list[int], str]]:
    """Submit every job (a prompt and the params of its copies) at once; ids -> (tokens, finish reason)."""
    out: dict[int, tuple[list[int], str]] = {}
    for rid in [rid for prompt, params in jobs for rid in engine.add_copies(prompt, params)]:
        out[rid] = ([], None)
    while engine.has_work():
        for o in engine.step():
            out[o.request_id] = (out[o.request_id][0] + o.new_tokens, o.finish_reason)
    return out


def valid(tokenizer, tokens: list[int], schema: dict) -> None:
    value = json.loads(tokenizer.decode(tokens))
    jsonschema.validate(value, schema)


def test_json_schema_outputs_validate_in_a_mixed_batch(setup):
    tokenizer, model, compiler = setup
    engine = Engine(model, EngineConfig(max_running=16, cache_tokens=8192))
    prompt = tokenizer.encode("Reply in JSON: ")
    cases = [(schema, seed) for seed in range(3) for schema in SCHEMAS]
    jobs = [(prompt, [constrained(compiler, schema, seed)]) for schema, seed in cases]
    free = SamplingParams(max_new_tokens=24, temperature=1.0, seed=99)
    results = list(run(engine, [*jobs[:2], (prompt, [free]), *jobs[2:]]).values())
    free_tokens, free_reason = results.pop(2)
    assert len(free_tokens) == 24 or free_reason == "stop"
    for (tokens, reason), (schema, _) in zip(results, cases, strict=True):
        assert reason == "stop", tokenizer.decode(tokens)
        valid(tokenizer, tokens, schema)


def test_each_copy_has_its_own_matcher(setup):
    tokenizer, model, compiler = setup
    engine = Engine(model, EngineConfig(max_running=8, cache_tokens=4096))
    params = [constrained(compiler, SCHEMAS[1], seed) for seed in range(4)]
    results = run(engine, [(tokenizer.encode("{"), params)])
    texts = [tokenizer.decode(tokens) for tokens, _ in results.values()]
    for (tokens, reason) in results.values():
        assert reason == "stop"
        valid(tokenizer, tokens, SCHEMAS[1])
    assert len(set(texts)) > 1  # different seeds, independent matchers


def test_constrained_requests_decode_without_drafts_under_speculation(setup):
    tokenizer, model, compiler = setup
    engine = Engine(model, EngineConfig(max_running=8, cache_tokens=4096, speculative=2))
    free = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)
    results = run(engine, [(tokenizer.encode("x = "), [constrained(compiler, SCHEMAS[0], 5)]),
                           (tokenizer.encode("y = "), [free])])
    [(tokens, reason), (free_tokens, _)] = results.values()
    assert reason == "stop"
    valid(tokenizer, tokens, SCHEMAS[0])
    assert len(free_tokens) == 12 and engine.stats.drafts.rounds > 0  # the free row still speculated


def test_without_the_mask_outputs_do_not_parse(setup, monkeypatch):
    """The same requests with mask_rows switched off: a random model does not write valid JSON (its matcher
    fails on the first token the grammar refuses, and the request ends there)."""
    import longcat_flash.infer.engine as engine_module

    tokenizer, model, compiler = setup
    monkeypatch.setattr(engine_module, "mask_rows", lambda logits, masks: logits)
    engine = Engine(model, EngineConfig(max_running=8, cache_tokens=4096))
    results = run(engine, [(tokenizer.encode("{"), [constrained(compiler, SCHEMAS[0], seed)]) for seed in range(3)])
    for tokens, _ in results.values():
        with pytest.raises((ValueError, jsonschema.ValidationError)):
            valid(tokenizer, tokens, SCHEMAS[0])


@pytest.mark.parametrize("value", ["</s>", "a <s>b</s> c", "<longcat_tool_call>", "x</longcat_tool_call>"])
def test_forced_text_holding_a_special_tokens_text_is_written_as_text(setup, value):
    """A const holding an added token's text (the EOS's, the BOS's, a tool-call tag's) is written in ordinary
    tokens: not as the EOS, which ended the output there, nor as an id the grammar then refused."""
    tokenizer, model, compiler = setup
    schema = {"type": "object", "properties": {"tag": {"const": value}, "note": NAME}, "required": ["tag", "note"],
              "additionalProperties": False}
    engine = Engine(model, EngineConfig(max_running=4, cache_tokens=4096))
    results = run(engine, [(tokenizer.encode("{"), [constrained(compiler, schema, seed) for seed in range(2)])])
    for tokens, reason in results.values():
        assert reason == "stop", tokenizer.decode(tokens, skip_special_tokens=False)
        valid(tokenizer, tokens, schema)


@pytest.mark.parametrize("value", ["hello world", "a <s>b</s> c"])
def test_forced_text_under_a_sentencepiece_vocabulary(value):
    """Forced text spelled through the tokenizer itself would carry its prefix space, which the grammar refuses."""
    tokenizer = sentencepiece_tokenizer()
    model = randomized(tiny().replace(vocab_size=tokenizer.vocab_size))
    compiler = GrammarCompiler(tokenizer, model.config.vocab_size)
    schema = {"type": "object", "properties": {"tag": {"const": value}, "n": {"type": "integer", "minimum": 0,
                                                                           "maximum": 9}},
              "required": ["tag", "n"], "additionalProperties": False}
    engine = Engine(model, EngineConfig(max_running=2, cache_tokens=2048))
    [(tokens, reason)] = run(engine, [(tokenizer.encode("x"), [constrained(compiler, schema, 0)])]).values()
    assert reason == "stop", tokenizer.decode(tokens, skip_special_tokens=False)
    valid(tokenizer, tokens, schema)


def test_an_eos_where_the_grammar_does_not_accept_is_an_error_not_a_stop(setup, monkeypatch):
    """Were an EOS ever sampled before the grammar completes (here: the mask switched off, the EOS biased up), the
    request ends as a failed grammar, not as a complete structured output."""
    import longcat_flash.infer.engine as engine_module

    tokenizer, model, compiler = setup
    monkeypatch.setattr(engine_module, "mask_rows", lambda logits, masks: logits)
    engine = Engine(model, EngineConfig())
    params = SamplingParams(max_new_tokens=8, temperature=0.0, logit_bias=((tokenizer.eos_id, 100.0),),
                            grammar=compiler.json_schema(SCHEMAS[0]))
    [(tokens, reason)] = run(engine, [(tokenizer.encode("{"), [params])]).values()
    assert tokens == [tokenizer.eos_id] and reason == "error"


def test_logprobs_report_the_raw_distribution(setup):
    """The mask shapes what is sampled, not what is reported: logprobs are the model's own."""
    tokenizer, model, compiler = setup
    engine = Engine(model, EngineConfig(max_running=2, cache_tokens=2048))
    params = SamplingParams(max_new_tokens=MAX_TOKENS, temperature=0.0, logprobs=3,
                            grammar=compiler.json_schema(SCHEMAS[0]))
    rid = engine.add_request(tokenizer.encode("Hi"), params)
    scores = []
    while engine.has_work():
        scores += [lp for o in engine.step() if o.request_id == rid for lp in o.logprobs or []]
    assert any(score.top[0][0] != score.token for score in scores)  # the raw argmax was masked away somewhere


def test_a_schema_the_library_cannot_compile_is_a_grammar_error(setup):
    _, _, compiler = setup
    with pytest.raises(GrammarError, match="nope"):
        compiler.json_schema({"type": "object", "properties": {"a": {"$ref": "#/nope"}}})
    with pytest.raises(GrammarError, match="characters"):
        compiler.json_schema({"enum": ["x" * 300_000]})


def test_compiled_grammars_are_cached_and_bounded(setup):
    tokenizer, model, _ = setup
    compiler = GrammarCompiler(tokenizer, model.config.vocab_size, cache_size=2)
    first = compiler.json_schema(SCHEMAS[0])
    assert compiler.json_schema(SCHEMAS[0]) is first
    compiler.json_schema(SCHEMAS[1]), compiler.json_schema(SCHEMAS[2])
    assert compiler.json_schema(SCHEMAS[0]) is not first and first == compiler.json_schema(SCHEMAS[0])
    assert hash(SamplingParams(grammar=first)) == hash(SamplingParams(grammar=compiler.json_schema(SCHEMAS[0])))


def test_a_compile_that_starts_late_behind_others_has_the_whole_limit(setup, monkeypatch):
    """The limit ran from the request, not from its compile's start: a 0.3 s grammar that waited 0.3 s for a worker
    behind a slow one failed as "took longer than" the limit, a 400 blaming its schema."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    from longcat_flash.infer.grammar import GrammarTimeout

    tokenizer, model, _ = setup
    compiler = GrammarCompiler(tokenizer, model.config.vocab_size, compile_timeout_s=0.5)
    cost = {'start: "a"\n': 0.3, 'start: "b"\n': 3.0, 'start: "c"\n': 0.3}
    monkeypatch.setattr(compiler, "_build", lambda lark: time.sleep(cost[lark]))
    with ThreadPoolExecutor(3) as clients:
        results = []
        for lark in cost:  # a and b take the two workers; c waits for a's
            results.append(clients.submit(compiler.compile, lark))
            time.sleep(0.02)
        assert results[0].result().lark == 'start: "a"\n' and results[2].result().lark == 'start: "c"\n'
        with pytest.raises(GrammarTimeout):
            results[1].result()


def test_a_compile_that_timed_out_while_queued_never_runs(setup, monkeypatch):
    """Two slow grammars hold both compile workers: a third, timed out while it waited, still ran when a worker
    came free, so a burst of slow schemas kept every later request waiting behind compiles nobody wanted."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    from longcat_flash.infer.grammar import GrammarBusy, GrammarTimeout

    tokenizer, model, _ = setup
    compiler = GrammarCompiler(tokenizer, model.config.vocab_size, compile_timeout_s=0.2)
    ran = []
    monkeypatch.setattr(compiler, "_build", lambda lark: ran.append(lark) or time.sleep(0.6))
    grammars = [f'start: "{word}"\n' for word in ("a", "b", "c")]

    def compile_one(lark: str, error: type, says: str) -> None:
        with pytest.raises(error, match=says):
            compiler.compile(lark)

    with ThreadPoolExecutor(3) as clients:
        requests = []
        for lark, error, says in zip(grammars, (GrammarTimeout, GrammarTimeout, GrammarBusy),
                                     ("took longer than 0.2 s",) * 2 + ("waited 0.2 s for a compile worker",)):
            requests.append(clients.submit(compile_one, lark, error, says))  # two take the workers, the third queues
            time.sleep(0.05)
        for request in requests:
            request.result()
    time.sleep(1.0)  # both workers free again
    assert ran == grammars[:2]


@pytest.mark.parametrize("schema, match", [
    ({"type": "integer", "minimum": 10**19, "maximum": 10**19 + 5}, "2\\^53"),  # the library clamped it to 2^63 - 1
    ({"type": "object", "properties": {"n": {"type": "integer", "maximum": -(2**60)}}}, "2\\^53"),
    ({"type": "number", "exclusiveMinimum": 0, "maximum": 0.5}, "exclusiveMinimum=0"),  # it admitted 0
    ({"items": {"type": "number", "minimum": -2.5, "exclusiveMaximum": -2}}, "exclusiveMaximum=-2"),  # and -2
])
def test_numeric_bounds_the_library_would_not_honour_are_refused(setup, schema, match):
    _, _, compiler = setup
    with pytest.raises(GrammarError, match=match):
        compiler.json_schema(schema)


FREE_KEYS = {"type": "object", "additionalProperties": {"type": "integer"}}


@pytest.mark.parametrize("schema, match", [
    ({**FREE_KEYS, "minProperties": 2}, "minProperties=2"),  # the library met it with {"": 0, "": 3}: one key
    ({"type": "object", "patternProperties": {"^a": {"type": "null"}}, "minProperties": 1}, "minProperties=1"),
    ({"type": "object", "properties": {"a": {"type": "null"}}, "required": ["a"], "minProperties": 2},
     "minProperties=2"),
    ({"type": "integer", "minimun": 3, "maximum": 5}, "'minimun' \\(did you mean 'minimum'"),  # it wrote -14939962018
    ({"type": "object", "properties": {"s": {"type": "string", "maxLenght": 4}}}, "did you mean 'maxLength'"),
    ({"type": "array", "items": [{"enum": [1]}], "prefixItems": [{"requried": []}]}, "did you mean 'required'"),
    ({"$defs": {"d": {"types": "string"}}, "$ref": "#/$defs/d"}, "did you mean 'type'"),
    # case and snake_case (pydantic's field names) were too far from the keywords for the closeness check
    ({"type": "string", "Enum": ["yes", "no"]}, "'Enum' \\(did you mean 'enum'"),
    ({"type": "string", "max_length": 3}, "did you mean 'maxLength'"),
    ({"type": "array", "min_items": 3}, "did you mean 'minItems'"),
    ({"Type": "string"}, "did you mean 'type'"),
    # beyond 2^32 - 1 the library failed with a regex parse error, beyond 2^64 "expected positive integer"
    ({"type": "string", "maxLength": 10**12}, "maxLength=1000000000000 is more than this server supports"),
    ({"type": "array", "minItems": 2**70}, "minItems=1180591620717411303424 is more than"),
    # pydantic's Json[int]: the library took it as any string, so `.parse()` failed on a reply that was "complete"
    ({"type": "string", "contentMediaType": "application/json", "contentSchema": {"type": "integer"}},
     "a string holding JSON \\(contentMediaType / contentSchema"),
    ({"type": "string", "contentMediaType": "application/geo+json"}, "a string holding JSON"),
    ({"type": "object", "properties": {"b": {"type": "string", "contentEncoding": "base64"}}},
     "contentEncoding is not supported: the string would not be checked to be in that encoding"),
    # the library's own words were "NoExtensionBias"
    ({"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"allOf": [{"type": "object"}, {"$ref": "#/$defs/a"}]}},
      "$ref": "#/$defs/a"}, r"the \$ref #/\$defs/a -> #/\$defs/b -> #/\$defs/a comes back to where it started"),
    ({"type": "object", "properties": {"x": {"$ref": "#/properties/x"}}}, "#/properties/x -> #/properties/x"),
])
def test_what_the_library_would_silently_loosen_is_refused(setup, schema, match):
    _, _, compiler = setup
    with pytest.raises(GrammarError, match=match):
        compiler.json_schema(schema)


def test_named_keys_and_unknown_annotations_compile(setup):
    """minProperties met by required, named keys; property names, data and annotations that are not keywords."""
    _, _, compiler = setup
    for schema in ({"type": "object", "properties": {"a": {"type": "null"}, "b": {"type": "null"}},
                    "required": ["a", "b"], "minProperties": 2},
                   {**FREE_KEYS, "additionalProperties": False, "minProperties": 0},
                   {"type": "string", "Title": "x", "read_only": True},  # annotations, however spelt
                   {"type": "object", "properties": {"minimun": {"type": "string", "example": "x", "nullable": True},
                                                     "types": {"enum": [{"maxLenght": 1}]}},
                    "x-order": 1, "contentType": "text/plain"}):
        compiler.json_schema(schema)


def test_a_long_chain_of_refs_is_checked_in_linear_time():
    """The cycle check searched its path as a list: 40,000 chained $refs took 24 s."""
    import time

    chain = {"$defs": {**{f"d{i}": {"$ref": f"#/$defs/d{i + 1}"} for i in range(40_000)}, "d40000": {"type": "null"}},
             "$ref": "#/$defs/d0"}
    start = time.perf_counter()
    check_schema(chain)
    assert time.perf_counter() - start < 10  # ~1.5 s here; the quadratic search took 24
    chain["$defs"]["d40000"] = {"allOf": [{"$ref": "#/$defs/d0"}]}
    with pytest.raises(GrammarError, match=r"the \$ref #/\$defs/d0 -> #/\$defs/d1 -> "):
        check_schema(chain)


def test_recursion_through_values_and_a_no_op_unique_items_compile(setup):
    """A $ref back to an enclosing schema from inside a value (a tree) is recursion, not a cycle; pydantic's
    `uniqueItems: false` constrains nothing and was refused as unimplemented."""
    tree = {"$defs": {"node": {"type": "object", "properties": {"kids": {"type": "array", "uniqueItems": False,
                                                                         "items": {"$ref": "#/$defs/node"}}},
                               "required": ["kids"], "additionalProperties": False}}, "$ref": "#/$defs/node"}
    assert admits(setup, tree, '{"kids": [{"kids": []}, {"kids": []}]}') and not admits(setup, tree, '{"kids": 1}')
    assert admits(setup, {"anyOf": [{"$ref": "#"}, {"type": "null"}]}, "null")
    assert admits(setup, {"type": "string", "$defs": {"a": {"$ref": "#/$defs/a"}}}, '"x"')  # a definition unused
    assert admits(setup, {"$defs": {"a": {"$ref": "#/$defs/a", "nullable": True}}, "$ref": "#/$defs/a"}, "null")
    assert admits(setup, {"type": "string", "contentMediaType": "text/plain"}, '"x"')  # an annotation alone
    with pytest.raises(GrammarError, match="uniqueItems"):  # true is not met by a grammar: still refused
        compiler = setup[2]
        compiler.json_schema({"type": "array", "uniqueItems": True})


def admits(setup, schema: dict, text: str) -> bool:
    """Whether the grammar of `schema` lets a request write `text` and then end (the value complete, or EOS
    allowed)."""
    import torch

    tokenizer, model, compiler = setup
    matcher, mask = compiler.json_schema(schema).matcher(), torch.zeros((model.config.vocab_size + 31) // 32,
                                                                         dtype=torch.int32)

    def allowed(token: int) -> bool:
        matcher.fill(mask)
        return bool(int(mask[token // 32]) >> (token % 32) & 1)
    for token in tokenizer.encode(text):
        if not allowed(token):
            return False
        matcher.advance(token)
    return matcher.done or allowed(tokenizer.eos_id)


def test_openapis_nullable_and_oneof_read_as_vllm_reads_them(setup):
    """`nullable: true` (OpenAPI 3.0, which schemas converted for OpenAPI or Gemini use) was accepted and constrained
    nothing, so null was never allowed; `oneOf` whose branches are not plainly disjoint was a 400."""
    short = {"type": "string", "maxLength": 3}
    assert admits(setup, {**short, "nullable": True}, "null") and admits(setup, {**short, "nullable": True}, '"ab"')
    assert not admits(setup, short, "null") and not admits(setup, {**short, "nullable": False}, "null")
    assert admits(setup, {"anyOf": [{"type": "integer"}], "nullable": True}, "null")  # no type: a choice of null
    assert not admits(setup, {"enum": ["a"], "nullable": True}, "null")  # OpenAPI 3.0.3: null only if enumerated
    nested = {"type": "object", "properties": {"a": {"type": "integer", "nullable": True}}, "required": ["a"],
              "additionalProperties": False}
    assert admits(setup, nested, '{"a": null}') and admits(setup, nested, '{"a": 7}')
    overlapping = {"oneOf": [{"type": "integer"}, {"type": "number", "maximum": 5}], "anyOf": [{"type": "number"}]}
    assert admits(setup, overlapping, "3") and admits(setup, overlapping, "4.5") and not admits(setup, overlapping,
                                                                                               '"x"')


def test_numeric_bounds_the_library_honours_compile(setup):
    _, _, compiler = setup
    for schema in ({"type": "integer", "minimum": -(2**53), "maximum": 2**53},
                   {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
                   {"type": "number", "exclusiveMinimum": -1, "maximum": -0.5},
                   {"type": "object", "properties": {"maximum": {"type": "string"}}}):
        compiler.json_schema(schema)


def test_a_grammar_error_names_the_problem_without_quoting_the_schema(setup):
    _, _, compiler = setup
    described = {f"p{i}": {"type": "string", "description": "x" * 200} for i in range(20)}
    with pytest.raises(GrammarError) as err:
        compiler.json_schema({"type": "object", "properties": {**described, "bad": {"not": {"type": "string"}}}})
    assert "not" in str(err.value) and len(str(err.value)) < 200 and "x-guidance" not in str(err.value)


def test_a_matcher_that_fails_mid_output_ends_its_request_as_an_error(setup):
    """A schema whose value can never end runs into the parser's item limit at its first token: the request ends
    with finish reason "error" and the library's reason; the batch goes on."""
    tokenizer, model, compiler = setup
    endless = compiler.json_schema({"type": "array", "items": {"$ref": "#"}, "minItems": 1})
    engine = Engine(model, EngineConfig())
    failing = engine.add_request(tokenizer.encode("hi"), SamplingParams(max_new_tokens=20, temperature=1.0, seed=0,
                                                                        grammar=endless))
    plain = engine.add_request(tokenizer.encode("hi"), SamplingParams(max_new_tokens=20, ignore_eos=True))
    ends = {}
    while engine.has_work():
        ends.update((o.request_id, o) for o in engine.step() if o.finished)
    assert ends[failing].finish_reason == "error" and "limit" in ends[failing].error
    assert ends[plain].finish_reason == "length" and ends[plain].error is None
