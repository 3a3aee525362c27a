"""Synthetic tool-use conversations, made locally (`longcat data tools`; docs/tool_data.md).

Each conversation offers a few randomly generated tools (OpenAI function schemas) and is one of four cases: a
request one tool answers, a plain chat turn that needs none, a follow-up that needs a second call, or two calls in
one assistant turn. Tool names, parameter names and request templates come from two disjoint pools, `train` and
`heldout`, so a model fine-tuned on one can be measured on tools and phrasings it never saw. Everything is drawn
from word lists in this file with one `random.Random` per (split, seed): same seed, same file.
"""
from __future__ import annotations

import contextlib
import gzip
import io
import itertools
import json
import random
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from ..files import atomic_write
from .conversation_files import row_format

SPLITS = ("train", "heldout")
CASES = ("single", "no_tool", "multi_turn", "parallel")
CASE_WEIGHTS = (0.4, 0.2, 0.2, 0.2)

# ---- word lists: each pool is a (train, heldout) pair of disjoint tuples ---------------------------------

VERBS = (("get", "fetch", "lookup", "find", "query", "compute", "run"),
         ("retrieve", "obtain", "check", "resolve", "read", "determine"))
PARAM_NAMES = {
    "city": (("city", "location", "place"), ("town", "city_name", "locality")),
    "temp_unit": (("unit", "units", "scale"), ("temperature_unit", "degrees_in")),
    "amount": (("value", "amount", "quantity"), ("magnitude", "measure")),
    "src_unit": (("from_unit", "source_unit", "unit_from"), ("input_unit", "origin_unit")),
    "dst_unit": (("to_unit", "target_unit", "unit_to"), ("output_unit", "destination_unit")),
    "left": (("a", "x", "first"), ("lhs", "operand_1")),
    "right": (("b", "y", "second"), ("rhs", "operand_2")),
    "operation": (("op", "operation", "operator"), ("action", "arith_op")),
    "minutes": (("minutes", "duration_minutes", "length"), ("mins", "time_in_minutes")),
    "label": (("label", "name", "title"), ("tag", "caption")),
    "audible": (("sound", "with_sound", "alarm"), ("ring", "beep")),
    "text": (("text", "phrase", "sentence"), ("input_text", "words")),
    "language": (("language", "target_language", "lang"), ("locale", "to_language")),
}
SYSTEM_PROMPTS = ("You are a helpful assistant.", "You are a concise assistant that uses tools when they help.",
                  "Answer briefly. Call a function when one fits the request.")
POLITE = (("", ""), ("Please, ", ""), ("Hi! ", ""), ("", " Thanks!"), ("", " Thank you."), ("Hey, ", " Cheers."))
JOINERS = ("{0} Also, {1}", "Two things. {0} And {1}", "{0} Then: {1}", "{0} {1}")
FOLLOW_UPS = ("Thanks! One more: {0}", "Great. {0}", "OK, and now: {0}", "Perfect, thank you. {0}")
CHATS = (("Hello, who are you?", "I'm an assistant. I can answer questions and call the tools I'm given."),
         ("Tell me a fun fact about octopuses.", "An octopus has three hearts and blue blood."),
         ("What is the capital of Japan?", "The capital of Japan is Tokyo."),
         ("Can you recommend a good habit for mornings?", "Drink a glass of water and take a short walk."),
         ("How are you today?", "I'm doing well, thanks for asking. How can I help?"),
         ("What does HTTP stand for?", "HTTP stands for HyperText Transfer Protocol."),
         ("Give me a synonym for happy.", "Cheerful."),
         ("Write a haiku about rain.", "Soft rain on the roof / the gutters hum their old song / puddles hold the sky"))

ROLE_DESCRIPTIONS = {"city": "City name", "temp_unit": "Temperature unit", "amount": "How much to convert",
                     "src_unit": "Unit of the amount", "dst_unit": "Unit to convert to", "left": "First operand",
                     "right": "Second operand", "operation": "What to do with the operands",
                     "minutes": "Length in minutes", "label": "Short name for the timer",
                     "audible": "Ring when done", "text": "Phrase to translate", "language": "Target language"}
