"""Runs and their journal rows: creating and resuming a run, admission, counts, the run lock.

A run is (campaign name, run key). Its journal has one row per (input row, channel), each in
exactly one state (DESIGN.md section 4), so counts always add up to the input.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import socket
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import sqlite_utils

from campaign_cli.errors import ResumeRefused, RunLockedError, StoreError, UsageError
from campaign_cli.models import State
from campaign_cli.store.db import begin_immediate, insert_rows, rollback, sql_limit

RUN_COLUMNS = (
    "id", "campaign", "run_key", "campaign_file", "recipients_file", "recipients_sha256",
    "purpose", "channels", "currency", "max_spend_micros", "status", "exit_code", "total_rows",
    "template_hashes", "created_at", "started_at", "finished_at", "sessions", "last_error",
    "stopped", "in_doubt_found", "in_doubt_resent", "recipient_key", "strategy", "reading",
    "summary",
)


@dataclass(frozen=True)
class RunRecord:
    id: int
    campaign: str
    run_key: str
    campaign_file: str
    recipients_file: str
    recipients_sha256: str
    purpose: str
    channels: tuple[str, ...]
    currency: str
    max_spend_micros: int | None
    status: str
    exit_code: int | None
    total_rows: int | None
    template_hashes: dict[str, str]
    created_at: str
    started_at: str | None
    finished_at: str | None
    sessions: int
    last_error: str | None
    stopped: str | None = None  # why its last session stopped early (`RunReport.stopped`)
    in_doubt_found: int = 0  # rows in doubt when its last session started
    in_doubt_resent: int = 0  # how many of them that session sent again
    recipient_key: str | None = None  # the key column (None: started before it was recorded)
    strategy: str | None = None  # all | first_available (None: started before it was recorded)
    reading: dict[str, Any] | None = None  # how the file is read (None: not recorded yet)
    #: What its last session ended with (`Summary`); None while running, or not recorded.
    summary: Summary | None = None

    @property
    def name(self) -> str:
        return f"{self.campaign}/{self.run_key}"


class Summary(NamedTuple):
    """A finished session's counts ({channel: {state: n}}), committed spend (`committed_spend`)
    and messages in a sent state updated since it started (`sent_since`), as its end found them:
    nothing changes them until the run is resumed."""

    counts: dict[str, dict[str, int]]
    spend_micros: int
    sent: int


def _record(data: dict[str, Any]) -> RunRecord:
    summary = data.get("summary")
    data["summary"] = None if summary is None else Summary(**json.loads(summary))
    data["channels"] = tuple(json.loads(data["channels"]))
    data["template_hashes"] = json.loads(data["template_hashes"] or "{}")
    data["reading"] = None if data.get("reading") is None else json.loads(data["reading"])
    return RunRecord(**data)


def _runs(conn: sqlite3.Connection, where: str, params: Sequence[Any]) -> list[RunRecord]:
    # sqlite-utils' query() gives rows as dicts keyed by column: no positional bookkeeping.
    sql = f"SELECT {', '.join(RUN_COLUMNS)} FROM runs {where}"
    return [_record(row) for row in sqlite_utils.Database(conn).query(sql, params)]


def find_run(conn: sqlite3.Connection, campaign: str, run_key: str) -> RunRecord | None:
    found = _runs(conn, "WHERE campaign = ? AND run_key = ?", (campaign, run_key))
    return found[0] if found else None


def get_run(conn: sqlite3.Connection, ref: str) -> RunRecord:
    """A run by id, by ``campaign/key``, or by campaign name (its latest run)."""
    found: list[RunRecord] = []
    if ref.isdigit():
        found = _runs(conn, "WHERE id = ?", (int(ref),))
    if not found and "/" in ref:
        campaign, _, key = ref.partition("/")
        found = _runs(conn, "WHERE campaign = ? AND run_key = ?", (campaign, key))
    if not found:
        found = _runs(conn, "WHERE campaign = ? ORDER BY id DESC LIMIT 1", (ref,))
    if not found:
        raise UsageError(f"no run {ref!r} in this store (see `campaign status`)")
    return found[0]


def list_runs(conn: sqlite3.Connection, limit: int = 50) -> list[RunRecord]:
    return _runs(conn, "ORDER BY id DESC LIMIT ?", (sql_limit(limit),))


def _refused(run: RunRecord, message: str) -> ResumeRefused:
    return ResumeRefused(message, campaign=run.campaign, run_key=run.run_key, run_id=run.id)


def start_run(
    conn: sqlite3.Connection,
    *,
    campaign: str,
    run_key: str,
    campaign_file: str,
    recipients_file: str,
    recipients_sha256: str,
    purpose: str,
    channels: Sequence[str],
    currency: str,
    max_spend_micros: int | None,
    template_hashes: dict[str, str],
    now: str,
    cap_given: bool = False,
    recipient_key: str | None = None,
    strategy: str | None = None,
    reading: dict[str, Any] | None = None,
    on_busy: Callable[[], None] | None = None,
) -> tuple[RunRecord, bool]:
    """Create the run, or resume it. Returns (run, resumed).

    Resuming requires the same recipient file contents: journal rows are keyed by record number,
    so a changed file would silently skip or repeat people. Only a cap given on the command line
    (``cap_given``) replaces the run's cap on a resume; otherwise the run keeps the smaller of its
    own and the file's (none given: its own), so that leaving out --max-spend never lifts it.
    Nor may the currency change (the spend so far and the cap are counted in it), nor the
    recipient key column (the journal claims each key once per run), nor the
    strategy (it decides which channels of a row the journal holds), nor how the file is read
    (``reading``: address columns, region, delimiter).

    ``on_busy``: asked every few tenths of a second while another process holds the store's
    write lock; it may raise to give the wait up (a stop), and nothing is recorded."""
    stored_reading = None if reading is None else json.dumps(reading, sort_keys=True)
    # Waits out another process's long write (a big `suppress import`).
    begin_immediate(conn, on_busy=on_busy, short_tries=on_busy is not None)
    try:
        existing = find_run(conn, campaign, run_key)
        if existing is None:
            conn.execute(
                "INSERT INTO runs (campaign, run_key, campaign_file, recipients_file, "
                "recipients_sha256, purpose, channels, currency, max_spend_micros, status, "
                "template_hashes, created_at, started_at, sessions, recipient_key, strategy, "
                "reading) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'running', ?, ?, ?, 1, ?, ?, ?)",
                (campaign, run_key, campaign_file, recipients_file, recipients_sha256, purpose,
                 json.dumps(list(channels)), currency, max_spend_micros,
                 json.dumps(template_hashes, sort_keys=True), now, now, recipient_key,
                 strategy, stored_reading),
            )
            resumed = False
        else:
            if existing.recipients_sha256 != recipients_sha256:
                raise _refused(
                    existing,
                    f"run {existing.name} was started with a different recipient file "
                    f"(sha256 {existing.recipients_sha256[:12]}, now {recipients_sha256[:12]}): "
                    "resuming would skip or repeat recipients; restore that file, or start a new "
                    "run with another --run-key"
                )
            if existing.purpose != purpose:
                raise _refused(
                    existing,
                    f"run {existing.name} was started as {existing.purpose}; the campaign now "
                    f"says {purpose}, which changes who may be sent to (consent) and what an "
                    "in-doubt message becomes: start a new run with another --run-key"
                )
            if existing.currency != currency:
                raise _refused(
                    existing,
                    f"run {existing.name} was started in {existing.currency}; the campaign now "
                    f"says {currency}: its spend so far and its cap are in {existing.currency}, "
                    "and the two cannot be added up; restore it, or start a new run with "
                    "another --run-key"
                )
            if tuple(existing.channels) != tuple(channels):
                raise _refused(
                    existing,
                    f"run {existing.name} was started with channels "
                    f"{', '.join(existing.channels)}; the campaign now has {', '.join(channels)}: "
                    "start a new run with another --run-key"
                )
            if (existing.recipient_key is not None and recipient_key is not None
                    and existing.recipient_key != recipient_key):
                raise _refused(
                    existing,
                    f"run {existing.name} was started with recipients.key "
                    f"{existing.recipient_key!r}; the campaign now has {recipient_key!r}: the "
                    "journal knows its recipients by that key, so resuming would take some for "
                    "duplicates of others and skip them; restore it, or start a new run with "
                    "another --run-key"
                )
            if (existing.strategy is not None and strategy is not None
                    and existing.strategy != strategy and len(channels) > 1):
                raise _refused(
                    existing,
                    f"run {existing.name} was started with strategy {existing.strategy}; the "
                    f"campaign now has {strategy}, which changes the channels each recipient "
                    "gets: resuming would leave rows unsent or send some recipients a second "
                    "channel; restore it, or start a new run with another --run-key"
                )
            if existing.reading is not None and reading is not None and existing.reading != reading:
                changed = ", ".join(
                    f"{name} {existing.reading.get(name)!r} -> {reading.get(name)!r}"
                    for name in sorted({*existing.reading, *reading})
                    if existing.reading.get(name) != reading.get(name)
                )
                raise _refused(
                    existing,
                    f"run {existing.name} read its recipient file another way ({changed}): "
                    "resuming would send the rows not sent yet to addresses other than those "
                    "journaled and checked; restore it, or start a new run with another --run-key"
                )
            if not cap_given and existing.max_spend_micros is not None:
                # Only a cap given on this command line replaces the run's: the file's (or none)
                # never raises it (a cron job re-fired, an operator resuming by hand).
                max_spend_micros = (existing.max_spend_micros if max_spend_micros is None
                                    else min(max_spend_micros, existing.max_spend_micros))
            conn.execute(
                "UPDATE runs SET status = 'running', exit_code = NULL, finished_at = NULL, "
                "stopped = NULL, in_doubt_found = 0, in_doubt_resent = 0, last_error = NULL, "
                "summary = NULL, "
                "started_at = ?, sessions = sessions + 1, max_spend_micros = ?, "
                "template_hashes = ?, recipient_key = COALESCE(recipient_key, ?), "
                "strategy = COALESCE(strategy, ?), reading = COALESCE(reading, ?) WHERE id = ?",
                (now, max_spend_micros, json.dumps(template_hashes, sort_keys=True),
                 recipient_key, strategy, stored_reading, existing.id),
            )
            resumed = True
        conn.execute("COMMIT")
    except BaseException:
        rollback(conn)
        raise
    run = find_run(conn, campaign, run_key)
    assert run is not None
    return run, resumed


def begin_session(conn: sqlite3.Connection, run_id: int, *, total_rows: int,
                  in_doubt_found: int) -> None:
    """Record what a session found when it started: the rows in the file, and those in doubt."""
    conn.execute(
        "UPDATE runs SET total_rows = ?, in_doubt_found = ? WHERE id = ?",
        (total_rows, in_doubt_found, run_id),
    )


def finish_run(
    conn: sqlite3.Connection, run_id: int, *, status: str, exit_code: int, now: str,
    total_rows: int | None, last_error: str | None, stopped: str | None = None,
    in_doubt_resent: int = 0, summary: Summary | None = None,
) -> None:
    """Record a session's end; ``summary``: its counts as found in this same transaction (None:
    `campaign status` reads them from the journal)."""
    conn.execute(
        "UPDATE runs SET status = ?, exit_code = ?, finished_at = ?, "
        "total_rows = COALESCE(?, total_rows), last_error = ?, stopped = ?, "
        "in_doubt_resent = ?, summary = ? WHERE id = ?",
        (status, exit_code, now, total_rows, last_error, stopped, in_doubt_resent,
         None if summary is None else json.dumps(summary._asdict()), run_id),
    )


def mark_in_doubt(conn: sqlite3.Connection, run_id: int, now: str) -> int:
    """Rows left in `sending` by a session that died: their outcome is unknown."""
    cur = conn.execute(
        "UPDATE messages SET state = 'in_doubt', reason = 'interrupted_while_sending', "
        "updated_at = ? WHERE run_id = ? AND state = 'sending'",
        (now, run_id),
    )
    return cur.rowcount


def reopen_transient_failures(conn: sqlite3.Connection, run_id: int, now: str,
                              last_row: int | None = None) -> int:
    """Dead letters of transient failures (retries ran out) go back to `pending`; dead letters of
    permanent refusals stay put: sending them again would be refused again. So do those with an
    ambiguous attempt (an in-doubt resend, a timeout, a crash mid-send): it may have been
    delivered, and as `pending` the row could even fail over to another provider. Only rows up
    to ``last_row`` (--limit): the session reads no further, and would leave the rest pending."""
    cur = conn.execute(
        "UPDATE messages SET state = 'pending', reason = 'retry_failed', updated_at = :now "
        "WHERE run_id = :run_id AND state = 'failed' AND reason = 'retries_exhausted' "
        "AND resent_in_doubt = 0 AND (:last_row IS NULL OR row <= :last_row) "
        "AND NOT EXISTS (SELECT 1 FROM attempts a "
        "WHERE a.run_id = messages.run_id AND a.row = messages.row "
        "AND a.channel = messages.channel AND a.outcome IN ('in_doubt', 'error'))",
        # (named: Python 3.12.0-3.12.3 warn of numbered ?1 placeholders given a sequence)
        {"now": now, "run_id": run_id, "last_row": last_row},
    )
    return cur.rowcount


def counts(conn: sqlite3.Connection, run_id: int) -> dict[str, dict[str, int]]:
    """{channel: {state: n}} for a run."""
    out: dict[str, dict[str, int]] = {}
    for channel, state, n in conn.execute(
        "SELECT channel, state, count(*) FROM messages WHERE run_id = ? GROUP BY channel, state",
        (run_id,),
    ):
        out.setdefault(channel, {})[state] = n
    return out


def committed_spend(conn: sqlite3.Connection, run_id: int) -> int:
    """Micro-units that may have been charged: sent, still sending, or in doubt, and what
    earlier in-doubt attempts of any row may have cost (``doubt_micros``)."""
    row = conn.execute(
        "SELECT COALESCE(SUM(CASE WHEN state IN ('sent', 'delivered', 'undelivered', 'bounced', "
        "'sending', 'in_doubt') THEN cost_micros ELSE 0 END + doubt_micros), 0) "
        "FROM messages WHERE run_id = ?",
        (run_id,),
    ).fetchone()
    return int(row[0])


def sent_since(conn: sqlite3.Connection, run_id: int, started_at: str | None) -> int:
    """The run's messages in a sent state updated since ``started_at`` (its session's start)."""
    row = conn.execute(
        "SELECT count(*) FROM messages WHERE run_id = ? AND state IN "
        "('sent', 'delivered', 'undelivered', 'bounced') AND updated_at >= ?",
        (run_id, started_at or ""),
    ).fetchone()
    return int(row[0])


def last_errors(conn: sqlite3.Connection, run_id: int, limit: int = 5) -> list[dict[str, Any]]:
    return list(sqlite_utils.Database(conn).query(
        "SELECT row, channel, state, reason, error_code, detail, updated_at AS at FROM messages "
        "WHERE run_id = ? AND state IN ('failed', 'in_doubt', 'render_failed') "
        "ORDER BY updated_at DESC LIMIT ?",
        (run_id, limit),
    ))


def render_failures(conn: sqlite3.Connection, run_id: int,
                    limit: int = 5) -> list[tuple[str, str, int, int]]:
    """(channel, detail, n, first row) of the run's `render_failed` rows, most frequent first."""
    return [
        (c, d or "-", n, r)
        for c, d, n, r in conn.execute(
            "SELECT channel, detail, count(*), min(row) FROM messages "
            "WHERE run_id = ? AND state = 'render_failed' "
            "GROUP BY 1, 2 ORDER BY 3 DESC, 4 LIMIT ?",
            (run_id, limit),
        )
    ]


