"""A dry run (`send --dry-run`, `validate`, `preview`) works on a private copy of what it reads
from the store, never the real store: the copy holds the settings, the opt-out and consent lists,
the runs and the run's own journal, not every other run's, and lives in a folder of its own that
a killed dry run's successor removes."""

from __future__ import annotations

import fcntl
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from campaign_cli.addresses import address_hash
from campaign_cli.config import load_campaign
from campaign_cli.pipeline import DRY_RUN_FOLDER, RunReport, SendOptions, run_campaign
from campaign_cli.store import snapshot
from campaign_cli.testing import FakeClock, FakeProvider, fake_registry
from tests.conftest import CampaignFactory, people, phone, query, write_csv

ROOT = Path(__file__).resolve().parent.parent


def send(campaign: Path, store: Path, provider: FakeProvider | None = None,
         **options: Any) -> RunReport:
    registry = fake_registry(provider) if provider is not None else None
    return run_campaign(load_campaign(campaign, {}), store, SendOptions(**options),
                        clock=FakeClock(), registry=registry)


def rows(path: Path, sql: str) -> list[tuple[Any, ...]]:
    return query(path, sql)


def test_the_copy_holds_what_a_dry_run_reads_and_no_other_run_s_journal(
    make_campaign: CampaignFactory, store_path: Path, tmp_path: Path
) -> None:
    """The dry run copied the whole store (every run's journal and attempts) to the temporary
    folder, every time: on a store after a year of campaigns, gigabytes per `validate`."""
    campaign = make_campaign(people(6))
    send(campaign, store_path, FakeProvider(), run_key="other")  # another run: 6 rows
    send(campaign, store_path, FakeProvider(), run_key="mine", limit=2)  # this one, begun
    conn = sqlite3.connect(store_path)
    with conn:
        conn.execute("INSERT INTO suppressions (address_hash, address, channel, reason, source, "
                     "created_at) VALUES (?, ?, 'sms', 'stop', 'cli', 'now')",
                     (address_hash(phone(5)), phone(5)))
        conn.execute("INSERT INTO consents (address_hash, address, channel, purpose, status, "
                     "source, recorded_at, created_at) VALUES (?, ?, 'sms', 'marketing', "
                     "'granted', 'cli', 'now', 'now')", (address_hash(phone(4)), phone(4)))
    conn.close()
    private = tmp_path / "copy.db"

    report = send(campaign, store_path, run_key="mine", dry_run=True, dry_run_store=private)

    assert report.resumed and report.counts == {"sent": 5, "suppressed": 1}
    mine, other = (rows(store_path, f"SELECT id FROM runs WHERE run_key = '{k}'")[0][0]
                   for k in ("mine", "other"))
    assert rows(private, "SELECT DISTINCT run_id FROM messages") == [(mine,)]
    assert rows(private, "SELECT DISTINCT run_id FROM attempts") == [(mine,)]
    # the earlier session's rows as they are in the real journal, rowids and all
    assert (rows(private, "SELECT rowid, * FROM messages WHERE row <= 2 ORDER BY rowid")
            == rows(store_path, f"SELECT rowid, * FROM messages WHERE run_id = {mine} "
                                "ORDER BY rowid"))
    for table in ("settings", "suppressions", "consents", "sqlite_sequence"):
        assert rows(private, f"SELECT * FROM {table}") == rows(store_path,
                                                               f"SELECT * FROM {table}")
    assert (rows(private, "SELECT id, run_key FROM runs ORDER BY id")
            == rows(store_path, "SELECT id, run_key FROM runs ORDER BY id"))
    assert rows(private, "PRAGMA user_version") == rows(store_path, "PRAGMA user_version")
    schema = "SELECT type, name, sql FROM sqlite_master ORDER BY name"
    assert rows(private, schema) == rows(store_path, schema)
    assert os.stat(private).st_mode & 0o777 == 0o600
    # and the real store is as it was: the other run whole, this one still 2 rows
    assert rows(store_path, f"SELECT count(*) FROM messages WHERE run_id = {other}") == [(6,)]
    assert rows(store_path, f"SELECT count(*) FROM messages WHERE run_id = {mine}") == [(2,)]


def test_a_new_run_s_copy_holds_no_journal_at_all(
    make_campaign: CampaignFactory, store_path: Path, tmp_path: Path
) -> None:
    campaign = make_campaign(people(4))
    send(campaign, store_path, FakeProvider(), run_key="old")
    private = tmp_path / "copy.db"
    report = send(campaign, store_path, run_key="new", dry_run=True, dry_run_store=private)
    assert not report.resumed and report.counts == {"sent": 4}
    assert rows(private, "SELECT count(*) FROM messages WHERE run_id = "
                         "(SELECT id FROM runs WHERE run_key = 'old')") == [(0,)]