CITIES = ("Paris", "Lisbon", "Tokyo", "Nairobi", "Lima", "Oslo", "Toronto", "Hanoi", "Cairo", "Melbourne", "Prague")
CONDITIONS = ("sunny", "cloudy", "light rain", "windy", "clear", "foggy")
METERS_PER = {"kilometer": 1000.0, "mile": 1609.344, "meter": 1.0, "foot": 0.3048}
PLURAL = {"kilometer": "kilometers", "mile": "miles", "meter": "meters", "foot": "feet"}
OP_WORDS = {"add": "plus", "subtract": "minus", "multiply": "times"}
LANGUAGES = ("french", "spanish", "german", "italian")
PHRASEBOOK = {"hello": ("bonjour", "hola", "hallo", "ciao"), "thank you": ("merci", "gracias", "danke", "grazie"),
              "good night": ("bonne nuit", "buenas noches", "gute Nacht", "buona notte"),
              "water": ("eau", "agua", "Wasser", "acqua"), "cat": ("chat", "gato", "Katze", "gatto")}
ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
        "seventeen eighteen nineteen").split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def spell(n: int) -> str:
    """English words for 0..99, so requests can carry numbers the assistant must turn into JSON integers."""
    if n < 20:
        return ONES[n]
    return TENS[n // 10] + ("" if n % 10 == 0 else "-" + ONES[n % 10])


def _number_text(rng: random.Random, n: int) -> str:
    """Digits or words at random: the model must map both to the same argument."""
    return spell(n) if n < 100 and rng.random() < 0.5 else str(n)


def _count(rng: random.Random, n: int, unit: str) -> str:
    """`n` units, in digits or words, the unit plural unless n is 1 ("1 hour", "twelve minutes")."""
    return f"{_number_text(rng, n)} {unit}{'s' if n != 1 else ''}"


# ---- intents: what a tool does, its slots, how a request about it is drawn and answered ----------------

@dataclass(frozen=True)
class Slot:
    """One parameter of a tool, by role; its name is drawn per conversation from PARAM_NAMES[role]."""
    role: str
    type: str
    required: bool = True
    enum: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Draw:
    """One concrete request: argument values by role (only the slots the text mentions) and template fields."""
    values: dict[str, Any]
    fields: dict[str, str]


@dataclass(frozen=True)
class Intent:
    """A kind of tool: noun pools per split, its slots, the request sampler, the result and phrasings."""
    nouns: tuple[tuple[str, ...], tuple[str, ...]]
    description: str
    slots: tuple[Slot, ...]
    draw: Callable[[random.Random], Draw]
    result: Callable[[dict[str, Any]], str]
    templates: tuple[tuple[str, ...], tuple[str, ...]]
    answers: tuple[str, ...]


def _draw_weather(rng: random.Random) -> Draw:
    """A city, and a temperature unit only sometimes (the slot is optional)."""
    city = rng.choice(CITIES)
    values = {"city": city}
    unit = rng.choice((None, "celsius", "fahrenheit"))
    if unit:
        values["temp_unit"] = unit
    return Draw(values, {"city": city, "unit": f" in {unit}" if unit else ""})


def _weather(values: dict[str, Any]) -> str:
    """The same city always has the same weather, so the result is a function of the arguments."""
    h = zlib.crc32(values["city"].encode())
    celsius = h % 40 - 5
    if values.get("temp_unit") == "fahrenheit":
        return f"{round(celsius * 9 / 5 + 32)} F, {CONDITIONS[h % len(CONDITIONS)]}"
    return f"{celsius} C, {CONDITIONS[h % len(CONDITIONS)]}"


def _draw_convert(rng: random.Random) -> Draw:
    """An amount in one length unit to another; whole amounts are sometimes spelled out."""
    src, dst = rng.sample(sorted(METERS_PER), 2)
    amount = rng.randint(2, 500) if rng.random() < 0.7 else rng.randint(3, 199) / 2
    text = _number_text(rng, amount) if isinstance(amount, int) else str(amount)
    return Draw({"amount": amount, "src_unit": src, "dst_unit": dst},
                {"amount": text, "src": PLURAL[src], "dst": PLURAL[dst]})


def _convert(values: dict[str, Any]) -> str:
    meters = values["amount"] * METERS_PER[values["src_unit"]]
    return f"{round(meters / METERS_PER[values['dst_unit']], 3)} {PLURAL[values['dst_unit']]}"


def _draw_arith(rng: random.Random) -> Draw:
    """Two integers and an operation named by its word (plus, minus, times)."""
    a, b, op = rng.randint(0, 99), rng.randint(0, 99), rng.choice(sorted(OP_WORDS))
    return Draw({"left": a, "right": b, "operation": op},
                {"a": _number_text(rng, a), "b": _number_text(rng, b), "op": OP_WORDS[op]})


def _arith(values: dict[str, Any]) -> str:
    a, b, op = values["left"], values["right"], values["operation"]
    return str(a + b if op == "add" else a - b if op == "subtract" else a * b)


def _draw_timer(rng: random.Random) -> Draw:
    """A duration said in hours and minutes that the assistant converts to minutes, optional label and sound."""
    hours, minutes = rng.choice(((0, 15), (0, 30), (1, 30), (2, 0), (1, 0), (0, rng.randint(2, 59)),
                                 (rng.randint(1, 3), rng.randint(5, 55))))
    said = {(0, 15): "a quarter of an hour", (0, 30): "half an hour", (1, 30): "an hour and a half",
            (1, 0): "one hour"}.get((hours, minutes))
    if said is None:
        parts = [_count(rng, hours, "hour")] * (hours > 0) + [_count(rng, minutes, "minute")] * (minutes > 0)
        said = " and ".join(parts)
    values: dict[str, Any] = {"minutes": 60 * hours + minutes}
    label = rng.choice((None, "tea", "laundry", "pasta", "stretching"))
    if label:
        values["label"] = label
    if rng.random() < 0.4:
        values["audible"] = rng.random() < 0.5
    return Draw(values, {"duration": said, "label": f" for the {label}" if label else "",
                         "sound": {None: "", True: ", with a sound", False: ", silently"}[values.get("audible")]})


def _timer(values: dict[str, Any]) -> str:
    return f"timer {values.get('label', 'unnamed')!r} set for {values['minutes']} minutes"


def _draw_translate(rng: random.Random) -> Draw:
    """A phrase from the phrasebook and a target language."""
    text, language = rng.choice(sorted(PHRASEBOOK)), rng.choice(LANGUAGES)
    return Draw({"text": text, "language": language}, {"text": text, "language": language.capitalize()})


def _translate(values: dict[str, Any]) -> str:
    return PHRASEBOOK[values["text"]][LANGUAGES.index(values["language"])]


INTENTS = {
    "weather": Intent(
        (("weather", "forecast", "conditions"), ("climate_now", "sky_report")), "Current weather for a city.",
        (Slot("city", "string"), Slot("temp_unit", "string", False, ("celsius", "fahrenheit"))),
        _draw_weather, _weather,
        (("What's the weather in {city}{unit}?", "How is the weather in {city} right now{unit}?",
          "Tell me the current conditions in {city}{unit}.", "Is it warm in {city} today? Give me the temperature{unit}."),
         ("I'm heading to {city}; what's it like outside there{unit}?", "{city} weather now{unit}, please.")),
        ("In {city} it is {result}.", "Right now {city} has {result}.")),
    "convert": Intent(
        (("length", "distance", "units"), ("measure_conversion", "span")), "Convert a length between units.",
        (Slot("amount", "number"), Slot("src_unit", "string", True, tuple(sorted(METERS_PER))),
         Slot("dst_unit", "string", True, tuple(sorted(METERS_PER)))),
        _draw_convert, _convert,
        (("How many {dst} are in {amount} {src}?", "Convert {amount} {src} to {dst}.",
          "What is {amount} {src} in {dst}?"),
         ("I have {amount} {src}; express that in {dst}.", "{amount} {src} equals how many {dst}?")),
        ("{amount} {src} is {result}.", "That comes to {result}.")),
    "arith": Intent(
        (("sum", "arithmetic", "calculation"), ("math_result", "number_op")), "Add, subtract or multiply integers.",
        (Slot("left", "integer"), Slot("right", "integer"),
         Slot("operation", "string", True, tuple(sorted(OP_WORDS)))),
        _draw_arith, _arith,
        (("What is {a} {op} {b}?", "Compute {a} {op} {b}.", "Work out {a} {op} {b} for me."),
         ("I need the result of {a} {op} {b}.", "Quick one: {a} {op} {b}?")),
        ("{a} {op} {b} is {result}.", "The answer is {result}.")),
    "timer": Intent(
        (("timer", "countdown", "alarm"), ("kitchen_clock", "reminder_clock")), "Start a countdown timer.",
        (Slot("minutes", "integer"), Slot("label", "string", False), Slot("audible", "boolean", False)),
        _draw_timer, _timer,
        (("Set a timer for {duration}{label}{sound}.", "Start a countdown of {duration}{label}{sound}.",
          "Remind me in {duration}{label}{sound}."),
         ("Can you time {duration}{label}{sound}?", "Could you clock {duration}{label}{sound}?")),
        ("Done: {result}.", "Your timer is running ({result}).")),
    "translate": Intent(
        (("translation", "translator", "phrase"), ("language_swap", "interpretation")),
        "Translate a short phrase into another language.",
        (Slot("text", "string"), Slot("language", "string", True, LANGUAGES)),
        _draw_translate, _translate,
        (("How do you say '{text}' in {language}?", "Translate '{text}' into {language}.",
          "What is '{text}' in {language}?"),
         ("In {language}, '{text}' would be what?", "Give me the {language} for '{text}'.")),
        ("In {language}, '{text}' is '{result}'.", "It's '{result}'.")),
}
# The first words of the request templates (those that start with a word, not a value) and of the plain chats: what
# `_continued` may lower-case; a value (a city) and "I" keep their capital.
_OPENING_WORDS = frozenset(text.split(" ", 1)[0] for text in (
    *(template for intent in INTENTS.values() for pool in intent.templates for template in pool),
    *(question for question, _ in CHATS)) if text[:1].isalpha()) - {"I", "I'm", "I'd"}


# ---- tools and conversations -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Tool:
    """A generated tool: its intent, its OpenAI function schema, and the parameter name of each role."""
    intent: Intent
    schema: dict[str, Any]
    names: dict[str, str]


@dataclass(frozen=True)
class Request:
    """One user request and what answering it takes: the call, the tool's result, the final sentence."""
    text: str
    name: str
    arguments: dict[str, Any]
    result: str
    answer: str


def _property(slot: Slot) -> dict[str, Any]:
    """The JSON Schema of one parameter: type, a short description, and the allowed values of an enum."""
    prop: dict[str, Any] = {"type": slot.type, "description": ROLE_DESCRIPTIONS[slot.role]}
    if slot.enum:
        prop["enum"] = list(slot.enum)
    return prop


def make_tool(rng: random.Random, kind: str, split: str) -> Tool:
    """A tool for `kind` with a name and parameter names drawn from `split`'s pools, so held-out tools are new."""
    intent, s = INTENTS[kind], SPLITS.index(split)
    names = {slot.role: rng.choice(PARAM_NAMES[slot.role][s]) for slot in intent.slots}
    parameters = {"type": "object", "properties": {names[slot.role]: _property(slot) for slot in intent.slots},
                  "required": [names[slot.role] for slot in intent.slots if slot.required],
                  "additionalProperties": False}
    name = f"{rng.choice(VERBS[s])}_{rng.choice(intent.nouns[s])}"
    return Tool(intent, {"type": "function", "function": {"name": name, "description": intent.description,
                                                          "parameters": parameters}}, names)


def make_request(rng: random.Random, tool: Tool, split: str) -> Request:
    """Draw a request `tool` answers, phrased with one of `split`'s templates, and compute its result."""
    draw = tool.intent.draw(rng)
    result = tool.intent.result(draw.values)
    return Request(text=rng.choice(tool.intent.templates[SPLITS.index(split)]).format(**draw.fields),
                   name=tool.schema["function"]["name"],
                   arguments={tool.names[role]: value for role, value in draw.values.items()}, result=result,
                   answer=rng.choice(tool.intent.answers).format(result=result, **draw.fields))


def _polite(rng: random.Random, text: str) -> str:
    """Wrap a request in a greeting or a thank-you (or nothing), so the model does not key on the exact text."""
    before, after = rng.choice(POLITE)
    if "please" in before.lower() and "please" in text.lower():  # "Please, Oslo weather now, please." says it twice
        before = ""
    return _continued(before, text) + after


def _continued(prefix: str, text: str) -> str:
    """`prefix` then `text`, whose first word is lower-cased where the prefix leaves a sentence open ("Please, set
    a timer", "... And what is"): a template's opening word, never a name or "I"."""
    open_sentence = prefix.rstrip()[-1:] not in ("", ".", "!", "?", ":")
    if open_sentence and text.split(" ", 1)[0] in _OPENING_WORDS:
        text = text[:1].lower() + text[1:]
    return prefix + text


def _tool_turn(rng: random.Random, requests: list[Request]) -> list[dict[str, Any]]:
    """The assistant's calls (OpenAI wire form: arguments as a JSON string), one result each, then the answer."""
    calls = [{"id": f"call_{rng.getrandbits(48):012x}", "type": "function",
              "function": {"name": r.name, "arguments": json.dumps(r.arguments)}} for r in requests]
    return [{"role": "assistant", "content": None, "tool_calls": calls},
            *({"role": "tool", "tool_call_id": call["id"], "content": r.result} for call, r in zip(calls, requests)),
            {"role": "assistant", "content": " ".join(r.answer for r in requests)}]


def _case_messages(rng: random.Random, case: str, tools: list[Tool], split: str) -> list[dict[str, Any]]:
    """The user and assistant turns of one case (everything after the optional system message)."""
    if case == "no_tool":
        question, answer = rng.choice(CHATS)
        return [{"role": "user", "content": _polite(rng, question)}, {"role": "assistant", "content": answer}]
    if case == "parallel":
        pair = rng.sample(tools, 2) if len(tools) > 1 else tools * 2
        first, second = (make_request(rng, tool, split) for tool in pair)
        joiner = rng.choice(JOINERS)  # each ends with the second request
        return [{"role": "user", "content": _continued(joiner.removesuffix("{1}").format(first.text), second.text)},
                *_tool_turn(rng, [first, second])]
    request = make_request(rng, rng.choice(tools), split)
    messages = [{"role": "user", "content": _polite(rng, request.text)}, *_tool_turn(rng, [request])]
    if case == "multi_turn":
        follow = make_request(rng, rng.choice(tools), split)
        messages += [{"role": "user", "content": rng.choice(FOLLOW_UPS).format(follow.text)},
                     *_tool_turn(rng, [follow])]
    return messages


def make_conversation(rng: random.Random, split: str = "train", tools_per_conversation: int = 3) -> dict[str, Any]:
    """One row: `tools_per_conversation` tools of distinct kinds (the unused ones are distractors) and a case."""
    tools = [make_tool(rng, kind, split) for kind in rng.sample(sorted(INTENTS), tools_per_conversation)]
    case = rng.choices(CASES, CASE_WEIGHTS)[0]
    system = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] if rng.random() < 0.7 else []
    return {"messages": system + _case_messages(rng, case, tools, split), "tools": [t.schema for t in tools]}


