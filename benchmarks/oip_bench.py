"""Issue 22's Open Inference Protocol targets: ``/v2`` against ``/predict`` and in-process onnxruntime, in one run.

The examples are trained and registered into a temp dir (``run.py``'s
helpers). At each worker count one ``vigil serve`` (monitoring on, as
``run.py`` starts it) runs on a free 127.0.0.1 port and is loaded by ``wrk``
in its own process with four bodies in turn:

- ``predict-1``: ``POST /predict``, JSON, one instance (``run.py``'s body);
- ``oip-json-1`` and ``oip-json-64``: ``POST /v2/models/cancer/infer``, one
  FP32 ``[N, 30]`` tensor as JSON numbers (``oip_vs_mlserver.py``'s body);
- ``oip-binary-64``: the same 64 rows in Triton's binary tensor extension, a
  JSON header then the raw little-endian float32 bytes
  (``Inference-Header-Content-Length`` says where the header ends), outputs
  asked back as binary data.

Before any load each body is sent once: ``/predict`` must answer one
prediction, and both OIP encodings exactly the label and probabilities
onnxruntime gives in this process. Every body is then warmed up, and
``--rounds`` rounds follow; each measures the four bodies in turn (starting one
body later than the round before) and then onnxruntime in this process
(``run.py``'s ``bench_inprocess``: Vigil's session options, one intra-op and one
inter-op thread) at 1 and 64 rows. This machine's speed drifts by 10-30% over
minutes, so each round's ratios compare measurements taken under a minute
apart, and the median over the rounds is judged, at every worker count:

- (a) OIP JSON single-row requests/s over ``/predict`` single-row requests/s, at least 0.9;
- (b) OIP binary 64-row rows/s over in-process onnxruntime rows/s at 64 rows, at least 0.5.

A failed request (non-2xx answer or socket error) in a cell fails the targets
resting on it. With several workers, a cell whose load landed on one worker is
measured again (new connections, as ``run.py``'s paired rounds do), and a round
still so is left out of the median. The exit status is 0 only if every target
passed.

Usage::

    .venv/bin/python benchmarks/oip_bench.py                                     # workers 1 and 2, ~5 min
    .venv/bin/python benchmarks/oip_bench.py --seconds 2 --warmup 1 --rounds 1 --workers 1   # smoke run, ~25 s

The tables go to ``benchmarks/results/oip.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.message import Message
from pathlib import Path

import numpy as np
import onnxruntime as ort
import oip_vs_mlserver as oip  # its OIP JSON body, expected outputs and answer check
import psutil
import run as bench  # benchmarks/run.py: servers, wrk, CPU accounting and the example registry

ROWS = bench.BATCH
"""Rows of the batch requests and of the in-process baseline they are judged against (64)."""
MIN_JSON_VS_PREDICT = 0.9
"""Issue 22 (a): OIP JSON single-row requests/s within 10% of ``/predict``'s."""
MIN_BINARY_VS_INPROCESS = 0.5
"""Issue 22 (b): OIP binary 64-row rows/s at least half of in-process onnxruntime's at 64 rows."""
HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY_TYPES: dict[str, str] = {"BOOL": "?", "INT32": "<i4", "INT64": "<i8", "FP32": "<f4", "FP64": "<f8"}
"""Numpy types of the output datatypes a binary answer may carry (the extension's byte order is little-endian)."""

PREDICT_1, JSON_1, JSON_64, BINARY_64 = "predict-1", "oip-json-1", f"oip-json-{ROWS}", f"oip-binary-{ROWS}"
BODY_NAMES = (PREDICT_1, JSON_1, JSON_64, BINARY_64)
BODY_TITLES = {PREDICT_1: "/predict JSON, 1 row", JSON_1: "OIP JSON, 1 row", JSON_64: f"OIP JSON, {ROWS} rows",
               BINARY_64: f"OIP binary, {ROWS} rows"}


