"""Benchmark the shared store: feedback at scale, the prediction path on S3 vs local, the drift job on S3.

Three parts, each run by hand (``--part``):

``feedback``
    Writes ``--rows`` logged predictions of the ``diabetes`` example (10 features)
    through the real log writer (:class:`monitoring.predlog.PredictionLog`, the real
    segment format and keys) into a store: two worker tokens, requests of 5 rows,
    one segment of ``--segment-rows`` per worker and second (a busy worker's flush)
    in ``--bursts`` bursts spread over ``--days`` days, plus one dense hour of
    3,600 one-second segments of one request (the most files a worker writes in an hour).
    Then starts a real ``vigil serve`` on that store and sends ``POST /feedback``
    for random request ids of any age, one at a time: the first one right after
    the server is ready, then ``--feedback`` more. Reports the first one's
    latency, p50/p99/max, and the worker's RSS before and after.

``predict``
    Two ``vigil serve`` side by side, one on the local store, one on an S3 store
    (moto's server on 127.0.0.1), loaded together by their own ``wrk`` (the
    paired method of ``run.py``: server CPU time per request is the comparison,
    since both share every moment of the machine), single-row and 64-row requests.

``drift``
    ``--drift-rows`` logged rows x 30 features (``drift_bench.py``'s synthetic
    model and data, through the real log writer) in an S3 store; ``vigil drift run
    --store s3://...`` timed by ``/usr/bin/time`` (wall time, peak RSS).

Usage::

    .venv/bin/python benchmarks/store_bench.py --part feedback --rows 10000000
    .venv/bin/python benchmarks/store_bench.py --part predict --rounds 10
    .venv/bin/python benchmarks/store_bench.py --part drift --drift-rows 1000000

Each part prints a JSON line and appends a markdown section to ``benchmarks/results/store.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import run as harness  # noqa: E402  (benchmarks/run.py: servers, wrk, CPU accounting)

from monitoring.feedback import WorkerDirectory, WorkerRecord  # noqa: E402
from monitoring.predlog import LoggedRequest, PredictionLog  # noqa: E402
from monitoring.store import LocalStore, S3Store, Store  # noqa: E402
from service.core.requestid import RequestIds, new_token  # noqa: E402
from service.registry.store import Registry  # noqa: E402
from tests.s3server import CREDENTIALS, s3_server  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "store.md"
ROWS_PER_REQUEST = 5


# ----------------------------------------------------------------------------- writing a history


class _Clock:
    """The time the synthetic workers' request ids carry."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def ns(self) -> int:
        return int(self.seconds * 1e9)


