"""Where what outlives a worker lives: a local directory (the default) or object storage through the S3 API.

The prediction log, feedback, the jobs' verdicts and the deploy/rollback state
are all kept under one :class:`Store`, addressed by keys such as
``predlog/model=cancer/date=2024-05-01/hour=13/part-....parquet``. Every
replica of a fleet that points at the same store sees the same keys::

    store = open_store("s3://bucket/vigil")     # or a directory; open_store(None, "var") is ./var
    store.put("drift/cancer/1/latest.json", text.encode())
    store.get("drift/cancer/1/latest.json")

What every backend guarantees:

- **Atomic writes.** A key holds a complete value or nothing: the local
  directory writes under a dot-prefixed temporary name and renames it into
  place (readers skip dot names), object storage takes one PUT of the whole
  value. ``put(..., exclusive=True)`` creates a key only if it does not exist
  (``link`` locally, a conditional PUT with ``If-None-Match`` on S3), so two
  writers that pick the same key never replace each other's value.
- **Compare-and-swap.** :meth:`Store.update` applies a change to a small value
  as one atomic step against concurrent writers (a lock file locally, a PUT
  conditional on the object's ETag on S3).
- **Listing by prefix.** :meth:`Store.list` returns the keys that start with a
  prefix; on S3 the server filters, so a prefix narrows the work.

A shared filesystem (an RWX volume) is a local directory that several hosts
mount: ``link``, ``rename`` and ``flock`` are atomic on it too.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shutil
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from service.core.settings import Settings

CHANGES_KEY = "changes.json"
"""Rewritten by every writer of state that workers poll (verdicts, rollbacks): one key to poll on object storage."""
UPDATE_ATTEMPTS = 50
"""Compare-and-swap attempts of :meth:`Store.update` before it gives up (each loses only to another writer)."""


class StoreConflict(OSError):
    """:meth:`Store.update` lost to other writers every time it tried."""


class Store(ABC):
    """One place for what must outlive a worker, shared by every worker (and replica) that opens it."""

    url: str
    """Where the store is, for messages: a directory or ``s3://bucket/prefix``."""
    cheap_stamps = False
    """Whether :meth:`stamp` costs next to nothing (a stat), so pollers may stamp every key they watch."""

    @abstractmethod
    def put(self, key: str, data: bytes, exclusive: bool = False, durable: bool = False) -> bool:
        """Write ``data`` under ``key`` atomically; with ``exclusive``, only if the key does not exist.

        Returns False when ``exclusive`` found the key taken (nothing written).
        ``durable`` also syncs a local file to disk before it appears (object
        storage is durable once the PUT returns).
        """

    @abstractmethod
    def get(self, key: str) -> bytes:
        """The value of ``key``; FileNotFoundError when there is none."""

    @abstractmethod
    def stamp(self, key: str) -> tuple[Any, ...] | None:
        """Something that changes whenever ``key`` changes (None when it does not exist): cheap to poll."""

    @abstractmethod
    def list(self, prefix: str) -> list[str]:
        """Every key that starts with ``prefix`` (a partial last segment narrows it), sorted."""

    @abstractmethod
    def children(self, prefix: str) -> list[str]:
        """Names directly under the ``prefix`` directory (its sub-directories and keys), sorted."""

    @abstractmethod
    def delete(self, keys: list[str]) -> None:
        """Remove ``keys``; missing keys are ignored."""

    def delete_tree(self, prefix: str) -> None:
        """Remove every key under the ``prefix`` directory."""
        self.delete(self.list(prefix.rstrip("/") + "/"))

    @abstractmethod
    def update(self, key: str, change: Callable[[bytes | None], bytes | None], durable: bool = False) -> bytes | None:
        """Replace the value of ``key`` by ``change(current)`` atomically (None from ``change``: leave it).

        ``change`` may be called more than once, with the newest value each
        time, when another writer got in first. Returns the value that stands.
        ``durable`` as for :meth:`put`.
        """

    def read_table(self, key: str, columns: list[str] | None = None, filters: Any = None) -> Any:
        """One Parquet file of the store as a pyarrow Table (only ``columns``, rows passing ``filters``)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        return pq.read_table(pa.BufferReader(self.get(key)), columns=columns, filters=filters)

    def local_path(self, key: str) -> Path | None:
        """The file holding ``key`` when the store is a directory on this host, else None."""
        return None

    @contextlib.contextmanager
    def local_copy(self, keys: list[str]) -> Iterator[Store]:
        """A store on this host holding ``keys`` as they are now: the store itself when it is local.

        The batch jobs read a window many times, a few columns at a time; from object
        storage they download its files once, in parallel, into a temporary directory.
        """
        yield self

    def url_of(self, key: str) -> str:
        """Where ``key`` is, for a person or another tool."""
        return f"{self.url.rstrip('/')}/{key}"

    def note_change(self) -> None:
        """Tell the workers polling this store that something they watch changed (:data:`CHANGES_KEY`).

        Each stamp of object storage is a request (~1 ms of a worker's CPU in botocore); polling one key
        instead of every verdict and the rollback state keeps an idle worker's cost of S3 near a local disk's.
        """
        self.put(CHANGES_KEY, json.dumps({"at": time.time(), "by": secrets.token_hex(4)}).encode())


class LocalStore(Store):
    """A directory: the embedded default (``VIGIL_DATA_DIR``), or a shared volume mounted by every replica."""

    cheap_stamps = True

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.url = str(self.root.resolve())

    def _path(self, key: str) -> Path:
        return self.root / key

    def local_path(self, key: str) -> Path | None:
        return self._path(key)

    def url_of(self, key: str) -> str:
        return str(self._path(key).resolve())

    def put(self, key: str, data: bytes, exclusive: bool = False, durable: bool = False) -> bool:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        # A random part keeps two threads (or hosts on a shared volume) from sharing a temporary file.
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                if durable:
                    fh.flush()
                    os.fsync(fh.fileno())
            if exclusive:
                try:
                    os.link(tmp, path)  # fails when the name exists: never replaces another writer's file
                except FileExistsError:
                    return False
            else:
                os.replace(tmp, path)
            if durable:
                _sync_directory(path.parent)
            return True
        finally:
            tmp.unlink(missing_ok=True)

    def get(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def stamp(self, key: str) -> tuple[Any, ...] | None:
        try:
            st = self._path(key).stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def list(self, prefix: str) -> list[str]:
        directory, _, start = prefix.rpartition("/")
        base = self._path(directory) if directory else self.root
        keys: list[str] = []
        try:
            entries = list(os.scandir(base))
        except (FileNotFoundError, NotADirectoryError):
            return keys
        lead = f"{directory}/" if directory else ""
        for entry in entries:
            if entry.name.startswith(".") or not entry.name.startswith(start):
                continue
            if entry.is_dir(follow_symlinks=False):
                keys.extend(self.list(f"{lead}{entry.name}/"))
            else:
                keys.append(f"{lead}{entry.name}")
        return sorted(keys)

    def children(self, prefix: str) -> list[str]:
        base = self._path(prefix.strip("/")) if prefix.strip("/") else self.root
        try:
            return sorted(name for name in os.listdir(base) if not name.startswith("."))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def delete(self, keys: list[str]) -> None:
        for key in keys:
            self._path(key).unlink(missing_ok=True)

    def delete_tree(self, prefix: str) -> None:
        shutil.rmtree(self._path(prefix.strip("/")), ignore_errors=True)

    def update(self, key: str, change: Callable[[bytes | None], bytes | None], durable: bool = False) -> bytes | None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        # One lock file per directory: flock is atomic across processes and, on NFSv4, across hosts.
        with open(path.parent / ".lock", "a+b") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                current = path.read_bytes() if path.exists() else None
                new = change(current)
                if new is None or new == current:
                    return current
                self.put(key, new, durable=durable)
                return new
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def read_table(self, key: str, columns: list[str] | None = None, filters: Any = None) -> Any:
        import pyarrow.parquet as pq

        return pq.read_table(self._path(key), columns=columns, filters=filters)


class S3Store(Store):
    """Object storage through the S3 API (s3fs): ``s3://bucket/prefix``, shared by every replica.

    Credentials and region come from the usual AWS variables (or an instance
    role); ``endpoint_url`` points at an S3-compatible server (MinIO, Ceph,
    moto). Listings are never cached: every replica must see the others' new keys.
    """

    def __init__(self, url: str, endpoint_url: str | None = None) -> None:
        import s3fs

        self.url = url.rstrip("/")
        self.base = self.url.removeprefix("s3://").strip("/")
        if not self.base:
            raise ValueError(f"an S3 store needs a bucket: s3://bucket[/prefix], got {url!r}")
        self.bucket = self.base.split("/", 1)[0]
        self.fs = s3fs.S3FileSystem(
            endpoint_url=endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None,
            use_listings_cache=False, skip_instance_cache=True)

    def _path(self, key: str) -> str:
        return f"{self.base}/{key}" if key else self.base

    def _key(self, path: str) -> str:
        return path[len(self.base) + 1:]

    def put(self, key: str, data: bytes, exclusive: bool = False, durable: bool = False) -> bool:
        try:
            self.fs.pipe_file(self._path(key), data, mode="create" if exclusive else "overwrite")
        except FileExistsError:
            return False
        return True

    def get(self, key: str) -> bytes:
        return bytes(self.fs.cat_file(self._path(key)))

    def stamp(self, key: str) -> tuple[Any, ...] | None:
        try:
            info = self.fs.info(self._path(key))
        except FileNotFoundError:
            return None
        return info.get("ETag"), info.get("size")

    def list(self, prefix: str) -> list[str]:
        directory, _, start = prefix.rpartition("/")
        try:
            found = self.fs.find(self._path(directory), prefix=start)
        except FileNotFoundError:
            return []
        keys = (self._key(path) for path in found)
        return sorted(k for k in keys if k.startswith(prefix) and not k.rpartition("/")[2].startswith("."))

    def children(self, prefix: str) -> list[str]:
        try:
            found = self.fs.ls(self._path(prefix.strip("/")), detail=False)
        except FileNotFoundError:
            return []
        return sorted(path.rstrip("/").rpartition("/")[2] for path in found)

    def delete(self, keys: list[str]) -> None:
        if keys:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm([self._path(key) for key in keys])

    def update(self, key: str, change: Callable[[bytes | None], bytes | None], durable: bool = False) -> bytes | None:
        from fsspec.asyn import sync

        bucket, object_key, _ = self.fs.split_path(self._path(key))
        for _ in range(UPDATE_ATTEMPTS):
            current, etag = sync(self.fs.loop, self._get_with_etag, bucket, object_key)
            new = change(current)
            if new is None or new == current:
                return current
            condition = {"IfMatch": etag} if etag is not None else {"IfNoneMatch": "*"}
            try:
                self.fs.call_s3("put_object", Bucket=bucket, Key=object_key, Body=new, **condition)
            except (FileExistsError, OSError) as exc:
                if isinstance(exc, FileExistsError) or getattr(exc, "errno", None) == 22:  # 412: another writer won
                    continue
                raise
            return new
        raise StoreConflict(f"{self.url_of(key)}: {UPDATE_ATTEMPTS} concurrent writers won in a row")

    async def _get_with_etag(self, bucket: str, key: str) -> tuple[bytes | None, str | None]:
        try:
            response = await self.fs._call_s3("get_object", Bucket=bucket, Key=key)
        except FileNotFoundError:
            return None, None
        body = await response["Body"].read()
        return body, response["ETag"]

    @contextlib.contextmanager
    def local_copy(self, keys: list[str]) -> Iterator[Store]:
        directory = Path(tempfile.mkdtemp(prefix="vigil-store-"))
        try:
            if keys:
                targets = [str(directory / key) for key in keys]
                for target in targets:
                    Path(target).parent.mkdir(parents=True, exist_ok=True)
                self.fs.get([self._path(key) for key in keys], targets)
            yield LocalStore(directory)
        finally:
            shutil.rmtree(directory, ignore_errors=True)


def _sync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_store(spec: str | os.PathLike[str] | None, data_dir: Path | str = "var",
               endpoint_url: str | None = None) -> Store:
    """The store named by ``spec`` (``VIGIL_STORE``): ``s3://bucket/prefix``, a directory, else ``data_dir``."""
    if spec is None or str(spec) == "":
        return LocalStore(data_dir)
    text = str(spec)
    if text.startswith("s3://"):
        return S3Store(text, endpoint_url)
    if "://" in text and not text.startswith("file://"):
        raise ValueError(f"VIGIL_STORE must be s3://bucket/prefix or a directory, got {text!r}")
    return LocalStore(text.removeprefix("file://"))


def settings_store(settings: Settings) -> Store:
    """The store the service's settings name: ``VIGIL_STORE``, else ``VIGIL_DATA_DIR``."""
    return open_store(settings.store, settings.data_dir, settings.store_endpoint_url)


def command_store(data_dir: Path | None = None, store: str | None = None) -> Store:
    """The store of a ``vigil`` command: ``--store``, else ``--data-dir``, else ``VIGIL_STORE``, else
    ``VIGIL_DATA_DIR``, else ``./var`` (what ``vigil serve`` uses with the same environment)."""
    if store:
        return open_store(store, data_dir or "var", os.environ.get("VIGIL_STORE_ENDPOINT_URL"))
    if data_dir is not None:
        return LocalStore(data_dir)
    return open_store(os.environ.get("VIGIL_STORE"), os.environ.get("VIGIL_DATA_DIR") or "var",
                      os.environ.get("VIGIL_STORE_ENDPOINT_URL"))


def as_store(where: Store | Path | str) -> Store:
    """``where`` itself when it is a store, else the local directory it names."""
    return where if isinstance(where, Store) else LocalStore(where)
