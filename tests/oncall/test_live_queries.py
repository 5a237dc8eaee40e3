"""Every dashboard query and alert rule, evaluated by a real Prometheus that scraped a real service under faults.

One service (2 workers) serves the example models plus fault-injection models
and a failing canary; Prometheus runs with the repository's own prometheus.yml
(targets and intervals swapped for the test's) and so loads monitoring/alerts.yml
exactly as the compose Prometheus does. A scripted mix of traffic then produces
every signal the kit shows: normal predictions, 4xx and 5xx, out-of-range and
missing inputs, NaN outputs answered by the fallback with the breaker opening,
a model timeout, a canary rolled back on its error rate, a refused deploy.yaml
edit and a drift run.

Dashboard queries are run as Grafana would with every variable at "All"
(``(a|b|c)``, each value regex-escaped, values read from Prometheus like Grafana's ``label_values``),
``$__rate_interval`` = 1m and ``$__range`` = 1h; a repeated panel is run once per value of its
variable. Panel and variable queries are instant queries at "now"; annotations
are range queries over the test's lifetime, because an annotation marks an
event at the time it happened. Each must succeed and return at least one
series.

A second service and Prometheus (:class:`TestHealthyRun`) get a healthy run: steady traffic on
/predict and /v2, feedback, and a drift and a quality run that find nothing wrong. There every panel
and variable query must return a series with a finite value (0 counts: a panel shows 0, not "No
data", when nothing happened), no annotation may mark an event and no alert may be active, so the
series that start at 0 raise nothing.

Alert rules are checked three ways: every rule of alerts.yml is loaded and
healthy in /api/v1/rules after many evaluations over the real series (a
many-to-many join or a bad label would show there as an error); every rule
expression runs without error through /api/v1/query; and every fault the
scenario produces makes its alert active (pending or firing), which shows the
expression returns data when it should. Stripping thresholds textually was
rejected: several rules are not "signal > threshold" (``unless``, ``or``).
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest
import yaml

from service.registry.register import register_model
from tests.oncall import kit
from tests.onnx_graphs import modified_regressor, slow_regressor, small_reference, sqrt_regressor
from tests.servers import (
    DEADLINE,
    VIGIL,
    PrometheusServer,
    Running,
    VigilServer,
    _parse_time,
    _stop,
    _wait_http,
    clean_env,
    free_port,
    looping,
    metric_value,
    vigil_server,
    wait_for,
)

# The first test also runs the module's scenario (about 70 s here).
pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

META = ("target", "prediction", "prediction_score")
CANARY_RULES = {"min_requests": 20, "error_rate_increase": 0.02, "p95_latency_ratio": 5.0, "latency_floor_ms": 50,
                "fallback_rate_increase": 0.05, "prediction_shift": 5.0}
"""Roll back on errors only (the failing canary's), after few requests per worker."""
NAN_BREAKER = {"window": 10, "min_calls": 5, "error_rate": 0.2, "cooldown_seconds": 600, "probes": 2}
"""Opens after five bad calls and stays open for the whole test."""
SLOW_BUDGET_MS = 2000
"""The slow model (seconds for x0 = 5) is cut here: above the 0.5 s p99 alert threshold and the request timeout."""
REQUEST_TIMEOUT_SECONDS = 1.0
"""The service answers 504 after this; every other request of the scenario takes milliseconds."""


# ----------------------------------------------------------------------------- the stack


@pytest.fixture(scope="module")
def registry(example_registry: Path, trained_examples: dict[str, Path],
             tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The examples, a failing diabetes:2 canary, and one model per fault the dashboards must show."""
    work = tmp_path_factory.mktemp("oncall-registry")
    root = work / "models"
    shutil.copytree(example_registry, root)
    # diabetes:2 fails (a Gather out of bounds) whenever sex > 2, which the reference never has.
    failing = modified_regressor(trained_examples["diabetes"] / "model.onnx", work / "v2.onnx", fail_feature=1)
    register_model("diabetes", failing, trained_examples["diabetes"] / "reference.parquet", target="target",
                   registry=root, version="2")
    # cancer_gaps: the cancer model with 'mean texture' nullable, so missing values are accepted and counted.
    reference = pd.read_parquet(trained_examples["cancer"] / "reference.parquet")
    reference.loc[reference.index[::7], "mean texture"] = np.nan
    reference.to_parquet(work / "gaps.parquet", index=False)
    register_model("cancer_gaps", trained_examples["cancer"] / "model.onnx", work / "gaps.parquet",
                   target="target", registry=root)
    # nan: sqrt(x0) + x1 is NaN for negative x0; slow: spins for large x0.
    register_model("nan", sqrt_regressor(work / "nan.onnx"), small_reference(work / "nan.parquet", target_of="sqrt"),
                   target="target", registry=root)
    register_model("slow", slow_regressor(work / "slow.onnx"), small_reference(work / "slow.parquet",
                                                                              x0=(0.0, 0.001)),
                   target="target", registry=root)
    # broken: registered, then its card made unreadable, so it cannot load and every request gets 503.
    shutil.copytree(root / "diabetes" / "1", root / "broken" / "1")
    (root / "broken" / "1" / "card.yaml").write_text("name: [not a card\n")
    return root


@pytest.fixture(scope="module")
def deploy_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """deploy.yaml: diabetes:2 as a 50% canary, fast breaker for 'nan', a short budget for 'slow'."""
    path = tmp_path_factory.mktemp("oncall-deploy") / "deploy.yaml"
    path.write_text(yaml.safe_dump({"models": {
        "diabetes": {"stable": "1", "canary": {"version": "2", "traffic": 0.5, "sticky": False,
                                               "rollback_when": CANARY_RULES}},
        "nan": {"breaker": NAN_BREAKER},
        "slow": {"timeout_ms": SLOW_BUDGET_MS},
    }}))
    return path


@dataclass
class Stack:
    """The running service and Prometheus, and what the scenario did to them."""

    server: VigilServer
    prom: PrometheusServer
    registry: Path
    data_dir: Path
    deploy: Path
    started: float
    drift_run: subprocess.CompletedProcess[str] | None = None
    sent: dict[str, int] = field(default_factory=dict)


def prometheus_config(vigil_target: str, prometheus_target: str) -> dict[str, Any]:
    """The repository's prometheus.yml with the test's targets, 1 s intervals and absolute rule paths."""
    config = yaml.safe_load(kit.PROMETHEUS_CONFIG.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"vigil", "prometheus"}, jobs
    jobs["vigil"]["static_configs"] = [{"targets": [vigil_target]}]
    jobs["prometheus"]["static_configs"] = [{"targets": [prometheus_target]}]
    config["global"] = {**config.get("global", {}), "scrape_interval": "1s", "evaluation_interval": "1s"}
    # Relative rule paths resolve against the config file's directory, which here is a temp dir.
    config["rule_files"] = [str(kit.PROMETHEUS_CONFIG.parent / path) for path in config["rule_files"]]
    return config


@contextmanager
def prometheus_from_repo_config(vigil_target: str) -> Iterator[PrometheusServer]:
    """Debian's prometheus running :func:`prometheus_config`; stopped on exit."""
    binary = shutil.which("prometheus")
    if binary is None:
        raise RuntimeError("prometheus is not installed (make test installs it with apt-get)")
    home = Path(tempfile.mkdtemp(prefix="vigil-oncall-prom-"))
    port = free_port()
    config_path = home / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(prometheus_config(vigil_target, f"127.0.0.1:{port}")))
    log = home / "prometheus.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [binary, f"--config.file={config_path}", f"--storage.tsdb.path={home / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            cwd=home, env=clean_env(), stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_http(f"http://127.0.0.1:{port}/-/ready", proc, log, 30.0)
        yield PrometheusServer(port)
    finally:
        _stop(proc)
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="module")
def stack(registry: Path, deploy_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Service (2 workers) and Prometheus, then the scripted traffic; yields once everything is scraped."""
    data_dir = tmp_path_factory.mktemp("oncall-data")
    env = {"VIGIL_DEPLOY": str(deploy_file), "VIGIL_DATA_DIR": str(data_dir),
           "VIGIL_CONTROL_INTERVAL_SECONDS": "0.2", "VIGIL_PREDLOG_FLUSH_SECONDS": "0.2",
           "VIGIL_MAX_CONCURRENCY": "1", "VIGIL_REQUEST_TIMEOUT_SECONDS": str(REQUEST_TIMEOUT_SECONDS)}
    with vigil_server(registry, workers=2, env=env, timeout=120) as server:
        with prometheus_from_repo_config(f"127.0.0.1:{server.port}") as prom:
            stack = Stack(server, prom, registry, data_dir, deploy_file, started=time.time())
            prom.wait_for_scrape_after(time.time())
            run_scenario(stack)
            # Two more scrapes after the last change, so every rate() sees it, and every rule group
            # evaluated after them.
            prom.wait_for_scrape_after(time.time() + 2.0)
            wait_for_rule_evaluation_after(prom, time.time())
            yield stack


def wait_for_rule_evaluation_after(prom: PrometheusServer, since: float) -> None:
    """Block until every rule group Prometheus loaded has been evaluated after ``since`` (unix time)."""
    def evaluated() -> bool:
        groups = httpx.get(f"{prom.url}/api/v1/rules", timeout=10).json()["data"]["groups"]
        return bool(groups) and all(_parse_time(g["lastEvaluation"]) > since for g in groups)

    wait_for(evaluated)


# ----------------------------------------------------------------------------- the traffic


def reference(registry: Path, model: str, n: int, start: int = 0) -> tuple[list[dict[str, Any]], list[Any]]:
    """Reference rows ``start`` to ``start + n`` of a model's version 1: features (NaN as null) and targets."""
    frame = pd.read_parquet(registry / model / "1" / "reference.parquet").iloc[start:start + n]
    features = frame.drop(columns=[c for c in META if c in frame.columns])
    records = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
               for row in features.to_dict(orient="records")]
    return records, frame["target"].tolist()


def rows(registry: Path, model: str, n: int, start: int = 0) -> list[dict[str, Any]]:
    """Reference rows of a model's version 1, features only."""
    return reference(registry, model, n, start)[0]


def predict(stack: Stack, model: str, instances: list[dict[str, Any]], status: int = 200) -> dict[str, Any]:
    """POST /predict and check the status; returns the body."""
    response = stack.server.post("/predict", json={"model": model, "instances": instances})
    assert response.status_code == status, response.text
    count(stack, status)
    return response.json()


def count(stack: Stack, status: int) -> None:
    """Note one /predict answered with ``status``."""
    stack.sent[str(status)] = stack.sent.get(str(status), 0) + 1


def canary_traffic(stack: Stack) -> float:
    """The diabetes canary's live traffic share as the service reports it."""
    listed = {m["name"]: m for m in stack.server.get("/models").json()["models"]}
    return float((listed["diabetes"].get("canary") or {}).get("traffic", 0.0))


def run_scenario(stack: Stack) -> None:
    """Drive the traffic mix; each step names what it feeds on the dashboards and in the alerts."""
    registry = stack.registry
    # Healthy traffic for every model: latency, class shares, prediction heatmaps, batch sizes.
    for i in range(10):
        predict(stack, "cancer", rows(registry, "cancer", 1 + i % 4, start=i))
    predict(stack, "slow", [{"x0": 0.0005, "x1": 0.2}])
    predict(stack, "nan", [{"x0": 0.25, "x1": 0.5}, {"x0": 0.5, "x1": 0.1}])
    # Input quality: a value far outside the reference range (accepted, counted) and missing values.
    wide = rows(registry, "cancer", 2)
    for row in wide:
        row["mean radius"] = 1000.0
    predict(stack, "cancer", wide)
    gaps = rows(registry, "cancer_gaps", 3)
    gaps[0]["mean texture"] = None
    del gaps[1]["mean texture"]
    predict(stack, "cancer_gaps", gaps)
    # One 503 now ('broken' cannot load), so its series is scraped before the bulk of them at the end.
    predict(stack, "broken", rows(registry, "diabetes", 1), status=503)
    # 4xx: invalid instance, unknown model, malformed body.
    predict(stack, "cancer", [{"mean radius": "big"}], status=422)
    predict(stack, "nope", [{"a": 1}], status=404)
    bad = stack.server.post("/predict", content=b"{", headers={"content-type": "application/json"})
    assert bad.status_code == 400
    # NaN outputs: answered by the fallback (invalid_output) until the breaker opens (breaker_open).
    # vigil_fallback_total{reason} series are created by their first increment, and rate() sees only
    # increases after a series' first scrape: so a scrape after the first call of each reason.
    for i in range(12):
        predict(stack, "nan", [{"x0": -4.0, "x1": 0.5}])
        if i in (0, NAN_BREAKER["min_calls"]):
            stack.prom.wait_for_scrape_after(time.time())
    run_feedback(stack)
    run_canary(stack)
    run_drift(stack)
    run_saturation(stack)
    # A refused deploy.yaml edit (traffic 7 is not a share): the last good config keeps serving.
    stack.deploy.write_text("models:\n  diabetes:\n    stable: '1'\n    canary: {version: '2', traffic: 7}\n")
    wait_for(lambda: (metric(stack, "vigil_deploy_reload_errors_total") or 0) >= 1)
    # A prediction log that cannot be written (its partition directory replaced by a file): the rows
    # are dropped and the failed flush counted, while the request itself is answered.
    partition = stack.data_dir / "predlog" / "model=slow"
    shutil.rmtree(partition)
    partition.write_text("not a directory\n")
    predict(stack, "slow", [{"x0": 0.0005, "x1": 0.2}])
    wait_for(lambda: (metric(stack, "vigil_predlog_write_errors_total", model="slow") or 0) >= 1)
    # 5xx: 'broken' cannot load, so each request gets 503; enough for a >5% share of /predict.
    total = sum(stack.sent.values())
    for _ in range(math.ceil(total * 0.1)):
        predict(stack, "broken", rows(registry, "diabetes", 1), status=503)


def run_feedback(stack: Stack) -> None:
    """Ground truth for served predictions (classification and regression), and one unknown request id."""
    for model in ("cancer", "diabetes"):
        features, targets = reference(stack.registry, model, 8, start=20)
        request_id = predict(stack, model, features)["request_id"]
        body = {"model": model, "request_id": request_id, "actuals": targets}
        # The request reaches the prediction log within its flush interval; until then its id is unknown.
        wait_for(lambda body=body: stack.server.post("/feedback", json=body).status_code == 200)
    unknown = stack.server.post("/feedback", json={"model": "cancer", "request_id": "0" * 32, "actuals": [1]})
    assert unknown.status_code == 404, unknown.text
    # The quality job over the joined rows, as a scheduler would run it: quality, bias and verdict gauges.
    env = clean_env({"VIGIL_DATA_DIR": str(stack.data_dir), "VIGIL_REGISTRY": str(stack.registry)})
    until = datetime.now(timezone.utc) + timedelta(seconds=1)
    for model in ("cancer", "diabetes"):
        # No --version: diabetes has a 50% canary here, and the one request above may have reached it;
        # the job then judges the version that has the feedback.
        run = subprocess.run(
            [str(VIGIL), "performance", "run", "--model", model, "--last", "1h",
             "--min-rows", "8", "--until", until.isoformat()],
            env=env, capture_output=True, text=True, timeout=180)
        assert run.returncode in (0, 3), run.stdout + run.stderr
    wait_for(lambda: metric(stack, "vigil_quality_degraded", model="diabetes") is not None)


def run_canary(stack: Stack) -> None:
    """Send diabetes traffic, half of it with sex=3 (outside the reference: counted as out-of-range input,
    and the canary fails on it), until the canary monitor rolls diabetes:2 back."""
    normal = rows(stack.registry, "diabetes", 40)
    for _ in range(12):
        for i, row in enumerate(normal):
            predict(stack, "diabetes", [dict(row, sex=3.0) if i % 2 else row])
        if canary_traffic(stack) == 0:
            break
    wait_for(lambda: canary_traffic(stack) == 0)
    assert (metric(stack, "vigil_rollbacks_total", model="diabetes", version="2") or 0) >= 1


def run_drift(stack: Stack) -> None:
    """Log a window of shifted diabetes inputs, then run the drift job the way a scheduler would."""
    shifted = [{k: (v if k == "sex" else v * 1.5) for k, v in row.items()}
               for row in rows(stack.registry, "diabetes", 100)]
    ids = [predict(stack, "diabetes", shifted)["request_id"], predict(stack, "diabetes", shifted[::-1])["request_id"]]
    stack.server.wait_until_logged("diabetes", ids)
    env = clean_env({"VIGIL_DATA_DIR": str(stack.data_dir), "VIGIL_REGISTRY": str(stack.registry)})
    # --version 1: the window also holds the canary's rows, and the newest version would be picked by default.
    # --until now: by default a run leaves out the last minute, which the log may still be flushing.
    until = datetime.now(timezone.utc) + timedelta(seconds=1)
    stack.drift_run = subprocess.run(
        [str(VIGIL), "drift", "run", "--model", "diabetes", "--version", "1", "--last", "1h", "--min-rows", "50",
         "--until", until.isoformat()],
        env=env, capture_output=True, text=True, timeout=120)


def run_saturation(stack: Stack) -> None:
    """A slow model call cut at its budget (p99 latency), then 504 and 429 from the worker's own limits.

    The first slow call of a worker runs on its event loop (its typical call time was tiny) and
    returns after the model budget. Later ones run on a thread, so the request timeout answers 504
    first, and while one is in flight that worker refuses other requests with 429 (a limit of one).
    The main client's keep-alive connection keeps the slow calls on one worker; requests on new
    connections land on either worker, so they are sent until one meets the busy worker.
    """
    slow = {"model": "slow", "instances": [{"x0": 5.0, "x1": 0.1}]}  # ~5M loop steps: far past any budget
    assert predict(stack, "slow", slow["instances"])["predictions"][0]["reason"] == "timeout"
    other = {"model": "cancer", "instances": rows(stack.registry, "cancer", 1)}
    codes: list[int] = []
    for _ in range(3):  # each round keeps the worker busy for REQUEST_TIMEOUT_SECONDS
        busy = Running(lambda: stack.server.post("/predict", json=slow).status_code, name="slow-request")
        while busy.is_alive() and 429 not in codes:
            with httpx.Client(base_url=stack.server.url, timeout=30) as fresh:
                codes.append(fresh.post("/predict", json=other).status_code)
        late = [busy.result()]
        assert late == [504], late
        for code in late:
            count(stack, code)
        if 429 in codes:
            break
    assert 429 in codes and set(codes) <= {200, 429}, codes
    for code in codes:
        count(stack, code)


def metric(stack: Stack, name: str, **labels: str) -> float | None:
    """A family's value summed over matching samples, straight from the service's /metrics."""
    return metric_value(stack.server.metrics_text(), name, **labels)


# ----------------------------------------------------------------------------- dashboards


def label_selector(selector: str | None, label: str, values: dict[str, str]) -> str:
    """The series a ``label_values(selector, label)`` variable lists, with variables filled in."""
    return kit.substitute(selector, values) if selector else f'{{{label}!=""}}'


def variable_values(prom: PrometheusServer, dashboard: dict[str, Any]) -> dict[str, list[str]]:
    """Each query variable's values as Grafana would list them, resolving variables in declaration order."""
    resolved: dict[str, list[str]] = {}
    for variable in kit.variables(dashboard):
        selector, label = kit.label_values_query(kit.variable_query(variable))
        result = prom.query(f"group by ({label}) ({label_selector(selector, label, all_of(resolved))})")
        resolved[variable["name"]] = sorted({r["metric"][label] for r in result if label in r["metric"]})
        assert resolved[variable["name"]], f"variable ${variable['name']} has no values"
    return resolved


_REGEX_SPECIAL = re.compile(r"[$^*{}\[\]'+?.()|]")


def regex_escaped(value: str) -> str:
    """A value as Grafana's Prometheus datasource writes it into a regex matcher (``prometheusSpecialRegexEscape``):
    each regex metacharacter behind an escaped backslash, so ``127.0.0.1:9090`` matches only itself."""
    return _REGEX_SPECIAL.sub(lambda m: "\\\\" + m.group(0), value.replace("\\", "\\\\\\\\"))


def all_of(values: dict[str, list[str]]) -> dict[str, str]:
    """Every variable at "All": Grafana's multi-value format for Prometheus, ``(a|b|c)`` of escaped values
    (one value alone is written without the parentheses)."""
    formatted = {}
    for name, options in values.items():
        escaped = [regex_escaped(v) for v in options]
        formatted[name] = escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"
    return formatted


def expressions_to_run(query: kit.Query, values: dict[str, list[str]], repeat_over: list[str]) -> list[str]:
    """The expression with variables filled in; for a repeated panel, one per value in ``repeat_over``."""
    base = {**all_of(values), **kit.GLOBALS}
    if query.kind == "variable":
        selector, label = kit.label_values_query(query.expr)
        return [f"group by ({label}) ({label_selector(selector, label, base)})"]
    if query.repeat is None:
        return [kit.substitute(query.expr, base)]
    assert repeat_over, f"{query.id}: nothing to repeat over"
    return [kit.substitute(query.expr, {**base, query.repeat: value}) for value in repeat_over]


def loaded_values(prom: PrometheusServer, label: str, values: list[str]) -> list[str]:
    """The values of a repeat variable that have a loaded model version.

    A model that failed to load has no predictions: its copy of a repeated panel rightly says
    "No data", and the readiness panel and VigilModelNotReady are what show it.
    """
    loaded = {r["metric"].get(label) for r in prom.query(f"group by ({label}) (vigil_model_info)")}
    return [value for value in values if value in loaded]


def range_query(prom: PrometheusServer, expr: str, start: float) -> list[dict[str, Any]]:
    """A range query from ``start`` to now at a 1 s step; raises on a PromQL error."""
    body = httpx.get(f"{prom.url}/api/v1/query_range",
                     params={"query": expr, "start": start, "end": time.time(), "step": "1s"}, timeout=30).json()
    assert body.get("status") == "success", f"query_range {expr!r} failed: {body}"
    return body["data"]["result"]


def dashboard_params() -> list[Any]:
    """One test per query."""
    return [pytest.param(query, id=query.id) for query in kit.all_queries()]


@pytest.fixture(scope="module")
def dashboard_values(stack: Stack) -> dict[str, dict[str, list[str]]]:
    """Variable values per dashboard uid, read once."""
    return {d["uid"]: variable_values(stack.prom, d) for d in kit.dashboards().values()}


@pytest.mark.parametrize("query", dashboard_params())
def test_dashboard_query_returns_data(stack: Stack, dashboard_values: dict[str, dict[str, list[str]]],
                                      query: kit.Query) -> None:
    values = dashboard_values[query.dashboard]
    repeat_over = loaded_values(stack.prom, query.repeat, values[query.repeat]) if query.repeat else []
    for expr in expressions_to_run(query, values, repeat_over):
        if query.kind == "annotation":
            result = range_query(stack.prom, expr, stack.started)
        else:
            result = stack.prom.query(expr)
        assert result, f"no data for {query.id}:\n{expr}"


# ----------------------------------------------------------------------------- alerts


def rules_by_name(prom: PrometheusServer) -> dict[str, list[dict[str, Any]]]:
    """The alerting rules Prometheus loaded, by alert name."""
    groups = httpx.get(f"{prom.url}/api/v1/rules", params={"type": "alert"}, timeout=10).json()["data"]["groups"]
    loaded: dict[str, list[dict[str, Any]]] = {}
    for group in groups:
        for rule in group["rules"]:
            loaded.setdefault(rule["name"], []).append(rule)
    return loaded


def test_every_alert_rule_is_loaded_and_healthy(stack: Stack) -> None:
    loaded = rules_by_name(stack.prom)
    expected = kit.alert_rules()
    assert sorted(loaded) == sorted({r["alert"] for r in expected})
    assert sum(len(rules) for rules in loaded.values()) == len(expected)
    for name, rules in loaded.items():
        for rule in rules:
            assert rule["health"] == "ok" and not rule.get("lastError"), (name, rule)
            assert rule["lastEvaluation"] > "2000", (name, rule)  # evaluated at least once


@pytest.mark.parametrize("rule", kit.alert_rules(), ids=lambda r: f"{r['alert']}:{r['expr'][:40]}")
def test_alert_expression_evaluates(stack: Stack, rule: dict[str, Any]) -> None:
    stack.prom.query(rule["expr"])  # raises on any PromQL or evaluation error


# Each fault of the scenario and the alert it must make active, with labels it must carry.
FAULT_ALERTS = [
    pytest.param("VigilHighErrorRate", {"job": "vigil"}, id="503s-VigilHighErrorRate"),
    pytest.param("VigilHighP99Latency", {"model": "slow"}, id="timeout-VigilHighP99Latency"),
    pytest.param("VigilFallbackRateHigh", {"model": "nan", "version": "1"}, id="nan-VigilFallbackRateHigh"),
    pytest.param("VigilBreakerOpen", {"model": "nan", "version": "1"}, id="nan-VigilBreakerOpen"),
    pytest.param("VigilPredictionOutOfRange", {"model": "nan", "version": "1"}, id="nan-VigilPredictionOutOfRange"),
    # The failing canary breaches both its error-rate and its fallback-rate rule; whichever a worker's
    # monitor sees first names the rollback, so the reason label is not pinned.
    pytest.param("VigilCanaryRolledBack", {"model": "diabetes", "version": "2"},
                 id="canary-VigilCanaryRolledBack"),
    pytest.param("VigilModelNotReady", {"model": "broken"}, id="broken-VigilModelNotReady"),
    pytest.param("VigilDeployConfigRejected", {"job": "vigil"}, id="bad-deploy-VigilDeployConfigRejected"),
    pytest.param("VigilDriftJobStale", {"model": "cancer", "stale": "never_ran"}, id="no-run-VigilDriftJobStale"),
    pytest.param("VigilDriftDetected", {"model": "diabetes", "version": "1"}, id="drift-VigilDriftDetected"),
]


def active_alerts(prom: PrometheusServer) -> list[dict[str, Any]]:
    """Alerts pending or firing right now."""
    return httpx.get(f"{prom.url}/api/v1/alerts", timeout=10).json()["data"]["alerts"]


def wait_for_alert(prom: PrometheusServer, name: str, labels: dict[str, str],
                   timeout: float = DEADLINE) -> dict[str, Any]:
    """The first active alert ``name`` whose labels include ``labels``."""
    deadline = time.monotonic() + timeout
    while True:
        for alert in active_alerts(prom):
            if alert["labels"]["alertname"] == name and labels.items() <= alert["labels"].items():
                return alert
        if time.monotonic() > deadline:
            raise AssertionError(f"{name}{labels} not active; active: "
                                 f"{[(a['labels']['alertname'], a['state']) for a in active_alerts(prom)]}")
        time.sleep(0.5)


@pytest.mark.parametrize(("name", "labels"), FAULT_ALERTS)
def test_fault_makes_its_alert_active(stack: Stack, name: str, labels: dict[str, str]) -> None:
    alert = wait_for_alert(stack.prom, name, labels)
    assert alert["state"] in {"pending", "firing"}
    assert alert["annotations"]["summary"] and alert["annotations"]["description"]


def test_drift_job_finds_the_drift_the_scenario_built(stack: Stack) -> None:
    run = stack.drift_run
    assert run is not None
    logged = sorted(str(p.relative_to(stack.data_dir)) for p in (stack.data_dir / "predlog").rglob("*.parquet"))
    # Exit 3 is "drift detected": the window holds 200 rows with nine features scaled by 1.5.
    assert run.returncode == 3, f"vigil drift run exited {run.returncode}:\n{run.stdout}\n{run.stderr}\n{logged}"
    assert (stack.data_dir / "drift" / "diabetes" / "1" / "latest.json").is_file()


def test_service_down_alert_when_the_service_stops(example_registry: Path) -> None:
    """A service and Prometheus of its own: stopping the module's would break every test after it."""
    with vigil_server(example_registry) as server:
        with prometheus_from_repo_config(f"127.0.0.1:{server.port}") as prom:
            prom.wait_for_scrape_after(time.time())
            os.killpg(server.proc.pid, signal.SIGTERM)
            server.proc.wait(timeout=30)
            alert = wait_for_alert(prom, "VigilServiceDown", {"job": "vigil"})
            assert alert["labels"]["instance"] == f"127.0.0.1:{server.port}"


# ----------------------------------------------------------------------------- a healthy run

HEALTHY_MODELS = ("cancer", "diabetes")
MACHINE_BOUND_ALERTS = {"VigilHighP99Latency"}
"""Alerts on what the machine measures (latency), not on which series exist: a loaded test machine may
raise them, so the healthy run does not judge them."""


@dataclass
class HealthyRun:
    """A service with the example models and nothing wrong, its Prometheus, and the jobs' runs."""

    server: VigilServer
    prom: PrometheusServer
    registry: Path
    started: float
    runs: dict[str, subprocess.CompletedProcess[str]] = field(default_factory=dict)


def run_job(run: HealthyRun, *args: str) -> subprocess.CompletedProcess[str]:
    """One ``vigil`` job over the healthy service's data, as a scheduler would run it."""
    env = clean_env({"VIGIL_DATA_DIR": str(run.server.data_dir), "VIGIL_REGISTRY": str(run.registry)})
    return subprocess.run([str(VIGIL), *args], env=env, capture_output=True, text=True, timeout=180)


def steady_traffic(run: HealthyRun, stop: threading.Event) -> None:
    """Reference rows for each model, on /predict and /v2 in turn, a request every 0.1 s or so until ``stop``:
    a healthy service has traffic, and every rate() on the dashboards a window with some in it."""
    pool = {model: rows(run.registry, model, 100) for model in HEALTHY_MODELS}
    with httpx.Client(base_url=run.server.url, timeout=30) as client:
        for i in itertools.count():
            model = HEALTHY_MODELS[i % len(HEALTHY_MODELS)]
            instances = pool[model][i % 90:i % 90 + 1 + i % 3]
            if i % 4 < 2:
                response = client.post("/predict", json={"model": model, "instances": instances})
                assert response.status_code == 200, response.text
                assert all("reason" not in p for p in response.json()["predictions"]), response.text
            else:
                inputs = [{"name": name, "datatype": "FP64", "shape": [len(instances)],
                           "data": [row[name] for row in instances]} for name in instances[0]]
                response = client.post(f"/v2/models/{model}/infer",
                                       json={"parameters": {"content_type": "pd"}, "inputs": inputs})
                assert response.status_code == 200, response.text
                assert not any(response.json()["parameters"]["reasons"]), response.text
            if stop.wait(0.1):
                return


def run_healthy_feedback_and_jobs(run: HealthyRun) -> None:
    """Ground truth for 100 reference rows of each model, then a drift run and a quality run per model over
    the logged rows, as a scheduler would run them; both should find nothing wrong (exit 0)."""
    server, registry = run.server, run.registry
    for model in HEALTHY_MODELS:
        ids = []
        for start in range(0, 100, 10):
            features, targets = reference(registry, model, 10, start)
            response = server.post("/predict", json={"model": model, "instances": features})
            assert response.status_code == 200, response.text
            ids.append(response.json()["request_id"])
            feedback = {"model": model, "request_id": ids[-1], "actuals": targets}
            # The request reaches the prediction log within its flush interval; until then its id is unknown.
            wait_for(lambda feedback=feedback: server.post("/feedback", json=feedback).status_code == 200)
        server.wait_until_logged(model, ids)
    # The window ends now, and the jobs read it once every row served before its end is written: a job
    # refuses a window that is still being flushed into (steady traffic goes on meanwhile).
    until = datetime.now(timezone.utc).isoformat()
    server.wait_until_every_worker_flushed(HEALTHY_MODELS[0], rows(registry, HEALTHY_MODELS[0], 1)[0], workers=2)
    for model in HEALTHY_MODELS:
        window = ("--model", model, "--last", "1h", "--until", until)
        run.runs[f"drift {model}"] = run_job(run, "drift", "run", *window, "--min-rows", "50")
        run.runs[f"quality {model}"] = run_job(run, "performance", "run", *window, "--min-rows", "50")
    for model in HEALTHY_MODELS:  # the service takes each verdict within a control interval
        wait_for(lambda model=model: metric_value(server.metrics_text(), "vigil_drift_rows", model=model) is not None
                 and metric_value(server.metrics_text(), "vigil_quality_degraded", model=model) is not None,
                 what=lambda model=model: f"{model}'s verdicts never reached the service; the jobs: " + "; ".join(
                     f"{name}: exit {r.returncode} {r.stdout[-300:]} {r.stderr[-600:]}"
                     for name, r in run.runs.items()))


@pytest.fixture(scope="class")
def healthy(example_registry: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HealthyRun]:
    """The healthy run under steady traffic, scraped and with every rule evaluated after the jobs' verdicts
    arrived; the traffic goes on while the tests read, and everything stops after the class."""
    deploy = tmp_path_factory.mktemp("healthy-deploy") / "deploy.yaml"
    deploy.write_text("models: {}\n")
    env = {"VIGIL_DEPLOY": str(deploy), "VIGIL_CONTROL_INTERVAL_SECONDS": "0.2", "VIGIL_PREDLOG_FLUSH_SECONDS": "0.2"}
    with vigil_server(example_registry, workers=2, env=env, timeout=120) as server:
        with prometheus_from_repo_config(f"127.0.0.1:{server.port}") as prom:
            run = HealthyRun(server, prom, example_registry, started=time.time())
            prom.wait_for_scrape_after(time.time())
            with looping(functools.partial(steady_traffic, run), name="steady-traffic"):
                run_healthy_feedback_and_jobs(run)
                prom.wait_for_scrape_after(time.time() + 2.0)
                wait_for_rule_evaluation_after(prom, time.time())
                yield run


def finite_values(result: list[dict[str, Any]]) -> list[float]:
    """The finite values of an instant query's result vector."""
    return [v for v in (float(r["value"][1]) for r in result) if math.isfinite(v)]


class TestHealthyRun:
    """Nothing goes wrong: every panel still shows a value (0 where nothing happened), and no alert is active."""

    def test_the_jobs_find_nothing_wrong(self, healthy: HealthyRun) -> None:
        for name, run in healthy.runs.items():
            assert run.returncode == 0, f"{name} exited {run.returncode}:\n{run.stdout}\n{run.stderr}"

    def test_every_panel_and_variable_query_has_a_finite_value(self, healthy: HealthyRun) -> None:
        values = {d["uid"]: variable_values(healthy.prom, d) for d in kit.dashboards().values()}
        empty = []
        for query in kit.all_queries():
            if query.kind == "annotation":
                continue
            repeat_over = values[query.dashboard][query.repeat] if query.repeat else []
            for expr in expressions_to_run(query, values[query.dashboard], repeat_over):
                result = healthy.prom.query(expr)
                if query.kind == "panel" and not finite_values(result) or not result:
                    empty.append(f"{query.id}: {result}\n    {expr}")
        assert not empty, f"{len(empty)} queries without a finite value in a healthy run:\n" + "\n".join(empty)

    def test_no_annotation_marks_an_event(self, healthy: HealthyRun) -> None:
        for query in kit.all_queries():
            if query.kind == "annotation":
                for expr in expressions_to_run(query, dashboard_variable_values(healthy, query.dashboard), []):
                    assert range_query(healthy.prom, expr, healthy.started) == [], f"{query.id} marks an event"

    def test_no_alert_is_active(self, healthy: HealthyRun) -> None:
        active = [(a["labels"]["alertname"], a["labels"], a["state"]) for a in active_alerts(healthy.prom)
                  if a["labels"]["alertname"] not in MACHINE_BOUND_ALERTS]
        assert active == []


def dashboard_variable_values(run: HealthyRun, uid: str) -> dict[str, list[str]]:
    """The variable values of one dashboard (by uid) in the healthy run."""
    (dashboard,) = [d for d in kit.dashboards().values() if d["uid"] == uid]
    return variable_values(run.prom, dashboard)
