"""The deploy config (``deploy.yaml``): which version of each model serves, and its policies.

Validated at the edge with errors that name the key::

    models:
      cancer:
        stable: "3"
        canary: {version: "4", traffic: 0.1, sticky: true, rollback_when: {...}}
        on_drift: alert        # or fallback
        timeout_ms: 1000
        batching: {max_batch_size: 64}   # merge concurrent requests' model calls (off when absent)

A model missing from the file serves its newest registered version as stable
with the default policies.
"""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from monitoring.store import Store, as_store
from service.core.errors import VigilError, describe_validation, validation_problems
from service.core.files import atomic_write


class DeployConfigError(VigilError):
    """The deploy config cannot be used; the message names the file and the key."""

    status_code = 400
    code = "invalid_deploy_config"


class RollbackRules(BaseModel):
    """When the canary is worse than stable over the same window, roll it back."""

    model_config = ConfigDict(extra="forbid")

    min_requests: int = Field(200, ge=1)
    error_rate_increase: float = Field(0.02, ge=0, le=1)
    p95_latency_ratio: float = Field(1.5, gt=1)
    latency_floor_ms: float = Field(5.0, ge=0)
    """Latency is judged only once the canary's p95 exceeds stable's by this much: sub-floor jitter is noise."""
    fallback_rate_increase: float = Field(0.05, ge=0, le=1)
    prediction_shift: float = Field(0.2, gt=0)
    """Largest allowed distance between canary and stable prediction distributions (PSI)."""
    miss_rate_increase: float = Field(0.05, ge=0, le=1)
    """With feedback for both variants: largest allowed rise of the canary's share of wrong answers."""
    min_labelled: int = Field(50, ge=1)
    """Answers with feedback each variant needs before quality is compared."""
    regression_tolerance: float = Field(0.1, gt=0)
    """A regression answer counts as wrong when off by more than this share of the reference prediction range."""


class PromoteRules(BaseModel):
    """When a canary that breaches no rule has shown enough evidence to become stable (``promote_when``)."""

    model_config = ConfigDict(extra="forbid")

    min_requests: int = Field(1000, ge=1)
    """Canary requests, pooled over the fleet, before it can be promoted."""
    min_duration_seconds: float = Field(0.0, ge=0)
    """Time since the canary started before it can be promoted."""
    min_labelled: int = Field(0, ge=0)
    """Answers of each variant with feedback needed first (0: promote without ground truth)."""


class CanaryConfig(BaseModel):
    """A candidate version receiving a share of the traffic."""

    model_config = ConfigDict(extra="forbid")

    version: str = Field(min_length=1)
    traffic: float = Field(0.1, ge=0, le=1)
    sticky: bool = True
    rollback_when: RollbackRules = Field(default_factory=RollbackRules)
    promote_when: PromoteRules | None = None
    """Promote the canary to stable on its own once it has proven itself; None: only an operator promotes."""


class BreakerConfig(BaseModel):
    """Circuit breaker: open when errors + invalid outputs exceed ``error_rate`` over the last ``window`` calls."""

    model_config = ConfigDict(extra="forbid")

    error_rate: float = Field(0.2, gt=0, le=1)
    window: int = Field(100, ge=1)
    min_calls: int = Field(20, ge=1)
    cooldown_seconds: float = Field(30.0, gt=0)
    probes: int = Field(5, ge=1)
    """Successful half-open probe calls needed to close the breaker again."""

    @model_validator(mode="after")
    def _min_le_window(self) -> BreakerConfig:
        if self.min_calls > self.window:
            raise ValueError(f"min_calls ({self.min_calls}) cannot exceed window ({self.window})")
        return self


class BatchingConfig(BaseModel):
    """Merge the model calls of concurrent requests to one version (see :mod:`service.serving.batching`).

    Requests wait only while a call of the same version is already running on
    the model threads; they then go together in its successor, never for a timer.
    """

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(64, ge=1, le=100_000)
    """Most rows in one merged call; requests past it wait for the next call (a larger request goes alone)."""


class ModelPolicy(BaseModel):
    """Everything the deploy config says about one model."""

    model_config = ConfigDict(extra="forbid")

    stable: str | None = None
    """Version serving by default (the newest registered when omitted)."""
    canary: CanaryConfig | None = None
    on_drift: Literal["alert", "fallback"] = "alert"
    on_quality_degraded: Literal["alert", "fallback"] = "alert"
    timeout_ms: int = Field(1000, ge=1, le=600_000)
    output_range_margin: float = Field(0.25, ge=0)
    """Regression outputs beyond the reference range widened by this share of its span are invalid."""
    breaker: BreakerConfig = Field(default_factory=BreakerConfig)
    batching: BatchingConfig | None = None
    """Merge concurrent requests' model calls; None (the default): every request makes its own call."""
    log_sample_rate: float | None = Field(None, ge=0, le=1)
    """Share of this model's requests written to the prediction log (default: ``VIGIL_PREDLOG_SAMPLE_RATE``).

    Drift jobs see only logged requests, and feedback can only be joined to them.
    """

    @model_validator(mode="after")
    def _canary_differs(self) -> ModelPolicy:
        if self.canary is not None and self.stable is not None and self.canary.version == self.stable:
            raise ValueError(f"canary.version '{self.canary.version}' is the stable version")
        return self


