"""The suppression (opt-out) list: who must not be sent to, on which channel.

One row per (address, channel); ``channel = 'all'`` suppresses every channel. Addresses are stored
normalised (`campaign_cli.addresses`) next to their `address_hash`, and every lookup goes by hash,
so ``+1 (415) 555-0100`` and ``+14155550100`` are one entry and an erased address (``address``
set to NULL) stays suppressed.

A run reads this table twice (see `campaign_cli.policy`): once per chunk with `suppressed_among`,
and by watermark with `suppressions_since`, so that an opt-out added while a run is going is
honoured by every message not yet sent. The watermark is the ``id`` column: AUTOINCREMENT never
reuses an id, and SQLite commits writers one at a time, so ids become visible in order.

CSV export and spreadsheets: a cell that begins with ``= + - @``, TAB or CR is exported with a
leading apostrophe, so that a spreadsheet opening the file shows text instead of evaluating a
formula (OWASP "CSV injection"). A phone number therefore exports as ``'+14155550100``; that is
deliberate, and `import_csv` strips the apostrophe again, so an export re-imports unchanged.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import errno
import os
import re
import sqlite3
import stat
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from campaign_cli.addresses import (
    AddressError,
    address_hash,
    normalize_address,
    normalize_email,
    normalize_phone,
    normalize_webhook_url,
)
from campaign_cli.errors import InputError, StoreError
from campaign_cli.models import Channel
from campaign_cli.store.db import (
    MAX_PARAMS,
    batched,
    begin_immediate,
    is_disk_full,
    rollback,
    sql_limit,
)

#: Channels a suppression or a consent record may name: every channel, or all of them at once.
CHANNELS: tuple[str, ...] = tuple(c.value for c in Channel) + ("all",)

EXPORT_COLUMNS = ("address", "channel", "reason", "source", "created_at", "address_hash")
ADDRESS_COLUMNS = ("address", "phone", "email")
#: Entries a listing or an export reads per query.
LIST_PAGE = 1000

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class AddResult:
    added: int
    already: int


#: Bad lines of an import whose details are kept (the rest are counted): a file of a million bad
#: lines must not hold a million messages in memory, nor print them.
INVALID_KEPT = 100


@dataclass(frozen=True)
class ImportResult:
    """What an import did. ``invalid`` holds (line, address as written, reason) for the first
    `INVALID_KEPT` lines left out, ``invalid_total`` counts them all; the reason starts with the
    field at fault (``address: not a valid ...``)."""

    added: int
    already: int
    invalid: list[tuple[int, str, str]] = field(default_factory=list)
    invalid_total: int = 0


class InvalidLines:
    """The bad lines of an import: the first `INVALID_KEPT` in detail, all of them counted."""

    def __init__(self) -> None:
        self.kept: list[tuple[int, str, str]] = []
        self.total = 0

    def append(self, entry: tuple[int, str, str]) -> None:
        self.total += 1
        if len(self.kept) < INVALID_KEPT:
            self.kept.append(entry)


# --------------------------------------------------------------------------------------------
# Helpers shared with store/consents.py.


@contextlib.contextmanager
def write_transaction(
    conn: sqlite3.Connection, on_busy: Callable[[], None] | None = None
) -> Iterator[None]:
    """One ``BEGIN IMMEDIATE`` ... ``COMMIT`` (store connections are in autocommit mode). Inside a
    transaction the caller already opened, it adds nothing: the caller commits. ``on_busy``: as
    for `begin_immediate` (it may raise to give up waiting for another process's write)."""
    if conn.in_transaction:
        yield
        return
    # Waits for another process's long write (up to LOCK_WAIT): an opt-out being recorded must
    # not give up after SQLite's 10 s busy timeout. In short tries: Python sees a Ctrl-C only
    # between two.
    begin_immediate(conn, on_busy=on_busy, short_tries=True)
    try:
        yield
    except BaseException:
        rollback(conn)
        raise
    conn.execute("COMMIT")


#: Rows staged per statement by `insert_all`.
STAGE_BATCH = 1000


def insert_all(
    conn: sqlite3.Connection, table: str, columns: Sequence[str], rows: Iterable[Sequence[Any]],
    check: Callable[[], None] | None = None,
) -> tuple[int, int]:
    """``INSERT OR IGNORE`` every row into ``table``, in order, all or nothing: ``(added,
    already)``. The rows are staged first in a TEMP table of this connection (writing it takes
    no lock on the store), then copied in one statement, so the store's write lock is held for
    the copy alone, not while ``rows`` reads and checks a file: a large import no longer holds
    up every running campaign's journal (and past five minutes, aborted them). Inside a
    transaction the caller opened, the rows go straight in (the caller holds the lock).
    ``check`` is called before each batch of rows and while the lock is waited for: it may raise
    to give the import up (nothing of it is then in the store)."""
    names = ", ".join(columns)
    marks = ", ".join("?" * len(columns))
    if conn.in_transaction:
        added = total = 0
        for batch in batched(rows, STAGE_BATCH):
            if check is not None:
                check()
            before = conn.total_changes
            conn.executemany(f"INSERT OR IGNORE INTO {table} ({names}) VALUES ({marks})", batch)
            added += conn.total_changes - before
            total += len(batch)
        return added, total - added
    stage = f"temp.staged_{table}"
    conn.execute(f"DROP TABLE IF EXISTS {stage}")
    conn.execute(f"CREATE TEMP TABLE staged_{table} AS SELECT {names} FROM main.{table} WHERE 0")
    try:
        total = 0
        try:
            for batch in batched(rows, STAGE_BATCH):
                if check is not None:
                    check()
                conn.executemany(f"INSERT INTO {stage} ({names}) VALUES ({marks})", batch)
                total += len(batch)
        except sqlite3.OperationalError as exc:
            # The staged rows spill to SQLite's temporary folder, not to the store's disk.
            if not is_disk_full(exc):
                raise
            raise StoreError(
                f"SQLite's temporary folder {sqlite_temp_folder()} is full: nothing was "
                "written; free some space there, or set SQLITE_TMPDIR to a folder with room"
            ) from None
        with write_transaction(conn, check):
            added = conn.execute(
                f"INSERT OR IGNORE INTO main.{table} ({names}) "
                f"SELECT {names} FROM {stage} ORDER BY rowid"
            ).rowcount
    finally:
        # A full temporary folder may refuse this too (it needs a journal there), which would
        # hide why the import stopped, or fail one already copied in: the next import drops it.
        with contextlib.suppress(sqlite3.Error):
            conn.execute(f"DROP TABLE IF EXISTS {stage}")
    return added, total - added


def sqlite_temp_folder() -> str:
    """The folder SQLite writes its temporary files in (a TEMP table that outgrows its cache):
    on Unix the first writable of SQLITE_TMPDIR, TMPDIR, /var/tmp, /usr/tmp, /tmp, else ".";
    elsewhere the system's temporary folder."""
    if os.name != "posix":
        import tempfile

        return tempfile.gettempdir()
    for folder in (os.environ.get("SQLITE_TMPDIR"), os.environ.get("TMPDIR"),
                   "/var/tmp", "/usr/tmp", "/tmp"):  # noqa: S108 (SQLite's list, os_unix.c)
        if folder and os.path.isdir(folder) and os.access(folder, os.W_OK | os.X_OK):
            return folder
    return "."


@contextlib.contextmanager
def read_snapshot(conn: sqlite3.Connection) -> Iterator[None]:
    """Several reads that must see one state of the database."""
    if conn.in_transaction:
        yield
        return
    conn.execute("BEGIN")
    try:
        yield
    finally:
        conn.execute("COMMIT")


def check_channel(channel: str) -> str:
    if channel not in CHANNELS:
        raise ValueError(f"unknown channel {channel!r}: expected one of {', '.join(CHANNELS)}")
    return channel


def infer_channel(raw: str) -> str:
    """The channel an address's shape suggests: email with an ``@``, webhook for an http(s) URL,
    else SMS. Push tokens cannot be told from the rest: they need an explicit channel."""
    text = raw.strip()
    if "@" in text:
        return Channel.EMAIL.value
    if text.lower().startswith(("http://", "https://")):
        return Channel.WEBHOOK.value
    return Channel.SMS.value


def normalize_for(raw: str, channel: str | None, default_region: str = "US") -> tuple[str, str]:
    """``(normalised address, channel)`` for a raw address and a channel that may be ``None``
    (inferred from the address) or ``'all'``. Raises `AddressError`.

    For ``'all'`` the address is normalised as a phone, else as an email (else as a webhook URL),
    so that its hash matches the one a run computes on any channel."""
    if channel is None:
        channel = infer_channel(raw)
    check_channel(channel)
    if channel != "all":
        return normalize_address(Channel(channel), raw, default_region), channel
    text = raw.strip()
    if not text:
        raise AddressError("no_address", "address is empty")
    if "@" in text:
        return normalize_email(text), channel
    if text.lower().startswith(("http://", "https://")):
        return normalize_webhook_url(text), channel
    try:
        return normalize_phone(text, default_region), channel
    except AddressError:
        pass
    try:
        return normalize_email(text), channel
    except AddressError:
        raise AddressError(
            "bad_address", f"neither a phone number nor an email address: {text!r}"
        ) from None


def protect_cell(value: str) -> str:
    """Defuse spreadsheet formula injection: text that a spreadsheet would evaluate gets a
    leading apostrophe (so ``+14155550100`` exports as ``'+14155550100``). So does text that
    already starts with apostrophes before such a character (``'=ann@example.com`` is a valid
    address), so that `unprotect_cell` gives it back whole."""
    return "'" + value if value.lstrip("'").startswith(_FORMULA_START) else value


def unprotect_cell(value: str) -> str:
    """Undo `protect_cell` and trim: ``'+14155550100`` -> ``+14155550100``, ``''=x`` -> ``'=x``.
    An apostrophe before anything else is left alone (it may belong to the value)."""
    text = value.strip()
    if text.startswith("'") and text.lstrip("'").startswith(_FORMULA_START):
        text = text[1:].strip()
    return text


@dataclass(frozen=True)
class CsvRecord:
    line: int  # the physical line on which the record starts
    fields: dict[str, str]  # lower-cased header -> cell, unprotected and trimmed


def _byte_lines(handle: IO[bytes], size: int = 1 << 16) -> Iterator[bytes]:
    """The file's lines, each with its end: LF, CRLF or CR alone (classic Mac files, which the
    CSV reader of a recipient list reads too). A binary file's own lines end at LF only."""
    pending = b""
    while chunk := handle.read(size):
        lines = (pending + chunk).splitlines(keepends=True)
        # The last line may go on in the next chunk (a CR there may be followed by its LF).
        pending = lines.pop() if not lines[-1].endswith(b"\n") else b""
        yield from lines
    if pending:
        yield pending


def _decoded_lines(handle: IO[bytes], name: str) -> Iterator[str]:
    """The file's lines as text, decoded one at a time so that bad UTF-8 is reported on the
    line where it is (a text-mode file decodes whole buffers ahead of the CSV reader)."""
    for number, raw in enumerate(_byte_lines(handle), start=1):
        if number == 1 and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8) :]
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(
                name, number, None, f"not UTF-8 text ({exc.reason} at byte {exc.start + 1})"
            ) from None


