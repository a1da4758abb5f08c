"""Policy at run time: opt-outs and revocations recorded while a run is going are honoured by
every message not yet sent, whatever it is waiting for (a provider's slot, a Retry-After pause,
a backoff, a batch)."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from campaign_cli import policy as policy_module
from campaign_cli.addresses import address_hash, normalize_phone
from campaign_cli.config import load_campaign
from campaign_cli.errors import ExitCode, InDoubtError, ProviderError
from campaign_cli.models import OutboundMessage, SendResult, State
from campaign_cli.pipeline import Progress, Runner, RunReport, SendOptions, run_campaign
from campaign_cli.policy import Policy, Updates
from campaign_cli.store.consents import record_consents
from campaign_cli.store.db import Store
from campaign_cli.store.suppressions import add_suppressions
from campaign_cli.testing import FakeBatchProvider, FakeClock, FakeProvider, fake_registry
from tests.conftest import CampaignFactory, journal, people, phone, query


def states(store: Path) -> dict[int, str]:
    return {r["row"]: r["state"] for r in journal(store)}


class Ticks:
    """Counts the ticker's rounds (it reports progress after each policy poll)."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, progress: Progress) -> None:
        self.count += 1

    async def two_more(self) -> None:
        """Until a poll has certainly started after now (the one running may have read before)."""
        target = self.count + 2
        while self.count < target:
            await asyncio.sleep(0.005)


async def until(condition: Callable[[], bool]) -> None:
    deadline = asyncio.get_running_loop().time() + 10
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition never met"
        await asyncio.sleep(0.005)


def suppress(store: Path, raw: str, channel: str = "sms") -> None:
    conn = sqlite3.connect(store, isolation_level=None)
    try:
        add_suppressions(conn, [(normalize_phone(raw), channel)], "cli", "cli", "2026-01-01")
    finally:
        conn.close()


def row_state(store: Path, row: int) -> str:
    found = query(store, "SELECT state FROM messages WHERE row = ?", row)
    return str(found[0][0]) if found else ""


def run(campaign: Path, store: Path, provider: FakeProvider,
        ticks: Callable[[Progress], None] | None = None, **options: Any) -> RunReport:
    loaded = load_campaign(campaign, {})
    return run_campaign(loaded, store, SendOptions(poll_interval=0.01, **options),
                        clock=FakeClock(), registry=fake_registry(provider), on_progress=ticks)


