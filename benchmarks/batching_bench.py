"""Benchmark adaptive batching: ``vigil serve`` with ``batching`` on and off, for a fast and a heavy model.

Trains and registers the example models (``examples/train.py``), trains a heavy
model in this process beside them (a wide MLP on the same breast-cancer
features, exported with skl2onnx as the examples are: a call of one row costs
nearly as much as a call of 64, so its per-call cost dominates and it runs on
the model threads), then serves the registry twice, once with a deploy.yaml
that turns batching on for both models and once with one that leaves it off,
and loads each model with single-row ``POST /predict`` requests from ``wrk`` at
1, 16 and 64 connections. Writes a markdown table (throughput, p50, p99,
non-2xx answers, fallback answers, requests per model-thread call) to
``benchmarks/results/batching.md`` and checks the issue's targets: at 1
connection the p50 rises by at most 1 ms, at 64 connections batching answers
no non-2xx, and the heavy model at least doubles its throughput at 64
connections.

Usage::

    .venv/bin/python benchmarks/batching_bench.py              # ~5 min on 2 cores
    .venv/bin/python benchmarks/batching_bench.py --seconds 1 --warmup 1   # smoke run
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import run as bench  # benchmarks/run.py: servers, wrk and the example registry, shared with the main benchmark

ROOT = bench.ROOT
sys.path.insert(0, str(ROOT))  # Vigil itself (the registry, the example exporter), as benchmarks/run.py's servers do

FAST = "cancer"
HEAVY = "heavy"
HEAVY_LAYERS = (4096, 4096, 4096)
"""Hidden layers of the heavy model: wide enough that reading the weights dominates a call of few rows."""
MAX_BATCH_SIZE = 64
TIMEOUT_MS = 30_000
"""The models' budget in both configs: a throughput counted from fallback answers would mean nothing."""
MAX_P50_RISE_MS = 1.0
MIN_HEAVY_SPEEDUP = 2.0
TARGET_CONNECTIONS = 64


@dataclass
class Cell:
    """One measured (batching, model, connections) combination."""

    batching: bool
    model: str
    connections: int
    requests_per_s: float
    ok_per_s: float
    """2xx answers per second: what the throughput target compares (a 429 is answered fast)."""
    p50_ms: float
    p99_ms: float
    non_2xx: int
    statuses: dict[str, int]
    """Each non-2xx status the client got during the cell, with its count."""
    socket_errors: int
    fallbacks: float
    """Answers the fallback gave during the cell (a timeout or model error would show here)."""
    requests_per_call: float | None
    """Mean requests per call on the model threads during the cell (None: no such call)."""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=10, help="measured wrk run per cell (whole seconds)")
    parser.add_argument("--warmup", type=int, default=2, help="wrk warm-up per cell, thrown away")
    parser.add_argument("--connections", type=bench._int_list, default=(1, 16, TARGET_CONNECTIONS))
    parser.add_argument("--workers", type=int, default=1, help="vigil serve --workers, the same for on and off")
    parser.add_argument("--registry", type=Path, default=None,
                        help="a registry with the examples already (default: train them into a temp dir)")
    parser.add_argument("--out", type=Path, default=bench.RESULTS_DIR / "batching.md")
    parser.add_argument("--ready-timeout", type=float, default=180.0)
    return parser.parse_args(argv)


def register_heavy(registry: Path, work: Path) -> None:
    """Train the heavy model on the examples' breast-cancer split and register it as ``heavy``."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    from examples.train import SEED, export_onnx
    from service.registry.register import register_model

    reference = pd.read_parquet(bench.model_dir(registry) / "reference.parquet")  # the examples' held-out rows
    features = reference.drop(columns=[c for c in bench.NON_FEATURE_COLUMNS if c in reference])
    model = Pipeline([("scale", StandardScaler()),
                      ("mlp", MLPClassifier(hidden_layer_sizes=HEAVY_LAYERS, max_iter=3, random_state=SEED))])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # three epochs: the weights' size is the point
        model.fit(features, reference["target"])
    onnx_path = work / "heavy.onnx"
    onnx_path.write_bytes(export_onnx(model, features.shape[1], "classification"))
    reference_path = work / "heavy-reference.parquet"
    reference.drop(columns=[c for c in ("prediction", "prediction_score") if c in reference]).to_parquet(
        reference_path, index=False)
    register_model(HEAVY, onnx_path, reference_path, target="target", task="classification", registry=registry)


def deploy_text(batching: bool) -> str:
    policy = {"timeout_ms": TIMEOUT_MS}
    if batching:
        policy["batching"] = {"max_batch_size": MAX_BATCH_SIZE}  # type: ignore[assignment]
    return json.dumps({"models": {FAST: policy, HEAVY: policy}}, indent=2) + "\n"  # JSON is YAML


def metrics_text(url: str) -> str:
    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as response:
        return response.read().decode()


def metric_sum(text: str, name: str, *labels: str) -> float:
    """The sum of every sample of ``name`` carrying each of ``labels`` (``'model="cancer"'``), over the others."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(label in line for label in labels):
            total += float(line.rsplit(" ", 1)[1])
    return total


