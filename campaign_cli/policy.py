"""Per-recipient decisions before sending: suppression and consent.

Two checks, so that an opt-out is honoured however late it arrives:

1. `Policy.check_chunk` asks the store once per chunk (batched ``IN`` queries) just before the
   chunk is rendered and queued.
2. `Policy.fetch_updates` picks up suppressions and consent revocations recorded *after* the
   run began (``id`` above a watermark taken before the first chunk check, so nothing falls in
   between), and `Policy.refused_now` consults them, in memory, right before each send. A
   `campaign suppress add` from another terminal is therefore honoured within one poll interval by
   every message not yet sent.

At most `LATE_LIMIT` of those are held. A larger import while the run goes (a list of a million
opt-outs) would otherwise grow the run by hundreds of MiB: past the limit the policy lets go of
them (`overflowed`), and the pipeline asks the store (`refused_in_store`) right before each send
instead, a query per message or batch.

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

#: Opt-outs recorded during a run that are held in memory (about 200 bytes each).
LATE_LIMIT = 20_000
#: Consent records read per query while catching up (most may be grants, which are not held).
CONSENT_PAGE = 5_000

LATE_SUPPRESSED: Refusal = (State.SUPPRESSED, "suppressed during the run")
LATE_REVOKED: Refusal = (State.NO_CONSENT, "consent revoked during the run")


@dataclass
class Updates:
    suppressions: list[tuple[str, str]] = field(default_factory=list)
    revocations: list[tuple[str, str, str]] = field(default_factory=list)
    overflow: bool = False  # more than the limit: ask the store before each send from now on


class Policy:
    def __init__(self, conn: sqlite3.Connection, *, consent_required: bool, purpose: str,
                 late_limit: int | None = None) -> None:
        self._conn = conn
        self._lock = threading.Lock()  # the connection is shared by to_thread calls
        self.consent_required = consent_required
        self.purpose = purpose
        self.late_limit = LATE_LIMIT if late_limit is None else late_limit
        #: Too many opt-outs arrived during the run to hold: `refused_in_store` before each send.
        self.overflowed = False
        self._suppression_mark = max_suppression_id(conn)
        self._consent_mark = max_consent_id(conn)
        self._late_suppressed: set[tuple[str, str]] = set()
        self._late_revoked: set[tuple[str, str]] = set()
        self._from_providers: set[tuple[str, str]] = set()  # kept through an overflow

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
        """Opt-outs recorded since the last call (blocking: run in a thread). Reads no more than
        it may hold: one more than there is room for means `overflow`."""
        if self.overflowed:
            return Updates()
        # (never negative: opt-outs from providers are held beyond the limit, and a LIMIT of -1
        # would read every row)
        room = max(0, self.late_limit - len(self._late_suppressed) - len(self._late_revoked))
        with self._lock:
            mark, suppressions = suppressions_since(self._conn, self._suppression_mark, room + 1)
            if len(suppressions) > room:
                return Updates(overflow=True)
            revocations: list[tuple[str, str, str]] = []
            consent_mark = self._consent_mark
            while self.consent_required:  # page by page: a large import of grants holds nothing
                after, page = revocations_since(self._conn, consent_mark, CONSENT_PAGE)
                if after == consent_mark:
                    break
                consent_mark = after
                revocations.extend(r for r in page if r[2] == self.purpose)
                if len(suppressions) + len(revocations) > room:
                    return Updates(overflow=True)
            self._suppression_mark, self._consent_mark = mark, consent_mark
        return Updates(suppressions, revocations)

    def apply(self, updates: Updates) -> None:
        """Take in what `fetch_updates` found (on the event loop)."""
        if updates.overflow:
            self.overflowed = True
            self._late_suppressed = set(self._from_providers)
            self._late_revoked = set()
            return
        self._late_suppressed.update(updates.suppressions)
        for address_hash, channel, purpose in updates.revocations:
            if purpose == self.purpose:
                self._late_revoked.add((address_hash, channel))

    def suppress_now(self, address_hash: str, channel: str) -> None:
        """A provider told us (e.g. Twilio 21610): stop sending to this address at once."""
        self._late_suppressed.add((address_hash, channel))
        self._from_providers.add((address_hash, channel))

    def refused_in_store(self, channel: str, hashes: Sequence[str]) -> dict[str, Refusal]:
        """Once `overflowed`: the store's answer for these addresses right before they are sent
        (blocking: use a thread). They passed `check_chunk` earlier, so a refusal now is an
        opt-out recorded during the run."""
        return {
            h: LATE_SUPPRESSED if state is State.SUPPRESSED else LATE_REVOKED
            for h, (state, _) in self.check_chunk(channel, hashes).items()
        }

    def close(self) -> None:
        """Close the connection once no thread is using it (blocking: use a thread). A task
        cancelled while its `check_chunk` or `fetch_updates` runs leaves that thread going; a
        connection closed under it can crash the interpreter."""
        with self._lock:
            self._conn.close()

    def refused_now(self, channel: str, address_hash: str) -> Refusal | None:
        late = self._late_suppressed
        if late and ((address_hash, channel) in late or (address_hash, "all") in late):
            return LATE_SUPPRESSED
        revoked = self._late_revoked
        if revoked and ((address_hash, channel) in revoked or (address_hash, "all") in revoked):
            return LATE_REVOKED
        return None
