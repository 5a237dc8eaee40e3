"""The on-call kit's files checked against the real tools and specifications, without starting anything.

- prometheus.yml and monitoring/alerts.yml through promtool (config, rules, the unit tests), and the
  unit tests cover every alert both ways;
- the Grafana dashboards: valid JSON, four fixed uids, unique panel ids, the provisioned datasource,
  every variable defined, every query filtered by the instance variable, every metric defined in
  monitoring/metrics/families.py;
- docker-compose.yml against the Compose Specification's JSON schema (``compose-spec.json``,
  vendored from compose-spec/compose-spec, ``schema/compose-spec.json``), its mounts against the
  repository, and the port, health check and scrape target of the service against each other and
  the Dockerfile;
- bentofile.yaml's packages against pyproject.toml.

The same files are evaluated against a real service and Prometheus in test_live_queries.py.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml
from typer.testing import CliRunner

from tests.oncall import kit

SCHEMA = Path(__file__).with_name("compose-spec.json")
DASHBOARD_UIDS = {"vigil-serving", "vigil-model-health", "vigil-drift", "vigil-canary"}
METRIC_SUFFIXES = ("", "_total", "_bucket", "_sum", "_count")
_METRIC_RE = re.compile(r"\b(vigil_[a-z0-9_]+)\b")


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    """Run promtool from the repository root (where prometheus.yml's relative rule path starts)."""
    binary = shutil.which("promtool")
    assert binary, "promtool is installed by make test (Debian's prometheus package)"
    return subprocess.run([binary, *args], cwd=kit.ROOT, capture_output=True, text=True, timeout=120)


def compose() -> dict[str, Any]:
    """docker-compose.yml, parsed."""
    return yaml.safe_load(kit.COMPOSE.read_text())


def bind_mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(host path, container path) of a service's bind mounts (short syntax; named volumes skipped)."""
    mounts = []
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            mounts.append((source, target))
    return mounts


# ----------------------------------------------------------------------------- Prometheus


@pytest.mark.integration  # runs promtool
def test_promtool_accepts_the_config_and_finds_the_rules() -> None:
    result = promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout + result.stderr


@pytest.mark.integration  # runs promtool
def test_promtool_accepts_the_rules() -> None:
    result = promtool("check", "rules", "monitoring/alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.integration  # runs promtool
def test_promtool_unit_tests_pass() -> None:
    result = promtool("test", "rules", "monitoring/alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_unit_tested_firing_and_silent() -> None:
    cases = [case for test in yaml.safe_load(kit.ALERT_TESTS.read_text())["tests"]
             for case in test.get("alert_rule_test", [])]
    for rule in kit.alert_rules():
        name, static = rule["alert"], rule.get("labels", {})
        fired = [alert for case in cases if case["alertname"] == name for alert in case["exp_alerts"]
                 if static.items() <= alert["exp_labels"].items()]
        silent = [case for case in cases if case["alertname"] == name and not case["exp_alerts"]]
        assert fired, f"{name} {static}: no unit test where it fires"
        assert silent, f"{name}: no unit test where it stays silent"


def test_every_alert_has_a_runbook() -> None:
    oncall = (kit.ROOT / "docs" / "oncall.md").read_text()
    for rule in kit.alert_rules():
        annotations = rule["annotations"]
        assert {"summary", "description", "runbook"} <= set(annotations), rule["alert"]
        assert "Check:" in annotations["description"] and "Do:" in annotations["description"], rule["alert"]
        anchor = annotations["runbook"].split("#", 1)[1]
        assert f"### {rule['alert']}" in oncall and anchor == rule["alert"].lower(), rule["alert"]


# ----------------------------------------------------------------------------- Grafana


@pytest.mark.parametrize("path", sorted(kit.DASHBOARDS.glob("*.json")), ids=lambda p: p.name)
def test_dashboard_is_valid_json_with_a_schema_version(path: Path) -> None:
    dashboard = json.loads(path.read_text())
    assert dashboard["schemaVersion"] == 39
    assert dashboard["title"].startswith("Vigil / ")
    assert path.stem == dashboard["uid"]


def test_dashboards_are_the_four_with_fixed_unique_uids() -> None:
    uids = [d["uid"] for d in kit.dashboards().values()]
    assert sorted(uids) == sorted(DASHBOARD_UIDS)


@pytest.mark.parametrize("name", sorted(kit.dashboards()))
def test_panel_ids_and_target_refs_are_unique(name: str) -> None:
    dashboard = kit.dashboards()[name]
    ids = [panel["id"] for panel in kit.panels(dashboard)]
    assert len(ids) == len(set(ids)), ids
    for panel in kit.panels(dashboard):
        refs = [t["refId"] for t in panel.get("targets", [])]
        assert len(refs) == len(set(refs)), panel["title"]
        assert panel["type"] == "row" or refs, f"{panel['title']} has no query"


@pytest.mark.parametrize("name", sorted(kit.dashboards()))
def test_every_datasource_is_the_provisioned_one(name: str) -> None:
    uid = kit.provisioned_datasource_uid()
    dashboard = kit.dashboards()[name]
    refs = [panel.get("datasource") for panel in kit.panels(dashboard) if panel["type"] != "row"]
    refs += [t.get("datasource") for panel in kit.panels(dashboard) for t in panel.get("targets", [])]
    refs += [v.get("datasource") for v in kit.variables(dashboard)]
    refs += [a.get("datasource") for a in dashboard.get("annotations", {}).get("list", [])]
    assert refs and all(ref == {"type": "prometheus", "uid": uid} for ref in refs), refs


@pytest.mark.parametrize("name", sorted(kit.dashboards()))
def test_every_variable_used_is_defined(name: str) -> None:
    dashboard = kit.dashboards()[name]
    defined = {v["name"] for v in kit.variables(dashboard)}
    texts = [json.dumps(panel) for panel in kit.panels(dashboard) if panel["type"] != "row"]
    texts += [json.dumps(dashboard.get("annotations", {}))]
    texts += [kit.variable_query(v) for v in kit.variables(dashboard)]
    used = set().union(*(kit.used_variables(text) for text in texts))
    assert used - kit.GRAFANA_GLOBALS <= defined, f"undefined: {used - kit.GRAFANA_GLOBALS - defined}"
    for panel in kit.panels(dashboard):
        assert panel.get("repeat") in defined | {None}, panel["title"]
    # A variable that depends on another must come after it (Grafana resolves them in order).
    for i, variable in enumerate(kit.variables(dashboard)):
        earlier = {v["name"] for v in kit.variables(dashboard)[:i]}
        assert kit.used_variables(kit.variable_query(variable)) <= earlier, variable["name"]


_SELECTOR_RE = re.compile(r"\b(vigil_[a-z0-9_]+|up(?=\{))(\{[^}]*\})?")


@pytest.mark.parametrize("name", sorted(kit.dashboards()))
def test_every_query_can_be_narrowed_to_some_replicas(name: str) -> None:
    """The first variable lists the replicas, and every series a query selects is filtered by it."""
    dashboard = kit.dashboards()[name]
    instance = kit.variables(dashboard)[0]
    assert instance["name"] == "instance" and instance["multi"] and instance["includeAll"], instance
    assert kit.variable_query(instance) == 'label_values(up{job="vigil"}, instance)'
    for query in kit.queries(dashboard):
        if query.where == "variable $instance":
            continue
        selectors = list(_SELECTOR_RE.finditer(query.expr))
        assert selectors, query.id
        for selector in selectors:
            assert 'instance=~"$instance"' in (selector.group(2) or ""), f"{query.id}: {selector.group(0)}"


def metric_names() -> set[str]:
    """Every series name monitoring/metrics/families.py defines (family names with their sample suffixes)."""
    families = set(re.findall(r'"(vigil_[a-z0-9_]+)"', (kit.ROOT / "monitoring" / "metrics" / "families.py").read_text()))
    return {family + suffix for family in families for suffix in METRIC_SUFFIXES}


def test_every_metric_queried_is_defined_in_the_families() -> None:
    known = metric_names()
    exprs = [q.expr for q in kit.all_queries()] + [rule["expr"] for rule in kit.alert_rules()]
    unknown = {name for expr in exprs for name in _METRIC_RE.findall(expr)} - known
    assert not unknown, f"not defined in monitoring/metrics/families.py: {sorted(unknown)}"


def test_grafana_provisioning_points_at_the_mounted_dashboards() -> None:
    grafana = compose()["services"]["grafana"]
    mounts = dict(bind_mounts(grafana))
    provider = yaml.safe_load((kit.ROOT / "grafana/provisioning/dashboards/vigil.yml").read_text())["providers"][0]
    assert provider["type"] == "file" and provider["allowUiUpdates"] is False
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (kit.DASHBOARDS / Path(home).relative_to(provider["options"]["path"])).is_file()
    datasource = yaml.safe_load((kit.DATASOURCES / "prometheus.yml").read_text())["datasources"][0]
    url = urlparse(datasource["url"])
    assert url.hostname in compose()["services"] and url.port == container_port(compose()["services"][url.hostname])


# ----------------------------------------------------------------------------- docker compose


def test_compose_file_validates_against_the_compose_specification() -> None:
    import jsonschema

    schema = json.loads(SCHEMA.read_text())
    validator = jsonschema.validators.validator_for(schema)
    validator.check_schema(schema)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator(schema).iter_errors(compose())]
    assert errors == []


def test_compose_validation_catches_a_mistake() -> None:
    """The schema is strict enough to matter: an unknown key in a service is refused."""
    import jsonschema

    schema = json.loads(SCHEMA.read_text())
    broken = compose()
    broken["services"]["vigil"]["helthcheck"] = broken["services"]["vigil"].pop("healthcheck")
    assert list(jsonschema.validators.validator_for(schema)(schema).iter_errors(broken))


def test_every_mounted_host_path_exists() -> None:
    for name, service in compose()["services"].items():
        for source, _ in bind_mounts(service):
            assert (kit.ROOT / source).exists(), f"{name} mounts {source}, which is not in the repository"
        build = service.get("build")
        if build:
            assert (kit.ROOT / build["context"] / "Dockerfile").is_file(), name


def test_prometheus_mounts_its_rules_where_prometheus_yml_names_them() -> None:
    """prometheus.yml's rule paths are relative to it: the same relative path in the container and the repo."""
    config = yaml.safe_load(kit.PROMETHEUS_CONFIG.read_text())
    mounts = dict(bind_mounts(compose()["services"]["prometheus"]))
    config_in_container = Path(mounts["./prometheus.yml"])
    for rule_file in config["rule_files"]:
        assert (kit.ROOT / rule_file).is_file()
        assert mounts[f"./{rule_file}"] == str(config_in_container.parent / rule_file)


def container_port(service: dict[str, Any]) -> int:
    """The container side of a service's single published port."""
    (mapping,) = service["ports"]
    return int(str(mapping).split(":")[-1])


def test_service_port_health_check_and_scrape_target_agree() -> None:
    services = compose()["services"]
    vigil = services["vigil"]
    port = container_port(vigil)
    # The compose health check, the Dockerfile's and its CMD all use that port and /readyz.
    health_url = urlparse(re.search(r"https?://[^']+", " ".join(vigil["healthcheck"]["test"])).group(0))
    assert (health_url.port, health_url.path) == (port, "/readyz")
    dockerfile = (kit.ROOT / "Dockerfile").read_text()
    assert f"EXPOSE {port}" in dockerfile
    assert f"http://127.0.0.1:{port}/readyz" in dockerfile
    assert f'"--port", "{port}"' in dockerfile
    # Prometheus scrapes the service by its compose name on that port, where the service serves /metrics.
    jobs = {job["job_name"]: job for job in yaml.safe_load(kit.PROMETHEUS_CONFIG.read_text())["scrape_configs"]}
    (target,) = [t for group in jobs["vigil"]["static_configs"] for t in group["targets"]]
    host, _, target_port = target.partition(":")
    assert host == "vigil" and host in services and int(target_port) == port
    assert jobs["vigil"].get("metrics_path", "/metrics") == "/metrics"
    assert jobs["prometheus"]["static_configs"][0]["targets"] == [f"localhost:{container_port(services['prometheus'])}"]


def test_drift_job_uses_options_the_cli_has() -> None:
    from service.cli import app

    command = " ".join(compose()["services"]["drift"]["command"])
    assert "vigil drift run" in command
    usage = CliRunner().invoke(app, ["drift", "run", "--help"], terminal_width=200)
    assert usage.exit_code == 0, usage.output
    for option in re.findall(r"(--[a-z][a-z-]+)", command):
        assert option in usage.output, f"`vigil drift run` has no {option}"


# ----------------------------------------------------------------------------- bentofile


def test_bentofile_packages_are_the_project_dependencies() -> None:
    import tomllib

    project = tomllib.loads((kit.ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    bento = yaml.safe_load((kit.ROOT / "bentofile.yaml").read_text())["python"]

    def normalise(requirement: str) -> str:
        return requirement.split("#")[0].replace(" ", "").lower()

    # BentoML adds its own pinned requirement to every bento.
    expected = {normalise(r) for r in project if not normalise(r).startswith("bentoml")}
    assert {normalise(p) for p in bento["packages"]} == expected
    assert bento.get("lock_packages") is False  # locking needs the package index at build time
