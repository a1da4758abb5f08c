from __future__ import annotations

import csv
import io
import json
import os
import sqlite3
import stat
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import typer  # noqa: TID251 - a CLI test
from typer.testing import CliRunner  # noqa: TID251

from campaign_cli.addresses import address_hash
from campaign_cli.cli import consent, suppress
from campaign_cli.cli.context import AppContext
from campaign_cli.cli.output import Output
from campaign_cli.store.db import Store
from campaign_cli.testing import FakeClock
from tests.conftest import CampaignFactory


@dataclass
class Result:
    exit_code: int
    out: str
    err: str


class Cli:
    """The suppress and consent groups under a bare root, with a context built by hand."""

    def __init__(self, tmp_path: Path) -> None:
        self.store_path = tmp_path / "store.db"
        self.clock = FakeClock(datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc))
        self.root = typer.Typer()
        self.root.callback()(lambda: None)
        self.root.add_typer(suppress.app, name="suppress")
        self.root.add_typer(consent.app, name="consent")
        self.stdout: type[io.StringIO] = io.StringIO  # what a command's stdout is

    def __call__(self, *args: str) -> Result:
        stdout, stderr = self.stdout(), io.StringIO()
        ctx = AppContext(
            output=Output(stdout=stdout, stderr=stderr),
            store_option=self.store_path,
            env={},
            clock=self.clock,
        )
        result = CliRunner().invoke(self.root, list(args), obj=ctx)
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception
        return Result(result.exit_code, stdout.getvalue() + result.stdout, stderr.getvalue())

    def addresses(self) -> set[tuple[str, str]]:
        with Store.open(self.store_path) as store:
            rows = store.conn.execute("SELECT address, channel FROM suppressions").fetchall()
        return {(str(a), str(c)) for a, c in rows}


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    return Cli(tmp_path)


def test_add_counts_added_and_already_present(cli: Cli) -> None:
    r = cli("suppress", "add", "+1 (415) 555-0100", "Ann@Example.com")
    assert (r.exit_code, r.out.strip()) == (0, "added 2, already present 0")
    r = cli("suppress", "add", "+14155550100", "bob@example.com", "--reason", "complaint")
    assert (r.exit_code, r.out.strip()) == (0, "added 1, already present 1")
    assert cli.addresses() == {
        ("+14155550100", "sms"),
        ("ann@example.com", "email"),
        ("bob@example.com", "email"),
    }


@pytest.mark.parametrize("command", [
    ("suppress", "add"), ("suppress", "erase"), ("consent", "grant"), ("consent", "revoke"),
])
def test_a_number_without_its_country_code_says_how_it_was_read(
    cli: Cli, command: tuple[str, str]
) -> None:
    """`2015550123` is read in --region (US unless given): an opt-out recorded for a number of
    the wrong country would silently miss its recipient, so the command says how it read it.
    Numbers written with their country code (and emails) are read as written: nothing said."""
    r = cli(*command, "(201) 555-0123", "+44 20 7946 0018",
            "ann@example.com")
    assert r.exit_code == 0, r.err
    assert r.err.splitlines() == [
        "read '(201) 555-0123' as +12015550123 (region US; give --region for another country)"
    ]
    r = cli(*command, "020 7946 0020", "--region", "GB")
    assert r.err.splitlines() == [
        "read '020 7946 0020' as +442079460020 (region GB; give --region for another country)"
    ]


def test_add_bad_address_is_one_line_exit_2_and_adds_nothing(cli: Cli) -> None:
    r = cli("suppress", "add", "+14155550100", "not-a-phone")
    assert r.exit_code == 2
    assert r.err.startswith("error: address 'not-a-phone': ")
    assert len(r.err.strip().splitlines()) == 1
    assert "Traceback" not in r.err + r.out
    assert cli.addresses() == set()


def read_only_opens(monkeypatch: pytest.MonkeyPatch, how: str = "mode=ro") -> None:
    """SQLite opens a file it may not write (mode 0400, `chattr +i`, a read-only mount) for
    reading, silently: the same, without needing root to make a file that root cannot write.
    ``how``: the URI parameters that say so."""
    real = sqlite3.connect

    def connect(database: Any, *args: Any, uri: bool = False, **kwargs: Any) -> Any:
        if not uri:
            database, uri = f"{Path(database).resolve().as_uri()}?{how}", True
        return real(database, *args, uri=uri, **kwargs)

    monkeypatch.setattr(sqlite3, "connect", connect)