def iter_conversations(n: int, seed: int, split: str = "train",
                       tools_per_conversation: int = 3) -> Iterator[dict[str, Any]]:
    """`n` rows from one generator seeded by (split, seed): the same arguments always give the same rows."""
    if n < 1:
        raise ValueError(f"--n must be at least 1, got {n}")
    if split not in SPLITS:
        raise ValueError(f"--split must be one of {SPLITS}, got {split!r}")
    if not 1 <= tools_per_conversation <= len(INTENTS):
        raise ValueError(f"--tools-per-conversation must be in 1..{len(INTENTS)}, got {tools_per_conversation}")
    rng = random.Random(f"longcat-tool-dialogues:{split}:{seed}")
    for _ in range(n):
        yield make_conversation(rng, split, tools_per_conversation)


def write_conversations(out: str | Path | TextIO, n: int, seed: int, split: str = "train",
                        tools_per_conversation: int = 3) -> Path | None:
    """Write the rows as JSONL to a file (atomically, through a symlink to it; gzip-compressed when its name ends
    in .gz) or to an open text stream (None returned). The name must be one `longcat sft` reads as JSON Lines
    (.jsonl or .json, then perhaps .gz); a missing output directory is an error rather than a silent mkdir of a
    typo, and anything but a regular file (a device, a FIFO) is refused: the rename would replace it."""
    rows = iter_conversations(n, seed, split, tools_per_conversation)
    first = next(rows)  # the arguments are checked here, before anything is written
    lines = (json.dumps(row, ensure_ascii=False) + "\n" for row in itertools.chain([first], rows))
    if not isinstance(out, (str, Path)):
        out.writelines(lines)
        return None
    named, out = out, Path(out).resolve()  # a symlink is written through, not replaced by a file
    if not out.parent.is_dir():
        raise FileNotFoundError(f"output directory {out.parent} does not exist")
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory; name the JSONL file to write")
    if row_format(Path(named)) not in (".jsonl", ".json"):
        raise ValueError(f"--out {named}: the conversations are JSON Lines; name a .jsonl file (.jsonl.gz for gzip), "
                         "as `longcat sft` reads them")
    if out.exists() and not out.is_file():
        raise ValueError(f"--out {out} is not a regular file (a device, FIFO or socket); name a file to write, or - "
                         "for standard output")
    gzipped = out.suffix.lower() == ".gz"
    if (Path(named).suffix.lower() == ".gz") != gzipped:  # either name would read the file as the wrong format
        raise ValueError(f"--out {named} links to {out}: one name says gzip and the other not, so one of them would "
                         "be read as the wrong format; name the file itself")
    try:
        with atomic_write(out) as tmp, _text_file(tmp, gzipped=gzipped) as f:
            f.writelines(lines)  # streamed: any n fits in memory
    except OSError as err:  # the temporary file's name would stand for --out's
        raise OSError(f"cannot write {out}: {err.strerror or err}") from None
    return out


