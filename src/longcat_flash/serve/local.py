"""In-process text generation for `longcat generate` and `longcat chat`: the server's text handling, no HTTP."""
from __future__ import annotations

import contextlib
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from pathlib import Path

import torch

from ..checkpoint.hf import model_directory
from ..infer.engine import Engine, EngineConfig
from ..infer.loader import load_engine
from ..infer.sampling import SamplingParams
from ..tokenizer import Tokenizer, utf8_text
from .text import TextState


@dataclass
class Result:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    time_to_first_token_s: float | None  # None when no token was generated (max_new_tokens 0)
    total_s: float
    decode_tokens_per_s: float | None  # tokens after the first over the time after it (None: fewer than two)
    acceptance_rate: float | None = None  # MTP drafts accepted / proposed (speculative runs)
    mean_accepted_length: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def load_session(model_dir: str | Path, *, dtype: str | None = None, quantize: str | None = None,
                 speculative: int = 0, device: str | torch.device = "auto") -> tuple[Engine, Tokenizer]:
    """A one-request engine on `device` (auto: CUDA when available) and the checkpoint's tokenizer."""
    config = EngineConfig(max_running=1, speculative=speculative)  # its checks, before the load
    return load_engine(model_directory(model_dir), config, dtype=dtype, quantize=quantize, device=device)


def generate_text(engine: Engine, tokenizer: Tokenizer, prompt: list[int], params: SamplingParams,
                  stop: list[str] | None = None, on_text: Callable[[str], None] | None = None,
                  interrupt: Interrupt | None = None) -> Result:
    """Run one prompt (token ids) to completion; `on_text` receives each new piece of text as it is safe to show.
    `interrupt`, once set, ends the request between two engine steps (finish reason "interrupted")."""
    text = TextState(tokenizer, stop or [], context=prompt)
    before = replace(engine.stats.drafts)  # the engine's running totals: this request's are the difference
    start = time.perf_counter()
    rid = engine.add_request(prompt, params)
    first = reason = None
    while reason is None:
        if interrupt is not None and interrupt.is_set():
            engine.cancel(rid)
            reason = "interrupted"
            break
        for out in engine.step():
            if out.request_id != rid:
                continue
            if out.error is not None:
                raise ValueError(out.error)
            first = first or time.perf_counter()
            piece = text.feed(out.new_tokens, final=out.finished, stop_token=out.stop_token)
            if piece and on_text:
                on_text(piece)
            reason = "stop" if text.stopped else out.finish_reason if out.finished else None
    if text.stopped:
        engine.cancel(rid)  # a stop string in the text: the engine may not know it is done
    end = time.perf_counter()
    n = text.tokens
    result = Result(text.text, len(prompt), n, reason, first - start if n else None, end - start,
                    (n - 1) / (end - first) if n > 1 and end > first else None)
    if engine.drafter:
        mine = engine.stats.drafts - before
        result.acceptance_rate, result.mean_accepted_length = mine.acceptance_rate, mine.mean_accepted_length
    return result


CUT = "cut: the conversation now fills the context; /reset to start over"
TOO_LONG = ("that message does not fit the context with the conversation so far; send a shorter one, or /reset to "
            "start over")


