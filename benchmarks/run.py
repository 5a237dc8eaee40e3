"""Benchmark ``POST /predict`` of Vigil against its baselines, side by side, in one run.

Every HTTP target is started as its own server process on a free 127.0.0.1
port (with its own ``BENTOML_HOME``), loaded with ``wrk`` from another process
and stopped again; the in-process onnxruntime baseline runs in this process
before any server starts. Results go to ``benchmarks/results/latest.json``
and ``latest.md``, and the issue's targets are checked (PASS/FAIL).

Usage::

    .venv/bin/python benchmarks/run.py                 # full run (~12 min on 2 cores)
    .venv/bin/python benchmarks/run.py --quick         # short smoke run (~2 min)
    .venv/bin/python benchmarks/run.py --targets vigil,vigil-nometrics --duration 15

See ``benchmarks/README.md`` for what each target is.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd
import psutil

from baselines.bench_model import MODEL_DIR_ENV, WORKERS_ENV, load_model

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "benchmarks"
BASELINES_DIR = BENCH_DIR / "baselines"
RESULTS_DIR = BENCH_DIR / "results"
BIN = Path(sys.executable).parent
HOST = "127.0.0.1"  # the only address this script ever sends traffic to
MODEL = "cancer"
NON_FEATURE_COLUMNS = ("target", "prediction", "prediction_score")

INPROCESS = "onnxruntime"
SERVER_TARGETS = ("vigil", "vigil-nometrics", "starlette", "bento-quickstart", "bento-mounted-bare")
ALL_TARGETS = (SERVER_TARGETS[0], SERVER_TARGETS[1], INPROCESS, *SERVER_TARGETS[2:])

# Issue targets.
MIN_VS_QUICKSTART = 2.0
MIN_VS_MOUNTED = 0.8
MAX_P99_MS = 50.0
P99_CONNECTIONS = 16
P99_WORKERS = 2
MIN_VS_INPROCESS = 0.5
BATCH = 64  # the request size compared with in-process onnxruntime
MAX_MONITORING_OVERHEAD = 0.05


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class Config:
    """What to run: the grid of cells and how long each cell lasts."""

    targets: tuple[str, ...]
    workers: tuple[int, ...]
    connections: tuple[int, ...]
    instances: tuple[int, ...]
    inprocess_rows: tuple[int, ...]
    duration: int
    warmup: int
    inprocess_seconds: float
    wrk_threads: int
    ready_timeout: float
    registry: Path | None
    results_dir: Path


def _int_list(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part.strip())


def _target_list(text: str) -> tuple[str, ...]:
    chosen = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = sorted(set(chosen) - set(ALL_TARGETS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown target(s) {', '.join(unknown)}; choose from {', '.join(ALL_TARGETS)}")
    return chosen


def parse_args(argv: Sequence[str] | None = None) -> Config:
    """Command-line options; ``--quick`` changes the defaults, explicit options still win."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="short smoke run: 2 s cells, 1 s warm-up, 16 connections only")
    parser.add_argument("--targets", type=_target_list, default=ALL_TARGETS,
                        help=f"comma-separated subset of: {', '.join(ALL_TARGETS)} (default: all)")
    parser.add_argument("--duration", type=int, help="whole seconds measured per cell (default 8, quick 2)")
    parser.add_argument("--warmup", type=int,
                        help="whole seconds of discarded load before each cell, 0 for none (default 2, quick 1)")
    parser.add_argument("--workers", type=_int_list, default=(1, 2), help="worker counts (default 1,2)")
    parser.add_argument("--connections", type=_int_list, help="wrk connections (default 1,16,64; quick 16)")
    parser.add_argument("--instances", type=_int_list, default=(1, 64), help="instances per request (default 1,64)")
    parser.add_argument("--inprocess-rows", type=_int_list, default=(1, 64, 1024),
                        help="rows per call for the in-process onnxruntime baseline (default 1,64,1024)")
    parser.add_argument("--inprocess-seconds", type=float, help="seconds per in-process size (default 3, quick 1)")
    parser.add_argument("--wrk-threads", type=int, default=1,
                        help="wrk threads (default 1: one load thread saturates these servers and leaves CPU to them)")
    parser.add_argument("--ready-timeout", type=float, default=90.0, help="seconds to wait for a server's /readyz")
    parser.add_argument("--registry", type=Path,
                        help="registry holding 'cancer' (default: train and register the examples into a temp dir)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where latest.json/latest.md go")
    args = parser.parse_args(argv)
    quick = args.quick
    return Config(
        targets=args.targets,
        workers=args.workers,
        connections=args.connections or ((16,) if quick else (1, 16, 64)),
        instances=args.instances,
        inprocess_rows=args.inprocess_rows,
        duration=max(1, args.duration if args.duration is not None else (2 if quick else 8)),
        warmup=max(0, args.warmup if args.warmup is not None else (1 if quick else 2)),
        inprocess_seconds=args.inprocess_seconds if args.inprocess_seconds is not None else (1.0 if quick else 3.0),
        wrk_threads=args.wrk_threads,
        ready_timeout=args.ready_timeout,
        registry=args.registry,
        results_dir=args.results_dir,
    )


