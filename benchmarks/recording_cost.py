"""Where monitoring's per-request cost goes: the request path in one process, parts of its recording switched off in turn.

No HTTP server: Vigil's edge middleware and handler are driven directly with a
single-row (or ``--instances``) ``POST /predict``. Blocks of ``--block``
requests run with each variant in turn (monitoring on; the handler's
``record_request`` call made but doing nothing; monitoring off, as with
``VIGIL_METRICS_ENABLED=false``), ``--cycles`` times, and the median process
CPU time per request of each variant is printed beside its difference to
"monitoring off". The edge's recording is written inline (no call to switch
off), so it is what "no handler recording" has beyond "monitoring off".
Taking turns in one process keeps the machine's drifts (10-30% over tens of
seconds on the project's VM) out of the differences; what is left is about
±1-2 µs from run to run, enough to see which part costs microseconds, not
enough to judge a 5% target (``run.py``'s paired rounds do that).

Usage::

    .venv/bin/python benchmarks/recording_cost.py                 # trains the examples into a temp dir
    .venv/bin/python benchmarks/recording_cost.py --registry models --cycles 40
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import ROOT, feature_rows, model_dir, model_registry, request_body  # noqa: E402 - this directory's module

VARIANTS = ("full", "no handler recording", "monitoring off")
"""Monitoring on; the handler's recording call doing nothing; no recorder at all (see :func:`_recorders`)."""


def _noop(*_args: Any) -> None:
    return None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--registry", type=Path, help="a registry holding 'cancer' (default: train the examples)")
    parser.add_argument("--instances", type=int, default=1, help="instances per request (default 1)")
    parser.add_argument("--block", type=int, default=200, help="requests per measured block (default 200)")
    parser.add_argument("--cycles", type=int, default=150, help="blocks per variant (default 150)")
    return parser.parse_args(argv)


def measure(registry: Path, instances: int, block: int, cycles: int) -> dict[str, list[float]]:
    """CPU microseconds per request of each variant, one value per cycle."""
    with tempfile.TemporaryDirectory(prefix="vigil-recording-") as tmp:
        # Set before Vigil is imported: its settings and prometheus_client's multiprocess mode read them.
        os.environ.update(PROMETHEUS_MULTIPROC_DIR=tmp, VIGIL_METRICS_ENABLED="true", VIGIL_REGISTRY=str(registry),
                          VIGIL_DATA_DIR=str(Path(tmp) / "var"), VIGIL_DEPLOY=str(Path(tmp) / "deploy.yaml"))
        sys.path.insert(0, str(ROOT))
        import monitoring.metrics as metrics
        import service.app as app
        import service.http.edge as edge

        service = app.Vigil.inner()
        try:
            body = request_body(feature_rows(model_dir(registry)), instances)
            return asyncio.run(_run(service, edge, metrics, body, block, cycles))
        finally:
            service._shutdown()


async def _run(service: Any, edge: Any, metrics: Any, body: bytes, block: int,
               cycles: int) -> dict[str, list[float]]:
    async def not_used(_scope: Any, _receive: Any, _send: Any) -> None:
        raise AssertionError("/predict is answered by the edge")

    middleware = edge.EdgeMiddleware(not_used, service.handlers)
    scope = {"type": "http", "path": "/predict", "method": "POST",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}
    message = {"type": "http.request", "body": body, "more_body": False}

    async def receive() -> dict[str, Any]:
        return message

    async def send(_message: dict[str, Any]) -> None:
        return None

    record_request: Callable[..., Any] = metrics.BoundModelMetrics.record_request
    recorders = _recorders(service)

    def use(variant: str) -> None:
        metrics.BoundModelMetrics.record_request = _noop if variant == "no handler recording" else record_request
        for holder, attr, recorder in recorders:
            setattr(holder, attr, None if variant == "monitoring off" else recorder)

    for _ in range(3 * block):  # warm-up: caches, lazy imports, the inline-call decision
        await middleware(scope, receive, send)
    results: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    try:
        for _ in range(cycles):
            for variant in VARIANTS:
                use(variant)
                for _ in range(block // 10):
                    await middleware(scope, receive, send)
                started = time.process_time()
                for _ in range(block):
                    await middleware(scope, receive, send)
                results[variant].append((time.process_time() - started) / block * 1e6)
    finally:
        use("full")
    return results


def _recorders(service: Any) -> list[tuple[Any, str, Any]]:
    """Every (object, attribute, recorder) monitoring hangs on the request path (the service, versions)."""
    handlers = service.handlers
    holders = [(handlers, "metrics"), (handlers.server, "metrics")]
    for entry in handlers.server.models.values():
        for served in (entry.stable, entry.canary):
            if served is not None:
                holders += [(served, "metrics"), (served, "fallback_metrics")]
    return [(holder, attr, getattr(holder, attr)) for holder, attr in holders]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with model_registry(args.registry, ROOT) as registry:
        results = measure(registry, args.instances, args.block, args.cycles)
    base = statistics.median(results["monitoring off"])
    print(f"CPU per request, {args.instances} instance(s), median of {args.cycles} blocks of {args.block}:")
    for variant, values in results.items():
        median = statistics.median(values)
        print(f"  {variant:<22} {median:8.2f} µs   {median - base:+6.2f} µs against 'monitoring off'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
