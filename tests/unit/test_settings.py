"""Settings come from VIGIL_ environment variables and refuse bad values by name."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.core.settings import Settings


def test_environment_sets_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VIGIL_METRICS_FLUSH_SECONDS", "0.5")
    monkeypatch.setenv("VIGIL_MAX_INSTANCES", "64")
    settings = Settings()
    assert settings.metrics_flush_seconds == 0.5
    assert settings.max_instances == 64


@pytest.mark.parametrize(("variable", "value"), [
    ("VIGIL_METRICS_FLUSH_SECONDS", "0"),
    ("VIGIL_METRICS_FLUSH_SECONDS", "60"),
    ("VIGIL_PREDLOG_SAMPLE_RATE", "1.5"),
    ("VIGIL_FEEDBACK_SETTLE_SECONDS", "30"),  # past the 5 s heartbeat round: others would think it dead
    ("VIGIL_MAX_CONCURRENCY", "zero"),
])
def test_bad_values_are_refused_naming_the_field(monkeypatch: pytest.MonkeyPatch, variable: str, value: str) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError) as refused:
        Settings()
    assert variable.removeprefix("VIGIL_").lower() in str(refused.value)
