"""vLLM's tokenizer endpoints: /tokenize, /detokenize and /tokenizer_info, for clients that count or build prompts
with the served model's own tokenizer (lm_eval's `tokenizer_backend=remote`, agent frameworks' token budgets).

/tokenize gives the ids a completions prompt of the same text becomes (special-token text parsed), so its `count`
is what the context check there counts, plus, with vLLM's `add_special_tokens` (true unless sent false), what the
tokenizer's own post-processor adds (a bos for some; nothing for those this project trains); /detokenize inverts
it. Both run off the event loop, their JSON included, with the tokenizer's batch calls, which release the GIL (a
1M-character prompt's single `encode` held it for over a second). They take no API key (as vLLM's), so their work is
gated: TOKENIZER_WORKERS at once, TOKENIZER_QUEUE at most waiting, more a 503 to retry (four clients looping 1M
characters slowed keyed completions to seconds, and ten pushed the server past 1.8 GB).
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from ..tokenizer import Tokenizer
from . import protocol as p
from . import responses as resp
from .errors import APIError, check_model

TOKENIZER_WORKERS = 2  # /tokenize and /detokenize calls computed at once
TOKENIZER_QUEUE = 32  # calls waiting for a worker; beyond, a 503


class WorkGate:
    """At most `workers` calls at once, `queue` more waiting; beyond that a 503 with Retry-After, not a queue (and
    the parsed bodies it holds) that grows with whatever clients send."""

    def __init__(self, workers: int = TOKENIZER_WORKERS, queue: int = TOKENIZER_QUEUE) -> None:
        self._free, self.queue, self._waiting = asyncio.Semaphore(workers), queue, 0

    async def run(self, work: Callable[[], JSONResponse]) -> JSONResponse:
        if self._waiting >= self.queue:
            raise APIError(503, "server busy: too many tokenizer requests at once; retry", "server_error",
                           code="tokenizer_busy", headers={"Retry-After": "1"})
        self._waiting += 1
        try:
            await self._free.acquire()
        finally:  # acquired, or its client gone while it waited
            self._waiting -= 1
        try:
            return await asyncio.to_thread(work)
        finally:
            self._free.release()


def add_tokenizer_routes(app: FastAPI, tokenizer: Tokenizer, context: int, model_name: str) -> None:
    """The three routes, for the model served as `model_name` with a context of `context` tokens."""
    gate = WorkGate()

    @app.post("/tokenize", response_model=resp.TokenizeResponse)
    async def tokenize(body: p.TokenizeRequest) -> JSONResponse:
        check_model(body.model, model_name)

        def answer() -> JSONResponse:  # encode_batch releases the GIL (encode does not); the JSON is built here too
            [encoded] = tokenizer.backend.encode_batch([body.prompt], add_special_tokens=body.add_special_tokens)
            ids = encoded.ids
            strs = [tokenizer.backend.id_to_token(i) for i in ids] if body.return_token_strs else None
            return JSONResponse(resp.TokenizeResponse(count=len(ids), max_model_len=context, tokens=ids,
                                                   token_strs=strs).model_dump())
        return await gate.run(answer)

    @app.post("/detokenize", response_model=resp.DetokenizeResponse)
    async def detokenize(body: p.DetokenizeRequest) -> JSONResponse:
        check_model(body.model, model_name)

        def answer() -> JSONResponse:  # the check over up to a million ids, too, off the loop
            if any(not 0 <= token < tokenizer.vocab_size for token in body.tokens):
                raise APIError(400, f"tokens: token ids must be in [0, {tokenizer.vocab_size})", param="tokens",
                               code="invalid_value")
            text = tokenizer.backend.decode_batch([body.tokens], skip_special_tokens=False)[0]
            return JSONResponse(resp.DetokenizeResponse(prompt=text).model_dump())
        return await gate.run(answer)

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, Any]:
        return info(tokenizer, context)


def info(tokenizer: Tokenizer, context: int) -> dict[str, Any]:
    """What vLLM's /tokenizer_info holds: the tokenizer's config, its special tokens and chat template."""
    return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": tokenizer.bos_token,
            "eos_token": tokenizer.eos_token, "pad_token": tokenizer.pad_token, "model_max_length": context,
            "vocab_size": tokenizer.vocab_size, "chat_template": tokenizer.chat_template,
            "tool_chat_template": tokenizer.tool_chat_template}
