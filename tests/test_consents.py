from __future__ import annotations

import re
import sqlite3
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

import campaign_cli.store.consents as consents_module
from campaign_cli.addresses import address_hash
from campaign_cli.errors import InputError
from campaign_cli.store.consents import (
    consented_among,
    import_csv,
    list_consents,
    max_consent_id,
    parse_timestamp,
    record_consent,
    record_consents,
    revocations_since,
)
from campaign_cli.store.db import Store
from tests.conftest import checkpoint_truncates

NOW = "2024-05-01T12:00:00.000Z"
PHONE = "+14155550100"
H = address_hash(PHONE)
ANN = "ann@example.com"
HA = address_hash(ANN)


@pytest.fixture
def conn(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    store = Store.open(tmp_path / "store.db")
    yield store.conn
    store.close()


def rec(
    conn: sqlite3.Connection,
    status: str,
    at: str,
    *,
    address: str = PHONE,
    channel: str = "sms",
    purpose: str = "marketing",
    source: str = "test",
) -> bool:
    return record_consent(conn, address, channel, purpose, status, source, at, NOW)


def granted(conn: sqlite3.Connection, channel: str = "sms", purpose: str = "marketing") -> bool:
    return H in consented_among(conn, [H], channel, purpose)


def test_no_record_means_no_consent(conn: sqlite3.Connection) -> None:
    assert consented_among(conn, [H, HA], "sms", "marketing") == set()


def test_latest_recorded_at_wins_not_insertion_order(conn: sqlite3.Connection) -> None:
    rec(conn, "granted", "2024-01-02T00:00:00Z")
    assert granted(conn)
    rec(conn, "revoked", "2024-01-03T00:00:00Z")
    assert not granted(conn)
    # A grant learned later but given earlier does not outrank the revocation.
    rec(conn, "granted", "2024-01-01T00:00:00Z")
    assert not granted(conn)
    rec(conn, "granted", "2024-02-01T00:00:00Z")
    assert granted(conn)


def test_a_record_speaks_from_no_later_than_when_it_was_learned(
    conn: sqlite3.Connection,
) -> None:
    """A grant dated 12:30 by a skewed clock, learned at 12:00 (NOW), then a revocation at
    12:10 learned at 12:10: the revocation decides, for a run (consented_among) and for the
    run-time poll (revocations_since) alike. It used to wait until 12:30 to count."""
    from campaign_cli.store.consents import record_consents, revocations_since

    record_consents(conn, [(PHONE, "sms")], "marketing", "granted", "crm",
                    "2024-05-01T12:30:00Z", NOW)
    assert granted(conn)
    mark = max_consent_id(conn)
    later = "2024-05-01T12:10:00.000Z"
    record_consents(conn, [(PHONE, "sms")], "marketing", "revoked", "STOP reply", later, later)
    assert not granted(conn)
    assert revocations_since(conn, mark)[1] == [(H, "sms", "marketing")]


def test_a_tie_goes_to_revoked(conn: sqlite3.Connection) -> None:
    rec(conn, "revoked", "2024-01-01T10:00:00Z", source="a")
    rec(conn, "granted", "2024-01-01T10:00:00Z", source="b")
    assert not granted(conn)


def test_offsets_are_compared_as_instants(conn: sqlite3.Connection) -> None:
    # 10:00+02:00 is 08:00Z: before the 09:00Z revocation.
    rec(conn, "revoked", "2024-01-01T09:00:00Z")
    rec(conn, "granted", "2024-01-01T10:00:00+02:00")
    assert not granted(conn)


def test_purpose_and_channel_are_separate(conn: sqlite3.Connection) -> None:
    rec(conn, "granted", "2024-01-01T00:00:00Z")
    assert granted(conn, "sms", "marketing")
    assert not granted(conn, "email", "marketing")
    assert not granted(conn, "sms", "transactional")


def test_channel_all_applies_to_every_channel(conn: sqlite3.Connection) -> None:
    rec(conn, "granted", "2024-01-01T00:00:00Z", channel="all")
    assert granted(conn, "sms") and granted(conn, "email") and granted(conn, "push")
    # A later specific revocation beats the earlier 'all' grant on that channel only.
    rec(conn, "revoked", "2024-01-02T00:00:00Z", channel="email")
    assert granted(conn, "sms") and not granted(conn, "email")
    # A later 'all' revocation beats an earlier specific grant.
    rec(conn, "granted", "2024-01-03T00:00:00Z", channel="sms")
    rec(conn, "revoked", "2024-01-04T00:00:00Z", channel="all")
    assert not granted(conn, "sms")
    # ... and ties between a channel's record and an 'all' record go to revoked too.
    rec(conn, "granted", "2024-01-04T00:00:00Z", channel="sms")
    assert not granted(conn, "sms")


def test_consented_among_batches(conn: sqlite3.Connection) -> None:
    addresses = [f"user{i}@example.com" for i in range(1100)]
    record_consents(
        conn, [(a, "email") for a in addresses[1::2]], "marketing", "granted", "t",
        "2024-01-01T00:00:00Z", NOW,
    )
    hashes = [address_hash(a) for a in addresses]
    assert consented_among(conn, hashes, "email", "marketing") == set(hashes[1::2])


def test_same_record_twice_is_kept_once(conn: sqlite3.Connection) -> None:
    assert rec(conn, "granted", "2024-01-01T00:00:00Z") is True
    assert rec(conn, "granted", "2024-01-01T00:00:00.000Z") is False
    assert conn.execute("SELECT COUNT(*) FROM consents").fetchone()[0] == 1


def test_record_rejects_bad_values(conn: sqlite3.Connection) -> None:
    with pytest.raises(ValueError, match="status"):
        rec(conn, "maybe", "2024-01-01T00:00:00Z")
    with pytest.raises(ValueError, match="purpose"):
        rec(conn, "granted", "2024-01-01T00:00:00Z", purpose="spam")
    with pytest.raises(ValueError, match="future"):
        rec(conn, "granted", "2030-01-01T00:00:00Z")
    with pytest.raises(ValueError, match="ISO 8601"):
        rec(conn, "granted", "yesterday")
    assert conn.execute("SELECT COUNT(*) FROM consents").fetchone()[0] == 0
    assert not conn.in_transaction


@pytest.mark.parametrize(
    ("text", "stored"),
    [
        ("2024-01-01T10:00:00Z", "2024-01-01T10:00:00.000Z"),
        ("2024-01-01T10:00:00+02:00", "2024-01-01T08:00:00.000Z"),
        ("2024-01-01 10:00:00", "2024-01-01T10:00:00.000Z"),
        ("2024-01-01", "2024-01-01T00:00:00.000Z"),
        ("2024-01-01T10:00:00.123456z", "2024-01-01T10:00:00.123Z"),
    ],
)
def test_parse_timestamp(text: str, stored: str) -> None:
    assert parse_timestamp(text) == stored


@pytest.mark.parametrize(
    ("text", "granted_at", "revoked_at"),
    [
        ("2024-01-01", "2024-01-01T00:00:00.000Z", "2024-01-01T23:59:59.999Z"),
        ("20240101", "2024-01-01T00:00:00.000Z", "2024-01-01T23:59:59.999Z"),
        ("2024-01-01T00:00", "2024-01-01T00:00:00.000Z", "2024-01-01T00:00:00.000Z"),
        ("2024-01-01T10:00:00+02:00", "2024-01-01T08:00:00.000Z", "2024-01-01T08:00:00.000Z"),
    ],
)
def test_a_bare_date_is_the_start_of_the_day_for_a_grant_and_its_end_for_a_revocation(
    text: str, granted_at: str, revoked_at: str
) -> None:
    if text == "20240101" and sys.version_info < (3, 11):
        text = "2024-01-01"  # (3.10 reads only the extended form)
    assert parse_timestamp(text, "granted") == parse_timestamp(text) == granted_at
    assert parse_timestamp(text, "revoked") == revoked_at


def test_a_revocation_dated_only_by_its_day_outranks_a_grant_made_that_day(
    conn: sqlite3.Connection, tmp_path: Path
) -> None:
    """A bare date was read as midnight for every record: an opt-out list dated by day
    ("2024-03-10") lost to a grant timed later that day (15:00), and the run sent to someone who
    had said STOP that day. When the time of day is unknown, the reading that sends less."""
    rec(conn, "granted", "2024-03-10T15:00:00Z")
    assert granted(conn)
    path = write(tmp_path / "optouts.csv",
                 "phone,status,recorded_at\n+14155550100,revoked,2024-03-10\n")
    assert import_csv(conn, path, "sms", "marketing", None, "US", NOW).added == 1
    assert not granted(conn)
    # a grant of the next day still outranks it; one dated only by that same day does not
    rec(conn, "granted", "2024-03-10")
    assert not granted(conn)
    rec(conn, "granted", "2024-03-11T00:00:00Z")
    assert granted(conn)


def test_a_revocation_dated_today_is_not_in_the_future(
    conn: sqlite3.Connection, tmp_path: Path
) -> None:
    today = NOW[:10]
    assert rec(conn, "revoked", today)
    path = write(tmp_path / "optouts.csv",
                 f"phone,status,recorded_at\n+14155550101,revoked,{today}\n")
    result = import_csv(conn, path, "sms", "marketing", None, "US", NOW)
    assert (result.added, result.invalid) == (1, [])
    # (it speaks from when the store learned of it, as every record: NOW, not the day's end)
    with pytest.raises(ValueError, match="future"):
        rec(conn, "revoked", "2024-05-03")


# What Python 3.10's `datetime.fromisoformat` reads (what `isoformat` writes); 3.11 reads most of
# ISO 8601. The README promises Python 3.10.
_PY310_ISOFORMAT = re.compile(
    r"\d{4}-\d{2}-\d{2}(.\d{2}(:\d{2}(:\d{2}(\.\d{3}(\d{3})?)?)?)?"
    r"([+-]\d{2}:\d{2}(:\d{2}(\.\d{6})?)?)?)?", re.S)


class _Python310Datetime(datetime):
    @classmethod
    def fromisoformat(cls, date_string: str) -> datetime:
        if not _PY310_ISOFORMAT.fullmatch(date_string):
            raise ValueError(f"Invalid isoformat string: {date_string!r}")
        return datetime.fromisoformat(date_string)


@pytest.mark.parametrize("python310", [False, True])
@pytest.mark.parametrize(
    ("text", "stored"),
    [
        ("2024-01-01T10:00:00.5Z", "2024-01-01T10:00:00.500Z"),
        ("2024-01-01T10:00:00.12+02:00", "2024-01-01T08:00:00.120Z"),
        ("2024-01-01T10:00:00.123456789Z", "2024-01-01T10:00:00.123Z"),
        ("2024-01-01T10:00:00+0200", "2024-01-01T08:00:00.000Z"),
        ("2024-01-01 10:00:00,25-0130", "2024-01-01T11:30:00.250Z"),
        ("2024-01-01T10:00+0200", "2024-01-01T08:00:00.000Z"),
    ],
)
def test_parse_timestamp_reads_the_same_on_every_supported_python(
    text: str, stored: str, python310: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A consent export's times (fractional seconds of any length, an offset without its colon)
    were read on Python 3.11 and refused on 3.10, whose `fromisoformat` reads only what
    `isoformat` writes: the same `consent import` or campaign `consent_records` file worked on
    one and stopped with exit 2 on the other."""
    if python310:
        monkeypatch.setattr(consents_module, "datetime", _Python310Datetime)
    assert parse_timestamp(text) == stored


def test_revocations_since_reports_new_effective_revocations(conn: sqlite3.Connection) -> None:
    rec(conn, "granted", "2024-01-01T00:00:00Z")
    rec(conn, "granted", "2024-01-01T00:00:00Z", address=ANN, channel="email")
    mark = max_consent_id(conn)
    assert revocations_since(conn, mark) == (mark, [])

    rec(conn, "revoked", "2024-02-01T00:00:00Z")
    rec(conn, "granted", "2024-02-01T00:00:00Z", address="bob@example.com", channel="email")
    new_mark, found = revocations_since(conn, mark)
    assert found == [(H, "sms", "marketing")]
    assert new_mark == max_consent_id(conn) > mark
    assert revocations_since(conn, new_mark) == (new_mark, [])


def test_revocations_since_ignores_a_revocation_a_later_grant_outranks(
    conn: sqlite3.Connection,
) -> None:
    rec(conn, "granted", "2024-03-01T00:00:00Z")
    mark = max_consent_id(conn)
    rec(conn, "revoked", "2024-01-01T00:00:00Z")  # back-dated evidence: still granted
    new_mark, found = revocations_since(conn, mark)
    assert (new_mark > mark, found) == (True, [])
    assert granted(conn)


def test_revocations_since_expands_all_to_the_channels_it_decides(
    conn: sqlite3.Connection,
) -> None:
    rec(conn, "granted", "2024-03-01T00:00:00Z", channel="email")
    mark = max_consent_id(conn)
    rec(conn, "revoked", "2024-02-01T00:00:00Z", channel="all")
    _, found = revocations_since(conn, mark)
    # email was granted later than the 'all' revocation: still granted there.
    assert sorted(found) == [
        (H, "push", "marketing"),
        (H, "sms", "marketing"),
        (H, "webhook", "marketing"),
    ]


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_import_csv(conn: sqlite3.Connection, tmp_path: Path) -> None:
    path = write(
        tmp_path / "consents.csv",
        "address,channel,purpose,status,recorded_at,source\n"
        "'+1 (415) 555-0100,sms,marketing,granted,2024-01-01T00:00:00Z,web form\n"
        "Ann@Example.com,,,GRANTED,2024-01-01,\n"
        "bob@example.com,email,marketing,maybe,2024-01-01,\n"
        "carol@example.com,email,marketing,granted,,\n"
        "nobody,sms,marketing,granted,2024-01-01,\n"
        "dan@example.com,email,spam,granted,2024-01-01,\n"
        "+14155550100,sms,marketing,revoked,2024-01-02T00:00:00Z,STOP reply\n",
    )
    result = import_csv(conn, path, None, "marketing", None, "US", NOW)
    assert (result.added, result.already) == (3, 0)
    assert [(line, reason.split(":")[0]) for line, _, reason in result.invalid] == [
        (4, "status"),
        (5, "recorded_at"),
        (6, "address"),
        (7, "purpose"),
    ]
    assert not granted(conn)
    assert consented_among(conn, [HA], "email", "marketing") == {HA}
    sources = {r[0] for r in conn.execute("SELECT source FROM consents")}
    assert sources == {"web form", f"import:{path}", "STOP reply"}

    again = import_csv(conn, path, None, "marketing", None, "US", NOW)
    assert (again.added, again.already) == (0, 3)


def test_import_records_every_address_column_of_a_line(
    conn: sqlite3.Connection, tmp_path: Path
) -> None:
    """A revocation on a line with a phone and an email revokes both: reading only the first
    address column kept sending to the other one without consent."""
    import_csv(conn, write(tmp_path / "granted.csv",
                           "phone,email,status,recorded_at\n"
                           "+14155550100,ann@example.com,granted,2024-01-01\n"),
               None, "marketing", None, "US", NOW)
    assert consented_among(conn, [HA], "email", "marketing") == {HA}
    result = import_csv(conn, write(tmp_path / "revoked.csv",
                                    "phone,email,status,recorded_at\n"
                                    "+14155550100,ann@example.com,revoked,2024-02-01\n"),
                        None, "marketing", None, "US", NOW)
    assert (result.added, result.invalid) == (2, [])
    assert consented_among(conn, [HA], "email", "marketing") == set()
    assert consented_among(conn, [address_hash("+14155550100")], "sms", "marketing") == set()


def test_import_requires_status_and_recorded_at_columns(
    conn: sqlite3.Connection, tmp_path: Path
) -> None:
    path = write(tmp_path / "c.csv", "email,status\nann@example.com,granted\n")
    with pytest.raises(InputError, match="c.csv:1: no recorded_at column"):
        import_csv(conn, path, None, "marketing", None, "US", NOW)


def test_list_consents_shows_effective_state(conn: sqlite3.Connection) -> None:
    rec(conn, "granted", "2024-01-01T00:00:00Z", channel="sms", source="form")
    rec(conn, "revoked", "2024-01-05T00:00:00Z", channel="all", source="call")
    rec(conn, "granted", "2024-01-01T00:00:00Z", address=ANN, channel="email")
    entries = list(list_consents(conn, PHONE))
    by_channel = {e["channel"]: e for e in entries}
    assert set(by_channel) == {"sms", "all"}
    assert by_channel["sms"]["status"] == "revoked"
    assert by_channel["sms"]["via"] == "all"
    assert by_channel["sms"]["source"] == "call"
    assert by_channel["sms"]["records"] == 1
    assert by_channel["all"]["status"] == "revoked"
    assert all(e["address"] == PHONE for e in entries)
    assert len(list(list_consents(conn))) == 3


@pytest.mark.parametrize("text", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-05:00"])
def test_parse_timestamp_out_of_range_in_utc_is_a_value_error(text: str) -> None:
    """A time that exists in its own offset but not in UTC is bad input, not a crash."""
    with pytest.raises(ValueError, match="out of range"):
        parse_timestamp(text)


def test_the_list_is_read_in_pages_of_whole_addresses_holding_no_read_between_pages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`consent list | less`: one query read as the entries were shown held a read transaction
    for as long as the reader took (a running campaign's write-ahead log could not be
    checkpointed meanwhile). The records are read a few addresses at a time, each page its own
    read, and the entries are those of one read of everything, in the same order, whatever the
    page size (an address whose records span a page boundary is read whole)."""
    store = Store.open(tmp_path / "store.db")
    conn = store.conn
    try:
        for i in range(9):
            address = f"user{i}@example.com"
            for j in range(i % 4 + 1):  # 1 to 4 records per address
                rec(conn, ("granted", "revoked")[j % 2], f"2024-01-0{j + 1}T00:00:00Z",
                    address=address, channel=("email", "all", "sms")[j % 3],
                    purpose=("marketing", "transactional")[(i + j) % 2])
        monkeypatch.setattr(consents_module, "LIST_PAGE", 10**6)
        whole = list(list_consents(conn))
        assert len({e["address_hash"] for e in whole}) == 9
        assert [(e["address_hash"], e["purpose"], e["channel"]) for e in whole] == sorted(
            (e["address_hash"], e["purpose"], e["channel"]) for e in whole)
        for size in (1, 2, 3, 5, 7):
            monkeypatch.setattr(consents_module, "LIST_PAGE", size)
            assert list(list_consents(conn)) == whole, size
        monkeypatch.setattr(consents_module, "LIST_PAGE", 2)
        listing = list_consents(conn)
        first = next(listing)
        assert checkpoint_truncates(tmp_path / "store.db")  # no read held between pages
        assert [first, *listing] == whole
        one = "user3@example.com"
        assert list(list_consents(conn, one)) == [e for e in whole if e["address"] == one]
    finally:
        store.close()