def write_history(store: Store, registry: Path, rows: int, days: float, segment_rows: int,
                  samples: int, bursts: int = 10, seed: int = 7) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """``rows`` logged rows of diabetes through the real writer; returns ``samples`` random (request id, index)."""
    reg = Registry(registry)
    card = reg.card("diabetes")
    rng = np.random.default_rng(seed)
    import pandas as pd

    reference = pd.read_parquet(reg.path("diabetes", card.version) / "reference.parquet")
    matrix = reference[card.feature_names].to_numpy(dtype=np.float64)
    low, high = card.prediction_range.min, card.prediction_range.max  # type: ignore[union-attr]
    end = time.time() - 3 * 3600
    start = end - days * 86400
    clock = _Clock()
    workers = []
    for label in ("0", "1"):
        token = new_token()
        ids = RequestIds(token)
        ids._clock = clock.ns  # the real id format, at the synthetic serving time
        workers.append((PredictionLog(store, label, token=token, max_buffer_rows=segment_rows * 2), ids))
        WorkerDirectory(store).write(WorkerRecord(token, "bench", 0, label, start - 1, end, None))
    requests_total = rows // ROWS_PER_REQUEST
    per_segment = max(1, segment_rows // ROWS_PER_REQUEST)
    segments = max(1, requests_total // per_segment)
    # Each segment holds one flush interval (1 s) of a busy worker; the traffic comes in bursts spread over
    # the days, so request ids have every age while each segment spans what a real flush does.
    per_burst = -(-segments // bursts)
    burst_gap = (end - start - per_burst) / max(bursts - 1, 1)
    wanted = set(rng.choice(requests_total, size=min(samples, requests_total), replace=False).tolist())
    sample: list[tuple[str, int]] = []
    started = time.perf_counter()
    n = 0
    for segment in range(segments):
        log, ids = workers[segment % 2]
        burst, within = divmod(segment, per_burst)
        base = start + burst * burst_gap + within // 2  # both workers flush once a second
        for k in range(per_segment):
            clock.seconds = base + k / per_segment
            rid = ids.next()
            take = rng.integers(0, len(matrix), ROWS_PER_REQUEST)
            log.append(LoggedRequest(time=clock.seconds + 0.001, request_id=rid, card=card, variant="stable",
                                     instances=None, prediction=rng.uniform(low, high, ROWS_PER_REQUEST).tolist(),
                                     score=None, reasons=None, matrix=matrix[take]))
            if n in wanted:
                sample.append((rid, int(rng.integers(0, ROWS_PER_REQUEST))))
            n += 1
        log.flush()
        if segment % 1000 == 0:
            print(f"  {n * ROWS_PER_REQUEST:,} rows in {time.perf_counter() - started:.0f} s", flush=True)
    # The densest hour a worker writes: a flush every second, a request in each.
    log, ids = workers[0]
    dense = end - 3600
    for second in range(3600):
        clock.seconds = dense + second
        rid = ids.next()
        log.append(LoggedRequest(time=clock.seconds + 0.001, request_id=rid, card=card, variant="stable",
                                 instances=None, prediction=[float(low)] * ROWS_PER_REQUEST, score=None,
                                 reasons=None, matrix=matrix[:ROWS_PER_REQUEST]))
        log.flush()
        if second % 36 == 0:
            sample.append((rid, 0))
    random.Random(seed).shuffle(sample)
    info = {"rows": n * ROWS_PER_REQUEST + 3600 * ROWS_PER_REQUEST, "segments": segments + 3600,
            "days": days, "bursts": bursts, "segment_rows": per_segment * ROWS_PER_REQUEST,
            "write_seconds": round(time.perf_counter() - started, 1)}
    return sample, info


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ----------------------------------------------------------------------------- feedback at scale


def _worker_process(server: Any) -> Any:
    for child in server.children(recursive=True):
        if any("_bentoml_impl.worker" in part for part in child.cmdline()):
            return child
    raise RuntimeError("no worker process found")


def bench_feedback(args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="vigil-bench-store-", dir=args.work)))
        registry = stack.enter_context(harness.model_registry(args.registry, ROOT))
        store = LocalStore(work / "var")
        print(f"writing {args.rows:,} rows into {store.url} ...", flush=True)
        sample, info = write_history(store, registry, args.rows, args.days, args.segment_rows, args.feedback + 1,
                                     args.bursts)
        info["bytes_on_disk"] = _du(work / "var")
        print(json.dumps(info), flush=True)
        port = harness.free_port()
        spec = harness.server_spec("vigil", 1, port, registry, harness.model_dir(registry), ROOT)
        spec.env["VIGIL_DATA_DIR"] = str(work / "var")
        argv = spec.argv
        env = {**spec.env, "BENTOML_HOME": str(work / "bentoml")}
        log_path = work / "server.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)
        stack.callback(harness.stop_process_tree, proc)
        url = f"http://{harness.HOST}:{port}"
        harness._wait_ready(proc, url, 180)
        import psutil

        worker = _worker_process(psutil.Process(proc.pid))
        rss_before = worker.memory_info().rss
        client = stack.enter_context(httpx.Client(base_url=url, timeout=60))
        latencies = []
        for rid, index in sample[:args.feedback + 1]:
            body = {"model": "diabetes", "items": [{"request_id": rid, "index": index, "actual": 100.0}]}
            t0 = time.perf_counter()
            response = client.post("/feedback", json=body)
            latencies.append(time.perf_counter() - t0)
            if response.status_code != 200 or response.json()["accepted"] != 1 or response.json()["pending"]:
                raise RuntimeError(f"feedback for {rid}[{index}] answered {response.status_code}: {response.text}")
        rss_after = worker.memory_info().rss
        rest = sorted(latencies[1:])
        result = {
            "part": "feedback", **info, "feedback_requests": len(rest),
            "first_ms": round(latencies[0] * 1000, 1),
            "p50_ms": round(rest[len(rest) // 2] * 1000, 2),
            "p99_ms": round(rest[int(len(rest) * 0.99) - 1] * 1000, 2),
            "max_ms": round(rest[-1] * 1000, 2),
            "rss_before_mib": round(rss_before / 2**20, 1), "rss_after_mib": round(rss_after / 2**20, 1),
            "rss_growth_mib": round((rss_after - rss_before) / 2**20, 1),
        }
        return result


# ----------------------------------------------------------------------------- the prediction path


def bench_predict(args: argparse.Namespace) -> dict[str, Any]:
    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("wrk is needed: apt-get install wrk")
    config = harness.parse_args(["--overhead-seconds", str(args.seconds), "--warmup", "1"])
    results: dict[str, Any] = {"part": "predict", "workers": args.workers, "rounds": args.rounds, "cells": {}}
    with ExitStack() as stack:
        s3 = stack.enter_context(s3_server())
        url = s3.new_bucket()
        registry = stack.enter_context(harness.model_registry(args.registry, ROOT))
        version_dir = harness.model_dir(registry)
        rows = harness.feature_rows(version_dir)
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="vigil-bench-bodies-")))
        scripts = {}
        for instances in (1, 64):
            body = tmp / f"body-{instances}.json"
            body.write_bytes(harness.request_body(rows, instances))
            scripts[instances] = harness.write_lua(body)
        local = harness.server_spec("vigil", args.workers, harness.free_port(), registry, version_dir, ROOT)
        remote = harness.server_spec("vigil", args.workers, harness.free_port(), registry, version_dir, ROOT,
                                     settings=[("VIGIL_STORE", url), ("VIGIL_STORE_ENDPOINT_URL", s3.endpoint)])
        remote.env.update(CREDENTIALS)
        servers = [(spec, stack.enter_context(harness.running_server(spec, 180))) for spec in (local, remote)]
        for instances in (1, 64):
            ratios, cells = [], []
            for round_ in range(args.rounds):
                order = servers if round_ % 2 == 0 else servers[::-1]
                measured = harness.measure_together(order, instances, config, wrk, scripts, round_)
                by_store = dict(zip(["local", "s3"] if round_ % 2 == 0 else ["s3", "local"], measured))
                cells.append({k: {"req_s": round(c.requests_per_s), "cpu_ms": round(c.cpu_ms_per_request, 4),
                                  "p99_ms": c.p99_ms, "errors": c.errors} for k, c in by_store.items()})
                ratios.append(by_store["s3"].cpu_ms_per_request / by_store["local"].cpu_ms_per_request - 1)
                print(f"  {instances} inst round {round_}: s3 {by_store['s3'].cpu_ms_per_request:.3f} ms CPU/req, "
                      f"local {by_store['local'].cpu_ms_per_request:.3f} ({ratios[-1]:+.1%})", flush=True)
            results["cells"][instances] = {
                "median_cpu_ratio": round(statistics.median(ratios), 4),
                "local_req_s": round(statistics.median(c["local"]["req_s"] for c in cells)),
                "s3_req_s": round(statistics.median(c["s3"]["req_s"] for c in cells)),
                "local_cpu_ms": round(statistics.median(c["local"]["cpu_ms"] for c in cells), 4),
                "s3_cpu_ms": round(statistics.median(c["s3"]["cpu_ms"] for c in cells), 4),
                "errors": sum(c[k]["errors"] for c in cells for k in c),
                "rounds": cells,
            }
    return results