@contextlib.contextmanager
def open_csv(path: str | Path) -> Iterator[tuple[list[str], Iterator[CsvRecord]]]:
    """Open a CSV file with a header row: the lower-cased column names, and the records (blank
    lines skipped). Raises `InputError` naming the file (and line) when it cannot be read."""
    name = str(path)
    try:
        handle = open(path, "rb")
    except OSError as exc:
        raise InputError(name, None, None, f"cannot read: {exc.strerror}") from None
    with handle:
        # Strict: a quote left open would otherwise swallow every later line into one cell.
        reader = csv.reader(_decoded_lines(handle, name), strict=True)
        try:
            header = next(reader, None)
        except csv.Error as exc:
            raise InputError(name, 1, None, _csv_problem(exc)) from None
        if header is None:
            raise InputError(name, None, None, "the file is empty: a header row is expected")
        columns = [c.strip().lower() for c in header]
        for number, column in enumerate(columns, 1):
            if column and columns.index(column) + 1 != number:  # one would hide the other
                raise InputError(name, 1, column, f"column name repeated (columns "
                                 f"{columns.index(column) + 1} and {number})")

        def records() -> Iterator[CsvRecord]:
            start = reader.line_num + 1
            while True:
                try:
                    row = next(reader)
                except StopIteration:
                    return
                except csv.Error as exc:
                    raise InputError(name, start, None, _csv_problem(exc)) from None
                line, start = start, reader.line_num + 1
                if not any(cell.strip() for cell in row):
                    continue
                # A short row lacks its last cells; cells past the header are dropped.
                pairs = zip(columns, row, strict=False)
                cells = {col: unprotect_cell(cell) for col, cell in pairs if col}
                yield CsvRecord(line, cells)

        yield columns, records()


