"""The prediction log's local journal: every logged request is on the replica's disk before its answer leaves.

The prediction log (:mod:`monitoring.predlog`) writes its segments to the store
once per flush interval. Without a journal, a ``kill -9`` between two flushes
loses the rows the dead process had answered but not yet written. So
:meth:`Journal.write` appends each request's record to a file of the process's
own under ``<data_dir>/journal/`` with a single ``writev`` (no fsync: the page
cache outlives the process, which is the death this guards against, not the
machine's). Each flush seals the current file and opens the next
(:meth:`Journal.seal`); once the sealed rows are in the store the file is
removed.

A record is one JSON line, followed by the raw bytes of its payload when it
has one (the line's ``payload`` key says how many): the log's numeric matrix
goes as its bytes, not as text, because formatting its numbers as JSON is
most of what a record of many rows costs (``benchmarks/README.md``). Files
of the earlier format (``.jsonl``, JSON lines only) are still recovered.

A live process holds an exclusive ``flock`` on each of its files, and the
kernel releases it when the process dies, however it dies. A process that
starts on the same directory (the restarted container of a pod, whose
``emptyDir`` survives; the next worker BentoML spawns) takes over every file
it can lock (:func:`orphans`) and writes its rows to the store under the dead
writer's token, so the feedback join finds them where it would have.

Files are created under a temporary name, locked, then renamed into place, so
no other process ever sees a journal file that is not locked by its writer.
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

log = logging.getLogger("vigil.predlog")

JOURNAL_DIR = "journal"
SUFFIX = ".journal"
LEGACY_SUFFIX = ".jsonl"
"""Journals written before records carried a payload: JSON lines only, read by the same reader."""
PAYLOAD = "payload"
"""The key of a record's line that says how many payload bytes follow the line."""

Payload = bytes | memoryview | np.ndarray
"""What a record carries beside its line: anything with the buffer protocol (a C-contiguous array as is)."""
_OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_APPEND_NEWLINE


@dataclass(frozen=True)
class Writer:
    """Who wrote a journal file: the segment key's worker, pid and token."""

    worker: str
    pid: int
    token: str


@dataclass
class Sealed:
    """A journal file no longer written to, still locked by its holder until :meth:`done`."""

    path: Path
    fd: int

    def done(self) -> None:
        """Empty and remove the file (its rows are in the store, or counted as dropped) and release it.

        It is emptied first, so a file that cannot be removed is never recovered twice.
        """
        try:
            os.ftruncate(self.fd, 0)
        except OSError:
            pass  # opened read-only (a taken-over file): the unlink below is what matters
        try:
            self.path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("journal %s: not removed: %s", self.path.name, exc)
        finally:
            os.close(self.fd)

    def release(self) -> None:
        """Release the file and keep it, for a later try."""
        os.close(self.fd)


class Journal:
    """One process's journal: an open, locked file that each logged request is appended to."""

    def __init__(self, directory: Path, writer: Writer) -> None:
        self.directory = directory
        self.writer = writer
        self._generation = 0
        directory.mkdir(parents=True, exist_ok=True)
        self._path, self._fd = self._open()

    def _open(self) -> tuple[Path, int]:
        self._generation += 1
        w = self.writer
        path = self.directory / f"{w.worker}_{w.pid}_{w.token}_{self._generation:08d}{SUFFIX}"
        staging = path.with_suffix(".new")
        fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_TRUNC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file of our own: never held by anyone else
        os.rename(staging, path)
        return path, fd

    def write(self, line: dict[str, Any], payload: Payload | None = None) -> None:
        """Append one request's record: its line, then its payload's bytes (one ``writev``: a record is whole or,
        if the process dies in it, cut short). ``line`` must not use the key :data:`PAYLOAD`."""
        if payload is None:
            os.write(self._fd, orjson.dumps(line, option=_OPTIONS))
            return
        data = memoryview(payload).cast("B")
        header = orjson.dumps({**line, PAYLOAD: data.nbytes}, option=_OPTIONS)
        os.writev(self._fd, (header, data))

    def seal(self) -> Sealed:
        """Stop writing to the current file and start the next; the caller writes the sealed rows, then calls ``done``."""
        path, fd = self._open()  # first: if it fails, the current file stays current
        sealed = Sealed(self._path, self._fd)
        self._path, self._fd = path, fd
        return sealed

    def detach(self) -> Sealed:
        """The current file, sealed, with no next one: the journal is no longer written to."""
        return Sealed(self._path, self._fd)

    def close(self) -> None:
        """Remove the current file (called once everything buffered is written) and release it."""
        Sealed(self._path, self._fd).done()


def writer_of(path: Path) -> Writer | None:
    """The writer a journal file's name records, or None for a name that is not a journal's."""
    if path.suffix not in (SUFFIX, LEGACY_SUFFIX):
        return None
    parts = path.name.removesuffix(path.suffix).split("_")
    if len(parts) != 4 or not parts[1].isdigit():
        return None
    return Writer(parts[0], int(parts[1]), parts[2])


Record = tuple[dict[str, Any], memoryview | None]
"""A record as read back: its line (without the payload key) and its payload's bytes, or None."""


def orphans(directory: Path) -> Iterator[tuple[Writer, list[Record], Sealed]]:
    """Every journal file whose writer is dead, locked for the caller: its writer and its records.

    A file another live process holds is skipped, and so is a record cut short
    by its writer's death (logged).
    """
    if not directory.is_dir():
        return
    paths = [*directory.glob(f"*{SUFFIX}"), *directory.glob(f"*{LEGACY_SUFFIX}")]
    for path in sorted(paths):
        writer = writer_of(path)
        if writer is None:
            continue
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            continue  # taken over and removed by another process meanwhile
        except OSError as exc:
            log.warning("journal %s: cannot be opened: %s", path.name, exc)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue  # its writer is alive
        if not path.exists():  # removed by the process that held it before we got the lock
            os.close(fd)
            continue
        with os.fdopen(os.dup(fd), "rb") as fh:
            records = read_records(fh.read(), path.name)
        yield writer, records, Sealed(path, fd)


def read_records(data: bytes, name: str) -> list[Record]:
    """The records of a journal file's bytes, ``name`` its file's name for the log.

    A line that does not parse is skipped and the reading goes on at the next
    line; a payload shorter than its line says ends the file (a record is only
    cut short by its writer's death, so it is the last).
    """
    view = memoryview(data)
    records: list[Record] = []
    position, number = 0, 0
    while position < len(data):
        number += 1
        end = data.find(b"\n", position)
        if end < 0:
            end = len(data)
        try:
            line = orjson.loads(view[position:end])
        except orjson.JSONDecodeError as exc:
            log.warning("journal %s record %d skipped (cut short): %s", name, number, exc)
            position = end + 1
            continue
        position = end + 1
        size = line.pop(PAYLOAD, None) if isinstance(line, dict) else None
        if size is None:
            records.append((line, None))
            continue
        if not isinstance(size, int) or size < 0 or position + size > len(data):
            log.warning("journal %s record %d skipped (its payload is cut short)", name, number)
            break
        records.append((line, view[position:position + size]))
        position += size
    return records