class _ReadOnlyFolder(sqlite3.Connection):
    """What SQLite does with a store on a read-only mount (seen on a `mount -o remount,ro,bind`):
    attaching it read-only fails, as it cannot make the -shm beside it, unless it is immutable."""

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if sql.startswith("ATTACH") and "immutable=1" not in str(args[0][0]):
            raise sqlite3.OperationalError("unable to open database file")
        return super().execute(sql, *args)


def test_a_store_in_a_folder_nobody_may_write_is_dry_run_all_the_same(
    make_campaign: CampaignFactory, store_path: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store on a read-only mount, closed cleanly, is read as it is (`db.connect`); the copy
    reads it the same way, not through an index file (-shm) it cannot make there."""
    campaign = make_campaign(people(4))
    send(campaign, store_path, FakeProvider(), run_key="k", limit=2)
    assert not Path(f"{store_path}-shm").exists()
    private = tmp_path / "copy.db"
    real = sqlite3.connect

    def connect(database: Any, *args: Any, **kwargs: Any) -> Any:
        if str(database) == private.resolve().as_uri():
            kwargs["factory"] = _ReadOnlyFolder
        return real(database, *args, **kwargs)

    monkeypatch.setattr(sqlite3, "connect", connect)
    report = send(campaign, store_path, run_key="k", dry_run=True, dry_run_store=private)
    assert report.resumed and report.counts == {"sent": 4} and report.sent_this_session == 2


def test_the_dry_run_s_folder_is_gone_after_it(
    make_campaign: CampaignFactory, store_path: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(temp))
    campaign = make_campaign(people(3))
    send(campaign, store_path, FakeProvider())
    assert send(campaign, store_path, dry_run=True).counts == {"sent": 3}
    assert list(temp.iterdir()) == []


def _leftover(temp: Path, name: str, age_s: float) -> Path:
    folder = temp / name
    folder.mkdir(mode=0o700)
    (folder / ".lock").write_text("")
    (folder / "dry-run.db").write_text("addresses")
    old = time.time() - age_s
    os.utime(folder, (old, old))
    return folder


def test_a_folder_left_by_a_dead_dry_run_is_removed_and_a_living_one_s_is_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(temp))
    dead = _leftover(temp, DRY_RUN_FOLDER + "dead", 3600)
    alive = _leftover(temp, DRY_RUN_FOLDER + "alive", 3600)
    young = _leftover(temp, DRY_RUN_FOLDER + "young", 1)  # its maker may not have locked it yet
    other = _leftover(temp, "somebody-else-dead", 3600)
    unlocked = temp / (DRY_RUN_FOLDER + "nolock")  # not one of ours (no lock file): left
    unlocked.mkdir()
    os.utime(unlocked, (0, 0))
    holder = os.open(alive / ".lock", os.O_RDWR)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)  # (flock: another open file conflicts, as a process)
        assert snapshot.sweep(DRY_RUN_FOLDER) == [dead]
    finally:
        os.close(holder)
    assert sorted(p.name for p in temp.iterdir()) == sorted(
        p.name for p in (alive, young, other, unlocked))


def test_a_killed_dry_run_s_copy_is_removed_by_the_next_dry_run(
    make_campaign: CampaignFactory, store_path: Path, tmp_path: Path
) -> None:
    """SIGKILL left the dry run's copy of the store (every address and opt-out in it) in the
    temporary folder for good. The next dry run of the same user removes it."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    campaign = make_campaign(people(3))
    send(campaign, store_path, FakeProvider())
    big = write_csv(tmp_path / "big.csv", people(300_000))
    env = {**os.environ, "TMPDIR": str(temp), "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "campaign_cli", "--store", str(store_path), "--quiet", "send",
         str(campaign), "--recipients", str(big), "--dry-run"],
        env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        copy: list[Path] = []
        while not copy or not _rows_in(copy[0] / "dry-run.db"):
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "the dry run never journaled a row"
            copy = list(temp.glob(DRY_RUN_FOLDER + "*"))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
    [left] = copy
    assert left.exists()
    os.utime(left, (time.time() - 3600,) * 2)  # a while ago

    done = subprocess.run(
        [sys.executable, "-m", "campaign_cli", "--store", str(store_path), "--quiet", "send",
         str(campaign), "--dry-run"],
        env=env, cwd=tmp_path, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert list(temp.iterdir()) == []


def _rows_in(db: Path) -> bool:
    if not db.exists():
        return False
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            return bool(conn.execute("SELECT count(*) FROM messages").fetchone()[0])
        finally:
            conn.close()
    except sqlite3.Error:
        return False  # not made yet, or mid-copy