# --------------------------------------------------------------------------- data


@contextmanager
def model_registry(existing: Path | None) -> Iterator[Path]:
    """A registry holding ``cancer``: ``existing``, or the examples trained into a temp dir for this run."""
    if existing is not None:
        yield existing.resolve()
        return
    with tempfile.TemporaryDirectory(prefix="vigil-bench-registry-") as tmp:
        registry = Path(tmp) / "models"
        print("training and registering the example models ...", flush=True)
        subprocess.run(
            [sys.executable, "examples/train.py", "--register", "--registry", str(registry),
             "--out", str(Path(tmp) / "trained")],
            cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
        )
        yield registry


def model_dir(registry: Path) -> Path:
    """The newest registered version directory of the benchmark model."""
    versions = sorted((p for p in (registry / MODEL).iterdir() if (p / "card.yaml").is_file()),
                      key=lambda p: (len(p.name), p.name))
    if not versions:
        raise SystemExit(f"no version of '{MODEL}' in {registry}")
    return versions[-1]


def feature_rows(version_dir: Path) -> list[dict[str, float]]:
    """The reference rows of the model, features only, as JSON-ready dicts of floats."""
    frame = pd.read_parquet(version_dir / "reference.parquet")
    frame = frame.drop(columns=[c for c in NON_FEATURE_COLUMNS if c in frame.columns]).astype("float64")
    return frame.to_dict(orient="records")


def take(rows: list[dict[str, float]], count: int) -> list[dict[str, float]]:
    """``count`` rows, cycling through ``rows`` when more are asked for than exist."""
    return [rows[i % len(rows)] for i in range(count)]


def request_body(rows: list[dict[str, float]], instances: int) -> bytes:
    """The ``POST /predict`` body with ``instances`` rows."""
    return json.dumps({"model": MODEL, "instances": take(rows, instances)}).encode()


# --------------------------------------------------------------------------- in-process baseline


@dataclass
class InProcessResult:
    """onnxruntime called in a loop in this process, for one batch size."""

    rows: int
    calls: int
    mean_ms: float
    p50_ms: float
    p99_ms: float
    calls_per_s: float
    rows_per_s: float


