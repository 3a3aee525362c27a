"""Tokenizer: exact round-trips, fixed special ids, HF checkpoint compatibility, chat template, clear errors."""
from __future__ import annotations

import json
import re

import pytest

from longcat_flash.tokenizer import (DEFAULT_CHAT_TEMPLATE, STDLIB_MIN_VOCAB, TOOL_CALL_CLOSE, TOOL_CALL_OPEN,
                                     Tokenizer, stdlib_tokenizer, train_tokenizer)

CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "class Point:\n    x: int = 0\n    y: int = 0\n",
    "Héllo wörld, ça va? Привет мир. 你好，世界。 🙂🚀",
    "import os\nprint(os.path.join('a', 'b'))\n",
] * 20

ROUND_TRIP = [
    "",
    "plain ascii text",
    "  leading and trailing spaces \t\n\n",
    "naïve café — “quotes” ½ ∑ 你好 🙂 🏳️‍🌈 e\u0301",
    "\x00\x01 control \x7f and \uffff \U0010ffff",
    "html </s> and <s> and <pad> stay text",
    "def f():\n\treturn {'k': [1, 2, 3]}\n",
]

CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "2+2?"},
]

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city (°C).",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                     "required": ["city"]}}},
    {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}},
]
CALLS = [{"id": "call_1", "type": "function",
          "function": {"name": "get_weather", "arguments": '{"city": "Zürich <b>"}'}},
         {"id": "call_2", "type": "function", "function": {"name": "now", "arguments": {}}}]  # the HF dict form
TOOL_CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Weather in Zürich, and the time?"},
    {"role": "assistant", "content": None, "tool_calls": CALLS},
    {"role": "tool", "tool_call_id": "call_1", "content": "12 °C"},
    {"role": "tool", "tool_call_id": "call_2", "content": "09:00"},
    {"role": "assistant", "content": "12 °C at 09:00."},
    {"role": "user", "content": "Thanks"},
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer(CORPUS, vocab_size=400)


def test_special_ids_are_pad_bos_eos(tok: Tokenizer) -> None:
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert 256 + 5 <= tok.vocab_size <= 400


def test_tool_call_tags_are_single_tokens_that_decoding_keeps(tok: Tokenizer) -> None:
    call = f'{TOOL_CALL_OPEN}{{"name": "f", "arguments": {{}}}}{TOOL_CALL_CLOSE}'
    ids = tok.encode(f"{call}</s>", allow_special=True)
    assert ids[0] == 3 and ids[-2:] == [4, tok.eos_id]
    assert tok.decode(ids) == call  # eos is dropped, the tags are not: the server parses them


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip_is_exact(tok: Tokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text)) == text


def test_special_token_text_is_plain_unless_allowed(tok: Tokenizer) -> None:
    assert tok.eos_id not in tok.encode("a</s>b")
    assert tok.encode("</s>", allow_special=True) == [tok.eos_id]
    assert tok.decode([tok.bos_id, *tok.encode("x"), tok.eos_id]) == "x"
    assert tok.decode([tok.bos_id, *tok.encode("x")], skip_special_tokens=False) == "<s>x"


def test_encode_batch_matches_encode(tok: Tokenizer) -> None:
    assert tok.encode_batch(ROUND_TRIP) == [tok.encode(t) for t in ROUND_TRIP]


def test_training_merges_frequent_text(tok: Tokenizer) -> None:
    text = "def add(a, b):\n    return a + b\n"
    assert len(tok.encode(text)) < len(text.encode("utf-8")) / 2


@pytest.mark.parametrize("vocab_size", [100, 258, 0, True, 300.0])
def test_bad_vocab_size_names_the_field(vocab_size: object) -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(CORPUS, vocab_size=vocab_size)  # type: ignore[arg-type]


@pytest.mark.parametrize("specials", [("<pad>", "<s>"), ("<pad>", "<s>", "<s>"), ("<pad>", "", "</s>")])
def test_bad_special_tokens(specials: tuple[str, ...]) -> None:
    with pytest.raises(ValueError, match="special_tokens"):
        train_tokenizer(CORPUS, vocab_size=400, special_tokens=specials)