def test_a_read_only_store_is_read_and_a_write_to_it_is_one_line_exit_2(
    cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store this user cannot write: `add` was an internal error ("a bug", exit 1) naming
    SQLite's OperationalError; it is a store error, one line naming the file, and the lists
    still read."""
    assert cli("suppress", "add", "+12015550100").exit_code == 0
    read_only_opens(monkeypatch)
    result = cli("suppress", "add", "+12015550101")
    assert result.exit_code == 2, result.err
    assert result.err.strip().splitlines() == [
        f"error: {cli.store_path}: the store is read-only here (file permissions, an immutable "
        "file or a read-only file system): nothing was written"]
    listed = cli("suppress", "list")
    assert listed.exit_code == 0 and "+12015550100" in listed.out
    monkeypatch.undo()
    assert cli.addresses() == {("+12015550100", "sms")}


def test_a_store_in_a_folder_nobody_may_write_is_still_read(
    cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store on a read-only mount (a snapshot, a backup) or in a folder this user may not
    write: SQLite cannot create the WAL's index file (-shm) beside it, and every command failed
    with "not a usable campaign store: unable to open database file", `status` and the lists
    too. A store closed cleanly (no write-ahead log left) is read as it is; a write still says
    the store is read-only."""
    assert cli("suppress", "add", "+12015550100").exit_code == 0
    assert not Path(f"{cli.store_path}-shm").exists()  # the last connection removed it
    read_only_opens(monkeypatch, "mode=ro&readonly_shm=1")  # no -shm can be created there
    listed = cli("suppress", "list")
    assert listed.exit_code == 0, listed.err
    assert "+12015550100" in listed.out
    added = cli("suppress", "add", "+12015550101")
    assert added.exit_code == 2
    assert added.err.strip().splitlines()[-1] == (
        f"error: {cli.store_path}: the store is read-only here (file permissions, an immutable "
        "file or a read-only file system): nothing was written")
    monkeypatch.undo()
    assert cli.addresses() == {("+12015550100", "sms")}



@pytest.mark.parametrize("how", ["mode=ro", "mode=ro&readonly_shm=1"])
def test_a_store_of_an_older_campaign_cli_that_cannot_be_written_is_one_line_exit_2(
    cli: Cli, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """A store an older campaign-cli wrote (version 4 here), opened where it cannot be written:
    its migrations cannot run. Every command said "not a usable campaign store: attempt to write
    a readonly database"; in a folder nobody may write (read as it is) `status` was an internal
    error, "no such column: stopped" (exit 1). It is one line saying what is wrong and what to
    do, and the file is left as it was."""
    from campaign_cli.cli.main import get_app
    from campaign_cli.store.db import MIGRATIONS

    assert cli("suppress", "add", "+12015550100").exit_code == 0
    with sqlite3.connect(cli.store_path) as conn:  # back to version 4, as it wrote runs
        for column in ("stopped", "in_doubt_found", "in_doubt_resent", "recipient_key",
                       "strategy", "reading", "summary"):
            conn.execute(f"ALTER TABLE runs DROP COLUMN {column}")
        conn.execute("PRAGMA user_version = 4")
    conn.close()
    before = cli.store_path.read_bytes()
    read_only_opens(monkeypatch, how)
    expected = [
        f"error: {cli.store_path}: the store has schema version 4, older than this "
        f"campaign-cli's ({len(MIGRATIONS)}), and is read-only here (file permissions, an immutable file or a "
        "read-only file system): it cannot be upgraded; open it once where it can be written"]
    status = CliRunner().invoke(get_app(), ["--store", str(cli.store_path), "status"])
    assert (status.exit_code, status.stderr.strip().splitlines()) == (2, expected)
    listed = cli("suppress", "list")
    assert (listed.exit_code, listed.err.strip().splitlines()) == (2, expected)
    monkeypatch.undo()
    assert cli.store_path.read_bytes() == before

def test_an_import_into_a_store_whose_disk_fills_up_is_one_line_exit_2(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk fills up during `suppress import`: SQLite rolls the transaction back itself, and
    the ROLLBACK after it failed ("cannot rollback - no transaction is active"), hiding the full
    disk behind an internal error (exit 1, "a bug")."""
    assert cli("suppress", "add", "+12015550100").exit_code == 0
    real = sqlite3.connect

    def full(*args: Any, **kwargs: Any) -> Any:  # a disk with no room for a page more
        conn = real(*args, **kwargs)
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count = {pages:d}")
        return conn

    monkeypatch.setattr(sqlite3, "connect", full)
    listed = tmp_path / "list.csv"
    listed.write_text("address,channel\n" + "".join(
        f"+1201{200 + i // 10000:03d}{i % 10000:04d},sms\n" for i in range(3000)))
    result = cli("suppress", "import", str(listed))
    assert result.exit_code == 2, result.err
    assert result.err.strip().splitlines() == [
        f"error: {cli.store_path}: the store's disk is full: nothing was written; free some "
        "space and try again"]
    monkeypatch.undo()
    assert cli.addresses() == {("+12015550100", "sms")}


def test_unknown_channel_is_a_usage_error(cli: Cli) -> None:
    r = cli("suppress", "add", "+14155550100", "--channel", "fax")
    assert r.exit_code == 2
    assert cli.addresses() == set()


def test_channel_all_suppresses_every_channel(cli: Cli) -> None:
    assert cli("suppress", "add", "ann@example.com", "--channel", "all").exit_code == 0
    for channel in ("email", "sms", "push", "webhook"):
        r = cli("suppress", "check", "Ann@Example.com", "--channel", channel, "--json")
        assert r.exit_code == 0
        assert json.loads(r.out)["suppressed"] is True


def test_check_says_either_way_and_exits_0(cli: Cli) -> None:
    r = cli("suppress", "check", "+1 415 555 0100")
    assert (r.exit_code, r.out.strip()) == (0, "not suppressed: +14155550100")
    cli("suppress", "add", "+14155550100", "--reason", "STOP")
    r = cli("suppress", "check", "(415) 555-0100")
    assert r.exit_code == 0
    assert r.out.startswith("suppressed: +14155550100 (sms: STOP (cli, 2024-05-01T12:00:00.000Z))")
    r = cli("suppress", "check", "+14155550100", "--channel", "email", "--json")
    payload = json.loads(r.out)
    assert (payload["address"], payload["suppressed"], payload["entries"]) == (
        "+14155550100", False, []
    )


def test_remove(cli: Cli) -> None:
    cli("suppress", "add", "+14155550100")
    cli("suppress", "add", "+14155550100", "--channel", "all")
    r = cli("suppress", "remove", "+14155550100", "--channel", "sms")
    assert (r.exit_code, r.out.strip()) == (0, "removed 1")
    assert "still suppressed on every channel" in r.err
    r = cli("suppress", "remove", "+1 415 555 0100")
    assert (r.exit_code, r.out.strip()) == (0, "removed 1")
    assert cli.addresses() == set()


def test_removing_a_provider_or_list_opt_out_warns(cli: Cli, tmp_path: Path) -> None:
    """A STOP the provider reported is the recipient's own opt-out, and an entry of a campaign's
    suppression list comes back with the next run: removing either must not pass in silence."""
    with Store.open(cli.store_path) as store:
        store.conn.executemany(
            "INSERT INTO suppressions (address_hash, address, channel, reason, source, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            [(address_hash("+14155550100"), "+14155550100", "sms", "provider 21610", "provider",
              "2024-04-01T00:00:00.000Z"),
             (address_hash("ann@example.com"), "ann@example.com", "email", "list",
              "list:optout.csv", "2024-04-02T00:00:00.000Z")],
        )
    cli("suppress", "add", "bob@example.com")
    r = cli("suppress", "remove", "(415) 555-0100")
    assert (r.exit_code, r.out.strip()) == (0, "removed 1")
    assert r.err.startswith(
        "warning: +14155550100: the sms entry was an opt-out the provider reported "
        "(provider 21610, 2024-04-01T00:00:00.000Z)"
    )
    r = cli("suppress", "remove", "ann@example.com", "bob@example.com")
    assert (r.exit_code, r.out.strip()) == (0, "removed 2")
    assert r.err.startswith(
        "warning: ann@example.com: the email entry came from the list optout.csv"
    )
    assert "bob@example.com" not in r.err  # an entry added by hand goes without a word
    assert cli.addresses() == set()


def test_list_table_and_json(cli: Cli) -> None:
    cli("suppress", "add", "+14155550100", "ann@example.com")
    r = cli("suppress", "list")
    assert r.exit_code == 0
    assert "+14155550100" in r.out and "ann@example.com" in r.out
    r = cli("suppress", "list", "--json", "--channel", "email")
    entries = json.loads(r.out)
    assert [(e["address"], e["channel"], e["reason"]) for e in entries] == [
        ("ann@example.com", "email", "manual")
    ]


def test_list_shows_text_that_looks_like_rich_markup_as_written(cli: Cli, tmp_path: Path) -> None:
    # A reason or source is free text (from --reason, an imported file, a provider's answer):
    # rich read "[/x]" as markup, and `suppress list` died with MarkupError (exit 1) for good.
    reason = "[/x] [bold]B[/bold] [red]"
    cli("suppress", "add", "+14155550100", "--reason", reason)
    path = tmp_path / "optouts.csv"
    path.write_text("address,reason\nann@example.com,[link=https://x]y[/link]\n")
    cli("suppress", "import", str(path))
    r = cli("suppress", "list")
    assert r.exit_code == 0, r.err
    assert reason in r.out and "[link=https://x]y[/link]" in r.out


def test_terminal_escape_sequences_in_stored_text_are_shown_not_sent_to_the_terminal(
    cli: Cli, tmp_path: Path
) -> None:
    """A reason from an imported file (a CRM export) or a provider's answer is free text: an
    escape sequence in it went to the operator's terminal as is, where it can clear the screen,
    retitle the window or hide the rows around it. It is shown escaped; --json keeps the text."""
    path = tmp_path / "optouts.csv"
    path.write_text("address,reason\nann@example.com,\x1b[2J\x1b]0;owned\x07\x9b31mred\n",
                    encoding="utf-8")
    cli("suppress", "import", str(path))
    for args in (("suppress", "list"), ("suppress", "check", "ann@example.com")):
        r = cli(*args)
        assert r.exit_code == 0, r.err
        assert "\x1b" not in r.out + r.err and "\x9b" not in r.out + r.err, r.out
        assert "\\x1b[2J" in r.out and "\\x9b31mred" in r.out, r.out
    [entry] = json.loads(cli("suppress", "list", "--json").out)
    assert entry["reason"] == "\x1b[2J\x1b]0;owned\x07\x9b31mred"


def test_import_reports_invalid_lines(cli: Cli, tmp_path: Path) -> None:
    path = tmp_path / "optouts.csv"
    path.write_text("address,reason\n'+14155550100,STOP\nbogus,\nann@example.com,\n")
    r = cli("suppress", "import", str(path))
    assert r.exit_code == 0
    assert r.out.strip() == "added 2, already present 0, invalid 1"
    assert f"warning: {path}:3: address: " in r.err
    assert cli.addresses() == {("+14155550100", "sms"), ("ann@example.com", "email")}


@pytest.mark.parametrize("group", ["suppress", "consent"])
def test_an_import_of_many_bad_lines_shows_the_first_hundred_and_counts_them_all(
    cli: Cli, tmp_path: Path, group: str
) -> None:
    """A file of a million bad lines (the wrong column picked) held every line's message in
    memory (136 MB for 300,000) and printed them all: the first 100 are shown, all counted."""
    path = tmp_path / "list.csv"
    lines = [f"bogus{i},revoked,2024-01-01" for i in range(250)]
    path.write_text("address,status,recorded_at\n" + "\n".join(lines) + "\n+14155550100,revoked,2024-01-01\n")
    r = cli(group, "import", str(path))
    assert r.exit_code == 0, r.err
    assert r.out.strip().endswith("already present 0, invalid 250")
    warnings = r.err.strip().splitlines()
    assert len(warnings) == 101
    assert warnings[0].startswith(f"warning: {path}:2: address: ")
    assert warnings[99].startswith(f"warning: {path}:101: ")
    assert warnings[100] == f"warning: {path}: 150 more invalid line(s) not shown"


@pytest.mark.parametrize(
    ("group", "content"),
    [
        ("suppress", 'address,reason\n+14155550100,"STOP reply\n+14155550101,x\n+14155550102,y\n'),
        ("consent", "address,status,recorded_at,source\n+14155550100,revoked,2024-01-01,\"form\n"
                    "+14155550101,revoked,2024-01-01,x\n"),
    ],
)
def test_import_with_a_quote_left_open_is_refused(
    cli: Cli, tmp_path: Path, group: str, content: str
) -> None:
    # Read leniently, the open quote swallowed every later line into one reason (or source):
    # "added 1, invalid 0" and the other opt-outs or revocations were silently never recorded.
    path = tmp_path / "in.csv"
    path.write_text(content)
    r = cli(group, "import", str(path))
    assert r.exit_code == 2
    assert r.err.startswith(f"error: {path}:2: a quoted field is never closed")
    assert len(r.err.strip().splitlines()) == 1
    assert cli.addresses() == set()


def test_import_with_a_repeated_column_name_is_refused(cli: Cli, tmp_path: Path) -> None:
    # Cells were keyed by column name, so the last "address" column won and the first column's
    # opt-outs were silently dropped ("added 1, invalid 0" for a file naming two).
    path = tmp_path / "in.csv"
    path.write_text("Address,reason,address\n+14155550100,STOP,+14155550101\n")
    r = cli("suppress", "import", str(path))
    assert r.exit_code == 2
    assert r.err.startswith(f"error: {path}:1: address: column name repeated (columns 1 and 3)")
    assert cli.addresses() == set()


def test_import_missing_file_is_exit_2(cli: Cli, tmp_path: Path) -> None:
    r = cli("suppress", "import", str(tmp_path / "missing.csv"))
    assert r.exit_code == 2
    assert r.err.startswith(f"error: {tmp_path / 'missing.csv'}: cannot read")
    assert "Traceback" not in r.err


def test_export_to_stdout_and_round_trip(cli: Cli, tmp_path: Path) -> None:
    cli("suppress", "add", "+14155550100", "--reason", "=cmd|' /C calc'!A0")
    r = cli("suppress", "export", "-")
    assert r.exit_code == 0
    rows = list(csv.reader(io.StringIO(r.out)))
    assert rows[1][:3] == ["'+14155550100", "sms", "'=cmd|' /C calc'!A0"]

    path = tmp_path / "export.csv"
    r = cli("suppress", "export", str(path))
    assert r.exit_code == 0 and "exported 1 entries" in r.err
    r = cli("suppress", "import", str(path))
    assert r.out.strip() == "added 0, already present 1, invalid 0"


def test_an_export_over_an_existing_file_makes_it_private_and_follows_no_link(
    cli: Cli, tmp_path: Path
) -> None:
    """`suppress export FILE` created a new file 0600 (it holds personal data), but a file that
    existed kept its mode, world-readable from last year's `cp`, and a symbolic link at FILE
    was followed, writing the list wherever it pointed. An existing regular file is made 0600
    before anything is written to it; a link is refused in one line (exit 2), its target left
    as it was; a FIFO is written as it is."""
    cli("suppress", "add", "+14155550100")
    path = tmp_path / "optouts.csv"
    path.write_text("old content that is longer than the export will be\n" * 10)
    path.chmod(0o644)
    r = cli("suppress", "export", str(path))
    assert r.exit_code == 0, r.err
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().splitlines()[1].startswith("'+14155550100,sms,")
    assert len(path.read_text().splitlines()) == 2  # the old content is gone

    target = tmp_path / "elsewhere.csv"
    target.write_text("not the list\n")
    target.chmod(0o644)
    link = tmp_path / "link.csv"
    link.symlink_to(target)
    dangling = tmp_path / "dangling.csv"
    dangling.symlink_to(tmp_path / "nowhere.csv")
    for named in (link, dangling):
        r = cli("suppress", "export", str(named))
        assert r.exit_code == 2
        assert r.err.splitlines() == [
            f"error: {named}: cannot write: it is a symbolic link: not followed (the list holds "
            "personal data); give the path of the file itself"]
    assert target.read_text() == "not the list\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert not (tmp_path / "nowhere.csv").exists()

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o644)
    fifo.chmod(0o644)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        r = cli("suppress", "export", str(fifo))
        assert r.exit_code == 0, r.err
        assert os.read(reader, 65536).decode().splitlines()[1].startswith("'+14155550100,sms")
    finally:
        os.close(reader)
    assert stat.S_IMODE(fifo.stat().st_mode) == 0o644


def test_an_export_over_a_readable_file_it_cannot_make_private_leaves_it_alone(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another user's file that others may read: this user cannot make it 0600 (EPERM), so the
    list is not written into it and its content is kept (one line, exit 2)."""
    cli("suppress", "add", "+14155550100")
    path = tmp_path / "theirs.csv"
    path.write_text("their content\n")
    path.chmod(0o644)

    def refused(fd: int, mode: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "fchmod", refused)
    r = cli("suppress", "export", str(path))
    assert r.exit_code == 2
    assert r.err.splitlines() == [
        f"error: {path}: cannot write: other users may read it (mode 0644) and it is not ours "
        "to make private; it is left as it was"]
    assert path.read_text() == "their content\n"


def test_an_export_over_the_store_itself_is_refused_and_the_store_kept(
    cli: Cli, tmp_path: Path
) -> None:
    """`suppress export` named the store (a slip between `--store FILE` and `export FILE`, a
    hard link to it) or its write-ahead log: the file was cut to nothing and the CSV written
    into it, and every opt-out, consent and run journal was lost ("file is not a database").
    The store's own files are refused in one line (exit 2) before anything is cut."""
    cli("suppress", "add", "+14155550100", "a@example.com")
    before = cli.addresses()
    hard = tmp_path / "hard-link.csv"
    os.link(cli.store_path, hard)
    for named in (cli.store_path, hard, Path(f"{cli.store_path}-wal"),
                  Path(f"{cli.store_path}-shm")):
        r = cli("suppress", "export", str(named))
        assert r.exit_code == 2, (named, r.err)
        assert r.err.splitlines() == [
            f"error: {named}: cannot write: it is the store itself (or one of its files): the "
            "list would be written over it; give another path"]
        assert cli.addresses() == before
    assert cli("suppress", "export", str(tmp_path / "out.csv")).exit_code == 0


def test_an_export_to_stdout_is_utf_8_whatever_the_locale_and_reads_back(
    cli: Cli, tmp_path: Path
) -> None:
    """`suppress export - > backup.csv` wrote the CSV in standard output's encoding: under a
    Latin-1 locale (or Windows' code page, stdout redirected to a file) `suppress import` of the
    backup was refused as a whole ("not UTF-8 text": no opt-out restored), a character outside
    it was an internal error with half a file written, and each line ended CR CR LF on Windows.
    Standard output gets the bytes `export FILE` writes: UTF-8, lines ending CR LF."""
    written: list[io.TextIOWrapper] = []

    class Latin1(io.TextIOWrapper):
        def __init__(self) -> None:
            super().__init__(io.BytesIO(), encoding="latin-1", newline="\r\n")
            written.append(self)

        def getvalue(self) -> str:
            return ""

    cli("suppress", "add", "jürgen@bücher.de", "+14155550100", "--reason", "Müller 😀")
    cli.stdout = Latin1
    r = cli("suppress", "export", "-")
    assert r.exit_code == 0, r.err
    written[0].flush()
    data = written[0].buffer.getvalue()  # type: ignore[attr-defined]
    cli.stdout = io.StringIO
    assert cli("suppress", "export", str(tmp_path / "file.csv")).exit_code == 0
    assert data == (tmp_path / "file.csv").read_bytes()
    (tmp_path / "backup.csv").write_bytes(data)
    restored = Cli(tmp_path / "restored")
    (tmp_path / "restored").mkdir()
    r = restored("suppress", "import", str(tmp_path / "backup.csv"))
    assert (r.exit_code, r.out.strip()) == (0, "added 2, already present 0, invalid 0"), r.err
    assert restored.addresses() == cli.addresses()


def test_an_export_into_another_users_file_or_fifo_is_refused(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A FIFO was written as it is, whoever's it was: another user's FIFO at the export's path
    (made in a folder others may write, /tmp, before a nightly `export /tmp/optouts.csv`, mode
    0622) received the whole list. A regular file of another user's that this user may change
    (root's cron) was made 0600 and written: it is still theirs to read. Either is refused in
    one line (exit 2), left as it was; a device such as /dev/null is still written."""
    cli("suppress", "add", "+14155550100")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    fifo.chmod(0o622)
    theirs = tmp_path / "theirs.csv"
    theirs.write_text("their content\n")
    theirs.chmod(0o600)
    owner = os.getuid()
    monkeypatch.setattr(os, "geteuid", lambda: owner + 1)  # these are someone else's
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        for named in (fifo, theirs):
            r = cli("suppress", "export", str(named))
            assert r.exit_code == 2, (named, r.err)
            assert r.err.splitlines() == [
                f"error: {named}: cannot write: it belongs to another user (uid {owner}), who "
                "may read it; it is left as it was"]
        assert os.read(reader, 65536) == b""  # nothing was written into the FIFO
    finally:
        os.close(reader)
    assert theirs.read_text() == "their content\n"
    assert stat.S_IMODE(theirs.stat().st_mode) == 0o600
    if os.path.exists("/dev/null"):
        assert cli("suppress", "export", "/dev/null").exit_code == 0


def test_consent_grant_revoke_list(cli: Cli) -> None:
    r = cli("consent", "grant", "+1 415 555 0100", "--at", "2024-01-01T00:00:00Z")
    assert (r.exit_code, r.out.strip()) == (
        0, "granted marketing consent: recorded 1, already present 0"
    )
    r = cli("consent", "revoke", "+14155550100", "--channel", "all", "--source", "call")
    assert r.exit_code == 0
    r = cli("consent", "list", "(415) 555-0100", "--json")
    entries = {e["channel"]: e for e in json.loads(r.out)}
    assert entries["sms"]["status"] == "revoked"
    assert entries["sms"]["via"] == "all"
    assert entries["all"]["recorded_at"] == "2024-05-01T12:00:00.000Z"


def test_consent_bad_at_is_exit_2(cli: Cli) -> None:
    r = cli("consent", "grant", "ann@example.com", "--at", "last tuesday")
    assert r.exit_code == 2
    assert r.err.startswith("error: --at: not an ISO 8601")
    r = cli("consent", "grant", "ann@example.com", "--at", "2031-01-01")
    assert r.exit_code == 2 and "future" in r.err


def test_consent_revoke_at_a_bare_date_outranks_a_grant_timed_that_day(cli: Cli) -> None:
    assert cli("consent", "grant", "ann@example.com", "--at", "2024-03-10T15:00:00Z",
               "--channel", "email").exit_code == 0
    r = cli("consent", "revoke", "ann@example.com", "--at", "2024-03-10", "--channel", "email")
    assert r.exit_code == 0 and "not in force" not in r.err
    [entry] = json.loads(cli("consent", "list", "ann@example.com", "--json").out)
    assert (entry["status"], entry["recorded_at"]) == ("revoked", "2024-03-10T23:59:59.999Z")


def test_consent_list_takes_a_limit_as_suppress_list_does(cli: Cli) -> None:
    """`consent list` had no --limit: on a store of 150,000 consent records it printed them all
    (minutes through the table) where `suppress list --limit` stops."""
    for n in range(3):
        assert cli("consent", "grant", f"+1415555010{n}").exit_code == 0
    assert len(json.loads(cli("consent", "list", "--json").out)) == 3
    r = cli("consent", "list", "--limit", "2", "--json")
    assert r.exit_code == 0 and len(json.loads(r.out)) == 2
    assert cli("consent", "list", "--limit", "-1").exit_code == 2


def test_consent_import(cli: Cli, tmp_path: Path) -> None:
    path = tmp_path / "c.csv"
    path.write_text(
        "email,status,recorded_at\nann@example.com,granted,2024-01-01\nbob@example.com,x,2024-01-01\n"
    )
    r = cli("consent", "import", str(path))
    assert r.exit_code == 0
    assert r.out.strip() == "recorded 1, already present 0, invalid 1"
    assert f"{path}:3: status: " in r.err


def test_the_real_app_registers_the_groups(tmp_path: Path) -> None:
    from campaign_cli.cli.main import get_app

    result = CliRunner().invoke(
        get_app(), ["--store", str(tmp_path / "s.db"), "suppress", "add", "+14155550100"]
    )
    assert result.exit_code == 0, result.output
    assert "added 1, already present 0" in result.stdout


def test_region_is_any_case_and_a_typo_is_exit_2(cli: Cli, tmp_path: Path) -> None:
    # `--region gb` means GB: national numbers of the file are suppressed, not left out as
    # invalid lines under a region the library does not know.
    optouts = tmp_path / "optouts.csv"
    optouts.write_text("phone\n020 7946 0018\n", encoding="utf-8")
    result = cli("suppress", "import", str(optouts), "--region", "gb")
    assert result.exit_code == 0, result
    assert cli.addresses() == {("+442079460018", "sms")}
    assert cli("consent", "grant", "020 7946 0019", "--region", "gb").exit_code == 0
    for args in (("suppress", "import", str(optouts)), ("suppress", "add", "020 7946 0018"),
                 ("consent", "grant", "020 7946 0018")):
        result = cli(*args, "--region", "UK")  # GB is the code
        assert result.exit_code == 2, result
    assert cli.addresses() == {("+442079460018", "sms")}
    with pytest.raises(typer.BadParameter, match="'UK' is not a region code"):
        suppress.region_value("UK")


def test_consent_at_out_of_range_in_utc_is_exit_2(cli: Cli, tmp_path: Path) -> None:
    r = cli("consent", "grant", "ann@example.com", "--at", "0001-01-01T00:00:00+01:00")
    assert r.exit_code == 2
    assert r.err.startswith("error: --at: ") and "out of range" in r.err
    path = tmp_path / "c.csv"
    path.write_text("email,status,recorded_at\nann@example.com,granted,0001-01-01T00:00:00+01:00\n"
                    "bob@example.com,granted,2024-01-01\n")
    r = cli("consent", "import", str(path))
    assert r.exit_code == 0
    assert r.out.strip() == "recorded 1, already present 0, invalid 1"
    assert f"{path}:2: recorded_at: " in r.err


def test_a_grant_dated_ahead_does_not_outrank_a_revocation_recorded_after_it_arrived(
    cli: Cli,
) -> None:
    """The clock says 12:00. A grant dated 12:30 (a skewed clock, within the tolerance) used to
    outrank a revocation recorded at 12:00 for half an hour: a STOP ignored. A record speaks
    from no later than when we learned of it, so the revocation decides (a tie goes to revoked)
    and nothing needs to be warned about."""
    r = cli("consent", "grant", "ann@example.com", "--at", "2024-05-01T12:30:00Z")
    assert (r.exit_code, r.err) == (0, "")
    r = cli("consent", "revoke", "ann@example.com")
    assert (r.exit_code, r.err, r.out.strip()) == (
        0, "", "revoked marketing consent: recorded 1, already present 0"
    )
    r = cli("consent", "list", "ann@example.com", "--json")
    assert [e["status"] for e in json.loads(r.out)] == ["revoked"]
    with Store.open(cli.store_path) as store:  # the evidence itself is kept as given
        times = {row[0] for row in store.conn.execute("SELECT recorded_at FROM consents")}
    assert "2024-05-01T12:30:00.000Z" in times


def test_a_revocation_for_all_channels_warns_per_channel_a_later_grant_keeps(cli: Cli) -> None:
    cli("consent", "grant", "+14155550100", "--channel", "sms", "--at", "2024-03-01")
    r = cli("consent", "revoke", "+14155550100", "--channel", "all", "--at", "2024-02-01")
    assert r.exit_code == 0
    assert r.err.startswith(
        "warning: +14155550100: not in force on sms: the granted record of "
        "2024-03-01T00:00:00.000Z (cli, via sms) decides"
    )
    assert r.err.count("warning:") == 1  # on every other channel the revocation is in force


def test_erase_forgets_the_address_but_never_the_opt_out(
    cli: Cli, tmp_path: Path, make_campaign: CampaignFactory
) -> None:
    """A data-protection request: the address must go from the store, and the person must never
    be sent to again (DESIGN §5: suppressions survive erasure, kept as a hash). There was no
    command for it: `suppress remove` would have dropped the opt-out with the address."""
    from campaign_cli.config import load_campaign
    from campaign_cli.pipeline import SendOptions, run_campaign

    ann = "ann@example.com"
    assert cli("suppress", "add", "+1 415 555 0100", "--channel", "sms").exit_code == 0
    assert cli("consent", "grant", ann, "--channel", "email", "--purpose", "marketing",
               "--source", "web form").exit_code == 0
    campaign = make_campaign([["c1", "Ann", "+14155550199", ann]])
    first = run_campaign(load_campaign(campaign, {}), cli.store_path, SendOptions(),
                         clock=FakeClock())
    assert first.counts.get("sent", 0) >= 1

    erased = cli("suppress", "erase", ann, "+14155550100", "+14155550199")
    assert erased.exit_code == 0, erased.err
    assert "erased ann@example.com: suppressed on every channel by hash (added)" in erased.out
    assert "erased +14155550199: suppressed on every channel by hash (added); blanked in 0 " \
        "suppression, 0 consent and 1 journal entries" in erased.out
    raw = cli.store_path.read_bytes() + b"".join(  # free space and the log included
        p.read_bytes() for p in tmp_path.glob("store.db-wal"))
    for text in (b"ann@example.com", b"4155550100", b"4155550199"):
        assert text not in raw.lower()

    check = json.loads(cli("suppress", "check", ann, "--json").out)
    assert check["suppressed"] and check["entries"][0]["address"] is None
    again = run_campaign(load_campaign(campaign, {}), cli.store_path,
                         SendOptions(run_key="after-erasure"), clock=FakeClock())
    assert again.counts == {"suppressed": 1}  # the phone: never sent to again


def test_erase_a_push_token(cli: Cli) -> None:
    """A device token is personal data like a phone number, and its owner may ask for it to go:
    `suppress erase` inferred every address's kind from its shape and read a push token as a
    phone, so a token could not be erased at all (exit 2). `--channel push` says how to read it."""
    token = "fcm-token:APA91bH_0123456789abcdefXYZ"
    assert cli("suppress", "add", token, "--channel", "push").exit_code == 0
    assert cli("consent", "grant", token, "--channel", "push").exit_code == 0
    r = cli("suppress", "erase", token, "--channel", "push")
    assert r.exit_code == 0, r.err
    assert r.out.startswith(f"erased {token}: suppressed on every channel by hash (added); "
                            "blanked in 1 suppression, 1 consent")
    assert cli.addresses() == {("None", "push"), ("None", "all")}
    check = json.loads(cli("suppress", "check", token, "--channel", "push", "--json").out)
    assert check["suppressed"] and {e["address"] for e in check["entries"]} == {None}
    bad = cli("suppress", "erase", token)  # without it, the error says what to do
    assert bad.exit_code == 2
    assert "--channel push" in bad.err and len(bad.err.strip().splitlines()) == 1


def test_erase_blanks_the_address_where_it_is_the_recipient_key(
    cli: Cli, tmp_path: Path, make_campaign: CampaignFactory
) -> None:
    """A list without an id column keys its recipients by email (`key: email`): the journal
    then holds the address, as the file spells it, in the recipient key of every channel's row
    too. `suppress erase` blanked only the address column, and said it had blanked the journal
    while `Ann@Example.com` stayed in it (found in the store's bytes)."""
    from campaign_cli.config import load_campaign
    from campaign_cli.pipeline import SendOptions, run_campaign

    campaign = make_campaign(
        [["c1", "Ann", "+14155550199", "Ann@Example.com"],
         ["c2", "Bob", "+14155550198", "bob@example.com"]],
        channels={"sms": {"provider": "box", "body": "Hi {{ first_name }}"}},
        extra={"recipients": {"file": "recipients.csv", "key": "email",
                              "columns": {"phone": "phone", "email": "email"}}},
    )
    first = run_campaign(load_campaign(campaign, {}), cli.store_path, SendOptions(),
                         clock=FakeClock())
    assert first.counts == {"sent": 2}

    erased = cli("suppress", "erase", "ann@example.com")
    assert erased.exit_code == 0, erased.err
    raw = cli.store_path.read_bytes() + b"".join(
        p.read_bytes() for p in tmp_path.glob("store.db-wal"))
    assert b"ann@example.com" not in raw.lower()
    assert b"bob@example.com" in raw  # another recipient's key stays
    check = json.loads(cli("suppress", "check", "Ann@Example.com", "--json").out)
    assert check["suppressed"] and check["entries"][0]["channel"] == "all"


@pytest.mark.parametrize("platform", ["relative", "no home"])
def test_an_opt_out_without_a_home_for_the_default_store_is_refused_not_kept_in_the_cwd(
    platform: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cron job or a container user with no passwd entry and no HOME (or a relative one), and
    neither --store nor CAMPAIGN_STORE. platformdirs up to 4.2 then answers a relative path
    ("~/.local/share/campaign-cli", or "rel/.local/share/..." for HOME=rel): the opt-out went
    into a store under whatever folder the command ran in, and a send run from elsewhere never
    saw it. Later platformdirs raise RuntimeError: "internal error ... a bug" and exit 1. Either
    way: one line saying how to name the store, exit 2, nothing written."""
    import platformdirs

    def user_data_dir(appname: str, appauthor: object = None) -> str:
        if platform == "relative":
            return f"~/.local/share/{appname}"
        raise RuntimeError("could not determine the home directory for '~/.local/share', "
                           "set an absolute HOME or XDG variable")

    monkeypatch.setattr(platformdirs, "user_data_dir", user_data_dir)
    monkeypatch.chdir(tmp_path)
    from campaign_cli.cli.main import get_app

    result = CliRunner().invoke(get_app(), ["suppress", "add", "+14155550100"],
                                env={"CAMPAIGN_STORE": ""})
    assert result.exit_code == 2, result.output
    [line] = result.stderr.splitlines()
    assert "--store" in line and "CAMPAIGN_STORE" in line and "a bug" not in line
    assert list(tmp_path.iterdir()) == []


def test_a_list_limit_past_what_sqlite_counts_means_every_entry(cli: Cli) -> None:
    """`suppress list --limit 99999999999999999999` (an operator's "all of them") was an
    internal error (exit 1: OverflowError binding SQLite's 64-bit LIMIT); it lists every entry."""
    cli("suppress", "add", "+14155550100", "ann@example.com")
    every = cli("suppress", "list", "--json")
    for huge in ("9223372036854775807", "99999999999999999999"):
        r = cli("suppress", "list", "--json", "--limit", huge)
        assert (r.exit_code, r.out) == (0, every.out), r.err


def test_a_store_other_users_can_read_is_warned_of(cli: Cli) -> None:
    """The store is created 0600, but a chmod, a copy or a restore from a backup may open it to
    other users, and nothing said so: it holds every address, opt-out and consent record."""
    assert cli("suppress", "add", "+12015550100").exit_code == 0
    assert stat.S_IMODE(cli.store_path.stat().st_mode) == 0o600
    assert "warning" not in cli("suppress", "list").err
    cli.store_path.chmod(0o644)
    listed = cli("suppress", "list")
    assert listed.exit_code == 0 and "+12015550100" in listed.out
    assert listed.err.splitlines()[0] == (
        f"warning: {cli.store_path} can be read by other users (mode 0644): it holds addresses, "
        f"opt-outs and consent records; restrict it with: chmod 600 {cli.store_path}")
    cli.store_path.chmod(0o600)
    assert "warning" not in cli("suppress", "list").err


@pytest.mark.parametrize("command", ["suppress", "consent"])
def test_an_import_whose_temporary_folder_fills_up_names_that_folder_not_the_store(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    """An import stages its checked entries in a temporary table before it copies them in: SQLite
    writes that table to its temporary folder (SQLITE_TMPDIR, else TMPDIR, else /var/tmp), not
    beside the store. That folder full (a small tmpfs), the import said "the store's disk is
    full ... free some space", sending the operator to a disk with room to spare."""
    assert cli("suppress", "add", "+12015550100").exit_code == 0
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setenv("SQLITE_TMPDIR", str(folder))
    real = sqlite3.connect

    class TemporaryFolderFull(sqlite3.Connection):
        filled = False

        def executemany(self, sql: str, rows: Any) -> sqlite3.Cursor:
            try:
                return super().executemany(sql, rows)
            except sqlite3.OperationalError:
                self.filled = True
                raise

        def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
            if self.filled and sql.startswith("DROP TABLE"):  # on a full tmpfs: it needs a
                raise sqlite3.OperationalError("database or disk is full")  # journal there
            return super().execute(sql, *args)

    def temporary_folder_full(*args: Any, **kwargs: Any) -> Any:  # the store's disk has room
        conn = real(*args, factory=TemporaryFolderFull, **kwargs)
        conn.execute("PRAGMA temp.max_page_count = 2")
        return conn

    monkeypatch.setattr(sqlite3, "connect", temporary_folder_full)
    listed = tmp_path / "list.csv"
    listed.write_text("phone,status,recorded_at\n" + "".join(
        f"+1201{200 + i // 10000:03d}{i % 10000:04d},granted,2024-01-01\n" for i in range(3000)))
    args = ["--purpose", "marketing"] if command == "consent" else []
    result = cli(command, "import", str(listed), *args)
    assert result.exit_code == 2, result.err
    assert result.err.strip().splitlines() == [
        f"error: SQLite's temporary folder {folder} is full: nothing was written; free some "
        "space there, or set SQLITE_TMPDIR to a folder with room"]
    monkeypatch.undo()
    assert cli.addresses() == {("+12015550100", "sms")}


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def counting(monkeypatch: pytest.MonkeyPatch, module: Any, name: str) -> list[int]:
    """Count the entries the store's ``module.name`` listing yields: ``[count]``, live."""
    yielded = [0]
    real = getattr(module, name)

    def listing(*args: Any, **kwargs: Any) -> Any:
        for entry in real(*args, **kwargs):
            yielded[0] += 1
            yield entry

    monkeypatch.setattr(module, name, listing)
    return yielded


def whole_json(entries: list[dict[str, Any]]) -> str:
    """What `Output.json` writes for the whole list at once."""
    stdout = io.StringIO()
    Output(stdout=stdout).json(entries)
    return stdout.getvalue()


def written_after(cli: Cli, yielded: list[int]) -> list[int]:
    """Make the command's stdout note how many entries had been read at each write."""
    seen: list[int] = []

    class Noting(io.StringIO):
        def write(self, text: str) -> int:
            seen.append(yielded[0])
            return super().write(text)

    cli.stdout = Noting
    return seen


def test_a_long_suppress_list_is_written_as_it_is_read_one_escaped_line_per_entry(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`suppress list` of 150,000 opt-outs took 98 s and 850 MB (`--json`: 4 s): the whole list
    was read into memory, then rich measured every cell of every row before printing the first,
    and `| less`, `| grep` or a cron job waited for it all. Off a terminal the list is written as
    it is read, a page at a time: a header line, then one tab-separated line per entry, oldest
    first, with control characters, line breaks and tabs written as escapes (a cell is one
    cell, a line one entry), and --json is the same document as before, written as it is read."""
    from campaign_cli.store import suppressions

    monkeypatch.setattr(suppressions, "LIST_PAGE", 7)
    total = 2500
    path = tmp_path / "optouts.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["address", "reason"])
        for i in range(total):
            writer.writerow([f"user{i}@example.com", f"r{i}\x1b[2J\ttab\nline\x9b [b]x[/b]"])
    assert cli("suppress", "import", str(path)).exit_code == 0
    yielded = counting(monkeypatch, suppressions, "list_suppressions")
    seen = written_after(cli, yielded)
    r = cli("suppress", "list")
    assert r.exit_code == 0, r.err
    lines = r.out.splitlines()
    assert lines[0] == "address\tchannel\treason\tsource\tcreated_at"
    assert lines[1:] == [
        f"user{i}@example.com\temail\tr{i}\\x1b[2J\\ttab\\nline\\x9b [b]x[/b]\t"
        "import:optouts.csv\t2024-05-01T12:00:00.000Z" for i in range(total)]
    assert r.err.strip() == f"{total} entries"
    assert yielded[0] == total and seen[0] < 10 and seen[len(seen) // 2] < total  # streamed

    seen.clear()
    yielded[0] = 0
    r = cli("suppress", "list", "--json")
    assert r.exit_code == 0, r.err
    with Store.open(cli.store_path) as store:
        entries = list(suppressions.list_suppressions(store.conn))
    assert r.out == whole_json(entries)  # the document --json always wrote
    assert seen[0] < 10 and seen[len(seen) // 2] < total

    r = cli("suppress", "list", "--limit", "9", "--channel", "email")
    assert (r.exit_code, len(r.out.splitlines())) == (0, 10)
    assert r.out.splitlines()[-1].startswith("user8@example.com\t")
    assert cli("suppress", "list", "--json", "--limit", "0").out == "[]\n"
    r = cli("suppress", "list", "--channel", "sms")
    assert (r.out, r.err) == ("address\tchannel\treason\tsource\tcreated_at\n", "0 entries\n")


@pytest.mark.parametrize("reason", [
    "a literal \\n, not a line break", "a\nb", "tab\there", "back\\slash\\", "esc\x1b[2J\r",
    "\\x1b typed out", "ünïcode 😀",
])
def test_each_cell_of_the_plain_list_reads_back_exactly(cli: Cli, reason: str) -> None:
    """The plain form is data (`cut`, `awk`, a script): its cells are backslash escapes as in a
    Python string literal, backslashes included. A reason holding a typed-out ``\\n`` read the
    same as one holding a line break."""
    import ast

    assert cli("suppress", "add", "a@example.com", "--reason", reason).exit_code == 0
    line = cli("suppress", "list").out.splitlines()[1]
    cell = line.split("\t")[2]
    assert ast.literal_eval(f'"{cell}"') == reason


def test_a_list_on_a_terminal_is_a_table_until_it_is_long(
    cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A short list on a terminal looks as it did (rich's table, cells as text, not markup); a
    long one is not held back to be measured: it is written line by line as off a terminal."""
    from campaign_cli.cli import output

    monkeypatch.setattr(output, "TABLE_ROWS", 3)
    cli.stdout = Terminal
    cli("suppress", "add", "a@example.com", "b@example.com", "--reason", "[/x] \x1b[2J")
    cli("consent", "grant", "a@example.com", "b@example.com")
    for group in ("suppress", "consent"):
        r = cli(group, "list")
        assert r.exit_code == 0 and "┃" in r.out and "\t" not in r.out, r.out
        assert "a@example.com" in r.out and "b@example.com" in r.out
        assert r.err == "2 entries\n"
    assert "[/x] \\x1b[2J" in cli("suppress", "list").out
    cli("suppress", "add", "c@example.com", "d@example.com")
    cli("consent", "grant", "c@example.com", "d@example.com")
    for group in ("suppress", "consent"):
        r = cli(group, "list")
        assert r.exit_code == 0 and "┃" not in r.out, r.out
        assert len(r.out.splitlines()) == 5 and r.err == "4 entries\n"
        assert r.out.splitlines()[1].startswith("a@example.com\t")


class Ascii(io.TextIOWrapper):
    """Standard output that is not UTF-8 (PYTHONIOENCODING=ascii, a Latin-1 locale)."""

    def __init__(self) -> None:
        super().__init__(io.BytesIO(), encoding="ascii")

    def getvalue(self) -> str:
        self.flush()
        return self.buffer.getvalue().decode("ascii")  # type: ignore[attr-defined]


class AsciiTerminal(Ascii):
    def isatty(self) -> bool:
        return True


def test_a_list_on_a_standard_output_that_is_not_utf8_escapes_what_it_cannot_write(
    cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`suppress list | ...` (or `consent list`) where standard output is ASCII or Latin-1: the
    first reason or address outside it (an emoji, a "ü") was an "internal error (a bug)", exit
    1, after the header alone. A character it cannot write is written as an escape (as control
    characters are), on a terminal's table too; --json was already ASCII JSON there."""
    cli("suppress", "add", "jürgen@bücher.de", "--reason", "Müller 😀")
    cli("consent", "grant", "jürgen@bücher.de", "--source", "form 😀")
    monkeypatch.setenv("COLUMNS", "250")  # (a terminal wide enough that no cell is cut short)
    for stdout in (Ascii, AsciiTerminal):
        cli.stdout = stdout
        r = cli("suppress", "list")
        assert (r.exit_code, r.err) == (0, "1 entries\n"), r.err
        assert "j\\xfcrgen@b\\xfccher.de" in r.out and "M\\xfcller \\U0001f600" in r.out
        r = cli("consent", "list")
        assert (r.exit_code, r.err) == (0, "1 entries\n"), r.err
        assert "j\\xfcrgen@b\\xfccher.de" in r.out and "form \\U0001f600" in r.out
    cli.stdout = Ascii
    r = cli("suppress", "list")
    assert r.out.splitlines()[1].startswith("j\\xfcrgen@b\\xfccher.de\temail\tM\\xfcller")


def test_a_long_consent_list_is_written_as_it_is_read(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`consent list` of 100,000 records had the shape of `suppress list`'s: all of it read,
    then measured, then printed. It is written as it is read, a few addresses at a time, with
    --limit and --json as before."""
    from campaign_cli.store import consents

    monkeypatch.setattr(consents, "LIST_PAGE", 4)
    total = 300
    path = tmp_path / "consents.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["address", "status", "recorded_at", "source"])
        for i in range(total):
            writer.writerow([f"user{i}@example.com", "granted", "2024-01-01T00:00:00Z",
                             f"form\x1b]0;x\x07\t{i}"])
    assert cli("consent", "import", str(path)).exit_code == 0
    with Store.open(cli.store_path) as store:
        entries = list(consents.list_consents(store.conn))
    yielded = counting(monkeypatch, consents, "list_consents")
    seen = written_after(cli, yielded)
    r = cli("consent", "list")
    assert r.exit_code == 0, r.err
    assert r.out.splitlines() == [
        "address\tchannel\tpurpose\tstatus\trecorded_at\tsource\tvia",
        *(f"{e['address']}\temail\tmarketing\tgranted\t2024-01-01T00:00:00.000Z\t"
          f"form\\x1b]0;x\\x07\\t{e['address'][4:-12]}\temail" for e in entries)]
    assert r.err == f"{total} entries\n"
    assert seen[0] < 10 and seen[len(seen) // 2] < total  # streamed
    seen.clear()
    yielded[0] = 0
    r = cli("consent", "list", "--json")
    assert r.out == whole_json(entries)
    assert seen[0] < 10 and seen[len(seen) // 2] < total
    every = cli("consent", "list").out.splitlines()
    r = cli("consent", "list", "--limit", "5")
    assert (r.out.splitlines(), r.err) == (every[:6], "5 entries\n")
    assert cli("consent", "list", "--limit", "5", "--json").out == whole_json(entries[:5])