def write_lua(body_path: Path) -> Path:
    """A wrk script that POSTs the JSON body in ``body_path`` and prints each non-2xx status's count at the end.

    The statuses are counted by wrk, as the client sees them, whichever layer of the server answered.
    """
    script = bench.write_lua(body_path)   # sets the method, the header and the body
    script.write_text(script.read_text() +
        "local threads = {}\n"
        "function setup(thread) table.insert(threads, thread) end\n"
        "function init(args) statuses = {} end\n"
        "function response(status, headers, body)\n"
        "  if status < 200 or status > 299 then statuses[status] = (statuses[status] or 0) + 1 end\n"
        "end\n"
        "function done(summary, latency, requests)\n"
        "  for _, thread in ipairs(threads) do\n"
        "    for status, count in pairs(thread:get(\"statuses\")) do io.write(\"status \", status, \" \", count, \"\\n\") end\n"
        "  end\n"
        "end\n"
    )
    return script


def run_wrk(wrk: str, url: str, script: Path, connections: int, seconds: int) -> tuple[bench.WrkResult, dict[str, int]]:
    """Load ``url`` (one wrk thread); what wrk measured and its count of each non-2xx status."""
    out = bench.wrk_output(bench.start_wrk(wrk, url, script, connections, seconds, 1), seconds)
    counts: dict[str, int] = {}
    for status, count in re.findall(r"^status (\d+) (\d+)$", out, re.M):
        counts[status] = counts.get(status, 0) + int(count)
    return bench.parse_wrk(out), dict(sorted(counts.items()))


def wait_idle(url: str, limit: float = 60.0) -> None:
    """Wait (bounded) until the server answers no ``/predict``: a wrk run that ends leaves its last
    requests in flight, and the next run's connections would find the worker at its limit (429)."""
    deadline = time.monotonic() + limit
    while metric_sum(metrics_text(url), "vigil_http_requests_in_progress", 'endpoint="/predict"') > 0:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} still answers requests {limit:.0f} s after the load ended")
        time.sleep(0.05)


@contextmanager
def serving(registry: Path, batching: bool, workers: int, work: Path,
            ready_timeout: float) -> Iterator[tuple[str, bench.psutil.Process]]:
    deploy = work / f"deploy-{'on' if batching else 'off'}.yaml"
    deploy.write_text(deploy_text(batching))
    spec = bench.server_spec("vigil", workers, bench.free_port(), registry, bench.model_dir(registry), ROOT,
                             settings=[("VIGIL_DEPLOY", str(deploy))])
    with bench.running_server(spec, ready_timeout) as running:
        yield running


def measure(args: argparse.Namespace, wrk: str, registry: Path, work: Path) -> list[Cell]:
    rows = bench.feature_rows(bench.model_dir(registry))
    cells: list[Cell] = []
    for batching in (False, True):
        with serving(registry, batching, args.workers, work, args.ready_timeout) as (url, _server):
            for model in (FAST, HEAVY):
                body_path = work / f"{model}.json"
                body = json.dumps({"model": model, "instances": rows[:1]}).encode()
                body_path.write_bytes(body)
                bench.check_answer(url, body, 1)
                script = write_lua(body_path)
                for connections in args.connections:
                    if args.warmup:
                        run_wrk(wrk, url, script, connections, args.warmup)
                        wait_idle(url)
                    before = metrics_text(url)
                    result, codes = run_wrk(wrk, url, script, connections, args.seconds)
                    wait_idle(url)   # the last requests' calls and metrics are in the scrape after
                    after = metrics_text(url)
                    label = f'model="{model}"'

                    def delta(name: str) -> float:
                        return metric_sum(after, name, label) - metric_sum(before, name, label)  # noqa: B023

                    calls, merged = delta("vigil_batched_requests_count"), delta("vigil_batched_requests_sum")
                    ok = (result.requests - result.non_2xx) / result.seconds if result.seconds else 0.0
                    cell = Cell(batching, model, connections, result.requests_per_s, ok, result.p50_ms,
                                result.p99_ms, result.non_2xx, codes, result.socket_errors,
                                delta("vigil_fallback_total"), merged / calls if calls else None)
                    print(f"batching {'on ' if batching else 'off'} {model:<7} c={connections:<3} "
                          f"{cell.requests_per_s:8.0f} req/s  p50 {cell.p50_ms:7.2f} ms  p99 {cell.p99_ms:7.2f} ms  "
                          f"non-2xx {cell.non_2xx} {cell.statuses or ''}  fallbacks {cell.fallbacks:.0f}", flush=True)
                    cells.append(cell)
    return cells


def find(cells: list[Cell], batching: bool, model: str, connections: int) -> Cell | None:
    return next((c for c in cells if (c.batching, c.model, c.connections) == (batching, model, connections)), None)


