"""Parity of the HTTP process: the same campaign, against the same faults of the fake provider
server, run once with its HTTP exchanges in the child process (`SendOptions(http_process=True)`,
the default) and once in the run's own process (`http_process=False`), each on its own fresh
store and fake server. What an operator sees must be the same: the journal's final states and
reasons, every attempt's outcome, status, error code and error text, the exit code and the
summary's counts, the suppressions the run added, and what reached the providers.

Each run has a `FakeClock` (backoff and Retry-After waits take no real time) and, where the
order of sends decides what happens (faults taken in turn, a breaker, the refusal guard), one
worker, so both runs meet the same faults in the same order.
"""

from __future__ import annotations

import json
import random
import sqlite3
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from campaign_cli.config import load_campaign
from campaign_cli.pipeline import SendOptions, run_campaign
from campaign_cli.testing import FakeClock
from tests.conftest import CampaignFactory, people
from tests.fakeserver import FakeProviderServer

#: Retries that take no real time (the clock is fake) but are many enough to ride out a fault.
FAST_RETRY = {"attempts": 4, "backoff": 0.01, "max_backoff": 0.05}

Servers = Callable[..., FakeProviderServer]
Scenario = Callable[[Servers, Path], dict[str, Any]]


@dataclass
class Seen:
    """What an operator sees of one run (nothing that legitimately differs: ids, times)."""

    report: dict[str, Any]
    run: tuple[Any, ...]
    messages: list[tuple[Any, ...]]
    attempts: list[tuple[Any, ...]]
    suppressions: list[tuple[Any, ...]]
    requests: list[Counter[tuple[Any, ...]]]
    accepted: list[dict[str, Counter[str]]]
    duplicates: list[dict[str, list[str]]]


