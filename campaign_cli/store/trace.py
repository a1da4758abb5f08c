"""Every decision the store holds about one recipient: `campaign trace`.

A recipient is named by its key (the campaign's ``recipients.key`` column) or by an address,
written as an operator would type it (``(415) 555-0100``, ``Ann@Example.com``): it is read the
way a run reads each channel's addresses, so that it finds the journal's normalised spelling.
The answer: each journal row for it (run, input row and line, channel, state and reason, the
provider, cost, every attempt with the provider's answer), and the opt-outs and consents the
store holds for its addresses now.

The journal has no index on recipient key or address (one would cost every run's admission),
so a trace over the whole store reads every message row; ``run_id`` restricts it to one run's
rows, which the primary key finds directly.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

from campaign_cli.addresses import (
    AddressError,
    normalize_email,
    normalize_phone,
    normalize_push_token,
    normalize_webhook_url,
)
from campaign_cli.models import from_micros
from campaign_cli.store import consents, suppressions
from campaign_cli.store.db import sql_limit

_MESSAGE_COLUMNS = (
    "run_id", "campaign", "run_key", "currency", "row", "line", "channel", "recipient_key",
    "address", "state", "reason", "detail", "attempts", "provider", "provider_message_id",
    "status_code", "error_code", "cost_micros", "content_hash", "resent_in_doubt", "updated_at",
)
_MESSAGES = (
    "SELECT m.run_id, r.campaign, r.run_key, r.currency, m.row, m.line, m.channel, m.rkey, "
    "m.address, m.state, m.reason, m.detail, m.attempts, m.provider, m.provider_message_id, "
    "m.status_code, m.error_code, m.cost_micros, m.content_hash, m.resent_in_doubt, "
    "m.updated_at FROM messages m JOIN runs r ON r.id = m.run_id"
)
_ATTEMPT_COLUMNS = ("attempt", "provider", "outcome", "status_code", "provider_message_id",
                    "error_code", "error_text", "latency_ms", "at")
_ATTEMPTS = (
    "SELECT attempt, provider, outcome, status_code, provider_message_id, error_code, "
    "error_text, latency_ms, at FROM attempts WHERE run_id = ? AND row = ? AND channel = ? "
    "ORDER BY rowid"  # as they were made: the stamps follow the wall clock, which may step back
)


def addresses_of(raw: str, default_region: str = "US") -> list[str]:
    """The normalised addresses ``raw`` may stand for, on any channel: as a phone number (in
    ``default_region`` when written without a country code), an email address, a webhook URL,
    a push token. Empty when it reads as none of them (a recipient key, say)."""
    found: list[str] = []
    for normalise in (
        lambda text: normalize_phone(text, default_region),
        normalize_email,
        normalize_webhook_url,
        normalize_push_token,
    ):
        try:
            address = normalise(raw)
        except AddressError:
            continue
        if address not in found:
            found.append(address)
    return found


def trace(
    conn: sqlite3.Connection, recipient: str, *, default_region: str = "US",
    run_id: int | None = None, limit: int = 1000,
) -> dict[str, Any]:
    """What the store knows of ``recipient`` (a key or an address): its journal rows, oldest run
    first, each with its attempts; the suppressions and consent records of its addresses (those
    it was given as, and those the journal rows found by key were sent to). ``limit`` bounds the
    journal rows returned; ``more`` says whether there were others."""
    limit = sql_limit(limit)
    given = addresses_of(recipient, default_region)
    holes = ", ".join("?" * len(given))
    where = f"(m.rkey = ?{f' OR m.address IN ({holes})' if given else ''})"
    params: list[Any] = [recipient.strip(), *given]  # (a run strips the key column too)
    if run_id is not None:
        where = f"m.run_id = ? AND {where}"
        params.insert(0, run_id)
    rows = conn.execute(
        f"{_MESSAGES} WHERE {where} ORDER BY m.run_id, m.row, m.channel LIMIT ?",
        (*params, limit + 1),
    ).fetchall()
    more = len(rows) > limit
    messages: list[dict[str, Any]] = []
    for row in rows[:limit]:
        message = dict(zip(_MESSAGE_COLUMNS, row, strict=True))
        message["run"] = f"{message['campaign']}/{message['run_key']}"
        message["cost"] = str(from_micros(message.pop("cost_micros")))
        message["attempt_log"] = [
            dict(zip(_ATTEMPT_COLUMNS, attempt, strict=True))
            for attempt in conn.execute(
                _ATTEMPTS, (message["run_id"], message["row"], message["channel"]))
        ]
        messages.append(message)
    addresses = _ordered([*given, *(m["address"] for m in messages if m["address"])])
    return {
        "recipient": recipient,
        "addresses": addresses,
        "messages": messages,
        "more": more,
        "suppressions": [
            {**entry, "address": address}
            for address in addresses
            for entry in suppressions.is_suppressed(conn, address, None)
        ],
        "consents": [entry for address in addresses
                     for entry in consents.list_consents(conn, address)],
    }


def _ordered(values: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(values))
