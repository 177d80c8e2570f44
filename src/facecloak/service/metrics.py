"""Prometheus metrics of the service, on a registry of its own (one per app, so tests can build several)."""

from __future__ import annotations

import logging
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from facecloak.service.security import route_path

log = logging.getLogger("facecloak.service")

LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class ServiceMetrics:
    """Requests, latencies, faces, unprotected faces, queue depth, batch sizes, refusals."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "facecloak_requests",
            "HTTP requests by endpoint and status",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "facecloak_request_seconds",
            "Request latency by endpoint",
            ["endpoint"],
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.faces = Counter(
            "facecloak_faces", "Faces found, by endpoint", ["endpoint"], registry=self.registry
        )
        self.unprotected = Counter(
            "facecloak_unprotected_faces",
            "Faces whose protection fell short, by endpoint",
            ["endpoint"],
            registry=self.registry,
        )
        self.no_face = Counter(
            "facecloak_images_without_face",
            "Images with no face found, by endpoint",
            ["endpoint"],
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "facecloak_queue_depth", "Photos waiting for a model or being processed", registry=self.registry
        )
        self.batch_size = Histogram(
            "facecloak_batch_images",
            "Photos per model call (micro-batch size)",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=self.registry,
        )
        self.rejected = Counter(
            "facecloak_rejected", "Requests refused, by reason", ["reason"], registry=self.registry
        )

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)


class MetricsMiddleware:
    """ASGI middleware: count every HTTP request by endpoint and status, and time it.

    Outermost, so refusals by the other middleware (401, 413) are counted too. Only the routes
    the service defines are labels (anything else is "other"), so label values stay bounded.
    """

    ENDPOINTS = ("/v1/cloak", "/v1/anonymize", "/v1/detect", "/v1/info", "/healthz", "/metrics", "/")

    def __init__(self, app, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        """Time the request and record its status."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = route_path(scope)
        endpoint = path if path in self.ENDPOINTS else "other"
        started = time.perf_counter()
        status = {"code": 500}

        async def recording_send(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            self.metrics.requests.labels(endpoint, str(status["code"])).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
            log.info(
                "%s %s %d %.3fs", scope.get("method"), endpoint, status["code"], time.perf_counter() - started
            )
