"""Real servers for integration tests: ``vigil serve`` and Prometheus, each on a free 127.0.0.1 port.

Each server runs in its own process group with its own home directory and a
clean environment (:func:`clean_env`), is stopped by the context manager
whatever happens, and only ever talks to 127.0.0.1. Also here: the helpers that
wait for a state (:func:`wait_for`, :func:`wait_for_value`) and run a test's
background work on a thread whose failures reach the test (:class:`Running`).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import psutil

import httpx

ROOT = Path(__file__).resolve().parent.parent
VIGIL = Path(sys.executable).with_name("vigil")

DEADLINE = 30.0
"""How long a test waits for a state (a row in the log, a metric value) before it fails.

Generous on purpose: the states it waits for arrive within a flush interval or
two (about a second) on an idle machine, and a loaded one must not fail a test
that would pass given time. A test that passes waits only as long as it must.
"""

ISOLATED_PREFIXES = ("VIGIL_", "BENTOML_", "PROMETHEUS_MULTIPROC_DIR")
"""Variables a developer's shell may hold that change what a server or job does; :func:`clean_env` drops them."""


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a process a test starts: ``os.environ`` without any of :data:`ISOLATED_PREFIXES`,
    plus ``extra``. A ``VIGIL_ADMIN_TOKEN`` or ``BENTOML_CONFIG`` in the shell never reaches it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(ISOLATED_PREFIXES)}
    return {**env, **(extra or {})}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _stop(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=5)


def _wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before {url} answered:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer 200 within {timeout}s:\n{log.read_text()[-4000:]}")


class VigilServer:
    """A running ``vigil serve``; use :func:`vigil_server` to start one."""

    def __init__(self, port: int, home: Path, log: Path, proc: subprocess.Popen[bytes], data_dir: Path) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.home = home
        self.log = log
        self.proc = proc
        self.data_dir = data_dir
        """The server's VIGIL_DATA_DIR (its prediction log, feedback and state)."""
        self.client = httpx.Client(base_url=self.url, timeout=30.0)

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.client.post(path, **kwargs)

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.client.get(path, **kwargs)

    def metrics_text(self) -> str:
        response = self.get("/metrics")
        assert response.status_code == 200, f"/metrics answered {response.status_code}: {response.text[:200]}"
        return response.text

    def metric(self, name: str, **labels: str) -> float | None:
        """A family's value summed over the samples whose labels include ``labels``, from /metrics now."""
        return metric_value(self.metrics_text(), name, **labels)

    def wait_for_metric(self, name: str, expected: float, timeout: float = DEADLINE, **labels: str) -> None:
        """Wait until :meth:`metric` reads ``expected`` (a missing series reads 0)."""
        wait_for_value(lambda: self.metric(name, **labels) or 0.0, expected, timeout)

    def logged_ids(self, model: str) -> set[str]:
        """Request ids in the model's prediction log so far."""
        from monitoring.predlog import read_log

        frame = read_log(self.data_dir, model)
        return set(frame["request_id"]) if len(frame) else set()

    def wait_until_logged(self, model: str, request_ids: Any, timeout: float = DEADLINE) -> None:
        """Wait until every one of ``request_ids`` is in the model's prediction log (it flushes every second)."""
        wanted = set(request_ids)
        wait_for(lambda: wanted <= self.logged_ids(model), timeout,
                 what=lambda: f"{len(wanted - self.logged_ids(model))} of {len(wanted)} requests not in the log")

    def wait_until_every_worker_flushed(self, model: str, instance: dict[str, Any], workers: int) -> None:
        """Wait until each of the ``workers`` worker processes has written out every row it answered before
        this call: a request it answers afterwards is in the log, and a flush writes its whole buffer."""
        from service.core.requestid import parse_request_id

        probes: dict[str, set[str]] = {}

        def flushed() -> bool:
            # A new connection each time: the kernel spreads connections, not requests, over the workers.
            response = httpx.post(f"{self.url}/predict", json={"model": model, "instances": [instance]},
                                  timeout=DEADLINE)
            assert response.status_code == 200, response.text
            rid = response.json()["request_id"]
            probes.setdefault(parse_request_id(rid).token, set()).add(rid)
            logged = self.logged_ids(model)
            return sum(1 for ids in probes.values() if ids & logged) >= workers
        wait_for(flushed, what=lambda: f"probes of {len(probes)} workers answered, fewer than {workers} logged")

    def workers(self) -> list[psutil.Process]:
        """Live BentoML worker processes (a killed one is a zombie until reaped: skipped)."""
        found = []
        for proc in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                if proc.status() != psutil.STATUS_ZOMBIE and any("_bentoml_impl.worker" in p for p in proc.cmdline()):
                    found.append(proc)
            except psutil.Error:
                continue
        return found


@contextmanager
def vigil_server(registry: Path, workers: int = 1, env: dict[str, str] | None = None,
                 timeout: float = 90.0, restart: VigilServer | None = None) -> Iterator[VigilServer]:
    """Start ``vigil serve`` on a free port with its own BENTOML_HOME; stop it on exit.

    With ``restart`` (a server that has died), start again on its port and its home, as a
    restarted container keeps its pod's address and ``emptyDir``s; the home stays its owner's.
    """
    home = restart.home if restart is not None else Path(tempfile.mkdtemp(prefix="vigil-home-"))
    port = restart.port if restart is not None else free_port()
    log = home / "server.log"
    full_env = clean_env({
        "BENTOML_HOME": str(home / "bentoml"),
        "BENTOML_DO_NOT_TRACK": "True",
        "VIGIL_DATA_DIR": str(home / "var"),
        **(env or {}),
    })
    with open(log, "ab" if restart is not None else "wb") as fh:
        proc = subprocess.Popen(
            [str(VIGIL), "serve", "--port", str(port), "--host", "127.0.0.1",
             "--registry", str(registry), "--workers", str(workers)],
            cwd=home, env=full_env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
        )
    server = VigilServer(port, home, log, proc, Path(full_env["VIGIL_DATA_DIR"]))
    try:
        _wait_http(f"{server.url}/readyz", proc, log, timeout)
        yield server
    finally:
        server.client.close()
        _stop(proc)
        if restart is None:
            shutil.rmtree(home, ignore_errors=True)


