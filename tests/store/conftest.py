"""Both kinds of store, for tests that must hold on each: a local directory, and S3 through a real moto_server."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from monitoring.store import LocalStore, S3Store, Store
from tests.s3server import CREDENTIALS, S3Server, s3_server


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    """One S3-API server for the module (each test takes its own bucket)."""
    with s3_server() as server:
        yield server


@pytest.fixture
def s3_store(s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Store:
    """A store in a new, empty bucket of the module's S3 server."""
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    return S3Store(s3.new_bucket(), endpoint_url=s3.endpoint)


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    """Each backend in turn: what holds for one must hold for the other."""
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    return request.getfixturevalue("s3_store")
