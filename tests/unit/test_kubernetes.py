"""The Kubernetes manifests (``deploy/kubernetes``), rendered and checked without a cluster.

Both the base and the example overlay are rendered the way ``kubectl apply -k`` would
(``tests/kustomize.py``; where kubectl is installed, its own rendering is compared too), then:

- every resource validates against Kubernetes' own schemas for a fixed version, strictly, so an
  unknown or misspelt field fails (``kubernetes-validate``). The ServiceMonitor is a custom resource
  kubernetes-validate has no schema for; it is checked by hand against the fields of the Prometheus
  Operator's CRD;
- what the manifests say agrees with the code: every ``VIGIL_*`` variable is a setting of
  ``service/core/settings.py`` with a valid value, the probes are ``/livez`` and ``/readyz`` on the
  port ``vigil serve`` listens on, the deploy config is mounted where ``VIGIL_DEPLOY`` points and
  parses with the service's own parser, the CronJobs' commands parse with the real ``vigil`` CLI,
  the shutdown fits in the grace period, the selectors of the Service, HPA, PDB and ServiceMonitor
  reach the pods, and the pods meet the "restricted" Pod Security Standard.
"""

from __future__ import annotations

import base64
import copy
import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import typer
import yaml

from service.cli import app
from service.core.settings import Settings
from service.serving.deploy import parse_deploy
from tests.kustomize import KustomizeError, Resource, build, containers, pod_specs

ROOT = Path(__file__).resolve().parents[2]
KUBERNETES = ROOT / "deploy" / "kubernetes"
LAYOUTS = {"base": KUBERNETES / "base", "example": KUBERNETES / "overlays" / "example"}

KUBERNETES_VERSION = "1.30"
"""The oldest Kubernetes the manifests are written for (docs/kubernetes.md): fields added later fail."""

SHUTDOWN_MARGIN_SECONDS = 10
"""What a worker needs after its last request to write its buffered rows and metrics to the store."""

SETTINGS = {f"VIGIL_{name.upper()}" for name in Settings.model_fields}


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def rendered(request: pytest.FixtureRequest) -> list[Resource]:
    """Every resource of one layout (the base, the example overlay), as ``kubectl apply -k`` sends them."""
    return build(LAYOUTS[request.param])