# ----------------------------------------------------------------------------- the drift job on S3


def bench_drift(args: argparse.Namespace) -> dict[str, Any]:
    import drift_bench

    with ExitStack() as stack:
        s3 = stack.enter_context(s3_server())
        url = s3.new_bucket()
        os.environ.update(CREDENTIALS)
        store = S3Store(url, endpoint_url=s3.endpoint)
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="vigil-bench-drift-")))
        registry = drift_bench.make_registry(work)
        end = datetime.now(timezone.utc)
        started = time.perf_counter()
        drift_bench.write_log(store, registry, args.drift_rows, end)  # type: ignore[arg-type]
        written = time.perf_counter() - started
        keys = store.list("predlog/")
        env = {**harness.vigil_env(ROOT), **CREDENTIALS, "VIGIL_STORE_ENDPOINT_URL": s3.endpoint}
        cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "service.cli", "drift", "run", "--model", drift_bench.MODEL,
               "--store", url, "--registry", str(registry), "--since", (end - drift_bench.WINDOW).isoformat(),
               "--until", end.isoformat(), "--prune-days", "0", "--json"]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
        if proc.returncode not in (0, 3):
            raise RuntimeError(f"drift job failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?:(\d+):)?(\d+):([\d.]+)", proc.stderr)
        rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
        assert wall and rss, proc.stderr[-2000:]
        seconds = int(wall.group(1) or 0) * 3600 + int(wall.group(2)) * 60 + float(wall.group(3))
        result = json.loads(proc.stdout)
        return {"part": "drift", "rows": args.drift_rows, "features": drift_bench.N_FEATURES, "segments": len(keys),
                "write_seconds": round(written, 1), "job_wall_seconds": round(seconds, 1),
                "job_peak_rss_mib": round(int(rss.group(1)) / 1024, 1), "window_rows": result["rows"]["window"],
                "job_duration_seconds": result["duration_seconds"], "drift_detected": result["drift_detected"]}