def test_extra_special_tokens_follow_the_first_three() -> None:
    tok = train_tokenizer(CORPUS, vocab_size=400, special_tokens=("<pad>", "<s>", "</s>", "<tool>"))
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.encode(f"<tool>{TOOL_CALL_OPEN}{TOOL_CALL_CLOSE}", allow_special=True) == [3, 4, 5]


def test_save_load_round_trip(tmp_path) -> None:
    tok = train_tokenizer(CORPUS, vocab_size=400)
    tok.model_max_length = 2048
    out = tok.save(tmp_path / "ckpt")
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["bos_token"] == "<s>" and config["eos_token"] == "</s>" and config["pad_token"] == "<pad>"
    assert config["model_max_length"] == 2048 and config["chat_template"] == DEFAULT_CHAT_TEMPLATE
    for path in (out, out / "tokenizer.json"):
        loaded = Tokenizer.load(path)
        assert loaded.encode_batch(ROUND_TRIP) == tok.encode_batch(ROUND_TRIP)
        assert (loaded.pad_id, loaded.bos_id, loaded.eos_id, loaded.vocab_size) == (0, 1, 2, tok.vocab_size)
        assert loaded.model_max_length == 2048 and loaded.fingerprint == tok.fingerprint


def test_a_saved_copy_keeps_the_config_keys_it_does_not_read(tmp_path) -> None:
    """A tokenizer from another tool, saved again (by `longcat sft`): its unk token and other keys were dropped, so
    transformers loaded it with unk_token None."""
    from transformers import AutoTokenizer

    train_tokenizer(CORPUS, vocab_size=400).save(tmp_path / "src")
    config = json.loads((tmp_path / "src" / "tokenizer_config.json").read_text())
    extra = {"unk_token": "<pad>", "padding_side": "left", "added_tokens_decoder": {"0": {"content": "stale"}}}
    (tmp_path / "src" / "tokenizer_config.json").write_text(json.dumps({**config, **extra}))
    Tokenizer.load(tmp_path / "src").with_tokens(["<longcat_tool_call>"]).save(tmp_path / "copy")
    saved = json.loads((tmp_path / "copy" / "tokenizer_config.json").read_text())
    assert saved["unk_token"] == "<pad>" and saved["padding_side"] == "left" and "added_tokens_decoder" not in saved
    hf = AutoTokenizer.from_pretrained(tmp_path / "copy")
    assert hf.unk_token == "<pad>" and hf.padding_side == "left"


def test_load_missing_file_names_the_path(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="nope"):
        Tokenizer.load(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.load(tmp_path)


def test_load_without_config_guesses_special_tokens(tmp_path) -> None:
    tok = train_tokenizer(CORPUS, vocab_size=300, special_tokens=("[PAD]", "<bos>", "<eos>"))
    tok.save(tmp_path)
    (tmp_path / "tokenizer_config.json").unlink()
    loaded = Tokenizer.load(tmp_path / "tokenizer.json")
    assert (loaded.pad_token, loaded.bos_token, loaded.eos_token) == ("[PAD]", "<bos>", "<eos>")
    assert loaded.chat_template == DEFAULT_CHAT_TEMPLATE


def test_load_without_known_special_tokens_gives_none(tmp_path) -> None:
    train_tokenizer(CORPUS, vocab_size=300, special_tokens=("[A]", "[B]", "[C]")).save(tmp_path)
    (tmp_path / "tokenizer_config.json").unlink()
    loaded = Tokenizer.load(tmp_path)
    assert (loaded.pad_id, loaded.bos_id, loaded.eos_id) == (None, None, None)
    with pytest.raises(ValueError, match="eos_token"):
        loaded.apply_chat_template(CHAT)


def test_config_token_missing_from_vocab_is_an_error(tok: Tokenizer, tmp_path) -> None:
    tok.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["eos_token"] = {"content": "<|im_end|>", "special": True}  # HF AddedToken form
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=re.escape("eos_token='<|im_end|>'")):
        Tokenizer.load(tmp_path)


def test_fingerprint_tells_tokenizers_apart(tok: Tokenizer) -> None:
    other = train_tokenizer(CORPUS, vocab_size=300)
    assert len(tok.fingerprint) == 64 and other.fingerprint != tok.fingerprint


# ---- chat template ----

