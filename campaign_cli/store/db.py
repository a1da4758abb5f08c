"""The store: one SQLite file in WAL mode, created 0600, with append-only migrations.

Where it lives: ``--store PATH``, else ``$CAMPAIGN_STORE``, else ``store.db`` in the platform's user
data directory (``~/.local/share/campaign-cli`` on Linux).

Migrations are named functions applied in order; ``PRAGMA user_version`` counts how many ran. Never
edit a released migration: append a new one. A store written by a newer campaign-cli (more
migrations than this one knows) is refused rather than misread.
"""

from __future__ import annotations

import itertools
import os
import re
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import sqlite_utils

from campaign_cli.addresses import address_hash as address_hash
from campaign_cli.errors import StoreError

APP_NAME = "campaign-cli"


def default_store_path(explicit: str | Path | None, env: Mapping[str, str]) -> Path:
    if explicit:
        return Path(explicit).expanduser()
    if env.get("CAMPAIGN_STORE"):
        return Path(env["CAMPAIGN_STORE"]).expanduser()
    import platformdirs  # deferred: nothing happens at import time

    # Without a home (no HOME and no passwd entry, or a relative one) platformdirs answers a
    # relative path, or raises in later versions: a store under the current folder would hold
    # opt-outs that a command run from elsewhere never sees.
    try:
        folder = Path(platformdirs.user_data_dir(APP_NAME, appauthor=False))
    except RuntimeError:
        folder = None
    if folder is None or not folder.is_absolute():
        raise StoreError(
            "cannot tell where the store lives: no absolute home or data directory (HOME, "
            "XDG_DATA_HOME); give --store PATH or set CAMPAIGN_STORE"
        )
    return folder / "store.db"




# --------------------------------------------------------------------------------------------
# Migrations: append only.


def _script(conn: sqlite3.Connection, sql: str) -> None:
    """Run several statements inside the caller's transaction (executescript would commit it)."""
    statement = ""
    for line in sql.splitlines(keepends=True):
        statement += line
        if sqlite3.complete_statement(statement):
            conn.execute(statement)
            statement = ""
    if statement.strip():
        raise ValueError(f"incomplete SQL statement: {statement!r}")