@dataclass(frozen=True)
class Options:
    """What to run."""

    workers: tuple[int, ...]
    rounds: int
    connections: int
    seconds: int
    warmup: int
    inprocess_seconds: float
    wrk_threads: int
    registry: Path | None
    out: Path
    ready_timeout: float
    vigil_root: Path = bench.ROOT
    """The checkout whose ``vigil serve`` is measured (another worktree, to compare a change with its base)."""


def parse_args(argv: Sequence[str] | None = None) -> Options:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=bench._int_list, default=(1, 2), help="worker counts (default 1,2)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of all four bodies per worker count (default 3)")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections (default 16)")
    parser.add_argument("--seconds", type=int, default=8, help="whole seconds measured per cell (default 8)")
    parser.add_argument("--warmup", type=int, default=2,
                        help="whole seconds of discarded load per body once the server is up, 0 for none (default 2)")
    parser.add_argument("--inprocess-seconds", type=float, default=2.0,
                        help="seconds of in-process onnxruntime per size (1 and 64 rows) per round (default 2)")
    parser.add_argument("--wrk-threads", type=int, default=1, help="wrk threads (default 1)")
    parser.add_argument("--registry", type=Path,
                        help="registry holding 'cancer' (default: train and register the examples into a temp dir)")
    parser.add_argument("--out", type=Path, default=bench.RESULTS_DIR / "oip.md", help="where the markdown goes")
    parser.add_argument("--ready-timeout", type=float, default=90.0, help="seconds to wait for the server's /readyz")
    parser.add_argument("--vigil-root", type=Path, default=bench.ROOT,
                        help="the Vigil checkout to serve (default: this one; e.g. a worktree of the base commit)")
    args = parser.parse_args(argv)
    return Options(workers=args.workers, rounds=max(1, args.rounds), connections=args.connections,
                   seconds=max(1, args.seconds), warmup=max(0, args.warmup),
                   inprocess_seconds=max(0.1, args.inprocess_seconds), wrk_threads=args.wrk_threads,
                   registry=args.registry, out=args.out, ready_timeout=args.ready_timeout,
                   vigil_root=args.vigil_root.resolve())


# --------------------------------------------------------------------------- the bodies


@dataclass(frozen=True)
class Body:
    """One kind of request the server is loaded with, and the wrk script that sends it."""

    name: str
    path: str
    rows: int
    payload: bytes
    headers: dict[str, str]
    script: Path


def binary_body(x: np.ndarray) -> tuple[bytes, int]:
    """The binary tensor extension's request for ``x``, and the length of its JSON header.

    The body is the JSON header, then ``x`` as raw little-endian float32 bytes;
    ``binary_data_output`` asks for every output back as binary data.
    """
    raw = np.ascontiguousarray(x, dtype="<f4").tobytes()
    tensor = {"name": "input", "datatype": "FP32", "shape": list(x.shape), "parameters": {"binary_data_size": len(raw)}}
    header = json.dumps({"inputs": [tensor], "parameters": {"binary_data_output": True}}).encode()
    return header + raw, len(header)


def write_lua(body_path: Path, headers: Mapping[str, str]) -> Path:
    """A wrk script that POSTs the bytes in ``body_path`` (binary-safe) with ``headers``."""
    script = body_path.with_suffix(".lua")
    lines = ['wrk.method = "POST"']
    lines += [f"wrk.headers[{json.dumps(name)}] = {json.dumps(value)}" for name, value in headers.items()]
    lines += [f'local f = assert(io.open([[{body_path}]], "rb"))', 'wrk.body = f:read("*a")', "f:close()"]
    script.write_text("\n".join(lines) + "\n")
    return script


