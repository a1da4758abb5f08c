"""Failover between a channel's providers, the circuit breaker, the attempts journal, adaptive
pacing and --retry-failed: in process, with fake providers and a fake clock."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import pytest

from campaign_cli.config import load_campaign
from campaign_cli.errors import (
    ExitCode,
    InDoubtError,
    PermanentError,
    TransientError,
)
from campaign_cli.models import OutboundMessage
from campaign_cli.pacing import Pacer
from campaign_cli.pipeline import Breaker, RunReport, SendOptions, run_campaign
from campaign_cli.providers.base import ProviderRegistry
from campaign_cli.testing import FakeClock, FakeProvider
from tests.conftest import CampaignFactory, journal, people, query

TWO_PROVIDERS = {
    "primary": {"type": "outbox", "dir": "outbox", "price_per_segment": "0.01"},
    "secondary": {"type": "console", "price_per_segment": "0.02"},
}
FAILOVER_SMS = {"sms": {"provider": ["primary", "secondary"], "body": "Code {{ row }}"}}


def two(primary: FakeProvider, secondary: FakeProvider) -> ProviderRegistry:
    registry = ProviderRegistry()
    registry.register("outbox", lambda name, config, context: primary)
    registry.register("console", lambda name, config, context: secondary)
    return registry


def send(campaign: Path, store: Path, registry: ProviderRegistry, **options: Any) -> RunReport:
    return run_campaign(load_campaign(campaign, {}), store, SendOptions(**options),
                        clock=FakeClock(), registry=registry)


def test_primary_down_moves_traffic_to_the_secondary_and_nobody_gets_two(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    primary = FakeProvider("primary", handler=lambda m: TransientError("503", status=503))
    secondary = FakeProvider("secondary")
    campaign = make_campaign(people(30), channels=FAILOVER_SMS, providers=TWO_PROVIDERS,
                             limits={"concurrency": 1,
                                     "circuit_breaker": {"threshold": 3, "cooldown": 1000}})
    report = send(campaign, store_path, two(primary, secondary))
    assert report.exit_code == ExitCode.OK
    assert report.counts == {"sent": 30}
    assert primary.accepted == []
    assert sorted(m.row for m in secondary.accepted) == list(range(1, 31))
    assert len(primary.history) == 3  # the breaker opened after three failures and stayed open
    rows = journal(store_path)
    assert {r["provider"] for r in rows} == {"secondary"}
    # The secondary's price is what was charged.
    assert report.spend_micros == 30 * 20_000


def test_an_ambiguous_failure_never_moves_to_another_provider(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    primary = FakeProvider("primary", handler=lambda m: InDoubtError("timeout after write"))
    secondary = FakeProvider("secondary")
    campaign = make_campaign(people(3), channels=FAILOVER_SMS, providers=TWO_PROVIDERS,
                             limits={"concurrency": 1})
    report = send(campaign, store_path, two(primary, secondary))
    assert secondary.history == []
    assert report.counts == {"in_doubt": 3}
    assert {r["provider"] for r in journal(store_path)} == {"primary"}


def test_a_primary_that_keeps_timing_out_sends_the_rest_to_the_secondary(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    """Timeouts counted for nothing: a hanging primary took every message of the list, each one
    ending in doubt (a marketing list skipped whole). They now open its breaker like failures:
    the messages in doubt stay on the primary, the ones not sent yet go to the secondary."""
    primary = FakeProvider("primary", handler=lambda m: InDoubtError("timeout after write"))
    secondary = FakeProvider("secondary")
    campaign = make_campaign(people(30), channels=FAILOVER_SMS, providers=TWO_PROVIDERS,
                             limits={"concurrency": 1,
                                     "circuit_breaker": {"threshold": 3, "cooldown": 1000}})
    report = send(campaign, store_path, two(primary, secondary))
    assert report.counts == {"in_doubt": 3, "sent": 27}
    doubted = {m.row for m in primary.history}
    assert doubted == {1, 2, 3}
    assert not doubted & {m.row for m in secondary.history}
    assert sorted(m.row for m in secondary.accepted) == list(range(4, 31))


def test_every_attempt_is_journaled_with_provider_outcome_and_latency(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    primary = FakeProvider("primary")
    primary.enqueue(TransientError("busy", code="503", status=503),
                    PermanentError("unreachable", code="30003", status=400))
    campaign = make_campaign(people(2), providers={"p": TWO_PROVIDERS["primary"]},
                             channels={"sms": {"provider": "p", "body": "x"}},
                             limits={"concurrency": 1})
    registry = ProviderRegistry()
    registry.register("outbox", lambda name, config, context: primary)
    send(campaign, store_path, registry)
    attempts = query(store_path, "SELECT row, attempt, provider, outcome, status_code, error_code, "
                     "latency_ms IS NOT NULL FROM attempts ORDER BY row, attempt")
    assert attempts == [
        (1, 1, "p", "transient", 503, "503", 1),
        (1, 2, "p", "permanent", 400, "30003", 1),
        (2, 1, "p", "sent", None, None, 1),
    ]


def test_retry_failed_redrives_only_transient_dead_letters(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    def handler(m: OutboundMessage) -> BaseException | None:
        if m.row == 1:
            return TransientError("down", code="503", status=503)
        if m.row == 2:
            return PermanentError("blocked", code="21610", status=400)
        return None

    campaign = make_campaign(people(3), limits={"concurrency": 1})
    first = FakeProvider(handler=handler)
    registry = ProviderRegistry()
    registry.register("outbox", lambda name, config, context: first)
    report = send(campaign, store_path, registry, run_key="r")
    assert report.counts == {"failed": 2, "sent": 1}

    again = FakeProvider()
    registry = ProviderRegistry()
    registry.register("outbox", lambda name, config, context: again)
    report = send(campaign, store_path, registry, run_key="r", retry_failed=True)
    assert [m.row for m in again.accepted] == [1]
    assert report.counts == {"failed": 1, "sent": 2}
    assert report.exit_code == ExitCode.FAILURES  # the permanent one stays a dead letter


def test_retry_failed_with_a_limit_leaves_dead_letters_past_it_failed(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    """--retry-failed --limit 1 put row 3's dead letter back to `pending` and then never read
    that far: it was neither retried nor failed any more, and the run said `done`, exit 0."""
    campaign = make_campaign(people(3), limits={"concurrency": 1})
    first = FakeProvider(handler=lambda m: TransientError("down", code="503", status=503)
                         if m.row == 3 else None)
    registry = ProviderRegistry()
    registry.register("outbox", lambda name, config, context: first)
    assert send(campaign, store_path, registry, run_key="r").counts == {"failed": 1, "sent": 2}

    again = FakeProvider()
    registry = ProviderRegistry()
    registry.register("outbox", lambda name, config, context: again)
    report = send(campaign, store_path, registry, run_key="r", retry_failed=True, limit=1)
    assert again.history == []
    assert report.counts == {"failed": 1, "sent": 2}
    assert report.exit_code == ExitCode.FAILURES
    report = send(campaign, store_path, registry, run_key="r", retry_failed=True)
    assert [m.row for m in again.accepted] == [3]
    assert (report.counts, report.exit_code) == ({"sent": 3}, ExitCode.OK)


def test_breaker_opens_probes_after_cooldown_and_closes_on_success() -> None:
    clock = FakeClock()
    breaker = Breaker(threshold=2, cooldown=10, clock=clock)
    breaker.failure()
    assert breaker.available()
    breaker.failure()
    assert not breaker.available()
    clock.advance(10)
    assert breaker.available()  # half-open: one probe
    breaker.attempt()
    assert not breaker.available()  # only one probe at a time
    breaker.failure()
    assert not breaker.available()  # the probe failed: open again
    clock.advance(10)
    breaker.attempt()
    breaker.success()
    assert breaker.available() and breaker.failures == 0


def test_a_429_halves_the_rate_for_every_worker_and_good_answers_win_it_back() -> None:
    async def scenario() -> list[float | None]:
        pacer = Pacer(100.0, 10)
        seen: list[float | None] = [pacer.rate]
        pacer.rate_limited(None)
        seen.append(pacer.rate)
        pacer.rate_limited(None)  # the same second: no second halving
        seen.append(pacer.rate)
        return seen

    assert asyncio.run(scenario()) == [100.0, 50.0, 50.0]


def test_good_answers_win_the_rate_back_gradually_up_to_the_configured_rate() -> None:
    clock = FakeClock()  # the pacer times its recovery on the run's clock

    async def scenario() -> list[float | None]:
        pacer = Pacer(100.0, 10, clock)
        pacer.rate_limited(None)
        seen: list[float | None] = [pacer.rate]
        clock.advance(0.5)
        pacer.succeeded()  # one good answer: one more message per second
        seen.append(pacer.rate)
        for _ in range(3):  # each tenth of a second, one more good answer
            clock.advance(0.2)
            pacer.succeeded()
            seen.append(pacer.rate)
        for _ in range(200):
            clock.advance(0.1)
            pacer.succeeded()
        seen.append(pacer.rate)
        return seen

    rates = asyncio.run(scenario())
    assert rates[0] == 50.0
    assert rates[1] == 50.0 + 1  # additive: one message per second per good answer
    assert rates[2] < rates[3] < rates[4] < 100.0
    assert rates[-1] == 100.0  # never above what the campaign allows


def test_an_unthrottled_provider_is_paced_after_a_429_and_unthrottled_again() -> None:
    clock = FakeClock()

    async def scenario() -> tuple[float | None, float | None]:
        pacer = Pacer(None, clock=clock)
        for _ in range(400):  # 400 answers in 0.2 s: 2,000/s observed
            clock.advance(0.0005)
            pacer.succeeded()
        pacer.rate_limited(2.0)
        slowed = pacer.rate
        for _ in range(10_000):
            clock.advance(0.01)
            pacer.succeeded()
        return slowed, pacer.rate

    slowed, recovered = asyncio.run(scenario())
    assert slowed is not None and 900 <= slowed <= 1100  # about half of what it was doing
    assert recovered is None


def test_a_retry_after_pause_passes_on_the_run_s_clock() -> None:
    """The pause a 429's Retry-After asks for is waited out on the run's clock: a test's fake
    clock passes it at once (unit tests never wait for real time to pass), and it holds every
    worker until that clock reaches its end. An hour asked for is five minutes at most."""
    clock = FakeClock()

    async def scenario() -> tuple[bool, float]:
        pacer = Pacer(None, clock=clock)
        pacer.rate_limited(3600.0)
        paused = pacer.paused
        await asyncio.wait_for(pacer.acquire(), 5)  # five minutes of fake time, no real wait
        return paused, clock.monotonic()

    paused, now = asyncio.run(scenario())
    assert paused
    assert 300.0 <= now < 301.0


def _clocked(clock: FakeClock, primary_handler: Any) -> tuple[FakeProvider, FakeProvider]:
    """A primary answering with ``primary_handler``, and a healthy secondary on which each
    message takes 10 ms of the fake clock (so cool-downs pass while traffic flows)."""

    def up(m: OutboundMessage) -> None:
        clock.advance(0.01)

    return (FakeProvider("primary", handler=primary_handler),
            FakeProvider("secondary", handler=up))


def test_a_half_open_breaker_lets_one_probe_through_with_64_workers(
    make_campaign: CampaignFactory, store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Workers that picked a provider wait for its bucket (here: one turn of the event loop)
    before their request leaves. When the circuit half-opens, the first to pick the primary
    takes the probe at once: the others go to the secondary instead of all waiting for the
    primary's bucket and then all sending to a provider that is still down."""
    original = Pacer.acquire

    async def waiting_acquire(self: Pacer) -> None:
        await original(self)
        await asyncio.sleep(0)

    monkeypatch.setattr(Pacer, "acquire", waiting_acquire)
    clock = FakeClock()
    primary, secondary = _clocked(clock, lambda m: TransientError("503", status=503))
    campaign = make_campaign(people(2000), channels=FAILOVER_SMS, providers=TWO_PROVIDERS,
                             limits={"concurrency": 64,
                                     "circuit_breaker": {"threshold": 1, "cooldown": 5}})
    report = run_campaign(load_campaign(campaign, {}), store_path, SendOptions(), clock=clock,
                          registry=two(primary, secondary))
    assert report.counts == {"sent": 2000}
    windows = clock.monotonic() / 5
    assert windows >= 3  # the primary was probed again several times
    # The first wave (up to 64 sends picked while the circuit was still closed), then one probe
    # per cool-down, not one per worker.
    assert len(primary.history) <= 64 + windows + 1