# ----------------------------------------------------------------------------- main


def render(result: dict[str, Any]) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"\n### {result['part']} ({stamp})\n\n```json\n{json.dumps(result, indent=2)}\n```\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("feedback", "predict", "drift"), required=True)
    parser.add_argument("--rows", type=int, default=1_000_000, help="logged rows for the feedback part")
    parser.add_argument("--days", type=float, default=30.0, help="days the feedback part's rows span")
    parser.add_argument("--segment-rows", type=int, default=1000, help="rows per segment (one flush)")
    parser.add_argument("--bursts", type=int, default=10, help="bursts of traffic the feedback part's days hold")
    parser.add_argument("--feedback", type=int, default=1000, help="feedback requests after the first")
    parser.add_argument("--rounds", type=int, default=10, help="paired rounds per request size (predict)")
    parser.add_argument("--seconds", type=int, default=4, help="seconds per paired round (predict)")
    parser.add_argument("--workers", type=int, default=1, help="workers per server (predict)")
    parser.add_argument("--drift-rows", type=int, default=1_000_000, help="logged rows for the drift part")
    parser.add_argument("--registry", type=Path, default=None, help="a registry with the examples (else trained)")
    parser.add_argument("--work", type=Path, default=None, help="where the feedback part writes its store")
    args = parser.parse_args(argv)
    result = {"feedback": bench_feedback, "predict": bench_predict, "drift": bench_drift}[args.part](args)
    print(json.dumps({k: v for k, v in result.items() if k != "cells"} | (
        {"cells": {k: {kk: vv for kk, vv in v.items() if kk != "rounds"} for k, v in result["cells"].items()}}
        if "cells" in result else {})))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS, "a", encoding="utf-8") as fh:
        fh.write(render(result))


if __name__ == "__main__":
    main()