def chat_loop(engine: Engine, tokenizer: Tokenizer, params: SamplingParams, read: Callable[[str], str],
              write: Callable[[str], None], system: str | None = None) -> None:
    """Interactive chat: the conversation so far goes through the chat template every turn. EOF or /exit ends;
    Ctrl-C during a reply stops that reply and keeps the conversation (at the prompt it ends the chat)."""
    messages = [{"role": "system", "content": system}] if system is not None else []  # "" too, as the template
    _check_opening(tokenizer, messages, engine.max_context)
    while True:
        try:
            line = read("you> ")
        except EOFError:  # Ctrl-D: the shell's prompt starts on a line of its own
            write("\n")
            return
        command = line.strip()
        if command in ("/exit", "/quit"):
            return
        if command == "/reset":
            messages = messages[:1] if system is not None else []
            write("[conversation reset]\n")
            continue
        if re.fullmatch(r"/[A-Za-z]+", command):  # a mistyped command (or /help) is no message to the model
            unknown = "" if command == "/help" else f"unknown command {command}: "
            write(f"[{unknown}each line is one message; /reset starts over, /exit (or /quit) ends]\n")
            continue
        if not line.strip():  # an empty line asks nothing
            continue
        if tokenizer.cannot_fit(len(line), engine.max_context):  # known before it is encoded
            write(f"[{TOO_LONG}]\n")
            continue
        try:
            utf8_text(line)
            prompt = _chat_prompt(tokenizer, [*messages, {"role": "user", "content": line}])
        except ValueError as err:  # an undecodable byte, or text the template refuses: keep the conversation
            write(f"[{err}; type it again]\n")
            continue
        if len(prompt) >= engine.max_context:
            write(f"[{TOO_LONG}]\n")
            continue
        messages.append({"role": "user", "content": line})
        room = engine.max_context - len(prompt)
        turns = sum(m["role"] == "assistant" for m in messages)  # with a seed each turn draws anew, repeatably
        turn = replace(params.for_draw(turns), max_new_tokens=min(params.max_new_tokens, room))
        write("assistant> ")
        with interrupted_by(signal.SIGINT) as interrupt:
            reply = generate_text(engine, tokenizer, prompt, turn, on_text=lambda text: write(visible(text)),
                                  interrupt=interrupt)
        cut = reply.finish_reason == "length" and len(prompt) + reply.completion_tokens >= engine.max_context
        write(" [stopped]\n" if reply.finish_reason == "interrupted" else f" [{CUT}]\n" if cut else "\n")
        messages.append({"role": "assistant", "content": reply.text})


def _check_opening(tokenizer: Tokenizer, messages: list[dict[str, str]], context: int) -> None:
    """Refuses, before the first line is read, what no line typed could mend: a --system message that fills the
    context alone, or a chat template that cannot render any turn (a tokenizer without eos_token, say)."""
    too_long = f"--system: the system message alone does not fit the model's context of {context} tokens"
    if messages and tokenizer.cannot_fit(len(messages[0]["content"]), context):  # known before it is encoded
        raise ValueError(too_long)
    try:
        _chat_prompt(tokenizer, [{"role": "user", "content": "hello"}])
    except ValueError as err:
        raise ValueError(f"the model's chat template cannot render a conversation: {err}") from None
    try:
        opening = _chat_prompt(tokenizer, messages) if messages else []
    except ValueError as err:  # a template without a system role, or text it refuses
        raise ValueError(f"--system: {err}") from None
    if len(opening) >= context:
        raise ValueError(too_long)


CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # C0 and C1 controls but newline and tab


def visible(text: str) -> str:
    """Model output as the chat shows it: control characters escaped (`\\x1b`), so a reply cannot drive the terminal
    (an ANSI sequence turned it red for the rest of the session)."""
    return CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _chat_prompt(tokenizer: Tokenizer, messages: list[dict[str, str]]) -> list[int]:
    return tokenizer.encode_chat(tokenizer.render_chat(messages, now=datetime.now()))[0]


@dataclass
class Interrupt:
    """Which signal asked the running request to end, if one did."""

    signum: int | None = None

    def is_set(self) -> bool:
        return self.signum is not None


@contextlib.contextmanager
def interrupted_by(*signums: int) -> Iterator[Interrupt]:
    """An Interrupt that these signals (Ctrl-C's SIGINT; SIGTERM for a command that ends as Ctrl-C ends it) set
    while the block runs, instead of raising in the middle of an engine step, which would leave its cache and queues
    half updated; off the main thread, one never set."""
    interrupt = Interrupt()
    if threading.current_thread() is not threading.main_thread():
        yield interrupt
        return
    previous = {signum: signal.signal(signum, lambda signum, frame: setattr(interrupt, "signum", signum))
                for signum in signums}
    try:
        yield interrupt
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
