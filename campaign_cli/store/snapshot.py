"""Private copies of the store for dry runs (`send --dry-run`, `validate`, `preview`).

A dry run goes through the whole path, journal included, on a copy: the real store is only read.
The copy holds what a dry run reads, not the whole store: the settings (the unsubscribe secret),
the opt-out and consent lists, the runs, and the journal of the run being dry-run (an earlier
session's rows, which a resume skips). Other runs' journals, most of a store that has seen a year
of campaigns, stay out: copying them cost time and room in the temporary folder (often a RAM
disk) on every dry run, and left every address ever sent to there if the dry run was killed.

The copy lives in a folder of its own (`private_folder`), removed on the way out. One that a
killed dry run left behind is removed by the same user's next dry run, once nobody holds its lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import sqlite3
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from campaign_cli.store.db import cannot_open_wal_index

#: Tables holding every run's rows; a copy keeps those of its own run only.
PER_RUN_TABLES = frozenset({"messages", "attempts"})

_LOCK = ".lock"
#: A folder younger than this is never swept: its maker may not have locked it yet.
_SWEEP_MIN_AGE_S = 60.0


def copy_for_dry_run(source: Path, target: Path, campaign: str, run_key: str) -> None:
    """Copy into a new store file ``target`` (made 0600) what a dry run of run
    (``campaign``, ``run_key``) reads from the store ``source``: the same schema and schema
    version, every table's rows except the journal (`PER_RUN_TABLES`) of other runs. All of it is
    read in one transaction, so the copy is one moment of the store; rows keep their rowids.
    The caller has checked that ``source`` is a store this program can read (`db.connect`)."""
    fd = os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    os.close(fd)
    dst = sqlite3.connect(target.resolve().as_uri(), uri=True, isolation_level=None)
    try:
        _attach(dst, source)
        _copy(dst, campaign, run_key)
    finally:
        dst.close()


def _attach(dst: sqlite3.Connection, source: Path) -> None:
    """Attach ``source`` read-only as ``src``: through SQLite, so that the rows are copied
    without passing through Python (a million-row journal in seconds, not minutes)."""
    uri = source.resolve().as_uri() + "?mode=ro"
    try:
        dst.execute("ATTACH DATABASE ? AS src", (uri,))
        dst.execute("SELECT count(*) FROM src.sqlite_master").fetchone()
    except sqlite3.OperationalError as exc:
        if not cannot_open_wal_index(source, exc):
            raise
        # A store in a folder this user may not write (a read-only mount), closed cleanly: read
        # as it is, as `db.connect` reads it (SQLite cannot make the -shm it reads through).
        with contextlib.suppress(sqlite3.OperationalError):
            dst.execute("DETACH DATABASE src")
        dst.execute("ATTACH DATABASE ? AS src", (uri + "&immutable=1",))


def _copy(dst: sqlite3.Connection, campaign: str, run_key: str) -> None:
    dst.execute("BEGIN")
    version = int(dst.execute("PRAGMA src.user_version").fetchone()[0])
    schema = dst.execute(
        "SELECT type, name, sql FROM src.sqlite_master WHERE sql IS NOT NULL "
        "AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' ORDER BY rowid"
    ).fetchall()
    tables = [name for kind, name, _ in schema if kind == "table"]
    found = (dst.execute("SELECT id FROM src.runs WHERE campaign = ? AND run_key = ?",
                         (campaign, run_key)).fetchone() if "runs" in tables else None)
    run_id = None if found is None else found[0]
    for kind, _, sql in schema:
        if kind == "table":
            dst.execute(sql)
    for table in tables:
        if table in PER_RUN_TABLES:
            columns = ", ".join(["rowid"] + [
                f'"{column}"' for (_, column, *_) in dst.execute(
                    f'PRAGMA src.table_info("{table}")')])
            dst.execute(f'INSERT INTO main."{table}" ({columns}) SELECT {columns} '
                        f'FROM src."{table}" WHERE run_id = ?', (run_id,))
        else:
            dst.execute(f'INSERT INTO main."{table}" SELECT * FROM src."{table}"')
    # Indexes (and anything else) after the rows: one sort each instead of an insert per row.
    for kind, _, sql in schema:
        if kind != "table":
            dst.execute(sql)
    if dst.execute("SELECT count(*) FROM src.sqlite_master WHERE type = 'table' "
                   "AND name = 'sqlite_sequence'").fetchone()[0]:
        # AUTOINCREMENT's high-water marks (ids are watermarks: a deleted top id is never reused).
        dst.execute("DELETE FROM main.sqlite_sequence")
        dst.execute("INSERT INTO main.sqlite_sequence SELECT * FROM src.sqlite_sequence")
    dst.execute(f"PRAGMA main.user_version = {version:d}")
    dst.execute("COMMIT")


@contextlib.contextmanager
def private_folder(prefix: str) -> Iterator[Path]:
    """A new folder (0700) in the temporary folder, removed on the way out. A dry run killed by
    SIGKILL cannot remove its own; folders of ``prefix`` that this user owns and that no living
    process holds (each holds a lock on a file in its folder, which the kernel drops when the
    process dies, in any pid namespace) are removed first."""
    sweep(prefix)
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    fd: int | None = None
    try:
        fd = os.open(folder / _LOCK, os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        if fd is not None:
            os.close(fd)


def sweep(prefix: str, now: float | None = None) -> list[Path]:
    """Remove the folders of ``prefix`` left in the temporary folder by processes that died
    (their lock is free) and owned by this user; returns them. Best effort: a folder it cannot
    read or remove is left as it is."""
    removed: list[Path] = []
    now = time.time() if now is None else now
    try:
        entries = list(Path(tempfile.gettempdir()).glob(f"{prefix}*"))
    except OSError:
        return removed
    for folder in entries:
        try:
            found = folder.lstat()
            if (not stat.S_ISDIR(found.st_mode) or found.st_uid != os.getuid()
                    or now - found.st_mtime < _SWEEP_MIN_AGE_S):
                continue
            fd = os.open(folder / _LOCK, os.O_RDWR | os.O_NOFOLLOW)
        except OSError:
            continue  # not ours, not one of these folders, or gone meanwhile
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # its process is alive
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
        finally:
            os.close(fd)
    return removed
