"""GET /metrics: the engine's statistics in the Prometheus text format.

Invariant: every value is read from one `engine.stats()` snapshot at scrape time; nothing here
keeps counts of its own.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from pyllama4 import Engine
from pyllama4.server.asgi import Receive, Send, respond


class EngineCollector:
    """Prometheus view of the engine's statistics, read at scrape time."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        s = self.engine.stats()
        gauges = {
            "num_running_reqs": ("Requests running", s.num_running),
            "num_queue_reqs": ("Requests waiting", s.num_waiting),
            "global_pages_used": ("Global-pool KV pages held or cached", s.global_pages_used),
            "global_pages_total": ("Global-pool KV pages", s.global_pages_total),
            "local_pages_used": ("Chunk-local KV pages held or cached", s.local_pages_used),
            "local_pages_total": ("Chunk-local KV pages", s.local_pages_total),
            "token_usage": ("Fraction of global KV pages in use", s.kv_usage),
            "cache_hit_rate": ("Prompt tokens served by the prefix cache", s.cache_hit_rate),
            "spec_accept_length": (
                "Mean tokens per EAGLE3 verify step (accepted drafts + 1)",
                s.spec_accept_length,
            ),
            "pages_held_by_requests": ("Global KV pages held by requests", s.global_pages_held),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(f"pyllama4_{name}", doc, value=value)
        counters = {
            "prompt_tokens": ("Prompt tokens admitted", s.prompt_tokens),
            "cached_prompt_tokens": ("Prompt tokens from the prefix cache", s.cached_prompt_tokens),
            "generation_tokens": ("Tokens generated", s.generation_tokens),
            "retractions": ("Requests retracted for lack of KV pages", s.num_retractions),
            "images_encoded": ("Images run through the vision tower", s.images_encoded),
            "spec_verify_steps": ("EAGLE3 verify steps (per request)", s.spec_verify_steps),
            "spec_accepted_tokens": ("Tokens from EAGLE3 verify steps", s.spec_accepted_tokens),
        }
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(f"pyllama4_{name}", doc, value=value)


class MetricsRoute:
    """The /metrics endpoint over one engine's collector."""

    def __init__(self, engine: Engine):
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(engine))

    async def __call__(self, body: bytes, send: Send, receive: Receive) -> None:
        await respond(
            send, 200, generate_latest(self.registry), content_type=b"text/plain; version=0.0.4"
        )
