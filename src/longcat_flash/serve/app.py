"""OpenAI-compatible HTTP server: /v1/models, /v1/completions, /v1/chat/completions (SSE streaming), /health,
/metrics (Prometheus text). Conventions: docs/serving.md.

Every failure a client can cause is an OpenAI-shaped error `{"error": {"message", "type", "param", "code"}}`:
400 for bad input (malformed JSON, out-of-range fields, prompt or max_tokens beyond the context), 404 for a
model not served, 401 for a wrong API key, 429 when the wait queue is full, 503 when the engine is down. A
client that disconnects, streaming or not, has its request cancelled and its cache pages freed.
"""
from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.types import Receive, Scope, Send

from ..checkpoint.hf import GENERATION_CONFIG, generation_config
from ..infer.engine import GRAMMAR_FAILED, PromptRefused, StepOutput
from ..infer.grammar import GrammarBusy, GrammarCompiler, GrammarError
from ..infer.sampling import SamplingParams
from ..infer.scheduler import QueueFull
from ..tokenizer import Tokenizer
from . import protocol as p
from . import responses as resp
from .bridge import Bridge, EngineFailed
from .errors import APIError, check_model
from .guard import JSONOffLoopRoute, RequestGuard
from .logprobs import ChatScores, CompletionScores, joined
from .metrics import CONTENT_TYPE, CountResponses, Metrics
from .openapi import install_openapi
from .prompts import chat_prompt, completion_prompts
from .replies import answer, deltas, parsed
from .structured import ConstraintError, constraining_field, request_grammar, stop_scope
from .text import TextState
from .tokenizer_routes import add_tokenizer_routes
from .tools import Event, ToolPlan, ToolRequestError, plan_tools

log = logging.getLogger(__name__)
# what a model's generation_config.json sets for the requests that leave it out (absent or null), as vLLM does
MODEL_DEFAULTS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


@dataclass(frozen=True)
class ServerConfig:
    model_name: str
    context: int  # the longest sequence served: max_position_embeddings, or less where the KV cache holds less
    api_key: str | None = None
    sampling_defaults: dict[str, float] = field(default_factory=dict)  # for fields a request leaves out
    max_body_bytes: int = 8 * 2**20  # a request body's bound (serve/guard.py); prompts are bounded by the context
    disconnect_poll_s: float = 0.25  # how often a non-streaming request checks that its client is still there


_UNION_MEMBER = re.compile(r"^(str|int|float|bool|none|[a-z-]+\[.*\]|[A-Z][A-Za-z]*)$")  # pydantic's tags, not fields
_VALUE_ERROR = re.compile(r"^Value error, (?:([a-z0-9_][a-z0-9_.]*): )?")  # a validator's; ours name the field


def _validation_error(err: RequestValidationError, content_type: str | None) -> APIError:
    """The deepest error (of a union's members, the one that got furthest into the value) as a 400 naming its
    field: the path through the body, without pydantic's names for the members of a union
    (`messages.0.content.0.cache_control`, not `messages.0.content.list[TextPart].0.cache_control`)."""
    errors = err.errors() or [{"loc": (), "msg": "invalid request", "type": ""}]
    first = max(errors, key=lambda e: len(e.get("loc", ())))  # the first of the deepest
    if first.get("type") == "json_invalid":
        reason = first.get("ctx", {}).get("error") or first.get("msg")  # json's own reason, not "JSON decode error"
        return APIError(400, f"malformed JSON body: {reason}", code="invalid_json")
    if tuple(first.get("loc", ())) == ("body",) and first.get("type") == "missing" \
            and "json" in (content_type or "").lower():  # FastAPI reads no body at all as a missing one
        return APIError(400, "the body is empty: send a JSON object", code="invalid_json")
    if tuple(first.get("loc", ())) == ("body",) and "json" not in (content_type or "").lower():
        # FastAPI reads the body as JSON only under a JSON type (`curl -d` sends a form's)
        sent = f"this one was {content_type}" if content_type else "this one had none"
        return APIError(400, f"the body must be JSON sent with Content-Type: application/json ({sent})",
                        code="invalid_json")
    loc = [str(x) for x in first.get("loc", ()) if x != "body" and not _UNION_MEMBER.match(str(x))]
    message = str(first.get("msg"))
    if first.get("type") == "extra_forbidden":
        message = p.UNSUPPORTED
    elif named := _VALUE_ERROR.match(message):  # pydantic's prefix dropped; a field it names below loc joins it
        inner = named.group(1).split(".") if named.group(1) else []
        overlap = max(k for k in range(min(len(loc), len(inner)) + 1) if loc[len(loc) - k:] == inner[:k])
        loc, message = loc + inner[overlap:], message[named.end():]
    param = ".".join(loc) or None
    return APIError(400, f"{param or 'body'}: {message}", param=param, code="invalid_value")