def attempt_summary(conn: sqlite3.Connection, run_id: int) -> list[dict[str, Any]]:
    """Per provider and outcome: how many attempts, and their mean and worst latency (ms)."""
    return list(sqlite_utils.Database(conn).query(
        "SELECT provider, outcome, count(*) AS attempts, round(avg(latency_ms), 1) AS mean_ms, "
        "round(max(latency_ms), 1) AS max_ms FROM attempts WHERE run_id = ? "
        "GROUP BY provider, outcome ORDER BY provider, attempts DESC",
        (run_id,),
    ))


def failure_summary(conn: sqlite3.Connection, run_id: int) -> list[tuple[str, str, str, int]]:
    """(provider, state, reason, n) for every row that did not go out, most frequent first."""
    return [
        (p or "-", s, r or "-", n)
        for p, s, r, n in conn.execute(
            "SELECT provider, state, COALESCE(error_code, reason), count(*) FROM messages "
            "WHERE run_id = ? AND state IN ('failed', 'in_doubt', 'render_failed', 'invalid') "
            "GROUP BY 1, 2, 3 ORDER BY 4 DESC LIMIT 20",
            (run_id,),
        )
    ]


# --------------------------------------------------------------------------------------------
# Admission


class Admit(NamedTuple):
    """One (input row, channel) the source wants in the journal. (A tuple: one per row read,
    and a frozen dataclass cost a few microseconds each to build.)"""

    row: int
    line: int
    channel: str
    rkey: str | None
    address: str | None
    state: str  # 'pending', or a final state decided while reading (invalid)
    reason: str | None = None
    detail: str | None = None