def bench_inprocess(version_dir: Path, rows: list[dict[str, float]], sizes: Sequence[int],
                    seconds: float) -> list[InProcessResult]:
    """Time ``InferenceSession.run`` alone (Vigil's session options) at each batch size."""
    model = load_model(version_dir)
    results = []
    for size in sizes:
        matrix = np.array([[row[name] for name in model.features] for row in take(rows, size)], dtype=np.float32)
        for _ in range(20):
            model.run(matrix)
        samples: list[int] = []
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            started = time.perf_counter_ns()
            model.run(matrix)
            samples.append(time.perf_counter_ns() - started)
        total_s = sum(samples) / 1e9
        ms = np.array(samples) / 1e6
        result = InProcessResult(
            rows=size, calls=len(samples), mean_ms=float(ms.mean()), p50_ms=float(np.percentile(ms, 50)),
            p99_ms=float(np.percentile(ms, 99)), calls_per_s=len(samples) / total_s,
            rows_per_s=len(samples) * size / total_s,
        )
        print(f"  onnxruntime in-process {size:>5} rows: {result.mean_ms:.3f} ms/call, "
              f"{result.rows_per_s:,.0f} rows/s", flush=True)
        results.append(result)
    return results


# --------------------------------------------------------------------------- servers


@dataclass(frozen=True)
class ServerSpec:
    """How to start one HTTP target with a given worker count."""

    target: str
    workers: int
    argv: list[str]
    env: dict[str, str]
    cwd: Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _bentoml_serve(service: str, port: int) -> list[str]:
    return [sys.executable, "-m", "bentoml", "serve", service, "--working-dir", str(BASELINES_DIR),
            "--host", HOST, "--port", str(port)]


