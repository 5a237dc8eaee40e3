"""The prediction log: exact read-back, PII never in clear, bounded buffer, crash safety."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from prometheus_client import CollectorRegistry

from monitoring.metrics import VigilMetrics
from monitoring.predlog import LoggedRequest, PredictionLog, prune, read_log, segment_files
from service.core.card import FeatureSpec, ModelCard, OnnxSignature, Training
from tests.servers import wait_for


def card(pii: dict[str, str] | None = None) -> ModelCard:
    pii = pii or {}
    features = [FeatureSpec(name="age", min=0, max=100), FeatureSpec(name="email", type="string", pii=pii.get("email", False)),
                FeatureSpec(name="city", type="string", pii=pii.get("city", False), nullable=True)]
    return ModelCard(
        name="churn", version="2", task="classification", features=features, labels=[0, 1],
        signature=OnnxSignature(input_mode="per_feature", inputs={"age": "float", "email": "string", "city": "string"},
                                probability_output="p", probability_format="tensor"),
        training=Training(dataset_fingerprint="x", rows=1, created_at=datetime.now(timezone.utc)), sha256="0" * 64)


def request(c: ModelCard, rid: str, n: int, t: float | None = None) -> LoggedRequest:
    instances = [{"age": 30.0 + i, "email": f"user{i}@example.org", "city": None if i % 2 else "Oslo"} for i in range(n)]
    return LoggedRequest(time=t or time.time(), request_id=rid, card=c, variant="stable", instances=instances,
                         prediction=[i % 2 for i in range(n)], score=[0.25 + 0.5 * (i % 2) for i in range(n)],
                         reasons=None)


def test_rows_written_are_read_back_exactly(tmp_path: Path) -> None:
    log = PredictionLog(tmp_path, worker="1")
    c = card()
    log.append(request(c, "r1", 3))
    log.append(request(c, "r2", 2))
    assert log.flush() == 5
    frame = read_log(tmp_path, "churn").sort_values(["request_id", "index"]).reset_index(drop=True)
    assert frame["request_id"].tolist() == ["r1", "r1", "r1", "r2", "r2"]
    assert frame["index"].tolist() == [0, 1, 2, 0, 1]
    assert frame["age"].tolist() == [30.0, 31.0, 32.0, 30.0, 31.0]
    assert frame["email"].tolist()[:2] == ["user0@example.org", "user1@example.org"]
    assert frame["city"].tolist()[:2] == ["Oslo", None]
    assert frame["prediction"].tolist() == [0, 1, 0, 0, 1]
    assert frame["prediction_score"].tolist() == [0.25, 0.75, 0.25, 0.25, 0.75]
    assert set(frame["version"]) == {"2"} and set(frame["variant"]) == {"stable"}
    assert frame["reason"].isna().all()
    assert str(frame["time"].dt.tz) == "UTC"


def test_log_is_hive_partitioned_parquet_readable_without_vigil(tmp_path: Path) -> None:
    log = PredictionLog(tmp_path, worker="1")
    log.append(request(card(), "r1", 4))
    log.flush()
    frame = pd.read_parquet(tmp_path / "predlog")  # plain pandas + pyarrow, partitions from the path
    assert len(frame) == 4 and set(frame["model"].astype(str)) == {"churn"}
    today = datetime.now(timezone.utc).date().isoformat()
    assert set(frame["date"].astype(str)) == {today}


def test_pii_is_never_written_in_clear(tmp_path: Path) -> None:
    log = PredictionLog(tmp_path, worker="1", pii_salt="s3cret")
    log.append(request(card({"email": "hash", "city": "drop"}), "r1", 3))
    log.flush()
    for path in (tmp_path / "predlog").rglob("*"):
        if path.is_file():
            raw = path.read_bytes()
            assert b"example.org" not in raw and b"Oslo" not in raw
    frame = read_log(tmp_path, "churn").sort_values("index")
    assert "city" not in frame
    # Computed here, independently of the code: the first 16 hex digits of sha256(salt, NUL, value),
    # the scheme a reader of the log reproduces to match a known value.
    expected = [hashlib.sha256(f"s3cret\x00user{i}@example.org".encode()).hexdigest()[:16] for i in range(3)]
    assert frame["email"].tolist() == expected


def test_equal_values_hash_equal_and_another_salt_hashes_differently(tmp_path: Path) -> None:
    hashed = {}
    for salt in ("s3cret", "other"):
        log = PredictionLog(tmp_path / salt, worker="1", pii_salt=salt)
        log.append(request(card({"email": "hash"}), "r1", 2))
        log.append(request(card({"email": "hash"}), "r2", 2))
        log.flush()
        frame = read_log(tmp_path / salt, "churn")
        hashed[salt] = {(row.request_id, row.index): row.email for row in frame.itertuples()}
        assert hashed[salt][("r1", 0)] == hashed[salt][("r2", 0)]  # a join key across requests
        assert hashed[salt][("r1", 0)] != hashed[salt][("r1", 1)]
    assert not set(hashed["s3cret"].values()) & set(hashed["other"].values())


def test_hash_without_salt_drops_the_feature(tmp_path: Path) -> None:
    log = PredictionLog(tmp_path, worker="1", pii_salt=None)
    log.append(request(card({"email": "hash"}), "r1", 2))
    log.flush()
    assert "email" not in read_log(tmp_path, "churn")


def test_full_buffer_drops_and_counts_without_blocking(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    log = PredictionLog(tmp_path, worker="1", metrics=VigilMetrics(registry), max_buffer_rows=10)
    c = card()
    # Nothing flushes here (no background thread): an append that waited for room would never
    # return, and the per-test timeout would fail the test.
    accepted = [log.append(request(c, f"r{i}", 4)) for i in range(5)]
    assert accepted == [True, True, False, False, False]
    assert registry.get_sample_value("vigil_predlog_dropped_total", {"model": "churn"}) == 12
    assert log.flush() == 8
    assert registry.get_sample_value("vigil_predlog_rows_total", {"model": "churn"}) == 8
    assert log.append(request(c, "again", 4))  # room again after the flush


def test_sampling_keeps_whole_requests_at_the_configured_share(tmp_path: Path) -> None:
    random.seed(11)
    c = card()
    log = PredictionLog(tmp_path, worker="1", sample_rate=0.25)
    kept = 0
    for i in range(2000):
        if log.sampled():
            kept += log.append(request(c, f"r{i}", 3))
    assert abs(kept - 500) < 4 * (2000 * 0.25 * 0.75) ** 0.5  # within 4 sigma of the share
    assert log.flush() == 3 * kept
    rows_per_request = read_log(tmp_path, "churn").groupby("request_id").size()
    assert len(rows_per_request) == kept and set(rows_per_request) == {3}  # all instances or none
    # A model's own rate overrides the log's, both ways.
    assert not any(log.sampled(0.0) for _ in range(200))
    assert all(PredictionLog(tmp_path, worker="2", sample_rate=0.0).sampled(1.0) for _ in range(200))
    assert abs(sum(log.sampled(0.75) for _ in range(2000)) - 1500) < 4 * (2000 * 0.25 * 0.75) ** 0.5


def test_write_failure_is_counted_and_never_raises(tmp_path: Path) -> None:
    blocked = tmp_path / "file-not-dir"
    blocked.write_text("a file where the data directory should be")
    registry = CollectorRegistry()
    log = PredictionLog(blocked, worker="1", metrics=VigilMetrics(registry))
    log.append(request(card(), "r1", 3))
    assert log.flush() == 0
    assert registry.get_sample_value("vigil_predlog_write_errors_total", {"model": "churn"}) == 1
    assert registry.get_sample_value("vigil_predlog_dropped_total", {"model": "churn"}) == 3


def test_background_flush_happens_within_the_interval(tmp_path: Path) -> None:
    log = PredictionLog(tmp_path, worker="1", flush_interval=0.2)
    log.start()
    try:
        log.append(request(card(), "r1", 2))
        wait_for(lambda: segment_files(tmp_path, "churn"), what="no segment written")
        assert len(read_log(tmp_path, "churn")) == 2
    finally:
        log.close()


def test_window_and_version_filters(tmp_path: Path) -> None:
    log = PredictionLog(tmp_path, worker="1")
    c = card()
    now = time.time()
    log.append(request(c, "old", 2, t=now - 3 * 86400))
    log.append(request(c, "new", 3, t=now))
    log.flush()
    since = datetime.now(timezone.utc) - timedelta(days=1)
    assert set(read_log(tmp_path, "churn", since=since)["request_id"]) == {"new"}
    assert len(read_log(tmp_path, "churn", version="2")) == 5
    assert len(read_log(tmp_path, "churn", version="9")) == 0
    removed = prune(tmp_path, older_than_days=2)
    assert len(removed) == 1 and set(read_log(tmp_path, "churn")["request_id"]) == {"new"}


def test_sigkill_mid_write_leaves_earlier_segments_readable(tmp_path: Path) -> None:
    """A writer killed with SIGKILL while flushing: every complete segment still reads, nothing half-written is seen."""
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
        from tests.unit.test_predlog import card, request
        from monitoring.predlog import PredictionLog
        log = PredictionLog({str(tmp_path)!r}, worker="1")
        c = card()
        i = 0
        while True:
            for _ in range(20):
                log.append(request(c, f"r{{i}}", 50))
                i += 1
            log.flush()
            print(i, flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(15):  # let it write a few segments, then kill it at a random point
            assert proc.stdout is not None and proc.stdout.readline()
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    files = segment_files(tmp_path, "churn")
    assert len(files) >= 15
    for path in files:
        assert pq.read_table(path).num_rows == 1000  # every visible segment is whole
    frame = read_log(tmp_path, "churn")
    assert len(frame) == 1000 * len(files)
    assert not frame.duplicated(["request_id", "index"]).any()


def test_numeric_requests_log_the_same_rows_from_their_matrix(tmp_path: Path) -> None:
    """Requests that hand over the validated matrix are logged exactly as from their instance dicts (nulls too)."""
    import numpy as np

    features = [FeatureSpec(name="x", min=0, max=1), FeatureSpec(name="k", type="int", min=0, max=9),
                FeatureSpec(name="z", min=0, max=1, nullable=True), FeatureSpec(name="secret", min=0, max=1, pii="drop")]
    numeric = ModelCard(
        name="num", version="1", task="regression", features=features,
        signature=OnnxSignature(input_mode="tensor", inputs={"input": "float"}, value_output="v"),
        prediction_range={"min": 0, "max": 1},  # type: ignore[arg-type]
        training=Training(dataset_fingerprint="x", rows=1, created_at=datetime.now(timezone.utc)), sha256="0" * 64)
    instances = [{"x": 0.5, "k": 3, "z": None, "secret": 0.1}, {"x": 0.25, "k": 7, "z": 0.75, "secret": 0.2}]
    matrix = np.array([[0.5, 3, np.nan, 0.1], [0.25, 7, 0.75, 0.2]])
    frames = []
    older = numeric.model_copy(update={"version": "0", "features": features[:2]})  # another version: per-value path
    for name, given, m in (("dicts", instances, None), ("matrix", None, matrix), ("mixed", None, matrix)):
        log = PredictionLog(tmp_path / name, worker="1")
        if name == "mixed":  # the segment takes the newest record's features; older ones fill what they have
            log.append(LoggedRequest(time=1_700_000_000.0, request_id="s", card=older, variant="stable",
                                     instances=None, prediction=[0.3], score=None, reasons=None,
                                     matrix=np.array([[0.5, 2.0]])))
        log.append(LoggedRequest(time=1_700_000_000.0, request_id="r", card=numeric, variant="stable",
                                 instances=given, prediction=[0.1, 0.2], score=None, reasons=None, matrix=m))
        if name == "mixed":
            assert log.flush() == 3
            mixed = read_log(tmp_path / name, "num").sort_values("request_id").reset_index(drop=True)
            assert mixed["x"].tolist() == [0.5, 0.25, 0.5] and mixed["k"].tolist() == [3, 7, 2]
            assert mixed["z"].isna().tolist() == [True, False, True]  # null in r, absent from s's version
            continue
        assert log.flush() == 2
        frames.append(read_log(tmp_path / name, "num"))
    pd.testing.assert_frame_equal(frames[0], frames[1])  # same rows whether read from dicts or the matrix
    assert frames[1]["k"].tolist() == [3, 7] and str(frames[1]["k"].dtype) == "int64"
    assert frames[1]["z"].isna().tolist() == [True, False] and "secret" not in frames[1]
