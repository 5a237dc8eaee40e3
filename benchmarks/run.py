"""Benchmark ``POST /predict`` of Vigil against its baselines, side by side, in one run.

Every HTTP target is started as its own server process on a free 127.0.0.1
port (with its own ``BENTOML_HOME``), loaded with ``wrk`` from another process
and stopped again; the in-process onnxruntime baseline runs in this process
before any server starts. Results go to ``benchmarks/results/latest.json``
and ``latest.md``, and the issue's targets are checked (PASS/FAIL).

Usage::

    .venv/bin/python benchmarks/run.py                 # full run (~15 min on 2 cores)
    .venv/bin/python benchmarks/run.py --quick         # short smoke run (~2 min)
    .venv/bin/python benchmarks/run.py --targets vigil,vigil-nometrics --duration 15

See ``benchmarks/README.md`` for what each target is.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import psutil
from baselines.bench_model import MODEL_DIR_ENV, WORKERS_ENV, load_model

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "benchmarks"
BASELINES_DIR = BENCH_DIR / "baselines"
RESULTS_DIR = BENCH_DIR / "results"
HOST = "127.0.0.1"  # the only address this script ever sends traffic to
MODEL = "cancer"
NON_FEATURE_COLUMNS = ("target", "prediction", "prediction_score")

INPROCESS = "onnxruntime"
SERVER_TARGETS = ("vigil", "vigil-nometrics", "starlette", "bento-quickstart", "bento-mounted-bare")
ALL_TARGETS = (SERVER_TARGETS[0], SERVER_TARGETS[1], INPROCESS, *SERVER_TARGETS[2:])

# The targets.
MIN_VS_QUICKSTART = 2.0  # vigil single-row req/s / bento-quickstart, same worker count
MIN_VS_MOUNTED = 0.8  # vigil single-row req/s / bento-mounted-bare, same worker count
MAX_P99_MS = 50.0  # vigil p99 at P99_CONNECTIONS connections on P99_WORKERS workers
P99_CONNECTIONS = 16
P99_WORKERS = 2
MIN_VS_INPROCESS = 0.5  # vigil rows/s on BATCH-instance requests / in-process onnxruntime rows/s at BATCH rows
BATCH = 64
MAX_MONITORING_OVERHEAD = 0.05  # 1 - vigil / vigil-nometrics req/s

MAX_OTHER_CORES = 0.2  # CPU used by unrelated processes above which a cell is flagged as disturbed
# With several workers, the share of the server's CPU its busiest process may use before a cell counts as
# unbalanced: the kernel hands wrk's keep-alive connections to the workers unevenly, sometimes nearly all to
# one (its share then ~0.95, against ~0.5-0.6 when spread), which halves throughput whatever the code does.
MAX_BUSIEST_SHARE = 0.75
MEASURE_ATTEMPTS = 3  # tries at a monitoring-overhead round until its load is spread over the workers


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
    wait_quiet: float
    overhead_rounds: int
    overhead_seconds: int
    overhead_mode: str
    overhead_control: bool
    vigil_root: Path
    vigil_commit: str | None
    vigil_settings: tuple[tuple[str, str], ...]
    registry: Path | None
    results_dir: Path


def _int_list(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part.strip())


def _target_list(text: str) -> tuple[str, ...]:
    chosen = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = sorted(set(chosen) - set(ALL_TARGETS))
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown target(s) {', '.join(unknown)}; choose from {', '.join(ALL_TARGETS)}")
    return chosen


def _setting(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.startswith("VIGIL_") or name == "VIGIL_METRICS_ENABLED":
        raise argparse.ArgumentTypeError(f"expected VIGIL_NAME=value (not VIGIL_METRICS_ENABLED), got {text!r}")
    return name, value


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
    parser.add_argument("--overhead-rounds", type=int, metavar="N",
                        help="rounds of the paired monitoring-overhead measurement: vigil and vigil-nometrics "
                             "run at once and are loaded together (or in turn, see --overhead-mode), N times per "
                             "request size at 16 connections (default 10, quick 0; 0 skips it)")
    parser.add_argument("--overhead-seconds", type=int, metavar="S",
                        help="seconds measured per cell of those rounds (default 4: many short rounds average "
                             "this machine's drifts better than a few long ones)")
    parser.add_argument("--overhead-mode", choices=("together", "turns"), default="together",
                        help="together (default): both servers loaded at once, each by its own wrk, judged by "
                             "server CPU time per request; turns: loaded one after the other, judged by req/s")
    parser.add_argument("--overhead-control", action="store_true",
                        help=f"A/A check of the harness: pair vigil with a second vigil ({CONTROL}, monitoring on) "
                             "instead of vigil-nometrics; the measured 'overhead' should then be near 0")
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                        help="before each server, wait up to this long for other jobs to leave the CPU (default 0)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--vigil-root", type=Path, default=ROOT,
                       help="checkout of Vigil to serve and train with (default: this one, as it is on disk)")
    which.add_argument("--vigil-commit", metavar="REV",
                       help="serve and train with this commit of this repository (extracted to a temp dir), "
                            "e.g. HEAD to leave uncommitted changes out")
    parser.add_argument("--vigil-setting", type=_setting, action="append", default=[], metavar="VIGIL_NAME=VALUE",
                        help="a setting for both vigil and vigil-nometrics, e.g. VIGIL_METRICS_FLUSH_SECONDS=1 "
                             "(repeatable; the benchmark otherwise clears every VIGIL_ variable)")
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
        wait_quiet=args.wait_quiet,
        overhead_rounds=max(0, args.overhead_rounds if args.overhead_rounds is not None else (0 if quick else 10)),
        overhead_seconds=max(1, args.overhead_seconds or 4),
        overhead_mode=args.overhead_mode,
        overhead_control=args.overhead_control,
        vigil_root=args.vigil_root.resolve(),
        vigil_commit=args.vigil_commit,
        vigil_settings=tuple(args.vigil_setting),
        registry=args.registry,
        results_dir=args.results_dir,
    )


# --------------------------------------------------------------------------- data


def _git(root: Path, *args: str) -> bytes:
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True, check=True).stdout


def describe_checkout(root: Path) -> str:
    """``root``'s commit, marked when its code differs from it; or why there is none."""
    try:
        commit = _git(root, "rev-parse", "--short", "HEAD").decode().strip()
        changed = _git(root, "status", "--porcelain", "--", "service", "monitoring", "examples").strip()
    except (OSError, subprocess.CalledProcessError):
        return f"{root} (not a git checkout)"
    return f"{commit} with uncommitted changes" if changed else commit


