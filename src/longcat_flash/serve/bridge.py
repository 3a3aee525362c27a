"""The asyncio <-> engine bridge: the engine steps on its own thread; request handlers talk to it by message.

Two halves. `EngineLoop` is the engine's side: one thread owns the Engine (it is not thread-safe), applies "add"
and "cancel" messages from its inbox, steps, and hands every step's results to a sink as one `Batch`. `Bridge`
is the handlers' side: `submit` prompts and await the engine's verdict (request ids, or the ValueError /
QueueFull it raised), then read StepOutputs from an asyncio.Queue per request; `cancel` (client gone, or, with
`complete=True`, a reply the server ended itself, which /metrics counts as finished) is a message too, and the
loop frees the request's cache pages before its next step. Backpressure comes from the scheduler's queue
(QueueFull past the free running slots and `max_waiting` -> HTTP 429).

`AsyncEngine` runs the loop on a thread of this process (tests, embedding); `serve/engine_process.py` runs it in
a child process, so that the engine's Python never waits for the event loop's GIL.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace

from ..infer.engine import Engine, EngineStats, StepOutput
from ..infer.sampling import SamplingParams

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.05  # an idle engine thread looks at its inbox this often (a submission wakes it at once)
GATHER_QUIET_S, GATHER_MAX_S = 0.002, 0.01  # a burst of submissions is gathered until this quiet, at most this long


@dataclass
class EngineFailed:
    """Delivered to every open stream when a step raised, the engine died or the server stops: the request cannot
    continue. `status`: the HTTP status its response gets (500 for a failed step, 503 when the engine is gone)."""

    message: str
    status: int = 500


@dataclass(frozen=True)
class EngineSnapshot:
    """The engine's figures after a batch, for /metrics: read on the engine's side, so never torn."""

    stats: EngineStats = field(default_factory=EngineStats)
    ended_here: int = 0  # complete replies the server ended (a stop string, a finished tool call): the engine
    # counts them among its cancellations
    waiting: int = 0
    running: int = 0
    pages_used: int = 0
    pages_total: int = 1


@dataclass
class Batch:
    """What one turn of the engine loop produced: verdicts on submissions (token -> request ids or the error),
    the step's outputs, and the figures after it."""

    replies: list[tuple[int, list[int] | Exception]]
    outputs: list[tuple[int, StepOutput | EngineFailed]]
    snapshot: EngineSnapshot


class EngineLoop:
    """The engine's thread: messages in (`post`), a Batch out to `sink` after every turn that did something."""

    def __init__(self, engine: Engine, sink: Callable[[Batch], None]) -> None:
        self.engine, self.sink = engine, sink
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._ended_here = 0

    def post(self, message: tuple) -> None:
        """("add", token, prompt, params), ("refuse", token, error) or ("cancel", request id, complete); any
        thread."""
        self._inbox.put(message)
        self._wake.set()

    def stop(self) -> None:
        self._stopped.set()
        self._wake.set()

    def run(self) -> None:
        self.sink(Batch([], [], self.snapshot()))  # /metrics shows the real pool from the start, not a placeholder
        while not self._stopped.is_set():
            replies, handled = self._drain_inbox()
            if replies:  # before the step (a long prefill): a handler whose client leaves meanwhile can name its ids
                self.sink(Batch(replies, [], self.snapshot()))
            outputs = self._step() if self.engine.has_work() else None
            if outputs is not None or (handled and not replies):
                self.sink(Batch([], outputs or [], self.snapshot()))
            elif not handled:
                if self._wake.wait(IDLE_WAIT_S):
                    self._gather()
                self._wake.clear()

    def _gather(self) -> None:
        """Woken from idle: let the rest of a burst of submissions land (until the inbox has been quiet for
        GATHER_QUIET_S, at most GATHER_MAX_S), so that they prefill together instead of one first alone."""
        deadline, size = time.monotonic() + GATHER_MAX_S, -1
        while self._inbox.qsize() != size and time.monotonic() < deadline:
            size = self._inbox.qsize()
            time.sleep(GATHER_QUIET_S)

    def snapshot(self) -> EngineSnapshot:
        engine = self.engine
        return EngineSnapshot(replace(engine.stats, drafts=replace(engine.stats.drafts)), self._ended_here,
                              len(engine.scheduler.waiting), len(engine.scheduler.running), engine.cache.used_pages,
                              engine.cache.config.num_pages - 1)

    def _drain_inbox(self) -> tuple[list[tuple[int, list[int] | Exception]], int]:
        """Apply every waiting message: (the verdicts on submissions, how many messages there were)."""
        replies, handled = [], 0
        while True:
            try:
                kind, *payload = self._inbox.get_nowait()
            except queue.Empty:
                return replies, handled
            handled += 1
            if kind == "cancel":
                rid, complete = payload
                if self.engine.cancel(rid) and complete:
                    self._ended_here += 1
                continue
            if kind == "refuse":  # a submission refused before it reached the engine
                replies.append(tuple(payload))
                continue
            token, jobs = payload
            try:
                replies.append((token, self.engine.add_jobs(jobs)))
            except Exception as err:  # ValueError, QueueFull: the handler maps it to an HTTP status
                replies.append((token, err))

    def _step(self) -> list[tuple[int, StepOutput | EngineFailed]]:
        try:
            return [(out.request_id, out) for out in self.engine.step()]
        except Exception as err:  # a bug must not kill the server: fail the open requests, keep serving
            log.exception("engine step failed")
            failed = list(self.engine.requests)
            for rid in failed:
                self.engine.cancel(rid, failed=True)
            return [(rid, EngineFailed(f"engine error: {err}")) for rid in failed]