def _csv_problem(exc: csv.Error) -> str:
    if "unexpected end of data" in str(exc):
        return ('a quoted field is never closed: add the closing quote (a quote inside a quoted '
                'field is written "")')
    return f"not readable as CSV: {exc}"


def address_columns(columns: Sequence[str], file: str) -> list[str]:
    """The address columns a file has (``address``, ``phone``, ``email``): every one is read, so
    that a file with both a phone and an email column loses neither (an opt-out is per address)."""
    found = [name for name in ADDRESS_COLUMNS if name in columns]
    if not found:
        raise InputError(file, 1, None,
                         "no address column: expected one named address, phone or email")
    return found


def row_addresses(fields: dict[str, str], address_cols: Sequence[str]) -> list[str]:
    """A record's addresses, one per address column that holds one; ``[""]`` when none does (the
    record is then judged as one with an empty address)."""
    return [value for col in address_cols if (value := fields.get(col, ""))] or [""]


# --------------------------------------------------------------------------------------------
# What a run asks.


def suppressed_among(conn: sqlite3.Connection, hashes: Sequence[str], channel: str) -> set[str]:
    """Those of ``hashes`` suppressed for ``channel`` (directly or through ``'all'``)."""
    unique = list(dict.fromkeys(hashes))
    found: set[str] = set()
    for batch in batched(unique, MAX_PARAMS - 1):
        marks = ",".join("?" * len(batch))
        rows = conn.execute(
            f"SELECT DISTINCT address_hash FROM suppressions "
            f"WHERE channel IN (?, 'all') AND address_hash IN ({marks})",
            (channel, *batch),
        )
        found.update(row[0] for row in rows)
    return found