def server_spec(target: str, workers: int, port: int, registry: Path, version_dir: Path) -> ServerSpec:
    """The command line and environment of ``target`` (``BENTOML_HOME`` is added at start)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIGIL_", "BENTOML_", "PROMETHEUS_"))}
    env["BENTOML_DO_NOT_TRACK"] = "True"
    if target in ("vigil", "vigil-nometrics"):
        env["VIGIL_METRICS_ENABLED"] = "true" if target == "vigil" else "false"
        argv = [str(BIN / "vigil"), "serve", "--port", str(port), "--host", HOST,
                "--registry", str(registry), "--workers", str(workers)]
        return ServerSpec(target, workers, argv, env, ROOT)
    env[MODEL_DIR_ENV] = str(version_dir)
    env[WORKERS_ENV] = str(workers)
    if target == "starlette":
        argv = [sys.executable, "-m", "uvicorn", "starlette_app:app", "--app-dir", str(BASELINES_DIR),
                "--host", HOST, "--port", str(port), "--workers", str(workers),
                "--no-access-log", "--log-level", "warning"]
    elif target == "bento-quickstart":
        argv = _bentoml_serve("bento_quickstart:Quickstart", port)
    elif target == "bento-mounted-bare":
        argv = _bentoml_serve("bento_mounted:Mounted", port)
    else:
        raise ValueError(f"not a server target: {target}")
    return ServerSpec(target, workers, argv, env, BASELINES_DIR)


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _wait_ready(proc: subprocess.Popen[bytes], url: str, timeout: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready:\n{_log_tail(log_path)}")
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"server not ready after {timeout:.0f}s:\n{_log_tail(log_path)}")


def stop_process_tree(proc: subprocess.Popen[bytes], grace: float = 15.0) -> None:
    """SIGTERM the server, SIGKILL it after ``grace`` seconds, then kill any of its descendants left over."""
    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    _gone, alive = psutil.wait_procs(descendants, timeout=5)
    for child in alive:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)


@contextmanager
def running_server(spec: ServerSpec, ready_timeout: float) -> Iterator[str]:
    """Start ``spec`` with its own ``BENTOML_HOME``, yield its base URL once ready, always stop it."""
    home = Path(tempfile.mkdtemp(prefix=f"vigil-bench-{spec.target}-"))
    log_path = home / "server.log"
    env = {**spec.env, "BENTOML_HOME": str(home / "bentoml")}
    port = int(spec.argv[spec.argv.index("--port") + 1])
    url = f"http://{HOST}:{port}"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(spec.argv, cwd=spec.cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        try:
            _wait_ready(proc, url, ready_timeout, log_path)
            yield url
        finally:
            stop_process_tree(proc)
    shutil.rmtree(home, ignore_errors=True)


def check_answer(url: str, body: bytes, instances: int) -> None:
    """One request before the load: the target must answer 200 with one prediction per instance."""
    request = urllib.request.Request(f"{url}/predict", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        answer = json.loads(response.read())
    predictions = answer.get("predictions")
    if not isinstance(predictions, list) or len(predictions) != instances:
        raise RuntimeError(f"{url}/predict answered {str(answer)[:300]}")


# --------------------------------------------------------------------------- wrk


@dataclass
class WrkResult:
    """What one wrk run measured."""

    requests: int
    seconds: float
    requests_per_s: float
    p50_ms: float
    p75_ms: float
    p90_ms: float
    p99_ms: float
    non_2xx: int = 0
    socket_errors: int = 0


_TIME_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _ms(value: str, unit: str) -> float:
    return float(value) * _TIME_UNITS_MS[unit]


def parse_wrk(output: str) -> WrkResult:
    """Parse the text ``wrk --latency`` prints."""
    percentiles = {int(p): _ms(v, u) for p, v, u in re.findall(r"^\s+(\d+)%\s+([\d.]+)(us|ms|s|m|h)\s*$", output, re.M)}
    done = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m|h)", output)
    rate = re.search(r"Requests/sec:\s+([\d.]+)", output)
    if done is None or rate is None or not {50, 75, 90, 99} <= percentiles.keys():
        raise RuntimeError(f"cannot parse wrk output:\n{output}")
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    sockets = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    return WrkResult(
        requests=int(done.group(1)), seconds=_ms(done.group(2), done.group(3)) / 1e3,
        requests_per_s=float(rate.group(1)), p50_ms=percentiles[50], p75_ms=percentiles[75],
        p90_ms=percentiles[90], p99_ms=percentiles[99],
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=sum(int(n) for n in sockets.groups()) if sockets else 0,
    )


def write_lua(body_path: Path) -> Path:
    """A wrk script that POSTs the JSON body in ``body_path``."""
    script = body_path.with_suffix(".lua")
    script.write_text(
        'wrk.method = "POST"\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
        f"local f = assert(io.open([[{body_path}]], \"rb\"))\n"
        "wrk.body = f:read(\"*a\")\n"
        "f:close()\n"
    )
    return script


def run_wrk(wrk: str, url: str, script: Path, connections: int, seconds: int, threads: int) -> WrkResult:
    """Load ``url`` for ``seconds`` (wrk takes whole seconds) with ``connections`` connections; parse the result."""
    argv = [wrk, f"-t{min(threads, connections)}", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s",
            "--latency", "-s", str(script), f"{url}/predict"]
    completed = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"wrk failed ({completed.returncode}): {completed.stderr or completed.stdout}")
    return parse_wrk(completed.stdout)


# --------------------------------------------------------------------------- HTTP cells


@dataclass
class Cell:
    """One measured (target, workers, instances, connections) combination."""

    target: str
    workers: int
    instances: int
    connections: int
    requests_per_s: float
    rows_per_s: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int
    wrk: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Measured without a failed request."""
        return self.errors == 0


