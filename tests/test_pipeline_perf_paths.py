"""The fast paths of the pipeline give the same answers as the plain ones: the recipient reader in
a child process against the one in this process, and the journal writer's shared commit barrier."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import signal
import sqlite3
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from campaign_cli import recipients
from campaign_cli.clock import Stamper, SystemClock, iso
from campaign_cli.config import load_campaign
from campaign_cli.errors import ExitCode, InputError, JournalError, ReaderProcessError
from campaign_cli.models import Channel
from campaign_cli.pipeline import SendOptions, StopController, run_campaign
from campaign_cli.recipients import (
    Chunk,
    ChunkReader,
    InlineChunkReader,
    ProcessChunkReader,
    RecipientSpec,
    iter_recipient_chunks,
    scan_recipients,
)
from campaign_cli.store import db
from campaign_cli.store.db import Store, insert_rows
from campaign_cli.store.journal import JournalWriter
from campaign_cli.testing import FakeClock, FakeProvider, fake_registry
from tests.conftest import CampaignFactory, journal, people, query, write_csv

MIXED = (
    "id,name,phone,email\n"
    "c1,Ann,+1 (201) 200-0001,Ann@Example.COM\n"
    "\n"
    "c2,Bob,12,not-an-email\n"
    ",NoKey,+12012000003,x@example.com\n"
    "c4,Too,many,fields,here\n"
    '"c5","Multi\nline",+12012000005,\n'
    "c6,Dee,+442071838750,dee@example.org\n"
    " , , , \n"
    "c7,Eve,2012000007,eve@example.com\n"
)


def spec_for(path: Path) -> RecipientSpec:
    return RecipientSpec(path=path, key="id",
                         columns={Channel.SMS: "phone", Channel.EMAIL: "email"})


def drain(reader: ChunkReader) -> list[Chunk]:
    try:
        chunks = []
        while (chunk := reader.next_chunk()) is not None:
            chunks.append(chunk)
        assert reader.next_chunk() is None
        return chunks
    finally:
        reader.close()


@pytest.mark.parametrize(("chunk_size", "start_row", "limit"),
                         [(500, 1, None), (2, 1, None), (3, 3, None), (2, 2, 5)])
def test_process_reader_yields_exactly_what_the_inline_reader_yields(
    tmp_path: Path, chunk_size: int, start_row: int, limit: int | None
) -> None:
    path = tmp_path / "r.csv"
    path.write_text(MIXED, encoding="utf-8")
    spec = spec_for(path)
    inline = drain(InlineChunkReader(spec, chunk_size, start_row, limit))
    process = drain(ProcessChunkReader(spec, chunk_size, start_row, limit))
    assert inline  # the comparison means something
    assert process == inline


def test_process_reader_raises_the_same_input_error(tmp_path: Path) -> None:
    path = tmp_path / "r.csv"
    path.write_bytes(b"id,name,phone,email\nc1,A\xff,+12012000001,a@example.com\n")
    with pytest.raises(InputError) as inline:
        drain(InlineChunkReader(spec_for(path)))
    with pytest.raises(InputError) as process:
        drain(ProcessChunkReader(spec_for(path)))
    assert str(process.value) == str(inline.value)
    assert process.value.line == inline.value.line == 2


def test_process_reader_can_be_closed_early(tmp_path: Path) -> None:
    path = tmp_path / "r.csv"
    path.write_text("id,name,phone,email\n" + "".join(
        f"c{i},N,+1201200{i:04d},p{i}@example.com\n" for i in range(3000)), encoding="utf-8")
    reader = ProcessChunkReader(spec_for(path), chunk_size=10)
    first = reader.next_chunk()
    assert first is not None and len(first) == 10
    reader.close()
    assert reader.next_chunk() is None


def _journal_without_times(store: Path) -> list[dict[str, Any]]:
    rows = journal(store)
    for row in rows:
        row.pop("updated_at")
    return sorted(rows, key=lambda r: (r["row"], r["channel"]))


def test_a_run_journals_the_same_whichever_reader(
    make_campaign: CampaignFactory, tmp_path: Path
) -> None:
    rows = people(30)
    rows.insert(4, ["c3", "Dup", "+12012000099", "dup@example.com"])
    rows.append(["", "NoKey", "+12012000098", "x@example.com"])
    rows.append(["c99", "BadPhone", "12", "y@example.com"])
    campaign = make_campaign(rows)
    results = []
    for mode in ("inline", "process"):
        store = tmp_path / f"{mode}.db"
        provider = FakeProvider()
        report = run_campaign(
            load_campaign(campaign, {}), store,
            SendOptions(reader=mode, chunk_size=7),  # type: ignore[arg-type]
            clock=FakeClock(), registry=fake_registry(provider),
        )
        results.append((report.counts, _journal_without_times(store), len(provider.accepted)))
    assert results[0][0]["sent"] == 30
    assert results[1] == results[0]


def test_barrier_resolves_only_after_the_submitted_statements_commit(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    Store.open(path).close()

    async def scenario() -> list[int]:
        writer = JournalWriter(path).start()
        seen: list[int] = []
        try:
            barriers = []
            for i in range(50):
                writer.submit("INSERT INTO settings (key, value) VALUES (?, ?)", (f"k{i}", "v"))
                barriers.append(writer.barrier())
            assert len({id(b) for b in barriers}) < len(barriers)  # shared between callers
            for i, barrier in enumerate(barriers):
                await barrier
                check = sqlite3.connect(path)
                try:
                    seen.append(check.execute(
                        "SELECT count(*) FROM settings WHERE key = ?", (f"k{i}",)).fetchone()[0])
                finally:
                    check.close()
            await writer.barrier()  # nothing new: already committed
        finally:
            await asyncio.to_thread(writer.close)
        return seen

    assert asyncio.run(scenario()) == [1] * 50


def test_barrier_fails_when_the_journal_breaks(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    Store.open(path).close()

    async def scenario() -> None:
        writer = JournalWriter(path).start()
        try:
            writer.submit("INSERT INTO no_such_table VALUES (?)", (1,))
            await writer.barrier()
        finally:
            try:
                await asyncio.to_thread(writer.close)
            except Exception:  # noqa: BLE001, S110 - the failure is what we test above
                pass

    with pytest.raises(Exception, match="writing the journal failed"):
        asyncio.run(scenario())


def test_the_writer_waits_for_another_process_s_write_lock_instead_of_failing(
    tmp_path: Path,
) -> None:
    """A long write from elsewhere (`suppress import` of a big list is one transaction) used to
    fail the run's journal after one busy timeout. The writer tries again, within a bound."""
    path = tmp_path / "s.db"
    Store.open(path).close()
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # held like a long import
    writer = JournalWriter(path, busy_timeout_ms=20, lock_wait=60).start()
    try:
        writer.submit("INSERT INTO settings (key, value) VALUES (?, ?)", ("waited", "v"))
        deadline = time.monotonic() + 30
        while writer.busy_waits < 3:  # a condition, not a sleep: it has found the lock taken
            assert time.monotonic() < deadline, "the writer never met the lock"
            time.sleep(0.01)
        other.execute("COMMIT")
    finally:
        writer.close()  # raises if the write failed
        other.close()
    check = sqlite3.connect(path)
    try:
        assert check.execute("SELECT value FROM settings WHERE key = 'waited'").fetchone() == ("v",)
    finally:
        check.close()


