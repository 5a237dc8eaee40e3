"""Vigil's Open Inference Protocol against MLServer 1.7 serving the same ONNX file, same client, same workers.

The examples are trained and registered into a temp dir (``run.py``'s
helpers); MLServer serves the registered ``cancer`` ``model.onnx`` through the
minimal runtime in ``benchmarks/mlserver/`` (``onnx_runtime.OnnxRuntime``, its
settings copied from the templates there). Each server runs alone on a free
127.0.0.1 port and is loaded by ``wrk`` in its own process with the very same
OIP JSON body, one ``[N, 30]`` FP32 tensor of 1 and of 64 rows, posted to
``/v2/models/cancer/infer``. Before any load, both servers must answer that
body with the predictions onnxruntime gives in this process.

At each worker count W, Vigil runs ``--workers W`` and MLServer
``parallel_workers: W`` (one HTTP process handing requests to W inference
processes, its default layout). At W = 1 MLServer also runs with
``parallel_workers: 0`` (inference in the HTTP process, no queue between).
Issue 22's target, Vigil at least 2x MLServer's requests per second, is
judged against each layout; the exit status is that of the default layout.

MLServer lives in its own venv (``benchmarks/README.md`` says how to make it);
this script runs in Vigil's::

    .venv/bin/python benchmarks/oip_vs_mlserver.py                     # workers 1 and 2
    .venv/bin/python benchmarks/oip_vs_mlserver.py --seconds 3 --warmup 1 --workers 1   # smoke run

The table goes to ``benchmarks/results/oip_vs_mlserver.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pandas as pd
import run as bench  # benchmarks/run.py: servers, wrk and the example registry, shared with the main benchmark
from baselines.bench_model import session_options

MLSERVER_DIR = bench.BENCH_DIR / "mlserver"
DEFAULT_VENV = bench.ROOT.parent / "mlserver-venv"
INFER = f"/v2/models/{bench.MODEL}/infer"
TARGET_RATIO = 2.0
"""Issue 22: Vigil's OIP requests per second over MLServer's, same model, client and worker count."""


@dataclass(frozen=True)
class Options:
    """What to run."""

    workers: tuple[int, ...]
    rows: tuple[int, ...]
    connections: int
    seconds: int
    warmup: int
    wrk_threads: int
    mlserver_venv: Path
    registry: Path | None
    out: Path
    ready_timeout: float


@dataclass(frozen=True)
class Result:
    """One server at one request size."""

    server: str
    workers: int
    rows: int
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    server_cores: float
    other_cores: float

    @property
    def rows_per_s(self) -> float:
        """Rows predicted per second."""
        return self.requests_per_s * self.rows


def parse_args(argv: Sequence[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=bench._int_list, default=(1, 2), help="worker counts (default 1,2)")
    parser.add_argument("--rows", type=bench._int_list, default=(1, 64), help="rows per request (default 1,64)")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections (default 16)")
    parser.add_argument("--seconds", type=int, default=10, help="whole seconds measured per cell (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="whole seconds of discarded load first (default 2)")
    parser.add_argument("--wrk-threads", type=int, default=1, help="wrk threads (default 1)")
    parser.add_argument("--mlserver-venv", type=Path, default=Path(os.environ.get("MLSERVER_VENV", DEFAULT_VENV)),
                        help=f"the venv MLServer 1.7 is installed in (default $MLSERVER_VENV or {DEFAULT_VENV})")
    parser.add_argument("--registry", type=Path,
                        help="registry holding 'cancer' (default: train and register the examples into a temp dir)")
    parser.add_argument("--out", type=Path, default=bench.RESULTS_DIR / "oip_vs_mlserver.md",
                        help="where the markdown table goes")
    parser.add_argument("--ready-timeout", type=float, default=90.0, help="seconds to wait for a server to be ready")
    args = parser.parse_args(argv)
    return Options(workers=args.workers, rows=args.rows, connections=args.connections, seconds=max(1, args.seconds),
                   warmup=max(0, args.warmup), wrk_threads=args.wrk_threads,
                   mlserver_venv=args.mlserver_venv.resolve(), registry=args.registry, out=args.out,
                   ready_timeout=args.ready_timeout)


# --------------------------------------------------------------------------- the request and its answer


def feature_matrix(version_dir: Path, rows: int) -> np.ndarray:
    """``rows`` reference rows of the model, features in card order, cycling when more are asked for than exist."""
    frame = pd.read_parquet(version_dir / "reference.parquet")
    frame = frame.drop(columns=[c for c in bench.NON_FEATURE_COLUMNS if c in frame.columns])
    matrix = frame.to_numpy(np.float64)
    return matrix[np.arange(rows) % len(matrix)]


def infer_body(x: np.ndarray) -> bytes:
    """The OIP request both servers get: one FP32 ``[N, F]`` tensor named ``input``, data as JSON numbers."""
    tensor = {"name": "input", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}
    return json.dumps({"inputs": [tensor]}).encode()


def expected_outputs(model: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    """onnxruntime's answer in this process, with the session options both servers use."""
    session = ort.InferenceSession(str(model), session_options(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {session.get_inputs()[0].name: x.astype(np.float32)})))


