"""The pipeline, in process: fake provider, fake clock, real SQLite store."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import gc
import logging
import os
import re
import socket
import sqlite3
import stat
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml

from campaign_cli.addresses import address_hash
from campaign_cli.config import load_campaign
from campaign_cli.errors import (
    ExitCode,
    InDoubtError,
    InputError,
    PermanentError,
    ProviderAuthError,
    RateLimitedError,
    RunLockedError,
    StoppedBeforeStart,
    StoreError,
    TransientError,
    UsageError,
)
from campaign_cli.models import Channel, OutboundMessage, SendResult
from campaign_cli.pipeline import RunReport, SendOptions, StopController, run_campaign
from campaign_cli.providers.base import ProviderRegistry
from campaign_cli.store import runs
from campaign_cli.testing import FakeClock, FakeProvider, fake_registry
from tests.conftest import CampaignFactory, journal, people, phone, query, write_csv

MARKETING_SMS = {"sms": {"provider": "box", "body": "Hi {{ first_name }}. Reply STOP to opt out"}}


def send(
    campaign: Path,
    store: Path,
    provider: FakeProvider | None = None,
    *,
    env: dict[str, str] | None = None,
    clock: FakeClock | None = None,
    stop: StopController | None = None,
    **options: Any,
) -> RunReport:
    loaded = load_campaign(campaign, env or {})
    registry = fake_registry(provider) if provider is not None else None
    return run_campaign(loaded, store, SendOptions(**options), clock=clock or FakeClock(),
                        registry=registry, stop=stop)


def states(store: Path) -> dict[int, str]:
    return {r["row"]: r["state"] for r in journal(store)}


def test_every_row_ends_in_exactly_one_state(make_campaign: CampaignFactory, store_path: Path) -> None:
    rows = people(20)
    rows.insert(5, ["c3", "Dup", "+12012000099", "dup@example.com"])  # key already used
    rows.append(["", "NoKey", "+12012000098", "x@example.com"])
    rows.append(["c99", "BadPhone", "12", "y@example.com"])
    provider = FakeProvider()
    report = send(make_campaign(rows), store_path, provider)

    assert report.exit_code == ExitCode.OK
    assert report.total_rows == 23
    assert sum(report.counts.values()) == 23
    assert report.counts == {"duplicate": 1, "invalid": 2, "sent": 20}
    reasons = {r["row"]: r["reason"] for r in journal(store_path) if r["state"] == "invalid"}
    assert reasons == {22: "missing_key", 23: "bad_phone"}
    assert sorted(m.recipient_key for m in provider.accepted) == sorted(f"c{i}" for i in range(1, 21))
    assert len({m.idempotency_key for m in provider.accepted}) == 20


def test_rerun_with_the_same_key_sends_nothing_twice(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    campaign = make_campaign(people(15))
    first = FakeProvider()
    send(campaign, store_path, first)
    second = FakeProvider()
    report = send(campaign, store_path, second)
    assert report.resumed
    assert second.history == []
    assert report.counts == {"sent": 15}
    assert report.exit_code == ExitCode.OK


def test_a_changed_recipient_file_cannot_resume_the_same_run(
    make_campaign: CampaignFactory, store_path: Path, tmp_path: Path
) -> None:
    campaign = make_campaign(people(5))
    send(campaign, store_path, FakeProvider(), run_key="fixed")
    make_campaign(people(6))
    with pytest.raises(UsageError, match="different recipient file"):
        send(campaign, store_path, FakeProvider(), run_key="fixed")


def test_a_changed_purpose_cannot_resume_the_same_run(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    """Marketing needs consent and skips in-doubt rows; transactional does neither. Resuming a
    marketing run as transactional would have sent to people without consent."""
    marketing = make_campaign(people(3), purpose="marketing", channels=MARKETING_SMS,
                              compliance={"consent": "not_required"})
    send(marketing, store_path, FakeProvider(), run_key="k", limit=1)
    transactional = make_campaign(people(3), purpose="transactional", channels=MARKETING_SMS)
    with pytest.raises(UsageError, match="was started as marketing; the campaign now says "
                                         "transactional"):
        send(transactional, store_path, FakeProvider(), run_key="k")


def test_a_changed_currency_cannot_resume_the_same_run(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    """The run spent 0.02 USD; the file then said EUR and a resume went on: `send --json` said
    0.04 EUR (half of it dollars) while `status --json` said 0.04 USD, and the cap of the first
    session was kept as if it were euros. Spend and cap are in one currency: refused, exit 2."""
    campaign = make_campaign(people(4), limits={"currency": "USD", "max_spend": "0.02"})
    first = send(campaign, store_path, FakeProvider(), run_key="k")
    assert (first.exit_code, first.spend_micros, first.currency) == (
        ExitCode.SPEND_CAP, 20_000, "USD")
    euros = make_campaign(people(4), limits={"currency": "EUR", "max_spend": "0.02"})
    provider = FakeProvider()
    with pytest.raises(UsageError, match="was started in USD; the campaign now says EUR"):
        send(euros, store_path, provider, run_key="k", max_spend=Decimal("1"))
    assert provider.history == []
    assert query(store_path, "SELECT currency, sessions FROM runs") == [("USD", 1)]


def test_a_changed_recipient_key_column_cannot_resume_the_same_run(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    """The journal claims each recipient key once per run: rows read with another key column
    were taken for duplicates of unrelated earlier rows (member 3 of row 4 is not customer 3 of
    row 3) and never sent, exit 0."""
    header = ("id", "member", "first_name", "phone", "email")
    rows = [[f"{i}", f"{7 - i}", f"N{i}", phone(i), f"p{i}@example.com"] for i in range(1, 7)]
    campaign = make_campaign(rows, header=header)
    send(campaign, store_path, FakeProvider(), run_key="k", limit=3)
    data = yaml.safe_load(campaign.read_text())
    data["recipients"]["key"] = "member"
    campaign.write_text(yaml.safe_dump(data))
    provider = FakeProvider()
    with pytest.raises(UsageError, match="was started with recipients.key 'id'; the campaign "
                                         "now has 'member'"):
        send(campaign, store_path, provider, run_key="k")
    assert provider.history == []
    assert query(store_path, "SELECT count(*), max(row) FROM messages") == [(3, 3)]


@pytest.mark.parametrize(("key", "value", "named"), [
    ("phone", "phone2", "columns {'email': 'email', 'phone': 'phone'} -> "
                        "{'email': 'email', 'phone': 'phone2'}"),
    ("default_region", "GB", "default_region 'US' -> 'GB'"),
])
def test_a_resume_that_reads_addresses_another_way_is_refused(
    make_campaign: CampaignFactory, store_path: Path, key: str, value: str, named: str
) -> None:
    """The rows not sent yet were admitted with the addresses read the first way (journaled,
    deduplicated, checked against opt-outs); a resume reading another column or region would
    send them to other numbers than those."""
    header = ("id", "first_name", "phone", "phone2", "email")
    rows = [[f"c{i}", f"N{i}", phone(i), phone(100 + i), f"p{i}@example.com"]
            for i in range(1, 5)]
    campaign = make_campaign(rows, header=header)
    send(campaign, store_path, FakeProvider(), run_key="k", limit=2)
    original = campaign.read_text()
    data = yaml.safe_load(original)
    where = data["recipients"]["columns"] if key == "phone" else data["recipients"]
    where[key] = value
    campaign.write_text(yaml.safe_dump(data))
    provider = FakeProvider()
    with pytest.raises(UsageError, match=re.escape(f"read its recipient file another way "
                                                   f"({named})")):
        send(campaign, store_path, provider, run_key="k")
    assert provider.history == []
    campaign.write_text(original)
    assert send(campaign, store_path, FakeProvider(), run_key="k").counts == {"sent": 4}


def test_a_run_resumed_from_another_campaign_file_says_so(
    make_campaign: CampaignFactory, store_path: Path, tmp_path: Path
) -> None:
    """Same campaign name and run key, another file: it resumes (the name is the campaign's
    identity), but the operator is told, as for changed templates."""
    first = make_campaign(people(4), file_name="one.yaml")
    send(first, store_path, FakeProvider(), run_key="k", limit=2)
    second = make_campaign(people(4), file_name="two.yaml")
    report = send(second, store_path, FakeProvider(), run_key="k")
    assert report.counts == {"sent": 4}
    assert any(f"was started from {first}; this session runs {second}" in w
               for w in report.warnings), report.warnings


def test_a_changed_strategy_cannot_resume_the_same_run(
    make_campaign: CampaignFactory, store_path: Path, tmp_path: Path
) -> None:
    """`all` journals every channel of a row, `first_available` one: a run stopped at the cap
    under `all` and resumed as `first_available` left rows 4-5's email `pending` for ever in a
    run that said `done`, exit 0 (and the other way, only the rows after the stop got a second
    channel)."""
    (tmp_path / "t.txt").write_text("Hi {{ first_name }}", encoding="utf-8")
    channels = {"sms": {"provider": "box", "body": "Hi {{ first_name }}"},
                "email": {"provider": "box", "from": "a@b.example", "subject": "s",
                          "text": "t.txt"}}
    campaign = make_campaign(people(5), channels=channels,
                             limits={"concurrency": 1, "max_spend": "0.03"})
    assert send(campaign, store_path, FakeProvider(), run_key="k").exit_code == ExitCode.SPEND_CAP
    make_campaign(people(5), channels=channels, limits={"concurrency": 1},
                  extra={"strategy": "first_available"})
    provider = FakeProvider()
    with pytest.raises(UsageError, match="was started with strategy all; the campaign now has "
                                         "first_available"):
        send(campaign, store_path, provider, run_key="k", max_spend=Decimal("10"))
    assert provider.history == []


def test_a_resume_with_changed_templates_says_so(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    first = make_campaign(people(4),
                          channels={"sms": {"provider": "box", "body": "Hi {{ first_name }}"}})
    send(first, store_path, FakeProvider(), run_key="k", limit=2)
    same = send(first, store_path, FakeProvider(), run_key="k", limit=3)
    assert not any("templates changed" in w for w in same.warnings)
    edited = make_campaign(people(4), channels={"sms": {"provider": "box",
                                                        "body": "Hello {{ first_name }}"}})
    report = send(edited, store_path, FakeProvider(), run_key="k")
    assert any("templates changed since it started (channels.sms.body)" in w
               for w in report.warnings)


def test_resume_continues_pending_and_reports_in_doubt(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    """A session that died mid-send leaves `sending` rows: on resume they are in doubt. A provider
    that cannot deduplicate gets no blind resend of a marketing message (policy skip)."""
    campaign = make_campaign(people(10), purpose="marketing", channels=MARKETING_SMS,
                             compliance={"consent": "not_required"})
    send(campaign, store_path, FakeProvider(), limit=4, run_key="k")
    # Simulate a crash: row 3 was in flight, rows 5..10 never reached.
    conn = sqlite3.connect(store_path)
    conn.execute("UPDATE messages SET state = 'sending' WHERE row = 3")
    conn.commit()
    conn.close()

    provider = FakeProvider(deduplicates=False)
    report = send(campaign, store_path, provider, run_key="k")
    assert report.in_doubt_found == 1
    assert report.counts == {"in_doubt": 1, "sent": 9}
    assert sorted(m.row for m in provider.accepted) == [5, 6, 7, 8, 9, 10]
    # Still in doubt next time, and said so again: nothing resent, nothing forgotten.
    again = send(campaign, store_path, FakeProvider(deduplicates=False), run_key="k")
    assert (again.in_doubt_found, again.in_doubt_resent) == (1, 0)
    assert again.counts == {"in_doubt": 1, "sent": 9}


def test_in_doubt_rows_are_resent_with_the_same_key_where_the_provider_deduplicates(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    campaign = make_campaign(people(4), purpose="marketing", channels=MARKETING_SMS,
                             compliance={"consent": "not_required"})
    first = FakeProvider()
    send(campaign, store_path, first, run_key="k")
    key_of_row_2 = next(m.idempotency_key for m in first.accepted if m.row == 2)
    conn = sqlite3.connect(store_path)
    conn.execute("UPDATE messages SET state = 'sending' WHERE row = 2")
    conn.commit()
    conn.close()

    provider = FakeProvider(deduplicates=True)
    report = send(campaign, store_path, provider, run_key="k")
    assert [m.row for m in provider.accepted] == [2]
    assert provider.accepted[0].idempotency_key == key_of_row_2
    assert report.in_doubt_found == 1 and report.in_doubt_resent == 1
    assert report.counts == {"sent": 4}
    assert query(store_path, "SELECT resent_in_doubt FROM messages WHERE row = 2") == [(1,)]


def test_transient_errors_retry_with_backoff_on_the_injected_clock(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    provider = FakeProvider()
    provider.enqueue(TransientError("503", status=503), RateLimitedError("slow", retry_after=7))
    clock = FakeClock()
    report = send(make_campaign(people(1)), store_path, provider, clock=clock)
    assert report.counts == {"sent": 1}
    assert len(provider.history) == 3
    assert clock.sleeps[-1] >= 7  # Retry-After honoured
    assert query(store_path, "SELECT attempts FROM messages") == [(3,)]


def test_retries_run_out_into_a_dead_letter_and_exit_4(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    provider = FakeProvider(handler=lambda m: TransientError("down", code="503", status=503)
                            if m.row == 2 else None)
    report = send(make_campaign(people(3)), store_path, provider)
    assert report.exit_code == ExitCode.FAILURES
    assert report.counts == {"failed": 1, "sent": 2}
    row = next(r for r in journal(store_path) if r["row"] == 2)
    assert (row["reason"], row["error_code"], row["attempts"]) == ("retries_exhausted", "503", 4)


def test_permanent_errors_and_their_actions(make_campaign: CampaignFactory, store_path: Path) -> None:
    def handler(m: OutboundMessage) -> SendResult | BaseException | None:
        return {
            1: PermanentError("unreachable", code="30003", status=400),
            2: PermanentError("not a mobile", code="21614", status=400, action="invalid"),
            3: PermanentError("recipient sent STOP", code="21610", status=400, action="suppress"),
        }.get(m.row)

    report = send(make_campaign(people(4)), store_path, FakeProvider(handler=handler))
    by_row = {r["row"]: (r["state"], r["error_code"]) for r in journal(store_path)}
    assert by_row == {1: ("failed", "30003"), 2: ("invalid", "21614"), 3: ("failed", "21610"),
                      4: ("sent", None)}
    assert query(store_path, "SELECT address, channel, source FROM suppressions") == [
        ("+12012000003", "sms", "provider")
    ]
    assert report.exit_code == ExitCode.FAILURES


def test_an_ambiguous_outcome_is_in_doubt_and_never_retried_blindly(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    provider = FakeProvider(deduplicates=False)
    provider.enqueue(InDoubtError("read timeout after the request was written"))
    report = send(make_campaign(people(1)), store_path, provider)
    assert len(provider.history) == 1
    assert report.counts == {"in_doubt": 1}
    assert report.spend_micros == 10_000  # it may have been charged


def test_auth_failure_aborts_the_run_with_exit_6_after_few_requests(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    provider = FakeProvider(handler=lambda m: ProviderAuthError("401 bad key", status=401))
    report = send(make_campaign(people(200), limits={"concurrency": 4}), store_path, provider)
    assert report.exit_code == ExitCode.PROVIDER_AUTH
    assert len(provider.history) <= 8
    assert report.counts.get("sent", 0) == 0
    assert report.counts.get("failed", 0) == 0
    # Nothing lost: the rows it touched went back to pending and the rest wait to be admitted.
    assert set(report.counts) <= {"pending"}


def test_a_resumed_session_reports_its_own_error_not_the_last_session_s(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    """While a resume runs, `status` says what this session says (`send --json`'s `error` and
    `stopped`): the previous session's abort is not its error."""
    campaign = make_campaign(people(3), limits={"concurrency": 1})
    refused = FakeProvider(handler=lambda m: ProviderAuthError("401 bad key", status=401))
    assert send(campaign, store_path, refused).exit_code == ExitCode.PROVIDER_AUTH
    assert query(store_path, "SELECT stopped FROM runs") == [("provider_auth",)]
    seen: list[tuple[object, ...]] = []

    def look(message: OutboundMessage) -> None:
        seen.extend(query(store_path, "SELECT status, stopped, last_error FROM runs"))

    report = send(campaign, store_path, FakeProvider(handler=look))
    assert report.exit_code == ExitCode.OK
    assert set(seen) == {("running", None, None)}