class PrometheusServer:
    """A running Prometheus; use :func:`prometheus_server` to start one."""

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query; returns the result vector (raises on a PromQL error)."""
        body = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10).json()
        if body.get("status") != "success":
            raise AssertionError(f"query {expr!r} failed: {body}")
        return body["data"]["result"]

    def value(self, expr: str) -> float | None:
        """The single value of an instant query, or None when it returns nothing."""
        result = self.query(expr)
        if not result:
            return None
        assert len(result) == 1, f"{expr!r} returned {len(result)} series"
        return float(result[0]["value"][1])

    def wait_for_scrape_after(self, since: float, job: str = "vigil", timeout: float = 20.0) -> None:
        """Block until Prometheus has scraped the target successfully after ``since`` (unix time)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            targets = httpx.get(f"{self.url}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
            for target in targets:
                if target["labels"].get("job") != job or target["health"] != "up":
                    continue
                last = target.get("lastScrape", "")
                if last and _parse_time(last) > since:
                    return
            time.sleep(0.3)
        raise AssertionError(f"Prometheus did not scrape job {job} after {since}")


def _parse_time(stamp: str) -> float:
    from datetime import datetime

    # Prometheus reports nanoseconds; Python parses microseconds at most.
    main, _, rest = stamp.partition(".")
    frac = "".join(ch for ch in rest if ch.isdigit())[:6]
    tz = rest[len("".join(ch for ch in rest if ch.isdigit())):] or "Z"
    tz = "+00:00" if tz == "Z" else tz
    return datetime.fromisoformat(f"{main}.{frac or '0'}{tz}").timestamp()


@contextmanager
def prometheus_server(scrape_targets: dict[str, str], interval: str = "1s",
                      rule_files: list[Path] | None = None, timeout: float = 30.0) -> Iterator[PrometheusServer]:
    """Start Debian's ``prometheus`` scraping ``{job: "host:port"}`` every ``interval``."""
    import yaml

    binary = shutil.which("prometheus")
    if binary is None:
        raise RuntimeError("prometheus is not installed (make test installs it with apt-get)")
    home = Path(tempfile.mkdtemp(prefix="vigil-prom-"))
    port = free_port()
    config = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": [target]}]} for job, target in scrape_targets.items()
        ],
    }
    if rule_files:
        config["rule_files"] = [str(p) for p in rule_files]
    (home / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = home / "prometheus.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [binary, f"--config.file={home / 'prometheus.yml'}", f"--storage.tsdb.path={home / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            cwd=home, env=clean_env(), stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        _wait_http(f"http://127.0.0.1:{port}/-/ready", proc, log, timeout)
        yield PrometheusServer(port)
    finally:
        _stop(proc)
        shutil.rmtree(home, ignore_errors=True)


def metric_value(text: str, name: str, **labels: str) -> float | None:
    """The sum of the samples of ``name`` in an exposition text whose labels include ``labels``."""
    from prometheus_client.parser import text_string_to_metric_families

    total = None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total = (total or 0.0) + sample.value
    return total


def wait_for(condition: Callable[[], Any], timeout: float = DEADLINE, interval: float = 0.1,
             what: str | Callable[[], str] = "condition") -> None:
    """Poll ``condition`` until it holds; AssertionError naming ``what`` (a text, or a callable giving
    one, e.g. the state seen last) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not met within {timeout:g} s: {what() if callable(what) else what}")
        time.sleep(interval)


def wait_for_value(read: Callable[[], Any], expected: Any, timeout: float = DEADLINE, interval: float = 0.1) -> None:
    """Poll ``read()`` until it equals ``expected``; AssertionError with the last value read otherwise."""
    seen: list[Any] = [None]

    def equal() -> bool:
        seen[0] = read()
        return bool(seen[0] == expected)

    wait_for(equal, timeout, interval, what=lambda: f"expected {expected!r}, last read {seen[0]!r}")


class Running:
    """``target(*args)`` running on a thread; :meth:`result` joins it in the test's thread and re-raises
    whatever it raised there, so an ``assert`` (or an HTTP error) in the thread fails the test."""

    def __init__(self, target: Callable[..., Any], *args: Any, name: str = "test-thread") -> None:
        self.name = name
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(target, args), name=name, daemon=True)
        self._thread.start()

    def _run(self, target: Callable[..., Any], args: tuple[Any, ...]) -> None:
        try:
            self._value = target(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the test's thread by result()
            self._error = exc

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def result(self, timeout: float = DEADLINE) -> Any:
        """What ``target`` returned; re-raises its exception; AssertionError if still running after ``timeout``."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise AssertionError(f"{self.name} still running after {timeout:g} s")
        if self._error is not None:
            raise self._error
        return self._value


@contextmanager
def looping(body: Callable[[threading.Event], Any], name: str = "test-loop") -> Iterator[Running]:
    """Run ``body(stop)`` on a thread for the block; on exit set ``stop``, join, and re-raise its failure."""
    stop = threading.Event()
    running = Running(body, stop, name=name)
    try:
        yield running
    finally:
        stop.set()
        running.result()