def _m001_initial(conn: sqlite3.Connection) -> None:
    _script(
        conn,
        """
        CREATE TABLE settings (
            key   TEXT PRIMARY KEY,
            value TEXT NOT NULL
        );

        -- The opt-out list. id is a watermark: a running send polls for ids above the last one it
        -- saw, so a suppression added mid-run is honoured by every message not yet sent.
        CREATE TABLE suppressions (
            id           INTEGER PRIMARY KEY AUTOINCREMENT,
            address_hash TEXT NOT NULL,
            address      TEXT,              -- normalised; NULL once erased (the hash stays)
            channel      TEXT NOT NULL,     -- sms | email | push | webhook | all
            reason       TEXT NOT NULL,
            source       TEXT NOT NULL,     -- cli | import:FILE | list:FILE | provider | ...
            created_at   TEXT NOT NULL,
            UNIQUE (address_hash, channel)
        );

        -- Consent evidence, append only. The effective state for (address, channel, purpose) is
        -- the record with the latest recorded_at; on a tie, revoked wins.
        CREATE TABLE consents (
            id           INTEGER PRIMARY KEY AUTOINCREMENT,
            address_hash TEXT NOT NULL,
            address      TEXT,
            channel      TEXT NOT NULL,     -- sms | email | push | webhook | all
            purpose      TEXT NOT NULL,     -- marketing | transactional
            status       TEXT NOT NULL CHECK (status IN ('granted', 'revoked')),
            source       TEXT NOT NULL,
            recorded_at  TEXT NOT NULL,     -- when the person gave or withdrew it
            created_at   TEXT NOT NULL,     -- when we learned of it
            UNIQUE (address_hash, channel, purpose, status, recorded_at, source)
        );
        CREATE INDEX consents_lookup ON consents (address_hash, channel, purpose);

        CREATE TABLE runs (
            id                INTEGER PRIMARY KEY,
            campaign          TEXT NOT NULL,
            run_key           TEXT NOT NULL,
            campaign_file     TEXT NOT NULL,
            recipients_file   TEXT NOT NULL,
            recipients_sha256 TEXT NOT NULL,
            purpose           TEXT NOT NULL,
            channels          TEXT NOT NULL,   -- JSON list, in order of preference
            currency          TEXT NOT NULL,
            max_spend_micros  INTEGER,
            status            TEXT NOT NULL,   -- running | done | failed | spend_cap |
                                               -- interrupted | aborted | error
            exit_code         INTEGER,
            total_rows        INTEGER,         -- data rows in the file, once read to the end
            template_hashes   TEXT,            -- JSON {template: sha256}
            created_at        TEXT NOT NULL,
            started_at        TEXT,
            finished_at       TEXT,
            sessions          INTEGER NOT NULL DEFAULT 0,  -- how often it was started or resumed
            last_error        TEXT,
            UNIQUE (campaign, run_key)
        );

        -- The journal: one row per (run, input row, channel), each in exactly one state.
        CREATE TABLE messages (
            run_id              INTEGER NOT NULL,
            row                 INTEGER NOT NULL,   -- data record number, from 1
            channel             TEXT NOT NULL,
            line                INTEGER NOT NULL,   -- physical line the record starts on
            rkey                TEXT,               -- the recipient key column
            address             TEXT,               -- normalised address
            -- What admission deduplicates on. NULL for rows that hold no claim (invalid,
            -- duplicate), so the unique indexes below never depend on `state`, and a state
            -- change never has to touch them (measured: a third of the journal's write cost).
            dedupe_key          TEXT,
            dedupe_addr         TEXT,
            state               TEXT NOT NULL,
            reason              TEXT,
            detail              TEXT,
            attempts            INTEGER NOT NULL DEFAULT 0,
            provider            TEXT,
            provider_message_id TEXT,
            status_code         INTEGER,
            error_code          TEXT,
            cost_micros         INTEGER NOT NULL DEFAULT 0,
            content_hash        TEXT,
            resent_in_doubt     INTEGER NOT NULL DEFAULT 0,
            updated_at          TEXT NOT NULL,
            PRIMARY KEY (run_id, row, channel)
        );
        -- Admission is INSERT OR IGNORE: these make the database, not a Python set, refuse a
        -- second row for the same recipient key (or address, where the run dedupes by address).
        CREATE UNIQUE INDEX messages_once_per_key ON messages (run_id, channel, dedupe_key)
            WHERE dedupe_key IS NOT NULL;
        CREATE UNIQUE INDEX messages_once_per_address ON messages (run_id, channel, dedupe_addr)
            WHERE dedupe_addr IS NOT NULL;
        """
    )
    conn.execute(
        "INSERT INTO settings (key, value) VALUES ('unsubscribe_secret', ?)",
        (secrets.token_hex(32),),
    )


def _m002_attempts(conn: sqlite3.Connection) -> None:
    """Every attempt to send, kept for diagnosis: which provider, what it said, how long it took."""
    _script(
        conn,
        """
        CREATE TABLE attempts (
            run_id              INTEGER NOT NULL,
            row                 INTEGER NOT NULL,
            channel             TEXT NOT NULL,
            attempt             INTEGER NOT NULL,
            provider            TEXT NOT NULL,
            outcome             TEXT NOT NULL,  -- sent | transient | rate_limited | permanent |
                                                -- in_doubt | auth | error
            status_code         INTEGER,
            provider_message_id TEXT,
            error_code          TEXT,
            error_text          TEXT,
            latency_ms          REAL,
            at                  TEXT NOT NULL
        );
        CREATE INDEX attempts_by_message ON attempts (run_id, row, channel);
        """,
    )


