"""The prediction log's local journal: every logged request is on the replica's disk before its answer leaves.

The prediction log (:mod:`monitoring.predlog`) writes its segments to the store
once per flush interval. Without a journal, a ``kill -9`` between two flushes
loses the rows the dead process had answered but not yet written. So
:meth:`Journal.write` appends each request's record, as one JSON line, to a
file of the process's own under ``<data_dir>/journal/`` with a single
``write`` (no fsync: the page cache outlives the process, which is the death
this guards against, not the machine's). Each flush seals the current file and
opens the next (:meth:`Journal.seal`); once the sealed rows are in the store
the file is removed.

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

import orjson

log = logging.getLogger("vigil.predlog")

JOURNAL_DIR = "journal"
SUFFIX = ".jsonl"


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

    def write(self, line: dict[str, Any]) -> None:
        """Append one request's record (one ``write``: a line is whole or, if the process dies in it, cut short)."""
        os.write(self._fd, orjson.dumps(line, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_APPEND_NEWLINE))

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
    parts = path.name.removesuffix(SUFFIX).split("_")
    if len(parts) != 4 or not parts[1].isdigit():
        return None
    return Writer(parts[0], int(parts[1]), parts[2])


def orphans(directory: Path) -> Iterator[tuple[Writer, list[dict[str, Any]], Sealed]]:
    """Every journal file whose writer is dead, locked for the caller: its writer and its records.

    A file another live process holds is skipped, and so is a line cut short by
    its writer's death (logged).
    """
    if not directory.is_dir():
        return
    for path in sorted(directory.glob(f"*{SUFFIX}")):
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
        records: list[dict[str, Any]] = []
        with os.fdopen(os.dup(fd), "rb") as fh:
            for number, line in enumerate(fh, 1):
                try:
                    records.append(orjson.loads(line))
                except orjson.JSONDecodeError as exc:
                    log.warning("journal %s line %d skipped (cut short): %s", path.name, number, exc)
        yield writer, records, Sealed(path, fd)