def bench_server(spec: ServerSpec, config: Config, wrk: str, scripts: dict[int, Path],
                 bodies: dict[int, bytes]) -> list[Cell]:
    """Start one server, measure every (instances, connections) cell against it, stop it."""
    label = f"{spec.target} ({spec.workers}w)"
    started = time.monotonic()
    cells = []
    with running_server(spec, config.ready_timeout) as url:
        print(f"{label}: ready in {time.monotonic() - started:.1f}s at {url}", flush=True)
        for instances in config.instances:
            check_answer(url, bodies[instances], instances)
            for connections in config.connections:
                if config.warmup > 0:
                    run_wrk(wrk, url, scripts[instances], connections, config.warmup, config.wrk_threads)
                result = run_wrk(wrk, url, scripts[instances], connections, config.duration, config.wrk_threads)
                cell = Cell(
                    target=spec.target, workers=spec.workers, instances=instances, connections=connections,
                    requests_per_s=result.requests_per_s, rows_per_s=result.requests_per_s * instances,
                    p50_ms=result.p50_ms, p99_ms=result.p99_ms, requests=result.requests,
                    errors=result.non_2xx + result.socket_errors, wrk=asdict(result),
                )
                flag = "" if cell.ok else f"  ({cell.errors} errors!)"
                print(f"  {label} inst={instances:<3} c={connections:<3} {cell.requests_per_s:>9,.0f} req/s "
                      f"{cell.rows_per_s:>10,.0f} rows/s  p50 {cell.p50_ms:7.2f} ms  p99 {cell.p99_ms:7.2f} ms{flag}",
                      flush=True)
                cells.append(cell)
    return cells


# --------------------------------------------------------------------------- targets (issue checks)


@dataclass
class Check:
    """One issue target: the measured value against its threshold."""

    name: str
    value: float | None
    threshold: float
    higher_is_better: bool
    detail: str

    @property
    def status(self) -> str:
        """PASS, FAIL, or n/a when the cells it needs were not measured (or had errors)."""
        if self.value is None:
            return "n/a"
        passed = self.value >= self.threshold if self.higher_is_better else self.value <= self.threshold
        return "PASS" if passed else "FAIL"


class Grid:
    """Look-ups over the measured cells."""

    def __init__(self, cells: list[Cell], inprocess: list[InProcessResult]) -> None:
        self.cells = cells
        self.inprocess = {r.rows: r for r in inprocess}

    def peak(self, target: str, workers: int, instances: int) -> Cell | None:
        """The cell with the highest throughput over connection counts (None if missing or any had errors)."""
        found = [c for c in self.cells if (c.target, c.workers, c.instances) == (target, workers, instances)]
        if not found or not all(c.ok for c in found):
            return None
        return max(found, key=lambda c: c.requests_per_s)

    def cell(self, target: str, workers: int, instances: int, connections: int) -> Cell | None:
        """One error-free cell, or None."""
        for c in self.cells:
            if (c.target, c.workers, c.instances, c.connections) == (target, workers, instances, connections) and c.ok:
                return c
        return None

    def workers(self) -> list[int]:
        """Worker counts measured."""
        return sorted({c.workers for c in self.cells})

    def instances(self) -> list[int]:
        """Instances per request measured."""
        return sorted({c.instances for c in self.cells})


def _compare(name: str, ours: float | None, theirs: float | None, threshold: float, unit: str,
             overhead: bool = False) -> Check:
    """``ours / theirs >= threshold`` or, with ``overhead``, ``1 - ours / theirs <= threshold``."""
    if ours is None or theirs is None:
        return Check(name, None, threshold, not overhead, "not measured (or a cell had errors)")
    ratio = ours / theirs
    return Check(name, 1 - ratio if overhead else ratio, threshold, not overhead,
                 f"{ours:,.0f} vs {theirs:,.0f} {unit}")


def _req_rate(cell: Cell | None) -> float | None:
    return cell.requests_per_s if cell is not None else None


