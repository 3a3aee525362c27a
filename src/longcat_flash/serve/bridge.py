"""The asyncio <-> engine bridge: one background thread owns the Engine and steps it; requests talk to it by queue.

The engine is not thread-safe, so every call into it (add, cancel, step) happens on the step thread. Handlers
`submit` a prompt and await the engine's verdict (a request id, or the ValueError / QueueFull it raised), then
read StepOutputs from their own asyncio.Queue, filled via `call_soon_threadsafe`. `cancel` (client gone) is a
message too; the thread frees the request's cache pages before its next step. A handler that saw a stop string
in the text cancels the same way, with `stopped=True`, so that /metrics counts it as finished, not abandoned. Backpressure comes from the
scheduler's `max_waiting` (QueueFull -> HTTP 429).
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass

from ..infer.engine import Engine, StepOutput
from ..infer.sampling import SamplingParams

log = logging.getLogger(__name__)


@dataclass
class EngineFailed:
    """Delivered to every open stream when a step raised: the request cannot continue."""

    message: str


class AsyncEngine:
    def __init__(self, engine: Engine, idle_wait_s: float = 0.05) -> None:
        self.engine, self.idle_wait_s = engine, idle_wait_s
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="longcat-engine", daemon=True)
        self.alive = True
        self.text_stops = 0  # requests ended by a stop string (the engine counts them among its cancellations)

    def start(self) -> AsyncEngine:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        self._wake.set()
        self._thread.join(timeout=10)

    async def submit(self, prompt: list[int], params: list[SamplingParams]) -> list[tuple[int, asyncio.Queue]]:
        """Queue len(params) copies of a prompt on the engine thread (one prefill, shared cache pages: OpenAI's
        `n`); returns each copy's request id and the queue its StepOutputs arrive on."""
        if not self.alive:
            raise RuntimeError("the engine thread is not running")
        loop, queues = asyncio.get_running_loop(), [asyncio.Queue() for _ in params]
        done: Future = Future()
        self._inbox.put(("add", (prompt, params, loop, queues), done))
        self._wake.set()
        return list(zip(await asyncio.wrap_future(done), queues))

    def cancel(self, request_id: int, stopped: bool = False) -> None:
        """End a request early: its client left, or (`stopped`) its text reached a stop string."""
        self._inbox.put(("cancel", request_id, stopped))
        self._wake.set()

    # ---- the engine thread ----
    def _run(self) -> None:
        try:
            while not self._stopped.is_set():
                self._drain_inbox()
                if self.engine.has_work():
                    self._step()
                else:
                    self._wake.wait(self.idle_wait_s)
                    self._wake.clear()
        finally:
            self.alive = False

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, payload, done = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "cancel":
                self._cancel(payload, stopped=done)
                continue
            prompt, params, loop, queues = payload
            try:
                rids = self.engine.add_copies(prompt, params)
            except Exception as err:  # ValueError, QueueFull: the handler maps it to an HTTP status
                done.set_exception(err)
                continue
            self._streams.update((rid, (loop, outputs)) for rid, outputs in zip(rids, queues))
            done.set_result(rids)

    def _cancel(self, rid: int, stopped: bool) -> None:
        if self.engine.cancel(rid) and stopped:
            self.text_stops += 1
        self._streams.pop(rid, None)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as err:  # a bug must not kill the server: fail the open requests, keep serving
            log.exception("engine step failed")
            for rid in self._streams:
                self.engine.cancel(rid)
            self._deliver([(rid, EngineFailed(f"engine error: {err}")) for rid in self._streams])
            self._streams.clear()
            return
        self._deliver([(out.request_id, out) for out in outputs])
        for out in outputs:
            if out.finished:
                self._streams.pop(out.request_id, None)

    def _deliver(self, items: list[tuple[int, StepOutput | EngineFailed]]) -> None:
        """Hand a step's outputs to their handlers: one wake-up per event loop per step, not one per request."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[int, asyncio.Queue, StepOutput | EngineFailed]]] = {}
        for rid, item in items:
            stream = self._streams.get(rid)
            if stream is not None:
                by_loop.setdefault(stream[0], []).append((rid, stream[1], item))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:  # the handlers' loop is closed: nobody is listening any more
                for rid, _, _ in batch:
                    self.cancel(rid)


def _put_all(batch: list[tuple[int, asyncio.Queue, StepOutput | EngineFailed]]) -> None:
    for _, outputs, item in batch:
        outputs.put_nowait(item)