def _m003_webhook_spelling(conn: sqlite3.Connection) -> None:
    """Webhook URLs are normalised with a lower-case scheme and host since this version: entries
    written before are re-spelt (and re-hashed) so that they keep matching. An entry that now
    equals one already held goes; an erased entry (no address) cannot be re-hashed.

    The spelling rule is frozen here as it was in version 3 (a migration must do the same thing
    whenever it runs, whatever `normalize_webhook_url` becomes later)."""
    for table in ("suppressions", "consents"):
        rows = conn.execute(
            f"SELECT id, address FROM {table} WHERE address LIKE 'http%'"
        ).fetchall()
        for row_id, address in rows:
            spelt = _v3_webhook_spelling(address)
            if spelt is None or spelt == address:
                continue
            cursor = conn.execute(
                f"UPDATE OR IGNORE {table} SET address = ?, address_hash = ? "
                "WHERE id = ?",
                (spelt, address_hash(spelt), row_id),
            )
            if cursor.rowcount == 0:
                conn.execute(f"DELETE FROM {table} WHERE id = ?", (row_id,))


_V3_URL = re.compile(
    r"(https?)://([^\s/?#@]*@)?(\[[^\s/?#\]]*\]|[^\s/?#:@]+)(:[0-9]*)?([/?#][^\s]*)?",
    re.IGNORECASE,
)


def _v3_webhook_spelling(raw: str) -> str | None:
    """Version 3's webhook URL spelling: scheme and host lower-case, a default port dropped; None
    for what was not a webhook URL then."""
    text = raw.strip()
    if not text or not re.fullmatch(r"https?://[^\s/?#]+[^\s]*", text, re.IGNORECASE):
        return None
    match = _V3_URL.fullmatch(text)
    if match is None:
        return text
    scheme, userinfo, host, port, rest = match.groups()
    scheme = scheme.lower()
    if port == {"http": ":80", "https": ":443"}[scheme]:
        port = ""
    return f"{scheme}://{userinfo or ''}{host.lower()}{port or ''}{rest or ''}"


def _m004_doubt_micros(conn: sqlite3.Connection) -> None:
    """What earlier in-doubt attempts of a message may have cost. A row that leaves `in_doubt`
    (resent, refused, dry-run) adds its cost here first: its next attempt overwrites
    ``cost_micros``, and the first charge may have happened all the same."""
    conn.execute(
        "ALTER TABLE messages ADD COLUMN doubt_micros INTEGER NOT NULL DEFAULT 0"
    )


def _m005_session_report(conn: sqlite3.Connection) -> None:
    """What the last session of a run reported, so that `status --json` says what `send --json`
    said: why it stopped (``stopped``), how many rows were in doubt when it started and how many
    of them it sent again. Runs finished before this version read NULL, 0 and 0."""
    _script(
        conn,
        """
        ALTER TABLE runs ADD COLUMN stopped TEXT;
        ALTER TABLE runs ADD COLUMN in_doubt_found INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE runs ADD COLUMN in_doubt_resent INTEGER NOT NULL DEFAULT 0;
        """,
    )


def _m006_run_recipient_key(conn: sqlite3.Connection) -> None:
    """The recipient key column a run was started with: the journal claims each key once per
    run, so a resume that read another column would take people for duplicates of others. Runs
    started before this version read NULL (their next session records it)."""
    conn.execute("ALTER TABLE runs ADD COLUMN recipient_key TEXT")


def _m007_run_strategy(conn: sqlite3.Connection) -> None:
    """The strategy a run was started with: `all` journals every channel of a row,
    `first_available` one, so a resume under the other would leave rows pending for ever or
    send a second channel to some recipients only. Runs started before this version read NULL
    (their next session records it)."""
    conn.execute("ALTER TABLE runs ADD COLUMN strategy TEXT")


