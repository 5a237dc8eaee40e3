"""Deploy config rules: reading and validating deploy.yaml, the rollback state, and the edits the admin calls make."""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from service.core import files
from monitoring.store import CHANGES_KEY
from service.serving.deploy import (
    STATE_KEY,
    CanaryConfig,
    DeployConfig,
    DeployConfigError,
    DeployState,
    ModelPolicy,
    RollbackRecord,
    check_versions,
    clear_rollback,
    deploy_path,
    dump_deploy,
    edit_deploy,
    load_deploy,
    load_state,
    parse_deploy,
    promote,
    record_rollback,
    rollback_to,
    set_canary,
)

# ---------------------------------------------------------------------- reading deploy.yaml


def test_a_model_the_file_does_not_name_gets_the_default_policy() -> None:
    config = parse_deploy("models:\n  cancer: {stable: '3', on_drift: fallback}\n")
    assert config.policy("cancer").stable == "3" and config.policy("cancer").on_drift == "fallback"
    assert config.policy("diabetes") == ModelPolicy()


@pytest.mark.parametrize("text", ["", "# nothing yet\n", "models: {}\n"])
def test_an_empty_file_means_defaults_for_every_model(text: str) -> None:
    assert parse_deploy(text) == DeployConfig()


def test_errors_name_deploy_yaml_unless_told_the_source() -> None:
    with pytest.raises(DeployConfigError) as info:
        parse_deploy("models: 3\n")
    assert info.value.message.startswith("deploy.yaml: models: ")


def test_invalid_yaml_is_refused_naming_the_file() -> None:
    with pytest.raises(DeployConfigError) as info:
        parse_deploy("models: {cancer: [\n", source="/etc/vigil/deploy.yaml")
    assert info.value.message.startswith("/etc/vigil/deploy.yaml: not valid YAML: ")
    assert (info.value.status_code, info.value.code) == (400, "invalid_deploy_config")


@pytest.mark.parametrize(("text", "kind"), [("- cancer\n", "list"), ("cancer\n", "str"), ("3\n", "int")])
def test_a_file_that_is_not_a_mapping_is_refused(text: str, kind: str) -> None:
    with pytest.raises(DeployConfigError) as info:
        parse_deploy(text, source="d.yaml")
    assert info.value.message == f"d.yaml: expected a mapping with a 'models' key, got {kind}"


def test_every_invalid_key_is_named_with_its_problem() -> None:
    text = "models:\n  cancer:\n    timeout_ms: 0\n    colour: red\n"
    with pytest.raises(DeployConfigError) as info:
        parse_deploy(text, source="d.yaml")
    error = info.value
    assert error.message == ("d.yaml: models.cancer.timeout_ms: Input should be greater than or equal to 1; "
                             "models.cancer.colour: Extra inputs are not permitted")
    assert error.details == [
        {"field": "models.cancer.timeout_ms",
         "problem": "models.cancer.timeout_ms: Input should be greater than or equal to 1"},
        {"field": "models.cancer.colour", "problem": "models.cancer.colour: Extra inputs are not permitted"},
    ]


def test_a_cross_field_rule_is_named_by_the_section_holding_it() -> None:
    with pytest.raises(DeployConfigError) as info:
        parse_deploy("models:\n  cancer:\n    breaker: {min_calls: 50, window: 10}\n", source="d.yaml")
    assert info.value.details == [{"field": "models.cancer.breaker",
                                   "problem": "models.cancer.breaker: Value error, min_calls (50) cannot exceed "
                                              "window (10)"}]


def test_batching_is_off_unless_configured_and_an_empty_section_takes_the_defaults() -> None:
    config = parse_deploy("models:\n  cancer: {batching: {}}\n  diabetes: {batching: {max_batch_size: 8}}\n")
    assert ModelPolicy().batching is None and config.policy("other").batching is None
    batching = config.policy("cancer").batching
    assert batching is not None and batching.max_batch_size == 64
    diabetes = config.policy("diabetes").batching
    assert diabetes is not None and diabetes.max_batch_size == 8
    assert dump_deploy(config)["models"]["diabetes"] == {"batching": {"max_batch_size": 8}}