def max_suppression_id(conn: sqlite3.Connection) -> int:
    """The watermark before a run starts: suppressions with a higher id came later."""
    return int(conn.execute("SELECT COALESCE(MAX(id), 0) FROM suppressions").fetchone()[0])


def suppressions_since(
    conn: sqlite3.Connection, mark: int, limit: int = -1
) -> tuple[int, list[tuple[str, str]]]:
    """``(new mark, [(address_hash, channel)])`` for the suppressions with ``id > mark``: the
    first ``limit`` of them (all if negative); the next call goes on from the new mark."""
    rows = conn.execute(
        "SELECT id, address_hash, channel FROM suppressions WHERE id > ? ORDER BY id LIMIT ?",
        (mark, limit),
    ).fetchall()
    if not rows:
        return mark, []
    return int(rows[-1][0]), [(str(h), str(c)) for _, h, c in rows]


# --------------------------------------------------------------------------------------------
# Managing the list.


def add_suppressions(
    conn: sqlite3.Connection,
    items: Iterable[tuple[str, str]],
    reason: str,
    source: str,
    now: str,
) -> AddResult:
    """Add ``(normalised address, channel)`` pairs in one transaction. An entry already on the
    list is left as it is (its reason and date are kept) and counted in ``already``."""
    added = already = 0
    with write_transaction(conn):
        for address, channel in items:
            check_channel(channel)
            cursor = conn.execute(
                "INSERT OR IGNORE INTO suppressions "
                "(address_hash, address, channel, reason, source, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (address_hash(address), address, channel, reason, source, now),
            )
            if cursor.rowcount == 1:
                added += 1
            else:
                already += 1
    return AddResult(added, already)


def _hash_filter(address: str, channel: str | None, *, with_all: bool) -> tuple[str, list[str]]:
    where = "address_hash = ?"
    params = [address_hash(address)]
    if channel is not None:
        check_channel(channel)
        if with_all and channel != "all":
            where += " AND channel IN (?, 'all')"
        else:
            where += " AND channel = ?"
        params.append(channel)
    return where, params


def remove_suppression(conn: sqlite3.Connection, address: str, channel: str | None) -> int:
    """Remove the entries for a normalised address: for that exact channel, or every channel
    when ``channel`` is None. An ``'all'`` entry is only removed by channel ``'all'`` or None.
    Returns how many entries went."""
    return len(remove_entries(conn, address, channel))