def _m008_run_reading(conn: sqlite3.Connection) -> None:
    """How a run reads its recipient file (JSON: address columns, default region, delimiter):
    a resume that read it another way would send pending rows to addresses other than those
    journaled and checked. Runs started before this version read NULL (their next session
    records it)."""
    conn.execute("ALTER TABLE runs ADD COLUMN reading TEXT")


def _m009_early_journal_claims(conn: sqlite3.Connection) -> None:
    """The first campaign-cli's journal (its migration 1 was changed after it had written
    stores) marked claims with ``dedupe_address`` and partial indexes on ``state``, and has no
    ``dedupe_key`` / ``dedupe_addr``: every journal write failed on such a store. Its claims are
    carried over, so that a resumed run still takes a recipient it holds for a duplicate. A
    store of any later version has the columns: nothing changes."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(messages)")}
    if "dedupe_key" in columns:
        return
    _script(
        conn,
        """
        DROP INDEX IF EXISTS messages_once_per_key;
        DROP INDEX IF EXISTS messages_once_per_address;
        ALTER TABLE messages ADD COLUMN dedupe_key TEXT;
        ALTER TABLE messages ADD COLUMN dedupe_addr TEXT;
        UPDATE messages SET dedupe_key = rkey,
                            dedupe_addr = CASE dedupe_address WHEN 1 THEN address END
            WHERE state NOT IN ('invalid', 'duplicate');
        CREATE UNIQUE INDEX messages_once_per_key ON messages (run_id, channel, dedupe_key)
            WHERE dedupe_key IS NOT NULL;
        CREATE UNIQUE INDEX messages_once_per_address ON messages (run_id, channel, dedupe_addr)
            WHERE dedupe_addr IS NOT NULL;
        """,
    )


def _m010_journal_webhook_spelling(conn: sqlite3.Connection) -> None:
    """Migration 3 re-spelt the webhook URLs of suppressions and consents, not those the run
    journals of earlier versions hold as typed: an erasure (which blanks the journal's rows of
    the normalised address) and `trace` never found them. They are re-spelt the same way. A
    claim that now equals another row's in the same run keeps its old spelling (both rows were
    journaled: the claim only refuses rows still to come)."""
    rows = conn.execute(
        "SELECT rowid, address, dedupe_addr FROM messages "
        "WHERE channel = 'webhook' AND address LIKE 'http%'"
    ).fetchall()
    for rowid, address, claim in rows:
        spelt = _v3_webhook_spelling(address)
        if spelt is None or spelt == address:
            continue
        conn.execute("UPDATE messages SET address = ? WHERE rowid = ?", (spelt, rowid))
        if claim is not None:
            conn.execute(
                "UPDATE OR IGNORE messages SET dedupe_addr = ? WHERE rowid = ?", (spelt, rowid)
            )


def _m011_run_summary(conn: sqlite3.Connection) -> None:
    """A finished session's counts, spend and sent messages (JSON), written with its end in the
    same transaction, so that `campaign status` need not read every journal row of every run
    it lists. NULL while a session runs, for a session whose end was not recorded, and for runs
    finished before this version: their counts are read from the journal."""
    conn.execute("ALTER TABLE runs ADD COLUMN summary TEXT")


MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (
    _m001_initial, _m002_attempts, _m003_webhook_spelling, _m004_doubt_micros,
    _m005_session_report, _m006_run_recipient_key, _m007_run_strategy, _m008_run_reading,
    _m009_early_journal_claims, _m010_journal_webhook_spelling, _m011_run_summary,
)


def migrate(conn: sqlite3.Connection) -> int:
    """Apply the migrations this store lacks; returns the schema version."""
    version: int = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > len(MIGRATIONS):
        raise StoreError(
            f"the store has schema version {version}, newer than this campaign-cli knows "
            f"({len(MIGRATIONS)}): upgrade campaign-cli"
        )
    for number, migration in enumerate(MIGRATIONS[version:], start=version + 1):
        begin_immediate(conn)
        try:
            # Another process may have migrated while we waited for the lock.
            current = conn.execute("PRAGMA user_version").fetchone()[0]
            if current >= number:
                conn.execute("COMMIT")
                continue
            migration(conn)
            conn.execute(f"PRAGMA user_version = {number:d}")
            conn.execute("COMMIT")
        except BaseException:
            rollback(conn)
            raise
    return len(MIGRATIONS)


#: SQLite's historical limit on bound parameters was 999; stay well below it.
MAX_PARAMS = 500

T = TypeVar("T")


def batched(items: Iterable[T], size: int) -> Iterator[Sequence[T]]:
    """``items`` in runs of ``size`` (the last one shorter): slices of a sequence, lists read
    from any other iterable (a file being read) as they fill."""
    if isinstance(items, Sequence):
        for start in range(0, len(items), size):
            yield items[start : start + size]
        return
    it = iter(items)
    while batch := list(itertools.islice(it, size)):
        yield batch


def insert_rows(conn: sqlite3.Connection, head: str, rows: Sequence[Sequence[Any]]) -> None:
    """Run ``head`` (``INSERT ... INTO t (a, b, c)``) for every row, many rows per statement.

    Same effect as ``executemany(head + " VALUES (?, ?, ?)", rows)`` in the same transaction,
    but with one ``sqlite3_step`` per statement instead of one per row. Python's sqlite3 lets go
    of the GIL around every step and must win it back after, so on a journal thread next to a
    busy event loop, ``executemany`` waits for the loop once per row; here once per
    ``MAX_PARAMS // width`` rows (41 for admission's 12 columns).
    """
    if not rows:
        return
    width = len(rows[0])
    per = max(1, MAX_PARAMS // width)
    one = "(" + ", ".join("?" * width) + ")"
    full = f"{head} VALUES {', '.join([one] * per)}"
    for part in batched(rows, per):
        sql = full if len(part) == per else f"{head} VALUES {', '.join([one] * len(part))}"
        conn.execute(sql, [value for row in part for value in row])


#: How long a write may wait for another process's write lock (a large `suppress import`, a run
#: importing a big list: one transaction each) before it gives up: SQLite's busy timeout (10 s)
#: is one try of it. A run's sends wait at their intent barrier meanwhile: nothing unjournaled.
LOCK_WAIT = 300.0
#: SQLite's busy timeout on every store connection (milliseconds): one try of `begin_immediate`.
BUSY_TIMEOUT_MS = 10_000


#: One try of `begin_immediate` when its caller may give the wait up (milliseconds): SQLite's
#: busy wait cannot be interrupted, and Python runs a signal's handler (a Ctrl-C) only after it.
GIVE_UP_TRY_MS = 200


def loose_permissions(path: Path) -> str | None:
    """A warning when the store can be read or written by users other than its owner: it holds
    every address, opt-out and consent record. The store is created 0600, but a `chmod`, a copy
    or a restore from a backup may loosen it (and SQLite gives its -wal and -shm the same mode).
    None when it cannot tell."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return None
    if mode & 0o077 == 0:
        return None
    return (f"{path} can be read by other users (mode {mode & 0o777:04o}): it holds addresses, "
            f"opt-outs and consent records; restrict it with: chmod 600 {path}")