def test_spend_cap_is_never_exceeded_and_resume_with_a_larger_cap_finishes(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    # 0.01 per segment, one segment per message: a cap of 0.055 allows five messages.
    campaign = make_campaign(people(12), limits={"concurrency": 3, "max_spend": "0.055"})
    provider = FakeProvider()
    report = send(campaign, store_path, provider, run_key="cap")
    assert report.exit_code == ExitCode.SPEND_CAP
    assert report.spend_micros == 50_000 <= 55_000
    assert len(provider.accepted) == 5
    assert report.counts == {"pending": 7, "sent": 5}  # every row journaled, the rest pending

    more = FakeProvider()
    report = send(campaign, store_path, more, run_key="cap", max_spend=Decimal("1"))
    assert report.exit_code == ExitCode.OK
    assert report.counts == {"sent": 12}
    assert len(more.accepted) == 7
    assert not {m.row for m in more.accepted} & {m.row for m in provider.accepted}


def test_the_spend_records_the_segments_the_provider_bills_when_they_differ(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    """Twilio bills the segments it counts. When its count differs from ours (an encoding it
    chose, a character counted otherwise), the spend reported, the journal's cost and the cap's
    accounting follow the provider's count, and the run says so once."""
    campaign = make_campaign(people(3), channels={"sms": {"provider": "box", "body": "Hi"}})

    def billed(message: OutboundMessage) -> SendResult:
        segments = 3 if message.row == 2 else 1  # rows 1 and 3 as we counted them
        return SendResult(provider_message_id=f"SM{message.row}", segments=segments)

    report = send(campaign, store_path, FakeProvider(handler=billed), run_key="k")
    assert report.counts == {"sent": 3}
    assert report.spend_micros == (1 + 3 + 1) * 10_000
    costs = {r["row"]: r["cost_micros"] for r in journal(store_path)}
    assert costs == {1: 10_000, 2: 30_000, 3: 10_000}
    [warning] = report.warnings
    assert warning.startswith("box counted 3 SMS segment(s) for row 2 where this run counted 1")
    with contextlib.closing(sqlite3.connect(store_path)) as conn:
        assert runs.committed_spend(conn, report.run_id) == 50_000


def test_a_signal_after_the_cap_was_reached_still_reports_the_cap(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    """The cap stopped intake; a Ctrl-C while the last messages finish used to turn exit 3
    into 130, so the resume command lacked --max-spend and the resume stopped at once, at the
    same cap. The cap is why the run stopped: it stays exit 3 with its hint."""
    campaign = make_campaign(people(6), limits={"concurrency": 1, "max_spend": "0.03"})
    stop = StopController()

    def interrupt(message: OutboundMessage) -> SendResult:
        stop.request()  # by now the source has met the cap: rows 1-3 fit, row 4 does not
        return SendResult(provider_message_id=f"m{message.row}")

    report = send(campaign, store_path, FakeProvider(handler=interrupt), run_key="k", stop=stop)
    assert (report.exit_code, report.stopped) == (ExitCode.SPEND_CAP, "spend_cap")
    assert report.spend_micros <= 30_000 and report.counts["pending"] >= 3


def test_a_resume_that_gives_no_cap_keeps_the_one_the_run_was_given(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    """`send --max-spend 0.055`, stopped at the cap, then resumed by a command that left the
    option out (the campaign file has no cap): the run used to go on uncapped."""
    campaign = make_campaign(people(12))
    first = send(campaign, store_path, FakeProvider(), run_key="k", max_spend=Decimal("0.055"))
    assert (first.exit_code, first.spend_micros) == (ExitCode.SPEND_CAP, 50_000)

    provider = FakeProvider()
    again = send(campaign, store_path, provider, run_key="k")
    assert again.exit_code == ExitCode.SPEND_CAP
    assert provider.accepted == [] and again.max_spend_micros == 55_000
    assert any("keeps its spend cap of 0.055 USD" in w for w in again.warnings)

    raised = send(campaign, store_path, FakeProvider(), run_key="k", max_spend=Decimal("1"))
    assert raised.exit_code == ExitCode.OK and raised.counts == {"sent": 12}


class _SenderRefused(FakeProvider):
    refusals_mean_config = True  # as Twilio, SendGrid, FCM: its endpoint answers for every one


def test_the_same_refusal_ten_times_in_a_row_stops_the_run_before_the_list_burns(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    """Twilio 21606 (the From number cannot send) refuses every message alike: the run used to
    turn the whole list into dead letters, one request each. Ten in a row, none accepted, stop
    it with exit 6; those ten go back to pending with the rest, and a resume sends them all."""
    campaign = make_campaign(people(50), limits={"concurrency": 1})
    refusing = _SenderRefused(handler=lambda m: PermanentError(
        "The From phone number is not a valid, SMS-capable number", code="21606", status=400))
    report = send(campaign, store_path, refusing, run_key="k")
    assert report.exit_code == ExitCode.PROVIDER_AUTH
    assert len(refusing.history) == 10
    assert report.counts == {"pending": 50}
    assert "refused 10 messages in a row with the same error" in (report.error or "")
    fixed = FakeProvider()
    assert send(campaign, store_path, fixed, run_key="k").counts == {"sent": 50}
    assert len(fixed.accepted) == 50


def test_a_resume_that_lowers_the_run_s_cap_to_the_file_s_says_so(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    """The first session was given --max-spend 20; the file says 0.05. A resume without the
    option keeps the smaller (the file's): it never lifts a cap, but it lowered the run's
    silently, and an operator expecting 20 found the run stopped at 0.05 with no word why."""
    campaign = make_campaign(people(12), limits={"max_spend": "0.05"})
    first = send(campaign, store_path, FakeProvider(), run_key="k", max_spend=Decimal("20"),
                 limit=2)
    assert first.exit_code == ExitCode.OK
    again = send(campaign, store_path, FakeProvider(), run_key="k")
    assert again.exit_code == ExitCode.SPEND_CAP and again.max_spend_micros == 50_000
    assert any("its spend cap of 20 USD from an earlier session is lowered to the campaign "
               "file's 0.05 (give --max-spend 20 to keep it)" in w for w in again.warnings), \
        again.warnings


def test_refusals_of_recipients_or_interrupted_by_a_success_do_not_stop_the_run(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    def handler(m: OutboundMessage) -> BaseException | None:
        if m.row % 10 == 0:
            return None  # an accepted message between the refusals
        if m.row % 2:
            return PermanentError("not a mobile", code="21614", status=400, action="invalid")
        return PermanentError("unreachable", code="30003", status=400)

    report = send(make_campaign(people(60), limits={"concurrency": 1}), store_path,
                  _SenderRefused(handler=handler))
    assert report.exit_code == ExitCode.FAILURES
    assert report.counts == {"failed": 24, "invalid": 30, "sent": 6}


def test_a_resume_without_max_spend_never_lifts_the_run_s_cap_to_the_file_s(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    """The file says 5; the first session was given --max-spend 0.055 and stopped there. A
    resume without the option (a cron job re-fired) used the file's 5 and sent the whole list."""
    campaign = make_campaign(people(12), limits={"max_spend": "5"})
    first = send(campaign, store_path, FakeProvider(), run_key="k", max_spend=Decimal("0.055"))
    assert first.exit_code == ExitCode.SPEND_CAP
    provider = FakeProvider()
    again = send(campaign, store_path, provider, run_key="k")
    assert again.exit_code == ExitCode.SPEND_CAP and provider.accepted == []
    assert again.max_spend_micros == 55_000
    assert any("keeps its spend cap of 0.055 USD" in w for w in again.warnings)
    raised = send(campaign, store_path, FakeProvider(), run_key="k", max_spend=Decimal("1"))
    assert raised.counts == {"sent": 12}


def test_suppressed_and_unconsented_recipients_are_refused(
    make_campaign: CampaignFactory, store_path: Path, tmp_path: Path
) -> None:
    (tmp_path / "optout.csv").write_text("address,channel\n(201) 200-0002,sms\n")
    (tmp_path / "consent.csv").write_text(
        "address,channel,purpose,status,recorded_at\n"
        + "".join(f"+1201200000{i},sms,marketing,granted,2025-01-01T00:00:00Z\n"
                  for i in (1, 2, 3))
        + "+12012000003,sms,marketing,revoked,2025-02-01T00:00:00Z\n"
    )
    campaign = make_campaign(
        people(4), purpose="marketing",
        channels={"sms": {"provider": "box", "body": "Hi {{ first_name }}. Reply STOP to opt out"}},
        compliance={"consent": "required", "suppression_lists": ["optout.csv"],
                    "consent_records": ["consent.csv"]},
    )
    provider = FakeProvider()
    report = send(campaign, store_path, provider)
    assert states(store_path) == {1: "sent", 2: "suppressed", 3: "no_consent", 4: "no_consent"}
    assert [m.row for m in provider.accepted] == [1]
    assert report.exit_code == ExitCode.OK


@pytest.mark.parametrize(
    ("optout", "consent", "expected"),
    [
        ("address,channel\nnot-a-number,sms\n+12012000002,bogus\n", None,
         r"optout.csv:2: address: not a phone number: 'not-a-number' \(\(1\) The string "
         r"supplied did not seem to be a phone number.\) \(and 1 more such lines\): "
         r"a campaign's "
         r"opt-out and consent lists are read whole; fix or remove the line"),
        ("address,channel\n+12012000002,bogus\n", None,
         r"optout.csv:2: channel: unknown channel 'bogus' \('\+12012000002'\)"),
        (None, "address,channel,status,recorded_at\n+12012000001,sms,maybe,2024-01-01\n",
         r"consent.csv:2: status: expected granted or revoked, not 'maybe'"),
        (None, "address,channel,status,recorded_at\n+12012000001,sms,revoked,2099-01-01\n",
         r"consent.csv:2: recorded_at: 2099-01-01T00:00:00.000Z is in the future"),
    ],
)
def test_a_line_of_the_campaign_lists_that_cannot_be_read_stops_the_run(
    make_campaign: CampaignFactory, store_path: Path, tmp_path: Path,
    optout: str | None, consent: str | None, expected: str,
) -> None:
    """A line of the campaign's own opt-out or consent list that cannot be read may be an
    opt-out or a revocation (`+12012000002,bogus`: the channel meant "sms"): it was a warning,
    and the run went on sending to that person. Now it is bad input naming file, line and the
    field at fault; nothing is sent."""
    lists: dict[str, list[str]] = {"suppression_lists": [], "consent_records": []}
    if optout is not None:
        (tmp_path / "optout.csv").write_text(optout)
        lists["suppression_lists"].append("optout.csv")
    if consent is not None:
        (tmp_path / "consent.csv").write_text(consent)
        lists["consent_records"].append("consent.csv")
    campaign = make_campaign(
        people(2), purpose="marketing",
        channels={"sms": {"provider": "box", "body": "Hi {{ first_name }}. Reply STOP to opt out"}},
        compliance={"consent": "not_required", **lists},
    )
    provider = FakeProvider()
    with pytest.raises(InputError, match=expected):
        send(campaign, store_path, provider)
    assert provider.history == []


def test_render_failure_ends_the_row_not_the_run(make_campaign: CampaignFactory, store_path: Path) -> None:
    campaign = make_campaign(
        people(3), channels={"sms": {"provider": "box",
                                     "body": "{{ 10 // (first_name | length - 5) }}"}},
    )  # Name1..Name3 have length 5: division by zero
    report = send(campaign, store_path, FakeProvider())
    assert report.counts == {"render_failed": 3}
    assert "division" in journal(store_path)[0]["detail"]
    # Nobody was sent to: exit 4, not "done, nothing failed" (0), which a cron job would trust.
    assert report.exit_code == ExitCode.FAILURES


def test_dry_run_sends_nothing_and_leaves_the_store_untouched(
    make_campaign: CampaignFactory, store_path: Path, tmp_path: Path
) -> None:
    (tmp_path / "optout.csv").write_text("address,channel\n+12012000002,sms\n")
    campaign = make_campaign(people(5), compliance={"consent": "not_required",
                                                    "suppression_lists": ["optout.csv"]})
    provider = FakeProvider()
    report = send(campaign, store_path, provider, dry_run=True)
    assert report.dry_run
    assert provider.history == []
    assert report.counts == {"sent": 4, "suppressed": 1}
    assert report.spend_micros == 40_000
    assert not (tmp_path / "outbox").exists()
    if store_path.exists():
        assert query(store_path, "SELECT count(*) FROM runs") == [(0,)]
        assert query(store_path, "SELECT count(*) FROM suppressions") == [(0,)]


@pytest.mark.parametrize("folder", ["a#b", "c?d", "e%41f"])
def test_a_dry_run_reads_the_store_whatever_characters_its_path_holds(
    make_campaign: CampaignFactory, tmp_path: Path, folder: str
) -> None:
    """The dry run copies the store through a read-only SQLite URI: a '#', '?' or '%' in the path
    must not make it open (and create) another file, or a store that is not there."""
    store = tmp_path / folder / "store.db"
    store.parent.mkdir()
    campaign = make_campaign(people(3))
    send(campaign, store, FakeProvider(), run_key="k")
    before = sorted(p.name for p in tmp_path.iterdir())

    provider = FakeProvider()
    report = send(campaign, store, provider, run_key="k", dry_run=True)
    assert provider.history == []
    assert report.resumed  # it saw the real run: nothing left to send
    assert report.counts == {"sent": 3} and report.sent_this_session == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_limit_takes_only_the_first_rows(make_campaign: CampaignFactory, store_path: Path) -> None:
    report = send(make_campaign(people(10)), store_path, FakeProvider(), limit=3)
    assert report.counts == {"sent": 3}
    assert report.total_rows == 3


def test_a_resume_with_a_smaller_limit_still_counts_the_rows_journaled(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    """A run sent to 3 rows and resumed with --limit 2 said "2 rows" (send --json and status)
    beside 3 rows counted: the counts no longer added up to the rows."""
    campaign = make_campaign(people(10))
    send(campaign, store_path, FakeProvider(), run_key="k", limit=3)
    provider = FakeProvider()
    report = send(campaign, store_path, provider, run_key="k", limit=2)
    assert provider.history == []
    assert report.counts == {"sent": 3}
    assert report.total_rows == sum(report.counts.values()) == 3
    assert query(store_path, "SELECT total_rows FROM runs") == [(3,)]


@pytest.mark.parametrize(("provider_type", "policy", "resent"), [
    ("twilio", "skip", False),   # cannot deduplicate, and the campaign says skip: stays
    ("twilio", "resend", True),  # the campaign accepts a possible duplicate
    ("outbox", "skip", True),    # the provider drops a second copy: always resent
])
def test_a_dry_run_of_a_resume_resends_in_doubt_rows_only_as_the_real_resume_would(
    make_campaign: CampaignFactory, store_path: Path, provider_type: str, policy: str,
    resent: bool,
) -> None:
    """The dry run sent every in-doubt row again whatever the policy and the provider: it told
    an operator checking a resume that a twilio campaign with `in_doubt: skip` would resend
    them (and charged them to the estimate) when the real resume leaves them in doubt."""
    providers = {"p": {"type": provider_type, "price_per_segment": "0.01",
                       **({"dir": "outbox"} if provider_type == "outbox" else
                          {"account_sid": "AC" + "0" * 32, "auth_token": "t",
                           "from": "+14155550100"})}}
    campaign = make_campaign(people(4), channels={"sms": {"provider": "p", "body": "Hi"}},
                             providers=providers,
                             compliance={"consent": "not_required", "in_doubt": policy})
    def real_send(provider: FakeProvider, **options: Any) -> RunReport:
        return run_campaign(load_campaign(campaign, {}), store_path,
                            SendOptions(run_key="k", **options), clock=FakeClock(),
                            registry=fake_registry(provider, provider_type))

    real_send(FakeProvider(), limit=2)
    conn = sqlite3.connect(store_path)
    conn.execute("UPDATE messages SET state = 'sending' WHERE row = 2")  # killed mid-send
    conn.commit()
    conn.close()

    dry = send(campaign, store_path, run_key="k", dry_run=True)
    assert dry.in_doubt_found == 1
    if resent:
        assert (dry.counts, dry.in_doubt_resent) == ({"sent": 4}, 1)
        # the in-doubt message may have been charged once already: a resend counts twice
        assert dry.spend_micros == 5 * 10_000
    else:
        assert (dry.counts, dry.in_doubt_resent) == ({"in_doubt": 1, "sent": 3}, 0)
        assert dry.spend_micros == 4 * 10_000
    real = real_send(FakeProvider(deduplicates=provider_type == "outbox"))
    assert (real.counts, real.in_doubt_resent, real.spend_micros) == (
        dry.counts, dry.in_doubt_resent, dry.spend_micros)


def test_a_second_process_on_the_same_run_is_refused_naming_the_holder_in_one_line(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    campaign = make_campaign(people(2))
    lock = runs.RunLock.acquire(store_path, "test-campaign", "held", "now")
    try:
        with pytest.raises(RunLockedError) as refused:
            send(campaign, store_path, FakeProvider(), run_key="held")
    finally:
        lock.release()
    assert "\n" not in str(refused.value)  # the lock file's second line is not shown
    assert f"pid {os.getpid()} on {socket.gethostname()} since now" in str(refused.value)


def _lock_file(store_path: Path, campaign: str, run_key: str) -> Path:
    lock = runs.RunLock.acquire(store_path, campaign, run_key, "now")
    lock.release()
    [path] = Path(f"{store_path.resolve()}.locks").glob("*.lock")
    return path


def test_taking_a_run_s_lock_never_writes_through_a_symlink_planted_at_its_name(
    store_path: Path, tmp_path: Path
) -> None:
    """The lock file's name is predictable (a hash of campaign and run key) and beside the
    store, which may be in a folder other users can write (a team folder, ``--store /tmp/...``).
    Opened with O_CREAT and then truncated and written, a symlink planted at that name had the
    run overwrite the file it pointed to (a shell profile) with "pid N on host since ...". The
    lock file is opened O_NOFOLLOW: a planted link is refused, its target left alone."""
    path = _lock_file(store_path, "c", "k")
    victim = tmp_path / "profile"
    victim.write_text("precious\n")
    path.unlink()
    path.symlink_to(victim)
    with pytest.raises(StoreError, match="cannot take the run's lock"):
        runs.RunLock.acquire(store_path, "c", "k", "now")
    assert victim.read_text() == "precious\n"


def test_a_run_s_holder_is_this_process_while_it_holds_the_lock(store_path: Path) -> None:
    lock = runs.RunLock.acquire(store_path, "c", "k", "now")
    try:
        assert runs.RunLock.holder(store_path, "c", "k") == (
            f"pid {os.getpid()} on {socket.gethostname()} since now")
    finally:
        lock.release()
    assert runs.RunLock.holder(store_path, "c", "k") is None


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux's /proc")
def test_a_pid_reused_after_the_holder_was_killed_is_not_taken_for_the_holder(
    store_path: Path,
) -> None:
    """A run killed by SIGKILL (or by the machine going down) leaves its pid in the lock file;
    after a reboot that pid soon names another live process. `status` must not call the run
    held by it: the operator would wait for a process that is not there."""
    path = _lock_file(store_path, "c", "k")
    me = f"pid {os.getpid()} on {socket.gethostname()} since then"
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    # This process is alive under the recorded pid, but it is not the process that wrote it:
    # another boot, or the same boot and another start time.
    path.write_text(f"{me}\nprocess 00000000-0000-0000-0000-000000000000:1")
    assert runs.RunLock.holder(store_path, "c", "k") is None
    path.write_text(f"{me}\nprocess {boot}:1")
    assert runs.RunLock.holder(store_path, "c", "k") is None
    # The process that wrote it: held.
    path.write_text(f"{me}\nprocess {runs._process_instance(os.getpid())}")
    assert runs.RunLock.holder(store_path, "c", "k") == me
    # A lock file written before the start time was recorded: the pid alone decides.
    path.write_text(me)
    assert runs.RunLock.holder(store_path, "c", "k") == me


@pytest.mark.skipif(not Path("/proc/locks").exists(), reason="needs Linux's /proc")
def test_a_run_held_by_a_process_in_another_pid_namespace_is_not_called_stopped(
    store_path: Path,
) -> None:
    """A run sent from another pid namespace on this host (`unshare -p`, a container sharing the
    host name and the store) records its pid as that namespace sees it: here it names another
    process, or none. `status` called that live run "running (stopped: no process)" with no
    holder, while a second `send` was refused with exit 5. The kernel's list of held locks
    tells: the run's lock is held."""
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    lock = runs.RunLock.acquire(store_path, "c", "k", "now")
    try:
        [path] = Path(f"{store_path.resolve()}.locks").glob("*.lock")
        # What a holder that is pid 1 of its own namespace writes: here pid 1 is another
        # process (another start time).
        other = f"pid 1 on {socket.gethostname()} since then"
        path.write_text(f"{other}\nprocess {boot}:999999999")
        assert runs.RunLock.holder(store_path, "c", "k") == other
    finally:
        lock.release()
    assert runs.RunLock.holder(store_path, "c", "k") is None


def test_a_stop_before_the_run_starts_sends_and_records_nothing(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    """Ctrl-C while a large recipient file is checked used to wait for the whole scan (seconds
    per million rows; a second Ctrl-C did not help), then start the HTTP process and record an
    empty `interrupted` session. It now ends there: exit 130, nothing sent, no session."""
    campaign = make_campaign(people(3))
    stop = StopController()
    stop.request()
    provider = FakeProvider()
    with pytest.raises(StoppedBeforeStart, match="nothing was sent or recorded"):
        send(campaign, store_path, provider, stop=stop)
    assert provider.history == []
    assert not store_path.exists() or query(store_path, "SELECT count(*) FROM runs") == [(0,)]


def test_a_stop_while_providers_start_closes_them_and_records_nothing(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    campaign = make_campaign(people(3))
    stop = StopController()
    provider = FakeProvider()
    registry = ProviderRegistry()

    def factory(name: str, config: Any, context: Any) -> FakeProvider:
        stop.request()  # the signal arrives while the providers (the HTTP process) start
        return provider

    registry.register("outbox", factory)
    with pytest.raises(StoppedBeforeStart):
        run_campaign(load_campaign(campaign, {}), store_path, SendOptions(), clock=FakeClock(),
                     registry=registry, stop=stop)
    assert provider.history == [] and provider.closed
    assert query(store_path, "SELECT count(*) FROM runs") == [(0,)]


def test_the_scan_of_a_large_file_stops_when_asked(tmp_path: Path) -> None:
    from campaign_cli.recipients import SCAN_STOP_EVERY, RecipientSpec, scan_recipients

    rows = people(3 * SCAN_STOP_EVERY)
    path = write_csv(tmp_path / "big.csv", rows)
    spec = RecipientSpec(path=path, key="id", columns={Channel.SMS: "phone"})
    asked: list[int] = []

    def stopped() -> bool:
        asked.append(1)
        return len(asked) == 2

    with pytest.raises(StoppedBeforeStart, match="stopped while the file was being checked"):
        scan_recipients(spec, stopped)
    assert len(asked) == 2  # asked every SCAN_STOP_EVERY records, stopped at the second
    assert scan_recipients(spec, lambda: False).rows == len(rows)


def test_a_stop_request_leaves_unsent_rows_pending(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    stop = StopController()

    def handler(m: OutboundMessage) -> None:
        if m.row == 3:
            stop.request()

    provider = FakeProvider(handler=handler)
    campaign = make_campaign(people(50), limits={"concurrency": 1})
    report = send(campaign, store_path, provider, stop=stop, run_key="s")
    assert report.exit_code == ExitCode.INTERRUPTED
    sent = report.counts["sent"]
    assert sent == len(provider.accepted) >= 3
    assert report.counts.get("pending", 0) + sent == 50 or sum(report.counts.values()) <= 50
    again = FakeProvider()
    report = send(campaign, store_path, again, run_key="s")
    assert report.counts == {"sent": 50}
    assert len(again.accepted) + len(provider.accepted) == 50


def test_secrets_never_reach_the_journal_or_the_report(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    secret = "s3cr3t-token-value"
    campaign = make_campaign(people(2), extra={"vars": {"token": "${API_TOKEN}"}})
    provider = FakeProvider(handler=lambda m: PermanentError(f"bad token {secret}", code="401x"))
    report = send(campaign, store_path, provider, env={"API_TOKEN": secret})
    assert report.counts == {"failed": 2}
    assert secret not in str(report.to_json())
    for path in store_path.parent.glob("store.db*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes()


def test_a_stop_during_a_retry_backoff_leaves_the_row_pending_not_failed(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    stop = StopController()

    def handler(m: OutboundMessage) -> BaseException:
        stop.request()
        return TransientError("503", status=503)

    report = send(make_campaign(people(1)), store_path, FakeProvider(handler=handler), stop=stop)
    assert report.exit_code == ExitCode.INTERRUPTED
    assert report.counts == {"pending": 1}


def test_a_run_on_local_providers_never_imports_the_network_stacks(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    import subprocess
    import sys

    campaign = make_campaign(people(3))
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from campaign_cli.config import load_campaign\n"
        "from campaign_cli.pipeline import run_campaign\n"
        f"r = run_campaign(load_campaign({str(campaign)!r}), Path({str(store_path)!r}))\n"
        "assert r.counts == {'sent': 3}, r.counts\n"
        "heavy = {'aiohttp', 'aiosmtplib', 'jwt', 'cryptography', 'httpx'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_each_message_carries_the_documented_idempotency_key(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    from campaign_cli.pipeline import idempotency_key

    provider = FakeProvider()
    report = send(make_campaign(people(5)), store_path, provider, run_key="rk")
    assert report.counts == {"sent": 5}
    for message in provider.accepted:
        assert message.idempotency_key == idempotency_key(
            "test-campaign", "rk", message.recipient_key, message.channel.value)


def test_an_in_doubt_message_resent_keeps_the_spend_it_may_have_cost(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    """A resend of an in-doubt message may be a second charge: both count against the cap, in the
    summary and in every later session, or a resume spends past the cap."""
    campaign = make_campaign(people(3), limits={"concurrency": 1, "max_spend": "0.02"})
    first = FakeProvider(deduplicates=False)
    first.enqueue(InDoubtError("read timeout after the request was written"))
    report = send(campaign, store_path, first, run_key="k")
    assert report.counts == {"in_doubt": 1, "sent": 1, "pending": 1}
    assert report.spend_micros == 20_000

    # Transactional: the in-doubt row is resent. Up to 0.03 may now have been charged.
    second = FakeProvider(deduplicates=False)
    report = send(campaign, store_path, second, run_key="k", max_spend=Decimal("0.03"))
    assert [m.row for m in second.accepted] == [1]
    assert report.exit_code == ExitCode.SPEND_CAP
    assert report.spend_micros == 30_000

    # The same cap again: nothing more may go.
    third = FakeProvider(deduplicates=False)
    report = send(campaign, store_path, third, run_key="k", max_spend=Decimal("0.03"))
    assert third.history == []
    assert report.exit_code == ExitCode.SPEND_CAP
    assert report.spend_micros == 30_000


def test_an_in_doubt_message_refused_on_resume_keeps_the_spend_it_may_have_cost(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    campaign = make_campaign(people(2), limits={"concurrency": 1})
    first = FakeProvider(deduplicates=False)
    first.enqueue(InDoubtError("read timeout after the request was written"))
    assert send(campaign, store_path, first, run_key="k").spend_micros == 20_000
    address = query(store_path, "SELECT address FROM messages WHERE row = 1")[0][0]
    conn = sqlite3.connect(store_path)
    conn.execute(
        "INSERT INTO suppressions (address_hash, address, channel, reason, source, created_at) "
        "VALUES (?, ?, 'all', 'manual', 'cli', '2026-01-01T00:00:00.000Z')",
        (address_hash(address), address),
    )
    conn.commit()
    conn.close()
    report = send(campaign, store_path, FakeProvider(deduplicates=False), run_key="k")
    assert states(store_path) == {1: "suppressed", 2: "sent"}
    assert report.spend_micros == 20_000  # the first attempt may have been charged


def test_a_chunk_missing_from_the_journal_is_not_skipped_by_the_resume(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    """A chunk's admission failed (the disk full for a moment) while the chunks after it, already
    on their way to the writer, went in: the run stopped with rows 11-15 missing from the journal
    and 16-60 pending. The resume must read from the first row the journal lacks, not from the
    first open row after it (which skipped rows 11-15 for good and called the run done)."""
    rows = [[f"c{i}", f"Name{i}", "12", f"person{i}@example.com"] for i in range(1, 11)]
    campaign = make_campaign(rows + people(50, start=11))
    first = send(campaign, store_path, FakeProvider(), run_key="k", limit=10)
    assert first.counts == {"invalid": 10}
    conn = sqlite3.connect(store_path)
    runs.admit(conn, first.run_id, [
        runs.Admit(row, row + 1, "sms", f"c{row}", f"+1201200{row:04d}", "pending")
        for row in range(16, 61)
    ], True, "2026-01-01T00:00:00Z")
    conn.commit()
    conn.close()

    provider = FakeProvider()
    report = send(campaign, store_path, provider, run_key="k")
    assert report.counts == {"invalid": 10, "sent": 50}
    assert sorted(m.row for m in provider.accepted) == list(range(11, 61))


def refusing_writes(store: Path, *triggers: str) -> None:
    """A store whose ``triggers`` refuse some journal writes, as a full disk would."""
    from campaign_cli.store.db import Store

    Store.open(store).close()
    conn = sqlite3.connect(store)
    for trigger in triggers:
        conn.execute(trigger)
    conn.commit()
    conn.close()


def test_a_journal_that_fails_mid_run_stops_the_run_with_exit_1_and_a_consistent_store(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    """The journal writer's transaction fails mid-run (here a trigger refuses row 5's `sent`, as a
    full disk would refuse any write): the run stops with exit 1 (not 2, "nothing sent": four
    messages went out), the run is finished in the store rather than left `running`, nothing is
    counted sent that the journal does not hold, and the run resumes once the store is fixed."""
    campaign = make_campaign(people(30))
    refusing_writes(store_path,
                    "CREATE TRIGGER disk_full BEFORE UPDATE OF state ON messages WHEN NEW.state "
                    "= 'sent' AND NEW.row = 5 BEGIN SELECT RAISE(ABORT, 'disk is full'); END")

    first = FakeProvider()
    report = send(campaign, store_path, first, run_key="k")
    assert report.exit_code == ExitCode.INTERNAL
    assert report.status == "aborted"
    assert report.error is not None and "writing the journal failed: disk is full" in report.error
    assert query(store_path, "SELECT status, exit_code FROM runs") == [("aborted", 1)]
    journaled = states(store_path)
    assert len(journaled) == 30 and "sending" not in journaled.values()
    # Sent only where the journal says so; the rest of what left is in doubt, never pending.
    sent_rows = {row for row, state in journaled.items() if state == "sent"}
    assert report.counts.get("sent", 0) == len(sent_rows)
    for message in first.accepted:
        assert journaled[message.row] in ("sent", "in_doubt")

    conn = sqlite3.connect(store_path)
    conn.execute("DROP TRIGGER disk_full")
    conn.commit()
    conn.close()
    report = send(campaign, store_path, FakeProvider(), run_key="k")
    assert report.exit_code == ExitCode.OK
    assert report.counts == {"sent": 30}


def test_a_journal_that_fails_with_chunks_in_admission_prints_no_traceback(
    make_campaign: CampaignFactory, store_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The disk fills up: row 5's `sent` and every admission past row 20 fail. The run stops on
    the first failure with chunks still being admitted, and their tasks fail too, unawaited:
    asyncio printed each ("Task exception was never retrieved" and a traceback) on standard
    error when it was collected, after the one clear error line."""
    campaign = make_campaign(people(200))
    refusing_writes(
        store_path,
        "CREATE TRIGGER disk_full_admit BEFORE INSERT ON messages WHEN NEW.row > 20 "
        "BEGIN SELECT RAISE(ABORT, 'disk is full'); END",
        "CREATE TRIGGER disk_full_sent BEFORE UPDATE OF state ON messages WHEN NEW.state = "
        "'sent' AND NEW.row = 5 BEGIN SELECT RAISE(ABORT, 'disk is full'); END",
    )
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        report = send(campaign, store_path, FakeProvider(), run_key="k", chunk_size=5,
                      reader="inline")
        gc.collect()
    assert report.exit_code == ExitCode.INTERNAL
    assert report.error is not None and "writing the journal failed" in report.error
    assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == []


def test_a_read_only_store_stops_the_send_before_anything_is_sent_with_exit_2(
    make_campaign: CampaignFactory, store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite opens a store it may not write read-only, silently; recording the run then
    failed with a raw OperationalError (an "internal error, a bug", exit 1)."""
    from tests.test_cli_suppress import read_only_opens

    campaign = make_campaign(people(3))
    send(campaign, store_path, FakeProvider(), run_key="first")
    read_only_opens(monkeypatch)
    provider = FakeProvider()
    with pytest.raises(StoreError, match="the store is read-only here") as caught:
        send(campaign, store_path, provider, run_key="second")
    assert caught.value.exit_code == ExitCode.USAGE
    assert provider.history == []


def test_a_run_lock_that_cannot_be_written_stops_the_send_with_one_line_exit_2(
    make_campaign: CampaignFactory, store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store's disk is full: writing the holder into the run's lock file failed with a raw
    OSError (ENOSPC), an "internal error, a bug" (exit 1), before anything was sent."""
    campaign = make_campaign(people(3))
    send(campaign, store_path, FakeProvider(), run_key="first")

    def full(fd: int, data: bytes, offset: int) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(runs.os, "pwrite", full)
    provider = FakeProvider()
    with pytest.raises(StoreError, match="cannot take the run's lock: No space left on device"):
        send(campaign, store_path, provider, run_key="second")
    assert provider.history == []
    monkeypatch.undo()
    assert send(campaign, store_path, provider, run_key="second").counts == {"sent": 3}


def test_an_in_doubt_message_is_not_resent_through_a_provider_that_replaced_its_own(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    """Row 2 was in flight at provider `old` when the run died; the operator then moved the
    channel to provider `new`, which deduplicates by idempotency key. `new` has never seen that
    key, so its deduplication cannot stop a second copy: the marketing campaign's `skip` policy
    decides, and the row stays in doubt."""
    old = {"old": {"type": "outbox", "dir": "outbox"}}
    campaign = make_campaign(people(4), purpose="marketing", providers=old,
                             channels={"sms": {**MARKETING_SMS["sms"], "provider": "old"}})
    send(campaign, store_path, FakeProvider(deduplicates=False), run_key="k")
    conn = sqlite3.connect(store_path)
    conn.execute("UPDATE messages SET state = 'sending' WHERE row = 2")
    conn.commit()
    conn.close()
    new = {"new": {"type": "outbox", "dir": "outbox"}}
    campaign = make_campaign(people(4), purpose="marketing", providers=new,
                             channels={"sms": {**MARKETING_SMS["sms"], "provider": "new"}})

    provider = FakeProvider(deduplicates=True)
    report = send(campaign, store_path, provider, run_key="k")
    assert provider.history == []
    assert (report.in_doubt_found, report.in_doubt_resent) == (1, 0)
    assert report.counts == {"in_doubt": 1, "sent": 3}


def test_the_run_lock_holds_whatever_path_names_the_store(
    make_campaign: CampaignFactory, store_path: Path, tmp_path: Path
) -> None:
    """Two cron jobs naming the same store by different paths (one through a symlink) drive the
    same run: the second must be refused, not race the first."""
    campaign = make_campaign(people(2))
    send(campaign, store_path, FakeProvider(), run_key="held")  # the store exists
    link = tmp_path / "link.db"
    link.symlink_to(store_path)
    lock = runs.RunLock.acquire(store_path, "test-campaign", "held", "now")
    try:
        with pytest.raises(RunLockedError, match=r"pid \d+"):
            send(campaign, link, FakeProvider(), run_key="held")
    finally:
        lock.release()


def test_a_provider_that_cannot_be_built_records_no_session(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    """A provider whose configuration fails only when it is built (an FCM service-account file
    that is not JSON): exit 2 and one line, like every configuration error, and like them with
    nothing started: no run left `running` for `campaign status`, no session recorded that
    `send --json` (not_started) does not report, and no writer thread left."""
    import threading

    from campaign_cli.errors import ConfigError
    from campaign_cli.providers.base import ProviderRegistry

    def factory(name: str, config: Any, context: Any) -> Any:
        raise ConfigError("key.json", None, None, "service account file: not JSON")

    registry = ProviderRegistry()
    registry.register("outbox", factory)
    def writers() -> int:
        return sum(t.name == "journal-writer" for t in threading.enumerate())

    campaign = make_campaign(people(3))
    loaded = load_campaign(campaign, {})
    before = writers()
    with pytest.raises(ConfigError, match="not JSON"):
        run_campaign(loaded, store_path, SendOptions(run_key="k"), clock=FakeClock(),
                     registry=registry)
    assert query(store_path, "SELECT count(*) FROM runs") == [(0,)]
    assert writers() == before

    # A run that had a session keeps it as it was: this attempt was not one.
    send(campaign, store_path, FakeProvider(), run_key="k", limit=1)
    was = query(store_path, "SELECT status, exit_code, sessions, stopped FROM runs")
    with pytest.raises(ConfigError, match="not JSON"):
        run_campaign(loaded, store_path, SendOptions(run_key="k"), clock=FakeClock(),
                     registry=registry)
    assert query(store_path, "SELECT status, exit_code, sessions, stopped FROM runs") == was
    assert writers() == before


def test_an_in_doubt_message_is_not_resent_under_a_key_from_another_key_column(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    """Row 2 was in flight when the run died; the operator then changed `recipients.key` (id to
    email). The idempotency key is made from the recipient key, so a resend would carry a key the
    provider never saw and its deduplication could not stop a second copy: the marketing
    campaign's `skip` policy decides, and the row stays in doubt. (A run that recorded its key
    column refuses such a resume; this one was started before runs recorded it.)"""
    campaign = make_campaign(people(4), purpose="marketing", channels=MARKETING_SMS)
    send(campaign, store_path, FakeProvider(), run_key="k")
    conn = sqlite3.connect(store_path)
    conn.execute("UPDATE messages SET state = 'sending' WHERE row = 2")
    conn.execute("UPDATE runs SET recipient_key = NULL")
    conn.commit()
    conn.close()
    data = yaml.safe_load(campaign.read_text())
    data["recipients"]["key"] = "email"
    campaign.write_text(yaml.safe_dump(data))

    provider = FakeProvider(deduplicates=True)
    report = send(campaign, store_path, provider, run_key="k")
    assert provider.history == []
    assert (report.in_doubt_found, report.in_doubt_resent) == (1, 0)
    assert report.counts == {"in_doubt": 1, "sent": 3}


@pytest.mark.parametrize("provider_limits", [{}, {"concurrency": 2}, {"rate": "1000/s"}],
                         ids=["unthrottled", "provider-concurrency", "paced"])
def test_no_request_leaves_after_the_first_401_even_with_64_workers_waiting(
    make_campaign: CampaignFactory, store_path: Path, provider_limits: dict[str, Any]
) -> None:
    """Workers already past their intent (waiting on its commit, the provider's slot or its
    bucket) re-check the abort before the request leaves, and put their row back as it was."""
    refused: list[int] = []
    after_first: list[int] = []

    def handler(m: OutboundMessage) -> BaseException:
        if refused:
            after_first.append(m.row)
        refused.append(m.row)
        return ProviderAuthError("401 bad key", status=401)

    providers = {"box": {"type": "outbox", "dir": "outbox", "price_per_segment": "0.01",
                         **provider_limits}}
    campaign = make_campaign(people(300), providers=providers, limits={"concurrency": 64})
    report = send(campaign, store_path, FakeProvider(handler=handler), run_key="a")
    assert report.exit_code == ExitCode.PROVIDER_AUTH
    assert after_first == []  # nothing left once the first 401 was in
    assert set(report.counts) == {"pending"}
    assert query(store_path, "SELECT MAX(attempts), SUM(cost_micros > 0 AND state != 'pending') "
                 "FROM messages") == [(0, 0)]
    good = FakeProvider()
    report = send(campaign, store_path, good, run_key="a")
    assert report.counts == {"sent": 300}
    assert sorted(m.row for m in good.accepted) == list(range(1, 301))


def test_a_stop_reaches_workers_waiting_to_send_before_their_request_leaves(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    stop = StopController()
    after_stop: list[int] = []

    def handler(m: OutboundMessage) -> None:
        if stop.stopping:
            after_stop.append(m.row)
        stop.request()

    provider = FakeProvider(handler=handler)
    campaign = make_campaign(people(200), limits={"concurrency": 64})
    report = send(campaign, store_path, provider, stop=stop, run_key="s")
    assert report.exit_code == ExitCode.INTERRUPTED
    assert after_stop == []
    assert report.counts == {"sent": 1, "pending": 199}
    again = FakeProvider()
    report = send(campaign, store_path, again, run_key="s")
    assert report.counts == {"sent": 200}
    assert sorted(m.row for m in provider.accepted + again.accepted) == list(range(1, 201))


def send_or_hang(campaign: Path, store_path: Path, provider: FakeProvider, clock: FakeClock,
                 stop: StopController, hang: str) -> RunReport:
    """`send` with an hour's grace, in a thread: a wait the stop does not end hangs the run, and
    the join's timeout turns that hang into a failure saying ``hang``."""
    import threading

    reports: list[RunReport] = []
    runner = threading.Thread(target=lambda: reports.append(send(
        campaign, store_path, provider, clock=clock, stop=stop, grace_seconds=3600.0)),
        daemon=True)
    runner.start()
    runner.join(timeout=60)  # a guard against a hang, not a wait for time to pass
    assert not runner.is_alive(), hang
    [report] = reports
    return report


def test_a_stop_wakes_a_message_waiting_out_its_retry_backoff(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    """Ctrl-C while a message waits to retry: the backoff ends at once and the row is left
    pending. It used to sleep on, holding the exit for the whole grace period (here an hour)."""
    stop = StopController()

    class StoppedDuringBackoff(FakeClock):
        async def sleep(self, seconds: float) -> None:
            self.sleeps.append(seconds)
            asyncio.get_running_loop().call_soon(stop.request)
            await asyncio.Event().wait()  # a backoff that outlasts the test

    provider = FakeProvider(handler=lambda m: TransientError("503", code="503", status=503))
    campaign = make_campaign(people(1))
    report = send_or_hang(campaign, store_path, provider, StoppedDuringBackoff(), stop,
                          "the backoff held the stop")
    assert report.exit_code == ExitCode.INTERRUPTED
    assert report.counts == {"pending": 1} and len(provider.history) == 1


def test_a_stop_wakes_a_message_waiting_out_a_provider_s_retry_after_pause(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    """A 429 asks the provider to be left alone for a minute: every worker's next message waits
    out that pause. Ctrl-C then: the pause ends at once, as a retry backoff does, and the rows
    stay pending. It used to hold the exit for the whole grace period (here an hour) with
    nothing in flight."""
    stop = StopController()

    class StoppedDuringPause(FakeClock):
        async def sleep(self, seconds: float) -> None:
            self.sleeps.append(seconds)
            if len([s for s in self.sleeps if s >= 30]) == 2:  # the backoff, then the pause
                asyncio.get_running_loop().call_soon(stop.request)
            await asyncio.Event().wait()  # a wait that outlasts the test

    def handler(m: OutboundMessage) -> RateLimitedError | None:
        return RateLimitedError("slow down", code="429", status=429, retry_after=60.0) \
            if m.row == 1 else None

    provider = FakeProvider(handler=handler)
    campaign = make_campaign(people(3), limits={"concurrency": 2})
    report = send_or_hang(campaign, store_path, provider, StoppedDuringPause(), stop,
                          "the Retry-After pause held the stop")
    assert report.exit_code == ExitCode.INTERRUPTED
    assert report.counts == {"pending": 3}  # row 1 stopped in its backoff, the rest in the pause
    assert [m.row for m in provider.history] == [1]  # nothing else left


def test_an_immediate_stop_leaves_rows_waiting_for_the_provider_pending_not_in_doubt(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    """Only the request that left is in doubt; the rows whose intent was committed but which
    were still waiting for the provider's one slot never left."""
    stop = StopController()

    class Hanging(FakeProvider):
        async def send(self, message: OutboundMessage) -> SendResult:
            self.history.append(message)
            stop.request()
            stop.request()  # the second: stop at once, cutting this send off
            await asyncio.Event().wait()
            raise AssertionError("unreachable")

    provider = Hanging()
    providers = {"box": {"type": "outbox", "dir": "outbox", "price_per_segment": "0.01",
                         "concurrency": 1}}
    campaign = make_campaign(people(20), providers=providers, limits={"concurrency": 8})
    report = send(campaign, store_path, provider, stop=stop, run_key="i")
    assert report.exit_code == ExitCode.INTERRUPTED
    assert len(provider.history) == 1
    assert report.counts == {"in_doubt": 1, "pending": 19}
    assert query(store_path, "SELECT SUM(attempts) FROM messages") == [(1,)]


def _one_in_doubt(campaign: Path, store_path: Path) -> None:
    """Session 1 of run "d": row 1 is answered ambiguously (in doubt), row 2 is sent."""
    first = FakeProvider(deduplicates=False)
    first.enqueue(InDoubtError("read timeout after the request was written"))
    report = send(campaign, store_path, first, run_key="d")
    assert states(store_path) == {1: "in_doubt", 2: "sent"}
    assert report.spend_micros == 20_000


def test_a_resend_refused_401_stays_in_doubt_not_pending(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    """The 401 says nothing about the earlier attempt, which may have been delivered: the row
    goes back to `in_doubt` (pinned to its provider, reported), not to `pending`."""
    campaign = make_campaign(people(2), limits={"concurrency": 1})
    _one_in_doubt(campaign, store_path)
    refused = FakeProvider(handler=lambda m: ProviderAuthError("401 bad key", status=401))
    report = send(campaign, store_path, refused, run_key="d")
    assert report.exit_code == ExitCode.PROVIDER_AUTH
    assert states(store_path) == {1: "in_doubt", 2: "sent"}
    assert report.spend_micros == 20_000  # what the first attempt may have cost, once
    assert query(store_path, "SELECT attempts FROM messages WHERE row = 1") == [(1,)]
    good = FakeProvider(deduplicates=False)
    report = send(campaign, store_path, good, run_key="d")
    assert [m.row for m in good.accepted] == [1]
    assert (report.in_doubt_found, report.in_doubt_resent) == (1, 1)
    assert report.spend_micros == 30_000


def test_a_stop_during_the_backoff_of_a_resend_leaves_it_in_doubt_not_pending(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    campaign = make_campaign(people(2), limits={"concurrency": 1})
    _one_in_doubt(campaign, store_path)
    stop = StopController()

    def busy(m: OutboundMessage) -> BaseException:
        stop.request()
        return TransientError("503", status=503)

    report = send(campaign, store_path, FakeProvider(handler=busy), stop=stop, run_key="d")
    assert report.exit_code == ExitCode.INTERRUPTED
    assert states(store_path) == {1: "in_doubt", 2: "sent"}
    assert report.spend_micros == 20_000  # the 503 cost nothing; the first attempt may have


def test_a_stop_during_a_retry_after_an_ambiguous_answer_leaves_the_row_in_doubt(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    """A deduplicating provider's timeout is retried with the same key; a 503 on the retry
    does not settle whether the first one was delivered."""
    stop = StopController()
    provider = FakeProvider(deduplicates=True)

    def then_busy(m: OutboundMessage) -> BaseException:
        stop.request()
        return TransientError("503", status=503)

    provider.enqueue(InDoubtError("read timeout after the request was written"))
    provider.handler = then_busy
    report = send(make_campaign(people(1)), store_path, provider, stop=stop)
    assert len(provider.history) == 2
    assert report.exit_code == ExitCode.INTERRUPTED
    assert report.counts == {"in_doubt": 1}
    assert report.spend_micros == 10_000  # the first attempt may have been charged


def test_only_the_outbox_and_the_webhook_deduplicate_by_idempotency_key() -> None:
    """What a dry run assumes of each type's in-doubt messages (`type_deduplicates`): the
    outbox re-writes the same file and a webhook receiver is sent the same key; every other
    provider may deliver a second copy. A type not built in is assumed not to."""
    from campaign_cli.providers.base import BUILTIN_PROVIDERS, type_deduplicates

    assert {t for t in BUILTIN_PROVIDERS if type_deduplicates(t)} == {"outbox", "webhook"}
    assert type_deduplicates("carrier-pigeon") is False


def test_cancelling_execute_in_the_caller_s_loop_ends_every_task_of_the_run(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    """`Runner.execute()` awaited in an application's own event loop and cancelled there (a
    timeout, a shutdown): the run's workers, its source and its poll end with it, and the sends
    it cut off are in doubt when it resumes; none is left running in that loop against a closed
    journal."""
    campaign = make_campaign(people(50))
    assert cancelled_in_an_application(campaign, store_path) == []
    # As after a killed process: the cut-off sends stay `sending`, in doubt when it resumes.
    assert sorted(r["state"] for r in journal(store_path) if r["state"] != "pending") == [
        "sending"] * 4
    report = send(campaign, store_path, FakeProvider(), run_key="k")
    assert report.exit_code == ExitCode.OK and report.in_doubt_found == 4


class BusyPool(concurrent.futures.ThreadPoolExecutor):
    """A loaded machine's default executor: each call starts three turns of the loop after it
    is handed over. A call to ``cancel_on`` (a method) is handed over as its task is cancelled
    a second time (Ctrl-C out of `asyncio.run`, which cancels every task while the run cancels
    its own too)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, cancel_on: Any) -> None:
        super().__init__(max_workers=4)
        self.loop = loop
        self.cancel_on = cancel_on

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        target = fn.args[0] if isinstance(fn, functools.partial) else fn  # to_thread's
        if getattr(target, "__func__", None) is self.cancel_on:
            task = asyncio.current_task()
            assert task is not None
            task.cancel()

        def work() -> None:
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                future.set_exception(exc)

        def start(turns: int) -> None:
            if turns:
                self.loop.call_soon(start, turns - 1)
            elif future.set_running_or_notify_cancel():
                super(BusyPool, self).submit(work)

        self.loop.call_soon_threadsafe(start, 3)
        return future


class Held(FakeProvider):
    """Sends that are never answered."""

    async def send(self, message: OutboundMessage) -> SendResult:
        self.history.append(message)
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


def cancelled_in_an_application(campaign: Path, store_path: Path, cancel_on: Any = None,
                                **options: Any) -> list[str]:
    """Run ``campaign`` in an application's loop until four sends are held, then cancel it;
    the tasks left in that loop after. ``cancel_on``: a method whose call in a thread is handed
    over as the run is cancelled a second time (`BusyPool`, the loop's default executor)."""
    from campaign_cli.pipeline import Runner

    async def application() -> list[str]:
        if cancel_on is not None:
            loop = asyncio.get_running_loop()
            loop.set_default_executor(BusyPool(loop, cancel_on))
        provider = Held()
        runner = Runner(load_campaign(campaign, {}), store_path,
                        SendOptions(run_key="k", **options), clock=FakeClock(),
                        registry=fake_registry(provider), stop=StopController())
        task = asyncio.create_task(runner.execute())
        for _ in range(6000):  # until the four workers each hold a send (a guard, not a wait)
            if len(provider.history) == 4:
                break
            await asyncio.sleep(0.01)
        assert len(provider.history) == 4
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return sorted(t.get_coro().__qualname__  # type: ignore[union-attr]
                      for t in asyncio.all_tasks() if t is not asyncio.current_task())

    return asyncio.run(application())


def test_a_second_cancellation_as_the_reader_is_closed_still_ends_its_process(
    make_campaign: CampaignFactory, store_path: Path, opened_readers: list[Any]
) -> None:
    """The source closes the reader's child process in a thread on its way out. A second
    cancellation as it hands the close over cancelled the call before a thread of the pool had
    started it, on a loaded machine: the close never ran, and the child process was left
    running."""
    from campaign_cli.recipients import ProcessChunkReader

    readers = opened_readers
    cancelled_in_an_application(make_campaign(people(2000)), store_path,
                                ProcessChunkReader.close, reader="process")
    assert len(readers) == 1
    reaped = readers[0]._process.returncode is not None
    if not reaped:
        readers[0].close()
    assert reaped


def test_a_cancellation_while_the_reader_opens_still_ends_its_process(
    make_campaign: CampaignFactory, store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelled while the reader's child process was starting (in a thread): the reader it
    opened was handed to nobody, and left to the garbage collector with its child running."""
    import threading

    import campaign_cli.pipeline as pipeline
    from campaign_cli.pipeline import Runner
    from campaign_cli.recipients import ProcessChunkReader

    readers: list[ProcessChunkReader] = []
    opened = threading.Event()
    go_on = threading.Event()

    class Slow(ProcessChunkReader):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            readers.append(self)
            opened.set()
            go_on.wait(60)  # until the run is cancelled

    monkeypatch.setattr(pipeline, "ProcessChunkReader", Slow)
    campaign = make_campaign(people(2000))

    async def application() -> None:
        runner = Runner(load_campaign(campaign, {}), store_path,
                        SendOptions(run_key="k", reader="process"), clock=FakeClock(),
                        registry=fake_registry(FakeProvider()), stop=StopController())
        task = asyncio.create_task(runner.execute())
        for _ in range(6000):  # until the reader's child has started (a guard, not a wait)
            if opened.is_set():
                break
            await asyncio.sleep(0.01)
        assert opened.is_set()
        task.cancel()
        await asyncio.sleep(0)  # the cancellation lands while the reader still opens
        go_on.set()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(application())
    [reader] = readers
    reaped = reader._process.returncode is not None
    if not reaped:
        reader.close()
    assert reaped


def test_a_second_cancellation_as_the_journal_is_closed_still_stops_its_writer(
    make_campaign: CampaignFactory, store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same for the journal writer (Ctrl-C twice in a script that calls `run_campaign`: the
    second one cancels the run again while it closes): its close, dropped, left the writer's
    thread and connection running, with what it had not yet committed."""
    from campaign_cli.store.journal import JournalWriter

    writers: list[JournalWriter] = []
    real_start = JournalWriter.start

    def recorded(self: JournalWriter) -> JournalWriter:
        writers.append(self)
        return real_start(self)

    monkeypatch.setattr(JournalWriter, "start", recorded)
    cancelled_in_an_application(make_campaign(people(50)), store_path, JournalWriter.close)
    assert len(writers) == 1
    running = writers[0]._thread.is_alive()
    if running:
        writers[0].close()
    assert not running


def test_run_campaign_in_a_running_event_loop_says_to_await_runner_execute(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    """An application's own loop (a web handler, a notebook): the blocking entry point refuses
    at once and names the one to await, with nothing started (no coroutine left unawaited for
    the garbage collector to warn about)."""
    loaded = load_campaign(make_campaign(people(2)), {})
    provider = FakeProvider()

    async def application() -> None:
        with pytest.raises(RuntimeError, match=r"await Runner\(\.\.\.\)\.execute\(\)"):
            run_campaign(loaded, store_path, SendOptions(), clock=FakeClock(),
                         registry=fake_registry(provider))

    asyncio.run(application())
    gc.collect()
    assert provider.history == [] and not store_path.exists()


_CANCELLED_IN_LOCK_WAIT = """
import asyncio, sqlite3, sys, threading
from pathlib import Path
from campaign_cli.config import load_campaign
from campaign_cli.pipeline import Runner, SendOptions, StopController
from campaign_cli.store import runs
from campaign_cli.testing import FakeClock, FakeProvider, fake_registry

campaign, store = Path(sys.argv[1]), Path(sys.argv[2])
entered, left = threading.Event(), threading.Event()
real = runs.start_run

def start_run(*args, **kwargs):
    entered.set()
    try:
        return real(*args, **kwargs)
    finally:
        left.set()

runs.start_run = start_run

async def main():
    runner = Runner(load_campaign(campaign, {}), store, SendOptions(run_key="k"),
                    clock=FakeClock(), registry=fake_registry(FakeProvider()),
                    stop=StopController())
    task = asyncio.create_task(runner.execute())
    while not entered.is_set():
        await asyncio.sleep(0.01)
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    print("left" if left.is_set() else "still waiting", flush=True)

holder = sqlite3.connect(store, isolation_level=None)  # another process's long write
holder.execute("BEGIN IMMEDIATE")
asyncio.run(main())
holder.execute("ROLLBACK")
holder.close()
"""


def test_cancelled_while_the_session_waits_for_the_store_s_write_lock(
    make_campaign: CampaignFactory, store_path: Path, tmp_path: Path
) -> None:
    """`execute` cancelled (Ctrl-C in `asyncio.run` around `run_campaign`, an application's
    timeout) while the session's start waits in a thread for another process's write lock: the
    thread gives the wait up and is waited for before the store's connection is closed. Closed
    under it, the interpreter crashed (a segmentation fault). In a child process, as a crash
    would take the test run with it."""
    import subprocess
    import sys

    campaign = make_campaign(people(3))
    send(campaign, store_path, FakeProvider(), run_key="first")  # the store exists
    script = tmp_path / "cancel.py"
    script.write_text(_CANCELLED_IN_LOCK_WAIT, encoding="utf-8")
    done = subprocess.run(
        [sys.executable, str(script), str(campaign), str(store_path)], capture_output=True,
        text=True, timeout=120, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert (done.returncode, done.stdout.strip(), done.stderr) == (0, "left", "")
    assert [r[0] for r in query(store_path, "SELECT run_key FROM runs")] == ["first"]


def test_cancelled_while_a_campaign_s_own_opt_out_list_waits_for_the_store_s_write_lock(
    make_campaign: CampaignFactory, store_path: Path, tmp_path: Path
) -> None:
    """As above, for the import of the campaign's own opt-out list (it runs in a thread before
    the session starts, and waits for another process's write lock to copy its entries in):
    cancelled there, the thread gives up and is waited for; nothing of the list is imported."""
    import subprocess
    import sys

    (tmp_path / "optout.csv").write_text("address,channel\n+12012000002,sms\n")
    campaign = make_campaign(people(3), compliance={"consent": "not_required",
                                                    "suppression_lists": ["optout.csv"]})
    send(make_campaign(people(3), file_name="plain.yaml"), store_path, FakeProvider(),
         run_key="first")  # the store exists
    script = tmp_path / "cancel.py"
    script.write_text(_CANCELLED_IN_LOCK_WAIT.replace(
        "from campaign_cli.store import runs", "from campaign_cli.store import suppressions"
    ).replace("real = runs.start_run", "real = suppressions.insert_all").replace(
        "def start_run(", "def insert_all(").replace(
        "runs.start_run = start_run", "suppressions.insert_all = insert_all"), encoding="utf-8")
    done = subprocess.run(
        [sys.executable, str(script), str(campaign), str(store_path)], capture_output=True,
        text=True, timeout=120, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert (done.returncode, done.stdout.strip(), done.stderr) == (0, "left", "")
    assert query(store_path, "SELECT count(*) FROM suppressions") == [(0,)]
    assert [r[0] for r in query(store_path, "SELECT run_key FROM runs")] == ["first"]


def test_a_throwaway_store_serves_a_user_s_test_and_leaves_nothing_behind(
    make_campaign: CampaignFactory,
) -> None:
    """DESIGN section 2 promised `campaign_cli.testing` a throwaway store for users' own tests:
    it had none (helper u2). One block: a store, a run on it, and nothing left afterwards."""
    from campaign_cli.testing import throwaway_store

    campaign = load_campaign(make_campaign(people(3)), {})
    provider = FakeProvider()
    with throwaway_store() as store:
        assert store.exists() and stat.S_IMODE(store.stat().st_mode) == 0o600
        report = run_campaign(campaign, store, SendOptions(run_key="k"), clock=FakeClock(),
                              registry=fake_registry(provider))
        assert report.counts == {"sent": 3} and len(provider.accepted) == 3
        assert [r["state"] for r in journal(store)] == ["sent"] * 3
    assert not store.parent.exists()