def find(resources: list[Resource], kind: str, name: str | None = None) -> Resource:
    """The one resource of that kind (and name)."""
    found = [r for r in resources if r["kind"] == kind and (name is None or r["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[r['metadata']['name'] for r in found]}"
    return found[0]


def generated(resources: list[Resource], kind: str, name: str) -> Resource:
    """A generated ConfigMap or Secret by the name its generator gives, whatever its hash suffix."""
    found = [r for r in resources if r["kind"] == kind and re.fullmatch(rf"{name}(-[a-z0-9]{{10}})?",
                                                                        r["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} generated as {name}"
    return found[0]


def workloads(resources: list[Resource]) -> list[Resource]:
    return [r for r in resources if r["kind"] in ("Deployment", "CronJob")]


def the_pod(resource: Resource) -> dict[str, Any]:
    (pod,) = pod_specs(resource)
    return pod


def the_container(resource: Resource) -> dict[str, Any]:
    (container,) = the_pod(resource)["containers"]
    return container


def pod_labels(resource: Resource) -> dict[str, str]:
    spec = resource["spec"]
    template = spec["jobTemplate"]["spec"]["template"] if resource["kind"] == "CronJob" else spec["template"]
    return template["metadata"]["labels"]


def data_of(resource: Resource) -> dict[str, str]:
    data = resource.get("data") or {}
    if resource["kind"] == "Secret":
        return {key: base64.b64decode(value).decode() for key, value in data.items()}
    return dict(data)


def environment(container: dict[str, Any], resources: list[Resource]) -> dict[str, str]:
    """The variables the container starts with: its envFrom sources, then its env (which wins)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            kind, ref = "ConfigMap", source["configMapRef"]
        else:
            kind, ref = "Secret", source["secretRef"]
        env.update(data_of(find(resources, kind, ref["name"])))
    for variable in container.get("env", []):
        if "value" in variable:
            env[variable["name"]] = variable["value"]
            continue
        ref = variable["valueFrom"].get("secretKeyRef") or variable["valueFrom"]["configMapKeyRef"]
        kind = "Secret" if "secretKeyRef" in variable["valueFrom"] else "ConfigMap"
        holders = [r for r in resources if r["kind"] == kind and r["metadata"]["name"] == ref["name"]]
        if holders:
            env[variable["name"]] = data_of(holders[0])[ref["key"]]
        else:
            assert ref.get("optional"), f"{variable['name']} needs {kind} {ref['name']}, which is not rendered"
    return env


def settings_of(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The service's settings from exactly these variables (none of the test process's own)."""
    import os

    for name in [n for n in os.environ if n.startswith("VIGIL_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        if name.startswith("VIGIL_"):
            monkeypatch.setenv(name, value)
    return Settings()


def mount_for(pod: dict[str, Any], container: dict[str, Any], path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(volumeMount, volume) of the mount that holds ``path``: the deepest mount path above it."""
    mounts = [m for m in container.get("volumeMounts", [])
              if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")]
    assert mounts, f"nothing is mounted at {path}: the root filesystem is read-only"
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    return mount, volume


def parse_cli(args: list[str]) -> Any:
    """``vigil ARGS`` parsed by the real CLI, without running it (the click context): unknown options and
    bad values fail. Typer carries its own copy of click, so groups are told by their ``commands``."""
    command = typer.main.get_command(app)
    words = list(args)
    while hasattr(command, "commands"):
        name = words.pop(0)
        assert name in command.commands, f"`vigil` has no command {name}"
        command = command.commands[name]
    try:
        return command.make_context(command.name, words)
    except Exception as exc:  # noqa: BLE001 - click's usage errors, whichever copy of click raised them
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        pytest.fail(f"`vigil {' '.join(args)}` does not parse: {message}")


# ----------------------------------------------------------------------------- schemas


HAND_CHECKED = {("monitoring.coreos.com/v1", "ServiceMonitor")}
"""Custom resources kubernetes-validate has no schema for, checked by :func:`check_service_monitor`."""

_DURATION = re.compile(r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$")
"""A Prometheus duration, as the ServiceMonitor CRD's pattern says."""

SERVICE_MONITOR_SPEC = {"attachMetadata", "bodySizeLimit", "endpoints", "jobLabel", "keepDroppedTargets", "labelLimit",
                        "labelNameLengthLimit", "labelValueLengthLimit", "namespaceSelector", "podTargetLabels",
                        "sampleLimit", "scrapeClass", "scrapeProtocols", "selector", "selectorMechanism",
                        "targetLabels", "targetLimit"}
SERVICE_MONITOR_ENDPOINT = {"authorization", "basicAuth", "bearerTokenFile", "bearerTokenSecret", "enableHttp2",
                            "filterRunning", "followRedirects", "honorLabels", "honorTimestamps", "interval",
                            "metricRelabelings", "oauth2", "params", "path", "port", "proxyUrl", "relabelings",
                            "scheme", "scrapeTimeout", "targetPort", "tlsConfig", "trackTimestampsStaleness"}
"""The fields of the Prometheus Operator's ServiceMonitor CRD (monitoring.coreos.com/v1)."""


def seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+)(ms|[smhdwy])", duration))


def check_service_monitor(monitor: Resource) -> list[str]:
    """What is wrong with a ServiceMonitor, by the CRD's rules: required and known fields, their types."""
    problems = []
    if set(monitor) - {"apiVersion", "kind", "metadata", "spec"}:
        problems.append(f"unknown top-level fields {sorted(set(monitor) - {'apiVersion', 'kind', 'metadata', 'spec'})}")
    if not isinstance(monitor.get("metadata", {}).get("name"), str):
        problems.append("metadata.name is required")
    spec = monitor.get("spec")
    if not isinstance(spec, dict):
        return [*problems, "spec is required"]
    problems += [f"spec.{key} is not a ServiceMonitor field" for key in sorted(set(spec) - SERVICE_MONITOR_SPEC)]
    selector = spec.get("selector")
    if not isinstance(selector, dict) or set(selector) - {"matchLabels", "matchExpressions"}:
        problems.append("spec.selector is required: a label selector (matchLabels, matchExpressions)")
    elif not all(isinstance(v, str) for v in selector.get("matchLabels", {}).values()):
        problems.append("spec.selector.matchLabels values must be strings")
    endpoints = spec.get("endpoints")
    if not isinstance(endpoints, list) or not endpoints:
        return [*problems, "spec.endpoints is required: a list of endpoints"]
    for i, endpoint in enumerate(endpoints):
        where = f"spec.endpoints[{i}]"
        unknown = sorted(set(endpoint) - SERVICE_MONITOR_ENDPOINT)
        problems += [f"{where}.{key} is not an endpoint field" for key in unknown]
        if not isinstance(endpoint.get("port", ""), str):
            problems.append(f"{where}.port must be a port name (string)")
        for key in ("interval", "scrapeTimeout"):
            if key in endpoint and not (isinstance(endpoint[key], str) and _DURATION.match(endpoint[key])):
                problems.append(f"{where}.{key} must be a Prometheus duration, got {endpoint[key]!r}")
        if "interval" in endpoint and "scrapeTimeout" in endpoint and not problems:
            if seconds(endpoint["scrapeTimeout"]) > seconds(endpoint["interval"]):
                problems.append(f"{where}.scrapeTimeout is longer than its interval")
    return problems


def validate(resource: Resource) -> None:
    """Kubernetes' schema for the resource, strictly; the hand check for a custom resource it lacks."""
    try:
        kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        assert (resource["apiVersion"], resource["kind"]) in HAND_CHECKED, \
            f"no schema for {resource['apiVersion']} {resource['kind']}, and no hand check either"
        assert check_service_monitor(resource) == []
    except kubernetes_validate.ValidationError as exc:
        path = "/".join(map(str, exc.absolute_path))
        pytest.fail(f"{resource['kind']} {resource['metadata']['name']}: {path}: {exc.message}")


def test_every_resource_validates_strictly(rendered: list[Resource]) -> None:
    kinds = {r["kind"] for r in rendered}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "CronJob", "ServiceMonitor",
            "ConfigMap", "Secret", "ServiceAccount"} <= kinds
    for resource in rendered:
        validate(resource)


def test_strict_validation_refuses_an_unknown_field_and_a_wrong_type(rendered: list[Resource]) -> None:
    deployment = find(rendered, "Deployment", "vigil")
    misspelt = copy.deepcopy(deployment)
    container = the_container(misspelt)
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(misspelt, KUBERNETES_VERSION, strict=True)
    wrong_type = copy.deepcopy(deployment)
    the_container(wrong_type)["ports"][0]["containerPort"] = "3000"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong_type, KUBERNETES_VERSION, strict=True)


def test_service_monitor_is_hand_checked_only_because_there_is_no_schema(rendered: list[Resource]) -> None:
    monitor = find(rendered, "ServiceMonitor")
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        kubernetes_validate.validate(monitor, KUBERNETES_VERSION, strict=True)
    assert check_service_monitor(monitor) == []
    broken = copy.deepcopy(monitor)
    broken["spec"]["endpoints"][0]["intervall"] = broken["spec"]["endpoints"][0].pop("interval")
    broken["spec"]["endpoints"][0]["scrapeTimeout"] = "10 seconds"
    del broken["spec"]["selector"]
    assert len(check_service_monitor(broken)) == 3


# ----------------------------------------------------------------------------- the service


def test_every_vigil_variable_is_a_setting_with_a_valid_value(rendered: list[Resource],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    for workload in workloads(rendered):
        env = environment(the_container(workload), rendered)
        unknown = {name for name in env if name.startswith("VIGIL_")} - SETTINGS
        assert not unknown, f"{workload['metadata']['name']} sets {sorted(unknown)}, not in service/core/settings.py"
        settings_of(env, monkeypatch)  # refuses a value out of its bounds or of the wrong type


def test_the_command_is_the_images_and_parses_with_the_cli(rendered: list[Resource]) -> None:
    container = the_container(find(rendered, "Deployment", "vigil"))
    cmd = re.search(r"^CMD (\[.*\])$", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert container["command"] == json.loads(cmd.group(1))
    assert container["command"][0] == "vigil"
    context = parse_cli(container["command"][1:])
    assert context.params["host"] == "0.0.0.0"  # reachable from the Service, not just inside the pod
    (port,) = container["ports"]
    assert (port["name"], port["containerPort"]) == ("http", context.params["port"])


def test_probes_are_livez_and_readyz_on_the_served_port(rendered: list[Resource]) -> None:
    container = the_container(find(rendered, "Deployment", "vigil"))
    probes = {kind: container[kind]["httpGet"] for kind in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert probes["livenessProbe"]["path"] == "/livez"
    assert probes["readinessProbe"]["path"] == "/readyz"
    assert probes["startupProbe"]["path"] in ("/livez", "/readyz")
    assert {probe["port"] for probe in probes.values()} == {"http"}
    # The liveness probe only starts once the startup probe passed: loading models never restarts the pod.
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 60


def test_images_are_one_and_the_projects(rendered: list[Resource]) -> None:
    images = {the_container(w)["image"] for w in workloads(rendered)}
    assert len(images) == 1, f"the service and the jobs must run one image (one registry, one CLI): {images}"
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert images.pop().endswith(f"vigil:{version}")


def test_resources_are_requested_and_limited(rendered: list[Resource]) -> None:
    for workload in workloads(rendered):
        resources = the_container(workload)["resources"]
        assert set(resources) == {"requests", "limits"}
        assert {"cpu", "memory"} <= set(resources["requests"]) and {"cpu", "memory"} <= set(resources["limits"])


def test_the_grace_period_covers_the_drain(rendered: list[Resource], monkeypatch: pytest.MonkeyPatch) -> None:
    deployment = find(rendered, "Deployment", "vigil")
    container = the_container(deployment)
    settings = settings_of(environment(container, rendered), monkeypatch)
    sleep = container["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep"
    # BentoML's own timeout is Vigil's plus 1 s (service/http/bentoml_compat.py): the longest a request lasts.
    drain = float(sleep[1]) + settings.request_timeout_seconds + 1 + SHUTDOWN_MARGIN_SECONDS
    assert the_pod(deployment)["terminationGracePeriodSeconds"] >= drain


def test_deploy_config_is_mounted_where_vigil_deploy_points(rendered: list[Resource],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    deployment = find(rendered, "Deployment", "vigil")
    pod, container = the_pod(deployment), the_container(deployment)
    path = str(settings_of(environment(container, rendered), monkeypatch).deploy)
    mount, volume = mount_for(pod, container, path)
    assert mount.get("readOnly") is True
    # A subPath mount is never updated: edits of the ConfigMap would not reach the running pods.
    assert "subPath" not in mount
    config_map = find(rendered, "ConfigMap", volume["configMap"]["name"])
    assert config_map["metadata"]["name"] == "vigil-deploy"  # no hash suffix: edits reload, no restart
    key = str(Path(path).relative_to(mount["mountPath"]))
    assert key in config_map["data"]
    assert "items" not in volume["configMap"]
    config = parse_deploy(config_map["data"][key], "vigil-deploy")
    assert config.models, "the example deploy config names the example models"


def test_local_directories_are_empty_dirs_on_a_read_only_root(rendered: list[Resource],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    for workload in workloads(rendered):
        pod, container = the_pod(workload), the_container(workload)
        env = environment(container, rendered)
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        writable = [str(settings_of(env, monkeypatch).data_dir), env["HOME"], "/tmp"]
        if workload["kind"] == "Deployment":
            # BentoML's multiprocess metric files live in $BENTOML_HOME/prometheus_multiproc_dir.
            writable.append(env["BENTOML_HOME"] + "/prometheus_multiproc_dir")
        for path in writable:
            mount, volume = mount_for(pod, container, path)
            assert "emptyDir" in volume and not mount.get("readOnly"), f"{path} must be a writable emptyDir"


def test_the_store_is_shared_and_its_credentials_are_secret(rendered: list[Resource]) -> None:
    sources = []
    for workload in workloads(rendered):
        container = the_container(workload)
        env = environment(container, rendered)
        assert env["VIGIL_STORE"].startswith("s3://"), "replicas of a fleet need a shared store"
        sources.append(json.dumps(container["envFrom"], sort_keys=True))
        secret_refs = [s["secretRef"]["name"] for s in container["envFrom"] if "secretRef" in s]
        credentials = {k for name in secret_refs for k in data_of(find(rendered, "Secret", name))}
        assert credentials == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    # The service and both jobs read one store: the same ConfigMap and Secret.
    assert len(set(sources)) == 1
    admin = [v for v in the_container(find(rendered, "Deployment", "vigil"))["env"] if v["name"] == "VIGIL_ADMIN_TOKEN"]
    assert admin and "secretKeyRef" in admin[0]["valueFrom"]
    for config_map in (r for r in rendered if r["kind"] == "ConfigMap"):
        assert not {"VIGIL_ADMIN_TOKEN", "AWS_SECRET_ACCESS_KEY", "VIGIL_PII_SALT"} & set(config_map["data"])


def test_committed_secrets_are_placeholders(rendered: list[Resource]) -> None:
    for secret in (r for r in rendered if r["kind"] == "Secret"):
        for key, value in data_of(secret).items():
            assert "REPLACE_ME" in value, f"Secret {secret['metadata']['name']} {key} is not a marked placeholder"


def test_every_reference_resolves(rendered: list[Resource]) -> None:
    present = {(r["kind"], r["metadata"]["name"]) for r in rendered}
    for workload in workloads(rendered):
        pod = the_pod(workload)
        assert ("ServiceAccount", pod["serviceAccountName"]) in present
        refs = [("ConfigMap", v["configMap"]) for v in pod["volumes"] if "configMap" in v]
        for container in containers(pod):
            refs += [("ConfigMap", s["configMapRef"]) if "configMapRef" in s else ("Secret", s["secretRef"])
                     for s in container.get("envFrom", [])]
            refs += [("Secret", v["valueFrom"]["secretKeyRef"]) for v in container.get("env", [])
                     if "secretKeyRef" in v.get("valueFrom", {})]
            mounted = {m["name"] for m in container.get("volumeMounts", [])}
            assert mounted <= {v["name"] for v in pod["volumes"]}
        for kind, ref in refs:
            assert (kind, ref["name"]) in present or ref.get("optional"), f"{kind} {ref['name']} is not rendered"


def test_pods_meet_the_restricted_pod_security_standard(rendered: list[Resource]) -> None:
    for workload in workloads(rendered):
        pod = the_pod(workload)
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert pod["automountServiceAccountToken"] is False
        for container in containers(pod):
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False
            assert context["capabilities"]["drop"] == ["ALL"] and "add" not in context["capabilities"]


# ----------------------------------------------------------------------------- selectors


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def test_the_service_selects_the_server_pods_only(rendered: list[Resource]) -> None:
    deployment = find(rendered, "Deployment", "vigil")
    service = find(rendered, "Service", "vigil")
    assert selects(deployment["spec"]["selector"]["matchLabels"], pod_labels(deployment))
    assert selects(service["spec"]["selector"], pod_labels(deployment))
    for job in (r for r in rendered if r["kind"] == "CronJob"):
        assert not selects(service["spec"]["selector"], pod_labels(job))
    (port,) = service["spec"]["ports"]
    assert port["name"] == "http" and port["targetPort"] == "http"
    assert port["targetPort"] in {p["name"] for p in the_container(deployment)["ports"]}


def test_the_hpa_and_the_pdb_target_the_deployment(rendered: list[Resource]) -> None:
    deployment = find(rendered, "Deployment", "vigil")
    hpa = find(rendered, "HorizontalPodAutoscaler", "vigil")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == ("apps/v1", "Deployment", "vigil")
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count; a re-apply would reset it"
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu" and metric["resource"]["target"]["type"] == "Utilization"
    assert "cpu" in the_container(deployment)["resources"]["requests"], "CPU utilisation is a share of the request"
    # With maxUnavailable 1, one replica left alone would go down with any drain.
    assert 2 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    pdb = find(rendered, "PodDisruptionBudget", "vigil")
    assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    assert pdb["spec"]["maxUnavailable"] == 1


def test_the_service_monitor_scrapes_metrics_as_job_vigil(rendered: list[Resource]) -> None:
    service = find(rendered, "Service", "vigil")
    monitor = find(rendered, "ServiceMonitor", "vigil")
    assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    # The Prometheus Operator names the job after the Service; the alert rules select job="vigil".
    assert 'job="vigil"' in (ROOT / "monitoring" / "alerts.yml").read_text()
    assert service["metadata"]["name"] == "vigil" and "jobLabel" not in monitor["spec"]


# ----------------------------------------------------------------------------- the jobs

JOBS = {"vigil-drift": ("drift", "run"), "vigil-quality": ("performance", "run")}


def job_command(resources: list[Resource], name: str) -> tuple[str, list[str]]:
    """(the script's text, the `vigil` arguments it is given) of a CronJob."""
    cronjob = find(resources, "CronJob", name)
    pod, container = the_pod(cronjob), the_container(cronjob)
    shell, script, *args = container["command"]
    assert shell == "sh"
    mount, volume = mount_for(pod, container, script)
    config_map = find(resources, "ConfigMap", volume["configMap"]["name"])
    return config_map["data"][str(Path(script).relative_to(mount["mountPath"]))], args


@pytest.mark.parametrize("name", sorted(JOBS))
def test_cronjob_commands_parse_with_the_cli(rendered: list[Resource], name: str) -> None:
    script, args = job_command(rendered, name)
    assert args[:2] == list(JOBS[name])
    assert 'vigil "$@" --model "$model"' in script
    context = parse_cli([*args, "--model", "cancer"])
    assert context.params["model"] == "cancer"
    # The store is the service's (VIGIL_STORE from the shared ConfigMap), never a local directory.
    assert context.params["store"] is None and context.params["data_dir"] is None
    cronjob = find(rendered, "CronJob", name)
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    assert the_pod(cronjob)["restartPolicy"] == "Never"


def test_the_drift_job_runs_daily_as_its_staleness_alert_assumes(rendered: list[Resource]) -> None:
    for name in JOBS:
        minute, hour, *days = find(rendered, "CronJob", name)["spec"]["schedule"].split()
        assert minute.isdigit() and hour.isdigit() and days == ["*", "*", "*"], f"{name} runs once a day"
    _, args = job_command(rendered, "vigil-drift")
    assert parse_cli([*args, "--model", "m"]).params["last"] == "24h"  # a day's window, every day
    assert "2 * 86400" in (ROOT / "monitoring" / "alerts.yml").read_text()  # VigilDriftJobStale: two days


@pytest.mark.integration  # runs sh and a stand-in `vigil`
@pytest.mark.parametrize(("exits", "expected"), [
    ({"cancer": 0, "diabetes": 0}, 0),
    ({"cancer": 3, "diabetes": 4}, 0),    # drift and too few rows are verdicts
    ({"cancer": 1, "diabetes": 0}, 1),    # an error fails the Job...
    ({}, 1),                              # ...and so does a registry with no model
], ids=["ok", "verdicts", "error", "empty"])
def test_every_model_script_runs_each_model_and_fails_on_errors(tmp_path: Path, exits: dict[str, int],
                                                                 expected: int) -> None:
    script = (LAYOUTS["base"] / "jobs" / "every-model.sh").read_text()
    registry = tmp_path / "models"
    registry.mkdir()
    for model in exits:
        (registry / model / "1").mkdir(parents=True)
    (registry / "README.md").write_text("not a model\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    # A stand-in `vigil`: records its arguments, exits with $EXIT_<model> (the last argument).
    (bin_dir / "vigil").write_text('#!/bin/sh\necho "$*" >> "$CALLS"\n'
                                   'for model; do :; done\neval "exit \\${EXIT_$model}"\n')
    (bin_dir / "vigil").chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "VIGIL_REGISTRY": str(registry), "CALLS": str(calls),
           **{f"EXIT_{model}": str(code) for model, code in exits.items()}}
    result = subprocess.run(["sh", "-c", script, "every-model.sh", "drift", "run", "--last", "24h"],
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == expected, result.stderr
    ran = calls.read_text().splitlines() if calls.exists() else []
    assert ran == [f"drift run --last 24h --model {model}" for model in sorted(exits)]


# ----------------------------------------------------------------------------- the renderer


def test_the_renderer_refuses_what_it_does_not_do(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({"resources": [], "commonLabels": {"a": "b"}}))
    with pytest.raises(KustomizeError, match="commonLabels"):
        build(tmp_path)


def test_generated_names_follow_their_content() -> None:
    base, example = build(LAYOUTS["base"]), build(LAYOUTS["example"])
    # The example overlay changes the config, so its name (and the pods' reference) changes: they roll.
    assert generated(base, "ConfigMap", "vigil-config")["metadata"]["name"] != \
        generated(example, "ConfigMap", "vigil-config")["metadata"]["name"]
    assert generated(base, "ConfigMap", "vigil-jobs")["metadata"]["name"] == \
        generated(example, "ConfigMap", "vigil-jobs")["metadata"]["name"]
    assert find(example, "ConfigMap", "vigil-deploy")


def _normalised(resources: list[Resource]) -> dict[tuple[str, str], str]:
    suffixed = {r["metadata"]["name"] for r in resources if r["kind"] in ("ConfigMap", "Secret")}
    text = {(r["kind"], r["metadata"]["name"]): json.dumps(r, sort_keys=True) for r in resources}
    for name in suffixed:
        plain = re.sub(r"-[a-z0-9]{10}$", "", name)
        text = {(kind, n.replace(name, plain)): t.replace(f'"{name}"', f'"{plain}"') for (kind, n), t in text.items()}
    return text


@pytest.mark.integration  # runs kubectl
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_the_renderer_agrees_with_kubectl(layout: str) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the manifests are checked through tests/kustomize.py alone")
    printed = subprocess.run([kubectl, "kustomize", str(LAYOUTS[layout])], capture_output=True, text=True,
                             timeout=120, check=True).stdout
    theirs = [doc for doc in yaml.safe_load_all(printed) if doc]
    assert _normalised(build(LAYOUTS[layout])) == _normalised(theirs)



def test_the_image_runs_as_the_non_root_user_the_manifests_name(rendered: list[Resource]) -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    service = dockerfile[dockerfile.index("AS service"):dockerfile.index("AS examples")]
    users = re.findall(r"^USER (\d+):(\d+)$", service, re.MULTILINE)
    assert users, "the service stage sets no numeric USER: it would run as root"
    uid, gid = map(int, users[-1])
    assert uid != 0 and gid != 0
    assert re.search(rf"useradd .*--uid {uid} ", service) and re.search(rf"groupadd .*--gid {gid} ", service)
    assert re.search(r"chown vigil:vigil /data", service)  # VIGIL_DATA_DIR, written at run time
    for workload in workloads(rendered):
        security = the_pod(workload).get("securityContext", {})
        assert (security.get("runAsUser"), security.get("runAsGroup")) == (uid, gid), workload["metadata"]["name"]
        assert security.get("runAsNonRoot") is True, workload["metadata"]["name"]