@contextlib.contextmanager
def _text_file(path: Path, gzipped: bool) -> Iterator[TextIO]:
    """A UTF-8 text file to write; gzipped with no name or time in its header, so that a seed gives the same
    bytes."""
    with path.open("wb") as raw:
        if not gzipped:
            with io.TextIOWrapper(raw, encoding="utf-8") as text:
                yield text
            return
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as packed, \
                io.TextIOWrapper(packed, encoding="utf-8") as text:
            yield text


# ---- checks: used by the tests, and by whoever scores a model's calls against the schemas ----------------

_TYPES = {"string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,), "object": (dict,)}


def _type_ok(value: Any, kind: str) -> bool:
    """JSON Schema's types: a bool is not an integer or a number, although Python says it is; an integer is any
    number with no fractional part (71.0 too, as JSON Schema 2020-12 and `jsonschema` read it)."""
    if kind == "integer" and isinstance(value, float) and not isinstance(value, bool):
        return value.is_integer()
    return isinstance(value, _TYPES[kind]) and (kind == "boolean" or not isinstance(value, bool))


def same_json(a: Any, b: Any) -> bool:
    """JSON equality: objects by their keys whatever their order, numbers by value (3 and 3.0 are one JSON number),
    and a bool never equal to a number (Python's True == 1 is not JSON's)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_json(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_json(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def validate_arguments(arguments: Any, schema: dict[str, Any]) -> list[str]:
    """Errors of `arguments` against an object schema, for the subset generated here (type, enum, required,
    additionalProperties); empty when valid. Small so that no jsonschema dependency is needed."""
    if not _type_ok(arguments, "object"):
        return [f"arguments must be an object, got {arguments!r}"]
    properties = schema.get("properties", {})
    errors = [f"missing required {name!r}" for name in schema.get("required", []) if name not in arguments]
    for name, value in arguments.items():
        prop = properties.get(name)
        if prop is None:
            if schema.get("additionalProperties", True) is False:
                errors.append(f"unexpected argument {name!r}")
        elif not _type_ok(value, prop["type"]):
            errors.append(f"{name!r} must be {prop['type']}, got {value!r}")
        elif "enum" in prop and value not in prop["enum"]:
            errors.append(f"{name!r} must be one of {prop['enum']}, got {value!r}")
    return errors


def check_conversation(row: dict[str, Any]) -> list[str]:
    """Errors of one row, as §1 of docs/tool_data.md describes one: each call has an id of its own, names an offered
    tool and has arguments (a JSON object, or a string holding one) that validate; each result answers the next
    unanswered call, in call order, before anyone speaks again; the row ends with an assistant answer in text."""
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in row.get("tools", [])}
    errors, unanswered, ids = [], [], set()
    for i, message in enumerate(row["messages"]):
        if message["role"] == "tool":
            answered = message.get("tool_call_id")
            if answered not in unanswered:
                errors.append(f"messages[{i}]: tool_call_id {answered!r} answers no call left open")
            elif answered != unanswered[0]:
                errors.append(f"messages[{i}]: tool_call_id {answered!r} answers a call out of order (the next to "
                              f"answer is {unanswered[0]!r}; results follow the order of the calls)")
            if answered in unanswered:
                unanswered.remove(answered)
            continue
        if unanswered:
            errors.append(f"messages[{i}]: calls {unanswered} were never answered")
            unanswered = []
        for call in message.get("tool_calls") or []:
            if call["id"] in ids:
                errors.append(f"messages[{i}]: call id {call['id']!r} is used twice")
            ids.add(call["id"])
            unanswered.append(call["id"])
            name = call["function"]["name"]
            errors += [f"messages[{i}] {name}: {e}" for e in _call_errors(call["function"], schemas)]
    last = row["messages"][-1] if row["messages"] else {}
    if unanswered:
        errors.append(f"calls {unanswered} were never answered")
    elif last.get("role") != "assistant" or last.get("tool_calls") or not last.get("content"):
        errors.append("the conversation does not end with an assistant answer in text")
    return errors


def _call_errors(function: dict[str, Any], schemas: dict[str, dict]) -> list[str]:
    """What is wrong with one call: a tool not offered, arguments that are not JSON or do not validate."""
    if function["name"] not in schemas:
        return [f"call to {function['name']!r}, which is not offered"]
    arguments = function["arguments"]
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return [f"arguments are not JSON: {arguments!r:.60}"]
    return validate_arguments(arguments, schemas[function["name"]])


def case_of(row: dict[str, Any]) -> str:
    """Which of CASES a row is, read from its structure (rows carry only `messages` and `tools`)."""
    calls = [len(m["tool_calls"]) for m in row["messages"] if m.get("tool_calls")]
    if not calls:
        return "no_tool"
    return "parallel" if max(calls) > 1 else "multi_turn" if len(calls) > 1 else "single"
