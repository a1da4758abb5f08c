"""Per-recipient decisions before sending: suppression and consent.

Two checks, so that an opt-out is honoured however late it arrives:

1. `Policy.check_chunk` asks the store once per chunk (batched ``IN`` queries) just before the
   chunk is rendered and queued.
2. `Policy.poll` picks up suppressions and consent revocations recorded *after* the run began
   (``id`` above a watermark taken before the first chunk check, so nothing falls in between),
   and `Policy.refused_now` consults them, in memory, right before each send. A `campaign suppress
   add` from another terminal is therefore honoured within one poll interval by every message not
   yet sent.

The store calls run in a worker thread (they are blocking); `refused_now` runs on the event loop
and only reads sets that the loop itself updates.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from campaign_cli.models import State
from campaign_cli.store.consents import (
    consented_among,
    max_consent_id,
    revocations_since,
)
from campaign_cli.store.suppressions import (
    max_suppression_id,
    suppressed_among,
    suppressions_since,
)

Refusal = tuple[State, str]


@dataclass
class Updates:
    suppressions: list[tuple[str, str]] = field(default_factory=list)
    revocations: list[tuple[str, str, str]] = field(default_factory=list)


class Policy:
    def __init__(self, conn: sqlite3.Connection, *, consent_required: bool, purpose: str) -> None:
        self._conn = conn
        self._lock = threading.Lock()  # the connection is shared by to_thread calls
        self.consent_required = consent_required
        self.purpose = purpose
        self._suppression_mark = max_suppression_id(conn)
        self._consent_mark = max_consent_id(conn)
        self._late_suppressed: set[tuple[str, str]] = set()
        self._late_revoked: set[tuple[str, str]] = set()

    def check_chunk(self, channel: str, hashes: Sequence[str]) -> dict[str, Refusal]:
        """Refusals for one chunk's address hashes on one channel (blocking: use a thread)."""
        if not hashes:
            return {}
        with self._lock:
            suppressed = suppressed_among(self._conn, hashes, channel)
            refused: dict[str, Refusal] = {h: (State.SUPPRESSED, "suppressed") for h in suppressed}
            if self.consent_required:
                rest = [h for h in hashes if h not in suppressed]
                granted = (
                    consented_among(self._conn, rest, channel, self.purpose) if rest else set()
                )
                for h in rest:
                    if h not in granted:
                        refused[h] = (State.NO_CONSENT, f"no {self.purpose} consent for {channel}")
        return refused

    def fetch_updates(self) -> Updates:
        """Opt-outs recorded since the last call (blocking: run in a thread)."""
        with self._lock:
            self._suppression_mark, suppressions = suppressions_since(
                self._conn, self._suppression_mark
            )
            revocations: list[tuple[str, str, str]] = []
            if self.consent_required:
                self._consent_mark, revocations = revocations_since(self._conn, self._consent_mark)
        return Updates(list(suppressions), list(revocations))

    def apply(self, updates: Updates) -> None:
        """Take in what `fetch_updates` found (on the event loop)."""
        self._late_suppressed.update(updates.suppressions)
        for address_hash, channel, purpose in updates.revocations:
            if purpose == self.purpose:
                self._late_revoked.add((address_hash, channel))

    def suppress_now(self, address_hash: str, channel: str) -> None:
        """A provider told us (e.g. Twilio 21610): stop sending to this address at once."""
        self._late_suppressed.add((address_hash, channel))

    def refused_now(self, channel: str, address_hash: str) -> Refusal | None:
        late = self._late_suppressed
        if late and ((address_hash, channel) in late or (address_hash, "all") in late):
            return (State.SUPPRESSED, "suppressed during the run")
        revoked = self._late_revoked
        if revoked and ((address_hash, channel) in revoked or (address_hash, "all") in revoked):
            return (State.NO_CONSENT, "consent revoked during the run")
        return None