def test_an_opt_out_while_a_message_waits_for_the_providers_slot_is_honoured(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    """Row 2 passed the policy and committed its intent, then waited for the provider's only
    slot (row 1 holds it). The opt-out arrives and is polled in that wait: row 2 must not go."""
    ticks = Ticks()

    class Slow(FakeProvider):
        async def send(self, message: OutboundMessage) -> SendResult:
            if message.row == 1:
                await until(lambda: row_state(store_path, 2) == "sending")
                suppress(store_path, phone(2))
                await ticks.two_more()
            return await super().send(message)

    provider = Slow()
    run(one_slot(make_campaign, 2), store_path, provider, ticks)
    assert [m.row for m in provider.accepted] == [1]
    assert states(store_path) == {1: "sent", 2: "suppressed"}


def sending_rows(store: Path) -> set[int]:
    return {r[0] for r in query(store, "SELECT row FROM messages WHERE state = 'sending'")}


def one_slot(make_campaign: CampaignFactory, recipients: int) -> Path:
    """Two workers, and a provider that takes one request at a time: the second waits for the
    slot with its intent committed."""
    return make_campaign(
        people(recipients), limits={"concurrency": 2},
        providers={"box": {"type": "outbox", "dir": "outbox", "concurrency": 1}},
    )


def first_batch_holds_the_slot(
    store: Path, ticks: Ticks, opt_out: Callable[[list[int]], None], take: int | None = None
) -> tuple[FakeBatchProvider, set[int]]:
    """A batch provider whose first batch, holding the only slot, waits until another batch has
    committed its intents, opts out (the first ``take`` of) those rows, and waits for two polls.
    Batches of at most 5: the first cannot take all 20 rows, whatever the source queued before
    the first worker ran (with 64, one run in ten had no second batch to wait, and failed)."""
    late: set[int] = set()

    class Slow(FakeBatchProvider):
        async def send_batch(
            self, messages: Sequence[OutboundMessage]
        ) -> list[SendResult | ProviderError]:
            if not self.batches:
                mine = {m.row for m in messages}
                await until(lambda: bool(sending_rows(store) - mine))
                late.update(sorted(sending_rows(store) - mine)[:take])
                opt_out(sorted(late))
                await ticks.two_more()
            return await super().send_batch(messages)

    return Slow(batch_size=5), late


def test_an_opt_out_while_a_batch_waits_for_the_providers_slot_is_honoured(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    """The same for a batch: its intents are committed, it waits for the slot the first batch
    holds, an opt-out for one of its rows is polled meanwhile: that row must not go."""
    ticks = Ticks()

    def opt_out(rows: list[int]) -> None:
        for row in rows:
            suppress(store_path, phone(row))

    provider, late = first_batch_holds_the_slot(store_path, ticks, opt_out)
    run(one_slot(make_campaign, 20), store_path, provider, ticks, chunk_size=5)
    assert late
    assert not late & {m.row for m in provider.accepted}
    final = states(store_path)
    assert {final[row] for row in late} == {"suppressed"}
    assert len(provider.accepted) == 20 - len(late)


def test_a_failing_progress_display_does_not_stop_the_opt_out_poll(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    """The ticker both polls opt-outs and reports progress: a display that raises (stderr gone
    away) must not take the poll with it, silently, for the rest of the run."""
    polls = 0
    real_fetch = Policy.fetch_updates

    def counting_fetch(self: Policy) -> Any:
        nonlocal polls
        polls += 1
        return real_fetch(self)

    def display(progress: Progress) -> None:
        raise BrokenPipeError(32, "Broken pipe")

    async def two_more_polls() -> None:
        target = polls + 2
        await until(lambda: polls >= target)

    class Slow(FakeProvider):
        async def send(self, message: OutboundMessage) -> SendResult:
            if message.row == 1:
                await two_more_polls()  # the display has failed by now
                suppress(store_path, phone(2))
                await two_more_polls()
            return await super().send(message)

    campaign = make_campaign(people(2), limits={"concurrency": 1})
    provider = Slow()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Policy, "fetch_updates", counting_fetch)
        report = run(campaign, store_path, provider, display)
    assert [m.row for m in provider.accepted] == [1]
    assert states(store_path) == {1: "sent", 2: "suppressed"}
    assert report.exit_code == ExitCode.OK
    assert any("progress" in w for w in report.warnings)


def test_an_opt_out_poll_that_fails_stops_the_run(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    """Opt-outs that cannot be read can no longer be honoured: the run stops (exit 1, the rest
    left pending for a resume), instead of sending on without the poll."""
    runner_aborted = False
    # The poll fails once row 1 is with the provider, not before: on a loaded machine the first
    # poll came first, and the run stopped before it had sent anything.
    sending = False
    real_fail_run = Runner._fail_run
    real_fetch = Policy.fetch_updates

    def failing_fetch(self: Policy) -> Any:
        if not sending:
            return real_fetch(self)
        raise sqlite3.OperationalError("disk I/O error")

    def fail_run(self: Runner, abort: Any) -> None:
        nonlocal runner_aborted
        runner_aborted = True
        real_fail_run(self, abort)

    class Slow(FakeProvider):
        async def send(self, message: OutboundMessage) -> SendResult:
            nonlocal sending
            if message.row == 1:
                sending = True
                await until(lambda: runner_aborted)
            return await super().send(message)

    campaign = make_campaign(people(3), limits={"concurrency": 1})
    provider = Slow()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Policy, "fetch_updates", failing_fetch)
        patch.setattr(Runner, "_fail_run", fail_run)
        report = run(campaign, store_path, provider)
    assert report.exit_code == ExitCode.INTERNAL
    assert "disk I/O error" in (report.error or "")
    assert [m.row for m in provider.accepted] == [1]
    assert states(store_path) == {1: "sent", 2: "pending", 3: "pending"}


def test_an_opt_out_before_the_retry_of_an_ambiguous_send_keeps_its_cost(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    """The first attempt timed out after the request was written (it may have been delivered,
    and charged); the provider deduplicates, so it would be retried with the same key. The
    opt-out polled before the retry stops the retry, and the row is refused, as a resume would
    refuse it; but what the first attempt may have cost stays spent (it was lost: the spend
    cap of a resume would then allow more than the cap)."""
    ticks = Ticks()

    class Doubtful(FakeProvider):
        async def send(self, message: OutboundMessage) -> SendResult:
            if message.row == 1 and len(self.history) == 0:
                self.history.append(message)
                suppress(store_path, phone(1))
                await ticks.two_more()
                raise InDoubtError("read timed out", code="timeout")
            return await super().send(message)

    campaign = make_campaign(
        people(2), limits={"concurrency": 1},
        providers={"box": {"type": "outbox", "dir": "outbox", "price_per_message": "0.05"}},
    )
    provider = Doubtful(deduplicates=True)
    report = run(campaign, store_path, provider, ticks)
    assert [m.row for m in provider.history] == [1, 2]
    assert states(store_path) == {1: "suppressed", 2: "sent"}
    assert report.spend_micros == 100_000  # row 2, and row 1's attempt that may have arrived


def test_progress_counts_a_refused_resend_once(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    """A row in doubt from an earlier session, suppressed since, is refused when the run resumes:
    it leaves `in_doubt`, not `pending`. Counted as leaving `pending`, it stayed among the
    failed (in doubt) and was added to the skipped: progress said 3 of 2 done."""
    campaign = make_campaign(people(2), limits={"concurrency": 1},
                             compliance={"consent": "not_required", "in_doubt": "resend"})
    first = FakeProvider()
    first.enqueue(InDoubtError("read timed out", code="timeout"))
    run(campaign, store_path, first, Ticks(), limit=1)
    assert states(store_path) == {1: "in_doubt"}
    suppress(store_path, phone(1))

    seen: list[Progress] = []
    ticks = Ticks()

    def display(progress: Progress) -> None:
        ticks(progress)
        seen.append(progress)

    class Slow(FakeProvider):
        async def send(self, message: OutboundMessage) -> SendResult:
            await ticks.two_more()  # row 1 was refused before row 2 was queued
            return await super().send(message)

    loaded = load_campaign(campaign, {})
    run_campaign(loaded, store_path, SendOptions(poll_interval=0.01), clock=FakeClock(),
                 registry=fake_registry(Slow()), on_progress=display)
    assert states(store_path) == {1: "suppressed", 2: "sent"}
    assert (1, 1, 0, 2) in [(p.done, p.skipped, p.failed, p.total) for p in seen]
    last = seen[-1]  # the run's final counts
    assert (last.done, last.skipped, last.failed, last.total) == (2, 1, 0, 2)


# -- more opt-outs during a run than the policy holds ------------------------------------------


def opt_outs(store: Path, rows: Sequence[int], channel: str = "sms") -> None:
    """One import of opt-outs for these recipients' numbers (one transaction, as `import`)."""
    conn = sqlite3.connect(store, isolation_level=None)
    try:
        add_suppressions(conn, [(normalize_phone(phone(i)), channel) for i in rows], "import",
                         "import:list.csv", "2026-01-01")
    finally:
        conn.close()


def consents(store: Path, rows: Sequence[int], status: str, at: str) -> None:
    conn = sqlite3.connect(store, isolation_level=None)
    try:
        record_consents(conn, [(normalize_phone(phone(i)), "sms") for i in rows], "marketing",
                        status, "import:list.csv", at, "2026-01-02T00:00:00Z")
    finally:
        conn.close()


@pytest.fixture
def make_policy(store_path: Path) -> Iterator[Callable[..., Policy]]:
    """A Policy on its own connection to the store, closed when the test ends."""
    made: list[Policy] = []

    def make(**kwargs: Any) -> Policy:
        made.append(Policy(Store.open(store_path).conn, **kwargs))
        return made[-1]

    yield make
    for policy in made:
        policy.close()


def test_the_policy_holds_at_most_its_limit_of_late_opt_outs_then_asks_the_store(
    store_path: Path, make_policy: Callable[..., Policy]
) -> None:
    """A mid-run import of a million opt-outs would hold a million entries in the run: past its
    limit the policy lets go of them all (`overflowed`) and answers from the store instead,
    with the same refusals. A provider's opt-out (Twilio 21610) is kept in memory through it."""
    Store.open(store_path).close()
    policy = make_policy(consent_required=False, purpose="marketing",
                    late_limit=3)
    hashes = {i: address_hash(normalize_phone(phone(i))) for i in range(1, 8)}
    opt_outs(store_path, [1, 2, 3])
    policy.apply(policy.fetch_updates())
    assert not policy.overflowed
    assert policy.refused_now("sms", hashes[3]) == (State.SUPPRESSED, "suppressed during the run")

    policy.suppress_now(hashes[7], "sms")
    opt_outs(store_path, [4, 5])  # 5 in all: more than 3
    updates = policy.fetch_updates()
    assert updates.overflow and not updates.suppressions  # nothing read beyond the limit kept
    policy.apply(updates)
    assert policy.overflowed
    assert policy.refused_now("sms", hashes[1]) is None  # no longer held ...
    assert policy.refused_in_store("sms", [hashes[i] for i in range(1, 7)]) == {
        hashes[i]: (State.SUPPRESSED, "suppressed during the run") for i in range(1, 6)
    }  # ... but the store says it, for every one of them
    assert policy.refused_now("sms", hashes[7]) is not None  # the provider's, still held
    assert policy.fetch_updates() == Updates()  # and the poll reads nothing more


def test_a_large_import_of_grants_during_a_run_is_read_through_and_holds_nothing(
    store_path: Path, monkeypatch: pytest.MonkeyPatch, make_policy: Callable[..., Policy]
) -> None:
    """Consent records are read a page at a time; grants are not held. A revocation recorded
    after a large import of grants is found by the same poll, not pages (polls) later."""
    monkeypatch.setattr(policy_module, "CONSENT_PAGE", 4)
    Store.open(store_path).close()
    consents(store_path, [1], "granted", "2026-01-01T00:00:00Z")
    policy = make_policy(consent_required=True, purpose="marketing",
                    late_limit=3)
    consents(store_path, range(2, 20), "granted", "2026-01-01T00:00:00Z")
    consents(store_path, [1], "revoked", "2026-01-01T01:00:00Z")
    updates = policy.fetch_updates()
    assert not updates.overflow
    assert updates.revocations == [(address_hash(normalize_phone(phone(1))), "sms", "marketing")]
    policy.apply(updates)
    assert policy.refused_now("sms", address_hash(normalize_phone(phone(1)))) == (
        State.NO_CONSENT, "consent revoked during the run")
    consents(store_path, range(2, 6), "revoked", "2026-01-01T01:00:00Z")  # 5 held: past 3
    policy.apply(policy.fetch_updates())
    assert policy.overflowed
    assert set(policy.refused_in_store("sms", [address_hash(normalize_phone(phone(i)))
                                               for i in range(1, 8)]).values()) == {
        (State.NO_CONSENT, "consent revoked during the run")}


def test_opt_outs_past_the_limit_are_honoured_by_the_messages_not_yet_sent(
    make_campaign: CampaignFactory, store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One by one: while row 1 is being sent, an import of more opt-outs than the run holds
    arrives (rows 3 and 5 among them). Asked from the store before each send, they are
    honoured; the store was asked, and the run held none of them."""
    monkeypatch.setattr(policy_module, "LATE_LIMIT", 2)
    asked: list[int] = []
    real = Policy.refused_in_store

    def counting(self: Policy, channel: str, hashes: Sequence[str]) -> Any:
        asked.append(len(hashes))
        return real(self, channel, hashes)

    monkeypatch.setattr(Policy, "refused_in_store", counting)
    ticks = Ticks()

    class Slow(FakeProvider):
        async def send(self, message: OutboundMessage) -> SendResult:
            if message.row == 1:
                opt_outs(store_path, [3, 5, 101, 102, 103])
                await ticks.two_more()
            return await super().send(message)

    campaign = make_campaign(people(6), limits={"concurrency": 1})
    provider = Slow()
    report = run(campaign, store_path, provider, ticks)
    assert [m.row for m in provider.accepted] == [1, 2, 4, 6]
    assert states(store_path) == {1: "sent", 2: "sent", 3: "suppressed", 4: "sent",
                                  5: "suppressed", 6: "sent"}
    assert {r["reason"] for r in journal(store_path) if r["row"] in (3, 5)} == {
        "suppressed during the run"}
    assert asked and report.exit_code == ExitCode.OK


def test_opt_outs_past_the_limit_are_honoured_by_a_batch_waiting_for_its_slot(
    make_campaign: CampaignFactory, store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batch path: a batch with its intents committed waits for the slot; an import of more
    opt-outs than the run holds covers some of its rows. They do not go."""
    monkeypatch.setattr(policy_module, "LATE_LIMIT", 2)
    ticks = Ticks()
    provider, late = first_batch_holds_the_slot(
        store_path, ticks, lambda rows: opt_outs(store_path, [*rows, 101, 102, 103]), take=2)
    run(one_slot(make_campaign, 20), store_path, provider, ticks, chunk_size=5)
    assert len(late) == 2
    assert not late & {m.row for m in provider.accepted}
    final = states(store_path)
    assert {final[row] for row in late} == {"suppressed"}
    assert len(provider.accepted) == 18


def store_cannot_answer_past_a_limit_of_two(monkeypatch: pytest.MonkeyPatch) -> None:
    """The policy holds 2 late opt-outs; past them, asking the store fails."""
    monkeypatch.setattr(policy_module, "LATE_LIMIT", 2)

    def broken(self: Policy, channel: str, hashes: Sequence[str]) -> Any:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(Policy, "refused_in_store", broken)


def test_a_store_that_cannot_answer_the_opt_out_check_leaves_the_message_pending(
    make_campaign: CampaignFactory, store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the limit the store is asked right before each send, after the intent is committed.
    When it cannot answer, opt-outs can no longer be honoured and the run stops (exit 1), as
    when the poll fails; the message that was asked about never left: it is `pending` for the
    resume, not `in_doubt` (which a marketing campaign would never send again)."""
    store_cannot_answer_past_a_limit_of_two(monkeypatch)
    ticks = Ticks()

    class Slow(FakeProvider):
        async def send(self, message: OutboundMessage) -> SendResult:
            if message.row == 1:
                opt_outs(store_path, [101, 102, 103])
                await ticks.two_more()
            return await super().send(message)

    provider = Slow()
    report = run(make_campaign(people(3), limits={"concurrency": 1}), store_path, provider,
                 ticks)
    assert [m.row for m in provider.accepted] == [1]
    assert report.exit_code == ExitCode.INTERNAL
    assert states(store_path)[2] == "pending"
    assert "in_doubt" not in report.counts


def test_a_store_that_cannot_answer_for_a_batch_leaves_its_messages_pending(
    make_campaign: CampaignFactory, store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batch path: the store check for a batch whose intents are committed fails. None of
    them left: pending, not in doubt."""
    store_cannot_answer_past_a_limit_of_two(monkeypatch)
    ticks = Ticks()

    class Slow(FakeBatchProvider):
        async def send_batch(
            self, messages: Sequence[OutboundMessage]
        ) -> list[SendResult | ProviderError]:
            if not self.batches:
                opt_outs(store_path, [101, 102, 103])
                await ticks.two_more()
            return await super().send_batch(messages)

    provider = Slow(batch_size=5)
    report = run(one_slot(make_campaign, 20), store_path, provider, ticks, chunk_size=5)
    assert report.exit_code == ExitCode.INTERNAL
    assert len(provider.accepted) == 5
    assert "in_doubt" not in report.counts
    assert set(states(store_path).values()) == {"sent", "pending"}


def test_a_stop_while_the_store_is_asked_keeps_the_message_from_leaving(
    make_campaign: CampaignFactory, store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C arrives while a message waits for the store's answer (past the limit): the stop
    is seen after the answer, as after any other wait; the message does not leave, and stays
    pending for the resume."""
    from campaign_cli.pipeline import StopController

    monkeypatch.setattr(policy_module, "LATE_LIMIT", 2)
    stop = StopController()
    real = Policy.refused_in_store

    def stopping(self: Policy, channel: str, hashes: Sequence[str]) -> Any:
        loop.call_soon_threadsafe(stop.request)  # runs before the answer is taken
        return real(self, channel, hashes)

    monkeypatch.setattr(Policy, "refused_in_store", stopping)
    ticks = Ticks()
    loop: asyncio.AbstractEventLoop

    class Slow(FakeProvider):
        async def send(self, message: OutboundMessage) -> SendResult:
            nonlocal loop
            if message.row == 1:
                loop = asyncio.get_running_loop()
                opt_outs(store_path, [101, 102, 103])
                await ticks.two_more()
            return await super().send(message)

    provider = Slow()
    loaded = load_campaign(make_campaign(people(3), limits={"concurrency": 1}), {})
    report = run_campaign(loaded, store_path, SendOptions(poll_interval=0.01), clock=FakeClock(),
                          registry=fake_registry(provider), on_progress=ticks, stop=stop)
    assert [m.row for m in provider.accepted] == [1]
    assert report.exit_code == ExitCode.INTERRUPTED
    assert states(store_path)[2] == "pending"


def test_provider_opt_outs_past_the_limit_do_not_make_the_poll_read_everything(
    store_path: Path, monkeypatch: pytest.MonkeyPatch, make_policy: Callable[..., Policy]
) -> None:
    """The poll reads at most one opt-out more than it has room for. Opt-outs from providers
    (Twilio 21610) are held beyond the limit: with two more than it, the room was -2, the query
    asked for LIMIT -1, which SQLite takes for no limit - a million-row import read whole."""
    Store.open(store_path).close()
    policy = make_policy(consent_required=False, purpose="marketing",
                    late_limit=2)
    opt_outs(store_path, [1, 2])
    policy.apply(policy.fetch_updates())
    assert not policy.overflowed
    for i in (8, 9):
        policy.suppress_now(address_hash(normalize_phone(phone(i))), "sms")
    read: list[int] = []
    real = policy_module.suppressions_since

    def counting(conn: sqlite3.Connection, mark: int, limit: int = -1) -> Any:
        found = real(conn, mark, limit)
        read.append(len(found[1]))
        return found

    monkeypatch.setattr(policy_module, "suppressions_since", counting)
    opt_outs(store_path, range(10, 60))
    updates = policy.fetch_updates()
    assert updates.overflow
    assert read and max(read) <= 1


class _Watched:
    """A connection whose `close` is seen: everything else is the real connection's."""

    def __init__(self, conn: sqlite3.Connection, closing: threading.Event) -> None:
        self._real = conn
        self._closing = closing

    def close(self) -> None:
        self._closing.set()
        self._real.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def test_a_cancelled_run_closes_the_policy_connection_only_after_its_thread_is_done(
    make_campaign: CampaignFactory, store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run cancelled (a library user's Ctrl-C: asyncio.run cancels its task) while a policy
    thread checked a chunk closed the policy's connection under that thread, which went on using
    it: "Cannot operate on a closed database" at best, a crashed interpreter at worst (seen: a
    segfault in `suppressed_among` during a preview). The connection now closes once the thread
    is done with it."""
    import campaign_cli.pipeline as pipeline_module

    closing = threading.Event()  # someone asked to close the policy's connection
    entered = threading.Event()
    cancelled = threading.Event()
    failures: list[BaseException] = []
    real_suppressed_among = policy_module.suppressed_among

    def slow_suppressed_among(conn: Any, hashes: Sequence[str], channel: str) -> set[str]:
        if not entered.is_set():
            entered.set()
            # Goes on using the connection once the run is cancelled, as its cleanup starts.
            # (It waited for the close itself: but the cleanup waits for the admissions in
            # flight, this check among them, before it closes the policy, so the wait ran out
            # after 60 s, unrecorded, and the test passed on that.)
            if not cancelled.wait(60):
                failures.append(AssertionError("the run was never cancelled"))
        try:
            return real_suppressed_among(conn, hashes, channel)
        except BaseException as exc:
            failures.append(exc)
            raise

    class WatchedPolicy(Policy):
        def __init__(self, conn: sqlite3.Connection, **kwargs: Any) -> None:
            super().__init__(_Watched(conn, closing), **kwargs)  # type: ignore[arg-type]

        def close(self) -> None:
            closing.set()  # asked: the thread may go on, and the close waits for it
            super().close()

    monkeypatch.setattr(policy_module, "suppressed_among", slow_suppressed_among)
    monkeypatch.setattr(pipeline_module, "Policy", WatchedPolicy)
    loaded = load_campaign(make_campaign(people(30)), {})

    async def scenario() -> None:
        runner = Runner(loaded, store_path, SendOptions(reader="inline", chunk_size=10),
                        clock=FakeClock(), registry=fake_registry(FakeProvider()),
                        stop=pipeline_module.StopController())
        task = asyncio.create_task(runner.execute())
        assert await asyncio.to_thread(entered.wait, 60)
        task.cancel()
        cancelled.set()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert closing.is_set()
    assert failures == []


def test_a_run_whose_journal_cannot_start_closes_the_policy_connection(
    make_campaign: CampaignFactory, store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The journal writer failing to open the store (a full disk, a vanished file) ended the
    run with the policy's connection left open for the garbage collector (a ResourceWarning on
    Python 3.13, a file descriptor held by a library user's process)."""
    import campaign_cli.pipeline as pipeline_module
    from campaign_cli.errors import StoreError
    from campaign_cli.store.journal import JournalWriter

    closing = threading.Event()

    class WatchedPolicy(Policy):
        def __init__(self, conn: sqlite3.Connection, **kwargs: Any) -> None:
            super().__init__(_Watched(conn, closing), **kwargs)  # type: ignore[arg-type]

    def cannot_start(self: JournalWriter) -> JournalWriter:
        raise StoreError("journal writer could not open the store: disk I/O error")

    monkeypatch.setattr(pipeline_module, "Policy", WatchedPolicy)
    monkeypatch.setattr(JournalWriter, "start", cannot_start)
    with pytest.raises(StoreError, match="disk I/O error"):
        run_campaign(load_campaign(make_campaign(people(3)), {}), store_path,
                     SendOptions(run_key="k"), clock=FakeClock(),
                     registry=fake_registry(FakeProvider()))
    assert closing.is_set()