def make_bodies(version_dir: Path, tmp: Path) -> tuple[dict[str, Body], dict[int, dict[str, np.ndarray]]]:
    """The four bodies (each written with its wrk script into ``tmp``), and onnxruntime's outputs by rows."""
    json_headers = {"Content-Type": "application/json"}
    matrices = {rows: oip.feature_matrix(version_dir, rows) for rows in (1, ROWS)}
    binary, header_length = binary_body(matrices[ROWS])
    specs: list[tuple[str, str, int, bytes, dict[str, str]]] = [
        (PREDICT_1, "/predict", 1, bench.request_body(bench.feature_rows(version_dir), 1), json_headers),
        (JSON_1, oip.INFER, 1, oip.infer_body(matrices[1]), json_headers),
        (JSON_64, oip.INFER, ROWS, oip.infer_body(matrices[ROWS]), json_headers),
        (BINARY_64, oip.INFER, ROWS, binary,
         {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(header_length)}),
    ]
    bodies = {}
    for name, path, rows, payload, headers in specs:
        body_path = tmp / f"{name}.body"
        body_path.write_bytes(payload)
        bodies[name] = Body(name, path, rows, payload, headers, write_lua(body_path, headers))
    expected = {rows: oip.expected_outputs(version_dir / "model.onnx", x) for rows, x in matrices.items()}
    return bodies, expected


# --------------------------------------------------------------------------- checking the answers


def post(url: str, body: Body) -> tuple[Message, bytes]:
    """POST ``body`` once; the answer's headers and bytes. Anything but 2xx is a RuntimeError."""
    request = urllib.request.Request(f"{url}{body.path}", data=body.payload, method="POST", headers=body.headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.headers, response.read()
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"{body.name}: {url}{body.path} answered {exc.code}: {exc.read()[:300]!r}") from None


def binary_outputs(headers: Message, content: bytes) -> dict[str, np.ndarray]:
    """The outputs of a binary answer: its JSON header split off at ``Inference-Header-Content-Length``, then each
    output's ``binary_data_size`` bytes in output order, read as its datatype and shape."""
    length = headers.get(HEADER_LENGTH)
    if length is None:
        raise RuntimeError(f"the binary answer has no {HEADER_LENGTH} header: {content[:300]!r}")
    offset = int(length)
    header = json.loads(content[:offset])
    outputs = {}
    for output in header.get("outputs", []):
        name, datatype = output["name"], output["datatype"]
        size = (output.get("parameters") or {}).get("binary_data_size")
        if size is None:
            raise RuntimeError(f"output {name!r} came back as JSON, not binary data: {str(output)[:300]}")
        if datatype not in BINARY_TYPES:
            raise RuntimeError(f"output {name!r} has datatype {datatype}, which this check does not read")
        if offset + size > len(content):
            raise RuntimeError(f"output {name!r}: {size} bytes announced, {len(content) - offset} left in the answer")
        outputs[name] = np.frombuffer(content[offset:offset + size], BINARY_TYPES[datatype]).reshape(output["shape"])
        offset += size
    if offset != len(content):
        raise RuntimeError(f"the binary answer has {len(content) - offset} bytes after its last output")
    return outputs


def check_binary_answer(url: str, body: Body, expected: dict[str, np.ndarray]) -> None:
    """One binary request before the load: its outputs must be exactly onnxruntime's label and probabilities."""
    outputs = binary_outputs(*post(url, body))
    for name, want in expected.items():
        if name not in outputs:
            raise RuntimeError(f"{body.name}: no output {name!r} in the answer (got {sorted(outputs)})")
        got = outputs[name]
        if got.shape != want.shape or not np.array_equal(got, want):
            raise RuntimeError(f"{body.name}: output {name!r} differs from onnxruntime's: shape {got.shape} vs "
                               f"{want.shape}, {got.reshape(-1)[:6]} vs {want.reshape(-1)[:6]}")


def check_answers(url: str, bodies: dict[str, Body], expected: dict[int, dict[str, np.ndarray]]) -> None:
    """Each body once, before any load: every answer must be right (see the module docstring)."""
    bench.check_answer(url, bodies[PREDICT_1].payload, 1)
    for name in (JSON_1, JSON_64):
        oip.check_answer(url, bodies[name].payload, expected[bodies[name].rows])
    check_binary_answer(url, bodies[BINARY_64], expected[ROWS])