def evaluate(grid: Grid) -> list[Check]:
    """The issue's targets, computed from the cells measured (throughput = best over connection counts)."""
    checks: list[Check] = []
    for workers in grid.workers():
        vigil = _req_rate(grid.peak("vigil", workers, 1))
        for baseline, threshold in (("bento-quickstart", MIN_VS_QUICKSTART), ("bento-mounted-bare", MIN_VS_MOUNTED)):
            checks.append(_compare(f"vigil / {baseline}, single-row req/s, {workers} worker(s)",
                                   vigil, _req_rate(grid.peak(baseline, workers, 1)), threshold, "req/s"))
    for instances in grid.instances():
        cell = grid.cell("vigil", P99_WORKERS, instances, P99_CONNECTIONS)
        checks.append(Check(
            f"vigil p99 ms, {P99_CONNECTIONS} connections, {P99_WORKERS} workers, {instances} instance(s)",
            cell.p99_ms if cell else None, MAX_P99_MS, False,
            f"p50 {cell.p50_ms:.2f} ms" if cell else "not measured (or the cell had errors)"))
    reference = grid.inprocess.get(BATCH)
    for workers in grid.workers():
        vigil_cell = grid.peak("vigil", workers, BATCH)
        checks.append(_compare(
            f"vigil {BATCH}-instance rows/s / in-process onnxruntime ({BATCH} rows, 1 thread), {workers} worker(s)",
            vigil_cell.rows_per_s if vigil_cell else None, reference.rows_per_s if reference else None,
            MIN_VS_INPROCESS, "rows/s"))
    for workers in grid.workers():
        for instances in grid.instances():
            checks.append(_compare(
                f"monitoring overhead, 1 - vigil / vigil-nometrics req/s, {workers} worker(s), {instances} instance(s)",
                _req_rate(grid.peak("vigil", workers, instances)),
                _req_rate(grid.peak("vigil-nometrics", workers, instances)),
                MAX_MONITORING_OVERHEAD, "req/s", overhead=True))
    return checks


# --------------------------------------------------------------------------- reporting


def _fmt_rate(value: float) -> str:
    return f"{value:,.0f}"


def http_table(grid: Grid, instances: int, connections: Sequence[int]) -> list[str]:
    """Markdown table of one request size: a row per (target, workers), a column group per connection count."""
    rate_name = "req/s" if instances == 1 else "rows/s"
    head = ["target", "workers"] + [f"c={c} {rate_name}" for c in connections] + [f"c={c} p50 / p99 ms" for c in connections]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    keys = sorted({(c.target, c.workers) for c in grid.cells if c.instances == instances},
                  key=lambda k: (k[1], ALL_TARGETS.index(k[0])))
    for target, workers in keys:
        rates, latencies = [], []
        for connections_ in connections:
            cell = next((c for c in grid.cells if (c.target, c.workers, c.instances, c.connections)
                         == (target, workers, instances, connections_)), None)
            if cell is None:
                rates.append("-")
                latencies.append("-")
                continue
            flag = "" if cell.ok else f" ⚠ {cell.errors} errors"
            rates.append(_fmt_rate(cell.requests_per_s if instances == 1 else cell.rows_per_s) + flag)
            latencies.append(f"{cell.p50_ms:.2f} / {cell.p99_ms:.2f}")
        lines.append("| " + " | ".join([target, str(workers), *rates, *latencies]) + " |")
    return lines


def inprocess_table(results: list[InProcessResult]) -> list[str]:
    """Markdown table of the in-process onnxruntime baseline."""
    lines = ["| rows per call | ms per call (mean) | p50 / p99 ms | calls/s | rows/s |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.rows} | {r.mean_ms:.3f} | {r.p50_ms:.3f} / {r.p99_ms:.3f} | "
                     f"{_fmt_rate(r.calls_per_s)} | {_fmt_rate(r.rows_per_s)} |")
    return lines


def checks_table(checks: list[Check]) -> list[str]:
    """Markdown table of the issue targets."""
    lines = ["| target | measured | required | result | detail |", "|---|---|---|---|---|"]
    for check in checks:
        measured = "-" if check.value is None else f"{check.value:.3f}"
        required = f"{'>=' if check.higher_is_better else '<='} {check.threshold:g}"
        lines.append(f"| {check.name} | {measured} | {required} | **{check.status}** | {check.detail} |")
    return lines


