"""The prediction log's journal: a killed writer's accepted rows are written by the next process, once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from monitoring.journal import JOURNAL_DIR, LEGACY_SUFFIX, SUFFIX, Journal, Writer, orphans
from monitoring.predlog import LoggedRequest, PredictionLog, read_log, segment_keys
from monitoring.store import LocalStore
from service.core.card import ModelCard
from tests.unit.test_predlog import card, request

ROOT = Path(__file__).resolve().parents[2]


def cards_of(c: ModelCard) -> Callable[[str, str], ModelCard]:
    """The ``card_for`` the worker passes, knowing only ``c``."""

    def card_for(model: str, version: str) -> ModelCard:
        if (model, version) != (c.name, c.version):
            raise KeyError(f"no card {model}:{version}")
        return c
    return card_for


def killed_writer(store: Path, journal: Path, rows: int, flush_every: int) -> tuple[list[str], str]:
    """A writer appending one request at a time, flushing every ``flush_every``, SIGKILLed at once after
    its ``rows``-th acknowledged append: the ids it acknowledged and its token."""
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from pathlib import Path
        from tests.unit.test_predlog import card, request
        from monitoring.predlog import PredictionLog
        log = PredictionLog(Path({str(store)!r}), worker="3", journal_dir=Path({str(journal)!r}))
        print(log.token, flush=True)
        c = card()
        for i in range({rows}):
            log.append(request(c, f"r{{i}}", 2))
            print(f"r{{i}}", flush=True)  # the answer leaves only after append returns
            if (i + 1) % {flush_every} == 0:
                log.flush()
        sys.stdin.readline()  # wait to be killed
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    try:
        token = proc.stdout.readline().strip()
        accepted = [proc.stdout.readline().strip() for _ in range(rows)]
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    return accepted, token


def test_a_killed_writers_accepted_rows_are_written_by_the_next_process_under_its_token(tmp_path: Path) -> None:
    store, journal = tmp_path / "store", tmp_path / JOURNAL_DIR
    accepted, token = killed_writer(store, journal, rows=25, flush_every=10)
    before = read_log(store, "churn") if segment_keys(store, "churn") else None
    assert before is not None and len(before) == 40  # two flushes made it; the last 5 requests did not

    successor = PredictionLog(store, worker="1", journal_dir=journal)
    c = card()
    assert successor.recover(cards_of(c)) == 10
    frame = read_log(store, "churn")
    assert sorted(set(frame["request_id"])) == sorted(accepted)
    assert not frame.duplicated(["request_id", "index"]).any()
    late = frame[frame["request_id"].isin({f"r{i}" for i in range(20, 25)})].sort_values(["request_id", "index"])
    assert late["age"].tolist() == [30.0, 31.0] * 5 and late["email"].tolist()[:2] == ["user0@example.org",
                                                                                     "user1@example.org"]
    # Written under the dead writer's token and worker, where the feedback join looks for them.
    assert {key.rsplit("/", 1)[1].split("-")[-2] for key in segment_keys(store, "churn")} == {token}
    assert all("-w3-" in key for key in segment_keys(store, "churn"))
    assert successor.recover(cards_of(c)) == 0  # taken over once
    successor.close()
    assert list(journal.iterdir()) == []


def test_a_live_writers_journal_is_never_taken_over(tmp_path: Path) -> None:
    c = card()
    live = PredictionLog(tmp_path, worker="1", journal_dir=tmp_path / JOURNAL_DIR)
    live.append(request(c, "live", 3))
    other = PredictionLog(tmp_path, worker="2", journal_dir=tmp_path / JOURNAL_DIR)
    assert other.recover(cards_of(c)) == 0
    assert live.flush() == 3
    assert other.recover(cards_of(c)) == 0
    assert read_log(tmp_path, "churn")["request_id"].tolist() == ["live"] * 3
    live.close()
    other.close()
    assert list((tmp_path / JOURNAL_DIR).iterdir()) == []


def test_a_flush_removes_what_it_wrote_from_the_journal(tmp_path: Path) -> None:
    c = card()
    log = PredictionLog(tmp_path, worker="1", journal_dir=tmp_path / JOURNAL_DIR)
    for i in range(3):
        log.append(request(c, f"r{i}", 2))
    files = list((tmp_path / JOURNAL_DIR).glob(f"*{SUFFIX}"))
    assert len(files) == 1 and len(files[0].read_bytes().splitlines()) == 3
    log.flush()
    files = list((tmp_path / JOURNAL_DIR).glob(f"*{SUFFIX}"))
    assert len(files) == 1 and files[0].read_bytes() == b""  # the next file, empty
    log.close()


def test_a_line_cut_short_by_the_writers_death_is_skipped_and_the_rest_recovered(tmp_path: Path) -> None:
    c = card()
    directory = tmp_path / JOURNAL_DIR
    journal = Journal(directory, Writer("1", 4242, "deadbeef0000"))
    journal.write(*request(c, "whole", 2).journal_record())
    os.write(journal._fd, b'{"t": 1.0, "id": "cut')  # a write the kernel saw only part of
    os.close(journal._fd)  # the writer dies: its lock goes with it
    found = list(orphans(directory))
    assert len(found) == 1
    writer, lines, sealed = found[0]
    assert writer == Writer("1", 4242, "deadbeef0000")
    assert [line["id"] for line, _ in lines] == ["whole"]
    sealed.done()
    assert list(directory.iterdir()) == []


def test_the_numeric_matrix_and_its_nulls_come_back_as_written(tmp_path: Path) -> None:
    c = card()
    directory = tmp_path / JOURNAL_DIR
    journal = Journal(directory, Writer("1", 7, "cafe00000000"))
    matrix = np.array([[1.5, np.nan, 3.0], [4.0, 5.0, 6.25]])
    journal.write(*LoggedRequest(time=1.0, request_id="m", card=c, variant="canary", instances=None,
                                prediction=[1, 0], score=None, reasons=["missing_input", None],
                                matrix=matrix).journal_record())
    os.close(journal._fd)  # the writer dies
    [(_, [(line, payload)], sealed)] = list(orphans(directory))
    record = LoggedRequest.from_journal(line, payload, {}, cards_of(c))
    assert record.matrix is not None
    np.testing.assert_array_equal(record.matrix, matrix)
    assert (record.variant, record.prediction, record.reasons, record.instances) == (
        "canary", [1, 0], ["missing_input", None], None)
    sealed.done()


def matrix_request(request_id: str, matrix: np.ndarray) -> LoggedRequest:
    return LoggedRequest(time=1.0, request_id=request_id, card=card(), variant="stable", instances=None,
                         prediction=[0] * len(matrix), score=None, reasons=None, matrix=matrix)


def test_payload_bytes_that_look_like_line_breaks_do_not_split_a_record(tmp_path: Path) -> None:
    directory = tmp_path / JOURNAL_DIR
    journal = Journal(directory, Writer("1", 7, "cafe00000000"))
    breaks = np.frombuffer(b"\n" * 16, dtype="<f8").reshape(1, 2)  # each value's 8 bytes are all line breaks
    first = np.hstack([breaks, [[2.0]]])
    second = np.array([[7.0, np.nan, -1e300], [0.0, 1.0, 2.0]])
    journal.write(*matrix_request("a", first).journal_record())
    journal.write(*matrix_request("b", second).journal_record())
    os.close(journal._fd)
    [(_, records, sealed)] = list(orphans(directory))
    back = [LoggedRequest.from_journal(line, payload, {}, cards_of(card())) for line, payload in records]
    assert [r.request_id for r in back] == ["a", "b"]
    np.testing.assert_array_equal(back[0].matrix, first)
    np.testing.assert_array_equal(back[1].matrix, second)
    sealed.done()


def test_a_payload_cut_short_by_the_writers_death_is_skipped_and_the_records_before_it_recovered(
        tmp_path: Path) -> None:
    directory = tmp_path / JOURNAL_DIR
    journal = Journal(directory, Writer("1", 7, "cafe00000000"))
    journal.write(*matrix_request("whole", np.ones((2, 3))).journal_record())
    os.write(journal._fd, b'{"t": 1.0, "id": "cut", "matrix": [2, 3], "payload": 48}\n' + bytes(20))
    os.close(journal._fd)
    [(_, records, sealed)] = list(orphans(directory))
    assert [line["id"] for line, _ in records] == ["whole"]
    sealed.done()


def test_a_journal_of_the_earlier_json_lines_format_is_still_recovered(tmp_path: Path) -> None:
    directory = tmp_path / JOURNAL_DIR
    directory.mkdir()
    line = (b'{"t": 1.0, "id": "old", "model": "churn", "version": "2", "variant": "stable", "instances": null, '
            b'"prediction": [1, 0], "score": null, "reasons": null, "matrix": [[1.5, null, 3.0], [4.0, 5.0, 6.0]]}\n')
    (directory / f"1_4242_deadbeef0000_00000001{LEGACY_SUFFIX}").write_bytes(line)
    [(writer, [(stored, payload)], sealed)] = list(orphans(directory))
    assert writer == Writer("1", 4242, "deadbeef0000") and payload is None
    record = LoggedRequest.from_journal(stored, payload, {}, cards_of(card()))
    np.testing.assert_array_equal(record.matrix, [[1.5, np.nan, 3.0], [4.0, 5.0, 6.0]])
    sealed.done()
    assert list(directory.iterdir()) == []


class FailingStore(LocalStore):
    """A store that is down until told otherwise."""

    down = True

    def put(self, key: str, data: bytes, exclusive: bool = False, durable: bool = False) -> bool:
        if self.down:
            raise OSError("store unreachable")
        return super().put(key, data, exclusive=exclusive, durable=durable)


def test_a_journal_whose_rows_cannot_be_written_now_is_kept_for_the_next_try(tmp_path: Path) -> None:
    accepted, _ = killed_writer(tmp_path / "store", tmp_path / JOURNAL_DIR, rows=4, flush_every=100)
    store = FailingStore(tmp_path / "store")
    successor = PredictionLog(store, worker="1", journal_dir=tmp_path / JOURNAL_DIR)
    assert successor.recover(cards_of(card())) == 0
    assert len(list((tmp_path / JOURNAL_DIR).glob(f"*{SUFFIX}"))) == 2  # the dead one's, and the successor's own
    store.down = False
    assert successor.recover(cards_of(card())) == 8
    assert sorted(set(read_log(store, "churn")["request_id"])) == sorted(accepted)


def test_a_row_for_a_version_gone_from_the_registry_is_skipped_not_fatal(tmp_path: Path) -> None:
    killed_writer(tmp_path, tmp_path / JOURNAL_DIR, rows=2, flush_every=100)
    successor = PredictionLog(tmp_path, worker="1", journal_dir=tmp_path / JOURNAL_DIR)

    def no_cards(model: str, version: str) -> ModelCard:
        raise KeyError(f"no card {model}:{version}")

    assert successor.recover(no_cards) == 0
    assert [p for p in (tmp_path / JOURNAL_DIR).glob(f"*{SUFFIX}") if successor.token not in p.name] == []


@pytest.mark.parametrize("name", ["notes.txt", "a_b.jsonl", "1_x_tok_00000001.jsonl", "a_b.journal",
                                  "1_x_tok_00000001.journal"])
def test_files_that_are_not_journals_are_left_alone(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_text("x")
    assert list(orphans(tmp_path)) == []
    assert (tmp_path / name).exists()


def test_a_journal_directory_that_cannot_be_made_leaves_the_log_running_without_it(tmp_path: Path) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    log = PredictionLog(tmp_path / "store", worker="1", journal_dir=blocked / JOURNAL_DIR)
    c = card()
    assert log.append(request(c, "r0", 2))
    assert log.flush() == 2 and len(read_log(tmp_path / "store", "churn")) == 2


def test_when_no_next_journal_file_can_be_opened_the_flush_still_writes_and_the_journal_stops(
        tmp_path: Path) -> None:
    journal = tmp_path / JOURNAL_DIR
    log = PredictionLog(tmp_path / "store", worker="1", journal_dir=journal)
    c = card()
    log.append(request(c, "r0", 2))
    journal.chmod(0o500)  # no new file can be created there (root ignores modes: replace the directory instead)
    if os.access(journal, os.W_OK):
        journal.chmod(0o700)
        for f in journal.iterdir():
            f.rename(tmp_path / f.name)
        journal.rmdir()
        journal.write_text("gone")
    try:
        assert log.flush() == 2
        assert log.append(request(c, "r1", 2)) and log.flush() == 2
    finally:
        if journal.is_dir():
            journal.chmod(0o700)
    assert sorted(set(read_log(tmp_path / "store", "churn")["request_id"])) == ["r0", "r1"]