class DeployConfig(BaseModel):
    """The whole file."""

    model_config = ConfigDict(extra="forbid")

    models: dict[str, ModelPolicy] = Field(default_factory=dict)

    def policy(self, model: str) -> ModelPolicy:
        """The policy of a model (defaults when the file does not name it)."""
        return self.models.get(model) or ModelPolicy()


def deploy_path(path: str | os.PathLike[str] | None = None) -> Path:
    """The deploy config: the argument, else ``VIGIL_DEPLOY``, else ``./deploy.yaml``."""
    return Path(path) if path is not None else Path(os.environ.get("VIGIL_DEPLOY", "deploy.yaml"))


def parse_deploy(text: str, source: str = "deploy.yaml") -> DeployConfig:
    """Parse and validate deploy YAML; :class:`DeployConfigError` names the key and why."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise DeployConfigError(f"{source}: not valid YAML: {exc}") from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise DeployConfigError(f"{source}: expected a mapping with a 'models' key, got {type(raw).__name__}")
    try:
        return DeployConfig.model_validate(raw)
    except ValidationError as exc:
        problems = validation_problems(exc, top="(top level)")
        raise DeployConfigError(f"{source}: {describe_validation(exc, top='(top level)')}",
                                [{"field": key, "problem": f"{key}: {problem}"} for key, problem in problems]) from None


def load_deploy(path: str | os.PathLike[str] | None = None) -> DeployConfig:
    """Read the deploy config; a missing file means defaults for every model."""
    file = deploy_path(path)
    if not file.exists():
        return DeployConfig()
    try:
        text = file.read_text()
    except OSError as exc:
        raise DeployConfigError(f"cannot read {file}: {exc}") from exc
    return parse_deploy(text, str(file))


def check_versions(config: DeployConfig, versions: dict[str, list[str]]) -> None:
    """Refuse a config naming versions that are not registered (``versions``: model -> versions)."""
    problems: list[str] = []
    for name, policy in config.models.items():
        known = versions.get(name)
        if known is None:
            problems.append(f"models.{name}: no model '{name}' is registered")
            continue
        if policy.stable is not None and policy.stable not in known:
            problems.append(f"models.{name}.stable: version '{policy.stable}' is not registered (have {', '.join(known)})")
        if policy.canary is not None and policy.canary.version not in known:
            problems.append(f"models.{name}.canary.version: version '{policy.canary.version}' is not registered "
                            f"(have {', '.join(known)})")
    if problems:
        raise DeployConfigError("; ".join(problems), [{"field": p.split(":")[0], "problem": p} for p in problems])


def dump_deploy(config: DeployConfig) -> dict[str, Any]:
    """The config as plain data, without defaults, for writing back to YAML."""
    return config.model_dump(mode="json", exclude_defaults=True)


# ---------------------------------------------------------------------- rollback state


class RollbackRecord(BaseModel):
    """A canary that was rolled back: it stays off until the config names another canary or it is re-enabled."""

    version: str
    reason: str
    figures: dict[str, Any] = Field(default_factory=dict)
    at: datetime
    by: Literal["monitor", "operator"] = "monitor"


class PromotionRecord(BaseModel):
    """A stable version set in the deploy state over the config's: it serves while the config still names
    ``previous`` as stable (the config's own stable, or the newest version when it names none).

    ``kind`` says how: a canary promoted (by the fleet's decision, ``promote_when``, or by an operator), or a
    rollback to an older version by an operator. Kept in the store, so on a fleet whose deploy.yaml is
    read-only (a ConfigMap) an operator's change still reaches every replica.
    """

    version: str
    previous: str
    evidence: dict[str, Any] = Field(default_factory=dict)
    at: datetime
    by: Literal["monitor", "operator"] = "monitor"
    kind: Literal["promotion", "rollback"] = "promotion"

    def describe(self) -> str:
        """One line for ``vigil deploy status``: what serves, in place of what, since when, and who said so."""
        verb = "promoted" if self.kind == "promotion" else "rolled back to"
        who = "" if self.by == "monitor" else " by an operator"
        return f"{self.version} ({verb}{who} in place of {self.previous} at {self.at:%Y-%m-%d %H:%M:%S})"


class DeployState(BaseModel):
    """What the service decided on its own, kept in the store so it survives restarts and reaches every replica."""

    rollbacks: dict[str, RollbackRecord] = Field(default_factory=dict)
    promotions: dict[str, PromotionRecord] = Field(default_factory=dict)

    def promoted(self, model: str, configured_stable: str) -> PromotionRecord | None:
        """The promotion that replaces ``configured_stable``, if any: a config naming another stable wins."""
        record = self.promotions.get(model)
        return record if record is not None and record.previous == configured_stable else None

    def canary_traffic(self, model: str, policy: ModelPolicy) -> float:
        """The canary's effective traffic share: 0 once that canary version was rolled back."""
        if policy.canary is None:
            return 0.0
        record = self.rollbacks.get(model)
        if record is not None and record.version == policy.canary.version:
            return 0.0
        return policy.canary.traffic


STATE_KEY = "deploy_state.json"
"""Where the rollback state lives in the store (``$VIGIL_DATA_DIR/deploy_state.json`` by default)."""


def load_state(store: Store | Path) -> DeployState:
    """Read the rollback state (empty when missing; an unreadable file is reported, not fatal)."""
    store = as_store(store)
    try:
        return DeployState.model_validate_json(store.get(STATE_KEY))
    except FileNotFoundError:
        return DeployState()
    except Exception as exc:  # noqa: BLE001 - unreadable or unreachable (each backend has its own errors)
        raise DeployConfigError(f"cannot read rollback state {store.url_of(STATE_KEY)}: {exc}") from exc


def _change_state(store: Store | Path, change: Callable[[DeployState], bool]) -> DeployState:
    """Apply ``change`` to the stored state as one compare-and-swap: two replicas rolling back two models keep both."""
    store = as_store(store)
    result: list[DeployState] = []

    def apply(current: bytes | None) -> bytes | None:
        try:
            state = DeployState.model_validate_json(current) if current else DeployState()
        except ValidationError as exc:
            raise DeployConfigError(f"cannot read rollback state {store.url_of(STATE_KEY)}: {exc}") from exc
        result[:] = [state]
        return state.model_dump_json(indent=2).encode() if change(state) else None

    if store.update(STATE_KEY, apply, durable=True) is not None:
        store.note_change()
    return result[0]


def record_rollback(store: Store | Path, model: str, record: RollbackRecord) -> DeployState:
    """Add a rollback to the stored state (atomic); returns the new state."""

    def add(state: DeployState) -> bool:
        state.rollbacks[model] = record
        return True

    return _change_state(store, add)


def record_stable(store: Store | Path, model: str, record: PromotionRecord,
                  canary_off: RollbackRecord | None = None) -> DeployState:
    """Set ``record`` as the model's stable in the stored state (atomic), and turn its canary off with
    ``canary_off`` or, without it, forget the canary's rollback; returns the new state."""

    def add(state: DeployState) -> bool:
        state.promotions[model] = record
        if canary_off is not None:
            state.rollbacks[model] = canary_off
        else:
            state.rollbacks.pop(model, None)
        return True

    return _change_state(store, add)


def clear_rollback(store: Store | Path, model: str) -> None:
    """Forget a model's rollback (the operator re-enables its canary)."""
    _change_state(store, lambda state: state.rollbacks.pop(model, None) is not None)


# ---------------------------------------------------------------------- editing deploy.yaml


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: tmp.write_bytes(data), durable=True)


def edit_deploy(path: Path, change: Callable[[Any], None], versions: dict[str, list[str]] | None = None) -> DeployConfig:
    """Apply ``change`` to the YAML document (comments kept), validate the result, write it atomically.

    ``change`` receives the round-trip mapping and edits it in place; nothing is
    written when the result does not validate.
    """
    from io import StringIO

    from ruamel.yaml import YAML

    yaml_rt = YAML()
    yaml_rt.preserve_quotes = True
    text = path.read_text() if path.exists() else "models: {}\n"
    document = yaml_rt.load(text) or {}
    if "models" not in document or document["models"] is None:
        document["models"] = {}
    change(document)
    out = StringIO()
    yaml_rt.dump(document, out)
    new_text = out.getvalue()
    config = parse_deploy(new_text, str(path))
    if versions is not None:
        check_versions(config, versions)
    _atomic_write(path, new_text.encode())
    return config


def set_canary(document: Any, model: str, version: str, traffic: float) -> None:
    """Edit: make ``version`` the canary of ``model`` with ``traffic``."""
    entry = document["models"].setdefault(model, {})
    canary = entry.get("canary") or {}
    canary["version"] = str(version)
    canary["traffic"] = float(traffic)
    entry["canary"] = canary


def promote(document: Any, model: str) -> str:
    """Edit: the canary becomes stable; returns the promoted version."""
    entry = (document["models"] or {}).get(model) or {}
    canary = entry.get("canary")
    if not canary or "version" not in canary:
        raise DeployConfigError(f"models.{model}.canary: there is no canary to promote")
    entry["stable"] = str(canary["version"])
    del entry["canary"]
    document["models"][model] = entry
    return str(entry["stable"])


def rollback_to(document: Any, model: str, version: str) -> None:
    """Edit: serve ``version`` as stable and drop the canary."""
    entry = document["models"].setdefault(model, {})
    entry["stable"] = str(version)
    if "canary" in entry:
        del entry["canary"]
