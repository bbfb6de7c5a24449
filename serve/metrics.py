"""The server's Prometheus metrics (text exposition format at /metrics), in a registry of its own
so two servers in one process (tests) never share counters."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, router):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter(
            "accelc_requests", "HTTP requests answered, by endpoint and status code", ["endpoint", "status"],
            registry=registry,
        )  # fmt: skip
        self.prompt_tokens = Counter("accelc_prompt_tokens", "Prompt tokens of admitted requests", registry=registry)
        self.generated_tokens = Counter("accelc_generated_tokens", "Tokens generated", registry=registry)
        self.latency = Histogram(
            "accelc_request_seconds", "Time from a generation's admission to its last token", ["endpoint"],
            buckets=LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        self.first_token = Histogram(
            "accelc_time_to_first_token_seconds", "Time from admission to the first generated token",
            buckets=LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        self.batch_size = Histogram(
            "accelc_batch_size", "Sequences decoded per model call", buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=registry,
        )  # fmt: skip
        router.on_batch = self.batch_size.observe
        Gauge(
            "accelc_requests_outstanding", "Requests decoding or waiting for a place", registry=registry
        ).set_function(lambda: router.outstanding)
        Gauge("accelc_request_capacity", "Requests admitted at most before HTTP 429", registry=registry).set_function(
            lambda: router.capacity
        )
        Gauge("accelc_workers_alive", "Serving worker processes running", registry=registry).set_function(
            lambda: router.alive
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