def check_answer(url: str, body: bytes, expected: dict[str, np.ndarray]) -> None:
    """One request before the load: the server must answer with exactly onnxruntime's label and probabilities."""
    answer = bench.post_json(url, INFER, body)
    outputs = {o["name"]: o for o in answer.get("outputs", [])}
    for name, want in expected.items():
        if name not in outputs:
            raise RuntimeError(f"{url} answered no output {name!r}: {str(answer)[:300]}")
        got = np.asarray(outputs[name]["data"], dtype=want.dtype).reshape(-1)
        if not np.array_equal(got, want.reshape(-1)):
            raise RuntimeError(f"{url}: output {name!r} differs from onnxruntime's: {got[:6]} vs {want.reshape(-1)[:6]}")


# --------------------------------------------------------------------------- servers


def mlserver_spec(venv: Path, workdir: Path, onnx: Path, parallel_workers: int) -> bench.ServerSpec:
    """MLServer from its own venv, its settings and the model's written from the templates into ``workdir``."""
    port = bench.free_port()
    settings = json.loads((MLSERVER_DIR / "settings.json").read_text())
    settings.update(host=bench.HOST, http_port=port, grpc_port=bench.free_port(), metrics_port=bench.free_port(),
                    parallel_workers=parallel_workers, metrics_dir=str(workdir / ".metrics"))
    (workdir / "settings.json").write_text(json.dumps(settings, indent=2))
    model_dir = workdir / bench.MODEL
    model_dir.mkdir()
    shutil.copyfile(MLSERVER_DIR / "model-settings.json", model_dir / "model-settings.json")
    shutil.copyfile(onnx, model_dir / "model.onnx")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIGIL_", "BENTOML_", "MLSERVER_", "PYTHON"))}
    env["PYTHONPATH"] = str(MLSERVER_DIR)  # onnx_runtime.OnnxRuntime, named by model-settings.json
    name = "mlserver" if parallel_workers else "mlserver-inline"
    return bench.ServerSpec(name, parallel_workers or 1, port, [str(venv / "bin" / "mlserver"), "start", str(workdir)],
                            env, workdir, ready_path=f"/v2/models/{bench.MODEL}/ready")


def vigil_spec(workers: int, registry: Path, version_dir: Path) -> bench.ServerSpec:
    """``vigil serve`` with monitoring on, as ``run.py`` starts it."""
    return bench.server_spec("vigil", workers, bench.free_port(), registry, version_dir, bench.ROOT)


def each_server(options: Options, workers: int, registry: Path, version_dir: Path) -> Iterator[bench.ServerSpec]:
    """The servers to compare at ``workers``: Vigil, then MLServer in each layout (see the module docstring)."""
    yield vigil_spec(workers, registry, version_dir)
    for parallel_workers in ([workers, 0] if workers == 1 else [workers]):
        with tempfile.TemporaryDirectory(prefix="vigil-bench-mlserver-") as tmp:
            yield mlserver_spec(options.mlserver_venv, Path(tmp), version_dir / "model.onnx", parallel_workers)


def measure(spec: bench.ServerSpec, options: Options, wrk: str, scripts: dict[int, Path], bodies: dict[int, bytes],
            expected: dict[int, dict[str, np.ndarray]], workers: int) -> list[Result]:
    """Start one server, check its answers, load it at every request size, stop it."""
    results = []
    with bench.running_server(spec, options.ready_timeout) as (url, process):
        for rows in options.rows:
            check_answer(url, bodies[rows], expected[rows])
        for rows in options.rows:
            if options.warmup:
                bench.finish_wrk(bench.start_wrk(wrk, url, scripts[rows], options.connections, options.warmup,
                                                 options.wrk_threads, INFER), options.warmup)
            with bench.cpu_use(process) as cpu:
                run = bench.finish_wrk(bench.start_wrk(wrk, url, scripts[rows], options.connections, options.seconds,
                                                       options.wrk_threads, INFER), options.seconds)
            result = Result(spec.target, workers, rows, run.requests_per_s, run.p50_ms, run.p99_ms,
                            run.non_2xx + run.socket_errors, cpu.server_cores, cpu.other_cores)
            print(f"  {spec.target:<15} {workers}w {rows:>3} rows  {result.requests_per_s:>8,.0f} req/s  "
                  f"{result.rows_per_s:>9,.0f} rows/s  p50 {result.p50_ms:6.2f} ms  p99 {result.p99_ms:6.2f} ms  "
                  f"server {result.server_cores:.2f} cores{'  ERRORS %d' % result.errors if result.errors else ''}"
                  f"{bench._disturbance(result.other_cores)}", flush=True)
            results.append(result)
    return results