# --------------------------------------------------------------------------- measuring


@dataclass(frozen=True)
class Cell:
    """One body measured in one round."""

    workers: int
    round: int
    body: str
    rows: int
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    non_2xx: int
    socket_errors: int
    server_cores: float
    other_cores: float
    busiest_share: float
    attempts: int

    @property
    def rows_per_s(self) -> float:
        """Rows predicted per second."""
        return self.requests_per_s * self.rows

    @property
    def errors(self) -> int:
        """Failed requests: non-2xx answers and socket errors."""
        return self.non_2xx + self.socket_errors

    @property
    def cpu_ms_per_request(self) -> float:
        """Server CPU time per request."""
        return 1000 * self.server_cores / max(self.requests_per_s, 1e-9)

    @property
    def noisy(self) -> bool:
        """Other processes took a noticeable share of the CPU meanwhile."""
        return self.other_cores > bench.MAX_OTHER_CORES

    @property
    def unbalanced(self) -> bool:
        """One of several workers did nearly all the work (see ``run.MAX_BUSIEST_SHARE``)."""
        return self.workers > 1 and self.busiest_share > bench.MAX_BUSIEST_SHARE


@dataclass
class Round:
    """Everything measured in one round at one worker count."""

    workers: int
    index: int
    cells: dict[str, Cell] = field(default_factory=dict)
    inprocess: dict[int, bench.InProcessResult] = field(default_factory=dict)


def load(wrk: str, url: str, body: Body, seconds: int, options: Options) -> bench.WrkResult:
    """Load ``url`` with ``body`` for ``seconds`` from a wrk process."""
    return bench.finish_wrk(bench.start_wrk(wrk, url, body.script, options.connections, seconds,
                                            options.wrk_threads, body.path), seconds)


def measure_cell(wrk: str, url: str, server: psutil.Process, body: Body, options: Options, workers: int,
                 round_: int) -> Cell:
    """Measure one body, again (new connections) while its load landed on one of several workers."""
    for attempt in range(1, bench.MEASURE_ATTEMPTS + 1):
        with bench.cpu_use(server) as cpu:
            run = load(wrk, url, body, options.seconds, options)
        cell = Cell(workers, round_, body.name, body.rows, run.requests_per_s, run.p50_ms, run.p99_ms, run.non_2xx,
                    run.socket_errors, cpu.server_cores, cpu.other_cores, cpu.busiest_share, attempt)
        if not cell.unbalanced:
            break
    flags = ((f"  unbalanced: one worker used {cell.busiest_share:.0%} of the CPU" if cell.unbalanced else "")
             + (f" [{cell.attempts} tries]" if cell.attempts > 1 else "") + bench._disturbance(cell.other_cores))
    print(f"  {workers}w round {round_} {body.name:<14} {cell.requests_per_s:>8,.0f} req/s {cell.rows_per_s:>9,.0f} "
          f"rows/s  p50 {cell.p50_ms:6.2f} ms  p99 {cell.p99_ms:6.2f} ms  server {cell.server_cores:.2f} cores, "
          f"{cell.cpu_ms_per_request:.2f} ms CPU/req{flags}", flush=True)
    if cell.errors:
        print(f"  !!! {body.name} FAILED {cell.errors} of its requests ({cell.non_2xx} non-2xx, "
              f"{cell.socket_errors} socket errors): the targets resting on it fail", flush=True)
    return cell


