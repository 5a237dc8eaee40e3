"""One worker process, composed in one place: the model server, the recorders and every background thread.

:class:`Worker` builds every part in ``__init__`` and starts and stops them in
one visible list (:meth:`Worker.parts`), so nothing runs that is not named
here. The HTTP layer holds a worker and calls it; the worker knows nothing of
HTTP or BentoML (the worker's label comes in from outside).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from monitoring.metrics import ProcessSampler, VigilMetrics, live_worker_pids
from monitoring.journal import JOURNAL_DIR
from monitoring.predlog import PredictionLog
from monitoring.store import Store, settings_store
from service.core.errors import Conflict, ModelNotFound
from service.core.requestid import RequestIds, new_token
from service.core.settings import Settings
from service.feedback import FeedbackService
from service.serving.control import ControlLoop
from service.serving.deploy import DeployConfig, DeployConfigError, RollbackRecord, load_deploy
from service.serving.server import ModelServer

log = logging.getLogger("vigil.worker")

Part = tuple[str, Callable[[], None], Callable[[], None]]
"""A background part of the worker: its name, how it starts, how it stops."""


class Worker:
    """Everything one worker runs: build it, :meth:`start` it, :meth:`stop` it.

    Usage::

        worker = Worker(Settings(), label="0")
        worker.start()          # loads the models, then starts every background part
        answer = await worker.server.predict(request, worker.next_request_id())
        worker.stop()           # stops them in reverse order; buffered log rows are written
    """

    def __init__(self, settings: Settings, label: str = "0", store: Store | None = None) -> None:
        self.settings = settings
        self.label = label
        self.store = store if store is not None else settings_store(settings)
        # One random token per process: it starts every request id and names every log segment this
        # worker writes, so any replica knows who served a request, and keys never collide across hosts.
        self.token = new_token()
        self.metrics = VigilMetrics(flush_seconds=settings.metrics_flush_seconds) if settings.metrics_enabled else None
        self.predlog = PredictionLog(
            self.store, label, self.metrics, flush_interval=settings.predlog_flush_seconds,
            max_buffer_rows=settings.predlog_buffer_rows, pii_salt=settings.pii_salt,
            sample_rate=settings.predlog_sample_rate, token=self.token,
            journal_dir=settings.data_dir / JOURNAL_DIR if settings.predlog_journal else None,
        ) if settings.predlog_enabled else None
        self.server = ModelServer(settings, self.metrics, self.predlog, _initial_deploy(settings), self.store,
                                  token=self.token)
        self.feedback = FeedbackService(
            self.store, self.metrics, self.token, match_seconds=settings.feedback_match_seconds,
            window_seconds=settings.request_timeout_seconds + 2 * settings.predlog_flush_seconds + LOG_MARGIN_SECONDS,
            targets=self.server.feedback_targets, label=label,
            settle_seconds=settings.feedback_settle_seconds)
        self.control = ControlLoop(self.server, settings.control_interval_seconds)
        self.sampler = (ProcessSampler(self.metrics, label, settings.process_sample_seconds)
                        if self.metrics is not None else None)
        # A clock read and a counter: uuid4() asks the kernel for randomness on every request,
        # which costs more than the id is worth.
        self._ids = RequestIds(self.token)
        self.next_request_id: Callable[[], str] = self._ids.next
        """A new request id: this worker's token, the serving time, a counter (:mod:`service.core.requestid`)."""
        self._started = False

    def parts(self) -> list[Part]:
        """Every background part, in start order (stopped in reverse)."""
        parts: list[Part] = [("control loop", self.control.start, self.control.stop)]
        if self.predlog is not None:
            predlog, cards = self.predlog, self.server.registry.card
            parts.append(("prediction log writer", lambda: predlog.start(card_for=cards), predlog.close))
        parts.append(("feedback settler", self.feedback.start, self.feedback.stop))
        if self.sampler is not None:
            parts.append(("process sampler", self.sampler.start, self.sampler.stop))
        if self.metrics is not None:
            parts.append(("metrics flusher", self.metrics.start_flushing, self.metrics.stop_flushing))
        parts.append(("model threads and sessions", lambda: None, self.server.close))
        return parts

    def start(self) -> None:
        """Register the worker's token in the store, load every model the deploy config names (failures
        answered by fallbacks), then start every part."""
        self.feedback.register()
        self.server.load_all()
        for _, start, _ in self.parts():
            start()
        self._started = True

    def stop(self) -> None:
        """Stop every part in reverse order; the prediction log writes what it buffered."""
        self._started = False
        for name, _, stop in reversed(self.parts()):
            try:
                stop()
            except Exception:  # noqa: BLE001 - one part failing to stop must not keep the others running
                log.exception("stopping the %s failed", name)

    # ------------------------------------------------------------------ readiness

    def is_ready(self) -> bool:
        """Started, with its control loop alive (without it, deploy changes and verdicts would be missed)."""
        return self._started and self.control.alive

    def readiness(self) -> dict[str, Any]:
        """What ``/readyz`` answers: ready, every model that does not serve from its own model, and the workers.

        A dead worker makes the service not ready: outside a container BentoML
        replaces it within seconds, inside one (``BENTOML_CONTAINERIZED``) it does
        not, and the orchestrator must see that instead of a silently smaller server.
        """
        report: dict[str, Any] = {"ready": self.is_ready(), "not_ready": self.server.not_ready(),
                                  "models": {m["name"]: m["state"] for m in self.server.describe()}}
        multiproc_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if multiproc_dir and self.metrics is not None:
            alive = len(live_worker_pids(multiproc_dir))
            report["workers"] = {"expected": self.settings.workers, "alive": alive}
            if alive < self.settings.workers:
                report["ready"] = False
        return report

    # ------------------------------------------------------------------ operator actions

    def check_model(self, model: str, version: str | None = None) -> None:
        """404 unless ``model`` (and ``version``, when given) is registered."""
        if model not in self.server.models:
            raise ModelNotFound(f"no model named '{model}'")
        if version is not None and version not in self.server.registry.versions(model):
            raise ModelNotFound(f"model '{model}' has no version '{version}'")

    def turn_canary_off(self, model: str) -> RollbackRecord:
        """Roll the live canary back (recorded in the state file, so it survives restarts)."""
        return self.server.rollback(model, "manual")

    def serve_version(self, model: str, version: str) -> None:
        """Serve ``version`` as stable with no canary, on every replica: recorded in the deploy state in the store."""
        self.server.serve_stable(model, version)

    def promote_canary(self, model: str) -> str:
        """Make the canary stable on every replica (recorded in the deploy state); returns the version."""
        return self.server.promote(model, {"by": "operator"}, by="operator").version


LOG_MARGIN_SECONDS = 10.0
"""Added to the request timeout and two flush intervals: the longest a served row takes to reach the store."""


def _initial_deploy(settings: Settings) -> DeployConfig:
    try:
        return load_deploy(settings.deploy)
    except DeployConfigError as exc:
        # Refusing to start would crash-loop the workers; serve every model's newest
        # version with default policies and say so loudly.
        log.error("deploy config refused, serving defaults: %s", exc.message)
        return DeployConfig()
