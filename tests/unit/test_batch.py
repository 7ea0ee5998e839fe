"""Group commit on SQLite: the writes of one loop turn commit in one transaction, what
waits on them runs after it in order, a failed group undoes only itself, and a failed
commit stops everything that waited on it."""

import asyncio
import contextlib
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from capd.store import OwedReport, SqliteStore, StoredEvent
from capd.store.batch import BatchBroken, StoreFailed, after_writes


def _events(first: int, count: int) -> list[StoredEvent]:
    return [(seq, 1.0, "status", b'{"seq":%d}' % seq) for seq in range(first, first + count)]


def _count(db: sqlite3.Connection, table: str = "events") -> int:
    return db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]


async def test_the_writes_of_one_turn_commit_once_and_then_their_callbacks_run(
    tmp_path: Path,
) -> None:
    store = SqliteStore(tmp_path / "capd.db")
    outside = sqlite3.connect(tmp_path / "capd.db")
    seen: list[tuple[str, int]] = []

    async def writer(pod: str) -> None:
        for seq in range(1, 4):
            store.append(pod, _events(seq, 1))
            store.after_commit(lambda: seen.append((pod, _count(outside))))
            assert store.events_after(pod, 0, 10)[-1][0] == seq  # reads see the open batch
            assert _count(outside) == 2 * (seq - 1)  # what the turns before committed
            await asyncio.sleep(0)

    commits = store.batch.commits
    await asyncio.gather(writer("a"), writer("b"))
    await store.flush()
    # Each turn of the loop wrote one event of each pod and committed them together.
    assert store.batch.commits - commits == 3
    assert seen == [("a", 2), ("b", 2), ("a", 4), ("b", 4), ("a", 6), ("b", 6)]
    outside.close()
    store.close()


async def test_a_failed_group_undoes_itself_and_the_batch_commits_the_rest(
    tmp_path: Path,
) -> None:
    store = SqliteStore(tmp_path / "capd.db")
    store.append("p", _events(1, 1))
    with pytest.raises(sqlite3.IntegrityError):
        store.append("p", _events(2, 1) + _events(1, 1), OwedReport("/parent", b"r"))
    store.append("p", _events(2, 1))
    await store.flush()
    outside = sqlite3.connect(tmp_path / "capd.db")
    assert [row[0] for row in outside.execute("SELECT seq FROM events")] == [1, 2]
    assert _count(outside, "outbox") == 0
    outside.close()
    store.close()


async def test_the_outbox_reads_no_report_before_it_commits(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "capd.db")
    store.append("p", _events(1, 1), OwedReport("/parent", b"one"))
    await store.flush()
    store.append("p", _events(2, 1), OwedReport("/parent", b"two"))
    assert [r.payload for r in store.reports_for("/parent", 10)] == [b"one"]
    await store.flush()
    assert [r.payload for r in store.reports_for("/parent", 10)] == [b"one", b"two"]
    store.close()


async def test_a_reply_waits_for_every_write_made_before_it(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "capd.db")
    order: list[str] = []
    after_writes(lambda: order.append("nothing waited"))
    store.add_pending("p", "notify", "hi", source="s")
    store.after_commit(lambda: order.append("store"))
    after_writes(lambda: order.append("reply"))
    assert order == ["nothing waited"]
    await store.flush()
    assert order == ["nothing waited", "store", "reply"]
    store.close()


def test_without_a_loop_each_write_commits_at_once(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "capd.db")
    outside = sqlite3.connect(tmp_path / "capd.db")
    store.append("p", _events(1, 2), OwedReport("/parent", b"r"))
    store.add_pod("p", "{}", None, 1.0)
    assert (_count(outside), _count(outside, "outbox"), _count(outside, "pods")) == (2, 1, 1)
    outside.close()
    store.close()


@contextlib.contextmanager
def _tiny_disk(path: Path) -> Iterator[Path]:
    """A 512 KiB tmpfs at `path`: a real disk to fill. Skips where mounting is refused."""
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(path)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(disk: Path) -> None:
    with contextlib.suppress(OSError), open(disk / "filler", "wb", buffering=0) as f:
        while True:
            f.write(b"\0" * 4096)


async def test_a_commit_that_fails_runs_nothing_that_waited_and_stops_the_store(
    tmp_path: Path,
) -> None:
    failures: list[BaseException] = []
    with _tiny_disk(tmp_path / "disk") as disk:
        store = SqliteStore(disk / "capd.db", on_failure=failures.append)
        store.append("p", _events(1, 1))
        await store.flush()
        _fill(disk)
        ran: list[str] = []
        store.append("p", [(2, 1.0, "status", b"x" * 200_000)])
        store.after_commit(lambda: ran.append("ack"))
        after_writes(lambda: ran.append("reply"))
        with pytest.raises(StoreFailed):
            await store.flush()
        assert len(failures) == 1
        after_writes(lambda: ran.append("after the failure"))
        assert ran == []
        with pytest.raises(StoreFailed):
            store.append("p", _events(3, 1))
        with pytest.raises(StoreFailed):
            await store.flush()
        store.close()
        (disk / "filler").unlink()
        reopened = SqliteStore(disk / "capd.db")
        assert [seq for seq, _ in reopened.events_after("p", 0, 10)] == [1]
        reopened.close()


async def test_a_batch_a_commit_callback_breaks_fails_the_flush_waiting_on_it(
    tmp_path: Path,
) -> None:
    """A callback's write or read can find the next batch lost (a full disk, PostgreSQL's
    connection gone): the store fails there, and a flush hears StoreFailed."""
    failures: list[BaseException] = []
    store = SqliteStore(tmp_path / "capd.db", on_failure=failures.append)
    store.append("p", _events(1, 1))
    store.after_commit(lambda: store.batch.broken(BatchBroken("the next batch is lost")))
    with pytest.raises(StoreFailed):
        await store.flush()
    assert len(failures) == 1
    store.close()