def bench_workers(workers: int, options: Options, wrk: str, registry: Path, version_dir: Path,
                  bodies: dict[str, Body], expected: dict[int, dict[str, np.ndarray]], rounds: list[Round]) -> None:
    """Start one server, check every body's answer, warm each up, then measure ``options.rounds`` rounds.

    Rounds go into ``rounds`` as they are measured, so a failure later keeps the earlier ones.
    """
    spec = bench.server_spec("vigil", workers, bench.free_port(), registry, version_dir, options.vigil_root)
    with bench.running_server(spec, options.ready_timeout) as (url, server):
        print(f"vigil ({workers}w) ready at {url}", flush=True)
        check_answers(url, bodies, expected)
        if options.warmup:
            for body in bodies.values():
                warm = load(wrk, url, body, options.warmup, options)
                if warm.non_2xx or warm.socket_errors:
                    print(f"  !!! warm-up of {body.name}: {warm.non_2xx} non-2xx, {warm.socket_errors} socket errors",
                          flush=True)
        for index in range(1, options.rounds + 1):
            round_ = Round(workers, index)
            rounds.append(round_)
            shift = (index - 1) % len(BODY_NAMES)  # each round starts one body later: no body always goes first
            for name in BODY_NAMES[shift:] + BODY_NAMES[:shift]:
                round_.cells[name] = measure_cell(wrk, url, server, bodies[name], options, workers, index)
            results = bench.bench_inprocess(version_dir, bench.feature_rows(version_dir), (1, ROWS),
                                            options.inprocess_seconds)
            round_.inprocess = {r.rows: r for r in results}


# --------------------------------------------------------------------------- judging


@dataclass(frozen=True)
class Target:
    """One of issue 22's ratios, judged per worker count on the median over rounds."""

    name: str
    threshold: float
    bodies: tuple[str, ...]
    """The HTTP cells each round's ratio rests on."""
    ratio: Callable[[Round], float | None]


def _json_vs_predict(round_: Round) -> float | None:
    ours, theirs = round_.cells.get(JSON_1), round_.cells.get(PREDICT_1)
    return None if ours is None or theirs is None else ours.requests_per_s / max(theirs.requests_per_s, 1e-9)


def _binary_vs_inprocess(round_: Round) -> float | None:
    ours, theirs = round_.cells.get(BINARY_64), round_.inprocess.get(ROWS)
    return None if ours is None or theirs is None else ours.rows_per_s / max(theirs.rows_per_s, 1e-9)


TARGETS = (
    Target("(a) OIP JSON 1-row req/s / /predict 1-row req/s", MIN_JSON_VS_PREDICT, (JSON_1, PREDICT_1),
           _json_vs_predict),
    Target(f"(b) OIP binary {ROWS}-row rows/s / in-process onnxruntime rows/s at {ROWS} rows", MIN_BINARY_VS_INPROCESS,
           (BINARY_64,), _binary_vs_inprocess),
)


def left_out(round_: Round, target: Target) -> bool:
    """Whether a cell of the round's ratio was still unbalanced after its tries (the kernel's luck, not the code)."""
    return any(round_.cells[name].unbalanced for name in target.bodies if name in round_.cells)


@dataclass(frozen=True)
class Check:
    """One target at one worker count: the median ratio over the rounds against its threshold."""

    name: str
    value: float | None
    threshold: float
    detail: str
    failed_requests: int = 0
    noisy: bool = False

    @property
    def status(self) -> str:
        """FAIL on any failed request or a ratio below the threshold, n/a when no round could be judged, else PASS."""
        if self.failed_requests:
            return "FAIL"
        if self.value is None:
            return "n/a"
        return "PASS" if self.value >= self.threshold else "FAIL"


