"""Batches: local providers (console, outbox) take many messages per call when unthrottled.

The guarantees are the per-message ones: every intent of a batch committed before the batch
leaves, every outcome journaled, a failed message retried or recorded on its own, and a batch
that fails as a whole leaves its rows in doubt (reported) and stops the run.
"""

from __future__ import annotations

import io
import json
import os
import sqlite3
import subprocess
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from campaign_cli.config import load_campaign
from campaign_cli.errors import (
    ExitCode,
    InDoubtError,
    PermanentError,
    ProviderAuthError,
    TransientError,
)
from campaign_cli.models import Channel, OutboundMessage, SmsContent, WebhookContent
from campaign_cli.pipeline import (
    RunReport,
    SendOptions,
    StopController,
    idempotency_key,
    run_campaign,
)
from campaign_cli.providers import console, outbox
from campaign_cli.providers.webhook import WebhookAdapter
from campaign_cli.testing import FakeBatchProvider, FakeClock, FakeProvider, fake_registry
from tests.conftest import CampaignFactory, journal, people, phone, query


def send(campaign: Path, store: Path, provider: FakeProvider, **options: Any) -> RunReport:
    return run_campaign(load_campaign(campaign, {}), store, SendOptions(**options),
                        clock=FakeClock(), registry=fake_registry(provider))


def stopped_at_the_first_batch(
    campaign: Path, store: Path, batch_size: int, **options: Any
) -> tuple[RunReport, FakeBatchProvider]:
    """Run ``campaign`` (run key "s") and ask it to stop as soon as the first batch is sent."""
    stop = StopController()
    provider = FakeBatchProvider(batch_size=batch_size, on_batch=lambda messages: stop.request())
    report = run_campaign(load_campaign(campaign, {}), store, SendOptions(run_key="s", **options),
                          clock=FakeClock(), registry=fake_registry(provider), stop=stop)
    assert report.exit_code == ExitCode.INTERRUPTED
    return report, provider