@pytest.mark.parametrize(("section", "key", "problem"), [
    ("{max_batch_size: 0}", "models.cancer.batching.max_batch_size", "Input should be greater than or equal to 1"),
    ("{max_batch_size: many}", "models.cancer.batching.max_batch_size",
     "Input should be a valid integer, unable to parse string as an integer"),
    ("{max_latency_ms: 5}", "models.cancer.batching.max_latency_ms", "Extra inputs are not permitted"),
    ("64", "models.cancer.batching", "Input should be a valid dictionary or instance of BatchingConfig"),
])
def test_a_bad_batching_section_is_refused_naming_the_key(section: str, key: str, problem: str) -> None:
    with pytest.raises(DeployConfigError) as info:
        parse_deploy(f"models:\n  cancer:\n    batching: {section}\n", source="d.yaml")
    assert info.value.details == [{"field": key, "problem": f"{key}: {problem}"}]
    assert info.value.message == f"d.yaml: {key}: {problem}"


def test_the_deploy_file_is_the_argument_else_vigil_deploy_else_deploy_yaml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VIGIL_DEPLOY", raising=False)
    assert deploy_path() == Path("deploy.yaml")
    monkeypatch.setenv("VIGIL_DEPLOY", "/srv/deploy.yaml")
    assert deploy_path() == Path("/srv/deploy.yaml")
    assert deploy_path("mine.yaml") == Path("mine.yaml")


def test_a_missing_deploy_file_means_defaults(tmp_path: Path) -> None:
    assert load_deploy(tmp_path / "absent.yaml") == DeployConfig()


def test_a_deploy_file_is_read_and_its_errors_name_it(tmp_path: Path) -> None:
    path = tmp_path / "deploy.yaml"
    path.write_text("models:\n  cancer: {stable: '2'}\n")
    assert load_deploy(path).policy("cancer").stable == "2"
    path.write_text("models:\n  cancer: {on_drift: panic}\n")
    with pytest.raises(DeployConfigError) as info:
        load_deploy(path)
    assert info.value.message.startswith(f"{path}: models.cancer.on_drift: ")


def test_an_unreadable_deploy_file_is_refused_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "deploy.yaml"
    path.mkdir()
    with pytest.raises(DeployConfigError) as info:
        load_deploy(path)
    assert info.value.message.startswith(f"cannot read {path}: ")


def test_versions_the_registry_has_pass_the_check() -> None:
    config = parse_deploy("models:\n  cancer: {stable: '1', canary: {version: '2'}}\n  diabetes: {}\n")
    check_versions(config, {"cancer": ["1", "2"], "diabetes": ["1"]})


def test_every_unregistered_model_or_version_is_named() -> None:
    config = parse_deploy("models:\n  ghost: {stable: '1'}\n  cancer: {stable: '7', canary: {version: '9'}}\n")
    with pytest.raises(DeployConfigError) as info:
        check_versions(config, {"cancer": ["1", "2"]})
    problems = ["models.ghost: no model 'ghost' is registered",
                "models.cancer.stable: version '7' is not registered (have 1, 2)",
                "models.cancer.canary.version: version '9' is not registered (have 1, 2)"]
    assert info.value.message == "; ".join(problems)
    assert info.value.details == [{"field": p.split(":")[0], "problem": p} for p in problems]


def test_a_config_is_dumped_without_its_defaults() -> None:
    config = DeployConfig(models={"cancer": ModelPolicy(stable="3", canary=CanaryConfig(version="4", traffic=0.2))})
    assert dump_deploy(config) == {"models": {"cancer": {"stable": "3", "canary": {"version": "4", "traffic": 0.2}}}}


# ---------------------------------------------------------------------- rollback state


