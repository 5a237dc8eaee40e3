"""The edge middleware's HTTP metrics, driven directly (the real server runs it in tests/integration)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from starlette.requests import Request
from starlette.responses import JSONResponse

from monitoring.metrics import VigilMetrics
from service.http.edge import EdgeMiddleware


class StubService:
    """What the edge needs of the worker's handlers: its metrics and the hot routes' handlers."""

    def __init__(self, metrics: VigilMetrics, status: int = 200) -> None:
        self.metrics = metrics
        self.status = status
        self.running = -1.0

    async def predict(self, request: Request) -> JSONResponse:
        self.running = self.metrics.endpoint("/predict").active  # in progress while the handler runs
        return JSONResponse({"ok": True}, status_code=self.status)

    feedback = predict


async def not_found(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await JSONResponse({"error": "not found"}, status_code=404)(scope, receive, send)


def call(middleware: EdgeMiddleware, path: str, method: str = "POST") -> int:
    """One request through the middleware; returns the status it sent."""
    sent: list[dict[str, Any]] = []
    scope = {"type": "http", "path": path, "method": method, "headers": [], "query_string": b""}

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(middleware(scope, receive, send))
    return int(sent[0]["status"])


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


@pytest.fixture()
def registry() -> CollectorRegistry:
    return CollectorRegistry()


def test_requests_are_counted_by_endpoint_method_and_status(registry: CollectorRegistry) -> None:
    service = StubService(VigilMetrics(registry=registry, flush_seconds=60))
    middleware = EdgeMiddleware(not_found, service)
    assert call(middleware, "/predict") == 200
    service.status = 503
    assert call(middleware, "/predict") == 503
    assert service.running == 1
    for _ in range(3):
        assert call(middleware, "/x/../secret") == 404  # from the app behind the edge
    assert call(middleware, "/x/../secret", method="BREW") == 404
    assert sample(registry, "vigil_http_requests_total", endpoint="/predict", method="POST", code="200") == 1
    assert sample(registry, "vigil_http_requests_total", endpoint="/predict", method="POST", code="503") == 1
    assert sample(registry, "vigil_http_requests_total", endpoint="other", method="POST", code="404") == 3
    assert sample(registry, "vigil_http_request_duration_seconds_count", endpoint="/predict") == 2
    assert sample(registry, "vigil_http_requests_total", endpoint="other", method="other", code="404") == 1
    assert sample(registry, "vigil_http_requests_in_progress", endpoint="/predict") == 0
    assert sorted(service.metrics.endpoints) == ["/predict", "other"]  # unknown paths never become keys


def exported(family: Any, name: str) -> float:
    """A family's sample as written so far (collecting the family itself, unlike the registry, does not flush)."""
    return next(s.value for metric in family.collect() for s in metric.samples if s.name == name)


def test_a_busy_worker_flushes_after_a_request_once_its_interval_has_passed() -> None:
    metrics = VigilMetrics(registry=None, flush_seconds=5.0)
    middleware = EdgeMiddleware(not_found, StubService(metrics))
    call(middleware, "/predict")  # the first request flushes (none before)
    metrics.counter(metrics.predictions, "m", "1", "stable").inc()
    call(middleware, "/predict")
    assert exported(metrics.predictions, "vigil_predictions_total") == 0  # the last flush was just now
    metrics.flush_due -= 5.0  # as if the 5 s had passed
    call(middleware, "/predict")
    assert exported(metrics.predictions, "vigil_predictions_total") == 1