def test_an_unthrottled_local_provider_gets_batches_and_everyone_once(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    provider = FakeBatchProvider(batch_size=50)
    report = send(make_campaign(people(300), limits={"concurrency": 4}), store_path, provider)
    assert report.exit_code == ExitCode.OK
    assert report.counts == {"sent": 300}
    assert len(provider.batches) < 300 and max(len(b) for b in provider.batches) > 1
    assert max(len(b) for b in provider.batches) <= 50
    sent = [m.recipient_key for batch in provider.batches for m in batch]
    assert sorted(sent) == sorted(f"c{i}" for i in range(1, 301))  # each once
    rows = journal(store_path)
    assert {r["state"] for r in rows} == {"sent"} and all(r["attempts"] == 1 for r in rows)
    attempts = query(
        store_path,
        "SELECT count(*), count(DISTINCT row), min(outcome), max(outcome) FROM attempts")
    assert attempts == [(300, 300, "sent", "sent")]


def test_every_intent_of_a_batch_is_committed_before_the_batch_leaves(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    seen: list[Counter[str]] = []

    def check(messages: Sequence[OutboundMessage]) -> None:
        conn = sqlite3.connect(f"file:{store_path}?mode=ro", uri=True)
        try:
            marks = ",".join("?" * len(messages))
            states = Counter(state for (state,) in conn.execute(
                f"SELECT state FROM messages WHERE row IN ({marks})",
                [m.row for m in messages],
            ))
        finally:
            conn.close()
        seen.append(states)
        assert states == {"sending": len(messages)}  # read by another connection: committed

    provider = FakeBatchProvider(batch_size=40, on_batch=check)
    report = send(make_campaign(people(200)), store_path, provider)
    assert report.counts == {"sent": 200}
    assert sum(sum(c.values()) for c in seen) == 200


def test_a_failed_message_of_a_batch_is_retried_or_recorded_on_its_own(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    def answer(message: OutboundMessage) -> Any:
        return {
            "c5": PermanentError("not a number", code="21211", status=400, action="invalid"),
            "c7": PermanentError("filtered", code="30007", status=400),
            "c9": InDoubtError("timed out after the request was written"),
        }.get(message.recipient_key)

    provider = FakeBatchProvider(batch_size=100, handler=answer)
    provider.enqueue(TransientError("unavailable", status=503))  # the first message of the first batch: c1
    campaign = make_campaign(people(12))
    report = send(campaign, store_path, provider)

    states = {r["rkey"]: (r["state"], r["attempts"], r["reason"]) for r in journal(store_path)}
    assert states["c1"] == ("sent", 2, None)  # retried alone after a backoff, then sent
    assert states["c5"][0] == "invalid" and states["c5"][2] == "21211"
    assert states["c7"][0] == "failed" and states["c7"][2] == "30007"
    assert states["c9"][0] == "in_doubt"  # cannot deduplicate: not resent blindly
    assert Counter(s for s, _, _ in states.values()) == {"sent": 9, "invalid": 1, "failed": 1,
                                                          "in_doubt": 1}
    assert report.exit_code == ExitCode.FAILURES
    outcomes = query(store_path, "SELECT outcome FROM attempts WHERE row = 1 ORDER BY attempt")
    assert outcomes == [("transient",), ("sent",)]
    assert [m.recipient_key for m in provider.history].count("c1") == 2
    assert sum(1 for b in provider.batches for m in b if m.recipient_key == "c1") == 1


def test_an_auth_error_in_a_batch_aborts_with_exit_6_and_leaves_the_rest_pending(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    provider = FakeBatchProvider(batch_size=100)
    provider.enqueue(ProviderAuthError("bad credentials", status=401))
    report = send(make_campaign(people(30), limits={"concurrency": 1}), store_path, provider)
    assert report.exit_code == ExitCode.PROVIDER_AUTH
    states = Counter(r["state"] for r in journal(store_path))
    assert states["pending"] >= 1 and "sending" not in states
    assert sum(states.values()) == 30


def test_no_batch_leaves_after_the_first_401_and_the_waiting_ones_stay_pending(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    """Batches whose intents were committed while the first one was answered 401 are put back:
    the run is aborting, so they never leave."""
    provider = FakeBatchProvider(
        batch_size=16, handler=lambda m: ProviderAuthError("bad credentials", status=401))
    report = send(make_campaign(people(400), limits={"concurrency": 64}), store_path, provider)
    assert report.exit_code == ExitCode.PROVIDER_AUTH
    assert len(provider.batches) == 1
    assert report.counts == {"pending": 400}
    assert max(r["attempts"] for r in journal(store_path)) == 0


def test_a_batch_that_raises_leaves_its_rows_in_doubt_and_stops_the_run(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    provider = FakeBatchProvider(batch_size=10)
    provider.enqueue(*[None] * 25, OSError("disk full"))  # type: ignore[list-item]
    report = send(make_campaign(people(100), limits={"concurrency": 1}), store_path, provider)
    assert report.exit_code == ExitCode.INTERNAL
    assert report.error is not None and "disk full" in report.error
    rows = journal(store_path)
    assert len(rows) == 100
    states = Counter(r["state"] for r in rows)
    # The third batch raised: its 10 rows may or may not have left, so all are in doubt.
    assert states["in_doubt"] == 10 and states["sent"] >= 20
    assert states["sent"] + states["in_doubt"] + states["pending"] == 100
    assert {r["reason"] for r in rows if r["state"] == "in_doubt"} == {"internal_error"}

    # Resumed on a provider that deduplicates: the doubtful batch goes again (same keys), in a
    # batch, and is reported as resent.
    doubtful = {r["rkey"] for r in rows if r["state"] == "in_doubt"}
    again = FakeBatchProvider(batch_size=10, deduplicates=True)
    report = send(make_campaign(people(100), limits={"concurrency": 1}), store_path, again)
    assert report.counts == {"sent": 100}
    assert report.in_doubt_found == report.in_doubt_resent == 10
    resent = [m for batch in again.batches for m in batch if m.recipient_key in doubtful]
    assert len(resent) == 10
    assert sum(r["resent_in_doubt"] for r in journal(store_path)) == 10


def test_paced_or_failover_routes_send_one_message_at_a_time(
    make_campaign: CampaignFactory, store_path: Path, tmp_path: Path
) -> None:
    provider = FakeBatchProvider(batch_size=50)
    paced = make_campaign(people(20), providers={
        "box": {"type": "outbox", "dir": "outbox", "rate": "1000/s", "price_per_segment": "0.01"},
    })
    assert send(paced, store_path, provider).counts == {"sent": 20}
    assert provider.batches == [] and len(provider.history) == 20

    provider = FakeBatchProvider(batch_size=50)
    failover = make_campaign(
        people(20), file_name="failover.yaml", name="failover",
        channels={"sms": {"provider": ["box", "spare"], "body": "Hi {{ first_name }}"}},
        providers={"box": {"type": "outbox", "dir": "outbox", "price_per_segment": "0.01"},
                   "spare": {"type": "console", "price_per_segment": "0.01"}},
    )
    assert send(failover, tmp_path / "other.db", provider).counts == {"sent": 20}
    assert provider.batches == [] and len(provider.history) == 20


def test_console_prints_the_same_lines_in_batches_as_one_by_one(
    make_campaign: CampaignFactory, tmp_path: Path
) -> None:
    def printed(rate: str | None, store: Path) -> list[dict[str, Any]]:
        out = io.StringIO()
        provider: dict[str, Any] = {"type": "console", "price_per_segment": "0.01"}
        if rate:
            provider["rate"] = rate
        campaign = make_campaign(people(30), providers={"box": provider})
        report = run_campaign(load_campaign(campaign, {}), store, SendOptions(run_key="k"),
                              clock=FakeClock(), stdout=out)
        assert report.counts == {"sent": 30}
        return sorted((json.loads(line) for line in out.getvalue().splitlines()),
                      key=lambda d: str(d["recipient_key"]))

    assert printed(None, tmp_path / "a.db") == printed("1000/s", tmp_path / "b.db")


def send_to_outbox(campaign: Path, store_path: Path) -> RunReport:
    """Run (or resume) run key "k" of a campaign on the default outbox provider."""
    return run_campaign(load_campaign(campaign, {}), store_path, SendOptions(run_key="k"),
                        clock=FakeClock())


def outbox_keys(tmp_path: Path) -> list[str]:
    """The recipient key in each message file of run "k", sorted."""
    files = (tmp_path / "outbox" / "test-campaign_k").glob("*.json")
    return sorted(json.loads(f.read_text())["recipient_key"] for f in files)


def test_outbox_batches_write_one_file_per_message_and_a_resend_replaces_it(
    make_campaign: CampaignFactory, store_path: Path, tmp_path: Path
) -> None:
    report = send_to_outbox(make_campaign(people(150)), store_path)
    assert report.counts == {"sent": 150}
    assert outbox_keys(tmp_path) == sorted(f"c{i}" for i in range(1, 151))


def test_outbox_files_are_whole_when_the_system_writes_a_little_at_a_time(
    make_campaign: CampaignFactory, store_path: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`os.write` may write less than it is given (a disk filling up does that). A short write
    must never leave a truncated message file behind a `sent` row."""
    real_write = os.write
    monkeypatch.setattr(outbox.os, "write", lambda fd, data: real_write(fd, bytes(data[:7])))
    report = send_to_outbox(make_campaign(people(20)), store_path)
    assert report.counts == {"sent": 20}
    assert outbox_keys(tmp_path) == sorted(f"c{i}" for i in range(1, 21))


def test_a_failed_outbox_write_leaves_no_partial_file(
    make_campaign: CampaignFactory, store_path: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A write that fails (ENOSPC) stops the run with the batch in doubt; no temporary file is
    left beside the messages, and the resume (the outbox deduplicates) writes them all."""
    real_write = os.write

    def disk_full(fd: int, data: Any) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(outbox.os, "write", disk_full)
    campaign = make_campaign(people(20))
    report = send_to_outbox(campaign, store_path)
    assert report.exit_code == 1 and set(report.counts) <= {"in_doubt", "pending"}
    folder = tmp_path / "outbox" / "test-campaign_k"
    assert list(folder.iterdir()) == []
    monkeypatch.setattr(outbox.os, "write", real_write)
    assert send_to_outbox(campaign, store_path).counts == {"sent": 20}
    assert outbox_keys(tmp_path) == sorted(f"c{i}" for i in range(1, 21))
    assert len(list(folder.iterdir())) == 20


def test_an_outbox_write_never_follows_a_symlink_planted_at_its_temporary_name(
    make_campaign: CampaignFactory, store_path: Path, tmp_path: Path
) -> None:
    """The outbox folder may be shared (``dir: /tmp/outbox``), and another local user can create
    the run's folder before the run does. File names are predictable (the idempotency key is a
    hash of campaign, run key and recipient key; the temporary file added the pid), so that user
    planted symlinks at the temporary names, and each message was written through one: into any
    file the operator may write (a shell profile), with recipient data as its content. The
    temporary file is now created new (``O_EXCL``, which never follows a symlink) under a name
    nobody can guess; a planted link is never written through."""
    campaign = make_campaign(people(5))
    folder = tmp_path / "outbox" / "test-campaign_k"
    folder.mkdir(parents=True)
    victim = tmp_path / "profile"
    victim.write_text("precious\n")
    for i in range(1, 6):
        key = idempotency_key("test-campaign", "k", f"c{i}", "sms")
        (folder / f".{key}.json.{os.getpid()}.tmp").symlink_to(victim)

    assert send_to_outbox(campaign, store_path).counts == {"sent": 5}
    assert victim.read_text() == "precious\n"
    assert outbox_keys(tmp_path) == sorted(f"c{i}" for i in range(1, 6))


def test_a_recipient_value_too_long_for_the_list_unsubscribe_line_fails_that_row_only(
    make_campaign: CampaignFactory, store_path: Path, tmp_path: Path
) -> None:
    """A List-Unsubscribe URL built from a recipient's column (a token from a CRM export: anyone's
    text) passed rendering at any length, and the email builder refused it when the message was
    written ("a URI longer than a line can hold (998)"): a ValueError, no provider's answer, so
    the run stopped with exit 1, the whole batch in doubt, and every resume stopped on it again.
    It is that recipient's message that cannot be written: render_failed, the rest are sent."""
    rows = people(5)
    rows[2][1] = "x" * 3000
    (tmp_path / "t.txt").write_text("Hi")
    campaign = make_campaign(rows, channels={"email": {
        "provider": "box", "from": "Acme <news@example.com>", "subject": "Hi", "text": "t.txt",
        "list_unsubscribe": {"url": "https://example.com/u?t={{ first_name }}",
                             "mailto": "unsubscribe@example.com"}}})
    report = run_campaign(load_campaign(campaign, {}), store_path, SendOptions(run_key="k"),
                          clock=FakeClock())
    assert (report.exit_code, report.counts) == (4, {"render_failed": 1, "sent": 4})
    assert len(list((tmp_path / "outbox" / "test-campaign_k").glob("*.eml"))) == 4


def test_admitting_chunks_concurrently_keeps_the_first_row_of_a_key(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    # Chunks of 3 rows, so many admissions are in flight at once; each key appears twice, the
    # second time in a later chunk. The earlier row must win every time.
    rows = people(30)
    rows += [[key, f"Again{key}", phone, email] for key, _, phone, email in people(30)]
    provider = FakeBatchProvider(batch_size=8)
    report = send(make_campaign(rows), store_path, provider, chunk_size=3)
    assert report.counts == {"sent": 30, "duplicate": 30}
    by_row = {r["row"]: r["state"] for r in journal(store_path)}
    assert all(by_row[i] == "sent" for i in range(1, 31))
    assert all(by_row[i] == "duplicate" for i in range(31, 61))
    assert sorted(m.recipient_key for m in provider.accepted) == sorted(
        f"c{i}" for i in range(1, 31))


def test_a_stop_request_during_batches_leaves_the_rest_pending_and_resume_finishes(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    campaign = make_campaign(people(200), limits={"concurrency": 2})
    report, provider = stopped_at_the_first_batch(campaign, store_path, 20)
    first = [m.recipient_key for batch in provider.batches for m in batch]
    # The batch already on its way finishes; nothing else starts.
    assert 1 <= len(provider.batches) <= 2 and report.counts["sent"] == len(first)
    assert report.counts == {"sent": len(first), "pending": 200 - len(first)}

    again = FakeBatchProvider(batch_size=20)
    report = send(campaign, store_path, again, run_key="s")
    assert report.counts == {"sent": 200}
    second = [m.recipient_key for batch in again.batches for m in batch]
    assert sorted(first + second) == sorted(f"c{i}" for i in range(1, 201))


def test_two_channels_on_local_providers_batch_each_channel_and_send_everyone_once(
    make_campaign: CampaignFactory, store_path: Path, tmp_path: Path
) -> None:
    provider = FakeBatchProvider(batch_size=16)
    (tmp_path / "mail.txt").write_text("Hi {{ first_name }}\n", encoding="utf-8")
    campaign = make_campaign(
        people(60),
        channels={
            "sms": {"provider": "box", "body": "Hi {{ first_name }}"},
            "email": {"provider": "mail", "from": "Shop <shop@example.com>",
                      "subject": "Hello {{ first_name }}", "text": "mail.txt"},
        },
        providers={"box": {"type": "outbox", "dir": "outbox", "price_per_segment": "0.01"},
                   "mail": {"type": "console", "price_per_message": "0.001"}},
    )
    report = send(campaign, store_path, provider)
    assert report.by_channel == {"sms": {"sent": 60}, "email": {"sent": 60}}
    assert all(len({m.channel for m in batch}) == 1 for batch in provider.batches)
    sent = Counter((m.recipient_key, m.channel.value) for m in provider.accepted)
    assert len(sent) == 120 and set(sent.values()) == {1}


def test_a_local_provider_has_at_most_a_few_batches_on_their_way(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    import asyncio

    from campaign_cli.pipeline import BATCHES_IN_FLIGHT

    class Slow(FakeBatchProvider):
        active = 0
        most = 0

        async def send_batch(self, messages: Sequence[OutboundMessage]) -> list[Any]:
            Slow.active += 1
            Slow.most = max(Slow.most, Slow.active)
            for _ in range(5):
                await asyncio.sleep(0)  # let every other worker run meanwhile
            try:
                return await super().send_batch(messages)
            finally:
                Slow.active -= 1

    provider = Slow(batch_size=4)
    report = send(make_campaign(people(300), limits={"concurrency": 32}), store_path, provider)
    assert report.counts == {"sent": 300}
    # 32 workers, but batches (and the messages they hold) are bounded per provider.
    assert BATCHES_IN_FLIGHT < 32 and 1 < Slow.most <= BATCHES_IN_FLIGHT, Slow.most


def test_a_stop_while_small_chunks_are_being_admitted_leaves_a_consistent_journal(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    campaign = make_campaign(people(120), limits={"concurrency": 2})
    stopped_at_the_first_batch(campaign, store_path, 4, chunk_size=2)  # many admissions in flight
    rows = journal(store_path)
    # Whatever was admitted is journaled once, with no gap, and nothing is left `sending`.
    assert [r["row"] for r in rows] == list(range(1, len(rows) + 1))
    assert {r["state"] for r in rows} <= {"sent", "pending"}
    report = send(campaign, store_path, FakeBatchProvider(batch_size=4), run_key="s")
    assert report.counts == {"sent": 120}


@settings(max_examples=500, deadline=None)
@given(address=st.text(), key=st.text(), idempotency=st.text(), body=st.text(min_size=1),
       encoding=st.sampled_from(["GSM-7", "UCS-2"]), segments=st.integers(0, 10**6))
def test_a_console_sms_line_is_what_the_json_encoder_writes(
    address: str, key: str, idempotency: str, body: str, encoding: str, segments: int
) -> None:
    """The SMS fast path of the console provider prints the very text `json.dumps` (with
    ensure_ascii=False; with its default, for a stream that is not UTF-8) prints for the same
    payload: quotes, backslashes, control characters, non-ASCII and lone surrogates included."""
    message = OutboundMessage(1, 1, Channel.SMS, key, address, idempotency,
                              SmsContent(body, encoding, segments), "h")
    assert console._line(message) == json.dumps(
        outbox._payload(message), ensure_ascii=False) + "\n"
    assert console._ascii_line(message) == json.dumps(outbox._payload(message)) + "\n"


@pytest.mark.parametrize("json_template", [True, False])
def test_a_webhook_message_in_the_outbox_and_on_the_console_shows_what_the_webhook_sends(
    json_template: bool,
) -> None:
    """A preview through `outbox` or `console` carries the body the `webhook` provider would
    post: a JSON template's object as `data` (it showed only the text), plain text as `text`."""
    text = '{"order": 12, "items": ["a"]}' if json_template else "New order 12"
    message = OutboundMessage(1, 1, Channel.WEBHOOK, "c1", "https://hooks.example.com/x", "k",
                              WebhookContent(text, json=json_template), "h")
    sent = json.loads(WebhookAdapter("https://hooks.example.com/x", FakeClock()).body(message))
    for shown in (outbox._payload(message), json.loads(console._line(message))):
        assert {k: shown[k] for k in ("data", "text") if k in sent} == {
            k: sent[k] for k in ("data", "text") if k in sent}
        assert shown["text"] == text


@pytest.mark.parametrize("rate", [None, "1000/s"])  # batches, and one message at a time
def test_an_outbox_folder_that_cannot_be_made_stops_the_run_before_anything_is_sent(
    make_campaign: CampaignFactory, store_path: Path, tmp_path: Path, rate: str | None
) -> None:
    """A file where the run's outbox folder should be: nothing can be written, so nothing may be
    counted as sent or in doubt. The run stops with exit 6 (configuration refused), every row
    stays pending and no money is counted; once the way is clear, the resume sends everyone.
    (A file named by `dir` itself is refused when the campaign file loads, exit 2; the run's
    own folder inside it is only known once the run is.)"""
    (tmp_path / "outbox").mkdir()
    blocker = tmp_path / "outbox" / "test-campaign_k"
    blocker.write_text("not a folder")
    box: dict[str, Any] = {"type": "outbox", "dir": "outbox", "price_per_segment": "0.01"}
    if rate:
        box["rate"] = rate
    campaign = make_campaign(people(40), providers={"box": box})
    report = send_to_outbox(campaign, store_path)
    assert report.exit_code == 6
    assert "outbox folder" in (report.error or "") and "cannot be used" in (report.error or "")
    assert set(report.counts) == {"pending"} and report.spend_micros == 0
    blocker.unlink()
    assert send_to_outbox(campaign, store_path).counts == {"sent": 40}
    assert outbox_keys(tmp_path) == sorted(f"c{i}" for i in range(1, 41))


@pytest.mark.parametrize("encoding", ["ascii", "latin-1", "cp1252"])
@pytest.mark.parametrize("rate", [None, "1000/s"])  # batches, and one message at a time
def test_console_lines_reach_a_stream_that_cannot_encode_every_character(
    make_campaign: CampaignFactory, store_path: Path, encoding: str, rate: str | None
) -> None:
    """Standard output on a terminal or pipe that is not UTF-8 (PYTHONIOENCODING=ascii, a
    Latin-1 locale, a Windows console). A name like "Zoë Łukasz 🎉" made the stream raise
    UnicodeEncodeError: the whole batch in doubt, the run aborted with exit 1, and every resume
    aborted again. JSON can say any character in ASCII (\\u escapes): every line is printed and
    reads back as the same text."""
    rows = [[f"c{i}", "Zoë Łukasz 🎉" if i % 3 == 0 else f"Name{i}", phone(i), ""]
            for i in range(1, 31)]
    provider: dict[str, Any] = {"type": "console", "price_per_segment": "0.01"}
    if rate:
        provider["rate"] = rate
    campaign = make_campaign(rows, providers={"box": provider},
                             channels={"sms": {"provider": "box", "body": "Hi {{ first_name }}"}})
    raw = io.BytesIO()
    out = io.TextIOWrapper(raw, encoding=encoding, newline="\n")
    report = run_campaign(load_campaign(campaign, {}), store_path, SendOptions(run_key="k"),
                          clock=FakeClock(), stdout=out)
    assert report.exit_code == ExitCode.OK, report.error
    assert report.counts == {"sent": 30}
    out.flush()
    lines = raw.getvalue().decode(encoding).splitlines()
    bodies = {json.loads(line)["recipient_key"]: json.loads(line)["body"] for line in lines}
    assert len(lines) == 30 and len(bodies) == 30
    assert bodies["c3"] == "Hi Zoë Łukasz 🎉" and bodies["c4"] == "Hi Name4"


def test_temporary_files_of_a_writer_that_died_are_removed_on_resume(
    make_campaign: CampaignFactory, store_path: Path, tmp_path: Path
) -> None:
    """A `campaign send` killed (SIGKILL, a power cut) while the outbox writes a batch leaves
    ``.<key>.json.<pid>.tmp`` files: about one kill in two did, measured. Each holds a message,
    personal data, and nothing ever removed them: the resume wrote the messages again under new
    names. The resume now removes the temporary files of writers that are gone; one of a live
    process (another run's folder of the same name) is left alone."""
    campaign = make_campaign(people(20))
    report = run_campaign(load_campaign(campaign, {}), store_path,
                          SendOptions(run_key="k", limit=10), clock=FakeClock())
    assert report.counts == {"sent": 10}  # the rest: as if the process had died
    folder = tmp_path / "outbox" / "test-campaign_k"
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(gone.stdout)
    stale = [folder / f".{n:032x}.json.{dead_pid}.tmp" for n in range(3)]
    for path in stale:
        path.write_bytes(b'{"to": "+12012000001", "body": "Hi Na')  # cut off mid-write
    live = folder / f".{9:032x}.json.{os.getppid()}.tmp"
    live.write_bytes(b"{}")

    assert send_to_outbox(campaign, store_path).counts == {"sent": 20}  # the resume
    assert not any(path.exists() for path in stale)
    assert live.exists()
    assert outbox_keys(tmp_path) == sorted(f"c{i}" for i in range(1, 21))
