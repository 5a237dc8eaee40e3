"""Count the instructions a Vigil worker executes per ``POST /predict``, monitoring on and off.

The throughput benchmark (``run.py``) measures what the issue asks, requests per
second, but on a shared 2-core VM the same server's rate moves by 5-10% from one
round to the next, the size of the effect the monitoring target is about.
Instruction counts do not move with the machine's load: valgrind's callgrind
counts every instruction the worker process executes (uvicorn, BentoML's
middleware, Vigil, onnxruntime and the worker's background threads) while it
answers exactly ``--requests`` requests. With the CPU the bottleneck, a server's
throughput is inversely proportional to its cost per request, so
``1 - off/on`` instructions is monitoring's share of throughput at equal
instructions per cycle (its code is small and warm; it does not change IPC much,
but this is the one assumption).

Both servers (``VIGIL_METRICS_ENABLED`` true and false, one worker each) run under
callgrind at once, one per core. Valgrind runs a worker about 60 times slower,
so every clock-driven interval of the worker (the metric flush, process
sampling) is stretched by ``--slowdown``: each still happens once per as many
requests as in a real run at full load, unless a setting's maximum caps the
stretch (the table shows requests per metric flush; a real worker at full load
flushes every 2,000-4,000 single-row requests with the 1 s default, under
callgrind the 10 s maximum makes that ~1,300: the flush's share is overstated,
never hidden). So is the time under which a model call counts as fast enough for
the event loop. The prediction log and the control loop are off in both
(``SAME_IN_BOTH``): they would land in one count and not the other.

Usage::

    .venv/bin/python benchmarks/instructions.py                      # 1 and 64 instances, ~10 min
    .venv/bin/python benchmarks/instructions.py --instances 1 --requests 500

Needs valgrind (``apt-get install valgrind``).
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import (  # noqa: E402 - run.py is this directory's module, not a package
    HOST,
    RESULTS_DIR,
    ROOT,
    _atomic_write,
    _int_list,
    describe_checkout,
    feature_rows,
    free_port,
    model_dir,
    model_registry,
    request_body,
    running_server,
    server_spec,
)

WORKER_MODULE = "_bentoml_impl.worker.service"
MODES = {"on": "vigil", "off": "vigil-nometrics"}

# The worker's clock-driven intervals in a real run (their settings' defaults), stretched by --slowdown.
INTERVALS = {
    "VIGIL_METRICS_FLUSH_SECONDS": (1.0, 10.0),  # (real value: the default, the setting's maximum)
    "VIGIL_PROCESS_SAMPLE_SECONDS": (2.0, 60.0),
    "VIGIL_FEEDBACK_SETTLE_SECONDS": (0.5, 5.0),  # also the heartbeat's round (every 5 s at most)
    # Not an interval, but a duration compared with the clock: a model call fast enough for the event
    # loop must not look slow enough for a thread because valgrind slowed it down.
    "VIGIL_MODEL_INLINE_SECONDS": (0.002, 1.0),
}
# Work that both servers do alike but at moments of their own, which would land in one count and
# not the other: the prediction log's Parquet writes (a 64-row window holds one or two of them) and
# the control loop's re-reading of files. Both are left out of both counts, which makes the
# monitoring share an upper bound (the same instructions over a smaller total).
SAME_IN_BOTH = {"VIGIL_PREDLOG_ENABLED": "false", "VIGIL_CONTROL_INTERVAL_SECONDS": "60"}


@dataclass
class Count:
    """Instructions of one worker over ``requests`` requests of ``instances`` rows."""

    mode: str
    instances: int
    requests: int
    instructions: int
    seconds_per_request: float

    @property
    def per_request(self) -> float:
        return self.instructions / self.requests


def stretched_env(slowdown: float) -> dict[str, str]:
    """The interval settings, each its real value times ``slowdown`` (capped at the setting's maximum)."""
    return {name: f"{min(real * slowdown, cap):g}" for name, (real, cap) in INTERVALS.items()}


def server_env(slowdown: float) -> dict[str, str]:
    """What both servers run with under callgrind, besides ``VIGIL_METRICS_ENABLED``."""
    return {**stretched_env(slowdown), **SAME_IN_BOTH}


def worker_pid(server: psutil.Process, timeout: float = 60) -> int:
    """The pid of the (single) HTTP worker below ``server``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in server.children(recursive=True):
            try:
                if WORKER_MODULE in " ".join(child.cmdline()):
                    return child.pid
            except psutil.NoSuchProcess:
                continue
        time.sleep(0.5)
    raise RuntimeError("no BentoML worker process found under the server")


def callgrind_control(*args: str) -> None:
    subprocess.run(["callgrind_control", *args], check=True, stdout=subprocess.DEVNULL)


def dumped_instructions(out_dir: Path, pid: int, known: set[Path]) -> int:
    """Instructions in the dump ``callgrind_control -d`` just wrote for ``pid`` (one not in ``known``)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for path in sorted(out_dir.glob(f"callgrind.{pid}.out.*")):
            if path in known:
                continue
            match = re.search(r"^summary:\s*(\d+)", path.read_text(errors="replace"), re.MULTILINE)
            if match:  # written completely
                known.add(path)
                return int(match.group(1))
        time.sleep(0.2)
    raise RuntimeError(f"callgrind wrote no dump for pid {pid}")


def send(port: int, body: bytes, count: int) -> float:
    """POST ``body`` to /predict ``count`` times on one keep-alive connection; returns seconds per request."""
    conn = http.client.HTTPConnection(HOST, port, timeout=600)
    started = time.perf_counter()
    try:
        for _ in range(count):
            conn.request("POST", "/predict", body, {"Content-Type": "application/json"})
            response = conn.getresponse()
            answer = response.read()
            if response.status != 200:
                raise RuntimeError(f"/predict answered {response.status}: {answer[:300]!r}")
    finally:
        conn.close()
    return (time.perf_counter() - started) / count


def measure_mode(mode: str, registry: Path, version_dir: Path, bodies: dict[int, bytes], config: argparse.Namespace,
                 out_dir: Path, results: list[Count], errors: list[BaseException]) -> None:
    """Start one server under callgrind and count its worker's instructions for every body size."""
    try:
        port = free_port()
        spec = server_spec(MODES[mode], 1, port, registry, version_dir, ROOT)
        spec = replace(spec, env={**spec.env, **server_env(config.slowdown)},
                       argv=["valgrind", "--tool=callgrind", "--trace-children=yes", "--instr-atstart=no",
                             *(["--cache-sim=yes", "--branch-sim=yes"] if config.simulate else []),
                             f"--callgrind-out-file={out_dir}/callgrind.%p.out", *spec.argv])
        known: set[Path] = set()
        with running_server(spec, ready_timeout=900) as (_url, server):
            pid = worker_pid(server)
            callgrind_control("-i", "on", str(pid))
            for instances, body in bodies.items():
                send(port, body, config.warmup)
                callgrind_control("-z", str(pid))
                seconds = send(port, body, config.requests)
                callgrind_control("-d", str(pid))
                count = Count(mode, instances, config.requests, dumped_instructions(out_dir, pid, known), seconds)
                results.append(count)
                print(f"  {mode:3} {instances:3} instance(s): {count.per_request:,.0f} instructions per request "
                      f"({seconds * 1e3:.1f} ms per request under callgrind)", flush=True)
    except BaseException as exc:  # noqa: BLE001 - reported by the main thread
        errors.append(exc)


def render(meta: dict[str, object], counts: list[Count], slowdown: float) -> str:
    by = {(c.mode, c.instances): c for c in counts}
    lines = [f"Instructions per `POST /predict` of one Vigil worker under callgrind, {meta['vigil']}, "
             f"{meta['date']}; {meta['requests']} requests after {meta['warmup']} of warm-up, intervals "
             f"stretched {slowdown:g}x.", "",
             "| instances | monitoring on | monitoring off | monitoring's share (1 - off/on) | "
             "requests per metric flush (on) |",
             "|---|---|---|---|---|"]
    for instances in sorted({c.instances for c in counts}):
        on, off = by.get(("on", instances)), by.get(("off", instances))
        if on is None or off is None:
            continue
        real, cap = INTERVALS["VIGIL_METRICS_FLUSH_SECONDS"]
        flush_every = min(real * slowdown, cap) / on.seconds_per_request
        lines.append(f"| {instances} | {on.per_request:,.0f} | {off.per_request:,.0f} | "
                     f"{1 - off.per_request / on.per_request:.1%} | {flush_every:,.0f} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=_int_list, default=(1, 64), help="instances per request, e.g. 1,64")
    parser.add_argument("--requests", type=int, default=1000, help="requests counted per size (default 1000)")
    parser.add_argument("--warmup", type=int, default=300, help="requests sent before counting (default 300)")
    parser.add_argument("--slowdown", type=float, default=30.0,
                        help="stretch of the worker's intervals under callgrind (default 30; see the module docstring)")
    parser.add_argument("--registry", type=Path, default=None, help="an existing registry with 'cancer'")
    parser.add_argument("--simulate", action="store_true",
                        help="also simulate caches and branch prediction (slower; see the dumps' events)")
    parser.add_argument("--dumps", type=Path, default=None,
                        help="keep callgrind's dumps here (read them with callgrind_annotate)")
    parser.add_argument("--no-save", action="store_true", help="print only; do not write benchmarks/results/")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    missing = [tool for tool in ("valgrind", "callgrind_control") if shutil.which(tool) is None]
    if missing:
        raise SystemExit(f"not found: {', '.join(missing)} (apt-get install valgrind)")
    meta = {"vigil": describe_checkout(ROOT), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "requests": config.requests, "warmup": config.warmup, "slowdown": config.slowdown,
            "environment": server_env(config.slowdown)}
    with model_registry(config.registry, ROOT) as registry, \
            tempfile.TemporaryDirectory(prefix="vigil-callgrind-") as tmp:
        dumps = config.dumps.resolve() if config.dumps is not None else Path(tmp)
        dumps.mkdir(parents=True, exist_ok=True)
        version_dir = model_dir(registry)
        rows = feature_rows(version_dir)
        bodies = {n: request_body(rows, n) for n in config.instances}
        results: list[Count] = []
        errors: list[BaseException] = []
        print("starting both servers under callgrind (a minute or two) ...", flush=True)
        threads = [threading.Thread(target=measure_mode,
                                    args=(mode, registry, version_dir, bodies, config, dumps, results, errors))
                   for mode in MODES]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
    table = render(meta, results, config.slowdown)
    print("\n" + table)
    if not config.no_save:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        _atomic_write(RESULTS_DIR / "instructions.json",
                      json.dumps({"meta": meta, "counts": [asdict(c) for c in results]}, indent=2) + "\n")
        _atomic_write(RESULTS_DIR / "instructions.md", table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
