"""The text served at ``/metrics``, and the collectors that shape it.

In multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``, as under BentoML) the text
merges every worker's files, after dropping the gauges of workers that died
without cleaning up; otherwise it is this process's registry.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Histogram, multiprocess


def exposition() -> tuple[bytes, str]:
    """The text served at ``/metrics``: every worker's families merged in multiprocess mode, else this process's."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    multiproc_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if multiproc_dir:
        forget_dead_workers(multiproc_dir)
        registry = CollectorRegistry()
        _StartedFilesCollector(registry, path=multiproc_dir)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


class _StartedFilesCollector(multiprocess.MultiProcessCollector):
    """prometheus_client's multiprocess collector, skipping the files a worker has created but not yet sized.

    A worker creates a family's file on first use and then truncates it to its initial size;
    a scrape in between would read a zero-length file and fail (``struct.error``), answering
    /metrics with a 500. Such a file holds no values yet, and files only grow, so skipping it
    is exact.
    """

    def collect(self) -> Iterable[Any]:
        files = []
        for path in glob.glob(os.path.join(self._path, "*.db")):
            try:
                if os.path.getsize(path) > 0:
                    files.append(path)
            except FileNotFoundError:  # a dead worker's live gauge, removed since the glob
                continue
        return self.merge(files, accumulate=True)


_LIVE_GAUGE = re.compile(r"^gauge_live\w+?_(\d+)\.db$")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _gauge_writer_pids(multiproc_dir: str) -> set[int]:
    """Pids that wrote live-mode gauge files (Vigil's workers), running or not."""
    return {int(m.group(1)) for name in os.listdir(multiproc_dir) if (m := _LIVE_GAUGE.match(name))}


def live_worker_pids(multiproc_dir: str) -> set[int]:
    """Pids of processes that write live gauges (Vigil's workers) and are still running."""
    return {pid for pid in _gauge_writer_pids(multiproc_dir) if _pid_alive(pid)}


def forget_dead_workers(multiproc_dir: str) -> list[int]:
    """Drop the live-mode gauge files of workers that died without cleaning up (SIGKILL, OOM).

    prometheus_client only forgets a process when ``mark_process_dead`` is called,
    which a killed worker never does: its in-progress counts and per-worker gauges
    would stay exported forever. Counters and histograms are kept (they must not
    go backwards).
    """
    dead = {pid for pid in _gauge_writer_pids(multiproc_dir) if not _pid_alive(pid)}
    for pid in dead:
        multiprocess.mark_process_dead(pid, multiproc_dir)
    return sorted(dead)


class _MergedFamily:
    """Exposes several same-named histogram objects (one per bucket layout) as one family."""

    def __init__(self, families: dict[tuple[float, ...], Histogram]) -> None:
        self.families = families

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterable[Any]:
        merged = None
        for family in self.families.values():
            for metric in family.collect():
                if merged is None:
                    merged = metric
                else:
                    merged.samples.extend(metric.samples)
        if merged is not None:
            yield merged


class _FlushBeforeCollect:
    """Registered first, so a collection of the registry (single-process mode) sees every deferred value."""

    def __init__(self, flush: Callable[[], None]) -> None:
        self.flush = flush

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterable[Any]:
        self.flush()
        return []