def test_default_chat_format(tok: Tokenizer) -> None:
    assert tok.apply_chat_template(CHAT) == (
        "SYSTEM:You are terse. [Round 0] USER:Hi ASSISTANT:Hello.</s>[Round 1] USER:2+2? ASSISTANT:")
    assert tok.apply_chat_template(CHAT[1:3], add_generation_prompt=False) == "[Round 0] USER:Hi ASSISTANT:Hello.</s>"


def test_chat_prompt_encodes_eos_as_special(tok: Tokenizer) -> None:
    ids = tok.encode(tok.apply_chat_template(CHAT), allow_special=True)
    assert ids.count(tok.eos_id) == 1


def test_tools_calls_and_results_render_in_the_round_format(tok: Tokenizer) -> None:
    prompt = tok.apply_chat_template(TOOL_CHAT, tools=TOOLS)
    system, rounds = prompt.split(" [Round 0] ")
    assert system.startswith("SYSTEM:You are terse.\n\n# Tools\n") and "<longcat_tools>" in system
    assert '{"name": "get_weather", "description": "Current weather in a city (°C).", "parameters": ' in system
    assert rounds == (
        'USER:Weather in Zürich, and the time? ASSISTANT:'
        '<longcat_tool_call>{"name": "get_weather", "arguments": {"city": "Zürich <b>"}}</longcat_tool_call>'
        '<longcat_tool_call>{"name": "now", "arguments": {}}</longcat_tool_call></s>'
        '[Round 1] USER:<longcat_tool_response>12 °C</longcat_tool_response>'
        '<longcat_tool_response>09:00</longcat_tool_response> ASSISTANT:12 °C at 09:00.</s>'
        '[Round 2] USER:Thanks ASSISTANT:')
    assert tok.apply_chat_template(TOOL_CHAT[1:2], tools=TOOLS).startswith("SYSTEM:# Tools\n")
    assert tok.apply_chat_template(TOOL_CHAT[:2], tools=[]) == tok.apply_chat_template(TOOL_CHAT[:2])


def test_custom_template_from_config_is_used(tok: Tokenizer, tmp_path) -> None:
    tok.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    loaded = Tokenizer.load(tmp_path)
    assert loaded.apply_chat_template(CHAT[1:2]) == "<user>Hi</s><assistant>"


def test_template_file_and_named_templates(tok: Tokenizer, tmp_path) -> None:
    tok.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert Tokenizer.load(tmp_path).apply_chat_template(CHAT) == "D"
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")  # transformers >= 4.50 layout
    assert Tokenizer.load(tmp_path).apply_chat_template(CHAT) == "You are terse."