def record(version: str = "4", by: str = "monitor") -> RollbackRecord:
    return RollbackRecord(version=version, reason="error_rate", figures={"increase": 0.3},
                          at=datetime(2024, 5, 1, tzinfo=timezone.utc), by=by)  # type: ignore[arg-type]


def test_a_canary_serves_its_share_until_that_version_is_rolled_back() -> None:
    policy = ModelPolicy(canary=CanaryConfig(version="4", traffic=0.3))
    assert DeployState().canary_traffic("cancer", policy) == 0.3
    rolled_back = DeployState(rollbacks={"cancer": record("4")})
    assert rolled_back.canary_traffic("cancer", policy) == 0.0
    assert rolled_back.canary_traffic("diabetes", policy) == 0.3
    newer = ModelPolicy(canary=CanaryConfig(version="5", traffic=0.3))
    assert rolled_back.canary_traffic("cancer", newer) == 0.3   # another canary is a fresh start
    assert rolled_back.canary_traffic("cancer", ModelPolicy()) == 0.0


def test_the_rollback_state_lives_in_the_data_dir(tmp_path: Path) -> None:
    record_rollback(tmp_path, "cancer", record("4"))
    assert (tmp_path / "deploy_state.json").is_file()


def test_no_state_file_means_no_rollbacks(tmp_path: Path) -> None:
    assert load_state(tmp_path / "never-created") == DeployState()