@contextmanager
def vigil_checkout(config: Config) -> Iterator[tuple[Path, str]]:
    """The Vigil tree to benchmark and a description of it: ``--vigil-root``, or ``--vigil-commit`` extracted."""
    if config.vigil_commit is None:
        yield config.vigil_root, describe_checkout(config.vigil_root)
        return
    try:
        commit = _git(ROOT, "rev-parse", "--short", f"{config.vigil_commit}^{{commit}}").decode().strip()
        archive = _git(ROOT, "archive", "--format=tar", commit)
    except subprocess.CalledProcessError as exc:
        raise SystemExit(f"cannot extract commit {config.vigil_commit!r}: {exc.stderr.decode().strip()}") from None
    with tempfile.TemporaryDirectory(prefix="vigil-bench-src-") as tmp:
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(tmp, filter="data")
        yield Path(tmp), commit


def vigil_env(vigil_root: Path) -> dict[str, str]:
    """This environment without Vigil/BentoML/Prometheus settings, importing Vigil from ``vigil_root``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIGIL_", "BENTOML_", "PROMETHEUS_"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(vigil_root), env.get("PYTHONPATH")]))
    env["BENTOML_DO_NOT_TRACK"] = "True"
    return env


@contextmanager
def model_registry(existing: Path | None, vigil_root: Path) -> Iterator[Path]:
    """A registry holding ``cancer``: ``existing``, or the examples trained (by ``vigil_root``) into a temp dir."""
    if existing is not None:
        yield existing.resolve()
        return
    with tempfile.TemporaryDirectory(prefix="vigil-bench-registry-") as tmp:
        registry = Path(tmp) / "models"
        print("training and registering the example models ...", flush=True)
        subprocess.run(
            [sys.executable, "examples/train.py", "--register", "--registry", str(registry),
             "--out", str(Path(tmp) / "trained")],
            cwd=vigil_root, env=vigil_env(vigil_root), check=True, stdout=subprocess.DEVNULL,
        )
        yield registry


def model_dir(registry: Path) -> Path:
    """The newest registered version directory of the benchmark model."""
    model_root = registry / MODEL
    versions = sorted((p for p in model_root.iterdir() if (p / "card.yaml").is_file()),
                      key=lambda p: (len(p.name), p.name)) if model_root.is_dir() else []
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


# --------------------------------------------------------------------------- CPU accounting


def _tree_cpu_seconds(root: psutil.Process) -> dict[int, float]:
    """User + system CPU seconds of ``root`` and of each of its live descendants, by pid."""
    seconds = {}
    for proc in [root, *root.children(recursive=True)]:
        with suppress(psutil.NoSuchProcess):
            times = proc.cpu_times()
            seconds[proc.pid] = times.user + times.system
    return seconds


@dataclass
class CpuUse:
    """Cores busy over an interval: the server's, and everything else's (other jobs on the machine)."""

    server_cores: float = 0.0
    other_cores: float = 0.0
    busiest_share: float = 1.0
    """The share of the server's CPU used by its busiest process: about 1/workers when the load is spread."""


@dataclass(frozen=True)
class CpuSnapshot:
    """Cumulative CPU seconds at one instant: whole machine, this script with its waited children, server tree."""

    wall: float
    machine: float
    own: float
    server: dict[int, float]

    @classmethod
    def take(cls, server: psutil.Process | None = None) -> CpuSnapshot:
        """Read the counters now (``server`` None: no server to account for)."""
        machine = psutil.cpu_times()
        own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return cls(
            wall=time.monotonic(),
            machine=sum(machine) - machine.idle - getattr(machine, "iowait", 0.0),
            own=own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime,
            server=_tree_cpu_seconds(server) if server is not None else {},
        )

    def since(self, earlier: CpuSnapshot) -> CpuUse:
        """Cores used between ``earlier`` and this snapshot (wrk counts as ours once it has been waited for)."""
        wall = self.wall - earlier.wall
        # A process started in between counts whole; one that ended in between is missed (servers here keep theirs).
        per_process = [seconds - earlier.server.get(pid, 0.0) for pid, seconds in self.server.items()]
        server = sum(per_process)
        other = self.machine - earlier.machine - server - (self.own - earlier.own)
        return CpuUse(server_cores=server / wall, other_cores=max(0.0, other / wall),
                      busiest_share=max(per_process) / server if server > 0 else 1.0)


def _disturbance(other_cores: float) -> str:
    """A warning for console lines when other processes used the CPU, else nothing."""
    return f"  disturbed: other processes used {other_cores:.2f} cores" if other_cores > MAX_OTHER_CORES else ""