def sql_limit(limit: int) -> int:
    """``limit`` as SQLite's LIMIT takes it: a signed 64-bit integer, where a larger number (an
    operator's "all of them") would fail to bind. Negative: none."""
    return max(0, min(limit, 2**62))


class LockWaitAbandoned(Exception):
    """A wait for another process's write lock given up on purpose (an immediate stop): the
    write was not made."""


def begin_immediate(conn: sqlite3.Connection, wait: float = LOCK_WAIT,
                    on_busy: Callable[[], None] | None = None, *,
                    short_tries: bool = False) -> None:
    """BEGIN IMMEDIATE, trying again while another process holds the write lock, up to ``wait``
    seconds in all (each try waits the connection's busy timeout); ``on_busy`` is told of each
    try that found the lock taken, and may raise to give the wait up. ``short_tries``: each try
    waits at most `GIVE_UP_TRY_MS`, so that ``on_busy`` is asked that often."""
    deadline = time.monotonic() + wait
    timeout: int | None = None
    if short_tries:
        timeout = conn.execute("PRAGMA busy_timeout").fetchone()[0]
        conn.execute(f"PRAGMA busy_timeout = {min(timeout, GIVE_UP_TRY_MS):d}")
    try:
        while True:
            try:
                conn.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if not is_busy(exc) or time.monotonic() >= deadline:
                    raise
                if on_busy is not None:
                    on_busy()
    finally:
        if timeout is not None:
            conn.execute(f"PRAGMA busy_timeout = {timeout:d}")


