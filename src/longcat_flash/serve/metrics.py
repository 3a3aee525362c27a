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
from starlette.types import Scope

from .bridge import AsyncEngine

UNKNOWN_PATH = "unknown"
CONTENT_TYPE = CONTENT_TYPE_LATEST


def route_template(routes: Sequence[BaseRoute], scope: Scope) -> str:
    """The template of the route that serves `scope` (a wrong method still names its route), else UNKNOWN_PATH."""
    for route in routes:
        match, _ = route.matches(scope)
        if match is not Match.NONE:
            return getattr(route, "path", UNKNOWN_PATH)
    return UNKNOWN_PATH


class EngineCollector(Collector):
    """Engine figures read at scrape time, without locks from the step thread's objects: each is one atomic read,
    good enough to scrape. Requests ended by a stop string are cancelled in the engine but finished to a client."""

    def __init__(self, bridge: AsyncEngine) -> None:
        self.bridge = bridge

    def collect(self) -> Iterator[Metric]:
        engine, stops = self.bridge.engine, self.bridge.text_stops
        stats, cache, drafts = engine.stats, engine.cache, engine.stats.drafts
        total_pages = cache.config.num_pages - 1
        counters = [
            ("longcat_requests_finished", "generations finished (stop or length)", stats.finished + stops),
            ("longcat_requests_cancelled", "generations cancelled (client gone)", stats.cancelled - stops),
            ("longcat_requests_preempted", "preemptions for lack of cache pages", stats.preempted),
            ("longcat_prompt_tokens", "prompt tokens admitted", stats.prompt_tokens),
            ("longcat_generation_tokens", "tokens generated", stats.generated_tokens),
            ("longcat_spec_draft_tokens", "MTP draft tokens proposed", drafts.drafted),
            ("longcat_spec_accepted_tokens", "MTP draft tokens accepted", drafts.accepted),
        ]
        gauges = [
            ("longcat_queue_depth", "requests waiting for admission", len(engine.scheduler.waiting)),
            ("longcat_running_requests", "requests in the running batch", len(engine.scheduler.running)),
            ("longcat_cache_pages_used", "KV cache pages in use", cache.used_pages),
            ("longcat_cache_pages_total", "KV cache pages in the pool", total_pages),
            ("longcat_cache_usage_ratio", "fraction of KV cache pages in use", cache.used_pages / total_pages),
            ("longcat_spec_acceptance_rate", "accepted / proposed drafts", drafts.acceptance_rate),
            ("longcat_spec_mean_accepted_length", "tokens emitted per verification forward",
             drafts.mean_accepted_length),
        ]
        yield from (CounterMetricFamily(name, help_, value=value) for name, help_, value in counters)
        yield from (GaugeMetricFamily(name, help_, value=value) for name, help_, value in gauges)


class Metrics:
    """One app's registry: the HTTP response counter plus the engine's figures."""

    def __init__(self, bridge: AsyncEngine) -> None:
        self.registry = CollectorRegistry()
        self.responses = Counter("longcat_http_requests", "HTTP responses by route template and status",
                                 ("path", "status"), registry=self.registry)
        self.registry.register(EngineCollector(bridge))

    def observe(self, routes: Sequence[BaseRoute], scope: Scope, status: int) -> None:
        self.responses.labels(route_template(routes, scope), str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
