"""The service's own ASGI app in this process, for handler tests that need no server.

``Vigil.to_asgi()`` is what each BentoML worker serves: the same middleware
stack (the edge, BentoML's timeout and context layers), the mounted hot routes
and the FastAPI routes. Its lifespan runs the service's ``__init__`` (loading
the models, starting the threads) and its shutdown hook, as a worker does.
Each test gets a fresh app over its own copy of the example registry and its
own data directory; the metric families it registered in prometheus_client's
process-wide registry are unregistered afterwards, so the next app starts
from zero.
"""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import httpx
import pytest
from prometheus_client import REGISTRY


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


AppFactory = Callable[..., AbstractAsyncContextManager[httpx.AsyncClient]]


@pytest.fixture
def vigil_app(registry_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AppFactory:
    """``async with vigil_app(**env) as client``: a started app and an httpx client on it.

    ``env`` holds extra ``VIGIL_*`` settings (names without the prefix, e.g. ``ADMIN_TOKEN="t"``);
    the registry is a private copy of the examples, the data directory and deploy.yaml are the test's.
    """

    @asynccontextmanager
    async def start(**env: str) -> AsyncIterator[httpx.AsyncClient]:
        settings = {"REGISTRY": str(registry_copy), "DATA_DIR": str(tmp_path / "var"),
                    "DEPLOY": str(tmp_path / "deploy.yaml"), **env}
        for name, value in settings.items():
            monkeypatch.setenv(f"VIGIL_{name}", value)
        monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "bentoml"))
        monkeypatch.setenv("BENTOML_DO_NOT_TRACK", "True")

        import service.app
        from service.core.settings import Settings

        # The module reads its settings once, at import; the service instance takes them from there.
        monkeypatch.setattr(service.app, "SETTINGS", Settings())
        before = set(REGISTRY._collector_to_names)  # no public listing of a registry's collectors
        app = service.app.Vigil.to_asgi()
        try:
            async with app.router.lifespan_context(app):
                transport = httpx.ASGITransport(app=app)
                async with httpx.AsyncClient(transport=transport, base_url="http://vigil.test") as client:
                    yield client
        finally:
            for collector in set(REGISTRY._collector_to_names) - before:
                REGISTRY.unregister(collector)
            gc.unfreeze()  # the service froze everything alive at its start, as a worker does

    return start