def test_a_rollback_is_recorded_durably_and_read_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(files.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    data_dir = tmp_path / "data" / "nested"
    state = record_rollback(data_dir, "cancer", record("4"))
    assert state.rollbacks == {"cancer": record("4")}
    assert synced, "the state file is synced to disk before it replaces the old one"
    assert load_state(data_dir) == state
    record_rollback(data_dir, "diabetes", record("2", by="operator"))
    assert load_state(data_dir).rollbacks == {"cancer": record("4"), "diabetes": record("2", by="operator")}
    # no temporary file left behind: the state, the directory's lock and the change marker the workers poll
    assert sorted(p.name for p in data_dir.iterdir()) == sorted([STATE_KEY, ".lock", CHANGES_KEY])
    assert (data_dir / STATE_KEY).read_text().startswith('{\n  "rollbacks": {\n    "cancer": {\n')  # for operators


def test_clearing_a_rollback_keeps_the_state_file_readable(tmp_path: Path) -> None:
    record_rollback(tmp_path, "cancer", record("4"))
    record_rollback(tmp_path, "diabetes", record("2"))
    clear_rollback(tmp_path, "cancer")
    assert (tmp_path / STATE_KEY).read_text().startswith('{\n  "rollbacks": {\n    "diabetes": {\n')


def test_clearing_a_rollback_forgets_only_that_model(tmp_path: Path) -> None:
    record_rollback(tmp_path, "cancer", record("4"))
    record_rollback(tmp_path, "diabetes", record("2"))
    clear_rollback(tmp_path, "cancer")
    assert load_state(tmp_path).rollbacks == {"diabetes": record("2")}


def test_clearing_what_was_never_rolled_back_writes_nothing(tmp_path: Path) -> None:
    clear_rollback(tmp_path / "data", "cancer")
    assert not (tmp_path / "data" / STATE_KEY).exists() and not (tmp_path / "data" / CHANGES_KEY).exists()


def test_an_unreadable_state_file_is_reported(tmp_path: Path) -> None:
    (tmp_path / STATE_KEY).write_text("{not json")
    with pytest.raises(DeployConfigError) as info:
        load_state(tmp_path)
    assert info.value.message.startswith(f"cannot read rollback state {(tmp_path / STATE_KEY)}: ")


# ---------------------------------------------------------------------- editing deploy.yaml

COMMENTED = '''\
# Production deploy config: ask #ml-platform before editing.
models:
  cancer:
    stable: "3"   # the audited version
    on_drift: fallback
'''


def test_an_edit_keeps_the_operators_comments_and_quotes(tmp_path: Path) -> None:
    path = tmp_path / "deploy.yaml"
    path.write_text(COMMENTED)
    config = edit_deploy(path, lambda doc: set_canary(doc, "cancer", "4", 0.1))
    text = path.read_text()
    assert "# Production deploy config: ask #ml-platform before editing." in text
    assert 'stable: "3"   # the audited version' in text
    assert config.policy("cancer").canary == CanaryConfig(version="4", traffic=0.1)
    assert load_deploy(path) == config


@pytest.mark.parametrize("text", [None, "", "models:\n", "# just a comment\n"])
def test_an_edit_starts_from_an_empty_config_when_there_is_none(text: str | None, tmp_path: Path) -> None:
    path = tmp_path / "deploy.yaml"
    if text is not None:
        path.write_text(text)
    config = edit_deploy(path, lambda doc: rollback_to(doc, "cancer", "2"))
    assert config.policy("cancer").stable == "2"
    assert load_deploy(path) == config


def test_an_edit_that_does_not_validate_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "deploy.yaml"
    path.write_text(COMMENTED)
    with pytest.raises(DeployConfigError) as info:
        edit_deploy(path, lambda doc: set_canary(doc, "cancer", "4", 1.5))
    assert info.value.message.startswith(f"{path}: models.cancer.canary.traffic: ")
    assert path.read_text() == COMMENTED


def test_an_edit_naming_an_unregistered_version_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "deploy.yaml"
    path.write_text(COMMENTED)
    with pytest.raises(DeployConfigError, match="models.cancer.canary.version: version '9' is not registered"):
        edit_deploy(path, lambda doc: set_canary(doc, "cancer", "9", 0.1), versions={"cancer": ["3", "4"]})
    assert path.read_text() == COMMENTED
    edit_deploy(path, lambda doc: set_canary(doc, "cancer", "4", 0.1), versions={"cancer": ["3", "4"]})
    assert load_deploy(path).policy("cancer").canary == CanaryConfig(version="4", traffic=0.1)


def models(**entries: Any) -> dict[str, Any]:
    return {"models": dict(entries)}


def test_set_canary_keeps_the_canarys_other_settings() -> None:
    doc = models(cancer={"stable": "3", "canary": {"version": "4", "traffic": 0.1, "sticky": False}})
    set_canary(doc, "cancer", 5, 1)   # type: ignore[arg-type]
    assert doc == models(cancer={"stable": "3", "canary": {"version": "5", "traffic": 1.0, "sticky": False}})
    assert type(doc["models"]["cancer"]["canary"]["traffic"]) is float


def test_set_canary_on_an_unnamed_model_adds_it() -> None:
    doc = models()
    set_canary(doc, "cancer", "4", 0.25)
    assert doc == models(cancer={"canary": {"version": "4", "traffic": 0.25}})


def test_promote_makes_the_canary_stable() -> None:
    doc = models(cancer={"stable": "3", "canary": {"version": 4, "traffic": 0.1}, "on_drift": "fallback"})
    assert promote(doc, "cancer") == "4"
    assert doc == models(cancer={"stable": "4", "on_drift": "fallback"})


@pytest.mark.parametrize("doc", [models(), {"models": None}, models(cancer={"stable": "3"}),
                                 models(cancer={"canary": {"traffic": 0.1}}), models(cancer=None)])
def test_promote_without_a_canary_is_refused(doc: dict[str, Any]) -> None:
    with pytest.raises(DeployConfigError) as info:
        promote(doc, "cancer")
    assert info.value.message == "models.cancer.canary: there is no canary to promote"


def test_rollback_to_serves_the_version_and_drops_the_canary() -> None:
    doc = models(cancer={"stable": "4", "canary": {"version": "5"}, "timeout_ms": 50})
    rollback_to(doc, "cancer", 3)   # type: ignore[arg-type]
    assert doc == models(cancer={"stable": "3", "timeout_ms": 50})
    fresh = models()
    rollback_to(fresh, "cancer", "2")
    assert fresh == models(cancer={"stable": "2"})