@pytest.mark.parametrize("messages, match", [
    ([], "non-empty"),
    ("hello", "non-empty"),
    (["hi"], r"messages\[0\] must be a dict"),
    ([{"role": "robot", "content": "x"}], r"messages\[0\]\['role'\]"),
    ([{"role": "user", "content": None}], r"messages\[0\]\['content'\]"),
    ([{"role": "user", "content": 3}], r"messages\[0\]\['content'\]"),
    ([{"role": "user"}], r"messages\[0\]\['content'\]"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], r"messages\[1\] is a system"),
    ([{"role": "user", "content": "a"}, {"role": "developer", "content": "b"}], r"messages\[1\] is a developer"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "assistant", "content": "c"}],
     r"messages\[2\] is an assistant message right after another"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], r"messages\[0\]\['content'\]"),
])
def test_bad_messages_are_rejected(tok: Tokenizer, messages, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        tok.apply_chat_template(messages)


@pytest.mark.parametrize("tools, match", [
    ("get_weather", "tools must be a list"),  # rendered as one tool per character
    ({"a": 1}, "tools must be a list"),  # rendered as the tool "a"
    ([123], r"tools\[0\] must be a tool definition"),
    ([{"type": "function", "function": {"name": "f"}}, None], r"tools\[1\] must be a tool definition"),
])
def test_bad_tools_are_rejected(tok: Tokenizer, tools, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        tok.apply_chat_template([{"role": "user", "content": "hi"}], tools=tools)


def test_encode_and_decode_name_a_wrong_argument(tok: Tokenizer) -> None:
    """encode(None) was an AttributeError from inside, decode([-1]) an OverflowError, decode([69.9]) id 69."""
    for text in (None, b"abc", 5):
        with pytest.raises(TypeError, match="the text must be a str"):
            tok.encode(text)
    for not_ids in ([69.9], [True, False]):  # 69.9 read as 69, True as 1
        with pytest.raises(TypeError, match="decode takes token ids"):
            tok.decode(not_ids)
    with pytest.raises(ValueError, match="token ids are >= 0, got -1"):
        tok.decode([5, -1])
    import numpy as np
    import torch

    ids = tok.encode("hello world")
    assert tok.decode(torch.tensor(ids)) == tok.decode(np.array(ids)) == tok.decode(ids) == "hello world"
    # encode_batch("abc") encoded each character as a text, and a bad text was the library's TypeError, unnamed
    with pytest.raises(TypeError, match="encode_batch takes a list of texts"):
        tok.encode_batch("abc")
    for bad, error, says in ((None, TypeError, "the text must be a str"), (b"b", TypeError, "the text must be a str"),
                             ("a\ud800", ValueError, "the text is not valid UTF-8")):
        with pytest.raises(error, match=f"texts\\[1\\]: {says}"):
            tok.encode_batch(["a", bad])


# ---- transformers can read what we save ----

@pytest.mark.hf
def test_transformers_reads_tokenizer_file_with_same_ids(tok: Tokenizer, tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    for text in ROUND_TRIP:
        if "<" in text:  # transformers parses special-token text; ours does only with allow_special
            assert hf.encode(text, add_special_tokens=False) == tok.encode(text, allow_special=True)
        else:
            assert hf.encode(text) == tok.encode(text)
            assert hf.decode(tok.encode(text)) == text


@pytest.mark.hf
def test_auto_tokenizer_reads_checkpoint_dir(tok: Tokenizer, tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id) == (0, 1, 2)
    assert hf.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True) == tok.apply_chat_template(CHAT)
    hf.save_pretrained(str(tmp_path / "resaved"))  # transformers' own layout loads back into ours
    resaved = Tokenizer.load(tmp_path / "resaved")
    assert resaved.apply_chat_template(CHAT) == tok.apply_chat_template(CHAT)
    assert resaved.apply_chat_template(TOOL_CHAT, tools=TOOLS) == tok.apply_chat_template(TOOL_CHAT, tools=TOOLS)
    assert resaved.encode_batch(ROUND_TRIP) == tok.encode_batch(ROUND_TRIP) and resaved.eos_id == 2


@pytest.mark.hf
def test_named_templates_in_transformers_5s_files_are_read_and_written_back(tok: Tokenizer, tmp_path) -> None:
    """transformers 5 saves named templates as chat_template.jinja and additional_chat_templates/<name>.jinja: the
    tool_use one was not read (a request with tools rendered with the default template), and saving dropped it."""
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path / "ours")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "ours"))
    hf.chat_template = {"default": "D{{ messages[0]['content'] }}", "tool_use": "T{{ tools | length }}",
                        "rag": "R{{ documents | length }}"}
    hf.save_pretrained(str(tmp_path / "hf"))
    assert (tmp_path / "hf" / "additional_chat_templates" / "tool_use.jinja").is_file()
    loaded = Tokenizer.load(tmp_path / "hf")
    for messages, tools in ((CHAT, None), (TOOL_CHAT, TOOLS)):
        want = hf.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
        assert loaded.apply_chat_template(messages, tools=tools) == want
    loaded.save(tmp_path / "again")  # and back: transformers reads the same three templates from what we write
    assert transformers.AutoTokenizer.from_pretrained(str(tmp_path / "again")).chat_template == hf.chat_template
    (tmp_path / "hf" / "chat_template.jinja").unlink()
    with pytest.raises(ValueError, match=r"names \['rag', 'tool_use'\] but no 'default' template"):
        Tokenizer.load(tmp_path / "hf")


# What clients send besides the plain alternation: the `developer` role, content as text parts, several user
# messages in a row (joined), a user message after the tool results
EDGE_CHATS = [
    [{"role": "developer", "content": "Answer in French."}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}],
    [{"role": "user", "content": "Here is a file: a.txt"}, {"role": "user", "content": "Summarise it"}],
    [*TOOL_CHAT[:5], {"role": "user", "content": "and tomorrow?"}],
]