def admit(
    conn: sqlite3.Connection, run_id: int, items: Sequence[Admit], dedupe_address: bool, now: str
) -> dict[tuple[int, str], tuple[str, str | None, str | None]]:
    """Insert a chunk's rows (INSERT OR IGNORE) and return every row's (state, provider, rkey)
    after: the recipient key is the one journaled, which an earlier session may have read from
    another key column.

    The database decides: a row already journaled by an earlier session keeps its state; a row whose
    recipient key (or address, when ``dedupe_address``) is already taken in this run becomes a
    `duplicate`. Runs inside the writer's transaction."""
    if not items:
        return {}
    before = conn.total_changes
    insert_rows(
        conn,
        "INSERT OR IGNORE INTO messages (run_id, row, channel, line, rkey, address, dedupe_key, "
        "dedupe_addr, state, reason, detail, updated_at)",
        [
            (run_id, a.row, a.channel, a.line, a.rkey, a.address,
             a.rkey if a.state == "pending" else None,
             a.address if a.state == "pending" and dedupe_address else None,
             a.state, a.reason, a.detail, now)
            for a in items
        ],
    )
    if conn.total_changes - before == len(items):
        # Every row went in as given (the usual case: a fresh chunk, no duplicates).
        return {(a.row, a.channel): (a.state, None, a.rkey) for a in items}
    # A claim refused by a unique index (same key or address as an earlier row) is a duplicate;
    # a row already journaled by an earlier session is left as it is (primary key).
    conn.executemany(
        "INSERT OR IGNORE INTO messages (run_id, row, channel, line, rkey, address, "
        "state, reason, detail, updated_at) "
        "VALUES (?, ?, ?, ?, ?, ?, 'duplicate', 'duplicate', ?, ?)",
        [
            (run_id, a.row, a.channel, a.line, a.rkey, a.address,
             "same recipient key or address as an earlier row", now)
            for a in items if a.state == "pending"
        ],
    )
    lo = min(a.row for a in items)
    hi = max(a.row for a in items)
    return {
        (row, channel): (state, provider, rkey)
        for row, channel, state, provider, rkey in conn.execute(
            "SELECT row, channel, state, provider, rkey FROM messages "
            "WHERE run_id = ? AND row BETWEEN ? AND ?",
            (run_id, lo, hi),
        )
    }