class Generation:
    """One request's path through the bridge: submit, then stream or collect, cancelling if the client leaves."""

    def __init__(self, bridge: Bridge, tokenizer: Tokenizer, config: ServerConfig) -> None:
        self.bridge, self.tokenizer, self.config = bridge, tokenizer, config
        self.grammars = GrammarCompiler(tokenizer, bridge.vocab_size)

    def check(self, body: p._Sampling, prompt: list[int], limit: int | None, param: str) -> SamplingParams:
        context = self.config.context
        check_model(body.model, self.config.model_name)
        if len(prompt) > context or (len(prompt) == context and limit is None):  # max_tokens 0: scored, may fill it
            why = (f"this model's context is {context} tokens" if len(prompt) > context else
                   "the whole of this model's context, so none is left to generate")
            raise APIError(400, f"{param}: the prompt has {len(prompt)} tokens; {why}", param=param,
                           code="context_length_exceeded")
        limit = context - len(prompt) if limit is None else limit
        if len(prompt) + limit > context:
            sent = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) else "max_tokens"
            whose = f"{param}'s" if "." in param else "the prompt's"  # one of several prompts: which
            raise APIError(400, f"{sent}={limit} plus {whose} {len(prompt)} tokens exceeds the context of "
                                f"{context} tokens", param=sent, code="context_length_exceeded")
        sampled = {name: getattr(body, name) if name in body.model_fields_set
                   else self.config.sampling_defaults.get(name, getattr(body, name)) for name in MODEL_DEFAULTS}
        return SamplingParams(max_new_tokens=limit, **{**sampled, "top_k": max(sampled["top_k"], 0)},
                              seed=body.seed, ignore_eos=body.ignore_eos, presence_penalty=body.presence_penalty,
                              frequency_penalty=body.frequency_penalty, logit_bias=self._logit_bias(body))

    async def constrain(self, params: list[SamplingParams], body: p._Sampling, plan: ToolPlan | None = None
                        ) -> tuple[list[SamplingParams], str | None]:
        """The params with the grammar that response_format and the tool fields ask for (serve/structured.py), and
        the field that asked for it (None: no grammar), which a grammar failing mid-output is blamed on."""
        try:
            grammar = await request_grammar(self.grammars, body, plan)
        except ConstraintError as err:
            raise APIError(400, str(err), param=err.param, code="invalid_value") from None
        except GrammarBusy as err:  # other requests' slow schemas hold the compile workers: not this request's fault
            raise APIError(503, f"server busy: {err}", "server_error", code="grammar_busy",
                           headers={"Retry-After": "1"}) from None
        if grammar is None:
            return params, None
        return [replace(sp, grammar=grammar) for sp in params], constraining_field(body, plan)

    def _logit_bias(self, body: p._Sampling) -> tuple[tuple[int, float], ...]:
        """The request's logit_bias as (id, bias) pairs, its ids checked against the model's vocabulary here so
        that the 400 names the field (the engine would refuse them too)."""
        pairs = tuple((int(key), bias) for key, bias in (body.logit_bias or {}).items())
        vocab = self.bridge.vocab_size
        if any(token >= vocab for token, _ in pairs):
            raise APIError(400, f"logit_bias: token ids must be in [0, {vocab})", param="logit_bias",
                           code="invalid_value")
        return pairs

    async def submit(self, jobs: list[tuple[list[int], list[SamplingParams]]], constraint: str | None = None
                     ) -> list[list[Copy]]:
        """Queue every (prompt, copies' params) job at once, so the engine takes them in one step (`constraint`:
        the field their grammar came from, as `constrain` gives it); all or none:
        if one is refused, none is admitted and the refusal becomes the HTTP error. More sequences (prompts
        x n) than the engine's queue holds could never be admitted: a 400, not a 429 every retry would get again."""
        if (n := max((len(params) for _, params in jobs), default=0)) > self.bridge.max_running:
            raise APIError(400, f"n: {n} copies decode together; this server decodes at most {self.bridge.max_running}"
                                " sequences at once (--max-running)", param="n", code="invalid_value")
        if (total := sum(len(params) for _, params in jobs)) > self.bridge.max_queued:
            raise APIError(400, f"prompt: {len(jobs)} prompts x n={n} are {total} sequences in one request; this "
                                f"server takes at most {self.bridge.max_queued} at once (--max-running + "
                                "--max-waiting): send fewer at a time", param="prompt", code="too_many_prompts")
        try:
            queued = await self.bridge.submit(jobs)
        except QueueFull as err:
            raise APIError(429, f"server busy: {err}", "rate_limit_error", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        except GrammarError as err:  # the engine's own compile ran out of time: the parent's did not
            raise APIError(503, f"server busy: {err}", "server_error", code="grammar_busy",
                           headers={"Retry-After": "1"}) from None
        except PromptRefused as err:
            name = "prompt" if len(jobs) == 1 else f"prompt.{err.index}"  # which of several
            raise APIError(400, f"{name}: {err}" if len(jobs) > 1 else str(err), param=name,
                           code="invalid_value") from None
        except RuntimeError as err:
            raise APIError(503, str(err), "server_error", code="engine_down") from None
        return [[Copy(rid, outputs, ids, constraint) for rid, outputs in group]
                for (ids, _), group in zip(jobs, queued)]

    def close(self, copies: Iterable[Copy]) -> None:
        """Cancel the copies still running (the response ended early: an error, a dropped client)."""
        for copy in copies:
            if copy.open:
                copy.open = False
                self.bridge.cancel(copy.rid)

    async def pieces(self, copy: Copy, text: TextState, request: Request | None,
                     on_output: Callable[[StepOutput], None] | None = None
                     ) -> AsyncIterator[tuple[str, str | None, int]]:
        """(new text, finish reason or None, tokens so far) per engine output, until the request finishes;
        `on_output` sees each engine output too (its logprobs).

        With `request`, polls for a vanished client (non-streaming); a streaming response instead gets cancelled
        by Starlette when its client leaves, which lands in the `finally` just the same. A stop string in the text
        ends the request here, off the engine's thread, which then drops it before its next step.
        """
        loop = asyncio.get_running_loop()
        next_check = loop.time() + self.config.disconnect_poll_s
        try:
            while copy.open and not text.stopped:
                if request is not None and loop.time() >= next_check:  # on a clock: outputs may never pause
                    if await request.is_disconnected():  # nobody reads the reply: 499 in /metrics (nginx's), not 200
                        raise APIError(499, "the client closed the connection before its answer", code="client_closed")
                    next_check = loop.time() + self.config.disconnect_poll_s
                try:
                    timeout = None if request is None else max(0.0, next_check - loop.time())
                    item = await asyncio.wait_for(copy.outputs.get(), timeout=timeout)
                except asyncio.TimeoutError:
                    continue
                if isinstance(item, EngineFailed):
                    copy.open = False
                    raise APIError(item.status, item.message, "server_error",
                                   code="engine_down" if item.status == 503 else None)
                copy.open = not item.finished
                if item.error_code == GRAMMAR_FAILED:
                    raise APIError(400, f"the output's grammar failed after {text.tokens + len(item.new_tokens)} "
                                        f"tokens, so the answer is incomplete (simplify the schema): {item.error}",
                                   param=copy.constraint, code=item.error_code)
                if item.error is not None:  # the model's fault, not the request's
                    raise APIError(500, item.error, "server_error", code=item.error_code)
                if on_output is not None:
                    on_output(item)
                delta = text.feed(item.new_tokens, final=item.finished, stop_token=item.stop_token)
                reason = "stop" if text.stopped else _reason(item) if item.finished else None
                yield delta, reason, text.tokens
        finally:
            if copy.open:
                copy.open = False
                self.bridge.cancel(copy.rid, complete=text.stopped)

    async def completion(self, body: p.CompletionRequest, index: int, prompt: str | list[int], ids: list[int],
                         copy: Copy, request: Request | None) -> AsyncIterator[tuple[resp.CompletionChoice, int]]:
        """One choice of a completion as chunks (a text delta, its tokens' logprobs, the finish reason) with the
        completion tokens so far; with `echo` the first chunk starts with the prompt."""
        text = TextState(self.tokenizer, *stop_scope(body, None), context=copy.prompt)
        scores = CompletionScores(echo=ids if body.echo else None, echo_text=isinstance(prompt, str),
                                  began=not text.starts_text,
                                  added=self.tokenizer.added if isinstance(prompt, str) and body.add_special_tokens
                                  else (0, 0))
        echoed = (prompt if isinstance(prompt, str) else self.tokenizer.decode(ids)) if body.echo else ""
        async for delta, reason, n in self.pieces(copy, text, request, scores.record):
            logprobs = None if body.logprobs is None else await asyncio.to_thread(scores.take, self.tokenizer, n)
            yield resp.CompletionChoice(index=index, text=echoed + delta, finish_reason=reason, logprobs=logprobs), n
            echoed = ""

    def turns(self, body: p.ChatCompletionRequest, plan: ToolPlan, copy: Copy, request: Request | None
              ) -> tuple[AsyncIterator[tuple[list[Event], str | None, int]],
                         Callable[[int], Awaitable[resp.ChatLogprobs | None]]]:
        """One chat choice read through its tool-call parser, and the function that hands out its logprobs up to
        a token count (always None without `logprobs`)."""
        stop, blocks = stop_scope(body, plan)
        text = TextState(self.tokenizer, stop, blocks, context=copy.prompt)
        scores = ChatScores(began=not text.starts_text)

        async def logprobs(n: int) -> resp.ChatLogprobs | None:
            return await asyncio.to_thread(scores.take, self.tokenizer, n) if body.logprobs else None
        pieces = self.pieces(copy, text, request, scores.record)
        return parsed(pieces, plan.parser(), stop if blocks else (), text.end), logprobs

    async def chat_chunks(self, body: p.ChatCompletionRequest, plan: ToolPlan, index: int, copy: Copy
                          ) -> AsyncIterator[tuple[resp.ChatChunkChoice, int]]:
        """One streamed chat choice: the role, then content and tool-call deltas (a step's logprobs ride on its
        first chunk), then the finish reason; each with the completion tokens so far."""
        turns, logprobs = self.turns(body, plan, copy, None)  # a forced call has no content: null, as OpenAI sends
        opening = resp.Delta(role="assistant", content=None if plan.forced else "")
        yield resp.ChatChunkChoice(index=index, delta=opening), 0
        async for events, reason, n in turns:
            for delta in deltas(events):
                yield resp.ChatChunkChoice(index=index, delta=delta, logprobs=await logprobs(n)), n
            if reason:
                yield resp.ChatChunkChoice(index=index, delta=resp.Delta(), finish_reason=reason,
                                           logprobs=await logprobs(n)), n

    async def chat_choice(self, body: p.ChatCompletionRequest, plan: ToolPlan, index: int, copy: Copy,
                          request: Request) -> tuple[resp.ChatChoice, int]:
        """One non-streamed chat choice and its completion-token count."""
        turns, logprobs = self.turns(body, plan, copy, request)
        message, reason, n = await answer(turns)
        scores = (await logprobs(n) or resp.ChatLogprobs(content=[])) if body.logprobs else None
        return resp.ChatChoice(index=index, message=message, finish_reason=reason, logprobs=scores), n


@dataclass(eq=False)
class Copy:
    """One engine request behind an HTTP request (a prompt, or one of its n copies) and whether it still runs."""

    rid: int
    outputs: asyncio.Queue
    prompt: list[int]  # its ids, which the text of its first tokens is decoded after
    constraint: str | None = None  # the field its grammar came from
    open: bool = True


def _copies(params: SamplingParams, n: int) -> list[SamplingParams]:
    """n copies of a request's params; with a seed, copy j samples with seed + j (SamplingParams.for_draw): the
    copies differ and the request as a whole repeats."""
    return [params.for_draw(j) for j in range(n)]


async def _merged(streams: list[AsyncIterator]) -> AsyncIterator:
    """The items of several streams as they come (one stream passes through untouched). Leaving early, or one
    stream failing, closes them all, which cancels their engine requests."""
    if len(streams) == 1:
        async for item in streams[0]:
            yield item
        return
    items: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(stream: AsyncIterator) -> None:
        try:
            async for item in stream:
                items.put_nowait(item)
            items.put_nowait(done)
        except Exception as err:  # re-raised by the reader below
            items.put_nowait(err)

    tasks = [asyncio.ensure_future(pump(stream)) for stream in streams]
    try:
        for _ in tasks:
            while (item := await items.get()) is not done:
                if isinstance(item, Exception):
                    raise item
                yield item
    finally:
        for task in tasks:
            task.cancel()


async def _all_or_none(calls: list[Awaitable]) -> list:
    """Run the calls concurrently (the engine batches them); if one fails, cancel the rest (freeing their engine
    requests) and raise its error."""
    tasks = [asyncio.ensure_future(call) for call in calls]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()


def _completion_params(params: SamplingParams, body: p.CompletionRequest) -> SamplingParams:
    """The engine reports logprobs for generated tokens with `logprobs`, for the prompt's too with `echo`."""
    return replace(params, logprobs=body.logprobs, prompt_logprobs=body.logprobs if body.echo else None)


def _chat_params(params: SamplingParams, body: p.ChatCompletionRequest) -> SamplingParams:
    """With `logprobs`, the engine reports each generated token's logprob and `top_logprobs` alternatives."""
    return replace(params, logprobs=(body.top_logprobs or 0) if body.logprobs else None)


def _reason(out: StepOutput) -> str:
    return out.finish_reason or "length"


def _sse(chunk: p.BaseModel | str) -> str:
    return f"data: {chunk if isinstance(chunk, str) else chunk.model_dump_json()}\n\n"


def create_app(bridge: Bridge, tokenizer: Tokenizer, config: ServerConfig) -> FastAPI:
    """The FastAPI app: error handlers, /health and /metrics, and the OpenAI routes behind the API key."""
    app = FastAPI(title="longcat-flash", docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    app.router.route_class = JSONOffLoopRoute
    metrics = Metrics(bridge)
    app.add_middleware(RequestGuard, api_key=config.api_key, max_body_bytes=config.max_body_bytes)  # inside metrics
    _add_error_handlers(app, metrics)

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = bridge.alive
        return JSONResponse({"status": "ok" if ok else "engine down"}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def scrape() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    def card() -> resp.ModelCard:
        return resp.ModelCard(id=config.model_name, created=resp.now(), max_model_len=config.context)

    @app.get("/v1/models")
    async def models() -> dict:
        return resp.ModelList(data=[card()]).model_dump()

    @app.get("/v1/models/{model_id:path}")  # the openai SDK's models.retrieve; ids may hold "/" (org/name)
    async def model(model_id: str) -> dict:
        check_model(model_id, config.model_name)
        return card().model_dump()

    _add_generation_routes(app, Generation(bridge, tokenizer, config), tokenizer, config)
    add_tokenizer_routes(app, tokenizer, config.context, config.model_name)
    install_openapi(app)
    return app


def model_defaults(model_dir: Path) -> dict[str, float]:
    """The MODEL_DEFAULTS fields a model's generation_config.json sets, checked as a request's would be; with
    `do_sample: false` the default is greedy, as transformers' generate reads it."""
    fields = generation_config(model_dir)
    defaults = {k: v for k, v in fields.items() if k in MODEL_DEFAULTS}
    if fields.get("do_sample") is False:
        defaults = {**defaults, "temperature": 0.0}
    try:
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in defaults.values()):
            raise ValueError(f"{', '.join(MODEL_DEFAULTS)} must be numbers, got {defaults}")
        SamplingParams(**defaults)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{model_dir / GENERATION_CONFIG}: {err}") from None
    return defaults


def _add_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    """Every error leaves as an OpenAI-shaped JSON body; every response is counted under its route template."""

    app.add_middleware(CountResponses, metrics=metrics, routes=app.router.routes)

    @app.exception_handler(HTTPException)
    async def routing_error(_request: Request, err: HTTPException) -> JSONResponse:
        """Starlette's own 404 (unknown path) and 405 (wrong method), in the OpenAI shape like every error."""
        codes = {404: "not_found", 408: "request_timeout", 413: "request_too_large", 503: "server_busy"}
        kind = "server_error" if err.status_code >= 500 else "invalid_request_error"
        response = APIError(err.status_code, f"{err.detail}", kind, code=codes.get(err.status_code)).response()
        response.headers.update(err.headers or {})  # 405 carries Allow
        return response

    @app.exception_handler(APIError)
    async def api_error(_request: Request, err: APIError) -> JSONResponse:
        return err.response()

    @app.exception_handler(Exception)
    async def bug(_request: Request, err: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return APIError(500, f"internal error: {type(err).__name__}", "server_error").response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        return _validation_error(err, request.headers.get("content-type")).response()


def _add_generation_routes(app: FastAPI, gen: Generation, tokenizer: Tokenizer, config: ServerConfig) -> None:
    """/v1/completions and /v1/chat/completions, plain and streamed (SSE ending with [DONE])."""

    @app.post("/v1/completions")
    async def completions(body: p.CompletionRequest, request: Request):
        prompts = await asyncio.to_thread(completion_prompts, tokenizer, body.prompt, config.context,
                                          body.add_special_tokens)
        names = ["prompt"] if len(prompts) == 1 else [f"prompt.{i}" for i in range(len(prompts))]
        params = [_completion_params(gen.check(body, ids, body.max_tokens, name), body)
                  for ids, name in zip(prompts, names)]
        _check_logprob_entries(body, sum(map(len, prompts)) if body.echo else 0,
                               0 if body.stream else sum(sp.max_new_tokens for sp in params), body.logprobs)
        params, constraint = await gen.constrain(params, body)
        groups = await gen.submit([(ids, _copies(sp, body.n)) for ids, sp in zip(prompts, params)], constraint)
        copies = [copy for group in groups for copy in group]
        watch = None if body.stream else request
        choices = [gen.completion(body, i * body.n + j, prompt, ids, copy, watch)
                   for i, (prompt, ids, group) in enumerate(zip(body.prompt, prompts, groups))
                   for j, copy in enumerate(group)]
        n_prompt = sum(map(len, prompts))  # each prompt counts once, however many copies it has
        response = partial(resp.CompletionResponse, id=resp.new_id("cmpl"), created=resp.now(), model=config.model_name)
        if not body.stream:
            answers, used = await _answers([_joined_completion(i, chunks) for i, chunks in enumerate(choices)],
                                           partial(gen.close, copies))
            return await resp.whole_reply(response(choices=answers, usage=resp.Usage.of(n_prompt, used)))
        return _streamed(choices, response, n_prompt, body.include_usage, partial(gen.close, copies), _has_news)

    @app.post("/v1/chat/completions")
    async def chat(body: p.ChatCompletionRequest, request: Request):
        plan = _tool_plan(body)
        prompt = await asyncio.to_thread(chat_prompt, tokenizer, body, plan, config.context)
        checked = _chat_params(gen.check(body, prompt, body.limit, "messages"), body)
        _check_logprob_entries(body, 0, 0 if body.stream else checked.max_new_tokens,
                               (body.top_logprobs or 0) if body.logprobs else None)
        [params], constraint = await gen.constrain([checked], body, plan)
        copies = (await gen.submit([(prompt, _copies(params, body.n))], constraint))[0]
        response = partial(resp.ChatCompletionResponse if not body.stream else resp.ChatCompletionChunk,
                           id=resp.new_id("chatcmpl"), created=resp.now(), model=config.model_name)
        if not body.stream:
            answers, used = await _answers([gen.chat_choice(body, plan, j, copy, request)
                                            for j, copy in enumerate(copies)], partial(gen.close, copies))
            return await resp.whole_reply(response(choices=answers, usage=resp.Usage.of(len(prompt), used)))
        return _streamed([gen.chat_chunks(body, plan, j, copy) for j, copy in enumerate(copies)], response,
                         len(prompt), body.include_usage, partial(gen.close, copies))


def _check_logprob_entries(body: p._Sampling, echoed: int, generated: int, alternatives: int | None) -> None:
    """Each scored token carries alternatives + 1 entries in each of the n copies of a reply: echoed prompt tokens
    (a 40 KB request, 4 prompts of 4000 ids with n=32 and logprobs 20, made a 312 MB reply and held 3.6 GB while
    building it), and the generated tokens of a reply built whole (up to its token limit; a stream sends them as
    they come). Each kind is bounded on its own, so that an evaluator's batch of echoed prompts scored with one
    generated token fits. `alternatives`: the request's logprobs (chat: top_logprobs), None without logprobs."""
    if alternatives is None:
        return
    for tokens, what in ((echoed, "echoed prompt tokens"), (generated, "generated tokens (the token limit)")):
        entries = tokens * body.n * (alternatives + 1)
        if entries > p.MAX_LOGPROB_ENTRIES:
            raise APIError(400, f"logprobs: {tokens} {what} x n={body.n} x {alternatives + 1} entries a token is "
                                f"{entries} entries; at most {p.MAX_LOGPROB_ENTRIES} of each in one reply: send a "
                                "smaller max_tokens, n or number of alternatives, fewer or shorter prompts, or stream "
                                "the reply", param="logprobs", code="invalid_value")


async def _answers(calls: list[Awaitable[tuple[Any, int]]], close: Callable[[], None]) -> tuple[list, int]:
    """Non-streamed choices: all of them or the first error, their copies closed however it ends; and the
    completion tokens they used."""
    try:
        answers = await _all_or_none(calls)
    finally:
        close()
    return [choice for choice, _ in answers], sum(n for _, n in answers)


def _streamed(choices: list[AsyncIterator[tuple[Any, int]]], response: Callable[..., Any], n_prompt: int,
              include_usage: bool, close: Callable[[], None], shown: Callable[[Any], bool] = lambda choice: True
              ) -> StreamingResponse:
    """The choices' chunks as SSE events as they come, each wrapped by `response(choices=[chunk])`; then, with
    `include_usage` (OpenAI's stream_options), one of no choices carrying the usage."""
    async def events() -> AsyncIterator[str]:
        counts = [0] * len(choices)
        async for choice, n in _merged(choices):
            counts[choice.index] = n
            if shown(choice):
                yield _sse(response(choices=[choice]))
        if include_usage:
            yield _sse(response(choices=[], usage=resp.Usage.of(n_prompt, sum(counts))))
    return _event_stream(events(), close)


def _has_news(choice: resp.CompletionChoice) -> bool:
    """A completion chunk worth sending: text, a finish reason or logprobs (an empty step sends nothing)."""
    return bool(choice.text or choice.finish_reason or (choice.logprobs and choice.logprobs.tokens))


class _ClosingStream(StreamingResponse):
    """A StreamingResponse that runs `close` however the response ends: a client gone before the body's first
    chunk cancels the response before the body generator starts, so the generator's own `finally` never runs."""

    def __init__(self, body: AsyncIterator[str], close: Callable[[], None]) -> None:
        super().__init__(body, media_type="text/event-stream")
        self.close = close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.close()


def _event_stream(events: AsyncIterator[str], close: Callable[[], None]) -> StreamingResponse:
    """An SSE response of `events` ended by `[DONE]`; an error after the status line went out (with the first
    chunk) becomes an error event before `[DONE]`, as vLLM sends it. `close` (idempotent) runs however the stream
    ends, before `[DONE]` when it ends by itself."""
    async def body() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield event
        except APIError as err:
            yield _sse(resp.ErrorResponse(error=err.body))
        finally:
            close()
        yield _sse("[DONE]")
    return _ClosingStream(body(), close)


async def _joined_completion(index: int, chunks: AsyncIterator[tuple[resp.CompletionChoice, int]]
                             ) -> tuple[resp.CompletionChoice, int]:
    """A non-streamed completion choice: its chunks joined, and its completion-token count."""
    parts, n = [], 0
    async for part, n in chunks:
        parts.append(part)
    scored = [part.logprobs for part in parts if part.logprobs is not None]
    return resp.CompletionChoice(index=index, text="".join(part.text for part in parts),
                              finish_reason=parts[-1].finish_reason if parts else "length",
                              logprobs=joined(scored) if scored else None), n


def _tool_plan(body: p.ChatCompletionRequest) -> ToolPlan:
    try:
        return plan_tools(body)
    except ToolRequestError as err:
        raise APIError(400, str(err), param=err.param) from None