def test_edge_conversations_render_as_one_round_each(tok: Tokenizer) -> None:
    assert tok.apply_chat_template(EDGE_CHATS[0]) == "SYSTEM:Answer in French. [Round 0] USER:Hi ASSISTANT:"
    assert tok.apply_chat_template(EDGE_CHATS[1]) == "[Round 0] USER:Hi there ASSISTANT:"
    assert tok.apply_chat_template(EDGE_CHATS[2]) == "[Round 0] USER:Here is a file: a.txt\nSummarise it ASSISTANT:"
    assert tok.apply_chat_template(EDGE_CHATS[3], tools=TOOLS).endswith(
        "<longcat_tool_response>09:00</longcat_tool_response>\nand tomorrow? ASSISTANT:")


@pytest.mark.hf
@pytest.mark.parametrize("messages", [TOOL_CHAT, TOOL_CHAT[:3], TOOL_CHAT[1:5], CHAT, CHAT[1:2], *EDGE_CHATS])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("tools", [TOOLS, None])
def test_transformers_renders_our_template_identically(tok: Tokenizer, tmp_path, messages, add_generation_prompt,
                                                       tools) -> None:
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path)
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    theirs = hf.apply_chat_template(messages, tools=tools, tokenize=False,
                                    add_generation_prompt=add_generation_prompt)
    assert theirs == tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tools=tools)
    assert hf.encode(theirs, add_special_tokens=False) == tok.encode(theirs, allow_special=True)


def test_stdlib_tokenizer_needs_no_corpus_and_fits_a_tiny_vocabulary() -> None:
    tok = stdlib_tokenizer(256, model_max_length=128)  # the tiny preset asks for fewer ids than bytes + specials
    assert tok.vocab_size == STDLIB_MIN_VOCAB and tok.model_max_length == 128
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    text = "def main(argv):\n    return parse(argv)  # ünï 🙂"
    assert tok.decode(tok.encode(text)) == text and len(tok.encode(text)) < len(text.encode())


@pytest.mark.hf
@pytest.mark.parametrize("messages", [[{"role": "robot", "content": "x"}],
                                      [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}],
                                      [*CHAT[:3], {"role": "assistant", "content": "again"}]])
def test_transformers_refuses_what_our_template_cannot_render(tok: Tokenizer, tmp_path, messages) -> None:
    """The saved template raises where it once dropped a message silently (a late system prompt, a role it
    does not know), as our own rendering refuses them."""
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path)
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    with pytest.raises(Exception, match="system message|unknown role|two assistant messages"):
        hf.apply_chat_template(messages, tokenize=False)


@pytest.mark.hf
def test_transformers_assistant_mask_covers_the_assistant_turns(tok: Tokenizer, tmp_path) -> None:
    """`{% generation %}` marks what the assistant wrote (text, tool calls, end of turn): transformers'
    return_assistant_tokens_mask, and TRL's assistant-only loss, see what `longcat sft` trains on."""
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path)
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    out = hf.apply_chat_template(TOOL_CHAT[:6], tools=TOOLS, tokenize=True, return_dict=True,
                                 return_assistant_tokens_mask=True)
    masked = [i for i, keep in zip(out["input_ids"], out["assistant_masks"]) if keep]
    calls = "".join(f'{TOOL_CALL_OPEN}{{"name": "{c["function"]["name"]}", "arguments": '
                    f'{c["function"]["arguments"] if isinstance(c["function"]["arguments"], str) else "{}"}}}'
                    f'{TOOL_CALL_CLOSE}' for c in CALLS)
    assert tok.decode(masked, skip_special_tokens=False) == f"{calls}</s>12 °C at 09:00.</s>"


