"""Deferred metric children and the queues of the request path.

A deferred child keeps what the request path records in this worker's memory
and writes it to its prometheus_client child when the worker flushes
(:meth:`monitoring.metrics.VigilMetrics.flush`). The recorders queue whole rows
of numbers (:func:`pack_row`) in ``array`` objects, and the flush takes whole
rows from their front (:func:`_take_rows`) to count them with numpy.
"""

from __future__ import annotations

import struct
import threading
from array import array
from bisect import bisect_left
from typing import Any

import numpy as np
from prometheus_client import Counter, Gauge, Histogram

FLUSH_SECONDS = 1.0
"""Default of how often a busy worker writes its deferred metric values to the shared files.

See :class:`DeferredCounter`; the service takes it from ``VIGIL_METRICS_FLUSH_SECONDS``."""
QUEUE_LIMIT = 4096
"""Queued model calls at which the request path flushes itself, when no flush came in time.

It bounds the queued outputs too: each call's outputs are queued with its row."""
IDLE_FLUSH_SECONDS = 0.5
"""How often the background thread flushes when no request has (an idle worker's last numbers)."""


class DeferredCounter:
    """A counter child whose increments stay in this worker's memory until :meth:`VigilMetrics.flush`.

    In multiprocess mode every ``inc`` of prometheus_client takes a lock, asks
    the kernel for the pid and writes the shared file, which a request recording
    a dozen values cannot afford. Here the request path only adds to a number.
    One thread records (the worker's event loop); the flush, from any thread,
    writes the difference since the last flush, so no increment is lost or
    counted twice without a lock on the request path.
    """

    __slots__ = ("child", "total", "_flushed")

    def __init__(self, child: Any) -> None:
        self.child = child
        self.total: float = 0
        self._flushed: float = 0

    def inc(self, amount: float = 1) -> None:
        """Add ``amount`` (visible in the exposition after the next flush)."""
        self.total += amount

    def flush(self) -> None:
        """Write what was added since the last flush to the real child."""
        total = self.total
        if total != self._flushed:
            self.child.inc(total - self._flushed)
            self._flushed = total


class DeferredGauge:
    """A gauge child set from a value kept in memory, written at flush (see :class:`DeferredCounter`)."""

    __slots__ = ("child", "value", "_flushed")

    def __init__(self, child: Any) -> None:
        self.child = child
        self.value: float = 0
        self._flushed: float | None = None

    def flush(self) -> None:
        """Export the current value if it changed."""
        value = self.value
        if value != self._flushed:
            self.child.set(value)
            self._flushed = value


class DeferredHistogram:
    """A histogram child whose observations are counted per bucket in memory until flush.

    ``observe`` costs a bisection and two additions instead of two locked
    file writes; :meth:`observe_many` counts a whole array with numpy (a
    64-row request would otherwise pay for 64 observations). The flush adds each
    bucket's new count and the sum to the real child, which is what
    ``Histogram.observe`` does one value at a time.
    """

    __slots__ = ("child", "bounds", "counts", "sum", "_array_bounds", "_flushed_counts", "_flushed_sum",
                 "_buckets", "_sum")

    def __init__(self, child: Any) -> None:
        buckets, bounds, total = (getattr(child, name, None) for name in ("_buckets", "_upper_bounds", "_sum"))
        if buckets is None or bounds is None or total is None:
            raise RuntimeError("this prometheus_client has no Histogram._buckets/_upper_bounds/_sum: "
                               "install prometheus-client>=0.20,<1")
        self.child = child
        self._buckets, self._sum = buckets, total
        self.bounds: list[float] = list(bounds)
        self._array_bounds = np.asarray(self.bounds)
        self.counts = [0] * len(self.bounds)
        self.sum = 0.0
        self._flushed_counts = [0] * len(self.bounds)
        self._flushed_sum = 0.0

    def observe(self, value: float) -> None:
        """Count one value (``le`` semantics: the first bucket whose bound is at least the value)."""
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def observe_many(self, values: np.ndarray) -> None:
        """Count every value of an array."""
        if values.size == 0:
            return
        counts = np.bincount(np.searchsorted(self._array_bounds, values, side="left"), minlength=len(self.bounds))
        for index in np.flatnonzero(counts).tolist():
            self.counts[index] += int(counts[index])
        self.sum += float(values.sum())

    def flush(self) -> None:
        """Add the new observations to the real child."""
        if self.counts == self._flushed_counts:  # nothing observed since: one C comparison, not a Python loop
            return
        for index, count in enumerate(self.counts):
            delta = count - self._flushed_counts[index]
            if delta:
                self._buckets[index].inc(delta)
                self._flushed_counts[index] = count
        total = self.sum
        if total != self._flushed_sum:
            self._sum.inc(total - self._flushed_sum)
            self._flushed_sum = total