def _rows(store: Path, sql: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(store)
    try:
        return list(conn.execute(sql))
    finally:
        conn.close()


def observe(root: Path, scenario: Scenario, *, http_process: bool) -> Seen:
    root.mkdir()
    servers: list[FakeProviderServer] = []

    def make(**kwargs: Any) -> FakeProviderServer:
        server = FakeProviderServer(**kwargs).start()
        servers.append(server)
        return server

    try:
        campaign = CampaignFactory(root)(**scenario(make, root))
        store = root / "store.db"
        report = run_campaign(load_campaign(campaign), store,
                              SendOptions(run_key="k", http_process=http_process),
                              clock=FakeClock(), rng=random.Random(7))
    finally:
        for server in servers:
            server.stop()
    for server in servers:
        assert not server.errors, "fake server bugs:\n" + "\n".join(server.errors)
    summary = report.to_json()
    return Seen(
        report={"exit_code": report.exit_code, "status": report.status,
                "stopped": report.stopped, "error": report.error,
                "counts": summary["counts"], "by_channel": summary["by_channel"],
                "in_doubt_found": report.in_doubt_found,
                "in_doubt_resent": report.in_doubt_resent,
                "warnings": report.warnings, "spend": summary["spend"]},
        run=_rows(store, "SELECT status, exit_code, last_error FROM runs")[0],
        messages=_rows(store, "SELECT row, channel, state, reason, detail, attempts, provider, "
                              "status_code, error_code, cost_micros, resent_in_doubt "
                              "FROM messages ORDER BY row, channel"),
        attempts=_rows(store, "SELECT row, channel, attempt, provider, outcome, status_code, "
                              "error_code, error_text, provider_message_id IS NULL "
                              "FROM attempts ORDER BY row, channel, attempt"),
        suppressions=_rows(store, "SELECT address, channel, reason, source FROM suppressions "
                                  "ORDER BY address, channel"),
        requests=[Counter((r.service, r.recipient, r.attempt, r.fault, r.status, r.outcome)
                          for r in s.requests) for s in servers],
        accepted=[{svc: s.accepted_counts(svc) for svc in
                   ("twilio", "sendgrid", "fcm", "slack", "webhook", "token")} for s in servers],
        duplicates=[{svc: s.duplicates(svc) for svc in ("webhook",)} for s in servers],
    )


def both(tmp_path: Path, scenario: Scenario) -> tuple[Seen, Seen]:
    """The scenario in process and through the HTTP process; asserts they look the same."""
    inline = observe(tmp_path / "inline", scenario, http_process=False)
    child = observe(tmp_path / "process", scenario, http_process=True)
    assert child.report == inline.report
    assert child.run == inline.run
    assert child.messages == inline.messages
    assert child.attempts == inline.attempts
    assert child.suppressions == inline.suppressions
    assert child.requests == inline.requests
    assert child.accepted == inline.accepted
    assert child.duplicates == inline.duplicates
    return inline, child


def sms(server: FakeProviderServer, rows: int = 4, **provider: Any) -> dict[str, Any]:
    return {
        "rows": people(rows),
        "channels": {"sms": {"provider": "tw", "body": "Code {{ row }}"}},
        "providers": {"tw": {**server.provider_config("twilio"), "retry": FAST_RETRY,
                             **provider}},
        "limits": {"concurrency": 1},
    }


# --------------------------------------------------------------------------------------------
# Twilio: rate limits, server errors, resets, refusals


@pytest.mark.parametrize("retry_after", ["1", "Thu, 01 Jan 2026 00:00:01 GMT"])
def test_a_429_with_retry_after_is_waited_out_the_same_way(
    tmp_path: Path, retry_after: str,
) -> None:
    def scenario(servers: Servers, root: Path) -> dict[str, Any]:
        server = servers()
        server.fail_next(1, f"429:{retry_after}")
        return sms(server)

    inline, _ = both(tmp_path, scenario)
    assert inline.report["counts"] == {"sent": 4}
    assert [a[4] for a in inline.attempts].count("rate_limited") == 1


def test_server_errors_then_success_are_retried_the_same_way(tmp_path: Path) -> None:
    def scenario(servers: Servers, root: Path) -> dict[str, Any]:
        server = servers()
        server.fail_for("+12012000001", "500", times=2)
        server.fail_for("+12012000003", "503:1", times=1)
        return sms(server)

    inline, _ = both(tmp_path, scenario)
    assert inline.report["counts"] == {"sent": 4}
    assert [a[4] for a in inline.attempts].count("transient") == 3


def test_a_connection_reset_is_in_doubt_the_same_way(tmp_path: Path) -> None:
    def scenario(servers: Servers, root: Path) -> dict[str, Any]:
        server = servers()
        server.fail_for("+12012000002", "reset", times=1)
        return sms(server)

    inline, _ = both(tmp_path, scenario)
    assert "in_doubt" in [a[4] for a in inline.attempts]


def test_seeded_transient_faults_end_the_same_way(tmp_path: Path) -> None:
    def scenario(servers: Servers, root: Path) -> dict[str, Any]:
        server = servers()
        server.fail_rate(0.4, ("429:0", "500", "503"), seed=11)
        return sms(server, rows=12)

    both(tmp_path, scenario)


def test_twilio_unsubscribed_and_invalid_numbers_end_the_same_way(tmp_path: Path) -> None:
    def scenario(servers: Servers, root: Path) -> dict[str, Any]:
        server = servers()
        server.fail_for("+12012000001", "twilio:21610")
        server.fail_for("+12012000003", "twilio:21211")
        return sms(server)

    inline, _ = both(tmp_path, scenario)
    assert len(inline.suppressions) == 1
    assert Counter(m[2] for m in inline.messages)["sent"] == 2


def test_a_refused_account_stops_the_run_the_same_way(tmp_path: Path) -> None:
    def scenario(servers: Servers, root: Path) -> dict[str, Any]:
        server = servers()
        server.fail_always("auth")
        return sms(server, rows=20)

    inline, _ = both(tmp_path, scenario)
    assert inline.report["exit_code"] == 6
    assert 0 < sum(inline.requests[0].values()) < 20


def test_a_withheld_answer_past_the_timeout_is_in_doubt_the_same_way(tmp_path: Path) -> None:
    def scenario(servers: Servers, root: Path) -> dict[str, Any]:
        server = servers()
        server.fail_for("+12012000002", "withhold", times=1)
        return sms(server, rows=3, timeout=0.3)

    inline, _ = both(tmp_path, scenario)
    assert "in_doubt" in [a[4] for a in inline.attempts]


# --------------------------------------------------------------------------------------------
# The other HTTP providers


def test_a_webhook_resends_a_withheld_message_with_the_same_key_the_same_way(
    tmp_path: Path,
) -> None:
    def scenario(servers: Servers, root: Path) -> dict[str, Any]:
        server = servers()
        server.fail_next(1, "withhold_after_accept", service="webhook")
        server.fail_next(1, "reset", service="webhook")
        return {
            "rows": people(3),
            "channels": {"webhook": {"provider": "hook", "body": '{"code": "{{ row }}"}'}},
            "providers": {"hook": {**server.provider_config("webhook"), "timeout": 0.3,
                                   "retry": FAST_RETRY}},
            "limits": {"concurrency": 1},
        }

    inline, _ = both(tmp_path, scenario)
    assert inline.report["counts"] == {"sent": 3}
    assert len(inline.duplicates[0]["webhook"]) == 1


def test_sendgrid_ends_the_same_way(tmp_path: Path) -> None:
    def scenario(servers: Servers, root: Path) -> dict[str, Any]:
        server = servers()
        server.fail_for("person2@example.com", "503", times=1)
        server.fail_for("person3@example.com", "429:1", times=1)
        (root / "body.txt").write_text("Hello {{ first_name }}\n", encoding="utf-8")
        return {
            "rows": people(4),
            "channels": {"email": {"provider": "sg", "from": "shop@example.com",
                                   "subject": "Hi", "text": "body.txt"}},
            "providers": {"sg": {**server.provider_config("sendgrid"), "retry": FAST_RETRY}},
            "limits": {"concurrency": 1},
        }

    inline, _ = both(tmp_path, scenario)
    assert inline.report["counts"] == {"sent": 4}


def test_slack_ends_the_same_way(tmp_path: Path) -> None:
    def scenario(servers: Servers, root: Path) -> dict[str, Any]:
        server = servers()
        server.fail_next(1, "429:1", service="slack")
        server.fail_next(1, "reset", service="slack")
        server.fail_next(1, "slack:invalid_payload", service="slack")
        return {
            "rows": people(4),
            "channels": {"webhook": {"provider": "chat", "body": "Hello {{ first_name }}"}},
            "providers": {"chat": {**server.provider_config("slack"), "retry": FAST_RETRY}},
            "limits": {"concurrency": 1},
        }

    both(tmp_path, scenario)


def _push(server: FakeProviderServer, root: Path, **provider: Any) -> dict[str, Any]:
    tokens = [[key, name, phone, f"dEvIcE-tOkEn_0123456789:{key}"]
              for key, name, phone, _ in people(4)]
    return {
        "rows": tokens,
        "channels": {"push": {"provider": "fcm", "title": "Hi", "body": "Hello {{ row }}"}},
        "providers": {"fcm": {**server.provider_config("fcm", **provider), "retry": FAST_RETRY}},
        "limits": {"concurrency": 1},
        "extra": {"recipients": {"file": "recipients.csv", "key": "id",
                                 "columns": {"push_token": "email"}}},
    }


def test_fcm_unregistered_tokens_are_pruned_the_same_way(tmp_path: Path) -> None:
    def scenario(servers: Servers, root: Path) -> dict[str, Any]:
        server = servers()
        server.fail_for("dEvIcE-tOkEn_0123456789:c2", "fcm:UNREGISTERED")
        server.fail_for("dEvIcE-tOkEn_0123456789:c3", "fcm:UNAVAILABLE", times=1)
        return _push(server, root)

    inline, _ = both(tmp_path, scenario)
    assert len(inline.suppressions) == 1


@pytest.fixture(scope="module")
def service_account() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return json.dumps({
        "client_email": "sender@demo-proj.iam.gserviceaccount.com",
        "private_key": key.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()).decode(),
    })