class Bridge:
    """The handlers' side of an EngineLoop, wherever it runs: `_post` carries a message to it, `receive` takes
    each Batch back (on a thread that is not the event loop's) and routes it to the waiting handlers."""

    vocab_size: int
    context: int  # Engine.max_context: max_position_embeddings, or less where the KV cache holds less
    max_queued: int  # sequences an idle engine takes at once (a prompt's n copies are n): running + waiting
    max_running: int  # sequences decoded together; a prompt's n copies are n of them

    def __init__(self) -> None:
        self._tokens = itertools.count()
        self._pending: dict[int, tuple[Future, list[tuple[asyncio.AbstractEventLoop, asyncio.Queue]]]] = {}
        self._streams: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()  # _pending and _streams: handlers add, the receiving thread takes
        self.latest = EngineSnapshot()
        self.alive = True

    def _post(self, message: tuple) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    async def submit(self, jobs: list[tuple[list[int], list[SamplingParams]]]
                     ) -> list[list[tuple[int, asyncio.Queue]]]:
        """Queue prompts, each as len(params) copies (one prefill, shared cache pages: OpenAI's `n`), all or none
        (Engine.add_jobs); returns, per prompt, each copy's request id and the queue its StepOutputs arrive on."""
        loop, token, done = asyncio.get_running_loop(), next(self._tokens), Future()
        queues = [[asyncio.Queue() for _ in params] for _, params in jobs]
        with self._lock:  # with fail_all's: a submission either fails here or is in _pending when it runs
            if not self.alive:
                raise RuntimeError("the engine is not running")
            self._pending[token] = (done, [(loop, q) for qs in queues for q in qs])
        self._post(("add", token, jobs))
        try:
            ids = await asyncio.wrap_future(done)
        except asyncio.CancelledError:  # the handler left: `receive` ends the requests of a submission it finds
            done.add_done_callback(self._end_unread)  # cancelled, but it may have settled this one first
            raise
        return [list(zip(rids, qs, strict=True)) for rids, qs in zip(ids, queues, strict=True)]

    def _end_unread(self, done: Future) -> None:
        """Cancel the requests of a submission whose handler left after `receive` had settled it (the receiving
        thread ran between the handler's cancel and its wake-up): they had streams but no reader, and ran to their
        token limit."""
        if not done.cancelled() and done.exception() is None:
            for rid in (rid for group in done.result() for rid in group):
                self.cancel(rid)

    def cancel(self, request_id: int, complete: bool = False) -> None:
        """End a request early: its client left, or (`complete`) the server ended the reply itself (a stop string
        in its text, a finished tool call with parallel calls off)."""
        with self._lock:
            self._streams.pop(request_id, None)
        if self.alive:
            self._post(("cancel", request_id, complete))

    def receive(self, batch: Batch) -> None:
        """Route a Batch: settle submissions (registering their streams first, so no output can come before
        its queue), then hand the outputs over, one wake-up per event loop, not one per request."""
        settled, orphans = [], []
        with self._lock:
            for token, verdict in batch.replies:
                done, targets = self._pending.pop(token, (None, None))  # None: fail_all failed it meanwhile
                rids = [] if isinstance(verdict, Exception) else [rid for group in verdict for rid in group]
                if done is None or not done.set_running_or_notify_cancel():  # or its handler left: nobody reads
                    orphans += rids
                    continue
                if not isinstance(verdict, Exception):
                    self._streams.update(zip(rids, targets, strict=True))
                settled.append((done, verdict))
            by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, StepOutput | EngineFailed]]] = {}
            for rid, item in batch.outputs:
                stream = self._streams.get(rid)
                if stream is not None:
                    by_loop.setdefault(stream[0], []).append((stream[1], item))
                if isinstance(item, EngineFailed) or item.finished:
                    self._streams.pop(rid, None)
        self.latest = batch.snapshot
        for done, verdict in settled:
            done.set_exception(verdict) if isinstance(verdict, Exception) else done.set_result(verdict)
        for rid in orphans:
            self.cancel(rid)
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the handlers' loop is closed: nobody is listening any more
                pass

    def fail_all(self, message: str) -> None:
        """The engine is gone, or the server stops: every waiting submission and open stream fails (HTTP 503)."""
        with self._lock:
            self.alive = False
            pending, self._pending = list(self._pending.values()), {}
            rids = list(self._streams)
        for done, _ in pending:
            if done.set_running_or_notify_cancel():
                done.set_exception(RuntimeError(message))
        self.receive(Batch([], [(rid, EngineFailed(message, 503)) for rid in rids], self.latest))


class AsyncEngine(Bridge):
    """The EngineLoop on a thread of this process."""

    def __init__(self, engine: Engine) -> None:
        super().__init__()
        self.engine, self.vocab_size = engine, engine.vocab_size
        self.context, self.max_queued = engine.max_context, engine.max_queued
        self.max_running = engine.config.max_running
        self._loop = EngineLoop(engine, self.receive)
        self._thread = threading.Thread(target=self._run, name="longcat-engine", daemon=True)

    def start(self) -> AsyncEngine:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._loop.stop()
        self._thread.join(timeout=10)

    def _post(self, message: tuple) -> None:
        self._loop.post(message)

    def _run(self) -> None:
        try:
            self._loop.run()
        finally:
            self.fail_all("the engine thread stopped")


def _put_all(items: list[tuple[asyncio.Queue, StepOutput | EngineFailed]]) -> None:
    for outputs, item in items:
        outputs.put_nowait(item)
