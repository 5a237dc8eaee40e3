"""Where monitoring's per-request cost goes: the request path in one process, parts of its recording switched off in turn.

No HTTP server: Vigil's edge middleware and handler are driven directly with a
single-row (or ``--instances``) ``POST /predict``, monitoring on. Blocks of
``--block`` requests run with each variant in turn (the full recording, the
handler's ``record_request`` as a no-op, the edge recorder's ``started`` /
``finished`` as no-ops, both), ``--cycles`` times, and the median process CPU
time per request of each variant is printed beside its difference to "none".
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

PARTS = {
    "handler": ("BoundModelMetrics", "record_request"),
    "edge_started": ("EndpointRecorder", "started"),
    "edge_finished": ("EndpointRecorder", "finished"),
}
VARIANTS = {
    "full": (),
    "no handler recording": ("handler",),
    "no edge recording": ("edge_started", "edge_finished"),
    "none": tuple(PARTS),
}


def _noop(*_args: Any) -> None:
    return None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--registry", type=Path, help="a registry holding 'cancer' (default: train the examples)")
    parser.add_argument("--instances", type=int, default=1, help="instances per request (default 1)")
    parser.add_argument("--block", type=int, default=1000, help="requests per measured block (default 1000)")
    parser.add_argument("--cycles", type=int, default=25, help="blocks per variant (default 25)")
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
        import service.edge as edge

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

    middleware = edge.EdgeMiddleware(not_used)
    middleware._service, middleware._direct = service, True  # what the first request finds in a worker
    scope = {"type": "http", "path": "/predict", "method": "POST",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}
    message = {"type": "http.request", "body": body, "more_body": False}

    async def receive() -> dict[str, Any]:
        return message

    async def send(_message: dict[str, Any]) -> None:
        return None

    originals: dict[str, Callable[..., Any]] = {
        part: getattr(getattr(metrics, cls), name) for part, (cls, name) in PARTS.items()}

    def use(variant: str) -> None:
        for part, (cls, name) in PARTS.items():
            setattr(getattr(metrics, cls), name, _noop if part in VARIANTS[variant] else originals[part])

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


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with model_registry(args.registry, ROOT) as registry:
        results = measure(registry, args.instances, args.block, args.cycles)
    base = statistics.median(results["none"])
    print(f"CPU per request, {args.instances} instance(s), median of {args.cycles} blocks of {args.block}:")
    for variant, values in results.items():
        median = statistics.median(values)
        print(f"  {variant:<22} {median:8.2f} µs   {median - base:+6.2f} µs against 'none'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
