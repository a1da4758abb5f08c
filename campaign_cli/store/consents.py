"""Consent evidence: who agreed to (or withdrew from) which messages, when, and how we know.

The consents table is append only: a grant or a revocation adds a record and nothing is ever
updated, so the history is the evidence. The *effective* state for (address, channel, purpose)
is the record with the latest ``recorded_at`` (when the person gave or withdrew consent, not when
we learned of it), except that a record never speaks from later than when we learned of it
(``created_at``): a grant dated an hour ahead by a skewed clock does not outrank a revocation
recorded in between. On a tie, ``revoked`` wins. A record for channel ``'all'`` speaks for every
channel: the effective state on, say, SMS is the latest record for SMS or for ``'all'``.

``recorded_at`` is stored as ISO 8601 UTC with millisecond precision (`campaign_cli.clock.iso`),
so that comparing the text compares the times.
"""

from __future__ import annotations

import itertools
import re
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from campaign_cli.addresses import AddressError, address_hash
from campaign_cli.clock import iso
from campaign_cli.errors import InputError
from campaign_cli.models import Channel, Purpose
from campaign_cli.store.db import MAX_PARAMS, batched
from campaign_cli.store.suppressions import (
    CHANNELS,
    AddResult,
    ImportResult,
    InvalidLines,
    address_columns,
    check_channel,
    insert_all,
    normalize_for,
    open_csv,
    read_snapshot,
    row_addresses,
    write_transaction,
)

__all__ = [
    "AddResult",
    "ImportResult",
    "PURPOSES",
    "STATUSES",
    "consented_among",
    "import_csv",
    "list_consents",
    "max_consent_id",
    "outranked",
    "parse_timestamp",
    "record_consent",
    "record_consents",
    "revocations_since",
]

PURPOSES: tuple[str, ...] = tuple(p.value for p in Purpose)
STATUSES = ("granted", "revoked")
CONCRETE_CHANNELS: tuple[str, ...] = tuple(c.value for c in Channel)

#: Records a listing reads per query (about: a page holds every record of its addresses).
LIST_PAGE = 1000

#: How far in the future a ``recorded_at`` may lie (clock skew between systems) before it is
#: refused: a grant dated next year would otherwise outrank every revocation until then.
FUTURE_TOLERANCE = timedelta(hours=1)

#: The time a record speaks from: when the person gave or withdrew consent, but never later than
#: when we learned of it. A grant dated ahead (clock skew, within FUTURE_TOLERANCE) would
#: otherwise outrank a revocation recorded after it arrived, for up to that long.
_AT = "MIN(recorded_at, created_at)"

# (effective time, status, channel, source) of one record.
_Record = tuple[str, str, str, str]