# --------------------------------------------------------------------------- report


def mlserver_versions(venv: Path) -> str:
    """MLServer's and its onnxruntime's versions, as its venv reports them."""
    code = "import importlib.metadata as m; print(m.version('mlserver'), m.version('onnxruntime'), m.version('uvloop'))"
    out = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True, check=True)
    mlserver, onnxruntime, uvloop = out.stdout.split()
    return f"MLServer {mlserver} (onnxruntime {onnxruntime}, uvloop {uvloop})"


def report(results: list[Result], options: Options, header: dict[str, str]) -> tuple[str, dict[str, bool]]:
    """The markdown table, and for each MLServer layout whether Vigil met :data:`TARGET_RATIO` against it everywhere.

    Each MLServer row carries Vigil's requests/s over its own, at the same workers and rows per request.
    """
    lines = [f"# Vigil's OIP against MLServer ({header['when']})", ""]
    lines += [f"- {key}: {value}" for key, value in header.items() if key != "when"]
    lines += ["", "| workers | rows/request | server | requests/s | rows/s | p50 ms | p99 ms | server cores | "
                  "errors | vigil / this |", "|---|---|---|---|---|---|---|---|---|---|"]
    met: dict[str, bool] = {}
    for workers in options.workers:
        for rows in options.rows:
            cells = [r for r in results if r.workers == workers and r.rows == rows]
            ours = next((r for r in cells if r.server == "vigil"), None)
            for result in cells:
                ratio = ""
                if ours is not None and result is not ours:
                    value = ours.requests_per_s / max(result.requests_per_s, 1e-9)
                    met[result.server] = met.get(result.server, True) and value >= TARGET_RATIO and ours.errors == 0
                    ratio = f"{value:.2f}x"
                flag = " (noisy)" if result.other_cores > bench.MAX_OTHER_CORES else ""
                lines.append(f"| {workers} | {rows} | {result.server}{flag} | {result.requests_per_s:,.0f} | "
                             f"{result.rows_per_s:,.0f} | {result.p50_ms:.2f} | {result.p99_ms:.2f} | "
                             f"{result.server_cores:.2f} | {result.errors} | {ratio} |")
    lines += ["", "`mlserver` is MLServer's default layout: one HTTP process handing requests to `parallel_workers` "
                  "inference processes. `mlserver-inline` (`parallel_workers: 0`, measured at one worker) runs the "
                  "model in its HTTP process. A row marked noisy had other processes using more than "
                  f"{bench.MAX_OTHER_CORES} cores meanwhile.", ""]
    lines += [f"Target (issue 22), Vigil at least {TARGET_RATIO:g}x the requests/s of `{server}` in every row: "
              f"{'PASS' if ok else 'FAIL'}." for server, ok in met.items()]
    return "\n".join(lines) + "\n", met


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("wrk is not installed (apt-get install wrk)")
    if not (options.mlserver_venv / "bin" / "mlserver").is_file():
        raise SystemExit(f"no MLServer in {options.mlserver_venv}; benchmarks/README.md says how to make its venv")
    header: dict[str, str] = {
        "when": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "Vigil": f"{bench.describe_checkout(bench.ROOT)} (onnxruntime {ort.__version__})",
        "MLServer": mlserver_versions(options.mlserver_venv),
        "machine": f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at the start",
        "load": f"wrk, {options.connections} connections, {options.wrk_threads} thread(s), {options.seconds} s "
                f"per cell after {options.warmup} s of warm-up; the same OIP JSON body for both ({bench.MODEL}, "
                f"one FP32 [N, 30] tensor)",
    }
    results: list[Result] = []
    with bench.model_registry(options.registry, bench.ROOT) as registry, \
            tempfile.TemporaryDirectory(prefix="vigil-bench-oip-") as tmp:
        version_dir = bench.model_dir(registry)
        matrices = {rows: feature_matrix(version_dir, rows) for rows in options.rows}
        bodies = {rows: infer_body(x) for rows, x in matrices.items()}
        expected = {rows: expected_outputs(version_dir / "model.onnx", x) for rows, x in matrices.items()}
        scripts = {}
        for rows, body in bodies.items():
            path = Path(tmp) / f"infer-{rows}.json"
            path.write_bytes(body)
            scripts[rows] = bench.write_lua(path)
        for workers in options.workers:
            for spec in each_server(options, workers, registry, version_dir):
                results += measure(spec, options, wrk, scripts, bodies, expected, workers)
    text, met = report(results, options, header)
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(text)
    print(f"\n{text}\nwritten to {options.out}")
    return 0 if met.get("mlserver", False) else 1


if __name__ == "__main__":
    sys.exit(main())
