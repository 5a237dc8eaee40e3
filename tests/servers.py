"""Real servers for integration tests: ``vigil serve`` and Prometheus, each on a free 127.0.0.1 port.

Each server runs in its own process group with its own home directory, is
stopped by the context manager whatever happens, and only ever talks to
127.0.0.1.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import httpx

ROOT = Path(__file__).resolve().parent.parent
VIGIL = Path(sys.executable).with_name("vigil")


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

    def __init__(self, port: int, home: Path, log: Path, proc: subprocess.Popen[bytes]) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.home = home
        self.log = log
        self.proc = proc
        self.client = httpx.Client(base_url=self.url, timeout=30.0)

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.client.post(path, **kwargs)

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.client.get(path, **kwargs)

    def metrics_text(self) -> str:
        return self.get("/metrics").text


@contextmanager
def vigil_server(registry: Path, workers: int = 1, env: dict[str, str] | None = None,
                 timeout: float = 90.0) -> Iterator[VigilServer]:
    """Start ``vigil serve`` on a free port with its own BENTOML_HOME; stop it on exit."""
    home = Path(tempfile.mkdtemp(prefix="vigil-home-"))
    port = free_port()
    log = home / "server.log"
    full_env = {
        **os.environ,
        "BENTOML_HOME": str(home / "bentoml"),
        "BENTOML_DO_NOT_TRACK": "True",
        "VIGIL_DATA_DIR": str(home / "var"),
        **(env or {}),
    }
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [str(VIGIL), "serve", "--port", str(port), "--host", "127.0.0.1",
             "--registry", str(registry), "--workers", str(workers)],
            cwd=home, env=full_env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
        )
    server = VigilServer(port, home, log, proc)
    try:
        _wait_http(f"{server.url}/readyz", proc, log, timeout)
        yield server
    finally:
        server.client.close()
        _stop(proc)
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
            cwd=home, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
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


def wait_for(condition: Any, timeout: float = 10.0, interval: float = 0.1) -> None:
    """Poll ``condition`` until it holds; AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval)
    raise AssertionError("condition not met in time")