def parse_timestamp(text: str, status: str | None = None, *, now: str | None = None) -> str:
    """An ISO 8601 date or time as stored (UTC, milliseconds, ``Z``). A time without an offset
    is taken as UTC. A bare date is the start of that day (UTC), but for a revocation
    (``status`` ``'revoked'``) its last millisecond: when the time of day is unknown, the reading
    that sends less (a revocation dated the day of a grant outranks it, not the other way
    round). With ``now``, a time ahead of it (its start, for a bare date) is refused too.
    Raises ValueError."""
    value = text.strip()
    if value.endswith(("Z", "z")):
        value = value[:-1] + "+00:00"
    try:
        moment = datetime.fromisoformat(_extended(value))
    except ValueError:
        raise ValueError(f"not an ISO 8601 date or time: {text!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    try:
        stamp = iso(moment)
        if now is not None:
            _check_not_future(stamp, now)  # (a revocation dated today is not ahead)
        if status == "revoked" and _BARE_DATE.fullmatch(value):
            stamp = iso(moment + timedelta(days=1, milliseconds=-1))
        return stamp
    except OverflowError:  # year 1 east of UTC, year 9999 west of it
        raise ValueError(f"out of range once converted to UTC: {text!r}") from None


#: A date with no time of day (2024-01-01, 20240101, 2024-W01-1, 2024-001).
_BARE_DATE = re.compile(r"[0-9W-]+")


# Python 3.10's `fromisoformat` reads only what `isoformat` writes (3.11 reads most of ISO 8601):
# the forms exports commonly have are written the way both read, so that a file of consent
# evidence reads the same on every supported Python. Fractional seconds of any length (with a
# full stop or a comma) become six digits; an offset without its colon (+0100) gets one.
_TIME_PARTS = re.compile(
    r"(?P<hms>\d{2}:\d{2}:\d{2})(?:[.,](?P<fraction>\d+))?"
    r"|(?P<sign>[+-])(?P<hours>\d{2})(?P<minutes>\d{2})$"
)


def _extended(value: str) -> str:
    date, sep, time = value[:10], value[10:11], value[11:]
    if not sep or not time:
        return value

    def written(found: re.Match[str]) -> str:
        if found["sign"]:
            return f"{found['sign']}{found['hours']}:{found['minutes']}"
        if found["fraction"] is None:
            return found["hms"]
        return f"{found['hms']}.{(found['fraction'] + '00000')[:6]}"

    return date + sep + _TIME_PARTS.sub(written, time)


def _check_not_future(recorded_at: str, now: str) -> None:
    limit = datetime.fromisoformat(parse_timestamp(now).replace("Z", "+00:00"))
    moment = datetime.fromisoformat(recorded_at.replace("Z", "+00:00"))
    if moment > limit + FUTURE_TOLERANCE:
        raise ValueError(f"{recorded_at} is in the future")


def _check(channel: str, purpose: str, status: str) -> None:
    check_channel(channel)
    if purpose not in PURPOSES:
        raise ValueError(f"unknown purpose {purpose!r}: expected one of {', '.join(PURPOSES)}")
    if status not in STATUSES:
        raise ValueError(f"unknown status {status!r}: expected granted or revoked")


def _effective(records: Iterable[_Record], channel: str) -> _Record | None:
    """The deciding record for ``channel`` among one (address, purpose)'s records."""
    best: _Record | None = None
    for record in records:
        if record[2] != channel and record[2] != "all":
            continue
        if best is None or (record[0], record[1] == "revoked") > (best[0], best[1] == "revoked"):
            best = record
    return best


# --------------------------------------------------------------------------------------------
# What a run asks.


def consented_among(
    conn: sqlite3.Connection, hashes: Sequence[str], channel: str, purpose: str
) -> set[str]:
    """Those of ``hashes`` whose effective consent for (``channel``, ``purpose``) is granted."""
    unique = list(dict.fromkeys(hashes))
    granted: set[str] = set()
    for batch in batched(unique, MAX_PARAMS - 2):
        marks = ",".join("?" * len(batch))
        rows = conn.execute(
            f"SELECT address_hash, {_AT}, status FROM consents "
            f"WHERE purpose = ? AND channel IN (?, 'all') AND address_hash IN ({marks})",
            (purpose, channel, *batch),
        )
        best: dict[str, tuple[str, bool]] = {}
        for hashed, recorded_at, status in rows:
            key = (str(recorded_at), status == "revoked")
            if hashed not in best or key > best[hashed]:
                best[hashed] = key
        granted.update(h for h, (_, revoked) in best.items() if not revoked)
    return granted


def max_consent_id(conn: sqlite3.Connection) -> int:
    """The watermark before a run starts: consent records with a higher id came later."""
    return int(conn.execute("SELECT COALESCE(MAX(id), 0) FROM consents").fetchone()[0])


def revocations_since(
    conn: sqlite3.Connection, mark: int, limit: int = -1
) -> tuple[int, list[tuple[str, str, str]]]:
    """``(new mark, [(address_hash, channel, purpose)])``: the (concrete) channels whose
    effective consent is now revoked because of a revocation recorded with ``id > mark``, among
    the first ``limit`` records after it (all if negative); the next call goes on from the new
    mark.

    A revocation that an existing later grant outranks (a back-dated import) is not reported;
    a revocation for ``'all'`` is reported for each channel it now decides."""
    with read_snapshot(conn):
        rows = conn.execute(
            "SELECT id, address_hash, channel, purpose, status FROM consents "
            "WHERE id > ? ORDER BY id LIMIT ?",
            (mark, limit),
        ).fetchall()
        if not rows:
            return mark, []
        new_mark = int(rows[-1][0])
        candidates = sorted({(h, c, p) for _, h, c, p, status in rows if status == "revoked"})
        if not candidates:
            return new_mark, []
        history: dict[tuple[str, str], list[_Record]] = {}
        hashes = sorted({h for h, _, _ in candidates})
        for batch in batched(hashes, MAX_PARAMS):
            marks = ",".join("?" * len(batch))
            for hashed, channel, purpose, status, recorded_at, source in conn.execute(
                f"SELECT address_hash, channel, purpose, status, {_AT}, source "
                f"FROM consents WHERE address_hash IN ({marks})",
                tuple(batch),
            ):
                history.setdefault((hashed, purpose), []).append(
                    (recorded_at, status, channel, source)
                )
    revoked: dict[tuple[str, str, str], None] = {}
    for hashed, channel, purpose in candidates:
        records = history.get((hashed, purpose), [])
        for concrete in CONCRETE_CHANNELS if channel == "all" else (channel,):
            deciding = _effective(records, concrete)
            if deciding is not None and deciding[1] == "revoked":
                revoked[(hashed, concrete, purpose)] = None
    return new_mark, list(revoked)


# --------------------------------------------------------------------------------------------
# Recording.


_COLUMNS_IN = ("address_hash", "address", "channel", "purpose", "status", "source",
               "recorded_at", "created_at")


def _insert(
    conn: sqlite3.Connection,
    address: str | None,
    hashed: str,
    channel: str,
    purpose: str,
    status: str,
    source: str,
    recorded_at: str,
    now: str,
) -> bool:
    cursor = conn.execute(
        f"INSERT OR IGNORE INTO consents ({', '.join(_COLUMNS_IN)}) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (hashed, address, channel, purpose, status, source, recorded_at, now),
    )
    return cursor.rowcount == 1


def record_consents(
    conn: sqlite3.Connection,
    items: Iterable[tuple[str, str]],
    purpose: str,
    status: str,
    source: str,
    recorded_at: str,
    now: str,
) -> AddResult:
    """Record one grant or revocation for each ``(normalised address, channel)``, in one
    transaction. ``recorded_at`` is any ISO 8601 time (see `parse_timestamp`); a record
    identical to one already held (same time and source) is counted in ``already``.
    Raises ValueError for an unknown channel, purpose or status, or a time in the future."""
    at = parse_timestamp(recorded_at, status, now=now)
    added = already = 0
    with write_transaction(conn):
        for address, channel in items:
            _check(channel, purpose, status)
            if _insert(conn, address, address_hash(address), channel, purpose, status, source,
                       at, now):
                added += 1
            else:
                already += 1
    return AddResult(added, already)


def record_consent(
    conn: sqlite3.Connection,
    address: str,
    channel: str,
    purpose: str,
    status: str,
    source: str,
    recorded_at: str,
    now: str,
) -> bool:
    """Record one grant or revocation for a normalised address; False if already held."""
    result = record_consents(conn, [(address, channel)], purpose, status, source, recorded_at, now)
    return result.added == 1


def import_csv(
    conn: sqlite3.Connection,
    path: str | Path,
    channel_default: str | None,
    purpose_default: str,
    source: str | None,
    default_region: str,
    now: str,
    check: Callable[[], None] | None = None,
) -> ImportResult:
    """Record the consent evidence of a CSV file, all or nothing (`insert_all`: the store's
    write lock is held only while the checked records are copied in).

    Columns (header required, case-insensitive): ``address``, ``phone`` or ``email`` (each one
    present is read: a line about a phone and an email records both),
    ``status`` (granted or revoked) and ``recorded_at`` (ISO 8601) are required; ``channel``
    (else ``channel_default``, else inferred from the address), ``purpose`` (else
    ``purpose_default``) and ``source`` (else ``source``, else ``import:FILE``) are optional.
    Re-importing a file adds nothing. Bad lines are reported in ``invalid`` and skipped; a file
    without the required columns raises `InputError`."""
    name = str(path)
    if channel_default is not None:
        check_channel(channel_default)
    if purpose_default not in PURPOSES:
        raise ValueError(f"unknown purpose {purpose_default!r}")
    with open_csv(path) as (columns, records):
        address_cols = address_columns(columns, name)
        for required in ("status", "recorded_at"):
            if required not in columns:
                raise InputError(name, 1, None, f"no {required} column: consent records need one")
        default_source = source or f"import:{name}"
        invalid = InvalidLines()

        def entries() -> Iterator[tuple[str, str, str, str, str, str, str, str]]:
            for record in records:
                raws = row_addresses(record.fields, address_cols)
                raw = raws[0]
                row_channel = record.fields.get("channel", "").lower() or channel_default
                purpose = record.fields.get("purpose", "").lower() or purpose_default
                status = record.fields.get("status", "").lower()
                problem = None
                if row_channel is not None and row_channel not in CHANNELS:
                    problem = f"channel: unknown channel {row_channel!r}"
                elif purpose not in PURPOSES:
                    problem = f"purpose: expected {' or '.join(PURPOSES)}, not {purpose!r}"
                elif status not in STATUSES:
                    problem = f"status: expected granted or revoked, not {status!r}"
                if problem:
                    invalid.append((record.line, raw, problem))
                    continue
                try:
                    at = parse_timestamp(record.fields.get("recorded_at", ""), status, now=now)
                except ValueError as exc:
                    invalid.append((record.line, raw, f"recorded_at: {exc}"))
                    continue
                row_source = record.fields.get("source", "") or default_source
                for raw in raws:  # a revocation for a phone and an email revokes both
                    try:
                        address, channel = normalize_for(raw, row_channel, default_region)
                    except AddressError as exc:
                        invalid.append((record.line, raw, f"address: {exc.detail}"))
                        continue
                    yield (address_hash(address), address, channel, purpose, status, row_source,
                           at, now)

        added, already = insert_all(conn, "consents", _COLUMNS_IN, entries(), check)
    return ImportResult(added, already, invalid.kept, invalid.total)


# --------------------------------------------------------------------------------------------
# Reading.


def outranked(
    conn: sqlite3.Connection, address: str, channel: str, purpose: str, status: str
) -> list[tuple[str, dict[str, str]]]:
    """Where a ``status`` just recorded for (normalised ``address``, ``channel``, ``purpose``) is
    not in force: ``[(channel, deciding record)]``, the record having ``status``,
    ``recorded_at``, ``source`` and ``via``. For ``'all'``: 'all' itself and every channel that
    has records of its own (a later record for one channel outranks an 'all' record there)."""
    rows = conn.execute(
        f"SELECT {_AT}, status, channel, source FROM consents "
        "WHERE address_hash = ? AND purpose = ?",
        (address_hash(address), purpose),
    ).fetchall()
    records: list[_Record] = [(str(a), str(b), str(c), str(d)) for a, b, c, d in rows]
    channels = [channel]
    if channel == "all":
        channels += [c for c in CONCRETE_CHANNELS if any(r[2] == c for r in records)]
    found: list[tuple[str, dict[str, str]]] = []
    for name in channels:
        deciding = _effective(records, name)
        if deciding is not None and deciding[1] != status:
            found.append((name, {"status": deciding[1], "recorded_at": deciding[0],
                                 "source": deciding[3], "via": deciding[2]}))
    return found


def list_consents(
    conn: sqlite3.Connection, address: str | None = None
) -> Iterator[dict[str, Any]]:
    """One entry per (address, channel, purpose) that has records, with its effective state:
    ``status``, ``recorded_at`` and ``source`` of the deciding record, ``via`` the channel that
    record names (``'all'`` when a record for every channel decides), ``records`` the number of
    records for this very channel. ``address`` (normalised) restricts the list to one address.

    The records are read about `LIST_PAGE` at a time, whole addresses (by hash) per page, each
    page its own short read, as `suppressions.list_suppressions` does."""
    sql = (f"SELECT address_hash, purpose, channel, status, {_AT}, source, address "
           "FROM consents WHERE ")
    if address is not None:
        rows = conn.execute(sql + "address_hash = ? ORDER BY purpose, channel, id",
                            (address_hash(address),)).fetchall()
        yield from _in_force(rows)
        return
    after = ""
    while True:
        # The addresses of the next LIST_PAGE records, and every record of theirs.
        page = conn.execute(
            sql + "address_hash > :after AND address_hash <= (SELECT MAX(address_hash) FROM "
            "(SELECT address_hash FROM consents WHERE address_hash > :after "
            "ORDER BY address_hash LIMIT :size)) ORDER BY address_hash, purpose, channel, id",
            {"after": after, "size": LIST_PAGE},
        ).fetchall()
        if not page:
            return
        yield from _in_force(page)
        after = str(page[-1][0])


def _in_force(rows: Iterable[Sequence[Any]]) -> Iterator[dict[str, Any]]:
    """`list_consents`'s entries for records ordered by address hash, purpose, channel, id."""
    for (hashed, purpose), group in itertools.groupby(rows, key=lambda r: (r[0], r[1])):
        members = list(group)
        shown = next((r[6] for r in members if r[6] is not None), None)
        records: list[_Record] = [(r[4], r[3], r[2], r[5]) for r in members]
        for channel, same in itertools.groupby(members, key=lambda r: r[2]):
            deciding = _effective(records, channel)
            assert deciding is not None  # the channel's own records are among them
            yield {
                "address": shown,
                "address_hash": hashed,
                "channel": channel,
                "purpose": purpose,
                "status": deciding[1],
                "recorded_at": deciding[0],
                "source": deciding[3],
                "via": deciding[2],
                "records": sum(1 for _ in same),
            }