def test_an_ambiguous_probe_opens_the_circuit_again_and_a_later_probe_closes_it(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    clock = FakeClock()
    answers: list[BaseException | None] = [
        TransientError("503", status=503), InDoubtError("timeout after write")]

    def recovering(m: OutboundMessage) -> BaseException | None:
        return answers.pop(0) if answers else None

    primary, secondary = _clocked(clock, recovering)
    campaign = make_campaign(people(2000), channels=FAILOVER_SMS, providers=TWO_PROVIDERS,
                             limits={"concurrency": 1,
                                     "circuit_breaker": {"threshold": 1, "cooldown": 5}})
    report = run_campaign(load_campaign(campaign, {}), store_path, SendOptions(), clock=clock,
                          registry=two(primary, secondary), rng=random.Random(7))
    assert report.counts == {"in_doubt": 1, "sent": 1999}
    # Back on the primary once a probe succeeded: two cool-downs of ~500 messages each went to
    # the secondary (the backoff's jitter moves that by a few), the rest to the primary.
    assert len(primary.accepted) > 900
    assert primary.accepted[-1].row == 2000



def _only(provider: FakeProvider) -> ProviderRegistry:
    registry = ProviderRegistry()
    registry.register("outbox", lambda name, config, context: provider)
    return registry


def test_retries_that_run_out_after_an_ambiguous_attempt_leave_the_row_in_doubt(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    """Row 1 timed out on a deduplicating provider; its same-key retries then ran out on 503s.
    The timed-out attempt may have been delivered (and charged): the row stays `in_doubt`, its
    cost counted, not a dead letter that --retry-failed would re-drive as `pending` (unpinned).
    Row 2 only ever had definite 503s: a dead letter, re-driven."""
    seen: list[int] = []

    def handler(m: OutboundMessage) -> BaseException | None:
        seen.append(m.row)
        if m.row == 1 and seen.count(1) == 1:
            return InDoubtError("timeout after write")
        if m.row in (1, 2):
            return TransientError("503", code="503", status=503)
        return None

    campaign = make_campaign(people(3), limits={"concurrency": 1})
    report = send(campaign, store_path, _only(FakeProvider(deduplicates=True, handler=handler)),
                  run_key="r")
    assert report.counts == {"failed": 1, "in_doubt": 1, "sent": 1}
    assert report.spend_micros == 20_000  # row 3, and row 1's timed-out attempt
    row1 = next(r for r in journal(store_path) if r["row"] == 1)
    assert (row1["reason"], row1["error_code"]) == ("in_doubt", "503")
    assert "retries ran out after an ambiguous attempt" in row1["detail"]
    again = FakeProvider(deduplicates=True)
    report = send(campaign, store_path, _only(again), run_key="r", retry_failed=True)
    # Row 2 re-driven; row 1 resent as any in-doubt row is to a provider that deduplicates:
    # with its same idempotency key.
    assert sorted(m.row for m in again.history) == [1, 2]
    assert report.counts == {"sent": 3}


def test_a_permanent_refusal_after_an_ambiguous_attempt_keeps_its_possible_cost(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    """Row 1 timed out on a deduplicating provider (it may have been delivered and charged);
    its same-key retry was then refused outright. The refusal dropped the timed-out attempt's
    cost: the run reported 0.01 spent, and a resume under the same cap of 0.02 sent row 3 too,
    0.03 possibly charged. An in-doubt row resent by a later session and refused keeps that
    cost (`doubt_micros`); so must a row doubted in this session."""
    seen: list[int] = []

    def handler(m: OutboundMessage) -> BaseException | None:
        seen.append(m.row)
        if m.row == 1:
            return (InDoubtError("timeout after write") if seen.count(1) == 1
                    else PermanentError("rejected", code="400", status=400))
        return None

    campaign = make_campaign(people(3), limits={"concurrency": 1, "max_spend": "0.02"})
    report = send(campaign, store_path, _only(FakeProvider(deduplicates=True, handler=handler)),
                  run_key="r")
    assert report.counts == {"failed": 1, "pending": 1, "sent": 1}
    assert report.spend_micros == 20_000  # row 2, and row 1's timed-out attempt
    again = FakeProvider(deduplicates=True)
    report = send(campaign, store_path, _only(again), run_key="r")
    assert again.history == []
    assert (report.exit_code, report.spend_micros) == (ExitCode.SPEND_CAP, 20_000)


def test_an_in_doubt_resend_whose_retries_run_out_stays_in_doubt(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    providers = {"p": {**TWO_PROVIDERS["primary"], "retry": {"attempts": 2}}}
    campaign = make_campaign(people(2), providers=providers,
                             channels={"sms": {"provider": "p",
                                               "body": "x. Reply STOP to opt out"}},
                             limits={"concurrency": 1}, purpose="marketing",
                             compliance={"consent": "not_required"})
    first = FakeProvider()
    first.enqueue(InDoubtError("timeout after write"))
    assert send(campaign, store_path, _only(first), run_key="r").counts == {
        "in_doubt": 1, "sent": 1}
    busy = FakeProvider(deduplicates=True,
                        handler=lambda m: TransientError("503", code="503", status=503))
    report = send(campaign, store_path, _only(busy), run_key="r")
    assert len(busy.history) == 2  # the resend, and its retry
    assert report.counts == {"in_doubt": 1, "sent": 1}
    again = FakeProvider()  # cannot deduplicate; marketing: in doubt rows are not resent
    report = send(campaign, store_path, _only(again), run_key="r", retry_failed=True)
    assert again.history == []
    assert report.counts == {"in_doubt": 1, "sent": 1}


class _RefusalsMeanConfig(FakeProvider):
    refusals_mean_config = True  # as Twilio, SendGrid, FCM


def test_in_doubt_rows_refused_ten_in_a_row_stay_in_doubt_and_never_fail_over(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    """Found by the run-invariants harness. Rows in doubt at the primary (a timeout after the
    request was written) are resent to it on resume (transactional: `resend`); it refuses ten in
    a row with one code (its sender was suspended), which stops the run and used to put all ten
    back to `pending`. The next resume then took them for never sent: not reported as in-doubt
    resends, and free to fail over, so the secondary sent a second copy of messages the primary
    may have delivered."""
    limits = {"concurrency": 1, "circuit_breaker": {"threshold": 1, "cooldown": 1000}}
    timing_out = _RefusalsMeanConfig("primary", handler=lambda m: InDoubtError("timeout"))
    breaker_off = {**limits, "circuit_breaker": {"threshold": 1000, "cooldown": 1000}}
    campaign = make_campaign(people(10), channels=FAILOVER_SMS, providers=TWO_PROVIDERS,
                             limits=breaker_off)
    first = send(campaign, store_path, two(timing_out, FakeProvider("secondary")))
    assert first.counts == {"in_doubt": 10}

    refusing = _RefusalsMeanConfig("primary", handler=lambda m: PermanentError(
        "The From phone number is not a valid, SMS-capable number", code="21606", status=400))
    second = send(campaign, store_path, two(refusing, FakeProvider("secondary")))
    assert second.exit_code == ExitCode.PROVIDER_AUTH
    assert len(refusing.history) == 10
    # They may have arrived at the primary: still in doubt, pinned to it, not pending.
    assert second.counts == {"in_doubt": 10}
    assert second.spend_micros == first.spend_micros  # the refused resends cost nothing

    campaign = make_campaign(people(10), channels=FAILOVER_SMS, providers=TWO_PROVIDERS,
                             limits=limits)
    down = _RefusalsMeanConfig("primary", handler=lambda m: TransientError("503", status=503))
    secondary = FakeProvider("secondary")
    send(campaign, store_path, two(down, secondary))
    assert secondary.history == []
    assert {r["provider"] for r in journal(store_path)} == {"primary"}


def test_a_run_stopped_short_of_its_cap_by_dearer_reservations_resumes_within_it(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    """Failover reserves the dearest provider's price (0.02) and the primary charges 0.01, so the
    run stops at 0.05 of a 0.10 cap: never over it. Resuming with the same cap sends on, and the
    run never goes past it."""
    campaign = make_campaign(people(20), channels=FAILOVER_SMS, providers=TWO_PROVIDERS,
                             limits={"concurrency": 1, "max_spend": "0.10"})
    spent = []
    for _ in range(6):
        report = send(campaign, store_path, two(FakeProvider("primary"), FakeProvider("second")),
                      run_key="k")
        spent.append(report.spend_micros)
        assert report.spend_micros <= 100_000
    assert spent[0] == 50_000 and spent[1] > spent[0]  # the first resume sent on
    assert spent[-1] >= 90_000  # within one dearest price of the cap


def test_a_probe_refused_before_it_left_leaves_the_circuit_half_open(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    """The probe after a cool-down is a message the primary's adapter refuses to build (or a
    recipient URL that may not be reached): nothing reached the provider, which says nothing of
    its health. It closed the circuit ("it answered: the provider is up"), and the next
    ``threshold`` messages went to a provider still down; now the next message probes."""
    clock = FakeClock()
    calls: list[tuple[float, str]] = []
    answers = iter(["down"] * 3 + ["local"])

    def primary_handler(m: OutboundMessage) -> BaseException | None:
        kind = next(answers, "down")
        calls.append((clock.monotonic(), kind))
        if kind == "local":
            return PermanentError("cannot build it", code="bad_message", answered=False)
        return TransientError("503", status=503)

    primary, secondary = _clocked(clock, primary_handler)
    campaign = make_campaign(people(1500), channels=FAILOVER_SMS, providers=TWO_PROVIDERS,
                             limits={"concurrency": 1,
                                     "circuit_breaker": {"threshold": 3, "cooldown": 5}})
    report = run_campaign(load_campaign(campaign, {}), store_path, SendOptions(), clock=clock,
                          registry=two(primary, secondary), rng=random.Random(7))
    assert report.counts == {"failed": 1, "sent": 1499}
    local = next(i for i, (_, kind) in enumerate(calls) if kind == "local")
    after = [t for t, _ in calls[local + 1:]]
    assert after, "the primary was probed again"
    # One probe per cool-down from then on: never two sends to the primary in one window.
    assert all(b - a >= 5 for a, b in zip(after, after[1:], strict=False)), calls