def render_markdown(meta: dict[str, Any], grid: Grid, inprocess: list[InProcessResult], checks: list[Check],
                    connections: Sequence[int]) -> str:
    """The whole report as markdown."""
    lines = [
        f"Run {meta['date']} on {meta['machine']['cpu']} ({meta['machine']['cores']} cores), "
        f"{meta['config']['duration']:g} s per cell after {meta['config']['warmup']:g} s warm-up, "
        f"wrk {meta['config']['wrk_threads']} thread(s); "
        f"bentoml {meta['versions']['bentoml']}, onnxruntime {meta['versions']['onnxruntime']}, "
        f"Python {meta['versions']['python']}.",
        "",
    ]
    for instances in grid.instances():
        lines += [f"**POST /predict, {instances} instance(s) per request**", ""]
        lines += http_table(grid, instances, connections) + [""]
    if inprocess:
        lines += ["**onnxruntime in-process (InferenceSession.run only, intra_op_num_threads=1)**", ""]
        lines += inprocess_table(inprocess) + [""]
    lines += ["**Issue targets**", ""] + checks_table(checks) + [""]
    return "\n".join(lines)


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def run_metadata(config: Config) -> dict[str, Any]:
    """Date, machine and versions of this run."""
    import bentoml
    import onnxruntime

    cpu = platform.processor() or "unknown CPU"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    wrk_version = subprocess.run(["wrk", "--version"], capture_output=True, text=True, check=False).stdout.split("\n")[0]
    config_dict = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()}
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {"cores": os.cpu_count(), "cpu": cpu, "platform": platform.platform()},
        "versions": {"python": platform.python_version(), "bentoml": bentoml.__version__,
                     "onnxruntime": onnxruntime.__version__, "wrk": wrk_version.strip()},
        "config": config_dict,
    }


# --------------------------------------------------------------------------- main


def _raise_on_sigterm(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through every ``finally``: servers get stopped


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; returns 0 when every measured target passes, 1 otherwise."""
    config = parse_args(argv)
    wrk = shutil.which("wrk")
    server_targets = [t for t in SERVER_TARGETS if t in config.targets]
    if server_targets and wrk is None:
        raise SystemExit("wrk is not installed (apt-get install wrk)")
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    meta = run_metadata(config)
    cells: list[Cell] = []
    inprocess: list[InProcessResult] = []
    with model_registry(config.registry) as registry, tempfile.TemporaryDirectory(prefix="vigil-bench-") as tmp:
        version_dir = model_dir(registry)
        rows = feature_rows(version_dir)
        if INPROCESS in config.targets:
            inprocess = bench_inprocess(version_dir, rows, config.inprocess_rows, config.inprocess_seconds)
        bodies = {n: request_body(rows, n) for n in config.instances}
        scripts = {}
        for n, body in bodies.items():
            body_path = Path(tmp) / f"body-{n}.json"
            body_path.write_bytes(body)
            scripts[n] = write_lua(body_path)
        # Worker count outermost, so targets compared with each other run close together in time.
        for workers in config.workers:
            for target in server_targets:
                spec = server_spec(target, workers, free_port(), registry, version_dir)
                assert wrk is not None
                cells += bench_server(spec, config, wrk, scripts, bodies)
    grid = Grid(cells, inprocess)
    checks = evaluate(grid)
    markdown = render_markdown(meta, grid, inprocess, checks, config.connections)
    results = {
        **meta,
        "http": [asdict(c) for c in cells],
        "inprocess": [asdict(r) for r in inprocess],
        "checks": [{**asdict(c), "status": c.status} for c in checks],
    }
    _atomic_write(config.results_dir / "latest.json", json.dumps(results, indent=2) + "\n")
    _atomic_write(config.results_dir / "latest.md", markdown)
    print("\n" + markdown)
    for check in checks:
        print(f"{check.status:<4}  {check.name}: {'-' if check.value is None else f'{check.value:.3f}'} "
              f"({'>=' if check.higher_is_better else '<='} {check.threshold:g}; {check.detail})")
    print(f"\nwrote {config.results_dir / 'latest.json'} and {config.results_dir / 'latest.md'}")
    return 0 if all(c.status != "FAIL" for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
