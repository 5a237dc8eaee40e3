"""What the on-call tests read from the kit's files: dashboards, their queries and variables, the alert rules.

Everything here parses the files as they are in the repository; nothing is
generated. A :class:`Query` is one PromQL expression a person would see
evaluated: a panel target, an annotation, or a template variable's query.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = ROOT / "grafana" / "dashboards"
DATASOURCES = ROOT / "grafana" / "provisioning" / "datasources"
ALERTS = ROOT / "monitoring" / "alerts.yml"
ALERT_TESTS = ROOT / "monitoring" / "alerts_test.yml"
COMPOSE = ROOT / "docker-compose.yml"
PROMETHEUS_CONFIG = ROOT / "prometheus.yml"

GLOBALS = {"__rate_interval": "1m", "__range": "1h"}
"""What Grafana's own variables become in the tests: a 1m rate interval (many 1 s scrapes) and a 1h range."""

GRAFANA_GLOBALS = frozenset({"__rate_interval", "__interval", "__interval_ms", "__range", "__range_s",
                             "__range_ms", "__from", "__to", "__dashboard", "__name", "__org", "__user"})
"""Variables Grafana defines itself; a dashboard need not declare them."""

_VARIABLE_RE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")
_LABEL_VALUES_RE = re.compile(r"^\s*label_values\((?:(?P<selector>.+),)?\s*(?P<label>\w+)\s*\)\s*$")


@dataclass(frozen=True)
class Query:
    """One PromQL expression of a dashboard."""

    dashboard: str
    """The dashboard's uid."""
    where: str
    """Panel title and refId, annotation name, or variable name."""
    kind: str
    """``panel``, ``annotation`` or ``variable``."""
    expr: str
    repeat: str | None = None
    """The variable a repeated panel is repeated over (its queries see one value at a time)."""

    @property
    def id(self) -> str:
        """A readable test id."""
        return f"{self.dashboard}: {self.where}"


def dashboards() -> dict[str, dict[str, Any]]:
    """Every dashboard JSON file, by file name."""
    return {path.name: json.loads(path.read_text()) for path in sorted(DASHBOARDS.glob("*.json"))}


def provisioned_datasource_uid() -> str:
    """The uid of the single Prometheus datasource provisioned for Grafana."""
    uids = []
    for path in sorted(DATASOURCES.glob("*.yml")):
        for source in yaml.safe_load(path.read_text()).get("datasources", []):
            if source.get("type") == "prometheus":
                uids.append(source["uid"])
    assert len(uids) == 1, f"expected one provisioned Prometheus datasource, found {uids}"
    return uids[0]


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows included, and the panels folded inside collapsed rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def variables(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """The dashboard's template variables."""
    return list(dashboard.get("templating", {}).get("list", []))


def variable_query(variable: dict[str, Any]) -> str:
    """A query variable's query text (Grafana stores it as a string or as ``{"query": ...}``)."""
    query = variable.get("query", "")
    return query.get("query", "") if isinstance(query, dict) else str(query)


def queries(dashboard: dict[str, Any]) -> list[Query]:
    """Every PromQL expression of a dashboard: panel targets, annotations, variable queries."""
    uid = dashboard["uid"]
    found = []
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            found.append(Query(uid, f"{panel['title']} [{target.get('refId', '?')}]", "panel", target["expr"],
                               panel.get("repeat")))
    for annotation in dashboard.get("annotations", {}).get("list", []):
        if annotation.get("expr"):
            found.append(Query(uid, f"annotation {annotation['name']}", "annotation", annotation["expr"]))
    for variable in variables(dashboard):
        if variable.get("type") == "query":
            found.append(Query(uid, f"variable ${variable['name']}", "variable", variable_query(variable)))
    return found


def all_queries() -> list[Query]:
    """Every PromQL expression of every dashboard."""
    return [q for dashboard in dashboards().values() for q in queries(dashboard)]


def used_variables(text: str) -> set[str]:
    """Names of the template variables a text refers to (``$x``, ``${x}``, ``${x:fmt}``, ``[[x]]``)."""
    return {next(g for g in match.groups() if g) for match in _VARIABLE_RE.finditer(text)}


def substitute(text: str, values: dict[str, str]) -> str:
    """Replace template variables with the given (already formatted) values; a missing one raises KeyError."""
    def one(match: re.Match[str]) -> str:
        name = next(g for g in match.groups() if g)
        return values[name]

    return _VARIABLE_RE.sub(one, text)


def label_values_query(text: str) -> tuple[str | None, str]:
    """``label_values(selector, label)`` split into (selector or None, label)."""
    match = _LABEL_VALUES_RE.match(text)
    assert match, f"not a label_values() query: {text!r}"
    return match.group("selector"), match.group("label")


def alert_rules() -> list[dict[str, Any]]:
    """Every alerting rule of monitoring/alerts.yml, each with its group name under ``group``."""
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [{**rule, "group": group["name"]} for group in groups for rule in group["rules"] if "alert" in rule]