@contextmanager
def cpu_use(server: psutil.Process) -> Iterator[CpuUse]:
    """Measure, over the ``with`` block, the server's CPU and that of processes other than it, this script and wrk.

    ``other_cores`` well above zero means something else ran on the machine and the measurement is not trustworthy.
    """
    use = CpuUse()
    before = CpuSnapshot.take(server)
    yield use
    after = CpuSnapshot.take(server).since(before)
    use.server_cores, use.other_cores, use.busiest_share = after.server_cores, after.other_cores, after.busiest_share


def wait_for_quiet(limit: float, threshold: float = MAX_OTHER_CORES) -> float:
    """Wait up to ``limit`` seconds until other processes use at most ``threshold`` cores; returns their last use."""
    deadline = time.monotonic() + limit
    while True:
        before = CpuSnapshot.take()
        time.sleep(1.0)
        other = CpuSnapshot.take().since(before).other_cores
        if other <= threshold or time.monotonic() >= deadline:
            return other


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
    other_cores: float

    @property
    def disturbed(self) -> bool:
        """Other processes on the machine took a noticeable share of the CPU meanwhile."""
        return self.other_cores > MAX_OTHER_CORES


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
        before = CpuSnapshot.take()
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            started = time.perf_counter_ns()
            model.run(matrix)
            samples.append(time.perf_counter_ns() - started)
        other_cores = CpuSnapshot.take().since(before).other_cores
        total_s = sum(samples) / 1e9
        ms = np.array(samples) / 1e6
        result = InProcessResult(
            rows=size, calls=len(samples), mean_ms=float(ms.mean()), p50_ms=float(np.percentile(ms, 50)),
            p99_ms=float(np.percentile(ms, 99)), calls_per_s=len(samples) / total_s,
            rows_per_s=len(samples) * size / total_s, other_cores=other_cores,
        )
        print(f"  onnxruntime in-process {size:>5} rows: {result.mean_ms:.3f} ms/call, "
              f"{result.rows_per_s:,.0f} rows/s{_disturbance(other_cores)}", flush=True)
        results.append(result)
    return results


# --------------------------------------------------------------------------- servers


