"""What survives a power cut, not only a killed process.

SQLite in WAL mode with ``synchronous = NORMAL`` survives the death of the process but may lose
the last commits when the machine itself stops (power cut, kernel crash, a VM reset). A `sending`
intent lost that way after its message left would have the resume send the message again, and a
lost opt-out would let the next campaign reach someone who said STOP. So the store syncs every
commit (``FULL``), except the journal of a run whose messages never leave this machine (console,
outbox, dry run), whose output is lost in the same power cut as its journal rows.

A power cut cannot be staged in a test; what is tested is the setting each connection runs with.
"""

from __future__ import annotations

import asyncio
import io
import sqlite3
from pathlib import Path
from typing import Any

import pytest

import campaign_cli.pipeline as pipeline
from campaign_cli.config import load_campaign
from campaign_cli.pipeline import SendOptions, run_campaign
from campaign_cli.providers.base import ProviderRegistry, default_registry
from campaign_cli.store.db import Store
from campaign_cli.store.journal import JournalWriter
from campaign_cli.testing import FakeClock, FakeProvider
from tests.conftest import CampaignFactory

FULL, NORMAL = 2, 1


def synchronous(conn: sqlite3.Connection) -> int:
    value: int = conn.execute("PRAGMA synchronous").fetchone()[0]
    return value


def test_the_store_s_own_connections_sync_every_commit(tmp_path: Path) -> None:
    """`suppress add`, `consent grant` and the run's session records go through these."""
    with Store.open(tmp_path / "s.db") as store:
        assert synchronous(store.conn) == FULL


def test_the_journal_writer_syncs_unless_told_its_run_stays_on_this_machine(
    tmp_path: Path,
) -> None:
    path = tmp_path / "s.db"
    Store.open(path).close()

    async def setting(**kwargs: Any) -> int:
        writer = JournalWriter(path, **kwargs).start()
        try:
            value: int = await writer.call(synchronous)
            return value
        finally:
            writer.close()

    assert asyncio.run(setting()) == FULL
    assert asyncio.run(setting(durable=True)) == FULL
    assert asyncio.run(setting(durable=False)) == NORMAL


@pytest.fixture
def writers(monkeypatch: pytest.MonkeyPatch) -> list[JournalWriter]:
    """The journal writers the runs of a test started."""
    started: list[JournalWriter] = []

    class Recording(JournalWriter):
        def start(self) -> JournalWriter:
            started.append(self)
            return super().start()

    monkeypatch.setattr(pipeline, "JournalWriter", Recording)
    return started


def run(campaign: Path, store: Path, registry: ProviderRegistry | None = None,
        **options: Any) -> None:
    report = run_campaign(load_campaign(campaign, {}), store, SendOptions(**options),
                          clock=FakeClock(), registry=registry or default_registry(),
                          stdout=io.StringIO())
    assert report.exit_code == 0, report


PROVIDERS = {
    "box": {"type": "outbox", "dir": "outbox", "price_per_segment": "0.01"},
    "screen": {"type": "console", "price_per_segment": "0.01"},
    "sms": {"type": "twilio", "account_sid": "AC" + "0" * 32, "auth_token": "t",
            "from": "+14155550100", "price_per_segment": "0.01"},
}


@pytest.mark.parametrize("providers", [["sms"], ["box", "sms"]], ids=["alone", "among-local"])
def test_a_run_through_a_provider_that_leaves_this_machine_syncs_each_journal_commit(
    make_campaign: CampaignFactory, store_path: Path, writers: list[JournalWriter],
    providers: list[str],
) -> None:
    """A provider that does not say it is local is taken to deliver beyond this machine (every
    fake stands for a real one), also as the failover of a local one."""
    remote = FakeProvider("sms")
    registry = default_registry()
    registry.register("twilio", lambda name, config, context: remote)
    campaign = make_campaign(channels={"sms": {"provider": providers, "body": "Hi"}},
                             providers=PROVIDERS)
    run(campaign, store_path, registry)
    assert [w.durable for w in writers] == [True]


@pytest.mark.parametrize("provider", ["box", "screen"])
def test_a_run_whose_messages_stay_on_this_machine_does_not_sync_each_commit(
    make_campaign: CampaignFactory, store_path: Path, writers: list[JournalWriter],
    provider: str,
) -> None:
    campaign = make_campaign(channels={"sms": {"provider": provider, "body": "Hi"}},
                             providers=PROVIDERS)
    run(campaign, store_path)
    assert [w.durable for w in writers] == [False]


def test_a_dry_run_does_not_sync_each_commit(
    make_campaign: CampaignFactory, store_path: Path, writers: list[JournalWriter]
) -> None:
    campaign = make_campaign(channels={"sms": {"provider": "sms", "body": "Hi"}},
                             providers=PROVIDERS)
    run(campaign, store_path, dry_run=True)
    assert [w.durable for w in writers] == [False]
