from __future__ import annotations

import contextlib
import csv
import io
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import campaign_cli.store.suppressions as suppressions_module
from campaign_cli.addresses import AddressError, address_hash, normalize_email
from campaign_cli.errors import InputError, StoreError
from campaign_cli.store.db import MIGRATIONS, Store, connect
from campaign_cli.store.suppressions import (
    _byte_lines,
    add_suppressions,
    export_csv,
    import_csv,
    is_suppressed,
    list_suppressions,
    max_suppression_id,
    normalize_for,
    protect_cell,
    remove_suppression,
    suppressed_among,
    suppressions_since,
    unprotect_cell,
)
from tests.conftest import checkpoint_truncates

NOW = "2024-05-01T12:00:00.000Z"
PHONE = "+14155550100"
PHONE_HASH = address_hash(PHONE)


@pytest.fixture
def conn(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    store = Store.open(tmp_path / "store.db")
    yield store.conn
    store.close()


def add(conn: sqlite3.Connection, raw: str, channel: str | None = None) -> tuple[int, int]:
    result = add_suppressions(conn, [normalize_for(raw, channel)], "manual", "cli", NOW)
    return result.added, result.already


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_normalised_spellings_are_one_entry(conn: sqlite3.Connection) -> None:
    assert add(conn, "+1 (415) 555-0100") == (1, 0)
    assert add(conn, "+14155550100") == (0, 1)
    assert add(conn, "(415) 555-0100") == (0, 1)  # national, default region US
    assert add(conn, "Ann@Example.com") == (1, 0)
    assert add(conn, "ann@example.com") == (0, 1)
    entries = list(list_suppressions(conn))
    assert [(e["address"], e["channel"]) for e in entries] == [
        (PHONE, "sms"),
        ("ann@example.com", "email"),
    ]


def test_suppressed_among_by_channel_and_all(conn: sqlite3.Connection) -> None:
    add(conn, PHONE, "sms")
    email = "ann@example.com"
    add(conn, email, "all")
    email_hash = address_hash(email)
    other = address_hash("+14155550199")
    hashes = [PHONE_HASH, email_hash, other]
    assert suppressed_among(conn, hashes, "sms") == {PHONE_HASH, email_hash}
    assert suppressed_among(conn, hashes, "email") == {email_hash}
    assert suppressed_among(conn, hashes, "push") == {email_hash}
    assert suppressed_among(conn, [], "sms") == set()


def test_suppressed_among_batches_past_the_parameter_limit(conn: sqlite3.Connection) -> None:
    addresses = [f"user{i}@example.com" for i in range(1200)]
    add_suppressions(conn, [(a, "email") for a in addresses[::2]], "r", "cli", NOW)
    hashes = [address_hash(a) for a in addresses]
    found = suppressed_among(conn, hashes, "email")
    assert found == set(hashes[::2])


def test_watermark_picks_up_only_later_suppressions(conn: sqlite3.Connection) -> None:
    add(conn, PHONE)
    mark = max_suppression_id(conn)
    assert suppressions_since(conn, mark) == (mark, [])
    add(conn, "ann@example.com", "all")
    add(conn, PHONE)  # already there: no new id
    new_mark, found = suppressions_since(conn, mark)
    assert found == [(address_hash("ann@example.com"), "all")]
    assert new_mark > mark
    assert suppressions_since(conn, new_mark) == (new_mark, [])


def test_watermark_survives_removing_the_newest_entry(conn: sqlite3.Connection) -> None:
    add(conn, PHONE)
    add(conn, "ann@example.com")
    mark = max_suppression_id(conn)
    assert remove_suppression(conn, "ann@example.com", None) == 1
    add(conn, "bob@example.com")
    _, found = suppressions_since(conn, mark)
    assert found == [(address_hash("bob@example.com"), "email")]


def test_add_is_one_transaction(conn: sqlite3.Connection) -> None:
    def items() -> Iterator[tuple[str, str]]:
        yield PHONE, "sms"
        yield "x@example.com", "fax"  # not a channel: the whole batch is rolled back

    with pytest.raises(ValueError, match="fax"):
        add_suppressions(conn, items(), "r", "cli", NOW)
    assert list(list_suppressions(conn)) == []
    assert not conn.in_transaction


def test_remove_and_is_suppressed(conn: sqlite3.Connection) -> None:
    add(conn, PHONE, "sms")
    add(conn, PHONE, "all")
    assert [e["channel"] for e in is_suppressed(conn, PHONE, "sms")] == ["sms", "all"]
    assert [e["channel"] for e in is_suppressed(conn, PHONE, "email")] == ["all"]
    assert remove_suppression(conn, PHONE, "sms") == 1
    assert [e["channel"] for e in is_suppressed(conn, PHONE, "sms")] == ["all"]
    assert remove_suppression(conn, PHONE, None) == 1
    assert is_suppressed(conn, PHONE, None) == []


def test_list_filters_by_channel_including_all(conn: sqlite3.Connection) -> None:
    add(conn, PHONE, "sms")
    add(conn, "ann@example.com", "email")
    add(conn, "bob@example.com", "all")
    assert [e["channel"] for e in list_suppressions(conn, "email")] == ["email", "all"]
    assert [e["channel"] for e in list_suppressions(conn, "all")] == ["all"]
    assert len(list(list_suppressions(conn, limit=2))) == 2


@pytest.mark.parametrize(
    ("raw", "channel", "expected"),
    [
        ("+1 (415) 555-0100", None, (PHONE, "sms")),
        ("Ann@Example.com", None, ("ann@example.com", "email")),
        ("https://hooks.example.com/x", None, ("https://hooks.example.com/x", "webhook")),
        ("415-555-0100", "all", (PHONE, "all")),
        ("Ann@Example.com", "all", ("ann@example.com", "all")),
    ],
)
def test_normalize_for(raw: str, channel: str | None, expected: tuple[str, str]) -> None:
    assert normalize_for(raw, channel) == expected


def test_normalize_for_all_rejects_what_is_neither() -> None:
    with pytest.raises(AddressError, match="neither a phone number nor an email"):
        normalize_for("not-an-address", "all")


@pytest.mark.parametrize(
    ("cell", "protected"),
    [
        ("=cmd|' /C calc'!A0", "'=cmd|' /C calc'!A0"),
        ("+14155550100", "'+14155550100"),
        ("-1", "'-1"),
        ("@SUM(A1)", "'@SUM(A1)"),
        ("\tx", "'\tx"),
        ("\rx", "'\rx"),
        ("ann@example.com", "ann@example.com"),
        ("'quoted", "'quoted"),
        ("'=x", "''=x"),  # else the import would take the value's apostrophe for its own
    ],
)
def test_protect_cell(cell: str, protected: str) -> None:
    assert protect_cell(cell) == protected


def test_unprotect_cell_strips_only_an_export_apostrophe() -> None:
    assert unprotect_cell("'+14155550100") == "+14155550100"
    assert unprotect_cell(" '=x ") == "=x"
    assert unprotect_cell("'o'brien@example.com") == "'o'brien@example.com"


def test_import_with_invalid_lines_and_apostrophes(conn: sqlite3.Connection, tmp_path: Path) -> None:
    path = write(
        tmp_path / "optouts.csv",
        "Address,Channel,Reason\n"
        "'+14155550100,sms,STOP\n"
        "not a phone,sms,\n"
        "\n"
        "Ann@Example.com,,\n"
        "bob@example.com,fax,\n"
        '"+1 415 555 0199",all,"multi\nline reason"\n'
        "carol@example.com,email,\n",
    )
    result = import_csv(conn, path, None, "import", None, "US", NOW)
    assert (result.added, result.already) == (4, 0)
    assert [(line, reason.split(":")[0]) for line, _, reason in result.invalid] == [
        (3, "address"),
        (6, "channel"),
    ]
    assert result.invalid[0][1] == "not a phone"
    entries = {(e["address"], e["channel"]): e for e in list_suppressions(conn)}
    assert set(entries) == {
        (PHONE, "sms"),
        ("ann@example.com", "email"),
        ("+14155550199", "all"),
        ("carol@example.com", "email"),
    }
    assert entries[(PHONE, "sms")]["reason"] == "STOP"
    assert entries[("ann@example.com", "email")]["reason"] == "import"
    assert entries[("+14155550199", "all")]["reason"] == "multi\nline reason"
    assert entries[(PHONE, "sms")]["source"] == f"import:{path}"


def test_import_phone_column_and_channel_default(conn: sqlite3.Connection, tmp_path: Path) -> None:
    path = write(tmp_path / "p.csv", "phone\n4155550100\n")
    result = import_csv(conn, path, "all", "import", "list:p.csv", "US", NOW)
    assert (result.added, result.invalid) == (1, [])
    [entry] = list_suppressions(conn)
    assert (entry["address"], entry["channel"], entry["source"]) == (PHONE, "all", "list:p.csv")


def test_import_reads_every_address_column_not_just_the_first(
    conn: sqlite3.Connection, tmp_path: Path
) -> None:
    """A CRM export with both a phone and an email column: each line is two opt-outs. Only the
    phone column used to be read, and the email opt-outs were dropped without a word."""
    path = write(tmp_path / "optouts.csv",
                 "phone,email\n4155550100,Ann@Example.com\n,bob@example.com\n4155550199,\n"
                 "12,carol@example.com\n")
    result = import_csv(conn, path, None, "import", None, "US", NOW)
    assert result.added == 5
    # Each address is judged on its own: a bad phone does not cost the line's email.
    assert [(line, raw) for line, raw, _ in result.invalid] == [(5, "12")]
    assert {(e["address"], e["channel"]) for e in list_suppressions(conn)} == {
        (PHONE, "sms"), ("+14155550199", "sms"), ("ann@example.com", "email"),
        ("bob@example.com", "email"), ("carol@example.com", "email"),
    }


def test_import_without_address_column_is_an_input_error(
    conn: sqlite3.Connection, tmp_path: Path
) -> None:
    path = write(tmp_path / "bad.csv", "name,mobile\nann,+14155550100\n")
    with pytest.raises(InputError, match=r"bad.csv:1: no address column"):
        import_csv(conn, path, None, "import", None, "US", NOW)


def test_import_missing_file_is_an_input_error(conn: sqlite3.Connection, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="cannot read"):
        import_csv(conn, tmp_path / "nope.csv", None, "import", None, "US", NOW)


def test_export_protects_against_formula_injection(
    conn: sqlite3.Connection, tmp_path: Path
) -> None:
    add_suppressions(conn, [("ann@example.com", "email")], "=cmd|' /C calc'!A0", "cli", NOW)
    add(conn, PHONE)
    stream = io.StringIO()
    assert export_csv(conn, stream) == 2
    rows = list(csv.reader(io.StringIO(stream.getvalue())))
    assert rows[0] == ["address", "channel", "reason", "source", "created_at", "address_hash"]
    assert rows[1][:3] == ["ann@example.com", "email", "'=cmd|' /C calc'!A0"]
    assert rows[2][:2] == ["'+14155550100", "sms"]
    assert not any(cell.startswith(("=", "+", "-", "@")) for row in rows for cell in row)


def test_export_import_round_trip(conn: sqlite3.Connection, tmp_path: Path) -> None:
    add(conn, PHONE)
    add(conn, "ann@example.com", "all")
    add_suppressions(conn, [("bob@example.com", "email")], "=HYPERLINK(1)", "cli", NOW)
    path = tmp_path / "export.csv"
    assert export_csv(conn, path) == 3
    assert path.stat().st_mode & 0o777 == 0o600
    result = import_csv(conn, path, None, "import", None, "US", NOW)
    assert (result.added, result.already, result.invalid) == (0, 3, [])

    other = Store.open(tmp_path / "other.db")
    try:
        result = import_csv(other.conn, path, None, "import", None, "US", NOW)
        assert (result.added, result.invalid) == (3, [])
        got = {(e["address"], e["channel"], e["reason"]) for e in list_suppressions(other.conn)}
        assert got == {
            (PHONE, "sms", "manual"),
            ("ann@example.com", "all", "manual"),
            ("bob@example.com", "email", "=HYPERLINK(1)"),
        }
    finally:
        other.close()


@contextlib.contextmanager
def exported_and_imported(conn: sqlite3.Connection, tmp_path: Path) -> Iterator[sqlite3.Connection]:
    """The store's list exported, then imported into a new store: one entry added, none bad."""
    path = tmp_path / "export.csv"
    export_csv(conn, path)
    other = Store.open(tmp_path / "other.db")
    try:
        result = import_csv(other.conn, path, None, "import", None, "US", NOW)
        assert (result.added, result.invalid) == (1, [])
        yield other.conn
    finally:
        other.close()


def test_an_address_starting_with_an_apostrophe_round_trips(
    conn: sqlite3.Connection, tmp_path: Path
) -> None:
    """``'=ann@example.com`` is a valid email address (an apostrophe is a local-part character)
    and is exported as it is; the import took its apostrophe for the export's and restored the
    opt-out as ``=ann@example.com``, another address: the recipient was no longer suppressed."""
    odd = normalize_email("'=ann@example.com")
    assert odd == "'=ann@example.com"
    add_suppressions(conn, [(odd, "email")], "'+1 reason", "cli", NOW)
    with exported_and_imported(conn, tmp_path) as other:
        got = [(e["address"], e["reason"]) for e in list_suppressions(other)]
        assert got == [(odd, "'+1 reason")]
        assert suppressed_among(other, [address_hash(odd)], "email")


def test_erased_entry_round_trips_by_hash(conn: sqlite3.Connection, tmp_path: Path) -> None:
    add(conn, PHONE)
    conn.execute("UPDATE suppressions SET address = NULL")
    with exported_and_imported(conn, tmp_path) as other:
        assert suppressed_among(other, [PHONE_HASH], "sms") == {PHONE_HASH}


def test_unreadable_file_adds_nothing(conn: sqlite3.Connection, tmp_path: Path) -> None:
    path = tmp_path / "latin1.csv"
    path.write_bytes(b"address\n+14155550100\nren\xe9@example.com\n")
    with pytest.raises(InputError, match="latin1.csv:3: not UTF-8 text"):
        import_csv(conn, path, None, "import", None, "US", NOW)
    assert list(list_suppressions(conn)) == []
    assert not conn.in_transaction


def test_bom_and_crlf_are_read(conn: sqlite3.Connection, tmp_path: Path) -> None:
    path = tmp_path / "excel.csv"
    path.write_bytes(b"\xef\xbb\xbfEmail\r\nAnn@Example.com\r\n")
    result = import_csv(conn, path, None, "import", None, "US", NOW)
    assert (result.added, result.invalid) == (1, [])


def test_lines_ended_by_cr_alone_are_read(conn: sqlite3.Connection, tmp_path: Path) -> None:
    """A file with classic Mac line ends (CR alone: Excel's "CSV (Macintosh)") is read by
    `campaign send` as a recipient list, but an import of the same kind of file was refused as
    a whole ("new-line character seen in unquoted field ..."), every opt-out in it with it; in a
    campaign's suppression_lists, it stopped every run."""
    path = tmp_path / "mac.csv"
    path.write_bytes(b"address,reason\r+14155550100,STOP\r\"ann@example.com\",\"two\rlines\"\r"
                     b"\rnot-a-phone,x\r")
    result = import_csv(conn, path, None, "import", None, "US", NOW)
    assert (result.added, result.already) == (2, 0)
    assert [(line, value) for line, value, _ in result.invalid] == [(6, "not-a-phone")]
    assert {(e["address"], e["reason"]) for e in list_suppressions(conn)} == {
        ("+14155550100", "STOP"), ("ann@example.com", "two\rlines")
    }
    data = b"ab\r\ncd\ref\n\r\ng\rh"  # a CRLF split between two reads stays one line end
    for size in range(1, len(data) + 1):
        assert list(_byte_lines(io.BytesIO(data), size)) == data.splitlines(keepends=True)


def test_webhook_url_host_and_scheme_case_is_one_entry(conn: sqlite3.Connection) -> None:
    # Scheme and host are case-insensitive (RFC 3986 6.2.2.1): a webhook suppressed as written in
    # one place must stop the same URL spelled differently in a recipient file. The path is left
    # alone (tokens in it are case-sensitive).
    assert add(conn, "https://Hooks.Example.COM/services/T0/B0/XyZ") == (1, 0)
    assert add(conn, "HTTPS://hooks.example.com/services/T0/B0/XyZ") == (0, 1)
    assert add(conn, "https://hooks.example.com:443/services/T0/B0/XyZ") == (0, 1)
    assert add(conn, "https://hooks.example.com/services/T0/B0/xyz") == (1, 0)
    recipient = normalize_for("https://hooks.example.com/services/T0/B0/XyZ", "webhook")[0]
    assert suppressed_among(conn, [address_hash(recipient)], "webhook") == {
        address_hash(recipient)
    }
    # Credentials before the host keep their case.
    assert normalize_for("https://User:PW@Example.com/x", "webhook")[0] == (
        "https://User:PW@example.com/x"
    )


def version_2_store(path: Path) -> sqlite3.Connection:
    """A store as version 2 of campaign-cli wrote it (before webhook URLs were re-spelt)."""
    conn = sqlite3.connect(path, isolation_level=None)
    for migration in MIGRATIONS[:2]:
        migration(conn)
    conn.execute("PRAGMA user_version = 2")
    return conn


def test_webhook_entries_of_an_older_store_are_respelt(tmp_path: Path) -> None:
    # A store written before the scheme and host were lower-cased holds the URL as it was typed,
    # hashed so: the migration re-spells it, or the entry would no longer match anything.
    old = "https://Hooks.Example.COM/services/T0/B0/XyZ"
    new = "https://hooks.example.com/services/T0/B0/XyZ"
    conn = version_2_store(tmp_path / "store.db")
    conn.executemany(
        "INSERT INTO suppressions (address_hash, address, channel, reason, source, created_at) "
        "VALUES (?, ?, ?, 'manual', 'cli', ?)",
        [(address_hash(old), old, "webhook", NOW), (address_hash(old), old, "all", NOW),
         (address_hash(new), new, "all", NOW)],
    )
    conn.execute(
        "INSERT INTO consents (address_hash, address, channel, purpose, status, source, "
        "recorded_at, created_at) VALUES (?, ?, 'webhook', 'marketing', 'revoked', 'cli', ?, ?)",
        (address_hash(old), old, NOW, NOW),
    )
    conn.close()
    store = Store.open(tmp_path / "store.db")
    try:
        recipient = normalize_for(new, "webhook")[0]
        ahash = address_hash(recipient)
        assert suppressed_among(store.conn, [ahash], "webhook") == {ahash}
        entries = [(e["address"], e["channel"]) for e in list_suppressions(store.conn)]
        assert sorted(entries) == [(recipient, "all"), (recipient, "webhook")]
        consents = store.conn.execute("SELECT address_hash FROM consents").fetchall()
        assert consents == [(ahash,)]
    finally:
        store.close()


def test_webhook_urls_an_older_store_journaled_are_respelt_so_erasure_finds_them(
    tmp_path: Path
) -> None:
    """Migration 3 re-spelt the webhook URLs of suppressions and consents, not those of the run
    journals: a URL a version-2 run journaled as typed (``https://Hooks.Example.COM/...``) was
    never matched again. `suppress erase` blanked "0 journal entries" and left it in the store,
    and `trace` found no journal row for it."""
    from campaign_cli.store.suppressions import erase_address

    old = "https://Hooks.Example.COM:443/services/T0/B0/XyZ"
    other = "https://hooks.example.com/services/T0/B0/XyZ"  # the same URL, in the same run
    new = "https://hooks.example.com/services/T0/B0/XyZ"
    conn = version_2_store(tmp_path / "store.db")
    conn.executemany(
        "INSERT INTO messages (run_id, row, channel, line, rkey, address, dedupe_key, "
        "dedupe_addr, state, updated_at) VALUES (1, ?, 'webhook', ?, ?, ?, ?, ?, 'sent', ?)",
        [(1, 2, "k1", old, "k1", old, NOW), (2, 3, "k2", other, "k2", other, NOW)],
    )
    conn.close()
    store = Store.open(tmp_path / "store.db")
    try:
        assert store.conn.execute("SELECT row, address FROM messages ORDER BY row").fetchall(
        ) == [(1, new), (2, new)]
        assert erase_address(store.conn, new, NOW).journal_rows == 2
        assert store.conn.execute(
            "SELECT COUNT(*) FROM messages WHERE address IS NOT NULL OR dedupe_addr IS NOT NULL"
        ).fetchone() == (0,)
    finally:
        store.close()


@pytest.mark.parametrize("volume_exists", [True, False])
def test_the_store_and_its_wal_files_are_0600_also_through_a_dangling_symlink(
    tmp_path: Path, volume_exists: bool
) -> None:
    """The store holds addresses and the unsubscribe secret: created 0600, and SQLite gives its
    -wal and -shm files the same mode. A store path that is a symlink to a file not made yet
    (a store kept on another volume) must be created the same way: not 0644 by the umask, and
    not "unable to open" when the folder it names is missing too."""
    if volume_exists:
        (tmp_path / "volume").mkdir()
    link = tmp_path / "link.db"
    link.symlink_to(tmp_path / "volume" / "real.db")
    for path in (tmp_path / "plain.db", link):
        store = Store.open(path)
        try:
            add(store.conn, PHONE)
            files = list(path.resolve().parent.glob(path.resolve().name + "*"))
            assert len(files) == 3  # the store, -wal, -shm
            for file in files:
                assert file.stat().st_mode & 0o777 == 0o600, file
        finally:
            store.close()


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="hHtTpPsS:/[]@?#.:80443aB-_ ", min_size=0, max_size=40)
       | st.from_regex(r"https?://[A-Za-z0-9.@:\[\]-]{1,20}(:[0-9]{0,5})?(/[A-Za-z0-9?#=]*)?",
                       fullmatch=True))
