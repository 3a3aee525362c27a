"""/metrics through `prometheus_client`: requests by route and status, tokens, queue depth, cache use, speculation.

Each app gets its own registry, never the process-global one, so two servers (or tests) in one process never share
series. Labels are bounded: the path label is the matched route's template, and every path that matches no route
shares the one value UNKNOWN_PATH, so requests to random paths cannot grow the number of series.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .bridge import Bridge

UNKNOWN_PATH = "unknown"
CONTENT_TYPE = CONTENT_TYPE_LATEST


def route_template(routes: Sequence[BaseRoute], scope: Scope) -> str:
    """The template of the route that serves `scope` (a wrong method still names its route), else UNKNOWN_PATH."""
    for route in routes:
        match, _ = route.matches(scope)
        if match is not Match.NONE:
            return getattr(route, "path_format", UNKNOWN_PATH)  # as /openapi.json names it: no converters
    return UNKNOWN_PATH


class EngineCollector(Collector):
    """Engine figures as of the engine's latest batch (the bridge's snapshot: taken on the engine's side, so never
    torn). Replies the server ends itself (a stop string, a finished tool call) are cancelled in the engine but
    finished to a client."""

    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge

    def collect(self) -> Iterator[Metric]:
        now = self.bridge.latest
        stats, ended_here, drafts = now.stats, now.ended_here, now.stats.drafts
        counters = [
            ("longcat_requests_finished", "generations finished (stop, length or tool calls)",
             stats.finished + ended_here),
            ("longcat_requests_cancelled", "generations cancelled (client gone)", stats.cancelled - ended_here),
            ("longcat_requests_failed", "generations ended by an error (non-finite logits, a failed grammar or "
             "engine step)", stats.failed),
            ("longcat_requests_preempted", "preemptions for lack of cache pages", stats.preempted),
            ("longcat_prompt_tokens", "prompt tokens admitted", stats.prompt_tokens),
            ("longcat_generation_tokens", "tokens the engine generated (with the steps a stop string's cancel "
             "took to arrive: usage bills fewer)", stats.generated_tokens),
            ("longcat_spec_draft_tokens", "MTP draft tokens proposed", drafts.drafted),
            ("longcat_spec_accepted_tokens", "MTP draft tokens accepted", drafts.accepted),
        ]
        gauges = [
            ("longcat_queue_depth", "requests waiting for admission", now.waiting),
            ("longcat_running_requests", "requests in the running batch", now.running),
            ("longcat_cache_pages_used", "KV cache pages in use", now.pages_used),
            ("longcat_cache_pages_total", "KV cache pages in the pool", now.pages_total),
            ("longcat_cache_usage_ratio", "fraction of KV cache pages in use", now.pages_used / now.pages_total),
            ("longcat_spec_acceptance_rate", "accepted / proposed drafts (NaN before any)",
             _or_nan(drafts.acceptance_rate)),
            ("longcat_spec_mean_accepted_length", "tokens emitted per verification forward (NaN before any)",
             _or_nan(drafts.mean_accepted_length)),
        ]
        yield from (CounterMetricFamily(name, help_, value=value) for name, help_, value in counters)
        yield from (GaugeMetricFamily(name, help_, value=value) for name, help_, value in gauges)


class Metrics:
    """One app's registry: the HTTP response counter plus the engine's figures."""

    def __init__(self, bridge: Bridge) -> None:
        self.registry = CollectorRegistry()
        self.responses = Counter("longcat_http_requests", "HTTP responses by route template and status",
                                 ("path", "status"), registry=self.registry)
        self.registry.register(EngineCollector(bridge))

    def observe(self, routes: Sequence[BaseRoute], scope: Scope, status: int) -> None:
        self.responses.labels(route_template(routes, scope), str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class CountResponses:
    """ASGI middleware: counts each HTTP response under its route template and status as its headers leave.

    Plain ASGI rather than Starlette's BaseHTTPMiddleware, which passes every body chunk of a stream through an
    extra task and memory channel: on an SSE stream that was a cost per token, paid on the event loop.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: Sequence[BaseRoute]) -> None:
        self.app, self.metrics, self.routes = app, metrics, routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        started = False

        async def counted(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                self.metrics.observe(self.routes, scope, message["status"])
            await send(message)

        try:
            await self.app(scope, receive, counted)
        except Exception:  # the 500 that Starlette's outermost error middleware sends for it, outside this one
            if not started:
                self.metrics.observe(self.routes, scope, 500)
            raise


def _or_nan(value: float | None) -> float:
    """A figure that has no value yet, as Prometheus writes one (a 0 would read as "every draft rejected")."""
    return float("nan") if value is None else value
