"""The worker's control loop: hot reload of deploy.yaml and the rollback state, drift and quality verdicts,
canary checks.

One daemon thread per worker polls every ``interval`` seconds: deploy.yaml on
disk, and the rollback state and verdicts in the store (no inotify dependency,
works on any shared volume). A second one runs the canary checks at the same
interval: a round publishes and reads every canary's figures in the store, which
takes longer the more canaries there are, and must not delay the moment a worker
takes a decision another worker made (a rollback reaches every replica within
one interval and a state read, however many canaries are checked). On a local store it stats each of them; on object
storage, where each stamp is a request, it stamps the store's change marker
(:data:`monitoring.store.CHANGES_KEY`, rewritten by every writer of them) and
looks at them all only when it changed, or every :data:`FULL_POLL_SECONDS`. A reload builds the new routing
off the request path and swaps it in one assignment, so requests in flight
finish on the old routing and none fails during the switch.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from monitoring.store import CHANGES_KEY
from monitoring.verdicts import (
    DRIFT_DIR,
    PERFORMANCE_DIR,
    VerdictError,
    latest_key,
    read_latest_drift,
    read_latest_quality,
)
from service.serving.deploy import STATE_KEY, DeployConfigError
from service.serving.server import ModelServer

log = logging.getLogger("vigil.control")

FULL_POLL_SECONDS = 30.0
"""On object storage, how often every watched key is stamped even when the change marker did not move
(a writer that died between its write and the marker)."""


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


class ControlLoop:
    """Watches the deploy config and rollback state; runs the canary monitor."""

    def __init__(self, server: ModelServer, interval: float = 1.0) -> None:
        self.server = server
        self.interval = interval
        self._deploy_path = Path(server.settings.deploy)
        self._store = server.store
        self._seen = (_stamp(self._deploy_path), self._store.stamp(STATE_KEY))
        self._changes: tuple[Any, ...] | None = None
        self._full_poll = 0.0
        self._drift_seen: dict[tuple[str, str], tuple[Any, ...] | None] = {}
        self._quality_seen: dict[tuple[str, str], tuple[Any, ...] | None] = {}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        """Start polling, and the canary checks, each in a daemon thread."""
        self._threads = [threading.Thread(target=self._every_interval, args=(self.tick,), name="vigil-control",
                                          daemon=True),
                         threading.Thread(target=self._every_interval, args=(self.check_canaries,),
                                          name="vigil-canary", daemon=True)]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Stop polling."""
        self._stop.set()

    @property
    def alive(self) -> bool:
        """Whether both threads run."""
        return bool(self._threads) and all(thread.is_alive() for thread in self._threads)

    def _every_interval(self, round_: Callable[[], Any]) -> None:
        while not self._stop.wait(self.interval):
            try:
                round_()
            except Exception:  # noqa: BLE001 - the loop must outlive any single failure
                log.exception("control loop round %s failed", getattr(round_, "__name__", round_))

    def tick(self) -> None:
        """One round: reload when a watched file changed (first: a decision is the most urgent news), then
        take new drift and quality verdicts, and close versions retired long enough ago."""
        changed = self._store_may_have_changed()
        seen = (_stamp(self._deploy_path), self._store.stamp(STATE_KEY) if changed else self._seen[1])
        if seen != self._seen:
            self._seen = seen
            self.reload("file change")
        if changed:
            self.check_drift()
            self.check_quality()
        self.server.loader.close_retired(time.monotonic())

    def check_canaries(self) -> None:
        """One round of the canary checks (:meth:`ModelServer.check_canaries`)."""
        self.server.check_canaries()

    def _store_may_have_changed(self) -> bool:
        """Whether the watched keys of the store need stamping this round (always, on a local store)."""
        if self._store.cheap_stamps:
            return True
        now = time.monotonic()
        changes = self._store.stamp(CHANGES_KEY)
        if changes != self._changes or now - self._full_poll >= FULL_POLL_SECONDS:
            self._changes, self._full_poll = changes, now
            return True
        return False

    def _poll(self, kind: str, seen: dict[tuple[str, str], tuple[Any, ...] | None],
              read: Callable[..., Any], apply: Callable[[Any, Any], None]) -> None:
        """Apply each served version's verdict of one job when its ``latest.json`` changed (no restart needed)."""
        for served in self.server.served_versions():
            key = (served.card.name, served.card.version)
            stamp = self._store.stamp(latest_key(kind, *key))
            if stamp == seen.get(key):
                continue
            seen[key] = stamp
            if stamp is None:
                continue
            try:
                result = read(self._store, *key)
            except VerdictError as exc:
                log.error("ignoring %s verdict of %s:%s: %s", kind, key[0], key[1], exc)
                continue
            if result is not None:
                apply(served, result)

    def check_drift(self) -> None:
        """Apply each served version's drift verdict when its ``latest.json`` changed."""
        self._poll(DRIFT_DIR, self._drift_seen, read_latest_drift, self.server.apply_drift)

    def check_quality(self) -> None:
        """Apply each served version's quality verdict (``vigil performance run``) when its ``latest.json`` changed."""
        self._poll(PERFORMANCE_DIR, self._quality_seen, read_latest_quality, self.server.apply_quality)

    def reload(self, why: str) -> DeployConfigError | None:
        """Reload now; an invalid config is refused, counted, logged and returned, and the old routing keeps serving."""
        metrics = self.server.metrics
        try:
            self.server.reload()
        except DeployConfigError as exc:
            log.error("deploy config refused (%s), the last good config keeps serving: %s", why, exc.message)
            if metrics is not None:
                metrics.deploy_reload_errors.inc()
            return exc
        log.info("deploy config reloaded (%s)", why)
        if metrics is not None:
            metrics.deploy_reloads.inc()
        return None