def is_busy(exc: sqlite3.OperationalError) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+; maybe an extended code
    if isinstance(code, int):
        return (code & 0xFF) in (5, 6)  # SQLITE_BUSY, SQLITE_LOCKED
    return "locked" in str(exc) or "busy" in str(exc)


def is_disk_full(exc: sqlite3.Error) -> bool:
    """The disk SQLite was writing to (the store's, or its temporary folder's) is full."""
    code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+; maybe an extended code
    if isinstance(code, int):
        return (code & 0xFF) == 13  # SQLITE_FULL
    return "disk is full" in str(exc)


def is_read_only(exc: sqlite3.Error) -> bool:
    """SQLite opened the store read-only (it does so silently when the file cannot be opened
    for writing: its mode, an immutable file, a read-only file system) and a write was refused."""
    code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+; maybe an extended code
    if isinstance(code, int):
        return (code & 0xFF) == 8  # SQLITE_READONLY
    return "readonly database" in str(exc)


def read_only_error(path: Path) -> StoreError:
    return StoreError(
        f"{path}: the store is read-only here (file permissions, an immutable file or a "
        "read-only file system): nothing was written"
    )


def refused_write(path: Path, exc: sqlite3.Error) -> StoreError | None:
    """The store error for a write SQLite refused before anything was written (a read-only
    store, a full disk: the transaction is rolled back); None for any other error."""
    if is_read_only(exc):
        return read_only_error(path)
    if is_disk_full(exc):
        return StoreError(f"{path}: the store's disk is full: nothing was written; free some "
                          "space and try again")
    return None


def rollback(conn: sqlite3.Connection) -> None:
    """ROLLBACK, unless SQLite already rolled the transaction back itself (it does on a full
    disk or an I/O error, and ROLLBACK would then fail, hiding why)."""
    if conn.in_transaction:
        conn.execute("ROLLBACK")


