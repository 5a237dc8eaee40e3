"""The store's guarantees, on a local directory and on a real S3-API server alike."""

from __future__ import annotations

import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from monitoring.store import LocalStore, Store, command_store, open_store
from service.core.requestid import RequestIds, new_token, parse_request_id

pytestmark = pytest.mark.integration


def test_put_get_list_children_delete(store: Store) -> None:
    store.put("a/x=1/part-100-t.bin", b"one")
    store.put("a/x=1/part-200-t.bin", b"two")
    store.put("a/x=2/deep/part-100-u.bin", b"three")
    store.put("b.json", b"{}")
    assert store.get("a/x=1/part-200-t.bin") == b"two"
    assert store.list("a/x=1/part-1") == ["a/x=1/part-100-t.bin"]
    assert store.list("a/") == ["a/x=1/part-100-t.bin", "a/x=1/part-200-t.bin", "a/x=2/deep/part-100-u.bin"]
    assert store.list("a/x=") == store.list("a/")
    assert store.children("a") == ["x=1", "x=2"]
    assert "b.json" in store.children("")
    assert store.list("nothing/here/") == [] and store.children("nothing") == []
    with pytest.raises(FileNotFoundError):
        store.get("a/missing")
    store.delete(["a/x=1/part-100-t.bin", "a/never-was"])
    assert store.list("a/x=1/") == ["a/x=1/part-200-t.bin"]
    store.delete_tree("a/x=2")
    assert store.list("a/") == ["a/x=1/part-200-t.bin"]


def test_exclusive_put_never_replaces_a_value(store: Store) -> None:
    assert store.put("k/segment.parquet", b"first", exclusive=True)
    assert not store.put("k/segment.parquet", b"second", exclusive=True)
    assert store.get("k/segment.parquet") == b"first"
    assert store.put("k/segment.parquet", b"third")  # a plain put replaces
    assert store.get("k/segment.parquet") == b"third"


def test_stamp_changes_with_the_value(store: Store) -> None:
    assert store.stamp("state.json") is None
    store.put("state.json", b"1")
    first = store.stamp("state.json")
    store.put("state.json", b"22")
    assert first is not None and store.stamp("state.json") not in (None, first)


def test_update_is_a_compare_and_swap_under_concurrent_writers(store: Store) -> None:
    """Eight writers add 10 each to one counter: no increment is lost."""
    errors: list[BaseException] = []

    def add() -> None:
        try:
            for _ in range(10):
                store.update("counter", lambda current: str(int(current or b"0") + 1).encode())
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            errors.append(exc)

    threads = [threading.Thread(target=add) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert store.get("counter") == b"80"
    assert store.update("counter", lambda current: None) == b"80"  # None: leave it as it is


def test_readers_never_see_temporary_files(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    (tmp_path / "predlog").mkdir()
    (tmp_path / "predlog" / ".part-1.parquet.123.tmp").write_bytes(b"half a file")
    store.put("predlog/part-2.parquet", b"whole")
    assert store.list("predlog/") == ["predlog/part-2.parquet"]
    assert store.children("predlog") == ["part-2.parquet"]


def test_parquet_reads_and_local_copy(store: Store) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"a": [1, 2, 3], "b": ["x", "y", "z"]}), sink)
    store.put("t/one.parquet", sink.getvalue().to_pybytes())
    assert store.read_table("t/one.parquet", columns=["b"]).column("b").to_pylist() == ["x", "y", "z"]
    with store.local_copy(["t/one.parquet"]) as local:
        path = local.local_path("t/one.parquet")
        assert path is not None and pq.read_table(path).num_rows == 3
        assert local.list("t/") == ["t/one.parquet"]


def test_open_store_names_each_backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(open_store(None, tmp_path), LocalStore)
    assert open_store(str(tmp_path / "shared")).url == str((tmp_path / "shared").resolve())
    assert open_store(f"file://{tmp_path}/x").url == str((tmp_path / "x").resolve())
    with pytest.raises(ValueError, match="s3://bucket"):
        open_store("gs://bucket/prefix")
    monkeypatch.delenv("VIGIL_STORE", raising=False)
    monkeypatch.setenv("VIGIL_DATA_DIR", str(tmp_path / "var"))
    assert command_store().url == str((tmp_path / "var").resolve())  # the local default, unchanged
    assert command_store(tmp_path / "given").url == str((tmp_path / "given").resolve())


def test_request_ids_carry_the_worker_and_the_serving_time() -> None:
    import time

    ids = RequestIds(new_token())
    before = time.time()
    first, second = ids.next(), ids.next()
    parsed = parse_request_id(first)
    assert parsed is not None and parsed.token == ids.token and parsed.counter == 0
    assert before - 0.01 <= parsed.seconds <= time.time() + 0.01
    assert parse_request_id(second).counter == 1  # type: ignore[union-attr]
    assert first != second and len(first) <= 64
    for bad in ("", "xyz", "G" * 32, "abc-" * 8, "a" * 20):
        assert parse_request_id(bad) is None
