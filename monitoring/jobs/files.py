"""Where the batch jobs (drift, quality) keep their results, and how they write them safely.

Each job writes ``<job>/<model>/<version>/<UTC timestamp>/`` (the report and
``result.json``) in the store (:mod:`monitoring.store`: ``$VIGIL_DATA_DIR`` or
``s3://...``) and keeps ``<job>/<model>/<version>/latest.json`` current. Every
write is atomic, so a reader (every worker of every replica polls
``latest.json``) never sees half a file. :class:`TooFewRows` is what both jobs
raise when a window is too thin for a verdict. The service reads
``latest.json`` through :mod:`monitoring.verdicts`.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from pydantic import BaseModel

from monitoring.store import Store
from monitoring.verdicts import latest_key
from service.core.files import atomic_write


class TooFewRows(Exception):
    """A batch job's window holds fewer rows than it needs for a verdict (the CLI exits 4).

    Mixed into each job's own error class, so callers can catch either. ``outside``
    says how many rows of the log lie before and after the window, so a window
    that ends too early (rows still on their way) shows as such.
    """

    def __init__(self, model: str, version: str, rows: int, min_rows: int, since: datetime | None,
                 until: datetime, what: str, verdict: str, detail: str = "",
                 outside: tuple[int, int] | None = None) -> None:
        window = f"{since.isoformat() if since else 'the start of the log'} to {until.isoformat()}"
        where = ""
        if outside is not None:
            before, after = outside
            where = (f"; {before + after} logged row(s) of {model}:{version} fall outside the window "
                     f"({before} before it, {after} after its end")
            where += ": a later --until includes rows logged since)" if after else ")"
        super().__init__(f"{model}:{version} has {rows} {what} from {window}{detail}; "
                         f"at least {min_rows} are needed for a {verdict} verdict{where}")
        self.model = model
        self.version = version
        self.rows = rows
        self.min_rows = min_rows
        self.since = since
        self.until = until
        self.outside = outside



class RunOutput:
    """Where one run of a job writes its files: ``out`` on this host, else a new run directory in the store.

    The run directory is ``<job>/<model>/<version>/<UTC timestamp>`` (suffixed when
    another run took it: the first file is written exclusively).
    """

    def __init__(self, store: Store, job: str, model: str, version: str, created_at: datetime,
                 out: Path | None) -> None:
        self.store = store
        self.out = Path(out) if out is not None else None
        self.base = f"{job}/{model}/{version}"
        self.latest = latest_key(job, model, version)
        self.stamp = created_at.strftime("%Y%m%dT%H%M%SZ")
        self.prefix: str | None = None

    def write(self, name: str, data: bytes) -> str:
        """Write one file of the run atomically; returns where it is (a path, or the store's URL of it)."""
        if self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write(self.out / name, lambda tmp: tmp.write_bytes(data))
            return str((self.out / name).resolve())
        if self.prefix is None:
            for attempt in range(1, 1000):
                prefix = f"{self.base}/{self.stamp if attempt == 1 else f'{self.stamp}-{attempt}'}"
                if not self.store.list(f"{prefix}/") and self.store.put(f"{prefix}/{name}", data, exclusive=True):
                    self.prefix = prefix
                    return self.store.url_of(f"{prefix}/{name}")
            raise OSError(f"cannot create a run directory under {self.store.url_of(self.base)}: {self.stamp} and "
                          "998 suffixes are taken")
        self.store.put(f"{self.prefix}/{name}", data)
        return self.store.url_of(f"{self.prefix}/{name}")

    def write_with(self, name: str, save: Callable[[Path], None]) -> str:
        """:meth:`write` for a file that a library saves to a path (Evidently's report)."""
        with tempfile.TemporaryDirectory(prefix="vigil-run-") as directory:
            path = Path(directory) / name
            save(path)
            return self.write(name, path.read_bytes())

    def publish(self, result: BaseModel, started: float, name: str = "result.json") -> str:
        """Stamp the run's duration (since ``started``, a ``perf_counter``), write the result as ``name`` of the
        run and as the version's ``latest.json`` (what every worker polls); returns the result's JSON."""
        result.duration_seconds = round(time.perf_counter() - started, 3)  # type: ignore[attr-defined]
        text = result.model_dump_json(indent=2)
        self.write(name, text.encode())
        self.store.put(self.latest, text.encode())
        self.store.note_change()
        return text

    def urls(self, **names: str) -> dict[str, str]:
        """:meth:`url` of each named file, by the result field that holds it (``report_html="report.html"``)."""
        return {field: self.url(name) for field, name in names.items()}

    def url(self, name: str) -> str:
        """Where ``name`` of this run will be, before it is written (needs the run directory: write a file first)."""
        if self.out is not None:
            return str((self.out / name).resolve())
        assert self.prefix is not None, "write a file of the run first"
        return self.store.url_of(f"{self.prefix}/{name}")