# Statements the pipeline submits to the writer. Keyed by primary key (run_id, row, channel).
#: A row leaving `in_doubt` keeps what it may have cost (SET sees the row as it was).
BANK_DOUBT = (
    "doubt_micros = doubt_micros + CASE state WHEN 'in_doubt' THEN cost_micros ELSE 0 END, "
)

SQL_INTENT = (
    "UPDATE messages SET state = 'sending', attempts = attempts + 1, provider = ?, "
    + BANK_DOUBT + "cost_micros = ?, "
    "content_hash = ?, resent_in_doubt = MAX(resent_in_doubt, ?), updated_at = ? "
    "WHERE run_id = ? AND row = ? AND channel = ?"
)
SQL_SENT = (
    "UPDATE messages SET state = 'sent', provider_message_id = ?, status_code = ?, "
    "reason = NULL, detail = NULL, error_code = NULL, updated_at = ? "
    "WHERE run_id = ? AND row = ? AND channel = ?"
)
SQL_FINAL = (
    "UPDATE messages SET state = ?, reason = ?, detail = ?, error_code = ?, status_code = ?, "
    "cost_micros = ?, updated_at = ? WHERE run_id = ? AND row = ? AND channel = ?"
)
SQL_ATTEMPT = (
    "INSERT INTO attempts (run_id, row, channel, attempt, provider, outcome, status_code, "
    "provider_message_id, error_code, error_text, latency_ms, at) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
SQL_REFUSED = (
    "UPDATE messages SET " + BANK_DOUBT + "state = ?, reason = ?, detail = ?, "
    "content_hash = COALESCE(?, "
    "content_hash), updated_at = ? WHERE run_id = ? AND row = ? AND channel = ?"
)


def iter_rows(
    conn: sqlite3.Connection, run_id: int, states: Iterable[str] | None = None
) -> Iterator[dict[str, Any]]:
    cols = ("row", "line", "channel", "rkey", "address", "state", "reason", "detail", "attempts",
            "provider", "provider_message_id", "error_code", "cost_micros", "resent_in_doubt")
    sql = f"SELECT {', '.join(cols)} FROM messages WHERE run_id = ?"
    params: list[Any] = [run_id]
    if states is not None:
        wanted = list(states)
        sql += f" AND state IN ({', '.join('?' * len(wanted))})"
        params += wanted
    for r in conn.execute(sql + " ORDER BY row, channel", params):
        yield dict(zip(cols, r, strict=False))


# --------------------------------------------------------------------------------------------
# The run lock


def _lock_error(path: Path, exc: OSError) -> StoreError:
    return StoreError(f"{path}: cannot take the run's lock: {exc.strerror or exc}; nothing was "
                      "sent")


class RunLock:
    """An exclusive lock on one run, held by this process (``flock`` on a file beside the store).

    The kernel drops it when the process dies, even by SIGKILL, so a crashed run never stays
    locked; the file names the holder for the error message of the process that is refused."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd = fd

    @classmethod
    def acquire(cls, store_path: Path, campaign: str, run_key: str, started: str) -> RunLock:
        # Beside the store's real file: another path to it (a symlink) must meet the same lock.
        lock_dir = Path(f"{Path(store_path).resolve()}.locks")
        digest = hashlib.sha256(f"{campaign}\0{run_key}".encode()).hexdigest()[:16]
        path = lock_dir / f"{digest}.lock"
        try:
            lock_dir.mkdir(mode=0o700, exist_ok=True)
            # O_NOFOLLOW: a link planted at this predictable name is refused, never written through.
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            raise _lock_error(path, exc) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 512, 0).decode("utf-8", "replace").strip()
            os.close(fd)
            raise RunLockedError(f"{campaign}/{run_key}",
                                 text.partition("\n")[0] or "unknown process") from None
        named = f"pid {os.getpid()} on {socket.gethostname()} since {started}"
        instance = _process_instance(os.getpid())
        if instance is not None:
            named += f"\nprocess {instance}"
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, named.encode(), 0)
        except OSError as exc:  # a full disk: the store beside it cannot record the run either
            os.close(fd)
            raise _lock_error(path, exc) from None
        return cls(path, fd)

    @staticmethod
    def holder(store_path: Path, campaign: str, run_key: str) -> str | None:
        """Who holds the run, as its lock file names it; None when no live process does (never
        started here, finished, or killed: the kernel dropped its lock). Read without taking the
        lock, so that asking never makes a starting `send` fail with exit 5."""
        digest = hashlib.sha256(f"{campaign}\0{run_key}".encode()).hexdigest()[:16]
        path = Path(f"{Path(store_path).resolve()}.locks") / f"{digest}.lock"
        try:
            text, _, instance = path.read_text("utf-8", "replace").strip().partition("\n")
        except OSError:
            return None
        found = re.fullmatch(r"pid (\d+) on (\S+) since .*", text)
        if found is None:
            return text or None
        if text and _flock_held(path):
            return text  # the kernel says so (the pid may be another pid namespace's)
        if found[2] != socket.gethostname():
            return text  # another machine's process: cannot tell from here
        pid = int(found[1])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None  # killed without releasing it (the kernel did)
        except PermissionError:
            pass  # alive, another user's
        recorded = instance.removeprefix("process ").strip()
        if recorded and _process_instance(pid) not in (None, recorded):
            return None  # the pid was reused (after a reboot, or wrapped): not the holder
        return text

    def release(self) -> None:
        if self._fd >= 0:
            try:
                os.ftruncate(self._fd, 0)
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
                os.close(self._fd)
                self._fd = -1


def _flock_held(path: Path) -> bool:
    """Whether some process holds a ``flock`` on ``path``, as Linux's /proc/locks lists them
    (those of this pid namespace and the ones below it); False where it cannot tell. The pid in
    the lock file cannot tell for a holder in another pid namespace: there it names another
    process, or none."""
    try:
        found = os.stat(path)
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            listed = f.read()
    except OSError:
        return False
    # "1: FLOCK  ADVISORY  WRITE 1234 fe:00:2499237 0 EOF": device major:minor in hex, inode.
    where = f"{os.major(found.st_dev):02x}:{os.minor(found.st_dev):02x}:{found.st_ino}"
    return any(
        fields[1] == "FLOCK" and where in fields
        for fields in (line.split() for line in listed.splitlines())
        if len(fields) > 5
    )


def _process_instance(pid: int) -> str | None:
    """What tells this process from a later one given the same pid: the boot's id and the
    process's start time in clock ticks since boot (Linux's /proc); None where there is no /proc.
    A run killed by SIGKILL, or by the machine going down, leaves its pid in the lock file, and
    after a reboot that pid soon names some other live process."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            boot = f.read().strip()
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            # "pid (comm) state ppid ...": comm may hold spaces and parentheses; starttime is
            # the 22nd field, the 20th after comm.
            start = f.read().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return None
    return f"{boot}:{start}"


def state_names() -> list[str]:
    return [s.value for s in State]