def test_a_template_that_fails_on_a_conversation_is_a_value_error_naming_it() -> None:
    """A model's own template that concatenates a null content (a tool-call turn), or raises on what it cannot
    render, was a TypeError / TemplateError traceback out of `longcat sft` and a 500 from the server."""
    backend = train_tokenizer(CORPUS, vocab_size=400).backend
    concat = Tokenizer(backend, chat_template="{% for m in messages %}{{ m['content'] + '\\n' }}{% endfor %}")
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [call]}]
    with pytest.raises(ValueError, match=r"the chat template fails on this conversation \(TypeError"):
        concat.apply_chat_template(messages)
    dividing = Tokenizer(backend, chat_template="{{ messages | length // (messages | length - 1) }}")
    with pytest.raises(ValueError, match=r"fails on this conversation \(ZeroDivisionError"):
        dividing.apply_chat_template(messages[:1])
    refusing = Tokenizer(backend, chat_template="{{ raise_exception('no tools here') }}")
    with pytest.raises(ValueError, match="the chat template refuses this conversation: no tools here"):
        refusing.apply_chat_template(messages[:1])
    undefined = Tokenizer(backend, chat_template="{{ messages[0]['content'] }}{{ not_a_variable.attr }}")
    with pytest.raises(ValueError, match=r"fails on this conversation \(UndefinedError: 'not_a_variable' is undef"):
        undefined.apply_chat_template(messages[:1])  # the template's own bug: no refusal of the conversation


def test_named_templates_render_tool_use_when_tools_are_given_as_transformers_does(tmp_path) -> None:
    """Hermes-style tokenizer_config.json holds [default, tool_use]; only `default` was read, so a conversation
    with tools rendered without them (and sft and serve refused the model), and a saved copy lost `tool_use`."""
    from transformers import AutoTokenizer

    train_tokenizer(CORPUS, vocab_size=400).save(tmp_path / "src")
    config = json.loads((tmp_path / "src" / "tokenizer_config.json").read_text())
    default = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    tool_use = "<tools>{{ tools | tojson }}</tools>\n" + default
    config["chat_template"] = [{"name": "default", "template": default}, {"name": "tool_use", "template": tool_use}]
    (tmp_path / "src" / "tokenizer_config.json").write_text(json.dumps(config))
    messages, tools = [{"role": "user", "content": "hi"}], [{"type": "function", "function": {"name": "wx"}}]
    Tokenizer.load(tmp_path / "src").save(tmp_path / "copy")
    for path in (tmp_path / "src", tmp_path / "copy"):
        ours, hf = Tokenizer.load(path), AutoTokenizer.from_pretrained(path)
        assert ours.apply_chat_template(messages, tools=tools).startswith("<tools>")
        assert ours.apply_chat_template(messages) == "user: hi\n"
        for given in (tools, None):
            assert ours.apply_chat_template(messages, tools=given) == hf.apply_chat_template(
                messages, tools=given, tokenize=False, add_generation_prompt=True)


QWEN_LIKE = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content or '' }}{% for c in m.tool_calls or [] %}"
             '<tool_call>{"name": {{ c.function.name | tojson }}, "arguments": {{ c.function.arguments | tojson }}}'
             "</tool_call>{% endfor %}\n{% endfor %}")
ITEMS_LIKE = ("{% for m in messages %}{{ m.content or '' }}{% for c in m.tool_calls or [] %}<call>"
              "{% for k, v in c.function.arguments | items %}<{{ k }}>{{ v }}</{{ k }}>{% endfor %}</call>"
              "{% endfor %}\n{% endfor %}")
DEEPSEEK_LIKE = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content or '' }}{% for c in m.tool_calls or [] %}"
                 "```json\n{{ c.function.name + '\n' + c.function.arguments }}\n```{% endfor %}\n{% endfor %}")


