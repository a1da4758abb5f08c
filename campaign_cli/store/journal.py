"""The journal writer: one thread, one connection, group commit.

Every write a run makes goes through `JournalWriter` (datasette's write thread, ours). Callers on
the event loop either *submit* a statement (fire and forget: it is committed with the next batch,
in order) or *call* a function and await its result, which is ready once the batch holding it has
committed. Whatever queued up while the previous batch was committing forms the next batch, so
under load one transaction carries hundreds of changes and the event loop never waits on the disk
for each.
"""

from __future__ import annotations

import asyncio
import queue
import sqlite3
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from campaign_cli.errors import StoreError
from campaign_cli.store.db import connect

T = TypeVar("T")

_STOP = object()


class _Call:
    __slots__ = ("fn", "future", "loop")

    def __init__(
        self, fn: Callable[[sqlite3.Connection], Any], future: asyncio.Future[Any],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.fn = fn
        self.future = future
        self.loop = loop


class JournalWriter:
    def __init__(self, path: Path, *, max_batch: int = 2000) -> None:
        self._path = path
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="journal-writer", daemon=True)
        self._failure: BaseException | None = None
        self._ready = threading.Event()
        self._conn: sqlite3.Connection | None = None
        self.commits = 0
        self.statements = 0

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> JournalWriter:
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

    def check(self) -> None:
        if self._failure is not None:
            raise StoreError(f"writing the journal failed: {self._failure}") from self._failure

    # -- API for the event loop ------------------------------------------------------------

    def submit(self, sql: str, params: Sequence[Any]) -> None:
        """Queue one statement; it commits with the next batch, after everything queued before."""
        if self._failure is not None:
            self.check()
        self._queue.put((sql, params))

    def call(self, fn: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        """Run ``fn(conn)`` in the writer thread inside the next batch's transaction; the future
        resolves with its result once that transaction has committed."""
        self.check()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put(_Call(fn, future, loop))
        return future

    async def flush(self) -> None:
        """Wait until everything submitted so far is committed."""
        await self.call(lambda conn: None)

    # -- the thread ------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._conn = connect(self._path)
        except BaseException as exc:  # noqa: BLE001 - reported to the starting thread
            self._failure = exc
            self._ready.set()
            return
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
                self._write(conn, batch)
        finally:
            conn.close()

    def _write(self, conn: sqlite3.Connection, batch: list[Any]) -> None:
        if not batch:
            return
        done: list[tuple[_Call, Any, BaseException | None]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            run_sql: str | None = None
            run_params: list[Sequence[Any]] = []
            for item in batch:
                if isinstance(item, _Call):
                    if run_sql is not None:
                        conn.executemany(run_sql, run_params)
                        run_sql, run_params = None, []
                    try:
                        done.append((item, item.fn(conn), None))
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
            done = [(call, None, exc) for call in (i for i in batch if isinstance(i, _Call))]
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Call, Any, BaseException | None]]] = {}
        for entry in done:
            by_loop.setdefault(entry[0].loop, []).append(entry)
        for loop, entries in by_loop.items():
            try:
                loop.call_soon_threadsafe(_resolve, entries)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass


def _resolve(entries: list[tuple[_Call, Any, BaseException | None]]) -> None:
    for call, result, exc in entries:
        if call.future.done():
            continue
        if exc is not None:
            call.future.set_exception(exc)
        else:
            call.future.set_result(result)