def test_the_writer_gives_up_on_a_lock_held_past_its_bound(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    Store.open(path).close()
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    writer = JournalWriter(path, busy_timeout_ms=10, lock_wait=0).start()
    try:
        writer.submit("INSERT INTO settings (key, value) VALUES (?, ?)", ("never", "v"))
        with pytest.raises(JournalError, match="database is locked"):
            writer.close()
    finally:
        other.execute("ROLLBACK")
        other.close()


def test_stamper_formats_exactly_as_iso() -> None:
    clock = FakeClock()
    stamper = Stamper(clock)
    for step in (0.0, 0.0004, 0.0007, 0.3, 0.9996, 1.0, 59.9995, 3600.0001, 0.0):
        clock.advance(step)
        assert stamper.now() == iso(clock.now())


def test_a_barrier_after_submit_many_waits_for_everything_before_it(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    Store.open(path).close()

    async def scenario() -> int:
        writer = JournalWriter(path).start()
        try:
            sql = "INSERT INTO settings (key, value) VALUES (?, ?)"
            writer.submit_many(sql, [(f"m{i}", "v") for i in range(3)])
            writer.submit(sql, ("one", "v"))
            await writer.barrier()
            writer.submit(sql, ("after", "v"))
            barrier = writer.barrier()
            assert not barrier.done()  # "after" is not committed yet
            await barrier
            check = sqlite3.connect(path)
            try:
                return int(check.execute(
                    "SELECT count(*) FROM settings WHERE key IN ('m0','m1','m2','one','after')"
                ).fetchone()[0])
            finally:
                check.close()
        finally:
            await asyncio.to_thread(writer.close)

    assert asyncio.run(scenario()) == 5


@given(st.floats(min_value=0, max_value=4e9, allow_nan=False))
def test_stamper_on_the_system_clock_formats_exactly_as_iso(timestamp: float) -> None:
    from datetime import datetime, timezone

    stamper = Stamper(SystemClock())
    expected = iso(datetime.fromtimestamp(timestamp, timezone.utc))
    assert stamper.at(timestamp) == expected
    assert stamper.at(timestamp) == expected  # again, from the kept prefix


def test_stamper_on_the_system_clock_tells_the_time() -> None:
    from datetime import datetime, timedelta, timezone

    stamper = Stamper(SystemClock())
    before = datetime.now(timezone.utc) - timedelta(milliseconds=1)
    stamped = datetime.fromisoformat(stamper.now().replace("Z", "+00:00"))
    after = datetime.now(timezone.utc)
    assert before <= stamped <= after


@given(keys=st.lists(st.integers(min_value=0, max_value=400), max_size=600),
       width=st.integers(min_value=1, max_value=14))
def test_insert_rows_does_what_executemany_does(keys: list[int], width: int) -> None:
    """Many rows per statement (`insert_rows`, used for admission) leave the same table as one
    statement per row, OR IGNORE included: the first row of a key wins, also across the
    statements a long list is cut into (MAX_PARAMS // width rows each)."""
    columns = ", ".join(f"c{i}" for i in range(width))
    rows = [(key, *(f"{n}-{i}" for i in range(1, width))) for n, key in enumerate(keys)]
    tables = []
    for use_insert_rows in (False, True):
        conn = sqlite3.connect(":memory:")
        conn.execute(f"CREATE TABLE t ({columns}, UNIQUE (c0))")
        head = f"INSERT OR IGNORE INTO t ({columns})"
        if use_insert_rows:
            insert_rows(conn, head, rows)
        else:
            conn.executemany(f"{head} VALUES ({', '.join('?' * width)})", rows)
        tables.append(conn.execute("SELECT * FROM t ORDER BY rowid").fetchall())
        conn.close()
    assert tables[0] == tables[1]
    assert len(tables[1]) == len(set(keys))


def wait_until(condition: Callable[[], bool], what: str, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        time.sleep(0.005)


def big_file(tmp_path: Path, rows: int) -> Path:
    return write_csv(tmp_path / "big.csv", people(rows))


def rows_to_the_end(reader: ProcessChunkReader, chunks: list[Chunk | None]) -> list[int]:
    """The row numbers of ``chunks`` and of every chunk ``reader`` still sends; then closed."""
    try:
        while (chunk := reader.next_chunk()) is not None:
            chunks.append(chunk)
    finally:
        reader.close()
    return [item.row for chunk in chunks if chunk is not None for item in chunk]


def blocked_on_a_full_pipe(
    path: Path,
) -> tuple[ProcessChunkReader, list[Chunk | None]]:
    """A reader child of ``path`` that has sent its first chunk and is blocked writing more to
    a full pipe (~80 KB a chunk: more than a pipe holds)."""
    reader = ProcessChunkReader(spec_for(path), 1000)
    pid = reader._process.pid
    try:
        chunks = [reader.next_chunk()]
        wait_until(lambda: "pipe_write" in Path(f"/proc/{pid}/wchan").read_text(),
                   "the child blocked writing to a full pipe")
    except BaseException:
        reader.close()
        raise
    return reader, chunks

def test_the_reader_child_survives_a_stop_and_continue_while_blocked_on_a_full_pipe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-Z and `fg` (or a debugger attaching) while the child is blocked writing a chunk to a
    full pipe cut that write short. Under PYTHONUNBUFFERED (common in containers) the child's
    stdout was a raw file and pickle ignored the short count: bytes were lost, the parent could
    not read the stream, and the run hung. Every row must still arrive, once, in order."""
    monkeypatch.setenv("PYTHONUNBUFFERED", "1")
    path = big_file(tmp_path, 20_000)
    reader, chunks = blocked_on_a_full_pipe(path)
    pid = reader._process.pid
    try:
        os.kill(pid, signal.SIGSTOP)
        wait_until(lambda: Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
                   == "T", "the child stopped")
        os.kill(pid, signal.SIGCONT)
    except BaseException:
        reader.close()
        raise
    assert rows_to_the_end(reader, chunks) == list(range(1, 20_001))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_the_reader_child_leaves_a_stop_signal_to_its_parent(
    tmp_path: Path, signum: signal.Signals
) -> None:
    """`systemctl stop` signals every process of the unit (KillMode=control-group), and a
    terminal that hangs up signals its whole foreground process group: the reader child got the
    SIGTERM or SIGHUP meant to stop the run gracefully, and died of it (it ignored only
    SIGINT). A run whose parent was then still reading ended "aborted" with exit 1 ("the
    recipient reader process ended unexpectedly (killed by SIGTERM)"), not "interrupted" (130).
    Stopping is the parent's to decide, as it is for the HTTP process; `close` still ends it."""
    path = big_file(tmp_path, 20_000)
    reader, chunks = blocked_on_a_full_pipe(path)
    os.kill(reader._process.pid, signum)
    assert rows_to_the_end(reader, chunks) == list(range(1, 20_001))

    reader = ProcessChunkReader(spec_for(path), 1000)
    assert reader.next_chunk() is not None
    reader.close()  # mid-file, blocked on the pipe: ended all the same
    assert reader._process.returncode is not None

    # The same signal the moment the child exists (the unit stopped as the run opens its
    # file), while its interpreter still starts up, before any code of ours runs in it.
    reader = ProcessChunkReader(spec_for(path), 1000)
    os.kill(reader._process.pid, signum)
    try:
        rows = [item.row for chunk in iter(reader.next_chunk, None) for item in chunk]
    finally:
        reader.close()
    assert rows == list(range(1, 20_001))


def test_a_broken_stream_from_the_reader_child_is_an_error_not_a_hang(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A child whose output cannot be unpickled is stopped and reported, even when it is blocked
    writing more of it (waiting for it to exit first would wait for ever)."""
    monkeypatch.setattr(recipients, "_CHILD_CODE",
                        "import sys\nsys.stdout.buffer.write(b'\\x80\\xff' + b'x' * 500_000)\n"
                        "sys.stdout.buffer.flush()\n")
    reader = ProcessChunkReader(spec_for(big_file(tmp_path, 10)), 1000)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(reader.next_chunk)
        try:
            with pytest.raises(ReaderProcessError, match="sent data that could not be read"):
                future.result(timeout=20)
        finally:
            reader._process.kill()  # if the assertion failed, free the blocked thread
            reader.close()
    assert reader._process.returncode is not None


def reader_children() -> list[int]:
    """The recipient reader processes this process started (they run `_child_main`)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) != os.getpid():
                continue
            if b"_child_main" in (stat.parent / "cmdline").read_bytes():
                found.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
    return found


def test_a_reader_child_killed_mid_run_stops_the_run_and_the_resume_sends_everyone_once(
    tmp_path: Path, make_campaign: CampaignFactory
) -> None:
    """The OOM killer (or anyone) kills the reader process while it is mid-file, blocked on a
    full pipe. The run says so and exits 1; what was not read is not journaled, and the resume
    reads it: everyone is sent exactly once over the two runs."""
    total = 5000
    campaign = make_campaign(people(total))
    store = tmp_path / "s.db"
    killed: list[int] = []

    def kill_the_reader(message: Any) -> None:
        if not killed:
            pids = reader_children()
            assert len(pids) == 1
            os.kill(pids[0], signal.SIGKILL)
            killed.extend(pids)

    provider = FakeProvider(handler=kill_the_reader)
    options = SendOptions(reader="process", chunk_size=50, run_key="k")
    first = run_campaign(load_campaign(campaign, {}), store, options, clock=FakeClock(),
                         registry=fake_registry(provider))
    assert killed and first.exit_code == 1
    # Said as what happened, not as a bug of ours to report (an out-of-memory kill, say).
    assert first.error == ("the recipient reader process ended unexpectedly (killed by "
                           "SIGKILL)")
    assert len(provider.accepted) < total  # it stopped mid-file
    second = run_campaign(load_campaign(campaign, {}), store, options, clock=FakeClock(),
                          registry=fake_registry(provider))
    assert second.exit_code == 0
    keys = Counter(m.recipient_key for m in provider.accepted)
    assert len(keys) == total and max(keys.values()) == 1
    assert Counter(r["state"] for r in journal(store)) == {"sent": total}


# -- the recipient file must not change under a run ---------------------------------------------


def test_a_reader_refuses_a_file_changed_since_the_scan(tmp_path: Path) -> None:
    path = tmp_path / "r.csv"
    path.write_text(MIXED)
    scan = scan_recipients(spec_for(path))
    with path.open("a") as f:
        f.write("c8,Fay,+12012000008,fay@example.com\n")
    spec = replace(spec_for(path), expect=scan.identity)
    with pytest.raises(InputError, match="changed since it was checked: stopped before sending"):
        next(iter_recipient_chunks(spec, 2))


@pytest.mark.parametrize("reader", ["inline", "process"])
def test_a_file_appended_to_during_a_run_stops_it_and_nothing_appended_is_sent(
    make_campaign: CampaignFactory, store_path: Path, tmp_path: Path, reader: str
) -> None:
    """Rows read from a file that changed under the run would go out under the hash of another
    file (the run key, and the check that refuses a resume on a changed file). The readers
    compare the open file with what the scan saw before every chunk, and stop the run (exit 2,
    the file and line named) once it differs. The sends already in flight finish (no row is
    left in doubt by the stop); what was queued but not started stays pending."""
    total = 5000  # far more than the readers run ahead of the sends
    campaign = make_campaign(people(total))
    csv_path = tmp_path / "recipients.csv"
    appended: list[bool] = []

    def append_a_row(message: Any) -> None:
        if not appended:
            with csv_path.open("a") as f:
                f.write("c9999,Late,+12012009999,late@example.com\n")
            appended.append(True)

    provider = FakeProvider(handler=append_a_row)
    options = SendOptions(reader=reader, chunk_size=20, run_key="k")  # type: ignore[arg-type]
    report = run_campaign(load_campaign(campaign, {}), store_path, options, clock=FakeClock(),
                          registry=fake_registry(provider))
    assert appended and report.exit_code == 2
    assert "recipient file changed while the run was reading it" in (report.error or "")
    assert "c9999" not in {m.recipient_key for m in provider.accepted}
    assert len(provider.accepted) < total
    rows = journal(store_path)
    assert len(rows) < total and all(r["rkey"] != "c9999" for r in rows)
    assert {r["state"] for r in rows} <= {"sent", "pending"}


def test_a_pipe_or_a_device_is_refused_as_a_recipient_file(tmp_path: Path) -> None:
    """The file is read twice (scan, then send); a pipe would be empty the second time, so the
    run used to report it as "the file is empty". It is refused for what it is."""
    fifo = tmp_path / "fifo.csv"
    os.mkfifo(fifo)
    writer = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)  # keeps the pipe open for the reader
    try:
        os.write(writer, MIXED.encode())
        for path in (fifo, Path(os.devnull)):
            with pytest.raises(InputError, match="not a regular file: the recipient file is read "
                                                 "twice"):
                scan_recipients(spec_for(path))
    finally:
        os.close(writer)


@pytest.mark.parametrize("module", ["pickle", "struct", "re"])
def test_the_reader_child_does_not_import_modules_from_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, module: str
) -> None:
    """`python -c` puts the working directory first on the module path, and the child imported
    pickle (and through it struct, re, ...) before it set the parent's path: a `pickle.py` in
    the folder `campaign send` ran from made every run of 20,000 rows or more stop with "the
    recipient reader process ended unexpectedly (exit code 1)", while smaller runs worked."""
    path = tmp_path / "r.csv"
    path.write_text(MIXED, encoding="utf-8")
    work = tmp_path / "work"
    work.mkdir()
    (work / f"{module}.py").write_text("raise ImportError('a file of the user, not ours')\n")
    monkeypatch.chdir(work)
    expected = drain(InlineChunkReader(spec_for(path)))
    assert drain(ProcessChunkReader(spec_for(path))) == expected


def test_a_reader_child_that_crashes_says_why_in_one_line(tmp_path: Path) -> None:
    """A child that dies of an exception outside its own reporting (here, arguments it cannot
    take: a channel it does not know) ends with exit 1; the parent's error carries the child's
    last line, not only "exit code 1", and nothing reaches the user's terminal."""

    class Unknown:  # stands in for a Channel: the child rebuilds `Channel(value)` and fails
        value = "carrier-pigeon"

    path = tmp_path / "r.csv"
    path.write_text(MIXED, encoding="utf-8")
    reader = ProcessChunkReader(replace(spec_for(path), columns={Unknown(): "phone"}))  # type: ignore[dict-item]
    try:
        with pytest.raises(ReaderProcessError) as info:
            drain(reader)
    finally:
        reader.close()
    assert str(info.value) == (
        "the recipient reader process ended unexpectedly (exit code 1: ValueError: "
        "'carrier-pigeon' is not a valid Channel)"
    )


# -- another process's long write (a big `suppress import`) around a run ------------------------


class _LoopStop(StopController):
    """A stop delivered as a signal's handler delivers it: on the run's loop (`loop`)."""

    loop: asyncio.AbstractEventLoop | None = None

    def bind(self) -> None:
        self.loop = asyncio.get_running_loop()
        super().bind()


def _ctrl_c_once_the_run_waits(
    store_path: Path, monkeypatch: pytest.MonkeyPatch, times: int
) -> tuple[_LoopStop, _LockHolder]:
    """A stop for the run, and another process's long write (`_LockHolder`, 200 tries of 20 ms:
    4 s, once taken) whose lock the run finds taken: Ctrl-C pressed ``times`` times, on the run's
    loop, the first time the run waits for it."""
    stop = _LoopStop()
    holder = _LockHolder(store_path, monkeypatch, times=200)
    counting = db.is_busy

    def busy_then_ctrl_c(exc: sqlite3.OperationalError) -> bool:
        if holder.met == 0 and stop.loop is not None:
            for _ in range(times):
                stop.loop.call_soon_threadsafe(stop.request)
        return counting(exc)

    monkeypatch.setattr(db, "is_busy", busy_then_ctrl_c)
    return stop, holder


def _stopped_at_once_while_locked(
    campaign: Path, store_path: Path, options: SendOptions, provider: FakeProvider,
    stop: StopController, holder: _LockHolder,
) -> None:
    """Run the campaign, which a second Ctrl-C ends while ``holder`` still holds the store's
    write lock: exit 130 at once, saying that the session's end is not recorded."""
    try:
        report = run_campaign(load_campaign(campaign, {}), store_path, options,
                              clock=FakeClock(), registry=fake_registry(provider), stop=stop)
        assert not holder.released.is_set()  # it ended while the other write still went on
    finally:
        holder.times = 0
        holder.close()
    assert report.exit_code == ExitCode.INTERRUPTED
    assert any("session's end is not recorded" in w for w in report.warnings)


class _LockHolder:
    """Another connection that holds the store's write lock, as a long import does, until the
    run has found it taken ``times`` times (each a busy timeout): a condition, not a sleep."""

    def __init__(self, path: Path, monkeypatch: pytest.MonkeyPatch, times: int = 3) -> None:
        import threading

        from campaign_cli.store import db

        self.met = 0
        self.times = times
        real = db.is_busy

        def counting(exc: sqlite3.OperationalError) -> bool:
            self.met += 1
            return real(exc)

        monkeypatch.setattr(db, "is_busy", counting)
        monkeypatch.setattr(db, "BUSY_TIMEOUT_MS", 20)
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.released = threading.Event()
        self.thread: threading.Thread | None = None

    def take(self) -> None:
        import threading

        self.met = 0
        self.conn.execute("BEGIN IMMEDIATE")
        self.thread = threading.Thread(target=self._release_when_met, daemon=True)
        self.thread.start()

    def _release_when_met(self) -> None:
        deadline = time.monotonic() + 60
        while self.met < self.times and time.monotonic() < deadline:
            time.sleep(0.005)
        self.conn.execute("COMMIT")
        self.released.set()

    def close(self) -> None:
        if self.thread is not None:
            self.thread.join()
        self.conn.close()


def test_a_run_that_starts_while_another_process_writes_waits_for_the_lock(
    make_campaign: CampaignFactory, store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run started while a big `suppress import` commits (one transaction, longer than
    SQLite's 10 s busy timeout) used to exit 1 ("internal error: database is locked") when it
    recorded its session. It waits for the lock (up to LOCK_WAIT), as its journal writer does."""
    campaign = make_campaign(people(30))
    Store.open(store_path).close()
    holder = _LockHolder(store_path, monkeypatch)
    holder.take()
    try:
        report = run_campaign(load_campaign(campaign, {}), store_path,
                              SendOptions(run_key="k"), clock=FakeClock())
    finally:
        holder.close()
    assert holder.met >= holder.times  # it did meet the lock
    assert report.exit_code == 0, report.error
    assert Counter(r["state"] for r in journal(store_path)) == {"sent": 30}


def test_a_run_that_finishes_while_another_process_writes_waits_for_the_lock(
    make_campaign: CampaignFactory, store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same at the end of a run: everything sent and journaled, then another process takes
    the write lock for longer than the busy timeout before the run records how it ended. That
    used to fail the run (exit 1, "finishing the journal failed: database is locked")."""
    campaign = make_campaign(people(30))
    Store.open(store_path).close()
    holder = _LockHolder(store_path, monkeypatch)
    real_close = JournalWriter.close

    def close_then_lock(self: JournalWriter) -> None:
        real_close(self)
        holder.take()  # the last journal batch is in: the run's own finish comes next

    monkeypatch.setattr(JournalWriter, "close", close_then_lock)
    try:
        report = run_campaign(load_campaign(campaign, {}), store_path,
                              SendOptions(run_key="k"), clock=FakeClock())
    finally:
        holder.close()
    assert holder.met >= holder.times
    assert report.exit_code == 0, report.error
    assert report.status == "done"
    status = query(store_path, "SELECT status, exit_code FROM runs")
    assert status == [("done", 0)]


def test_a_stop_while_the_run_waits_for_another_process_s_write_lock_ends_the_wait(
    make_campaign: CampaignFactory, store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C while a starting run waits (up to LOCK_WAIT, five minutes) for another process's
    long write used to be ignored until that write ended: the wait blocked the event loop, so
    the signal's handler only ran after it, and the run then recorded a session and exited 130.
    It ends the wait: exit 130, nothing sent or recorded, the other write still going on."""
    from campaign_cli.errors import StoppedBeforeStart

    campaign = make_campaign(people(30))
    Store.open(store_path).close()
    stop, holder = _ctrl_c_once_the_run_waits(store_path, monkeypatch, times=1)
    holder.take()
    try:
        with pytest.raises(StoppedBeforeStart):
            run_campaign(load_campaign(campaign, {}), store_path, SendOptions(run_key="k"),
                         clock=FakeClock(), stop=stop)
        assert not holder.released.is_set()  # it did not wait for the other write to end
    finally:
        holder.times = 0  # the other write ends now
        holder.close()
    assert query(store_path, "SELECT count(*) FROM runs") == [(0,)]
    assert journal(store_path) == []


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_a_store_deleted_or_replaced_under_a_run_stops_it(
    make_campaign: CampaignFactory, store_path: Path, tmp_path: Path, how: str
) -> None:
    """In WAL mode SQLite keeps writing to a store file that was deleted (or renamed over) while
    a run goes: the run used to send every message and exit 0 "done" with its journal in a file
    nobody can open, so the next run sent everyone again. It stops (exit 1) at the next journal
    batch: the sends waiting for their intent to commit never go out."""
    total = 2000
    campaign = make_campaign(people(total))
    other = tmp_path / "other.db"
    Store.open(other).close()
    done: list[bool] = []

    def pull_the_store(message: Any) -> None:
        if not done:
            if how == "deleted":
                store_path.unlink()
            else:
                os.replace(other, store_path)
            done.append(True)

    provider = FakeProvider(handler=pull_the_store)
    report = run_campaign(load_campaign(campaign, {}), store_path,
                          SendOptions(run_key="k", chunk_size=20), clock=FakeClock(),
                          registry=fake_registry(provider))
    assert done and report.exit_code == 1
    assert "the store file was deleted or replaced while the run was going" in (report.error or "")
    assert len(provider.accepted) < total // 4


def test_closing_an_inline_reader_while_a_thread_reads_waits_and_closes_the_file(
    tmp_path: Path,
) -> None:
    """A run that stops mid-read cancels the coroutine awaiting `next_chunk`, not the thread
    running it, and then closes the reader: the generator, still running, could not be closed,
    and its file was left open for the garbage collector (a ResourceWarning, and a flaky test)."""
    reader = InlineChunkReader(spec_for(big_file(tmp_path, 40_000)), 40_000)
    chunks = reader._chunks
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        reading = pool.submit(reader.next_chunk)
        deadline = time.monotonic() + 20
        while not chunks.gi_running:  # the thread is inside the generator now
            assert time.monotonic() < deadline and not reading.done(), "never started reading"
            time.sleep(0.001)
        reader.close()
        assert chunks.gi_frame is None  # closed: its file with it
        assert len(reading.result(timeout=20) or []) == 40_000


def test_a_call_the_journal_refuses_is_a_journal_error_for_its_caller(tmp_path: Path) -> None:
    """Admission runs as a `call` in the writer's transaction. A full disk there reached the
    run as a raw sqlite3 error, reported as "internal error: OperationalError ... (a bug)"
    whenever it came before the batch's own failure: it is the journal failing."""
    path = tmp_path / "s.db"
    Store.open(path).close()

    def full(conn: sqlite3.Connection) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    def refused(conn: sqlite3.Connection) -> None:
        raise ValueError("not the journal's")

    async def scenario() -> None:
        writer = JournalWriter(path).start()
        try:
            with pytest.raises(JournalError, match="writing the journal failed: database or "
                                                   "disk is full"):
                await writer.call(full)
            with pytest.raises(ValueError):  # the caller's own bug stays its own
                await writer.call(refused)
        finally:
            writer.close()

    asyncio.run(scenario())


def test_a_second_stop_ends_the_run_at_once_while_another_process_holds_the_store(
    make_campaign: CampaignFactory, store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DESIGN section 4: a second Ctrl-C stops at once. While another process held the store's
    write lock (a large import), it did not: the journal writer and the session's last
    transaction waited for that lock (up to five minutes), so the run went on until the other
    write ended. Now both give up: exit 130 at once, the run left as a killed process leaves it,
    and its resume ends every row in exactly one state."""
    total = 200
    campaign = make_campaign(people(total))
    Store.open(store_path).close()
    holder = _LockHolder(store_path, monkeypatch, times=10**9)  # held until the test ends it
    stop = StopController()

    def two_ctrl_c_while_locked(message: Any) -> None:
        if holder.thread is None and len(provider.accepted) >= 20:
            holder.take()  # another process starts a long write
            stop.request()
            stop.request()

    provider = FakeProvider(handler=two_ctrl_c_while_locked)
    _stopped_at_once_while_locked(campaign, store_path, SendOptions(run_key="k", chunk_size=20),
                                  provider, stop, holder)
    assert len(provider.accepted) < total
    first = len(provider.accepted)

    again = FakeProvider()
    resumed = run_campaign(load_campaign(campaign, {}), store_path,
                           SendOptions(run_key="k", chunk_size=20), clock=FakeClock(),
                           registry=fake_registry(again))
    assert resumed.exit_code == ExitCode.OK
    rows = journal(store_path)
    assert sorted(r["row"] for r in rows) == list(range(1, total + 1))  # each row once
    assert {r["state"] for r in rows} <= {"sent", "in_doubt"}
    # Nobody skipped: each message went out once, or was in flight at the stop and is reported.
    keys = [m.recipient_key for m in provider.accepted + again.accepted]
    in_doubt = sum(1 for r in rows if r["state"] == "in_doubt") + resumed.in_doubt_resent
    assert len(set(keys)) == total and len(keys) - total <= in_doubt
    assert first + len(again.accepted) >= total


def test_a_stop_while_a_campaign_s_own_opt_out_list_is_imported_gives_the_import_up(
    make_campaign: CampaignFactory, store_path: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A campaign's `compliance.suppression_lists` are imported before each run. The import ran
    on the event loop: a long list (or a wait for another process's write lock) kept a Ctrl-C
    from being seen until it ended. It runs in a thread and gives up on a stop: exit 130,
    nothing of the list imported, no run recorded."""
    from campaign_cli.errors import StoppedBeforeStart
    from campaign_cli.store import suppressions as suppression_store

    lines = 3000
    with (tmp_path / "optout.csv").open("w", encoding="utf-8") as handle:
        handle.write("address,channel\n")
        handle.writelines(f"+1415555{i:04d},sms\n" for i in range(lines))
    campaign = make_campaign(people(3), compliance={"consent": "not_required",
                                                    "suppression_lists": ["optout.csv"]})
    stop = _LoopStop()
    real = suppression_store.normalize_for
    calls = 0

    def ctrl_c_midway(*args: Any) -> tuple[str, str]:
        nonlocal calls
        calls += 1
        if calls == lines // 2:
            assert stop.loop is not None
            stop.loop.call_soon_threadsafe(stop.request)
            deadline = time.monotonic() + 30  # the loop takes the signal, unless blocked
            while not stop.stopping and time.monotonic() < deadline:
                time.sleep(0.001)
        return real(*args)  # type: ignore[no-any-return]

    monkeypatch.setattr(suppression_store, "normalize_for", ctrl_c_midway)
    provider = FakeProvider()
    with pytest.raises(StoppedBeforeStart):
        run_campaign(load_campaign(campaign, {}), store_path, SendOptions(run_key="k"),
                     clock=FakeClock(), registry=fake_registry(provider), stop=stop)
    assert calls < lines  # given up midway
    assert query(store_path, "SELECT count(*) FROM suppressions") == [(0,)]
    assert query(store_path, "SELECT count(*) FROM runs") == [(0,)]
    assert provider.history == []


def test_ctrl_c_twice_while_the_session_s_end_waits_for_another_process_s_lock_stops_at_once(
    make_campaign: CampaignFactory, store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The session's last transaction waited for another process's write lock (a large
    import) on the event loop's thread: the Ctrl-C handler installed with add_signal_handler
    runs on that loop, so a second Ctrl-C pressed during that wait (up to five minutes) was
    never seen, though `_unless_stopped_at_once` was there to give the wait up (the earlier
    test asks for the stop before the wait, from the loop). The wait is in a thread now."""
    from campaign_cli.policy import Policy

    total = 30
    campaign = make_campaign(people(total))
    Store.open(store_path).close()
    stop, holder = _ctrl_c_once_the_run_waits(store_path, monkeypatch, times=2)
    real_close = Policy.close

    def close_then_another_writes(policy: Policy) -> None:
        real_close(policy)
        holder.take()  # every message journaled; another process's long write starts

    monkeypatch.setattr(Policy, "close", close_then_another_writes)
    provider = FakeProvider()
    _stopped_at_once_while_locked(campaign, store_path, SendOptions(run_key="k"), provider, stop,
                                  holder)
    monkeypatch.undo()
    resumed = run_campaign(load_campaign(campaign, {}), store_path, SendOptions(run_key="k"),
                           clock=FakeClock(), registry=fake_registry(FakeProvider()))
    assert resumed.exit_code == ExitCode.OK
    assert Counter(r["state"] for r in journal(store_path)) == {"sent": total}


def test_a_stop_while_the_session_s_first_transaction_waits_for_the_lock_ends_the_wait(
    make_campaign: CampaignFactory, store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Right after the run is recorded, the session's first transaction (in-doubt rows, the
    session's counts) waited for another process's long write on the event loop's thread: a
    Ctrl-C was not seen until that write ended (helpers u1 and u2). It waits in a thread now and
    a stop ends it: exit 130, nothing sent, the run left as a killed process leaves it, and the
    same command resumes it."""
    from campaign_cli.errors import StoppedBeforeStart
    from campaign_cli.store import runs as runs_module

    campaign = make_campaign(people(5))
    Store.open(store_path).close()
    stop, holder = _ctrl_c_once_the_run_waits(store_path, monkeypatch, times=1)
    real_start_run = runs_module.start_run

    def start_run_then_another_writes(*args: Any, **kwargs: Any) -> Any:
        started = real_start_run(*args, **kwargs)
        holder.take()  # the run is recorded; another process's long write starts
        return started

    monkeypatch.setattr(runs_module, "start_run", start_run_then_another_writes)
    provider = FakeProvider()
    try:
        with pytest.raises(StoppedBeforeStart, match="stopped as the run started"):
            run_campaign(load_campaign(campaign, {}), store_path, SendOptions(run_key="k"),
                         clock=FakeClock(), registry=fake_registry(provider), stop=stop)
        assert not holder.released.is_set()  # it did not wait for the other write to end
    finally:
        holder.times = 0
        holder.close()
    assert provider.history == [] and journal(store_path) == []
    assert query(store_path, "SELECT status FROM runs") == [("running",)]
    monkeypatch.undo()
    resumed = run_campaign(load_campaign(campaign, {}), store_path, SendOptions(run_key="k"),
                           clock=FakeClock(), registry=fake_registry(FakeProvider()))
    assert resumed.exit_code == ExitCode.OK and resumed.resumed
    assert resumed.counts == {"sent": 5}


@pytest.mark.parametrize("zone", ["Asia/Kolkata", "America/New_York"])
def test_a_fake_clock_started_without_a_timezone_keeps_utc_on_any_machine(zone: str) -> None:
    """`Clock.now` is timezone-aware UTC. `FakeClock(datetime(2026, 1, 1))` kept the naive
    start, which `iso` and `.timestamp()` read as the machine's local time: a user's campaign
    test stamped 2025-12-31T18:30:00.000Z in Kolkata and 2026-01-01T05:00:00.000Z in New York
    for what was 00:00 on a UTC CI. A naive start is UTC, as a consent time without an offset."""
    import subprocess
    import sys

    code = ("from datetime import datetime\n"
            "from campaign_cli.clock import Stamper, iso\n"
            "from campaign_cli.testing import FakeClock\n"
            "clock = FakeClock(datetime(2026, 1, 1))\n"
            "print(iso(clock.now()), Stamper(clock).now(), int(clock.now().timestamp()))\n")
    shown = subprocess.run([sys.executable, "-c", code], env={**os.environ, "TZ": zone},
                           capture_output=True, text=True, check=True).stdout.split()
    assert shown == ["2026-01-01T00:00:00.000Z", "2026-01-01T00:00:00.000Z", "1767225600"]
