"""Prometheus metrics of one server: requests, latency per adapter, batch sizes, queue depth, residency."""

from __future__ import annotations

import time

import prometheus_client as prom

from .engine import Engine


class Metrics:
    """Prometheus metrics in their own registry, so several apps can live in one process (tests)."""

    def __init__(self, engine: Engine):
        self.registry = prom.CollectorRegistry()
        self.requests = prom.Counter("leanfit_requests", "Requests by adapter, endpoint and HTTP status.",
                                     ["adapter", "endpoint", "status"], registry=self.registry)
        self.latency = prom.Histogram("leanfit_request_latency_seconds", "Request latency by adapter.",
                                      ["adapter"], registry=self.registry,
                                      buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
        self.batch_size = prom.Histogram("leanfit_batch_size", "Rows per forward batch.", registry=self.registry,
                                         buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        prom.Gauge("leanfit_queue_depth", "Jobs waiting for the worker.",
                   registry=self.registry).set_function(lambda: engine.queue_depth)
        prom.Gauge("leanfit_resident_adapters", "Adapters loaded in the model.",
                   registry=self.registry).set_function(lambda: len(engine.registry.resident()))
        prom.Gauge("leanfit_resident_adapter_bytes", "Tensor bytes of the loaded adapters.",
                   registry=self.registry).set_function(engine.registry.resident_bytes)
        engine.on_batch = self.batch_size.observe

    def observe(self, adapter: str, endpoint: str, status: int, started: float) -> None:
        self.requests.labels(adapter, endpoint, str(status)).inc()
        self.latency.labels(adapter).observe(time.perf_counter() - started)

    def exposition(self) -> bytes:
        return prom.generate_latest(self.registry)

    content_type = prom.CONTENT_TYPE_LATEST