def judge(rounds: list[Round], options: Options, failures: dict[int, str]) -> list[Check]:
    """Every target at every worker count."""
    checks = []
    for target in TARGETS:
        for workers in options.workers:
            name = f"{target.name}, {workers} worker(s)"
            mine = [r for r in rounds if r.workers == workers]
            failed = sum(r.cells[b].errors for r in mine for b in target.bodies if b in r.cells)
            judged = [(r, value) for r in mine if (value := target.ratio(r)) is not None and not left_out(r, target)]
            notes = []
            if failed:
                notes.append(f"{failed} failed requests")
            if workers in failures:
                notes.append(f"server failed: {failures[workers].splitlines()[0]}")
            skipped = sum(1 for r in mine if target.ratio(r) is not None and left_out(r, target))
            if skipped:
                notes.append(f"{skipped} round(s) left out, unbalanced after {bench.MEASURE_ATTEMPTS} tries")
            if not judged:
                checks.append(Check(name, None, target.threshold, "; ".join(notes or ["not measured"]), failed))
                continue
            values = [value for _, value in judged]
            noisy = any(r.cells[b].noisy for r, _ in judged for b in target.bodies if b in r.cells) or any(
                result.disturbed for r, _ in judged for result in r.inprocess.values())
            detail = (f"median of {len(values)} round(s): " + ", ".join(f"{v:.3f}" for v in values)
                      + "".join(f"; {note}" for note in notes))
            checks.append(Check(name, float(statistics.median(values)), target.threshold, detail, failed, noisy))
    return checks


# --------------------------------------------------------------------------- report


def _rate(cell: Cell | None, rows: bool) -> str:
    if cell is None:
        return "-"
    flags = (f" ⚠ {cell.errors} failed" if cell.errors else "") + (" †" if cell.noisy else "") + (
        " ‡" if cell.unbalanced else "") + (f" [{cell.attempts} tries]" if cell.attempts > 1 else "")
    return f"{cell.rows_per_s if rows else cell.requests_per_s:,.0f}{flags}"


