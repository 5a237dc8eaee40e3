"""The worker's own resources (memory, CPU, file descriptors, threads), sampled from ``/proc``."""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from monitoring.metrics.families import MetricFamilies

class ProcessSampler:
    """Samples this worker's memory, CPU, fds and threads into the ``vigil_process_*`` families.

    BentoML's ``/metrics`` runs prometheus_client in multiprocess mode, which
    exports no ``process_*`` metrics; this fills the gap per worker from a
    daemon thread (reading ``/proc`` is I/O, so it stays off the request path).
    """

    def __init__(self, metrics: MetricFamilies, worker: str, interval: float = 2.0) -> None:
        self.interval = interval
        self.memory = metrics.process_memory.labels(worker)
        self.cpu = metrics.process_cpu.labels(worker)
        self.fds = metrics.process_open_fds.labels(worker)
        self.threads = metrics.process_threads.labels(worker)
        self._cpu_seen = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> None:
        """Take one sample now."""
        times = os.times()
        cpu = times.user + times.system
        if cpu > self._cpu_seen:
            self.cpu.inc(cpu - self._cpu_seen)
            self._cpu_seen = cpu
        self.memory.set(_resident_bytes())
        self.threads.set(threading.active_count() if not _proc_available() else _proc_threads())
        if _proc_available():
            self.fds.set(len(os.listdir("/proc/self/fd")))

    def start(self) -> None:
        """Sample now and then every ``interval`` seconds until :meth:`stop`."""
        self.sample()
        self._thread = threading.Thread(target=self._run, name="vigil-process-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sample()
            except OSError:
                pass  # /proc hiccups must not kill the sampler

    def stop(self) -> None:
        """Stop the sampling thread."""
        self._stop.set()


def _proc_available() -> bool:
    return os.path.isdir("/proc/self/fd")


def _resident_bytes() -> float:
    try:
        with open("/proc/self/statm") as fh:
            return float(int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"))
    except OSError:
        import resource

        return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def _proc_threads() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    return threading.active_count()