def test_fcm_refreshes_a_refused_token_the_same_way(
    tmp_path: Path, service_account: str,
) -> None:
    def scenario(servers: Servers, root: Path) -> dict[str, Any]:
        server = servers()
        (root / "sa.json").write_text(service_account, encoding="utf-8")
        server.fail_next(1, "auth", service="fcm")
        server.fail_next(1, "503", service="token")
        return _push(server, root, access_token=None, service_account_file=str(root / "sa.json"))

    inline, _ = both(tmp_path, scenario)
    assert inline.report["counts"] == {"sent": 4}
    tokens = Counter(status for (service, _, _, _, status, _), n in inline.requests[0].items()
                     for _ in range(n) if service == "token")
    assert tokens == {503: 1, 200: 2}  # a retried first fetch, one refresh after the 401


# --------------------------------------------------------------------------------------------
# Failover


def test_a_failing_primary_fails_over_to_the_secondary_the_same_way(tmp_path: Path) -> None:
    def scenario(servers: Servers, root: Path) -> dict[str, Any]:
        primary, secondary = servers(), servers()
        primary.fail_always("503")
        return {
            "rows": people(6),
            "channels": {"sms": {"provider": ["primary", "secondary"], "body": "Code {{ row }}"}},
            "providers": {
                "primary": {**primary.provider_config("twilio"), "retry": FAST_RETRY},
                "secondary": {**secondary.provider_config("twilio"), "retry": FAST_RETRY},
            },
            "limits": {"concurrency": 1},
        }

    inline, _ = both(tmp_path, scenario)
    assert inline.report["counts"] == {"failed": 1, "sent": 5}  # the first, before the breaker
    assert sum(inline.accepted[1]["twilio"].values()) == 5