def remove_entries(
    conn: sqlite3.Connection, address: str, channel: str | None
) -> list[dict[str, Any]]:
    """`remove_suppression`, returning the entries that went (their source says whether the
    recipient opted out with the provider, or a campaign's list will bring the entry back)."""
    where, params = _hash_filter(address, channel, with_all=False)
    with write_transaction(conn):
        rows = conn.execute(
            f"SELECT {_COLUMNS} FROM suppressions WHERE {where} ORDER BY id", params
        ).fetchall()
        conn.execute(f"DELETE FROM suppressions WHERE {where}", params)
    return [_as_dict(row) for row in rows]


@dataclass(frozen=True)
class EraseResult:
    suppressed_now: bool  # an `all` entry was added (there was none)
    suppressions: int  # entries whose address was blanked (the hash stays)
    consents: int
    journal_rows: int


def erase_address(
    conn: sqlite3.Connection, address: str, now: str, default_region: str = "US"
) -> EraseResult:
    """Erase a normalised address (a data-protection request) without forgetting the opt-out:
    in one transaction the address becomes an `all` suppression kept by hash only, and its text
    is blanked wherever the store holds it (suppressions, consent records, run journals with
    their error texts, and the recipient key of the journal rows whose key is the address, as
    with ``key: email``). Matching by hash keeps working: the person is never sent to again."""
    hashed = address_hash(address)
    # Overwrite what is deleted or replaced with zeros, so that the old text does not linger in
    # free space; the checkpoint below moves it out of the write-ahead log.
    conn.execute("PRAGMA secure_delete = ON")
    with write_transaction(conn):
        added = conn.execute(
            "INSERT OR IGNORE INTO suppressions "
            "(address_hash, address, channel, reason, source, created_at) "
            "VALUES (?, NULL, 'all', 'erased', 'erasure', ?)",
            (hashed, now),
        ).rowcount
        blanked = conn.execute(
            "UPDATE suppressions SET address = NULL WHERE address_hash = ? AND address IS NOT NULL",
            (hashed,),
        ).rowcount
        consents = conn.execute(
            "UPDATE consents SET address = NULL WHERE address_hash = ? AND address IS NOT NULL",
            (hashed,),
        ).rowcount
        # The journal has no index on address or key (one would cost every run's admission):
        # it is read once, in one pass, and the rows found are changed by primary key. (Four
        # passes, one calling lower(trim()) on every row, held the store's write lock, and so
        # every running campaign, for 19 s per address on a journal of 5.6 million rows.)
        # A recipient key is journaled as the file spells it (``Ann@Example.com``): the keys of
        # the address's rows, and those equal to it but for case, are blanked if they are it.
        # (LIKE, case-blind for ASCII as lower() is, only spares lower(trim()) most rows.)
        found = conn.execute(
            "SELECT run_id, row, channel, rkey, address FROM messages WHERE address = :address "
            "OR (rkey LIKE :pattern ESCAPE '\\' AND lower(trim(rkey)) = lower(:address))",
            {"address": address, "pattern": _like_containing(address)},
        ).fetchall()
        keys = [key for key in dict.fromkeys(str(r[3]) for r in found if r[3] is not None)
                if _spells(key, address, default_region)]
        for batch in batched(keys, MAX_PARAMS):
            conn.execute(
                "UPDATE messages SET rkey = NULL, dedupe_key = NULL "
                f"WHERE rkey IN ({','.join('?' * len(batch))})",
                batch,
            )
        rows = [(run_id, row, channel) for run_id, row, channel, _, at in found if at == address]
        conn.executemany(
            "UPDATE attempts SET error_text = NULL WHERE run_id = ? AND row = ? AND channel = ?",
            rows,
        )
        journal = conn.executemany(
            "UPDATE messages SET address = NULL, dedupe_addr = NULL, detail = NULL "
            "WHERE run_id = ? AND row = ? AND channel = ?",
            rows,
        ).rowcount
    try:  # best effort: a reader still on an older snapshot keeps the log until it is done
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    except sqlite3.Error:
        pass
    return EraseResult(added == 1, blanked, consents, journal)