def checks(cells: list[Cell]) -> list[tuple[str, bool | None, str]]:
    """The issue's targets: (name, passed (None: not measured), the figures)."""
    out: list[tuple[str, bool | None, str]] = []
    for model in (FAST, HEAVY):
        off, on = find(cells, False, model, 1), find(cells, True, model, 1)
        if off and on:
            rise = on.p50_ms - off.p50_ms
            out.append((f"{model}: p50 at 1 connection rises by <= {MAX_P50_RISE_MS:g} ms", rise <= MAX_P50_RISE_MS,
                        f"{off.p50_ms:.2f} -> {on.p50_ms:.2f} ms ({rise:+.2f})"))
        on64 = find(cells, True, model, TARGET_CONNECTIONS)
        off64 = find(cells, False, model, TARGET_CONNECTIONS)
        if on64 and off64:
            out.append((f"{model}: no 503, and no more non-2xx than off, at {TARGET_CONNECTIONS} connections",
                        on64.non_2xx <= off64.non_2xx and "503" not in on64.statuses,
                        f"on {_failed(on64)}, off {_failed(off64)}"))
    off, on = find(cells, False, HEAVY, TARGET_CONNECTIONS), find(cells, True, HEAVY, TARGET_CONNECTIONS)
    if off and on:
        speedup = on.ok_per_s / off.ok_per_s if off.ok_per_s else float("inf")
        out.append((f"{HEAVY}: 2xx throughput at {TARGET_CONNECTIONS} connections >= {MIN_HEAVY_SPEEDUP:g}x off",
                    speedup >= MIN_HEAVY_SPEEDUP, f"{off.ok_per_s:.0f} -> {on.ok_per_s:.0f} 2xx/s ({speedup:.2f}x)"))
    return out


def render(args: argparse.Namespace, cells: list[Cell], verdicts: list[tuple[str, bool | None, str]]) -> str:
    lines = [
        "# Adaptive batching: on against off",
        "",
        f"`benchmarks/batching_bench.py`, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC: `vigil serve --workers "
        f"{args.workers}`, single-row `POST /predict` by `wrk` (one thread), {args.seconds} s per cell after a "
        f"{args.warmup} s warm-up; `{FAST}` is the example forest, `{HEAVY}` an MLP with hidden layers "
        f"{'x'.join(str(n) for n in HEAVY_LAYERS)}. `batching: {{max_batch_size: {MAX_BATCH_SIZE}}}` when on; "
        f"`timeout_ms: {TIMEOUT_MS}` in both.",
        "",
        "| model | connections | off 2xx/s | on 2xx/s | on/off | off p50 ms | on p50 ms | off p99 ms | on p99 ms "
        "| off non-2xx | on non-2xx | fallbacks off/on | requests per thread call (on) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---:|",
    ]
    for model in (FAST, HEAVY):
        for connections in args.connections:
            off, on = find(cells, False, model, connections), find(cells, True, model, connections)
            if off is None or on is None:
                continue
            ratio = on.ok_per_s / off.ok_per_s if off.ok_per_s else float("nan")
            per_call = "-" if on.requests_per_call is None else f"{on.requests_per_call:.1f}"
            lines.append(f"| {model} | {connections} | {off.ok_per_s:.0f} | {on.ok_per_s:.0f} | "
                         f"{ratio:.2f} | {off.p50_ms:.2f} | {on.p50_ms:.2f} | {off.p99_ms:.2f} | {on.p99_ms:.2f} | "
                         f"{_failed(off)} | {_failed(on)} | "
                         f"{off.fallbacks:.0f}/{on.fallbacks:.0f} | {per_call} |")
    lines += ["", "| target | result | figures |", "|---|---|---|"]
    for name, passed, figures in verdicts:
        lines.append(f"| {name} | {'-' if passed is None else 'PASS' if passed else 'FAIL'} | {figures} |")
    return "\n".join(lines) + "\n"


def _failed(cell: Cell) -> str:
    """Non-2xx answers with their statuses, and socket errors."""
    text = str(cell.non_2xx)
    if cell.statuses:
        text += " (" + ", ".join(f"{code}: {count}" for code, count in cell.statuses.items()) + ")"
    return text + (f", {cell.socket_errors} socket errors" if cell.socket_errors else "")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; 0 when every target passes."""
    args = parse_args(argv)
    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("wrk is not installed (apt-get install wrk)")
    signal.signal(signal.SIGTERM, bench._raise_on_sigterm)
    with tempfile.TemporaryDirectory(prefix="vigil-batching-bench-") as tmp:
        work = Path(tmp)
        with bench.model_registry(args.registry, ROOT) as examples:
            registry = work / "models"
            shutil.copytree(examples, registry)  # the heavy model goes beside the examples, never into --registry
            print(f"training the heavy model (hidden layers {HEAVY_LAYERS}) ...", flush=True)
            register_heavy(registry, work)
            cells = measure(args, wrk, registry, work)
    verdicts = checks(cells)
    markdown = render(args, cells, verdicts)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    bench._atomic_write(args.out, markdown)
    print("\n" + markdown + f"\nwrote {args.out}")
    return 0 if all(passed is not False for _, passed, _ in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