@dataclass(frozen=True)
class ServerSpec:
    """How to start one HTTP target with a given worker count."""

    target: str
    workers: int
    port: int
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    ready_path: str = "/readyz"
    """The path that answers 200 once the server is ready (MLServer's is ``/v2/health/ready``)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _bentoml_serve(service: str, port: int) -> list[str]:
    return [sys.executable, "-m", "bentoml", "serve", service, "--working-dir", str(BASELINES_DIR),
            "--host", HOST, "--port", str(port)]


def server_spec(target: str, workers: int, port: int, registry: Path, version_dir: Path,
                vigil_root: Path, settings: Sequence[tuple[str, str]] = ()) -> ServerSpec:
    """The command line and environment of ``target`` (``BENTOML_HOME`` is added at start).

    ``settings`` are ``VIGIL_`` variables for the Vigil targets.
    """
    env = vigil_env(vigil_root)
    if target in ("vigil", "vigil-nometrics", CONTROL):
        env.update(settings)
        env["VIGIL_METRICS_ENABLED"] = "false" if target == "vigil-nometrics" else "true"
        # What the `vigil` console script runs, importing Vigil from vigil_root.
        argv = [sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--host", HOST,
                "--registry", str(registry), "--workers", str(workers)]
        return ServerSpec(target, workers, port, argv, env, vigil_root)
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
    return ServerSpec(target, workers, port, argv, env, BASELINES_DIR)


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _wait_ready(proc: subprocess.Popen[bytes], url: str, timeout: float, path: str = "/readyz") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"{url}{path}", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"server not ready after {timeout:.0f}s")


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
        with suppress(psutil.NoSuchProcess):
            child.kill()
    psutil.wait_procs(alive, timeout=5)


@contextmanager
def running_server(spec: ServerSpec, ready_timeout: float) -> Iterator[tuple[str, psutil.Process]]:
    """Start ``spec`` with its own ``BENTOML_HOME``; once ready yield its base URL and process; always stop it."""
    with tempfile.TemporaryDirectory(prefix=f"vigil-bench-{spec.target}-", ignore_cleanup_errors=True) as tmp:
        home = Path(tmp)
        log_path = home / "server.log"
        # Everything the server writes (BentoML's home, Vigil's prediction log) stays in the temp dir.
        env = {**spec.env, "BENTOML_HOME": str(home / "bentoml"), "VIGIL_DATA_DIR": str(home / "var")}
        url = f"http://{HOST}:{spec.port}"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(spec.argv, cwd=spec.cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)
            try:
                _wait_ready(proc, url, ready_timeout, spec.ready_path)
                yield url, psutil.Process(proc.pid)
            except (RuntimeError, OSError) as exc:
                raise RuntimeError(f"{exc}\n--- end of the server log ---\n{_log_tail(log_path)}") from exc
            finally:
                stop_process_tree(proc)


def post_json(url: str, path: str, body: bytes) -> Any:
    """POST the JSON ``body`` to ``url`` + ``path`` and return the answer read; anything but 2xx is a RuntimeError."""
    request = urllib.request.Request(f"{url}{path}", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"{url}{path} answered {exc.code}: {exc.read()[:300]!r}") from None


def check_answer(url: str, body: bytes, instances: int) -> None:
    """One request before the load: the target must answer 200 with one prediction per instance."""
    answer = post_json(url, "/predict", body)
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


def start_wrk(wrk: str, url: str, script: Path, connections: int, seconds: int, threads: int,
              path: str = "/predict") -> subprocess.Popen[str]:
    """Start loading ``url`` + ``path`` for ``seconds`` (wrk takes whole seconds) with ``connections`` connections."""
    argv = [wrk, f"-t{min(threads, connections)}", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s",
            "--latency", "-s", str(script), f"{url}{path}"]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish_wrk(proc: subprocess.Popen[str], seconds: int) -> WrkResult:
    """Wait for a wrk started by :func:`start_wrk` and parse what it measured."""
    return parse_wrk(wrk_output(proc, seconds))


def wrk_output(proc: subprocess.Popen[str], seconds: int) -> str:
    """Wait for a wrk started by :func:`start_wrk`; what it printed (its script's output too)."""
    try:
        out, err = proc.communicate(timeout=seconds + 60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise RuntimeError(f"wrk did not finish within {seconds + 60} s") from None
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {err or out}")
    return out


def run_wrk(wrk: str, url: str, script: Path, connections: int, seconds: int, threads: int) -> WrkResult:
    """Load ``url`` for ``seconds`` with ``connections`` connections; parse the result."""
    return finish_wrk(start_wrk(wrk, url, script, connections, seconds, threads), seconds)


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
    server_cores: float
    other_cores: float
    cpu_ms_per_request: float
    """Server CPU time per request: a cost that other jobs on the machine barely change, unlike throughput."""
    wrk: dict[str, Any] = field(default_factory=dict)
    round: int | None = None
    """Set on the cells of the paired monitoring-overhead measurement."""
    busiest_share: float = 1.0
    """Share of the server's CPU used by its busiest process (about 1/workers when the load is spread)."""
    attempts: int = 1
    """Measurements taken of a monitoring-overhead round; the earlier ones were unbalanced and are not kept."""
    together: bool = False
    """Measured at the same time as the other server of the pair (see :func:`measure_together`)."""

    @property
    def ok(self) -> bool:
        """Measured without a failed request."""
        return self.errors == 0

    @property
    def disturbed(self) -> bool:
        """Other processes on the machine took a noticeable share of the CPU during the cell."""
        return self.other_cores > MAX_OTHER_CORES

    @property
    def unbalanced(self) -> bool:
        """One of several workers did nearly all the work (see :data:`MAX_BUSIEST_SHARE`)."""
        return self.workers > 1 and self.busiest_share > MAX_BUSIEST_SHARE


@dataclass
class Measurements:
    """Everything one run measured, and the servers that could not be measured."""

    cells: list[Cell] = field(default_factory=list)
    inprocess: list[InProcessResult] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    overhead: list[Cell] = field(default_factory=list)
    """The paired vigil / vigil-nometrics cells (see :func:`bench_overhead`)."""


def bench_server(spec: ServerSpec, config: Config, wrk: str, scripts: dict[int, Path],
                 bodies: dict[int, bytes]) -> list[Cell]:
    """Start one server, measure every (instances, connections) cell against it, stop it."""
    label = f"{spec.target} ({spec.workers}w)"
    if config.wait_quiet > 0:
        other = wait_for_quiet(config.wait_quiet)
        if other > MAX_OTHER_CORES:
            print(f"{label}: other processes still use {other:.2f} cores; measuring anyway", flush=True)
    started = time.monotonic()
    cells = []
    with running_server(spec, config.ready_timeout) as (url, server):
        print(f"{label}: ready in {time.monotonic() - started:.1f}s at {url}", flush=True)
        for instances in config.instances:
            check_answer(url, bodies[instances], instances)
            for connections in config.connections:
                cells.append(measure_cell(spec, url, server, instances, connections, config, wrk, scripts))
    return cells


def measure_cell(spec: ServerSpec, url: str, server: psutil.Process, instances: int, connections: int,
                 config: Config, wrk: str, scripts: dict[int, Path], round_: int | None = None) -> Cell:
    """Warm up, then load ``url`` for one cell and measure it (throughput, latency, server CPU)."""
    if config.warmup > 0:
        run_wrk(wrk, url, scripts[instances], connections, config.warmup, config.wrk_threads)
    seconds = config.duration if round_ is None else config.overhead_seconds
    with cpu_use(server) as cpu:
        result = run_wrk(wrk, url, scripts[instances], connections, seconds, config.wrk_threads)
    return _cell(spec, instances, connections, result, cpu, round_)


def _cell(spec: ServerSpec, instances: int, connections: int, result: WrkResult, cpu: CpuUse,
          round_: int | None, together: bool = False) -> Cell:
    """The cell measured by ``result`` and ``cpu``, printed as one console line."""
    cell = Cell(
        target=spec.target, workers=spec.workers, instances=instances, connections=connections,
        requests_per_s=result.requests_per_s, rows_per_s=result.requests_per_s * instances,
        p50_ms=result.p50_ms, p99_ms=result.p99_ms, requests=result.requests,
        errors=result.non_2xx + result.socket_errors, server_cores=cpu.server_cores,
        other_cores=cpu.other_cores,
        cpu_ms_per_request=1000 * cpu.server_cores / max(result.requests_per_s, 1e-9), wrk=asdict(result),
        round=round_, busiest_share=cpu.busiest_share, together=together,
    )
    flags = (("" if cell.ok else f"  {cell.errors} ERRORS") + _disturbance(cell.other_cores)
             + (f"  unbalanced: one worker used {cell.busiest_share:.0%} of the CPU" if cell.unbalanced else ""))
    where = f"{spec.target} ({spec.workers}w)" + (f" round {round_}" if round_ is not None else "")
    print(f"  {where} inst={instances:<3} c={connections:<3} {cell.requests_per_s:>9,.0f} req/s "
          f"{cell.rows_per_s:>10,.0f} rows/s  p50 {cell.p50_ms:7.2f} ms  p99 {cell.p99_ms:7.2f} ms  "
          f"server {cell.server_cores:.2f} cores, {cell.cpu_ms_per_request:.2f} ms CPU/req{flags}", flush=True)
    return cell


def measure_together(servers: Sequence[tuple[ServerSpec, tuple[str, psutil.Process]]], instances: int,
                     config: Config, wrk: str, scripts: dict[int, Path], round_: int) -> list[Cell]:
    """Load every server at once, each with its own wrk, and measure each one's requests and CPU.

    The servers share every moment of the machine, so a slow spell of the
    host (this VM's CPU time per request drifts by 10-30% over tens of
    seconds) slows both alike: their ratio of CPU time per request is the
    sharpest comparison this machine allows. How the scheduler splits the
    cores between them moves their req/s, so req/s is reported, not judged.
    """
    seconds = config.overhead_seconds
    if config.warmup > 0:
        warming = [start_wrk(wrk, url, scripts[instances], OVERHEAD_CONNECTIONS, config.warmup, config.wrk_threads)
                   for _, (url, _) in servers]
        for proc in warming:
            finish_wrk(proc, config.warmup)
    before = [CpuSnapshot.take(server) for _, (_, server) in servers]
    loads = [start_wrk(wrk, url, scripts[instances], OVERHEAD_CONNECTIONS, seconds, config.wrk_threads)
             for _, (url, _) in servers]
    results = [finish_wrk(proc, seconds) for proc in loads]
    uses = [CpuSnapshot.take(server).since(earlier) for (_, (_, server)), earlier in zip(servers, before)]
    everyone = sum(use.server_cores for use in uses)
    for use in uses:  # each server's "other" processes include the servers beside it
        use.other_cores = max(0.0, use.other_cores - (everyone - use.server_cores))
    return [_cell(spec, instances, OVERHEAD_CONNECTIONS, result, use, round_, together=True)
            for (spec, _), result, use in zip(servers, results, uses)]


OVERHEAD_CONNECTIONS = 16
OVERHEAD_PAIR = ("vigil", "vigil-nometrics")
CONTROL = "vigil-control"
"""A second ``vigil``, monitoring on, paired with the first by ``--overhead-control``: an A/A run of the harness."""


def bench_overhead(config: Config, wrk: str, scripts: dict[int, Path], bodies: dict[int, bytes],
                   registry: Path, version_dir: Path) -> list[Cell]:
    """Monitoring overhead, measured in pairs: both servers up at once, loaded together or in turns.

    Consecutive runs of the very same server differ here by up to 15% (a
    shared 2-core VM), more than the 5% to be judged. Loading the two
    servers together (``--overhead-mode together``, see :func:`measure_together`)
    or alternately (A B, then B A) puts both under the same conditions,
    and the median of the per-round ratios discards the odd disturbed round.
    A pair of servers also keeps a luck of its own for as long as it runs (one
    start measured 7% in every round, the next 1%, same code), so the pair is
    started afresh every two rounds. With several workers, a cell whose load
    landed on one worker (:attr:`Cell.unbalanced`) is measured again, up to
    :data:`MEASURE_ATTEMPTS` times, with new connections.
    """
    cells: list[Cell] = []
    for workers in config.workers:
        for first_round in range(0, config.overhead_rounds, 2):
            specs = [server_spec(t, workers, free_port(), registry, version_dir, config.vigil_root,
                                 config.vigil_settings)
                     for t in (OVERHEAD_PAIR[0], CONTROL if config.overhead_control else OVERHEAD_PAIR[1])]
            with running_server(specs[0], config.ready_timeout) as first, \
                    running_server(specs[1], config.ready_timeout) as second:
                servers = list(zip(specs, (first, second)))
                for instances in config.instances:
                    for spec, (url, _) in servers:
                        check_answer(url, bodies[instances], instances)
                    for round_ in range(first_round, min(first_round + 2, config.overhead_rounds)):
                        if config.overhead_mode == "together":
                            cells += measure_balanced(lambda: measure_together(
                                servers, instances, config, wrk, scripts, round_))  # noqa: B023 - called at once
                            continue
                        for spec, (url, server) in (servers if round_ % 2 == 0 else servers[::-1]):
                            cells += measure_balanced(lambda: [measure_cell(  # noqa: B023 - called at once
                                spec, url, server, instances, OVERHEAD_CONNECTIONS, config, wrk, scripts, round_)])
    return cells


def measure_balanced(measure: Callable[[], list[Cell]]) -> list[Cell]:
    """``measure()``, again (new connections) while the load of a server landed on one of its workers."""
    for attempt in range(1, MEASURE_ATTEMPTS + 1):
        cells = measure()
        if not any(cell.unbalanced for cell in cells):
            break
    return [replace(cell, attempts=attempt) for cell in cells]


def overhead_check(cells: list[Cell], workers: int, instances: int) -> Check | None:
    """Monitoring's cost from the paired rounds, or None when not measured.

    Rounds taken in turns: ``1 -`` the median of vigil / vigil-nometrics
    req/s. Rounds taken together: ``1 -`` the median of vigil-nometrics /
    vigil server CPU time per request, the throughput a CPU-bound server
    loses (their req/s are split by the scheduler; see :func:`measure_together`).
    """
    rounds: dict[int, dict[str, Cell]] = {}
    for cell in cells:
        if (cell.workers, cell.instances) == (workers, instances) and cell.ok and cell.round is not None:
            rounds.setdefault(cell.round, {})[cell.target] = cell
    base = _baseline(cells)
    measured = [(r["vigil"], r[base]) for r in rounds.values() if len(r) == 2]
    # A round where one server's load landed on one worker compares the kernel's luck, not the code.
    pairs = [(a, b) for a, b in measured if not (a.unbalanced or b.unbalanced)]
    if not pairs:
        return None
    together = all(a.together for a, _ in pairs)
    requests = sorted(a.requests_per_s / b.requests_per_s for a, b in pairs)
    cpu = sorted(b.cpu_ms_per_request / a.cpu_ms_per_request for a, b in pairs)
    judged, other = (cpu, requests) if together else (requests, cpu)
    name = ("monitoring overhead, 1 - " + (f"{base} / vigil server CPU per request" if together
                                            else f"vigil / {base} req/s")
            + f", {workers} worker(s), {instances} instance(s), " + ("together" if together else "interleaved"))
    left_out = len(measured) - len(pairs)
    detail = (f"median of {len(pairs)} rounds; per round {', '.join(f'{r:.3f}' for r in judged)}; "
              + (f"vigil / {base} req/s: median {float(np.median(other)):.3f}" if together else
                 f"server CPU per request, {base} / vigil: median {float(np.median(other)):.3f}")
              + (f"; {left_out} round(s) left out, unbalanced after {MEASURE_ATTEMPTS} tries" if left_out else ""))
    return Check(name, 1 - float(np.median(judged)), MAX_MONITORING_OVERHEAD, False, detail,
                 any(a.disturbed or b.disturbed for a, b in pairs))


# --------------------------------------------------------------------------- targets (issue checks)


@dataclass
class Check:
    """One issue target: the measured value against its threshold."""

    name: str
    value: float | None
    threshold: float
    higher_is_better: bool
    detail: str
    disturbed: bool = False
    """A cell it rests on was measured while other processes used the CPU."""

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
        """The error-free cell with the highest throughput over connection counts, or None."""
        found = [c for c in self.cells if (c.target, c.workers, c.instances) == (target, workers, instances) and c.ok]
        return max(found, key=lambda c: c.requests_per_s, default=None)

    def find(self, target: str, workers: int, instances: int, connections: int) -> Cell | None:
        """The cell measured for this combination, or None."""
        key = (target, workers, instances, connections)
        return next((c for c in self.cells if (c.target, c.workers, c.instances, c.connections) == key), None)

    def cell(self, target: str, workers: int, instances: int, connections: int) -> Cell | None:
        """The cell for this combination if it was measured without errors, else None."""
        found = self.find(target, workers, instances, connections)
        return found if found is not None and found.ok else None

    def workers(self) -> list[int]:
        """Worker counts measured."""
        return sorted({c.workers for c in self.cells})

    def instances(self) -> list[int]:
        """Instances per request measured."""
        return sorted({c.instances for c in self.cells})


def _compare(name: str, ours: Cell | None, theirs: Cell | InProcessResult | None, threshold: float,
             rate: str = "requests_per_s", overhead: bool = False) -> Check:
    """``ours / theirs >= threshold`` on attribute ``rate``; with ``overhead``, ``1 - ours / theirs <= threshold``."""
    if ours is None or theirs is None:
        return Check(name, None, threshold, not overhead, "not measured (or a cell had errors)")
    ratio = getattr(ours, rate) / getattr(theirs, rate)
    unit = "req/s" if rate == "requests_per_s" else "rows/s"
    detail = f"{getattr(ours, rate):,.0f} vs {getattr(theirs, rate):,.0f} {unit}"
    if isinstance(theirs, Cell):
        detail += f"; server CPU {ours.cpu_ms_per_request:.2f} vs {theirs.cpu_ms_per_request:.2f} ms/request"
    return Check(name, 1 - ratio if overhead else ratio, threshold, not overhead, detail,
                 ours.disturbed or theirs.disturbed)


def evaluate(grid: Grid, overhead: Sequence[Cell] = ()) -> list[Check]:
    """The issue's targets, computed from the cells measured (throughput = best over connection counts)."""
    checks: list[Check] = []
    for workers in grid.workers():
        for baseline, threshold in (("bento-quickstart", MIN_VS_QUICKSTART), ("bento-mounted-bare", MIN_VS_MOUNTED)):
            checks.append(_compare(f"vigil / {baseline}, single-row req/s, {workers} worker(s)",
                                   grid.peak("vigil", workers, 1), grid.peak(baseline, workers, 1), threshold))
    for instances in grid.instances():
        cell = grid.cell("vigil", P99_WORKERS, instances, P99_CONNECTIONS)
        name = f"vigil p99 ms, {P99_CONNECTIONS} connections, {P99_WORKERS} workers, {instances} instance(s)"
        if cell is None:
            checks.append(Check(name, None, MAX_P99_MS, False, "not measured (or the cell had errors)"))
        else:
            checks.append(Check(name, cell.p99_ms, MAX_P99_MS, False, f"p50 {cell.p50_ms:.2f} ms", cell.disturbed))
    for workers in grid.workers():
        checks.append(_compare(
            f"vigil {BATCH}-instance rows/s / in-process onnxruntime ({BATCH} rows, 1 thread), {workers} worker(s)",
            grid.peak("vigil", workers, BATCH), grid.inprocess.get(BATCH), MIN_VS_INPROCESS, rate="rows_per_s"))
    for workers in grid.workers() or sorted({c.workers for c in overhead}):
        for instances in grid.instances() or sorted({c.instances for c in overhead}):
            paired = overhead_check(list(overhead), workers, instances)
            if paired is not None:  # the robust measurement, when it was made
                checks.append(paired)
                continue
            checks.append(_compare(
                f"monitoring overhead, 1 - vigil / vigil-nometrics req/s, {workers} worker(s), {instances} instance(s)",
                grid.peak("vigil", workers, instances), grid.peak("vigil-nometrics", workers, instances),
                MAX_MONITORING_OVERHEAD, overhead=True))
    return checks


# --------------------------------------------------------------------------- reporting


def _fmt_rate(value: float) -> str:
    return f"{value:,.0f}"


def http_table(grid: Grid, instances: int, connections: Sequence[int]) -> list[str]:
    """Markdown table of one request size: a row per (target, workers), a column group per connection count."""
    rate_name = "req/s" if instances == 1 else "rows/s"
    head = ["target", "workers", *(f"c={c} {rate_name}" for c in connections),
            *(f"c={c} p50 / p99 ms" for c in connections), "server CPU ms/req at peak"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    keys = sorted({(c.target, c.workers) for c in grid.cells if c.instances == instances},
                  key=lambda k: (k[1], ALL_TARGETS.index(k[0])))
    for target, workers in keys:
        rates, latencies = [], []
        for connections_ in connections:
            cell = grid.find(target, workers, instances, connections_)
            if cell is None:
                rates.append("-")
                latencies.append("-")
                continue
            flag = ("" if cell.ok else f" ⚠ {cell.errors} errors") + (" †" if cell.disturbed else "")
            rates.append(_fmt_rate(cell.requests_per_s if instances == 1 else cell.rows_per_s) + flag)
            latencies.append(f"{cell.p50_ms:.2f} / {cell.p99_ms:.2f}")
        peak = grid.peak(target, workers, instances)
        cpu = f"{peak.cpu_ms_per_request:.2f}" if peak is not None else "-"
        lines.append("| " + " | ".join([target, str(workers), *rates, *latencies, cpu]) + " |")
    return lines


def inprocess_table(results: list[InProcessResult]) -> list[str]:
    """Markdown table of the in-process onnxruntime baseline."""
    lines = ["| rows per call | ms per call (mean) | p50 / p99 ms | calls/s | rows/s |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.rows} | {r.mean_ms:.3f} | {r.p50_ms:.3f} / {r.p99_ms:.3f} | "
                     f"{_fmt_rate(r.calls_per_s)} | {_fmt_rate(r.rows_per_s)}{' †' if r.disturbed else ''} |")
    return lines


def checks_table(checks: list[Check]) -> list[str]:
    """Markdown table of the issue targets."""
    lines = ["| target | measured | required | result | detail |", "|---|---|---|---|---|"]
    for check in checks:
        measured = "-" if check.value is None else f"{check.value:.3f}"
        required = f"{'>=' if check.higher_is_better else '<='} {check.threshold:g}"
        mark = " †" if check.disturbed else ""
        lines.append(f"| {check.name} | {measured} | {required} | **{check.status}**{mark} | {check.detail} |")
    return lines


def _baseline(cells: Sequence[Cell]) -> str:
    """The target ``vigil`` was paired with: ``vigil-nometrics``, or :data:`CONTROL` in an A/A run."""
    return CONTROL if any(cell.target == CONTROL for cell in cells) else OVERHEAD_PAIR[1]


def overhead_table(cells: Sequence[Cell]) -> list[str]:
    """Markdown table of the paired rounds: a row per (workers, instances, round)."""
    base = _baseline(cells)
    lines = [f"| workers | instances | round | vigil req/s (CPU ms) | {base} req/s (CPU ms) | req/s ratio "
             f"| CPU ratio ({base} / vigil) |",
             "|---|---|---|---|---|---|---|"]
    rounds: dict[tuple[int, int, int], dict[str, Cell]] = {}
    for cell in cells:
        rounds.setdefault((cell.workers, cell.instances, cell.round or 0), {})[cell.target] = cell
    for (workers, instances, round_), pair in sorted(rounds.items()):
        a, b = pair.get("vigil"), pair.get(base)

        def shown(c: Cell | None) -> str:
            if c is None:
                return "-"
            return (f"{c.requests_per_s:,.0f} ({c.cpu_ms_per_request:.3f})" + ("" if c.ok else " ⚠")
                    + (" ‡" if c.unbalanced else "") + (f" [{c.attempts} tries]" if c.attempts > 1 else ""))

        ratio = cpu = "-"
        if a is not None and b is not None:
            ratio, cpu = f"{a.requests_per_s / b.requests_per_s:.3f}", f"{b.cpu_ms_per_request / a.cpu_ms_per_request:.3f}"
        lines.append(f"| {workers} | {instances} | {round_} | {shown(a)} | {shown(b)} | {ratio} | {cpu} |")
    return lines


def render_markdown(meta: dict[str, Any], grid: Grid, measured: Measurements, checks: list[Check],
                    connections: Sequence[int]) -> str:
    """The whole report as markdown."""
    lines = [
        f"Run {meta['date']} on {meta['machine']['cpu']} ({meta['machine']['cores']} cores), "
        f"{meta['config']['duration']:g} s per cell after {meta['config']['warmup']:g} s warm-up, "
        f"wrk {meta['config']['wrk_threads']} thread(s); "
        f"bentoml {meta['versions']['bentoml']}, onnxruntime {meta['versions']['onnxruntime']}, "
        f"Python {meta['versions']['python']}; Vigil {meta['vigil']}"
        + "".join(f", {name}={value}" for name, value in meta["config"].get("vigil_settings", ())) + ".",
        "",
    ]
    for instances in grid.instances():
        lines += [f"**POST /predict, {instances} instance(s) per request**", ""]
        lines += http_table(grid, instances, connections) + [""]
    if measured.inprocess:
        lines += ["**onnxruntime in-process (InferenceSession.run only, intra_op_num_threads=1)**", ""]
        lines += inprocess_table(measured.inprocess) + [""]
    for failure in measured.failures:
        first_line = failure["error"].splitlines()[0] if failure["error"] else "?"
        lines += [f"**{failure['target']} ({failure['workers']} workers) could not be measured:** {first_line}", ""]
    if measured.overhead:
        how = ("loaded together, each by its own wrk" if meta["config"].get("overhead_mode") == "together"
               else "loaded in turn")
        lines += [f"**Monitoring overhead, paired: vigil and {_baseline(measured.overhead)} up at once, {how}, at "
                  f"{OVERHEAD_CONNECTIONS} connections, {meta['config'].get('overhead_seconds', '?')} s per cell "
                  f"(req/s, server CPU ms/request)**", ""]
        lines += overhead_table(measured.overhead) + [""]
        if any(c.workers > 1 for c in measured.overhead):
            lines += [f"[k tries]: the first k-1 measurements had one worker using more than {MAX_BUSIEST_SHARE:.0%} "
                      f"of the server's CPU and were taken again; ‡: still so after {MEASURE_ATTEMPTS} tries, and "
                      "the round is left out of the median.", ""]
    if checks:
        lines += ["**Issue targets**", ""] + checks_table(checks) + [""]
    if any(c.disturbed for c in grid.cells) or any(r.disturbed for r in measured.inprocess):
        lines += [f"† other processes on the machine used more than {MAX_OTHER_CORES:g} cores during the cell "
                  "(or a cell the target rests on; see `other_cores` in latest.json): treat it as noisy.", ""]
    return "\n".join(lines)


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _cpu_model() -> str:
    with suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def run_metadata(config: Config, wrk: str | None, vigil: str) -> dict[str, Any]:
    """Date, machine and versions of this run."""
    import bentoml
    import onnxruntime

    wrk_version = "not installed"
    if wrk is not None:
        wrk_version = subprocess.run([wrk, "--version"], capture_output=True, text=True, check=False).stdout
        wrk_version = wrk_version.split("\n")[0].strip()
    config_dict = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()}
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {"cores": os.cpu_count(), "cpu": _cpu_model(), "platform": platform.platform()},
        "versions": {"python": platform.python_version(), "bentoml": bentoml.__version__,
                     "onnxruntime": onnxruntime.__version__, "wrk": wrk_version},
        "vigil": vigil,
        "config": config_dict,
    }


# --------------------------------------------------------------------------- main


def _raise_on_sigterm(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through every ``finally``: servers get stopped


def measure(config: Config, wrk: str | None) -> Measurements:
    """Run the in-process baseline, then every server target at every worker count."""
    out = Measurements()
    server_targets = [t for t in SERVER_TARGETS if t in config.targets]
    with (model_registry(config.registry, config.vigil_root) as registry,
          tempfile.TemporaryDirectory(prefix="vigil-bench-") as tmp):
        version_dir = model_dir(registry)
        rows = feature_rows(version_dir)
        if INPROCESS in config.targets:
            out.inprocess = bench_inprocess(version_dir, rows, config.inprocess_rows, config.inprocess_seconds)
        bodies = {n: request_body(rows, n) for n in config.instances}
        scripts = {}
        for n, body in bodies.items():
            body_path = Path(tmp) / f"body-{n}.json"
            body_path.write_bytes(body)
            scripts[n] = write_lua(body_path)
        # Worker count outermost, so targets compared with each other run close together in time.
        for workers in config.workers:
            for target in server_targets:
                assert wrk is not None
                spec = server_spec(target, workers, free_port(), registry, version_dir, config.vigil_root,
                                   config.vigil_settings)
                try:
                    out.cells += bench_server(spec, config, wrk, scripts, bodies)
                except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                    print(f"{target} ({workers}w) FAILED: {exc}", flush=True)
                    out.failures.append({"target": target, "workers": workers, "error": str(exc)})
        if config.overhead_rounds and all(t in config.targets for t in OVERHEAD_PAIR):
            assert wrk is not None
            print(f"monitoring overhead, paired ({config.overhead_mode}):", flush=True)
            try:
                out.overhead = bench_overhead(config, wrk, scripts, bodies, registry, version_dir)
            except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                print(f"paired overhead FAILED: {exc}", flush=True)
                out.failures.append({"target": "overhead", "workers": 0, "error": str(exc)})
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; 0 when every measured target passes and every server ran, else 1."""
    config = parse_args(argv)
    wrk = shutil.which("wrk")
    if any(t in SERVER_TARGETS for t in config.targets) and wrk is None:
        raise SystemExit("wrk is not installed (apt-get install wrk)")
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    with vigil_checkout(config) as (vigil_root, vigil):
        config = replace(config, vigil_root=vigil_root)
        meta = run_metadata(config, wrk, vigil)
        measured = measure(config, wrk)
    grid = Grid(measured.cells, measured.inprocess)
    checks = evaluate(grid, measured.overhead)
    markdown = render_markdown(meta, grid, measured, checks, config.connections)
    results = {
        **meta,
        "http": [asdict(c) for c in measured.cells],
        "inprocess": [asdict(r) for r in measured.inprocess],
        "failures": measured.failures,
        "overhead": [asdict(c) for c in measured.overhead],
        "checks": [{**asdict(c), "status": c.status} for c in checks],
    }
    _atomic_write(config.results_dir / "latest.json", json.dumps(results, indent=2) + "\n")
    _atomic_write(config.results_dir / "latest.md", markdown)
    print("\n" + markdown)
    for check in checks:
        print(f"{check.status:<4}  {check.name}: {'-' if check.value is None else f'{check.value:.3f}'} "
              f"({'>=' if check.higher_is_better else '<='} {check.threshold:g}; {check.detail})"
              + ("  [measured while other processes were busy]" if check.disturbed else ""))
    print(f"\nwrote {config.results_dir / 'latest.json'} and {config.results_dir / 'latest.md'}")
    return 0 if not measured.failures and all(c.status != "FAIL" for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