def test_migration_3_spells_webhook_urls_as_version_3_did(raw: str) -> None:
    """Migration 3 keeps its own frozen copy of the spelling rule: today it must agree with
    `normalize_webhook_url` (a later change to that must not change what the migration does)."""
    from campaign_cli.addresses import normalize_webhook_url
    from campaign_cli.store.db import _v3_webhook_spelling

    try:
        expected: str | None = normalize_webhook_url(raw)
    except AddressError as exc:
        if "not a URL a request can go to" in exc.detail:
            return  # refused by a later rule (a port past 65535): no address of today matches it
        expected = None
    assert _v3_webhook_spelling(raw) == expected


def test_ctrl_c_while_a_command_waits_for_another_process_long_write_is_seen_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`suppress add`, `suppress import` and `consent import` wait for another process's long
    write (up to LOCK_WAIT) in tries of SQLite's busy timeout, inside which Python cannot run
    a signal's handler: Ctrl-C was only seen at the end of a try, up to 10 s later (probed:
    9.4 s before exit 130). The tries of the wait are short; a Ctrl-C ends it at once."""
    import time

    from campaign_cli.store import db

    path = tmp_path / "store.db"
    holder = Store.open(path)
    adder = Store.open(path)  # the busy timeout every store connection has: 10 s
    tried: list[float] = []
    started = time.monotonic()

    def ctrl_c_during_the_first_try(exc: sqlite3.OperationalError) -> bool:
        tried.append(time.monotonic() - started)
        raise KeyboardInterrupt  # pressed during the try: Python sees it when the try ends

    monkeypatch.setattr(db, "is_busy", ctrl_c_during_the_first_try)
    holder.conn.execute("BEGIN IMMEDIATE")  # the other process's long transaction
    try:
        with pytest.raises(KeyboardInterrupt):
            add(adder.conn, PHONE)
    finally:
        holder.conn.execute("COMMIT")
    assert len(tried) == 1 and tried[0] < db.BUSY_TIMEOUT_MS / 1000 / 4
    assert not is_suppressed(holder.conn, PHONE, "sms")
    assert adder.conn.execute("PRAGMA busy_timeout").fetchone()[0] == db.BUSY_TIMEOUT_MS
    holder.close()
    adder.close()


def test_an_opt_out_waits_for_another_process_long_write_instead_of_failing(
    tmp_path: Path,
) -> None:
    """A run importing a big suppression list (or a `suppress import`) holds the write lock
    longer than SQLite's busy timeout: a `suppress add` meanwhile must wait its turn, not fail
    with 'database is locked' (the opt-out unrecorded)."""
    import threading

    path = tmp_path / "store.db"
    holder = Store.open(path)
    adder = Store.open(path)
    adder.conn.execute("PRAGMA busy_timeout = 20")  # one try of the wait: 20 ms, not 10 s
    tries: list[str] = []
    tried_twice = threading.Event()
    outcome: list[object] = []

    def trace(sql: str) -> None:
        if sql.startswith("BEGIN IMMEDIATE"):
            tries.append(sql)
            if len(tries) >= 2:
                tried_twice.set()

    def add_now() -> None:
        try:
            outcome.append(add(adder.conn, PHONE))
        except sqlite3.Error as exc:
            outcome.append(exc)
        tried_twice.set()

    adder.conn.set_trace_callback(trace)
    holder.conn.execute("BEGIN IMMEDIATE")  # the other process's long transaction
    thread = threading.Thread(target=add_now)
    thread.start()
    try:
        assert tried_twice.wait(30)  # a condition: the adder found the lock taken, twice
        assert outcome == []  # still waiting, not failed
    finally:
        holder.conn.execute("COMMIT")
        thread.join(30)
    assert outcome == [(1, 0)]
    assert is_suppressed(holder.conn, PHONE, "sms")
    holder.close()
    adder.close()


def test_export_holds_no_read_transaction_while_its_output_blocks(tmp_path: Path) -> None:
    """`suppress export - | less` left open: the export used to stream rows from one open query,
    so its read transaction lasted as long as the reader of its output stalled, and a run's
    journal meanwhile could not be checkpointed (its -wal file grew without bound: 87 MB instead
    of 4 for 20,000 messages). It reads in pages, each a short read of its own."""
    path = tmp_path / "store.db"
    store = Store.open(path)
    total = 3000
    add_suppressions(store.conn, [(f"p{i}@example.com", "email") for i in range(total)],
                     "manual", "cli", NOW)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("PRAGMA busy_timeout = 0")
    checkpoints: list[tuple[int, int, int]] = []

    class Stalled(io.StringIO):
        """Output whose reader is slow: meanwhile another process writes and checkpoints."""

        def write(self, text: str) -> int:
            if len(checkpoints) < 50:
                other.execute("INSERT INTO settings (key, value) VALUES (?, 'v') "
                              "ON CONFLICT (key) DO UPDATE SET value = value || 'v'", ("w",))
                checkpoints.append(other.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone())
            return super().write(text)

    try:
        stream = Stalled()
        assert export_csv(store.conn, stream) == total
        assert len(stream.getvalue().splitlines()) == total + 1
        # (busy, frames in the log, frames checkpointed): every write could be checkpointed.
        assert all(busy == 0 and log == done for busy, log, done in checkpoints), checkpoints
    finally:
        other.close()
        store.close()


def test_a_store_of_a_newer_campaign_cli_is_refused_untouched(tmp_path: Path) -> None:
    """A store with more migrations than this program knows is refused, naming it; opening it
    switched its journal mode to WAL first (a change to the file a newer program wrote)."""
    path = tmp_path / "store.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE future (a)")
    conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1:d}")
    conn.commit()
    conn.close()
    before = path.read_bytes()
    for readonly in (False, True):
        with pytest.raises(StoreError) as caught:
            connect(path, readonly=readonly)
        assert path.read_bytes() == before
        assert str(caught.value) == (
            f"{path}: the store has schema version {len(MIGRATIONS) + 1}, newer than this "
            f"campaign-cli knows ({len(MIGRATIONS)}): upgrade campaign-cli")


@pytest.mark.parametrize("kind", ["suppressions", "consents"])
def test_an_import_holds_the_store_only_to_copy_its_checked_entries_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """An import read, checked and normalised its whole file inside one write transaction: a
    100,000-line list held every running campaign's journal for ~5 s (no message sent), and a
    file of a few million lines past the five minutes a run waits, so every run aborted (exit 1).
    Now the file is staged in a temporary table first: while it is read another process writes
    at once, and the import still adds all of it, or nothing."""
    from campaign_cli.store import consents as consent_store
    from campaign_cli.store import suppressions as suppression_store

    store = Store.open(tmp_path / "store.db")
    lines = 2500
    path = tmp_path / "list.csv"
    with path.open("w", encoding="utf-8") as handle:
        handle.write("phone,status,recorded_at\n")
        handle.writelines(f"+1415555{i:04d},granted,2024-01-01\n" for i in range(lines))
    module = suppression_store if kind == "suppressions" else consent_store
    real_normalize = module.normalize_for
    calls = 0
    writes_meanwhile: list[str] = []

    def normalize_and_write_elsewhere(*args: object) -> tuple[str, str]:
        nonlocal calls
        calls += 1
        if calls in (10, lines // 2, lines):  # another process writes, waiting for no one
            other = sqlite3.connect(tmp_path / "store.db", timeout=0, isolation_level=None)
            try:
                other.execute("BEGIN IMMEDIATE")
                other.execute("ROLLBACK")
                writes_meanwhile.append("written")
            except sqlite3.OperationalError as exc:
                writes_meanwhile.append(str(exc))
            finally:
                other.close()
        return real_normalize(*args)  # type: ignore[no-any-return]

    monkeypatch.setattr(module, "normalize_for", normalize_and_write_elsewhere)
    if kind == "suppressions":
        result = suppression_store.import_csv(store.conn, path, None, "import", None, "US", NOW)
    else:
        result = consent_store.import_csv(store.conn, path, None, "marketing", None, "US", NOW)
    assert writes_meanwhile == ["written"] * 3
    assert (result.added, result.already, result.invalid_total) == (lines, 0, 0)
    assert store.conn.execute(f"SELECT count(*) FROM {kind}").fetchone()[0] == lines
    # In the file's order, as one by one.
    first = store.conn.execute(f"SELECT address FROM {kind} ORDER BY id LIMIT 1").fetchone()[0]
    assert first == "+14155550000"

    # Stopped while it reads (a Ctrl-C, a bad disk): nothing of it is in the store, and the
    # next import is not troubled by what was staged.
    store.conn.execute(f"DELETE FROM {kind}")
    calls = 0

    def interrupted(*args: object) -> tuple[str, str]:
        nonlocal calls
        calls += 1
        if calls == lines // 2:
            raise KeyboardInterrupt
        return real_normalize(*args)  # type: ignore[no-any-return]

    monkeypatch.setattr(module, "normalize_for", interrupted)
    with pytest.raises(KeyboardInterrupt):
        if kind == "suppressions":
            suppression_store.import_csv(store.conn, path, None, "import", None, "US", NOW)
        else:
            consent_store.import_csv(store.conn, path, None, "marketing", None, "US", NOW)
    assert store.conn.execute(f"SELECT count(*) FROM {kind}").fetchone()[0] == 0
    monkeypatch.setattr(module, "normalize_for", real_normalize)
    if kind == "suppressions":
        again = suppression_store.import_csv(store.conn, path, None, "import", None, "US", NOW)
    else:
        again = consent_store.import_csv(store.conn, path, None, "marketing", None, "US", NOW)
    assert (again.added, again.already) == (lines, 0)
    assert not store.conn.in_transaction
    store.close()


def test_a_store_that_cannot_be_used_is_refused_with_its_connection_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Opening a file that is not a store raised StoreError and left the connection it had
    opened to the garbage collector: a file descriptor held for nothing, and on Python 3.13 a
    ResourceWarning ("unclosed database") that failed the suite wherever it was collected."""
    from campaign_cli.store import db

    opened: list[sqlite3.Connection] = []
    real = sqlite3.connect

    def counting(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        opened.append(real(*args, **kwargs))
        return opened[-1]

    monkeypatch.setattr(db.sqlite3, "connect", counting)
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database" * 100)
    for readonly in (False, True):
        with pytest.raises(StoreError, match="not a usable campaign store"):
            connect(junk, readonly=readonly)
    assert len(opened) == 2
    for conn in opened:
        with pytest.raises(sqlite3.ProgrammingError, match="closed"):
            conn.execute("SELECT 1")


def test_erase_reads_the_journal_once_and_changes_its_rows_by_primary_key(
    conn: sqlite3.Connection,
) -> None:
    """`suppress erase` holds the store's write lock while it blanks the journal, so every
    running campaign waits for it. It read the whole journal four times per address (a SELECT
    calling lower(trim()) on every row, the attempts' IN-subquery twice, the UPDATE by address):
    19 s per address, the lock held throughout, on a store of 28 runs and 5.6 million rows. One
    pass finds the rows; the attempts and the rows themselves are then changed by primary key."""
    from campaign_cli.store.suppressions import erase_address

    conn.execute(
        "INSERT INTO runs (id, campaign, run_key, campaign_file, recipients_file, "
        "recipients_sha256, purpose, channels, currency, status, created_at) VALUES "
        "(1, 'c', 'k', 'f', 'r', 'h', 'marketing', '[\"sms\"]', 'USD', 'done', ?)", (NOW,))
    journal = [(1, row, "sms", row + 1, f"id{row}", PHONE if row == 7 else f"+1415555{row:04d}",
                "sent", NOW) for row in range(1, 40)]
    conn.executemany(
        "INSERT INTO messages (run_id, row, channel, line, rkey, address, state, updated_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", journal)
    conn.executemany(
        "INSERT INTO attempts (run_id, row, channel, attempt, provider, outcome, error_text, at) "
        "VALUES (?, ?, 'sms', 1, 'p', 'sent', ?, ?)",
        [(1, row, f"to {address}", NOW) for _, row, _, _, _, address, _, _ in journal])
    statements: list[str] = []
    conn.set_trace_callback(statements.append)
    try:
        result = erase_address(conn, PHONE, NOW)
    finally:
        conn.set_trace_callback(None)
    assert result.journal_rows == 1
    assert conn.execute("SELECT count(*) FROM messages WHERE address IS NULL").fetchone() == (1,)
    assert conn.execute("SELECT row FROM attempts WHERE error_text IS NULL").fetchall() == [(7,)]
    scans = []
    for sql in statements:
        if sql.split(None, 1)[0].upper() in ("SELECT", "UPDATE", "INSERT", "DELETE"):
            plan = " / ".join(r[3] for r in conn.execute(f"EXPLAIN QUERY PLAN {sql}"))
            if "SCAN messages" in plan or "SCAN attempts" in plan:
                scans.append((sql, plan))
    assert len(scans) == 1, scans  # the one pass that finds the rows


def test_the_list_is_read_a_page_at_a_time_holding_no_read_between_pages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`suppress list | less`: the list was one query whose rows were read as they were shown,
    so a listing left open held a read transaction, and a running campaign's write-ahead log
    could not be checkpointed for as long (it grows without bound). It is read a page at a time,
    each page its own read, complete and in order, and the limit holds across pages."""
    monkeypatch.setattr(suppressions_module, "LIST_PAGE", 3)
    store = Store.open(tmp_path / "store.db")
    conn = store.conn
    try:
        items = [(f"user{i}@example.com", "email" if i % 3 else "all") for i in range(11)]
        add_suppressions(conn, items, "manual", "cli", NOW)
        listing = list_suppressions(conn)
        first = next(listing)
        assert checkpoint_truncates(tmp_path / "store.db")
        rest = list(listing)
        assert [(e["address"], e["channel"]) for e in [first, *rest]] == items
        assert [e["id"] for e in [first, *rest]] == sorted(e["id"] for e in [first, *rest])
        assert [e["address"] for e in list_suppressions(conn, "all")] == [
            a for a, c in items if c == "all"]
        for limit in (0, 1, 3, 4, 6, 7, 11, 12, 2**70):
            assert [e["address"] for e in list_suppressions(conn, limit=limit)] == [
                a for a, _ in items][:limit]
        assert [e["address"] for e in list_suppressions(conn, "email", limit=5)] == [
            a for a, _ in items][:5]  # every entry applies to email (the 'all' ones too)
    finally:
        store.close()
