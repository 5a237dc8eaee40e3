"""The merged multiprocess text at /metrics, read while workers create their files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from prometheus_client.mmap_dict import MmapedDict

from monitoring.metrics.exposition import exposition, forget_dead_workers
from tests.servers import metric_value


def _write_counter(directory: Path, pid: int, value: float) -> None:
    key = json.dumps(("vigil_demo_total", "vigil_demo_total", {"model": "m"}, "A demo counter."))
    values = MmapedDict(str(directory / f"counter_{pid}.db"))
    values.write_value(key, value, 0.0)
    values.close()


@pytest.fixture()
def multiproc_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    return tmp_path


def test_a_file_created_but_not_yet_sized_does_not_fail_the_scrape(multiproc_dir: Path) -> None:
    _write_counter(multiproc_dir, 101, 3.0)
    (multiproc_dir / "histogram_202.db").touch()  # a worker between open() and truncate()
    (multiproc_dir / "gauge_livesum_202.db").touch()

    text = exposition()[0].decode()

    assert metric_value(text, "vigil_demo_total", model="m") == 3.0


def test_counters_of_every_worker_are_summed(multiproc_dir: Path) -> None:
    _write_counter(multiproc_dir, 101, 3.0)
    _write_counter(multiproc_dir, 102, 4.0)

    assert metric_value(exposition()[0].decode(), "vigil_demo_total", model="m") == 7.0


def test_a_dead_workers_live_gauges_are_dropped_and_its_counters_kept(multiproc_dir: Path) -> None:
    dead = 2**22 + 12345  # above the default pid_max: no such process
    _write_counter(multiproc_dir, dead, 5.0)
    (multiproc_dir / f"gauge_livesum_{dead}.db").write_bytes(b"\0" * 16)
    (multiproc_dir / f"gauge_livesum_{os.getpid()}.db").write_bytes(b"\0" * 16)

    assert forget_dead_workers(str(multiproc_dir)) == [dead]
    assert not (multiproc_dir / f"gauge_livesum_{dead}.db").exists()
    assert (multiproc_dir / f"gauge_livesum_{os.getpid()}.db").exists()
    assert metric_value(exposition()[0].decode(), "vigil_demo_total", model="m") == 5.0