Deferred = DeferredCounter | DeferredGauge | DeferredHistogram


class DeferredChildren:
    """The deferred child of each (family, label values), one shared by every recorder that asks for it.

    A child is created under the flush lock, so a flush never iterates over a
    table that grows; :meth:`flush` is :class:`~monitoring.metrics.VigilMetrics`',
    which also counts its recorders' queues.
    """

    def __init__(self) -> None:
        self._deferred: dict[tuple[int, tuple[str, ...]], Deferred] = {}
        # Re-entrant: the flush creates the status counters of new (method, status) pairs.
        self._flush_lock = threading.RLock()

    def counter(self, family: Counter, *labels: str) -> DeferredCounter:
        """The deferred child of a counter for ``labels`` (one per label set, shared by every caller)."""
        return self._deferred_child(DeferredCounter, family, labels)  # type: ignore[return-value]

    def gauge(self, family: Gauge, *labels: str) -> DeferredGauge:
        """The deferred child of a gauge for ``labels``; only the worker's event loop may change it."""
        return self._deferred_child(DeferredGauge, family, labels)  # type: ignore[return-value]

    def histogram(self, family: Histogram, *labels: str) -> DeferredHistogram:
        """The deferred child of a histogram for ``labels``."""
        return self._deferred_child(DeferredHistogram, family, labels)  # type: ignore[return-value]

    def _deferred_child(self, kind: type, family: Any, labels: tuple[str, ...]) -> Deferred:
        key = (id(family), labels)
        child = self._deferred.get(key)
        if child is None:
            with self._flush_lock:
                child = self._deferred.get(key)
                if child is None:
                    child = self._deferred[key] = kind(family.labels(*labels) if labels else family)
        return child

    def flush(self) -> None:
        """Write every deferred value to the real metric children (implemented by ``VigilMetrics``)."""
        raise NotImplementedError


ROW_NUMBERS = 3
"""Numbers in one queued row (:attr:`EndpointRecorder.done`, a version's model calls)."""
pack_row = struct.Struct(f"{ROW_NUMBERS}d").pack
"""A row's numbers as the bytes of doubles, appended with ``array("d").frombytes``.

One C call packs the whole row, where ``array.extend`` would convert each number
through Python's general argument parser; the request path queues two rows per
request this way (its model call's, and the edge's)."""

_QUEUED_NUMBERS_LIMIT = ROW_NUMBERS * QUEUE_LIMIT  # once, not per request


def _take_rows(queue: array, width: int) -> np.ndarray | None:
    """The whole rows of ``width`` numbers at the front of ``queue``, removed from it (None: no whole row).

    A copy: the event loop may go on appending behind them, even between the
    numbers of one row, and those stay for the next flush.
    """
    taken = len(queue) - len(queue) % width
    if not taken:
        return None
    rows = np.frombuffer(queue[:taken], dtype=queue.typecode).reshape(-1, width)
    del queue[:taken]
    return rows