def _like_containing(text: str) -> str:
    """A LIKE pattern (``ESCAPE '\\'``) for the values that contain ``text``, but for the case
    of ASCII letters; past SQLite's limit on patterns (50,000 bytes), one for every value."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%" if len(escaped.encode()) < 40_000 else "%"


def _spells(raw: str, address: str, default_region: str) -> bool:
    """Whether ``raw`` (a recipient key) is a spelling of the normalised ``address``."""
    if raw.strip() == address:
        return True
    try:
        return normalize_for(raw, None, default_region)[0] == address
    except AddressError:
        return False


_FIELDS = ("id", "address_hash", "address", "channel", "reason", "source", "created_at")
_COLUMNS = ", ".join(_FIELDS)


def _as_dict(row: Sequence[Any]) -> dict[str, Any]:
    return dict(zip(_FIELDS, row, strict=True))


def is_suppressed(
    conn: sqlite3.Connection, address: str, channel: str | None
) -> list[dict[str, Any]]:
    """The entries that suppress a normalised address on ``channel`` (its own and ``'all'``),
    or on any channel when ``channel`` is None. Empty: not suppressed."""
    where, params = _hash_filter(address, channel, with_all=True)
    rows = conn.execute(f"SELECT {_COLUMNS} FROM suppressions WHERE {where} ORDER BY id", params)
    return [_as_dict(row) for row in rows]


def list_suppressions(
    conn: sqlite3.Connection, channel: str | None = None, limit: int | None = None
) -> Iterator[dict[str, Any]]:
    """The list, oldest first. With a channel: the entries that apply to it, which includes the
    ``'all'`` entries.

    Read `LIST_PAGE` entries at a time, each page its own short read (as `export_csv` does): a
    listing its reader holds open (`suppress list | less`) holds no read transaction meanwhile,
    so a running campaign's journal can still be checkpointed, and memory stays flat. An entry
    added or removed while the listing goes on may or may not be in it."""
    where = "id > ?"
    filters: list[Any] = []
    if channel is not None:
        check_channel(channel)
        where += " AND channel IN (?, 'all')" if channel != "all" else " AND channel = ?"
        filters.append(channel)
    left = None if limit is None else sql_limit(limit)
    after = 0
    while left is None or left > 0:
        size = LIST_PAGE if left is None else min(LIST_PAGE, left)
        page = conn.execute(
            f"SELECT {_COLUMNS} FROM suppressions WHERE {where} ORDER BY id LIMIT ?",
            (after, *filters, size),
        ).fetchall()
        for row in page:
            yield _as_dict(row)
        if len(page) < size:
            return
        after = int(page[-1][0])
        if left is not None:
            left -= len(page)


# --------------------------------------------------------------------------------------------
# CSV.


def import_csv(
    conn: sqlite3.Connection,
    path: str | Path,
    channel_default: str | None,
    reason: str,
    source: str | None,
    default_region: str,
    now: str,
    check: Callable[[], None] | None = None,
) -> ImportResult:
    """Add the addresses of a CSV file, all or nothing (`insert_all`: the store's write lock is
    held only while the checked entries are copied in).

    Columns (header required, any order, case-insensitive): ``address``, ``phone`` or ``email``
    (at least one; each one present is read, so a line may add two or three entries); optional
    ``channel`` (else ``channel_default``, else inferred from the address's shape) and ``reason``
    (else ``reason``). A row with an empty address and an ``address_hash``
    (an erased entry, as `export_csv` writes it) is added by hash. A leading apostrophe that
    `export_csv` added is stripped. Bad lines are reported in ``invalid`` and skipped; a file
    that cannot be read at all raises `InputError`."""
    name = str(path)
    if channel_default is not None:
        check_channel(channel_default)
    with open_csv(path) as (columns, records):
        address_cols = address_columns(columns, name)
        entry_source = source or f"import:{name}"
        invalid = InvalidLines()

        def entries() -> Iterator[tuple[str, str | None, str, str, str, str]]:
            for record in records:
                row_channel = record.fields.get("channel", "").lower() or channel_default
                raws = row_addresses(record.fields, address_cols)
                if row_channel is not None and row_channel not in CHANNELS:
                    invalid.append((record.line, raws[0],
                                    f"channel: unknown channel {row_channel!r}"))
                    continue
                row_reason = record.fields.get("reason", "") or reason
                erased_hash = record.fields.get("address_hash", "").lower()
                for raw in raws:
                    channel = row_channel
                    address: str | None
                    if not raw and _HEX64.fullmatch(erased_hash) and channel is not None:
                        address, hashed = None, erased_hash
                    else:
                        try:
                            address, channel = normalize_for(raw, channel, default_region)
                        except AddressError as exc:
                            invalid.append((record.line, raw, f"address: {exc.detail}"))
                            continue
                        hashed = address_hash(address)
                    yield hashed, address, channel, row_reason, entry_source, now

        added, already = insert_all(conn, "suppressions", _FIELDS[1:], entries(), check)
    return ImportResult(added, already, invalid.kept, invalid.total)


def export_csv(conn: sqlite3.Connection, path_or_stream: str | Path | IO[str]) -> int:
    """Write the list as CSV (columns `EXPORT_COLUMNS`); returns the number of entries.

    Cells are protected against formula injection (`protect_cell`): phones come out as
    ``'+14155550100``, which `import_csv` reads back as ``+14155550100``. A file is created 0600:
    it holds personal data. Erased entries have an empty address and keep their hash.

    A file that exists is overwritten, and made 0600 first if it is a regular file others could
    read (a backup written over nightly keeps no older, wider mode). A symbolic link is not
    followed (`ExportRefused`): the list would go wherever the link points. Nor is a file or
    FIFO that belongs to another user written (its owner reads it), nor the store
    itself, or its write-ahead log (by any name: a hard link), written over. A FIFO or a device
    (``/dev/null``) is written as it is."""
    if isinstance(path_or_stream, (str, Path)):
        fd = _open_private(path_or_stream, _store_files(conn))
        with open(fd, "w", encoding="utf-8", newline="") as handle:
            return _write_csv(conn, handle)
    return _write_csv(conn, path_or_stream)


class ExportRefused(OSError):
    """The export's path is a symbolic link (not followed), a file others may read that
    this user cannot make private, another user's file or FIFO, or one of the store's own
    files: nothing is written."""


def _store_files(conn: sqlite3.Connection) -> set[tuple[int, int]]:
    """The (device, inode) of the store's files: the database, its write-ahead log and index."""
    found: set[tuple[int, int]] = set()
    for _, name, file in conn.execute("PRAGMA database_list").fetchall():
        if name != "main" or not file:
            continue
        for suffix in ("", "-wal", "-shm", "-journal"):
            try:
                info = os.stat(f"{file}{suffix}")
            except OSError:
                continue
            found.add((info.st_dev, info.st_ino))
    return found


def _open_private(path: str | Path, store_files: set[tuple[int, int]]) -> int:
    """``path`` opened for writing, empty and private (see `export_csv`); never one of
    ``store_files`` (the store's own: cut to nothing, every opt-out would be lost)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP and os.path.islink(path):
            raise ExportRefused(exc.errno, "it is a symbolic link: not followed (the list "
                                "holds personal data); give the path of the file itself") from None
        raise
    try:
        info = os.fstat(fd)
        if (info.st_dev, info.st_ino) in store_files:
            raise ExportRefused(errno.EINVAL, "it is the store itself (or one of its files): "
                                "the list would be written over it; give another path")
        if (stat.S_ISREG(info.st_mode) or stat.S_ISFIFO(info.st_mode)) \
                and info.st_uid != os.geteuid():
            # Its owner reads what is written (a FIFO made in /tmp before a nightly export; a
            # file root may change): private it is not, whatever its mode.
            raise ExportRefused(errno.EPERM, f"it belongs to another user (uid {info.st_uid}), "
                                "who may read it; it is left as it was")
        if stat.S_ISREG(info.st_mode):
            # Before a byte is written, and before the old content is cut (a file we may not
            # make private is left as it was).
            if stat.S_IMODE(info.st_mode) & 0o077:
                try:
                    os.fchmod(fd, 0o600)
                except PermissionError:
                    raise ExportRefused(
                        errno.EPERM, f"other users may read it (mode "
                        f"{stat.S_IMODE(info.st_mode):04o}) and it is not ours to make private; "
                        "it is left as it was") from None
            os.ftruncate(fd, 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _write_csv(conn: sqlite3.Connection, stream: IO[str]) -> int:
    writer = csv.writer(stream, lineterminator="\r\n")
    writer.writerow(EXPORT_COLUMNS)
    count = 0
    # A page at a time (`list_suppressions`), each its own short read: a query left open while
    # the output waits (`export - | less`) would hold a read transaction, and a running
    # campaign's journal could not be checkpointed meanwhile (its -wal file grows without bound).
    for entry in list_suppressions(conn):
        writer.writerow(protect_cell(str(entry[col] or "")) for col in EXPORT_COLUMNS)
        count += 1
    stream.flush()
    return count
