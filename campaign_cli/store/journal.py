"""The journal writer: one thread, one connection, group commit.

Every write a run makes goes through `JournalWriter` (datasette's write thread, ours). Callers on
the event loop either *submit* a statement (fire and forget: it is committed with the next batch,
in order) or *call* a function and await its result, which is ready once the batch holding it has
committed. Whatever queued up while the previous batch was committing forms the next batch, so
under load one transaction carries hundreds of changes and the event loop never waits on the disk
for each.

`barrier` is the cheap way to wait: it resolves once everything submitted before it has committed.
Callers that ask between two commits share one future, so a hundred workers recording their
`sending` intents cost one wake-up per batch, not a future and a function call each. All three
(`submit`, `call`, `barrier`) must be used from the event loop's thread: the writer counts what it
committed, the loop counts what it queued, and the queue keeps them in the same order.
"""

from __future__ import annotations

import asyncio
import collections
import os
import queue
import sqlite3
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from campaign_cli.errors import JournalError, StoreError
from campaign_cli.store.db import (
    BUSY_TIMEOUT_MS,
    GIVE_UP_TRY_MS,
    LOCK_WAIT,
    LockWaitAbandoned,
    begin_immediate,
    connect,
)

T = TypeVar("T")

_STOP = object()
_NOOP = object()  # wakes the writer so that it reports a commit