# --------------------------------------------------------------------------------------------
# Error texts: URL paths and secrets


def test_transport_error_texts_are_redacted_the_same_way(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A Slack webhook's path is its secret: a connection refused names only scheme and host,
    through either transport; a ${ENV} secret never shows."""
    monkeypatch.setenv("PARITY_SLACK_URL", "http://127.0.0.1:9/slack/T000/B000/SECRETPATH")

    def scenario(servers: Servers, root: Path) -> dict[str, Any]:
        return {
            "rows": people(2),
            "channels": {"webhook": {"provider": "chat", "body": "Hello {{ first_name }}"}},
            "providers": {"chat": {"type": "slack", "url": "${PARITY_SLACK_URL}",
                                   "retry": {"attempts": 2, "backoff": 0.01}}},
            "limits": {"concurrency": 1},
        }

    inline, _ = both(tmp_path, scenario)
    texts = [a[7] for a in inline.attempts]
    assert texts and all(t for t in texts)
    assert not any("SECRETPATH" in t or "/slack/" in t for t in texts)



@pytest.mark.parametrize("service", ["twilio", "webhook"])
def test_seeded_faults_with_many_workers_end_the_same_way_per_row(
    tmp_path: Path, service: str,
) -> None:
    """Eight workers: the order of sends varies, but a seeded fault is a function of the
    recipient and its attempt number, so every row's outcome may not."""

    def scenario(servers: Servers, root: Path) -> dict[str, Any]:
        server = servers()
        server.fail_rate(0.3, ("429:0", "500", "503", "reset", "withhold_after_accept"),
                         seed=5)
        if service == "twilio":
            return {**sms(server, rows=40, timeout=0.5, concurrency=8),
                    "limits": {"concurrency": 8}}
        return {
            "rows": people(40),
            "channels": {"webhook": {"provider": "hook", "body": '{"code": "{{ row }}"}'}},
            "providers": {"hook": {**server.provider_config("webhook"), "timeout": 0.5,
                                   "concurrency": 8, "retry": FAST_RETRY}},
            "limits": {"concurrency": 8},
        }

    inline = observe(tmp_path / "inline", scenario, http_process=False)
    child = observe(tmp_path / "process", scenario, http_process=True)
    assert child.report == inline.report
    assert child.messages == inline.messages
    assert child.attempts == inline.attempts
    assert child.accepted == inline.accepted


@pytest.mark.parametrize("stops", [1, 2])
def test_a_stop_with_requests_in_flight_ends_the_same_way(tmp_path: Path, stops: int) -> None:
    """Asked to stop while answers are slow: once (graceful) the sends in flight finish, twice
    (immediate) they are in doubt. Which rows were in flight depends on timing; what they end
    as may not."""
    from campaign_cli.pipeline import StopController

    def run(http_process: bool) -> tuple[Any, ...]:
        root = tmp_path / str(http_process)
        root.mkdir()
        with FakeProviderServer(latency=0.4) as server:
            campaign = CampaignFactory(root)(**{
                **sms(server, rows=12, concurrency=3), "limits": {"concurrency": 3}})
            stop = StopController()

            def progress(_: object) -> None:
                if server.requests and not stop.stopping:
                    for _ in range(stops):
                        stop.request()

            report = run_campaign(load_campaign(campaign), root / "store.db",
                                  SendOptions(run_key="k", http_process=http_process,
                                              poll_interval=0.1),
                                  clock=FakeClock(), stop=stop, on_progress=progress)
            rows = _rows(root / "store.db", "SELECT address, state FROM messages")
            reached = {r.recipient for r in server.requests}
            accepted = set(server.accepted("twilio"))
        assert reached
        # What reached the provider is sent (graceful) or in doubt (immediate), never pending;
        # nothing else is sent; a graceful stop leaves nothing in doubt.
        for address, state in rows:
            if address in reached:
                assert state in ("sent", "in_doubt"), (http_process, address, state)
            assert state != "sent" or address in accepted, (http_process, address, state)
            assert stops == 2 or state != "in_doubt", (http_process, address, state)
        assert stops == 1 or any(state == "in_doubt" for _, state in rows)
        return report.exit_code, report.status, report.stopped, report.error

    assert run(True) == run(False)
