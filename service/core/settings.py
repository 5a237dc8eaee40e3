"""Service settings, read once from the environment (``VIGIL_`` prefix)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Everything an operator can tune without touching code.

    Each field maps to an environment variable, e.g. ``registry`` to ``VIGIL_REGISTRY``.
    """

    model_config = SettingsConfigDict(env_prefix="VIGIL_", extra="ignore")

    registry: Path = Path("models")
    """Root of the model registry: ``<registry>/<name>/<version>/``."""

    deploy: Path = Path("deploy.yaml")
    """The deploy config: stable/canary versions and policies per model (optional file)."""

    data_dir: Path = Path("var")
    """The local directory of this host: the store when ``store`` is unset."""

    store: str | None = None
    """Where what outlives a worker lives (prediction log, feedback, job verdicts, rollback state), shared by
    every replica that names it: unset for ``data_dir``; a directory (a shared volume works); or
    ``s3://bucket/prefix`` for object storage through the S3 API (credentials and region from the usual
    ``AWS_*`` variables)."""

    store_endpoint_url: str | None = None
    """Endpoint of an S3-compatible server (MinIO, Ceph, moto) for an ``s3://`` store; else
    ``AWS_ENDPOINT_URL``, else AWS's own."""

    feedback_match_seconds: float = Field(60.0, gt=0, le=86_400)
    """How long after serving a request its prediction may still be on its way to the store. Feedback for it
    is accepted at once and matched when the prediction appears; past this it is counted in
    ``vigil_feedback_unmatched_total`` (and kept for the jobs). Feedback for an older request whose
    prediction is not in the log is refused with 404. Must exceed the flush interval plus the request timeout."""

    feedback_settle_seconds: float = Field(0.5, gt=0, le=5)
    """How often each worker looks again for the predictions of the feedback it holds pending (a store listing
    per round on object storage). At most 5 s: the same round tells the store the worker is alive."""

    max_instances: int = Field(1000, ge=1)
    """Most instances accepted in one ``/predict`` request."""

    max_body_bytes: int = Field(1 << 20, ge=1024)
    """Largest request body accepted, in bytes; larger bodies get 413 before being read whole."""

    max_string_length: int = Field(1024, ge=1)
    """Longest value accepted for a string feature."""

    admin_token: SecretStr | None = None
    """Bearer token for ``/admin/*``; without it those endpoints are disabled (403), never open."""

    control_interval_seconds: float = Field(1.0, gt=0, le=60)
    """How often each worker re-reads deploy.yaml, the rollback state and drift verdicts, and checks canaries."""

    max_concurrency: int = Field(64, ge=1)
    """Requests a worker answers at once; more get 429 with Retry-After at once (health and metrics are exempt)."""

    request_timeout_seconds: float = Field(10.0, gt=0)
    """A request still running after this long is answered 504 (model calls have their own, shorter budget)."""

    workers: int = Field(1, ge=1)
    """HTTP worker processes (``vigil serve --workers``)."""

    tracing: bool = False
    """Keep BentoML's OpenTelemetry spans for the hot and probe routes (off: those routes are not traced)."""

    metrics_enabled: bool = True
    """Record the ``vigil_`` metric families (off only to measure their cost)."""

    metrics_flush_seconds: float = Field(1.0, gt=0, le=10)
    """How often a busy worker writes its metric values to the files ``/metrics`` reads: the most a
    scrape can lag behind another worker's requests (the answering worker is always exact), and what a
    SIGKILLed worker can lose. Every flush takes the worker's time, so a shorter interval costs each
    request more for a freshness no scrape interval can see."""

    process_sample_seconds: float = Field(2.0, gt=0, le=60)
    """How often each worker samples its own memory, CPU, open files and threads for ``vigil_process_*``."""

    predlog_enabled: bool = True
    """Write every answered instance to the prediction log under ``data_dir/predlog``."""

    predlog_flush_seconds: float = Field(1.0, gt=0, le=60)
    """Longest time a logged row waits in memory before it is written."""

    predlog_journal: bool = True
    """Journal every logged row under ``data_dir/journal`` before its answer leaves, so a killed worker
    loses none: the next process started on that directory writes them (:mod:`monitoring.journal`)."""

    predlog_buffer_rows: int = Field(100_000, ge=1)
    """Rows buffered per worker before new rows are dropped (and counted) instead of blocking."""

    predlog_sample_rate: float = Field(1.0, ge=0, le=1)
    """Share of requests logged (whole requests), for models whose deploy policy sets no ``log_sample_rate``."""

    pii_salt: str | None = None
    """Secret salt for hashing features marked ``pii: hash``; without it they are dropped."""

    model_inline_seconds: float = Field(0.002, gt=0, le=1)
    """Model calls typically faster than this run on the worker's event loop (a thread hop would cost
    more than the call); slower ones run on a thread so the worker keeps answering meanwhile."""

    intra_op_threads: int = Field(1, ge=1)
    """onnxruntime intra-op threads per worker; one per worker keeps workers from fighting for cores."""