def rounds_table(rounds: list[Round]) -> list[str]:
    """Markdown table: a row per (workers, round), the four bodies, onnxruntime in process, and both ratios."""
    lines = ["| workers | round | /predict 1 row req/s | OIP JSON 1 row req/s | OIP JSON 64 rows/s "
             "| OIP binary 64 rows/s | onnxruntime 1 row rows/s | onnxruntime 64 rows/s | (a) | (b) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rounds:
        inprocess = [f"{res.rows_per_s:,.0f}{' †' if res.disturbed else ''}" if (res := r.inprocess.get(n)) else "-"
                     for n in (1, ROWS)]
        ratios = []
        for target in TARGETS:
            value = target.ratio(r)
            ratios.append("-" if value is None else f"{value:.3f}{' (left out)' if left_out(r, target) else ''}")
        cells = [_rate(r.cells.get(PREDICT_1), False), _rate(r.cells.get(JSON_1), False),
                 _rate(r.cells.get(JSON_64), True), _rate(r.cells.get(BINARY_64), True)]
        lines.append("| " + " | ".join([str(r.workers), str(r.index), *cells, *inprocess, *ratios]) + " |")
    return lines


def cells_table(rounds: list[Round]) -> list[str]:
    """Markdown table of every HTTP cell: latency and server CPU besides throughput."""
    lines = ["| workers | round | request | req/s | rows/s | p50 ms | p99 ms | server cores | CPU ms/req | "
             "busiest worker | failed |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rounds:
        for name in BODY_NAMES:
            cell = r.cells.get(name)
            if cell is None:
                continue
            busiest = f"{cell.busiest_share:.0%}" if cell.workers > 1 else "-"
            lines.append(f"| {r.workers} | {r.index} | {BODY_TITLES[name]} | {cell.requests_per_s:,.0f} | "
                         f"{cell.rows_per_s:,.0f} | {cell.p50_ms:.2f} | {cell.p99_ms:.2f} | {cell.server_cores:.2f} | "
                         f"{cell.cpu_ms_per_request:.3f} | {busiest} | {cell.errors} |")
    return lines


def checks_table(checks: list[Check]) -> list[str]:
    """Markdown table of the issue's targets."""
    lines = ["| target | measured (median) | required | result | detail |", "|---|---|---|---|---|"]
    for check in checks:
        measured = "-" if check.value is None else f"{check.value:.3f}"
        lines.append(f"| {check.name} | {measured} | >= {check.threshold:g} | **{check.status}**"
                     f"{' †' if check.noisy else ''} | {check.detail} |")
    return lines


def report(rounds: list[Round], checks: list[Check], failures: dict[int, str], header: dict[str, str]) -> str:
    """The whole report as markdown."""
    lines = [f"# Vigil's Open Inference Protocol, issue 22's targets ({header['when']})", ""]
    lines += [f"- {key}: {value}" for key, value in header.items() if key != "when"]
    lines += ["", "**Per round** ((a) OIP JSON 1 row / /predict 1 row, req/s; (b) OIP binary 64 rows / onnxruntime "
                  "in process at 64 rows, rows/s)", ""]
    lines += rounds_table(rounds)
    lines += ["", "**Every HTTP cell**", ""] + cells_table(rounds)
    for workers, error in failures.items():
        lines += ["", f"**vigil ({workers} workers) failed:** {error.splitlines()[0]}"]
    lines += ["", "**Issue 22's targets**", ""] + checks_table(checks)
    cells = [cell for r in rounds for cell in r.cells.values()]
    if any(cell.noisy for cell in cells) or any(res.disturbed for r in rounds for res in r.inprocess.values()):
        lines += ["", f"† other processes used more than {bench.MAX_OTHER_CORES:g} cores meanwhile: noisy."]
    if any(cell.workers > 1 for cell in cells):
        lines += ["", f"‡ one worker used more than {bench.MAX_BUSIEST_SHARE:.0%} of the server's CPU even after "
                      f"{bench.MEASURE_ATTEMPTS} tries: the round is left out of that target's median. [k tries]: the "
                      "first k-1 measurements were so and were taken again."]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; 0 when every target passed at every worker count, else 1."""
    options = parse_args(argv)
    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("wrk is not installed (apt-get install wrk)")
    signal.signal(signal.SIGTERM, bench._raise_on_sigterm)  # unwinds through every ``finally``: the server stops
    wrk_output = subprocess.run([wrk, "--version"], capture_output=True, text=True, check=False).stdout
    wrk_version = (wrk_output.splitlines() or ["wrk"])[0].split(" Copyright")[0].strip()
    header: dict[str, str] = {
        "when": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "Vigil": f"{bench.describe_checkout(options.vigil_root)} (onnxruntime {ort.__version__})",
        "machine": f"{os.cpu_count()} cores ({bench._cpu_model()}), load average {os.getloadavg()[0]:.2f} at the start",
        "load": f"{wrk_version}, {options.connections} connections, "
                f"{options.wrk_threads} thread(s), {options.seconds} s per cell; each body warmed up "
                f"{options.warmup} s once the server was up; {options.rounds} round(s) per worker count",
        "in process": f"onnxruntime InferenceSession.run, 1 intra-op and 1 inter-op thread, "
                      f"{options.inprocess_seconds:g} s per size per round",
    }
    rounds: list[Round] = []
    failures: dict[int, str] = {}
    with bench.model_registry(options.registry, bench.ROOT) as registry, \
            tempfile.TemporaryDirectory(prefix="vigil-bench-oip22-") as tmp:
        version_dir = bench.model_dir(registry)
        bodies, expected = make_bodies(version_dir, Path(tmp))
        for workers in options.workers:
            try:
                bench_workers(workers, options, wrk, registry, version_dir, bodies, expected, rounds)
            except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                print(f"vigil ({workers}w) FAILED: {exc}", flush=True)
                failures[workers] = str(exc)
    checks = judge(rounds, options, failures)
    text = report(rounds, checks, failures, header)
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(text)
    print("\n" + text)
    for check in checks:
        print(f"{check.status:<4}  {check.name}: {'-' if check.value is None else f'{check.value:.3f}'} "
              f"(>= {check.threshold:g}; {check.detail})" + ("  [noisy]" if check.noisy else ""))
    print(f"\nwritten to {options.out}")
    return 0 if not failures and checks and all(check.status == "PASS" for check in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
