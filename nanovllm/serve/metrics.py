"""Prometheus metrics of a server: engine gauges read at scrape time, token counters and latencies."""
from __future__ import annotations

import time
from collections.abc import AsyncIterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from nanovllm.outputs import RequestOutput

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
                   1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)

# gauge name -> (help, how to read it from `engine.stats()`)
GAUGES = {
    "num_requests_running": ("Requests with a sequence in the running batch.", lambda s: s["num_requests_running"]),
    "num_requests_waiting": ("Requests waiting to be scheduled.", lambda s: s["num_requests_waiting"]),
    "kv_blocks_used": ("KV-cache blocks in use.", lambda s: s["kv_blocks_used"]),
    "kv_blocks_total": ("KV-cache blocks in all.", lambda s: s["kv_blocks_total"]),
    "prefix_cache_hit_rate": ("Share of prompt tokens found in the prefix cache, since start.",
                              lambda s: s["prefix_hit_tokens"] / max(s["prefix_query_tokens"], 1)),
}


class Metrics:
    """One app's metrics in its own registry, so that several apps can live in one process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.gauges = {name: Gauge(f"nanovllm:{name}", doc, registry=self.registry)
                       for name, (doc, _) in GAUGES.items()}
        self.prompt_tokens = Counter("nanovllm:prompt_tokens", "Prompt tokens of requests served.",
                                     registry=self.registry)
        self.generation_tokens = Counter("nanovllm:generation_tokens", "Tokens generated.", registry=self.registry)
        self.time_to_first_token = Histogram("nanovllm:time_to_first_token_seconds",
                                             "From a request's arrival to its first token.",
                                             buckets=LATENCY_BUCKETS, registry=self.registry)
        self.inter_token_latency = Histogram("nanovllm:inter_token_latency_seconds",
                                             "Between consecutive tokens of a request (a delta's interval "
                                             "spread over its tokens).", buckets=LATENCY_BUCKETS,
                                             registry=self.registry)

    def render(self, stats: dict[str, float]) -> bytes:
        """The Prometheus text exposition, with the gauges set from `stats`."""
        for name, (_, read) in GAUGES.items():
            self.gauges[name].set(read(stats))
        return generate_latest(self.registry)

    async def track(self, stream: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
        """Pass a request's deltas through, counting its tokens and timing them."""
        start = last = time.perf_counter()
        num_seen = None  # tokens handed out so far; None before the first delta
        async for delta in stream:
            now = time.perf_counter()
            num_tokens = sum(len(c.token_ids) for c in delta.outputs)
            if num_seen is None:
                self.prompt_tokens.inc(len(delta.prompt_token_ids))
                num_seen = 0
            num_later = num_tokens
            if num_seen == 0 and num_tokens:
                self.time_to_first_token.observe(now - start)
                num_later -= 1
            for _ in range(num_later):
                self.inter_token_latency.observe((now - last) / num_later)
            if num_tokens:
                last = now
            num_seen += num_tokens
            self.generation_tokens.inc(num_tokens)
            yield delta