class _Call:
    __slots__ = ("fn", "future", "loop")

    def __init__(
        self, fn: Callable[[sqlite3.Connection], Any], future: asyncio.Future[Any],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.fn = fn
        self.future = future
        self.loop = loop


class _Many:
    __slots__ = ("sql", "params")

    def __init__(self, sql: str, params: Sequence[Sequence[Any]]) -> None:
        self.sql = sql
        self.params = params


class JournalWriter:
    def __init__(self, path: Path, *, max_batch: int = 2000, lock_wait: float = LOCK_WAIT,
                 busy_timeout_ms: int | None = None, durable: bool = True) -> None:
        self._path = path
        self.durable = durable  # each commit synced to disk (`campaign_cli.store.db.connect`)
        self._max_batch = max_batch
        self._lock_wait = lock_wait
        self._busy_timeout_ms = busy_timeout_ms
        self.busy_waits = 0  # how often a transaction found the store locked and tried again
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="journal-writer", daemon=True)
        self._failure: BaseException | None = None
        self._ready = threading.Event()
        self._abandoned = threading.Event()
        self._conn: sqlite3.Connection | None = None
        self._identity: tuple[int, int] | None = None  # (device, inode) of the store it opened
        self.commits = 0
        self.statements = 0
        # Barrier bookkeeping. `_queued` is touched by the loop thread only, `_taken` by the writer
        # thread only; `_committed` and `_waiters` live on the loop (updated by `_on_commit`).
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queued = 0
        self._taken = 0
        self._committed = 0
        self._waiters: collections.deque[list[Any]] = collections.deque()  # [target, future]
        self._group_open = False

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> JournalWriter:
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None
        self._thread.start()
        self._ready.wait()
        if self._failure is not None:
            raise StoreError(f"journal writer could not open the store: {self._failure}")
        return self

    def close(self) -> None:
        """Commit everything submitted so far and stop the thread (blocking)."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join()
        self.check()

    def abandon(self) -> None:
        """Give up any wait for another process's write lock, now and from now on (an immediate
        stop). What is not committed then is lost, as when the process is killed: the rows
        stay as the last commit left them (`sending` ones are in doubt when the run resumes).
        Safe from any thread."""
        self._abandoned.set()

    def check(self) -> None:
        if self._failure is not None:
            raise JournalError(f"writing the journal failed: {self._failure}") from self._failure

    # -- API for the event loop ------------------------------------------------------------

    def submit(self, sql: str, params: Sequence[Any]) -> None:
        """Queue one statement; it commits with the next batch, after everything queued before."""
        if self._failure is not None:
            self.check()
        self._queued += 1
        self._queue.put((sql, params))

    def submit_many(self, sql: str, params: Sequence[Sequence[Any]]) -> None:
        """Queue one statement for many rows: one queue item (one wake-up of the writer)."""
        if self._failure is not None:
            self.check()
        self._queued += 1  # one queue item, as the writer counts it
        self._queue.put(_Many(sql, params))

    def call(self, fn: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        """Run ``fn(conn)`` in the writer thread inside the next batch's transaction; the future
        resolves with its result once that transaction has committed."""
        self.check()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queued += 1
        self._queue.put(_Call(fn, future, loop))
        return future

    def barrier(self) -> asyncio.Future[None]:
        """A future that resolves once everything submitted (or called) so far has committed.

        Callers between two commits share one future; it fails with the writer's error if the
        journal breaks."""
        self.check()
        loop = self._loop
        if loop is None:
            # Commits so far were not reported to any loop: queue a no-op so one will be.
            loop = self._loop = asyncio.get_running_loop()
            self._queued += 1
            self._queue.put(_NOOP)
        target = self._queued
        if target <= self._committed:
            done: asyncio.Future[None] = loop.create_future()
            done.set_result(None)
            return done
        waiters = self._waiters
        if self._group_open and waiters:
            last = waiters[-1]
            last[0] = target  # the group now waits for this caller's statements too
            future: asyncio.Future[None] = last[1]
            return future
        future = loop.create_future()
        waiters.append([target, future])
        self._group_open = True
        return future

    def _on_commit(self, taken: int, failure: BaseException | None) -> None:
        """On the loop: the writer has committed (or failed) everything up to item ``taken``."""
        self._group_open = False  # later callers start a new group: this one's target is fixed
        if taken > self._committed:
            self._committed = taken
        waiters = self._waiters
        while waiters and (failure is not None or waiters[0][0] <= self._committed):
            _, future = waiters.popleft()
            if future.done():
                continue
            if failure is not None:
                future.set_exception(_failed(failure))
            else:
                future.set_result(None)

    async def flush(self) -> None:
        """Wait until everything submitted so far is committed."""
        await self.call(lambda conn: None)

    # -- the thread ------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._conn = connect(self._path, durable=self.durable)
        except BaseException as exc:  # noqa: BLE001 - reported to the starting thread
            self._failure = exc
            self._ready.set()
            return
        # Short tries, set once (the writer's statements run under its own write lock, so only
        # BEGIN IMMEDIATE ever waits): `abandon` is seen within one (a try otherwise waits the
        # busy timeout, 10 s), with no PRAGMA per batch.
        timeout = min(BUSY_TIMEOUT_MS if self._busy_timeout_ms is None
                      else int(self._busy_timeout_ms), GIVE_UP_TRY_MS)
        self._conn.execute(f"PRAGMA busy_timeout = {timeout:d}")
        self._identity = _identity(self._path)
        self._ready.set()
        conn = self._conn
        stopping = False
        try:
            while not stopping:
                batch = [self._queue.get()]
                while len(batch) < self._max_batch:
                    try:
                        batch.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                if batch[-1] is _STOP or _STOP in batch:
                    stopping = True
                    batch = [item for item in batch if item is not _STOP]
                self._taken += len(batch)
                self._write(conn, batch)
        finally:
            conn.close()

    def _write(self, conn: sqlite3.Connection, batch: list[Any]) -> None:
        if not batch:
            return
        done: list[tuple[_Call, Any, BaseException | None]] = []
        try:
            self._begin(conn)
            run_sql: str | None = None
            run_params: list[Sequence[Any]] = []
            for item in batch:
                if item is _NOOP:
                    continue
                if isinstance(item, _Many):
                    if run_sql is not None and run_sql != item.sql:
                        conn.executemany(run_sql, run_params)
                        run_sql, run_params = None, []
                    if run_sql is None:
                        run_sql, run_params = item.sql, list(item.params)
                    else:
                        run_params.extend(item.params)
                    self.statements += len(item.params)
                    continue
                if isinstance(item, _Call):
                    if run_sql is not None:
                        conn.executemany(run_sql, run_params)
                        run_sql, run_params = None, []
                    try:
                        done.append((item, item.fn(conn), None))
                    except sqlite3.Error as exc:
                        # The journal refused it (a full disk, an I/O error): for the caller,
                        # as for every other waiter when a batch fails, not a bug of its own.
                        done.append((item, None, JournalError(
                            f"writing the journal failed: {exc}")))
                    except Exception as exc:  # noqa: BLE001 - handed to the awaiting caller
                        done.append((item, None, exc))
                else:
                    sql, params = item
                    if sql != run_sql and run_sql is not None:
                        conn.executemany(run_sql, run_params)
                        run_params = []
                    run_sql = sql
                    run_params.append(params)
                    self.statements += 1
            if run_sql is not None:
                conn.executemany(run_sql, run_params)
            conn.execute("COMMIT")
            self.commits += 1
        except BaseException as exc:  # noqa: BLE001 - the journal is broken: every waiter learns it
            self._failure = exc
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            failed = _failed(exc)
            done = [(call, None, failed) for call in (i for i in batch if isinstance(i, _Call))]
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Call, Any, BaseException | None]]] = {}
        for entry in done:
            by_loop.setdefault(entry[0].loop, []).append(entry)
        barrier_loop = self._loop
        for loop, entries in by_loop.items():
            try:
                if loop is barrier_loop:
                    loop.call_soon_threadsafe(self._resolve_and_release, entries, self._taken,
                                              self._failure)
                    barrier_loop = None
                else:
                    loop.call_soon_threadsafe(_resolve, entries)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass
        if barrier_loop is not None:
            try:
                barrier_loop.call_soon_threadsafe(self._on_commit, self._taken, self._failure)
            except RuntimeError:
                pass

    def _begin(self, conn: sqlite3.Connection) -> None:
        begin_immediate(conn, self._lock_wait, self._met_lock)  # (in short tries: `_run`)
        # In WAL mode SQLite goes on writing to a store file that was deleted (or renamed over)
        # without a word: every batch would commit to a file nobody can open again, and the
        # run would send everyone with no journal. One stat per batch tells.
        if _identity(self._path) != self._identity:
            raise StoreError(
                f"{self._path}: the store file was deleted or replaced while the run was going; "
                "stopped so as not to send without a journal"
            )

    def _met_lock(self) -> None:
        if self._abandoned.is_set():
            raise LockWaitAbandoned("the wait for another process's write lock was given up")
        self.busy_waits += 1

    def _resolve_and_release(
        self, entries: list[tuple[_Call, Any, BaseException | None]], taken: int,
        failure: BaseException | None,
    ) -> None:
        _resolve(entries)
        self._on_commit(taken, failure)


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        found = os.stat(path)
    except OSError:
        return None
    return found.st_dev, found.st_ino


def _resolve(entries: list[tuple[_Call, Any, BaseException | None]]) -> None:
    for call, result, exc in entries:
        if call.future.done():
            continue
        if exc is not None:
            call.future.set_exception(exc)
        else:
            call.future.set_result(result)


def _failed(failure: BaseException) -> JournalError:
    """The error every waiter gets when a batch failed; its cause is the batch's failure."""
    error = JournalError(f"writing the journal failed: {failure}")
    error.__cause__ = failure
    return error