def test_call_arguments_reach_each_template_in_the_form_it_writes(tok: Tokenizer) -> None:
    """Clients send a call's arguments as a JSON string (OpenAI's wire form). A template that writes them with
    `tojson` (Qwen, Llama 3.1, Hermes) wrote that string quoted and escaped, so sft taught a model to call with a
    string; it gets the object, as vLLM passes it. Templates that write the string (ours, DeepSeek-V3's, which
    concatenates it) get it verbatim: compact JSON stays compact."""
    call = {"id": "c1", "type": "function", "function": {"name": "wx", "arguments": '{"city":"Paris","n":2}'}}
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "c1", "content": "sun"}]
    qwen = Tokenizer(tok.backend, chat_template=QWEN_LIKE).apply_chat_template(messages)
    assert '"arguments": {"city": "Paris", "n": 2}}' in qwen and '\\"' not in qwen
    deepseek = Tokenizer(tok.backend, chat_template=DEEPSEEK_LIKE).apply_chat_template(messages)
    assert 'wx\n{"city":"Paris","n":2}\n```' in deepseek
    assert '"arguments": {"city":"Paris","n":2}}' in tok.apply_chat_template(messages)
    as_object = [messages[0], {**messages[1], "tool_calls": [{**call, "function": {"name": "wx", "arguments": {
        "city": "Paris", "n": 2}}}]}, messages[2]]  # the HF form, already an object: as it is
    assert Tokenizer(tok.backend, chat_template=QWEN_LIKE).apply_chat_template(as_object) == qwen
    user_last = "{% if messages[-1].role != 'user' %}{{ raise_exception('end with a user turn') }}{% endif %}"
    later = [*messages, {"role": "user", "content": "and tomorrow?"}]
    picky = Tokenizer(tok.backend, chat_template=user_last + QWEN_LIKE).apply_chat_template(later)
    assert '"arguments": {"city": "Paris", "n": 2}}' in picky  # decided on the conversation itself
    items = Tokenizer(tok.backend, chat_template=ITEMS_LIKE).apply_chat_template(messages)
    assert "<city>Paris</city><n>2</n>" in items  # Qwen3-Coder / GLM-4.5 read them as a mapping


@pytest.mark.parametrize("template, message", [
    ("{% for m in messages %}{{ m.content }", r"chat_template is not a valid Jinja template \(line 1"),
    (5, "chat_template must be a string"),
    ([{"name": "default"}], 'chat_template must be a string or a list of {"name", "template"} strings'),
    # were replaced by the built-in template without a word; transformers renders "" and refuses the list
    ("", "chat_template is empty"), (" \n", "chat_template is empty"),
    ([{"name": "tool_use", "template": "{{ messages[0].content }}"}], r"names \['tool_use'\] but no 'default'")])
def test_a_broken_chat_template_is_refused_when_the_tokenizer_loads(tok: Tokenizer, tmp_path, template, message):
    """It loaded, and then every chat failed: a 500 from the server, a traceback from `longcat chat`."""
    tok.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    with pytest.raises(ValueError, match=message):
        Tokenizer.load(tmp_path)


def test_a_broken_template_file_is_named_as_the_file(tok: Tokenizer, tmp_path):
    """The error named `chat_template`, a key tokenizer_config.json did not even hold."""
    tok.save(tmp_path)
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor")
    with pytest.raises(ValueError, match=r"chat_template.jinja is not a valid Jinja template \(line 1"):
        Tokenizer.load(tmp_path)


DATED = ("{% if strftime_now is defined %}{% set d = strftime_now('%d %b %Y') %}{% else %}{% set d = 'never' %}"
         "{% endif %}Today: {{ d }}|{% for m in messages %}{{ m.content }}{% endfor %}")


def test_a_dated_template_renders_the_date_it_is_given_and_training_data_none(tok: Tokenizer):
    """transformers gives templates `strftime_now` (Llama 3.x date their system prompt): a guarded template fell
    back to its fixed date when serving, and an unguarded one failed on every conversation. Training data renders
    without it, the same on any day (a resume compares the data it renders with the checkpoint's)."""
    from datetime import datetime

    dated = Tokenizer(tok.backend, chat_template=DATED)
    hi = [{"role": "user", "content": "hi"}]
    assert dated.apply_chat_template(hi, now=datetime(2026, 12, 6)) == "Today: 06 Dec 2026|hi"
    assert dated.render_chat(hi, now=datetime(2025, 1, 2)).text == "Today: 02 Jan 2025|hi"
    assert dated.apply_chat_template(hi) == "Today: never|hi"


def test_special_tokens_the_config_lists_but_the_tokenizer_lacks_are_refused(tok: Tokenizer, tmp_path):
    """transformers adds them (new ids); here `<|im_start|>` was silently encoded as ten byte-level tokens. Under
    transformers 5's key, `extra_special_tokens` (4.x's: a dict of named ones), they were not looked at."""
    tok.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    for key, listed in (("additional_special_tokens", ["<|im_start|>", "</s>"]),
                        ("additional_special_tokens", [{"content": "<|im_start|>", "special": True}]),
                        ("extra_special_tokens", ["<|im_start|>"]),
                        ("extra_special_tokens", {"start": "<|im_start|>"})):
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, key: listed}))
        with pytest.raises(ValueError, match=r"lists special tokens that tokenizer.json does not hold \('<\|im_st"):
            Tokenizer.load(tmp_path)
    held = {"additional_special_tokens": [{"content": "</s>"}, {"__type": "AddedToken"}]}  # no content: not read
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, **held}))
    assert Tokenizer.load(tmp_path).eos_id == 2  # as transformers writes them: each listed token is held