def connect(
    path: Path, *, create: bool = True, readonly: bool = False, durable: bool = True
) -> sqlite3.Connection:
    """Open (and if need be create, 0600, and migrate) the store. Autocommit mode: callers say
    BEGIN themselves, so that a batch is one transaction.

    ``durable``: each commit reaches the disk before it returns (``synchronous = FULL``: the WAL
    is synced at every commit), so that it survives a power cut or a kernel crash, not only the
    death of the process. An opt-out, a consent and a `sending` intent are records of that kind.
    False (``NORMAL``, the WAL synced only at checkpoints) is for a journal whose messages stay
    on this machine (console, outbox, dry run): they are lost in the same power cut as their
    journal rows, and a resend of one replaces or repeats only local output."""
    path = Path(path)
    if not path.exists():
        if not create or readonly:
            raise StoreError(
                f"{path}: no store here (it is created by the first command that writes)"
            )
        # A dangling symlink names the file to create: O_EXCL refuses to follow it, and SQLite
        # would then create that file itself, with the umask's mode (0644).
        target = path.resolve()
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            os.close(fd)
        except FileExistsError:
            pass
        except OSError as exc:
            raise StoreError(f"{path}: cannot create the store: {exc.strerror}") from None
    conn: sqlite3.Connection | None = None
    migrated = not readonly  # the caller reads a store as it is only when it asks to
    try:
        if readonly:
            conn = sqlite3.connect(
                f"{path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None,
                check_same_thread=False,
            )
        else:
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS:d}")
        # A newer program's store is refused before anything here changes it (journal_mode
        # WAL rewrites the file's header).
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.OperationalError as exc:
            if not cannot_open_wal_index(path, exc):
                raise
            # In a folder this user may not write (a read-only mount, a snapshot) SQLite cannot
            # create the WAL's index (-shm) it reads through. A store closed cleanly has all
            # its data in the file (no write-ahead log): read as it is, nobody can write it
            # here. A write then fails as read-only.
            conn.close()
            conn = sqlite3.connect(
                f"{path.resolve().as_uri()}?mode=ro&immutable=1", uri=True,
                isolation_level=None, check_same_thread=False,
            )
            readonly = True
            version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > len(MIGRATIONS):  # (the connection is closed below, as on every error)
            raise StoreError(
                f"{path}: the store has schema version {version}, newer than this campaign-cli "
                f"knows ({len(MIGRATIONS)}): upgrade campaign-cli"
            )
        if migrated and version < len(MIGRATIONS) and readonly:
            raise _cannot_upgrade(path, version)
        if not readonly:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute(f"PRAGMA synchronous = {'FULL' if durable else 'NORMAL'}")
            try:
                migrate(conn)
            except sqlite3.Error as exc:
                if is_read_only(exc):
                    raise _cannot_upgrade(path, version) from None
                raise
    except BaseException as exc:
        if conn is not None:
            conn.close()  # not left to the garbage collector (Python 3.13 warns of it)
        if isinstance(exc, sqlite3.DatabaseError):
            raise StoreError(f"{path}: not a usable campaign store: {exc}") from None
        raise
    return conn


def _cannot_upgrade(path: Path, version: int) -> StoreError:
    """An older campaign-cli's store where it cannot be written: today's commands read the
    columns its migrations add."""
    return StoreError(
        f"{path}: the store has schema version {version}, older than this campaign-cli's "
        f"({len(MIGRATIONS)}), and is read-only here (file permissions, an immutable file or a "
        "read-only file system): it cannot be upgraded; open it once where it can be written"
    )


def cannot_open_wal_index(path: Path, exc: sqlite3.OperationalError) -> bool:
    """SQLite could not open the store (SQLITE_CANTOPEN), though it exists, and no write-ahead log
    with data is beside it (its -shm is what could not be made)."""
    code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+; maybe an extended code
    if not ((code & 0xFF) == 14 if isinstance(code, int)
            else "unable to open database file" in str(exc)):
        return False
    try:
        return Path(f"{path}-wal").stat().st_size == 0
    except FileNotFoundError:
        return path.exists()
    except OSError:
        return False


class Store:
    """An open store: the connection for short reads and writes from commands, and the path so
    that a run can open the extra connections it needs (journal writer thread, policy reader)."""

    def __init__(self, path: Path, conn: sqlite3.Connection) -> None:
        self.path = path
        self.conn = conn
        self.db = sqlite_utils.Database(conn)

    @classmethod
    def open(cls, path: Path | str, *, create: bool = True) -> Store:
        path = Path(path)
        return cls(path, connect(path, create=create))

    def connect(self, *, readonly: bool = False) -> sqlite3.Connection:
        return connect(self.path, readonly=readonly)

    def setting(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> None:
        self.close()
        # The store opens for reading where it cannot be written (status and the lists work);
        # the first write says so on one line rather than as an internal error.
        refused = refused_write(self.path, exc) if isinstance(exc, sqlite3.Error) else None
        if refused is not None:
            raise refused from None
