"""Run-level invariants under random faults, across several sessions of one run (DESIGN.md
sections 4-5): a seeded-random harness driven by hypothesis, in process, with fake providers, a
fake clock and a real store.

Each example is one run of a small campaign (SMS, or SMS and webhook) through a few sessions with
random provider answers per attempt, stops (before the start, graceful, immediate, or with no
grace) at random sends, spend caps (file or --max-spend), --limit, --retry-failed, failover or a
batch provider, deduplicating providers or not, marketing or transactional with either in-doubt
policy, and a provider whose refusals mean its configuration; then one clean session with
healthy providers and no cap. After every session the
journal, the report and what the fake providers saw must agree with what the design promises.
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
import tempfile
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from campaign_cli.config import load_campaign
from campaign_cli.errors import (
    InDoubtError,
    PermanentError,
    ProviderAuthError,
    RateLimitedError,
    StoppedBeforeStart,
    TransientError,
)
from campaign_cli.models import OutboundMessage, SendResult, State
from campaign_cli.pipeline import RunReport, SendOptions, StopController, run_campaign
from campaign_cli.providers.base import ProviderRegistry
from campaign_cli.testing import FakeBatchProvider, FakeClock, FakeProvider
from tests.conftest import CampaignFactory, people

#: Micro-units per message: SMS (one segment) pay per segment and per message, webhooks per message.
PRICES = {("primary", "sms"): 11_000, ("secondary", "sms"): 22_000,
          ("primary", "webhook"): 1_000, ("secondary", "webhook"): 2_000}
STATES = {s.value for s in State}
#: What an answer means for whether the message may have arrived.
DELIVERED, MAYBE, NOT = "delivered", "maybe", "not"


@dataclass
class Event:
    session: int
    provider: str
    row: tuple[int, str]  # (record, channel): one journal row
    key: str
    was: str  # the row's journal state when the session started
    arrival: str = MAYBE  # cut off before an answer: the message may have arrived
    refused: bool = False  # a definite refusal (PermanentError)


@dataclass
class World:
    """What the providers saw, and the knobs of the session that is running."""

    rng: random.Random
    stop: StopController = field(default_factory=StopController)
    events: list[Event] = field(default_factory=list)
    session: int = 0
    calls: int = 0
    stop_at: tuple[int, ...] = ()
    weights: dict[str, int] = field(default_factory=dict)
    healthy: bool = False
    start_states: dict[tuple[int, str], str] = field(default_factory=dict)
    cut_off: set[int] = field(default_factory=set)  # sessions stopped at once (second request)

    def outcome(self) -> SendResult | BaseException | None:
        self.calls += 1
        for at in self.stop_at:
            if self.calls == at:
                self.stop.request()
        if self.healthy:
            return None
        kind = self.rng.choices(list(self.weights), weights=list(self.weights.values()))[0]
        return {
            "ok": None,
            "transient": TransientError("503 busy", status=503),
            "rate_limited": RateLimitedError("429", status=429),
            "in_doubt": InDoubtError("timed out after the request was written"),
            "permanent": PermanentError("refused", code="21211", status=400),
            "invalid": PermanentError("not a number", code="21614", status=400,
                                      action="invalid"),
            "suppress": PermanentError("opted out", code="21610", status=400,
                                       action="suppress"),
            "auth": ProviderAuthError("bad credentials", status=401),
        }[kind]


async def scripted_send(provider: FakeProvider, world: World,
                        message: OutboundMessage) -> SendResult:
    row = (message.row, message.channel.value)
    event = Event(world.session, provider.name, row, message.idempotency_key,
                  world.start_states.get(row, "new"))
    world.events.append(event)
    provider.history.append(message)
    outcome = world.outcome()
    # A request takes time: an immediate stop may cut it off here (it may have arrived).
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    if isinstance(outcome, InDoubtError):
        event.arrival = MAYBE
        raise outcome
    if isinstance(outcome, BaseException):
        event.arrival = NOT
        event.refused = isinstance(outcome, PermanentError)
        raise outcome
    event.arrival = DELIVERED
    provider.accepted.append(message)
    return outcome or SendResult(provider_message_id=f"{provider.name}-{len(provider.accepted)}")


class ScriptedProvider(FakeProvider):
    world: World
    refusals_mean_config = False

    async def send(self, message: OutboundMessage) -> SendResult:
        return await scripted_send(self, self.world, message)


class ScriptedBatchProvider(FakeBatchProvider):
    world: World
    refusals_mean_config = False

    async def send(self, message: OutboundMessage) -> SendResult:
        return await scripted_send(self, self.world, message)


@dataclass
class Plan:
    rows: int
    channels: tuple[str, ...]
    failover: bool
    batch: bool
    dedupe: dict[str, bool]
    purpose: str
    in_doubt: str | None
    concurrency: int
    attempts: int
    threshold: int
    guard: bool  # the primary's refusals mean its configuration (SAME_REFUSALS in a row: exit 6)
    sessions: list[dict[str, Any]]


def make_plan(rng: random.Random) -> Plan:
    failover = rng.random() < 0.5
    sessions = []
    for _ in range(rng.randint(1, 4)):
        weights = {k: rng.choice([0, 0, 1, 3]) for k in (
            "transient", "in_doubt", "permanent", "invalid", "suppress")}
        # (rarely: a 429 slows the provider's bucket, which paces on the loop's time, not the
        # fake clock, and the harness must stay fast)
        weights["rate_limited"] = 1 if rng.random() < 0.1 else 0
        weights["ok"] = rng.randint(1, 6)
        weights["auth"] = rng.choice([0, 0, 0, 1])
        if rng.random() < 0.2:  # a provider that refuses everything (a wrong sender id)
            weights = {"permanent": 1}
        stops: tuple[int, ...] = ()
        if rng.random() < 0.05:
            stops = (0,)  # asked to stop before the session starts (a signal during the scan)
        elif rng.random() < 0.6:
            first = rng.randint(1, 8)
            stops = (first,) if rng.random() < 0.5 else (first, first + rng.randint(0, 3))
        cap = None
        if rng.random() < 0.4:
            cap = Decimal(rng.randint(0, 12) * 10_000) / 1_000_000
        sessions.append({
            "weights": weights,
            "stops": stops,
            "cap": cap,
            "cap_in_file": rng.random() < 0.5,
            "limit": rng.randint(1, 10) if rng.random() < 0.3 else None,
            "retry_failed": rng.random() < 0.3,
            "grace": rng.choice([5.0, 5.0, 0.0]),
        })
    return Plan(
        rows=rng.randint(1, 6) if rng.random() < 0.5 else rng.randint(10, 14),
        channels=("sms", "webhook") if rng.random() < 0.3 else ("sms",),
        failover=failover,
        batch=not failover and rng.random() < 0.5,
        dedupe={"primary": rng.random() < 0.5, "secondary": rng.random() < 0.5},
        purpose=rng.choice(["marketing", "transactional"]),
        in_doubt=rng.choice([None, "resend", "skip"]),
        concurrency=rng.randint(1, 4),
        attempts=rng.randint(1, 3),
        threshold=rng.randint(1, 3),
        guard=rng.random() < 0.3,
        sessions=sessions,
    )


def write_campaign(make: CampaignFactory, plan: Plan, cap: Decimal | None) -> Path:
    retry = {"attempts": plan.attempts, "backoff": 0.5, "max_backoff": 2}
    providers = {"primary": {"type": "outbox", "dir": "outbox", "price_per_segment": "0.01",
                             "price_per_message": "0.001", "retry": retry}}
    names: str | list[str] = "primary"
    if plan.failover:
        providers["secondary"] = {"type": "console", "price_per_segment": "0.02",
                                  "price_per_message": "0.002", "retry": retry}
        names = ["primary", "secondary"]
    limits: dict[str, Any] = {"concurrency": plan.concurrency,
                              "circuit_breaker": {"threshold": plan.threshold, "cooldown": 5}}
    if cap is not None:
        limits["max_spend"] = str(cap)
    compliance: dict[str, Any] = {"consent": "not_required"}
    if plan.in_doubt is not None:
        compliance["in_doubt"] = plan.in_doubt
    return make(people(plan.rows), purpose=plan.purpose,
                channels={c: {"provider": names, "body": "Code {{ row }}"}
                          for c in plan.channels},
                providers=providers, limits=limits, compliance=compliance)


def journal_rows(store: Path) -> dict[tuple[int, str], dict[str, Any]]:
    conn = sqlite3.connect(store)
    conn.row_factory = sqlite3.Row
    try:
        return {(r["row"], r["channel"]): dict(r) for r in conn.execute("SELECT * FROM messages")}
    finally:
        conn.close()


def committed(rows: dict[tuple[int, str], dict[str, Any]]) -> int:
    charged = {"sent", "delivered", "undelivered", "bounced", "sending", "in_doubt"}
    return sum((r["cost_micros"] or 0) * (r["state"] in charged) + r["doubt_micros"]
               for r in rows.values())


def check_session(plan: Plan, world: World, report: RunReport,
                  rows: dict[tuple[int, str], dict[str, Any]],
                  spend_before: int, final: bool, limit: int | None) -> None:
    expected = plan.rows if limit is None else min(plan.rows, limit)
    start_in_doubt = sum(1 for s in world.start_states.values() if s == "in_doubt")
    resend_policy = (plan.in_doubt or ("skip" if plan.purpose == "marketing" else "resend"))
    # Every journaled row in exactly one known state; none left `sending`.
    for r in rows.values():
        assert r["state"] in STATES, r
        assert r["state"] != "sending", r
    # The report counts what the journal holds, and the counts add up.
    counted: dict[str, int] = {}
    for r in rows.values():
        counted[r["state"]] = counted.get(r["state"], 0) + 1
    assert report.counts == counted
    assert sum(report.counts.values()) == len(rows) <= plan.rows * len(plan.channels)
    assert report.spend_micros == committed(rows)

    # What the providers saw, per row.
    by_row: dict[tuple[int, str], list[Event]] = {}
    for e in world.events:
        by_row.setdefault(e.row, []).append(e)
    for events in by_row.values():
        # A deduplicating provider that refuses a retry with the same key outright did not take
        # the earlier, unanswered copy either (it would have answered with that one's result).
        for i, e in enumerate(events):
            if e.refused and plan.dedupe[e.provider]:
                for earlier in events[:i]:
                    if earlier.provider == e.provider and earlier.key == e.key:
                        earlier.arrival = NOT
    for row, events in by_row.items():
        state = rows[row]["state"]
        # An accepted message is journaled `sent`, by the provider that took it.
        if events[-1].arrival == DELIVERED:
            # (unless its batch was cut off by an immediate stop: which of it left is unknown,
            # so to the pipeline it is in doubt, as a message cut off in flight)
            cut = plan.batch and events[-1].session in world.cut_off
            if cut and state == "in_doubt" and events[-1].session == world.session:
                events[-1].arrival = MAYBE
            assert state == "sent" or events[-1].arrival == MAYBE, (row, events, rows[row])
            assert rows[row]["provider"] == events[-1].provider
        arrived = [e for e in events if e.arrival != NOT]
        # Never by two providers once one of them may have it.
        assert len({e.provider for e in arrived}) <= 1, (row, events)
        for i, e in enumerate(arrived[1:], 1):
            earlier = arrived[i - 1]
            if plan.dedupe[e.provider] and e.key == earlier.key:
                continue  # the provider drops a second copy with the same key
            # A second copy only as an in-doubt resend the policy allowed, in a later session.
            assert earlier.arrival == MAYBE, (row, events)
            assert resend_policy == "resend", (row, events)
            assert e.session > earlier.session, (row, events)
            assert e.was == "in_doubt", (row, events)  # (and so reported: in_doubt_resent)
        if state == "sent":
            assert any(e.arrival == DELIVERED for e in events), (row, events)
        # A message that may have arrived is never `pending` again (it could be sent twice, or
        # fail over): it is sent or in doubt, unless a later answer refused it outright.
        if arrived and not events[-1].refused:
            assert state in ("sent", "in_doubt"), (row, events, rows[row])
        # Money: what may have been charged is never more than the journal's committed spend.
    possible = 0
    for row, events in by_row.items():
        charged: set[tuple[str, str]] = set()
        for e in events:
            if e.arrival == NOT:
                continue
            if plan.dedupe[e.provider]:
                if (e.provider, e.key) in charged:
                    continue
                charged.add((e.provider, e.key))
            possible += PRICES[e.provider, e.row[1]]
        _ = row
    assert possible <= report.spend_micros, (possible, report.spend_micros)
    # This session's reported resends cover every second copy it sent.
    resent = sum(
        1 for row, events in by_row.items()
        if rows[row]["state"] == "sent" and events[-1].session == world.session
        and events[-1].arrival == DELIVERED and events[-1].was == "in_doubt"
    )
    assert report.in_doubt_resent == resent
    # The cap in force is never exceeded by what this session committed.
    if report.max_spend_micros is not None:
        assert report.spend_micros <= max(report.max_spend_micros, spend_before)
    # The exit code says what happened (DESIGN.md section 5).
    # (rows past --limit may be pending from an earlier session without it)
    pending = sum(1 for r in rows.values() if r["state"] == "pending" and r["row"] <= expected)
    pending += sum(1 for row in range(1, expected + 1) for channel in plan.channels
                   if (row, channel) not in rows)
    if report.exit_code in (0, 4):
        assert not pending and not report.stopped, (report.exit_code, counted, expected)
        assert (report.exit_code == 4) == bool(
            counted.get("failed") or counted.get("render_failed")), report
    if report.exit_code == 3:
        assert report.max_spend_micros is not None
    assert report.in_doubt_found == start_in_doubt
    if final:
        for r in rows.values():
            assert r["state"] not in ("pending", "sending"), r
            if r["state"] == "in_doubt":
                assert resend_policy == "skip" and not plan.dedupe[r["provider"]], r
        assert len(rows) == plan.rows * len(plan.channels)


def run_plan(plan: Plan, seed: int, root: Path) -> None:
    make = CampaignFactory(root)
    store = root / "store.db"
    world = World(random.Random(seed))
    clock = FakeClock()
    providers: dict[str, ScriptedProvider | ScriptedBatchProvider] = {}
    if plan.batch:
        providers["primary"] = ScriptedBatchProvider("primary", batch_size=3,
                                                     deduplicates=plan.dedupe["primary"])
    else:
        providers["primary"] = ScriptedProvider("primary", deduplicates=plan.dedupe["primary"])
    providers["secondary"] = ScriptedProvider("secondary", deduplicates=plan.dedupe["secondary"])
    for p in providers.values():
        p.world = world
    providers["primary"].refusals_mean_config = plan.guard
    registry = ProviderRegistry()
    registry.register("outbox", lambda name, config, context: providers["primary"])
    registry.register("console", lambda name, config, context: providers["secondary"])

    final = {"weights": {}, "stops": (), "cap": Decimal(1000), "cap_in_file": False,
             "limit": None, "retry_failed": False, "grace": 5.0, "healthy": True}
    recorded = False  # a session recorded the run (one stopped before its start does not)
    for number, session in enumerate([*plan.sessions, final], 1):
        world.session = number
        world.calls = 0
        world.stop = StopController()
        world.stop_at = session["stops"]
        if 0 in world.stop_at:
            world.stop.request()
        world.weights = session["weights"]
        world.healthy = bool(session.get("healthy"))
        before = journal_rows(store) if store.exists() else {}
        world.start_states = {row: r["state"] for row, r in before.items()}
        in_file = session["cap"] if session["cap_in_file"] else None
        campaign = write_campaign(make, plan, in_file)
        options = SendOptions(
            limit=session["limit"], max_spend=None if session["cap_in_file"] else session["cap"],
            retry_failed=session["retry_failed"] and recorded, grace_seconds=session["grace"],
            reader="inline",
        )
        if 0 in world.stop_at:
            # A stop before the session starts ends the command there: nothing is sent or
            # recorded (exit 130), and the journal is as the last session left it.
            with pytest.raises(StoppedBeforeStart):
                run_campaign(load_campaign(campaign, {}), store, options, clock=clock,
                             registry=registry, stop=world.stop,
                             rng=random.Random(seed + number))
            assert (journal_rows(store) if store.exists() else {}) == before
            continue
        report = run_campaign(load_campaign(campaign, {}), store, options, clock=clock,
                              registry=registry, stop=world.stop,
                              rng=random.Random(seed + number))
        recorded = True
        if world.stop.requests >= 2 or (world.stop.requests and not session["grace"]):
            world.cut_off.add(number)
        check_session(plan, world, report, journal_rows(store), committed(before),
                      final=session is final, limit=session["limit"])


@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(min_value=0, max_value=2**32 - 1))
def test_run_invariants_hold_across_sessions_under_random_faults(seed: int) -> None:
    rng = random.Random(seed)
    plan = make_plan(rng)
    with tempfile.TemporaryDirectory(prefix="campaign-invariants-") as tmp:
        run_plan(plan, seed, Path(tmp))