def test_a_corpus_with_one_huge_word_trains_in_seconds():
    """A 300 KB run of one character (a generated file, a log) made BPE training take minutes, quadratic in the
    word's length, in native code that not even SIGTERM interrupted. Run in a child so a regression fails here
    instead of hanging the suite."""
    import subprocess
    import sys

    code = ("from longcat_flash.tokenizer import train_tokenizer\n"
            "t = train_tokenizer(['x' * 400_000 + ' def f(x): return x', '-' * 100_000, ' ' * 200_000 + 'a',\n"
            "                     '\\n' * 200_000] * 2, 300)\n"
            "assert t.decode(t.encode('x' * 1000)) == 'x' * 1000\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr[-2000:]


def test_special_token_text_stays_text_in_a_unigram_vocabulary_that_holds_it() -> None:
    """T5's Unigram holds "</s>" as a piece of its own, with the best score: encode("a</s>b") held the eos id (a
    user's message could end its turn, and SFT taught a stop mid-message)."""
    from tokenizer_support import unigram_tokenizer

    tok = unigram_tokenizer()
    ids = tok.encode("a</s>b")
    assert tok.eos_id not in ids and tok.decode(ids) == "a</s>b"
    assert tok.eos_id in tok.encode("a</s>b", allow_special=True)


def test_a_sentencepiece_conversation_encodes_as_its_whole_text_does() -> None:
    """Under prepend_scheme "first" only a text's start gets a "▁": each text between the template's special tokens
    (and after each SFT cut) was encoded as a text of its own, so a "▁" followed every special token, where
    transformers, encoding the whole text, has none."""
    from tokenizer_support import sentencepiece_tokenizer

    sp = sentencepiece_tokenizer()
    template = ("{% for m in messages %}{% if not loop.first %}<s>{% endif %}{{ m.role }}: {{ m.content }}</s>"
                "{% endfor %}")
    tok = Tokenizer(sp.backend, bos_token="<s>", eos_token="</s>", pad_token=None, chat_template=template)
    chat = tok.render_chat([{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "hi"}],
                           add_generation_prompt=False)
    whole = tok.encode(chat.text, allow_special=True)
    assert tok.encode_chat(chat) == [whole] and whole[0] == tok.encode("user")[0]  # the start keeps its "▁"
    first, second = tok.encode_chat(chat, [chat.text.index("hi")])
    assert first + second == whole
    assert tok.encode_chat(chat, start=chat.text.index("hi")) == [second]  # from a cut on: no "▁" there either



def test_special_tokens_named_in_special_tokens_map_are_read_as_transformers_reads_them(tmp_path) -> None:
    """transformers 4 wrote some tokenizers' special tokens only into special_tokens_map.json, and transformers
    reads them from there: guessed by name instead, eos was `</s>` where the model ends its turns with `<|end|>`,
    so chat prompts and fine-tuning used another end of turn, without a word. As in transformers, the map counts
    beside a config without `added_tokens_decoder` (written before 4.34), and wins over it; a null entry does not."""
    train_tokenizer(CORPUS, vocab_size=300, special_tokens=("<pad>", "<s>", "</s>", "<|end|>")).save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.pop("added_tokens_decoder", None)
    del config["eos_token"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(
        {"eos_token": {"content": "<|end|>", "lstrip": False, "special": True}, "pad_token": None}))
    loaded = Tokenizer.load(tmp_path)
    assert (loaded.eos_token, loaded.pad_token) == ("<|end|>", "<pad>")
    assert loaded.eos_id == loaded.special_ids["<|end|>"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "</s>"}))
    assert Tokenizer.load(tmp_path).eos_token == "<|end|>"  # the map wins, as in transformers
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "</s>",
                                                                "added_tokens_decoder": {}}))
    assert Tokenizer.load(tmp_path).eos_token == "</s>"  # a config of transformers >= 4.34: the map is not read
