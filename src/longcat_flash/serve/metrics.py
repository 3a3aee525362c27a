"""/metrics in the Prometheus text format: requests, tokens, queue depth, cache use, speculative acceptance."""
from __future__ import annotations

from collections import Counter

from ..infer.engine import Engine


def _line(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> str:
    body = "\n".join(f"{name}{labels} {value:g}" for labels, value in samples)
    return f"# HELP {name} {help_}\n# TYPE {name} {kind}\n{body}"


def render_metrics(engine: Engine, responses: Counter) -> str:
    """Read without locks from the step thread's objects: each figure is one atomic read, good enough to scrape."""
    stats, cache, drafts = engine.stats, engine.cache, engine.stats.drafts
    total_pages = cache.config.num_pages - 1
    requests = [(f'{{path="{path}",status="{status}"}}', n) for (path, status), n in sorted(responses.items())]
    blocks = [
        _line("longcat_http_requests_total", "counter", "HTTP responses by path and status", requests or [("", 0)]),
        _line("longcat_requests_finished_total", "counter", "generations finished (stop or length)",
              [("", stats.finished)]),
        _line("longcat_requests_cancelled_total", "counter", "generations cancelled (client gone)",
              [("", stats.cancelled)]),
        _line("longcat_requests_preempted_total", "counter", "preemptions for lack of cache pages",
              [("", stats.preempted)]),
        _line("longcat_prompt_tokens_total", "counter", "prompt tokens admitted", [("", stats.prompt_tokens)]),
        _line("longcat_generation_tokens_total", "counter", "tokens generated", [("", stats.generated_tokens)]),
        _line("longcat_queue_depth", "gauge", "requests waiting for admission", [("", len(engine.scheduler.waiting))]),
        _line("longcat_running_requests", "gauge", "requests in the running batch",
              [("", len(engine.scheduler.running))]),
        _line("longcat_cache_pages_used", "gauge", "KV cache pages in use", [("", cache.used_pages)]),
        _line("longcat_cache_pages_total", "gauge", "KV cache pages in the pool", [("", total_pages)]),
        _line("longcat_cache_usage_ratio", "gauge", "fraction of KV cache pages in use",
              [("", cache.used_pages / total_pages)]),
        _line("longcat_spec_draft_tokens_total", "counter", "MTP draft tokens proposed", [("", drafts.drafted)]),
        _line("longcat_spec_accepted_tokens_total", "counter", "MTP draft tokens accepted", [("", drafts.accepted)]),
        _line("longcat_spec_acceptance_rate", "gauge", "accepted / proposed drafts", [("", drafts.acceptance_rate)]),
        _line("longcat_spec_mean_accepted_length", "gauge", "tokens emitted per verification forward",
              [("", drafts.mean_accepted_length)]),
    ]
    return "\n".join(blocks) + "\n"
