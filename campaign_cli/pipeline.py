"""One campaign run, end to end: source -> admission -> policy -> render -> budget -> pace -> send
-> journal (DESIGN.md section 3).

`run_campaign` is the library entry point: it prepares the run (reads the recipient file once to
hash and check it, opens the store, takes the run lock, creates or resumes the run), then drives
the asyncio pipeline and returns a `RunReport`. It never prints; progress goes to a callback.

The shape of the asyncio part:

    source task ──(bounded queue)──> N worker coroutines ──> provider.send
        │                                   │
        └── admission, policy, render ──────┴── every state change -> JournalWriter (one thread)

* The source reads the CSV a chunk at a time in a thread, admits the chunk with INSERT OR IGNORE
  (so rows journaled by an earlier session keep their state, and duplicates are refused by the
  database), checks suppressions and consents for the whole chunk in one query per channel,
  renders, reserves each message's cost, and puts it on a queue that holds at most a few hundred
  messages: backpressure keeps memory flat and the policy check close to the send.
* A worker takes a message, waits for its provider's token bucket, checks the live opt-out set
  (suppressions recorded after the run began), commits the `sending` intent, sends, and submits
  the outcome. Retries back off with full jitter on the injected clock.
* A local provider that takes batches (`BatchProvider`: console, outbox), unthrottled and without
  failover, gets what is queued for it in one call instead: the batch's intents committed
  together first, its outcomes journaled together after; a message that failed goes on alone.
* Stopping: the first `StopController.request()` (SIGINT/SIGTERM/SIGHUP from the CLI) stops
  intake and lets in-flight sends finish within `grace_seconds`; the second cancels them. Either
  way the journal is flushed, and a row whose send was cut off is `in_doubt`, never silently
  `pending`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import random
import sqlite3
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal
from pathlib import Path
from types import MappingProxyType
from typing import IO, TYPE_CHECKING, Any, Literal, TypeVar

from campaign_cli.addresses import address_hash
from campaign_cli.clock import Clock, Stamper, SystemClock, iso
from campaign_cli.config import Campaign, LoadedCampaign
from campaign_cli.errors import (
    CampaignError,
    ExitCode,
    InDoubtError,
    InputError,
    JournalError,
    NotSentError,
    PermanentError,
    ProviderAuthError,
    ProviderError,
    RateLimitedError,
    StoppedBeforeStart,
    StoreError,
    TransientError,
    UsageError,
    redact,
)
from campaign_cli.models import (
    Channel,
    InvalidRow,
    OutboundMessage,
    Recipient,
    SendResult,
    SmsContent,
    State,
    from_micros,
    to_micros,
)
from campaign_cli.pacing import Budget, Pacer
from campaign_cli.policy import Policy, Refusal
from campaign_cli.providers.base import (
    HTTP_TYPES,
    BatchProvider,
    Provider,
    ProviderContext,
    ProviderRegistry,
    type_deduplicates,
)
from campaign_cli.recipients import (
    Chunk,
    ChunkReader,
    InlineChunkReader,
    ProcessChunkReader,
    RecipientSpec,
    ScanResult,
    scan_recipients,
)
from campaign_cli.render.engine import Renderer, RenderError, content_hash, cost_of
from campaign_cli.store import consents as consent_store
from campaign_cli.store import runs, snapshot
from campaign_cli.store import suppressions as suppression_store
from campaign_cli.store.db import (
    LockWaitAbandoned,
    Store,
    begin_immediate,
    connect,
    is_disk_full,
    refused_write,
    rollback,
)
from campaign_cli.store.journal import JournalWriter

_T = TypeVar("_T")

if TYPE_CHECKING:
    from campaign_cli.providers.process import HttpProcess

#: The folder a dry run copies the store into: ``campaign-dry-run-XXXX`` in the temporary folder.
DRY_RUN_FOLDER = "campaign-dry-run-"

#: States counted as "sent" in progress displays (the provider accepted the message).
SENT_STATES = frozenset({State.SENT, State.DELIVERED, State.UNDELIVERED, State.BOUNCED})
#: States counted as "skipped": the row was decided without sending.
SKIPPED_STATES = frozenset(
    {State.INVALID, State.DUPLICATE, State.SUPPRESSED, State.NO_CONSENT, State.CAPPED,
     State.QUIET_HOURS}
)
FAILED_STATES = frozenset({State.FAILED, State.RENDER_FAILED, State.IN_DOUBT})


@dataclass
class SendOptions:
    recipients: Path | None = None
    dry_run: bool = False
    limit: int | None = None
    run_key: str | None = None
    rate: float | None = None
    max_spend: Decimal | None = None
    grace_seconds: float = 10.0
    chunk_size: int = 500
    queue_size: int | None = None
    poll_interval: float = 1.0
    retry_failed: bool = False  # re-drive the dead letters of transient failures (not permanent)
    #: Where the recipient file is read and normalised: "process" (a child process, on another
    #: core), "inline" (a thread of this process), or "auto": a process from
    #: ``process_reader_min_rows`` rows to read, below that starting one costs more than it saves.
    reader: Literal["auto", "inline", "process"] = "auto"
    process_reader_min_rows: int = 20_000
    #: Send HTTP providers' requests from a second process, on another core
    #: (`campaign_cli.providers.process`); False keeps them in this one.
    http_process: bool = True
    #: A dry run's private copy of the store (with its journal) is written here and kept, rather
    #: than in a temporary folder removed at the end (`campaign_cli.preview` reads it).
    dry_run_store: Path | None = None
    #: Refuse the run (`TooFewRows`, before anything else is done) when the recipient file has
    #: fewer data rows: `campaign preview --row N` needs row N.
    rows_needed: int | None = None


class TooFewRows(UsageError):
    """The recipient file has fewer data rows than `SendOptions.rows_needed`."""

    def __init__(self, path: Path, rows: int, needed: int) -> None:
        super().__init__(f"{path}: the file has {rows} data row{'s' if rows != 1 else ''}, "
                         f"fewer than {needed}")
        self.path = path
        self.rows = rows


class StopController:
    """Asks a running pipeline to stop: the first request is graceful, the second immediate.

    Safe to call from a signal handler installed with ``loop.add_signal_handler``."""

    def __init__(self) -> None:
        self.requests = 0
        self.reason: str | None = None
        self._graceful: asyncio.Event | None = None
        self._immediate: asyncio.Event | None = None
        self._at_once: list[Callable[[], None]] = []

    def on_immediate(self, action: Callable[[], None]) -> None:
        """Call ``action`` on the immediate stop (at once if it was already asked for). It runs
        in the signal handler: it must only set a flag."""
        if self.requests >= 2:
            action()
        else:
            self._at_once.append(action)

    def bind(self) -> None:
        self._graceful = asyncio.Event()
        self._immediate = asyncio.Event()
        if self.requests >= 1:
            self._graceful.set()
        if self.requests >= 2:
            self._immediate.set()

    def request(self, reason: str = "interrupted") -> None:
        self.requests += 1
        if self.reason is None:
            self.reason = reason
        if self.requests == 2:
            for action in self._at_once:
                action()
        if self._graceful is not None:
            self._graceful.set()
            if self.requests >= 2 and self._immediate is not None:
                self._immediate.set()

    @property
    def stopping(self) -> bool:
        return self.requests > 0

    async def wait_graceful(self) -> None:
        assert self._graceful is not None
        await self._graceful.wait()

    async def wait_immediate(self) -> None:
        assert self._immediate is not None
        await self._immediate.wait()


@dataclass(frozen=True)
class Progress:
    """A snapshot for progress displays."""

    total: int
    done: int
    sent: int
    skipped: int
    failed: int
    pending: int
    spend_micros: int
    elapsed_s: float
    rate_per_s: float
    currency: str

    @property
    def eta_s(self) -> float | None:
        left = self.total - self.done
        if left <= 0:
            return 0.0
        return left / self.rate_per_s if self.rate_per_s > 0 else None


@dataclass
class RunReport:
    run_id: int
    run_name: str
    campaign: str
    run_key: str
    dry_run: bool
    resumed: bool
    by_channel: dict[str, dict[str, int]]
    total_rows: int
    spend_micros: int
    max_spend_micros: int | None
    currency: str
    duration_s: float
    sent_this_session: int
    exit_code: int | None  # None while a run is still going (status of a live run)
    status: str
    # Why the session ended early: "interrupted" | "spend_cap" | "provider_auth" | "error" (a
    # classified failure: exit 1, 2 or 6) | "internal_error"; None when it read the file through.
    stopped: str | None = None
    error: str | None = None
    in_doubt_found: int = 0
    in_doubt_resent: int = 0
    warnings: list[str] = field(default_factory=list)
    started_at: str | None = None
    finished_at: str | None = None

    @property
    def sent(self) -> int:
        return sum(self.counts.get(s.value, 0) for s in SENT_STATES)

    @property
    def skipped(self) -> int:
        return sum(self.counts.get(s.value, 0) for s in SKIPPED_STATES)

    @property
    def failed(self) -> int:
        """Not sent, or perhaps not: failed, render_failed and in_doubt."""
        return sum(self.counts.get(s.value, 0) for s in FAILED_STATES)

    @property
    def definitely_failed(self) -> int:
        """`failed` without the in-doubt rows (shown beside them, not counted twice)."""
        return self.failed - self.counts.get(State.IN_DOUBT.value, 0)

    @property
    def counts(self) -> dict[str, int]:
        total: Counter[str] = Counter()
        for states in self.by_channel.values():
            total.update(states)
        return dict(sorted(total.items()))

    @property
    def rate_per_s(self) -> float:
        return round(self.sent_this_session / self.duration_s, 1) if self.duration_s > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        """The `--json` summary: a contract (DESIGN.md section 5). Add keys; never rename."""
        return {
            "run": self.run_name,
            "run_id": self.run_id,
            "campaign": self.campaign,
            "run_key": self.run_key,
            "dry_run": self.dry_run,
            "resumed": self.resumed,
            "status": self.status,
            "counts": self.counts,
            "by_channel": {ch: dict(sorted(s.items())) for ch, s in self.by_channel.items()},
            "total_rows": self.total_rows,
            "spend": str(from_micros(self.spend_micros)),
            "spend_micros": self.spend_micros,
            "max_spend": None if self.max_spend_micros is None
            else str(from_micros(self.max_spend_micros)),
            "currency": self.currency,
            "duration_s": round(self.duration_s, 3),
            "rate_per_s": self.rate_per_s,
            "in_doubt_found": self.in_doubt_found,
            "in_doubt_resent": self.in_doubt_resent,
            "stopped": self.stopped,
            "error": self.error,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "exit_code": None if self.exit_code is None else int(self.exit_code),
        }


ProgressCallback = Callable[[Progress], None]


def idempotency_key(campaign: str, run_key: str, rkey: str, channel: str) -> str:
    """sha256(campaign NUL run_key NUL rkey NUL channel), first 32 hex digits. The run's part is
    hashed once and copied per message (this is on the per-message path)."""
    digest = _run_prefix(campaign, run_key).copy()
    digest.update(f"{rkey}\0{channel}".encode())
    return digest.hexdigest()[:32]


@functools.lru_cache(maxsize=8)
def _run_prefix(campaign: str, run_key: str) -> hashlib._Hash:
    return hashlib.sha256(f"{campaign}\0{run_key}\0".encode())


def default_run_key(recipients_sha256: str) -> str:
    """Same recipient file, same run: a re-run (a cron job firing twice) resumes, never resends."""
    return recipients_sha256[:12]


# --------------------------------------------------------------------------------------------
# Dry-run provider: accepts everything, touches nothing.


class DryRunProvider:
    local = True  # nothing leaves this machine: the journal need not sync each commit

    def __init__(self, name: str, deduplicates: bool = True) -> None:
        self.name = name
        self.channels = frozenset(Channel)
        #: The real provider's: it decides which in-doubt messages a resume would send again.
        self.deduplicates = deduplicates

    async def send(self, message: OutboundMessage) -> SendResult:
        return SendResult(provider_message_id="dry-run")

    async def aclose(self) -> None:
        return None


# --------------------------------------------------------------------------------------------


@dataclass
class _Job:
    message: OutboundMessage
    address_hash: str
    pinned: str | None  # an in-doubt resend goes back to the provider that may have it
    resend: bool
    costs: dict[str, int]  # per provider of the channel (they may price differently)
    reserved: int  # the most of those: what the budget holds for this message
    doubted: bool = False  # answered ambiguously this session (then retried with the same key)

    @property
    def ambiguous(self) -> bool:
        """An earlier attempt may have been delivered: the row is never `pending` again."""
        return self.resend or self.doubted


@dataclass
class _Ready:
    """A chunk admitted and checked, waiting to be rendered and queued."""

    # (recipient, channel, address, its hash, pinned provider if an in-doubt resend)
    open_rows: list[tuple[Recipient, Channel, str, str, str | None]]
    refusals: dict[str, dict[str, tuple[State, str]]]


_PENDING = State.PENDING.value
_INVALID = State.INVALID.value
_IN_DOUBT = State.IN_DOUBT.value
_SENT = State.SENT.value
#: The answer when the store is not asked (immutable: no module-level mutable state).
_NO_REFUSALS: Mapping[str, Refusal] = MappingProxyType({})
_CHANNELS = {channel.value: channel for channel in Channel}
#: Batches one local provider may have on their way at once: one being written while the next
#: one's intents commit, and a little slack.
BATCHES_IN_FLIGHT = 4
#: Identical permanent refusals in a row after which a provider that answers for every message
#: (`refusals_mean_config`) is taken to refuse our configuration, not the recipients.
SAME_REFUSALS = 10


class Breaker:
    """A circuit breaker for one provider of a channel with failovers.

    Closed: traffic flows. After ``threshold`` consecutive failures (transient errors, connection
    errors, and timeouts after the request was written) it opens for ``cooldown`` seconds and
    the traffic not sent yet goes to the next provider (a message in doubt stays pinned).
    Then it lets one probe through (half-open): success closes it, failure opens it again."""

    def __init__(self, threshold: int, cooldown: float, clock: Clock) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self.clock = clock
        self.failures = 0
        self.open_until: float | None = None
        self.probing = False

    def available(self) -> bool:
        if self.open_until is None:
            return True
        return self.clock.monotonic() >= self.open_until and not self.probing

    def attempt(self) -> bool:
        """Taken as the provider is picked, before any wait: True if this send is the probe."""
        if self.open_until is not None:
            self.probing = True
            return True
        return False

    def release(self, probe: bool) -> None:
        """The probe never reached the provider (a stop, an opt-out): the next send may probe."""
        if probe:
            self.probing = False

    def inconclusive(self, probe: bool) -> None:
        """An ambiguous answer (a timeout after the request was written) counts toward opening
        the circuit like a failure: a provider that keeps timing out is down for the messages
        not sent yet, which may go to the next provider. The ambiguous message itself never
        moves (it stays pinned to this provider); a probe that did not succeed opens it again."""
        self.failures += 1
        if (probe and self.probing) or self.failures >= self.threshold:
            self.open_until = self.clock.monotonic() + self.cooldown
        if probe:
            self.probing = False

    def success(self) -> None:
        self.failures = 0
        self.open_until = None
        self.probing = False

    def failure(self) -> None:
        self.failures += 1
        if self.probing or self.failures >= self.threshold:
            self.open_until = self.clock.monotonic() + self.cooldown
        self.probing = False


@dataclass
class _Route:
    name: str  # the provider's name in the campaign file (what the journal records)
    provider: Provider
    pacer: Pacer
    semaphore: asyncio.Semaphore | contextlib.nullcontext[None]
    price_per_message: int
    price_per_segment: int
    attempts: int
    backoff: float
    max_backoff: float
    breaker: Breaker
    batch_size: int = 1  # more than 1: the provider takes batches (`batcher`)
    batcher: BatchProvider | None = None  # the provider, when it takes batches
    batch_slots: asyncio.Semaphore = field(
        default_factory=lambda: asyncio.Semaphore(BATCHES_IN_FLIGHT)
    )
    #: The provider's own endpoint answers for every message (`refusals_mean_config`): the
    #: messages refused in a row with one same code since its last success (`_note_refusal`).
    refusal_guard: bool = False
    refusal_code: str | None = None
    refusals: list[tuple[tuple[int, int, str], bool]] = field(default_factory=list)


class _Abort(Exception):
    def __init__(self, code: ExitCode, reason: str, message: str) -> None:
        self.code = code
        self.reason = reason
        super().__init__(message)


async def _in_thread_to_the_end(
    fn: Callable[[], _T], *, on_cancel: Callable[[], None] | None = None,
    undo: Callable[[_T], object] | None = None,
) -> _T:
    """``fn`` in a thread, waited for however often the caller is cancelled (then re-raised).
    A cancelled `asyncio.to_thread` is not only given up: a call no thread has started yet (a
    busy machine) is dropped, and never runs, and one that has started goes on unwatched.
    ``on_cancel`` is told of the first cancellation (``fn`` may then give up); ``undo`` is given
    what ``fn`` returned if it finished all the same (a reader it opened, to close)."""
    working = asyncio.get_running_loop().run_in_executor(None, fn)
    try:
        return await asyncio.shield(working)
    except asyncio.CancelledError:
        if on_cancel is not None:
            on_cancel()
        while not working.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait({working})
        if not working.cancelled() and working.exception() is None and undo is not None:
            await _in_thread_to_the_end(functools.partial(undo, working.result()))
        raise  # (the cancellation wins over what ``fn`` returned or raised)


def run_campaign(
    loaded: LoadedCampaign,
    store_path: Path,
    options: SendOptions | None = None,
    *,
    clock: Clock | None = None,
    registry: ProviderRegistry | None = None,
    stop: StopController | None = None,
    on_progress: ProgressCallback | None = None,
    stdout: IO[str] | None = None,
    rng: random.Random | None = None,
) -> RunReport:
    """Run (or resume) a campaign to completion, a stop, or the spend cap. Blocking.

    Raises `CampaignError` subclasses for problems found before anything is sent (bad input exit 2,
    locked run exit 5); outcomes of the run itself are in the report's ``exit_code``. In a
    running event loop (an application's own), await `Runner.execute` instead."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise RuntimeError("run_campaign blocks until the run ends, so it cannot run in a running "
                           "event loop: await Runner(...).execute() there instead")
    run = Runner(loaded, store_path, options or SendOptions(), clock=clock or SystemClock(),
                 registry=registry, stop=stop or StopController(), on_progress=on_progress,
                 stdout=stdout, rng=rng)
    return asyncio.run(run.execute())


class Runner:
    def __init__(
        self,
        loaded: LoadedCampaign,
        store_path: Path,
        options: SendOptions,
        *,
        clock: Clock,
        registry: ProviderRegistry | None,
        stop: StopController,
        on_progress: ProgressCallback | None = None,
        stdout: IO[str] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        from campaign_cli.providers.base import default_registry

        self.loaded = loaded
        self.campaign = loaded.campaign
        self.store_path = store_path
        self.options = options
        self.clock = clock
        self.registry = registry or default_registry()
        self._default_registry = registry is None
        self.stop = stop
        self.on_progress = on_progress
        self.stdout = stdout
        self.rng = rng or random.Random()  # noqa: S311 - jitter, not secrets
        self.secrets = loaded.secrets
        #: Without a webhook_url column a webhook message goes to the provider's own URL, one POST
        #: per recipient, addressed by the recipient's key (which is never taken for a URL).
        self._webhook_by_key = self.campaign.recipients.columns.webhook_url is None
        self.warnings: list[str] = []
        # Set during execution
        self._abort: _Abort | None = None
        self._halted = asyncio.Event()  # set with `_abort`: wakes backoff sleeps
        self._cap_hit = False
        self._session_counts: Counter[str] = Counter()
        self._baseline: Counter[str] = Counter()
        self._sent_this_session = 0
        self._in_doubt_resent = 0
        self._segment_mismatches = 0  # messages a provider counted other segments for
        self._max_row_start = 0
        self._admitting: set[asyncio.Future[_Ready | None]] = set()
        self._sentinels: asyncio.Task[None] | None = None  # queued by a source that failed
        self._given_up = False  # the caller cancelled while a store thread (`_store_thread`) ran
        self.retried = 0
        self._stamp = Stamper(clock).now

    # -- preparation (blocking, before the event loop does anything) ---------------------

    def _recipients_path(self) -> Path:
        path = self.options.recipients or self.campaign.recipients.file
        if path is None:
            raise UsageError(
                f"{self.loaded.path}: recipients.file is not set: give --recipients FILE"
            )
        return Path(path)

    async def execute(self) -> RunReport:
        """The run, in the caller's event loop (`run_campaign` is the blocking form).

        To stop it as Ctrl-C does (intake stops, messages in flight finish, the session's end is
        recorded, exit 130 in the report), call ``stop.request()``. Cancelling the task instead
        ends it as a killed process ends: its workers and child processes are stopped and the
        connections closed, but the run stays ``running`` in the store and rows caught mid-send
        stay ``sending``, until the next session of the run (the same campaign and run key)
        finds them in doubt (DESIGN.md section 4)."""
        self.stop.bind()
        started_mono = self.clock.monotonic()
        spec = RecipientSpec.from_config(self.campaign, self._recipients_path())
        scan = await asyncio.to_thread(scan_recipients, spec, lambda: self.stop.stopping)
        self._not_stopped()
        # The readers read the file that was hashed (the run key, the resume check), or stop.
        spec = replace(spec, expect=scan.identity)
        if self.options.limit is not None and self.options.limit < 1:
            raise UsageError("--limit must be at least 1")
        if self.options.rows_needed is not None and scan.rows < self.options.rows_needed:
            raise TooFewRows(spec.path, scan.rows, self.options.rows_needed)
        total_rows = scan.rows if self.options.limit is None else min(scan.rows, self.options.limit)
        # An empty --run-key (a cron job's "$UNSET") is refused, not taken for "derive one".
        run_key = (self.options.run_key if self.options.run_key is not None
                   else default_run_key(scan.sha256))
        if not _valid_run_key(run_key):
            raise UsageError(
                f"--run-key {run_key!r}: use letters, digits, '.', '_', '-' (at most 100)"
            )

        private = contextlib.ExitStack()  # the dry run's own folder, if it makes one
        store_path = self.store_path
        if self.options.dry_run:
            holder = runs.RunLock.holder(self.store_path, self.campaign.name, run_key)
            if holder is not None:
                self.warnings.append(
                    f"run {self.campaign.name}/{run_key} is being sent now ({holder}): this dry "
                    "run checks it as the store holds it at this moment"
                )
            try:
                target = self.options.dry_run_store
                if target is None:
                    folder = private.enter_context(snapshot.private_folder(DRY_RUN_FOLDER))
                    target = folder / "dry-run.db"
                store_path = _snapshot_store(self.store_path, target, self.campaign.name,
                                             run_key)
            except BaseException:
                private.close()
                raise
        lock: runs.RunLock | None = None
        opened: tuple[HttpProcess | None, dict[Channel, list[_Route]]] | None = None
        try:
            store = Store.open(store_path)
            try:
                now = iso(self.clock.now())
                # In a thread, as it may read a long list and wait for another process's write
                # lock: the loop stays free to take a Ctrl-C, which gives the import up.
                await self._store_thread(self._import_compliance_lists, store.conn, now)
                secret = store.setting("unsubscribe_secret") or ""
                renderer = Renderer.compile(self.campaign, secret, source=self.loaded)
                if self.options.retry_failed and runs.find_run(
                    store.conn, self.campaign.name, run_key
                ) is None:
                    raise UsageError(
                        f"--retry-failed: no run {self.campaign.name}/{run_key} in this store"
                    )
                if not self.options.dry_run:
                    lock = runs.RunLock.acquire(self.store_path, self.campaign.name, run_key, now)
                # Providers are built before the session is recorded: one that cannot be (an
                # unreadable key file) is a configuration error like any other, with nothing
                # started (exit 2; `status` shows no session it did not have).
                self._not_stopped()
                opened = await self._open_providers(f"{self.campaign.name}/{run_key}")
                if self.stop.stopping:  # while the HTTP process started: record nothing
                    http, routes = opened
                    opened = None
                    await self._close_providers(routes, http)
                    raise _stopped_before_start()
            finally:
                if opened is None:
                    store.close()
            try:
                report = await self._session(store, opened, run_key, spec, scan, renderer,
                                             total_rows, started_mono)
            finally:
                store.close()
            return report
        except sqlite3.Error as exc:
            # Before anything is sent (the session's own writes become a JournalError).
            refused = refused_write(self.store_path, exc)
            if refused is not None:
                raise refused from None
            raise
        finally:
            if lock is not None:
                lock.release()
            private.close()

    async def _session(
        self, store: Store, opened: tuple[HttpProcess | None, dict[Channel, list[_Route]]],
        run_key: str, spec: RecipientSpec, scan: ScanResult, renderer: Renderer,
        total_rows: int, started_mono: float,
    ) -> RunReport:
        """Record the session (a new run, or a resumed one) and drive it. Closes the providers
        if it never gets to drive them."""
        driving = False
        try:
            now = iso(self.clock.now())
            before = runs.find_run(store.conn, self.campaign.name, run_key)
            # In a thread: the wait for another process's write lock (up to LOCK_WAIT) leaves
            # the loop free to take a Ctrl-C, which ends the wait with nothing recorded.
            run, resumed = await self._store_thread(
                runs.start_run,
                store.conn,
                campaign=self.campaign.name,
                run_key=run_key,
                campaign_file=str(self.loaded.path),
                recipients_file=str(spec.path),
                recipients_sha256=scan.sha256,
                purpose=self.campaign.purpose.value,
                channels=[c.value for c in self.campaign.channels.enabled()],
                currency=self.campaign.limits.currency,
                max_spend_micros=self._max_spend_micros(),
                template_hashes=renderer.template_hashes,
                now=now,
                cap_given=self.options.max_spend is not None,
                recipient_key=self.campaign.recipients.key,
                strategy=self.campaign.strategy,
                reading=_reading(self.campaign),
                on_busy=self._starting,
            )
            if resumed and before is not None and before.campaign_file != str(self.loaded.path):
                self.warnings.append(
                    f"run {run.name} was started from {before.campaign_file}; this session "
                    f"runs {self.loaded.path} (same campaign name and run key)"
                )
            changed = sorted(
                field for field in {*renderer.template_hashes, *(
                    before.template_hashes if before is not None else {})}
                if before is not None and before.template_hashes
                and before.template_hashes.get(field) != renderer.template_hashes.get(field)
            )
            if resumed and changed:
                self.warnings.append(
                    f"run {run.name}: templates changed since it started "
                    f"({', '.join(changed)}): the messages not sent yet get the new text"
                )
            kept = run.max_spend_micros
            if (resumed and kept is not None and self.options.max_spend is None
                    and kept != self._max_spend_micros()):
                self.warnings.append(
                    f"run {run.name} keeps its spend cap of "
                    f"{from_micros(kept)} {run.currency} from an earlier "
                    "session (give --max-spend to change it)"
                )
            had = before.max_spend_micros if before is not None else None
            if (resumed and had is not None and kept is not None and kept < had
                    and self.options.max_spend is None):
                self.warnings.append(
                    f"run {run.name}: its spend cap of {from_micros(had)} {run.currency} from "
                    f"an earlier session is lowered to the campaign file's "
                    f"{from_micros(kept)} (give --max-spend {from_micros(had)} to keep it)"
                )
            in_doubt_found, total_rows = await self._store_thread(
                self._begin_session, store.conn, run, now, total_rows)
            committed = runs.committed_spend(store.conn, run.id)
            start_row = _first_open_row(store.conn, run.id)
            policy = Policy(
                store.connect(),
                consent_required=self.campaign.consent_required,
                purpose=self.campaign.purpose.value,
            )
            driving = True
            return await self._drive(
                store, run, resumed, spec, renderer, policy, committed, start_row,
                total_rows, in_doubt_found, started_mono, opened,
            )
        finally:
            if not driving:
                await self._close_providers(opened[1], opened[0])

    def _begin_session(self, conn: sqlite3.Connection, run: runs.RunRecord, now: str,
                       total_rows: int) -> tuple[int, int]:
        """The session's first transaction (blocking: `_store_thread`): what the run finds at
        its start. It waits out another process's long write (up to LOCK_WAIT), as the journal
        writer does: SQLite's busy timeout alone would fail the session. A stop meanwhile ends
        the command as if it had been killed here (the run recorded, nothing sent).
        Returns (rows in doubt found, total rows)."""
        with suppression_store.write_transaction(conn, self._starting_session):
            runs.mark_in_doubt(conn, run.id, now)
            if self.options.retry_failed:
                self.retried = runs.reopen_transient_failures(conn, run.id, now,
                                                            self.options.limit)
            for states in runs.counts(conn, run.id).values():
                self._baseline.update(states)
            # In doubt at the start of this session: left `sending` by one that died just
            # now, or recorded in doubt earlier (an unanswered send, a skipped resend).
            in_doubt_found = self._baseline[_IN_DOUBT]
            self._max_row_start = _max_row(conn, run.id)
            # A smaller --limit than an earlier session's does not unjournal rows: they count.
            total_rows = max(total_rows, self._max_row_start)
            runs.begin_session(conn, run.id, total_rows=total_rows,
                               in_doubt_found=in_doubt_found)
        return in_doubt_found, total_rows

    def _starting_session(self) -> None:
        """``on_busy`` of the session's first transaction: the run is recorded by then, so a
        stop leaves it as a killed process would (it resumes the same way)."""
        if self._given_up:
            raise LockWaitAbandoned("cancelled")
        if self.stop.stopping:
            raise StoppedBeforeStart(
                "stopped as the run started, while another process held the store's write "
                "lock: nothing was sent; the same command resumes it")

    async def _store_thread(self, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        """``fn`` in a thread, on the store's connection. The connection is closed on the way
        out, and closed under the thread the interpreter crashes: a cancelled caller waits for
        the thread to end, however often it is cancelled (``fn`` checks `_given_up`, through
        `_starting`, `_starting_session` or `_unless_stopped_at_once`, and gives up at its next
        check)."""
        return await _in_thread_to_the_end(functools.partial(fn, *args, **kwargs),
                                           on_cancel=self._give_up)

    def _give_up(self) -> None:
        self._given_up = True

    def _starting(self) -> None:
        """``on_busy`` and ``check`` of the work before the session starts: a stop ends it
        (nothing recorded), and so does the cancellation of the task that waits for it."""
        if self._given_up:
            raise LockWaitAbandoned("cancelled")
        self._not_stopped()

    def _not_stopped(self) -> None:
        """A stop before the session is recorded ends the command here: nothing was sent, and
        no session is recorded (a stopped run would claim one that never ran)."""
        if self.stop.stopping:
            raise _stopped_before_start()

    def _max_spend_micros(self) -> int | None:
        cap = self.options.max_spend
        if cap is None:
            cap = self.campaign.limits.max_spend
        return None if cap is None else to_micros(cap)

    def _import_compliance_lists(self, conn: sqlite3.Connection, now: str) -> None:
        """The campaign's own opt-out lists and consent records go into the store before anyone
        is checked, so a list kept beside the campaign can never be forgotten. They are read
        whole: a line that cannot be read may be an opt-out or a revocation, so it stops the run
        (exit 2, nothing sent) until it is fixed or removed; the lines read are kept."""
        region = self.campaign.recipients.default_region
        for path in self.campaign.compliance.suppression_lists:
            result = suppression_store.import_csv(
                conn, path, channel_default=None, reason="list", source=f"list:{path.name}",
                default_region=region, now=now, check=self._starting,
            )
            _refuse_unread_lines(path, result)
        for path in self.campaign.compliance.consent_records:
            result = consent_store.import_csv(
                conn, path, channel_default=None, purpose_default=self.campaign.purpose.value,
                source=f"list:{path.name}", default_region=region, now=now,
                check=self._starting,
            )
            _refuse_unread_lines(path, result)

    # -- the asyncio part ------------------------------------------------------------------

    async def _drive(
        self,
        store: Store,
        run: runs.RunRecord,
        resumed: bool,
        spec: RecipientSpec,
        renderer: Renderer,
        policy: Policy,
        committed: int,
        start_row: int,
        total_rows: int,
        in_doubt_found: int,
        started_mono: float,
        opened: tuple[HttpProcess | None, dict[Channel, list[_Route]]],
    ) -> RunReport:
        http, routes = opened
        try:
            writer = JournalWriter(store.path, durable=_leaves_this_machine(routes)).start()
            # A second Ctrl-C stops at once, also while another process holds the store's
            # write lock (a large import): the journal gives up its wait (DESIGN section 4).
            self.stop.on_immediate(writer.abandon)
        except CampaignError as exc:  # the journal's connection
            policy.close()  # (no thread uses it yet)
            await self._close_providers(routes, http)
            with suppression_store.write_transaction(store.conn):
                runs.finish_run(store.conn, run.id, status="aborted",
                                exit_code=int(exc.exit_code), now=iso(self.clock.now()),
                                total_rows=total_rows,
                                last_error=redact(str(exc), self.secrets), stopped="error")
            raise
        budget = Budget(run.max_spend_micros, committed)  # this session's, or the run's own
        concurrency = self.campaign.limits.concurrency
        queue: asyncio.Queue[_Job | None] = asyncio.Queue(
            self.options.queue_size or max(2 * concurrency, 64)
        )
        self._run = run
        self._writer = writer
        self._budget = budget
        self._routes_by_channel = routes
        self._policy = policy
        self._spent = committed
        error: str | None = None
        ticker: asyncio.Task[None] | None = None
        try:
            workers = [asyncio.create_task(self._worker(queue)) for _ in range(concurrency)]
            source = asyncio.create_task(
                self._source(queue, spec, renderer, policy, start_row, total_rows, concurrency)
            )
            ticker = asyncio.create_task(self._ticker(policy, total_rows, started_mono))
            await self._supervise(source, workers)
            if self._sentinels is not None:
                self._sentinels.cancel()  # done, unless an immediate stop cancelled the workers
                await asyncio.gather(self._sentinels, return_exceptions=True)
            await writer.flush()
        except JournalError as exc:
            self._crashed(exc)  # the run ends here, and is finished below like any abort
        finally:
            if ticker is not None:
                ticker.cancel()
                await asyncio.gather(ticker, return_exceptions=True)
            try:
                await self._close_providers(routes, http)
                try:
                    # (also when cancelled again meanwhile: a second Ctrl-C, say)
                    await _in_thread_to_the_end(writer.close)
                except JournalError as exc:
                    self._crashed(exc)
            finally:
                await _in_thread_to_the_end(policy.close)

        # Rows still `sending` had their send cut off: the outcome is unknown.
        now = iso(self.clock.now())
        try:
            # Waits out another process's long write, as the session's start does, unless the
            # stop is immediate: then the session's end is not recorded (below).
            await self._begin_last_transaction(store.conn)
            try:
                runs.mark_in_doubt(store.conn, run.id, now)
                by_channel = runs.counts(store.conn, run.id)
                spend = runs.committed_spend(store.conn, run.id)
                # Dead letters, and messages whose template failed for this recipient: either
                # way someone was not sent to for a reason the operator must look at (exit 4).
                failed = sum(s.get(State.FAILED.value, 0)
                             + s.get(State.RENDER_FAILED.value, 0) for s in by_channel.values())
                exit_code, status, stopped = self._outcome(failed)
                if self.options.dry_run:
                    # The journal of a dry run is thrown away: its reasons are said now or
                    # never.
                    for channel, detail, n, row in runs.render_failures(store.conn, run.id):
                        self.warnings.append(
                            f"dry run: {n} {channel} message(s) would fail to render "
                            f"(first: row {row}): {detail}")
                if self._abort is not None:
                    error = redact(str(self._abort), self.secrets)
                summary = runs.Summary(by_channel, spend,
                                       runs.sent_since(store.conn, run.id, run.started_at))
                runs.finish_run(store.conn, run.id, status=status, exit_code=int(exit_code),
                                now=now, total_rows=total_rows, last_error=error,
                                stopped=stopped, in_doubt_resent=self._in_doubt_resent,
                                summary=summary)
            except BaseException:
                rollback(store.conn)
                raise
            store.conn.execute("COMMIT")
        except LockWaitAbandoned:
            # As if the process had been killed here: the run stays `running` in the store
            # (`status`: stopped, no process); `sending` rows are in doubt when it resumes.
            with suppression_store.read_snapshot(store.conn):
                by_channel = runs.counts(store.conn, run.id)
                spend = runs.committed_spend(store.conn, run.id)
            exit_code, status, stopped = self._outcome(0)
            self.warnings.append(
                "stopped at once while another process held the store's write lock: this "
                "session's end is not recorded, and its last changes may not be either (the "
                "run resumes as after a killed process: messages that were in flight are in "
                "doubt)")
        except sqlite3.Error as exc:
            cause = "" if self._abort is None else f"{self._abort}; "
            raise JournalError(
                f"run {run.name} stopped: {cause}finishing the journal failed: {exc}; messages "
                "in flight are in doubt and the rest pending when it resumes"
            ) from None
        # The last counts, not the last tick's: a display left on screen shows where it ended.
        self._report_progress(total_rows, started_mono)
        return RunReport(
            run_id=run.id, run_name=run.name, campaign=run.campaign, run_key=run.run_key,
            dry_run=self.options.dry_run, resumed=resumed, by_channel=by_channel,
            total_rows=total_rows, spend_micros=spend, max_spend_micros=budget.cap,
            currency=self.campaign.limits.currency,
            duration_s=self.clock.monotonic() - started_mono,
            sent_this_session=self._sent_this_session, exit_code=exit_code, status=status,
            stopped=stopped, error=error, in_doubt_found=in_doubt_found,
            in_doubt_resent=self._in_doubt_resent, warnings=self.warnings,
            started_at=run.started_at, finished_at=now,
        )

    async def _begin_last_transaction(self, conn: sqlite3.Connection) -> None:
        """BEGIN IMMEDIATE for the session's last transaction, waiting for another process's
        write lock in a thread: on the loop's thread the wait (up to LOCK_WAIT) kept a Ctrl-C's
        handler from running, so the immediate stop that gives it up was never seen. A
        cancelled task gives the wait up too, and leaves the connection only once the thread
        is done with it."""
        try:
            await self._store_thread(begin_immediate, conn, on_busy=self._unless_stopped_at_once,
                                     short_tries=True)
        except asyncio.CancelledError:
            rollback(conn)  # (the thread may have begun it as the cancellation came)
            raise

    def _unless_stopped_at_once(self) -> None:
        """``on_busy`` for the session's last transaction: an immediate stop (or the caller's
        cancellation) gives up waiting for another process's write lock."""
        if self._given_up or self.stop.requests >= 2:
            raise LockWaitAbandoned("stopped at once")

    def _outcome(self, failed: int) -> tuple[ExitCode, str, str | None]:
        # The cap is met only while intake runs, so when both happened it came first: it is
        # why the run stopped, and its resume needs --max-spend (a signal while the last
        # messages finish does not make it an interruption that resumes into the same cap).
        if self._cap_hit and self._abort is None:
            return ExitCode.SPEND_CAP, "spend_cap", "spend_cap"
        if self.stop.stopping and self._abort is None:
            return ExitCode.INTERRUPTED, "interrupted", "interrupted"
        if self._abort is not None:
            return self._abort.code, "aborted", self._abort.reason
        if failed:
            return ExitCode.FAILURES, "done_with_failures", None
        return ExitCode.OK, "done", None

    def _routes(self, context: ProviderContext) -> dict[Channel, list[_Route]]:
        """Each channel's providers, primary first. A provider used by two channels is one route
        (one bucket, one breaker)."""
        routes: dict[Channel, list[_Route]] = {}
        by_name: dict[str, _Route] = {}
        breaker = self.campaign.limits.circuit_breaker
        for channel in self.campaign.channels.enabled():
            for name in self.campaign.channels.get(channel).provider_names:
                if name not in by_name:
                    by_name[name] = self._route(name, context, breaker.threshold,
                                                breaker.cooldown)
                routes.setdefault(channel, []).append(by_name[name])
        return routes

    async def _close_providers(self, routes: dict[Channel, list[_Route]],
                               http: HttpProcess | None) -> None:
        unique = {r.name: r for channel_routes in routes.values() for r in channel_routes}
        for route in unique.values():
            try:
                await route.provider.aclose()
            except Exception as exc:  # noqa: BLE001 - closing must not hide the outcome
                self.warnings.append(f"closing provider {route.provider.name}: {exc}")
        if http is not None:
            await http.aclose()

    async def _open_providers(
        self, run_name: str
    ) -> tuple[HttpProcess | None, dict[Channel, list[_Route]]]:
        """The run's HTTP process (if it wants one) and its providers, by channel."""
        http = await self._start_http_process()
        try:
            context = ProviderContext(
                clock=self.clock, run_name=run_name, stdout=self.stdout,
                transports=None if http is None else http.transport,
                recipient_urls=not self._webhook_by_key)
            return http, self._routes(context)
        except BaseException:
            await self._close_providers({}, http)
            raise

    async def _start_http_process(self) -> HttpProcess | None:
        """The run's `HttpProcess`, if it wants one (`_wants_http_process`). One that cannot
        start (no usable interpreter path: an embedded or frozen Python) is not a reason to
        refuse the run: its requests are sent from this process, as before, and it says so."""
        if not self._wants_http_process():
            return None
        # Imported here: httpx costs an outbox or console run ~0.1 s to import.
        from campaign_cli.providers.process import HttpProcess, HttpProcessError

        try:
            return await HttpProcess.start()
        except HttpProcessError as exc:
            self.warnings.append(f"{exc}: HTTP requests are sent from this process instead")
            return None

    def _wants_http_process(self) -> bool:
        """Whether this run sends its HTTP requests from a second process: a real run (not a
        dry run) of the default registry's providers with an HTTP one among them, unless the
        options say no. (A registry of one's own, a test's, builds its own transports.)"""
        if self.options.dry_run or not self.options.http_process or not self._default_registry:
            return False
        names = {name for channel in self.campaign.channels.enabled()
                 for name in self.campaign.channels.get(channel).provider_names}
        return any(self.campaign.providers[name].type in HTTP_TYPES for name in names)

    def _route(self, name: str, context: ProviderContext, threshold: int,
               cooldown: float) -> _Route:
        config = self.campaign.providers[name]
        if self.options.dry_run:
            provider: Provider = DryRunProvider(name, type_deduplicates(config.type))
            rate = None
        else:
            try:
                provider = self.registry.create(name, config, context)
            except KeyError as exc:
                raise InputError(str(self.loaded.path),
                                 self.loaded.line_of("providers", name, "type"),
                                 f"providers.{name}.type", str(exc.args[0])) from None
            rate = self.options.rate if self.options.rate is not None else config.rate
        batcher = provider if isinstance(provider, BatchProvider) else None
        guard = bool(getattr(provider, "refusals_mean_config", False))
        return _Route(
            refusal_guard=guard,
            name=name,
            provider=provider,
            pacer=Pacer(rate, config.burst if self.options.rate is None else None, self.clock),
            semaphore=asyncio.Semaphore(config.concurrency) if config.concurrency
            else contextlib.nullcontext(),
            price_per_message=to_micros(config.price_per_message),
            price_per_segment=to_micros(config.price_per_segment),
            attempts=config.retry.attempts,
            backoff=config.retry.backoff,
            max_backoff=config.retry.max_backoff,
            breaker=Breaker(threshold, cooldown, self.clock),
            batch_size=1 if batcher is None else max(1, int(batcher.batch_size)),
            batcher=batcher,
        )

    def _pick(self, channel: Channel, pinned: str | None) -> _Route:
        routes = self._routes_by_channel[channel]
        if pinned is not None:
            for route in routes:
                if route.name == pinned:
                    return route
        if len(routes) == 1:
            return routes[0]
        for route in routes:
            if route.breaker.available():
                return route
        # Every circuit is open: the one that reopens first (its pacer and backoff pace it).
        return min(routes, key=lambda r: r.breaker.open_until or 0.0)

    async def _supervise(
        self, source: asyncio.Task[None], workers: list[asyncio.Task[None]]
    ) -> None:
        """Wait for the run to end; on a stop request give in-flight sends a bounded grace.

        A task that dies of an unexpected exception (a bug) aborts the run with exit 1; the other
        tasks are cancelled and the journal is still flushed and made consistent."""
        tasks: set[asyncio.Task[None]] = {source, *workers}
        graceful = asyncio.create_task(self.stop.wait_graceful())
        immediate: asyncio.Task[None] | None = None
        deadline: asyncio.Task[None] | None = None
        try:
            while tasks:
                waits: set[asyncio.Future[Any]] = set(tasks)
                if not self.stop.stopping:
                    waits.add(graceful)
                else:
                    if immediate is None:
                        immediate = asyncio.create_task(self.stop.wait_immediate())
                        deadline = asyncio.create_task(asyncio.sleep(self.options.grace_seconds))
                    assert deadline is not None
                    waits |= {immediate, deadline}
                done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                for task in done & tasks:
                    tasks.discard(task)
                    exc = None if task.cancelled() else task.exception()
                    if exc is not None:
                        self._crashed(exc)
                        if task is source:
                            # Intake failed (bad input mid-file, a changed file, the reader
                            # died): the workers finish the sends in flight, leave the queued
                            # rest pending (the run is aborted) and stop at the sentinels the
                            # source queued on its way out. Cancelling them would leave every
                            # send in flight in doubt for nothing.
                            continue
                        for other in tasks:
                            other.cancel()
                if immediate is not None and (immediate in done or (deadline in done)):
                    break  # the rest are cancelled below, as when the caller is
        finally:
            for helper in (graceful, immediate, deadline):
                if helper is not None:
                    helper.cancel()
            if tasks:
                # The caller's task was cancelled (an application's own loop, a timeout; Ctrl-C
                # in `asyncio.run`): the run's tasks end with it, as in an immediate stop, not
                # after it in that loop, against providers and a journal closed under them.
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    def _crashed(self, exc: BaseException) -> None:
        if isinstance(exc, JournalError) and isinstance(exc.__cause__, LockWaitAbandoned):
            return  # the immediate stop gave up the journal's wait: it decides the outcome
        if isinstance(exc, CampaignError):
            self._fail_run(_Abort(exc.exit_code, "error", redact(str(exc), self.secrets)))
        else:
            self._fail_run(_Abort(
                ExitCode.INTERNAL, "internal_error",
                f"internal error: {type(exc).__name__}: {redact(str(exc), self.secrets)}",
            ))

    async def _ticker(self, policy: Policy, total: int, started: float) -> None:
        """Once per interval: pick up opt-outs recorded since the run began; report progress.

        Opt-outs that cannot be read can no longer be honoured: the run stops (exit 1, the rest
        pending). A progress display that fails is dropped with a warning; the poll goes on."""
        while True:
            # Loop time, not the injected clock: this is a background poll, not a wait in a test.
            await asyncio.sleep(self.options.poll_interval)
            try:
                updates = await asyncio.to_thread(policy.fetch_updates)
            except Exception as exc:  # noqa: BLE001 - the run's outcome, decided by _crashed
                self._crashed(exc)
                return
            policy.apply(updates)
            self._report_progress(total, started)

    def _report_progress(self, total: int, started: float) -> None:
        if self.on_progress is not None:
            try:
                self.on_progress(self._progress(total, started))
            except Exception as exc:  # noqa: BLE001 - a display must not stop the poll
                self.on_progress = None
                self.warnings.append(f"progress display stopped: {type(exc).__name__}: "
                                     f"{redact(str(exc), self.secrets)}")

    def _progress(self, total: int, started: float) -> Progress:
        counts = self._baseline + self._session_counts
        sent = sum(counts[s.value] for s in SENT_STATES)
        skipped = sum(counts[s.value] for s in SKIPPED_STATES)
        failed = sum(counts[s.value] for s in FAILED_STATES)
        channels = max(1, len(self.campaign.channels.enabled()))
        elapsed = max(self.clock.monotonic() - started, 1e-9)
        return Progress(
            total=total * channels if self.campaign.strategy == "all" else total,
            done=sent + skipped + failed, sent=sent, skipped=skipped, failed=failed,
            pending=counts[State.PENDING.value], spend_micros=self._spent,
            elapsed_s=elapsed, rate_per_s=self._sent_this_session / elapsed,
            currency=self.campaign.limits.currency,
        )

    def progress(self, total: int, started: float) -> Progress:
        return self._progress(total, started)

    # -- source ----------------------------------------------------------------------------

    def _open_reader(self, spec: RecipientSpec, start_row: int, total_rows: int) -> ChunkReader:
        mode = self.options.reader
        if mode == "auto":
            to_read = total_rows - start_row + 1
            mode = "process" if to_read >= self.options.process_reader_min_rows else "inline"
        if mode == "process":
            return ProcessChunkReader(spec, self.options.chunk_size, start_row, self.options.limit)
        return InlineChunkReader(spec, self.options.chunk_size, start_row, self.options.limit)

    async def _read_ahead(
        self, reader: ChunkReader, chunks: asyncio.Queue[Chunk | BaseException | None]
    ) -> None:
        """Read the next chunks while earlier ones are admitted, rendered and queued. The queue
        bounds how far ahead (a chunk or two); an error is handed on to be raised."""
        try:
            while not self.stop.stopping and self._abort is None:
                chunk = await asyncio.to_thread(reader.next_chunk)
                if chunk is None:
                    break
                await chunks.put(chunk)
        except Exception as exc:  # noqa: BLE001 - raised by the source, which owns the outcome
            await chunks.put(exc)
            return
        await chunks.put(None)

    async def _admit_ahead(
        self,
        chunks: asyncio.Queue[Chunk | BaseException | None],
        ready: asyncio.Queue[asyncio.Future[_Ready | None] | BaseException | None],
        policy: Policy,
        start_row: int,
    ) -> None:
        """Admit each chunk and check its policy while earlier ones are rendered and queued.

        Several chunks are in flight at once (as many as ``ready`` holds): each admission waits
        for a journal commit and each policy check for a thread, and one chunk at a time left
        the render loop waiting on them (measured: 6 of 9.5 s). The writer runs admissions in
        the order they were asked (the order the tasks start), so the first row claiming a key
        still wins; the render loop awaits the results in file order. Once the spend cap is hit,
        chunks are only admitted (they stay pending)."""
        try:
            while not self.stop.stopping and self._abort is None:
                chunk = await chunks.get()
                if chunk is None:
                    break
                if isinstance(chunk, BaseException):
                    raise chunk
                if self._cap_hit:
                    await self._admit_only(chunk, start_row)
                    continue
                task = asyncio.ensure_future(self._prepare_chunk(chunk, policy, start_row))
                self._admitting.add(task)
                task.add_done_callback(self._admitted)
                await ready.put(task)
        except Exception as exc:  # noqa: BLE001 - raised by the source, which owns the outcome
            await ready.put(exc)
            return
        await ready.put(None)

    def _admitted(self, task: asyncio.Future[_Ready | None]) -> None:
        self._admitting.discard(task)
        # Its failure (the journal's, which stops the run and is reported once) counts as seen:
        # the source may stop before it reaches this task, or before the task reaches its queue,
        # and asyncio would print the unretrieved exception with a traceback on standard error.
        if not task.cancelled():
            task.exception()

    async def _source(
        self,
        queue: asyncio.Queue[_Job | None],
        spec: RecipientSpec,
        renderer: Renderer,
        policy: Policy,
        start_row: int,
        total_rows: int,
        workers: int,
    ) -> None:
        """Three stages, each a few chunks ahead of the next (measured: one or two ahead left the
        loop idle a quarter of the time; four and three ahead took the dry run from 15.5k to
        20.5k msg/s in process): read (in a thread or a child
        process), admit + policy (the writer thread and a policy thread), render + queue (here)."""
        # (cancelled while it opens, its child process starting: the reader it opens is closed,
        # not handed to nobody and left to the collector)
        reader = await _in_thread_to_the_end(
            functools.partial(self._open_reader, spec, start_row, total_rows),
            undo=lambda opened: opened.close())
        chunks: asyncio.Queue[Chunk | BaseException | None] = asyncio.Queue(4)
        ready: asyncio.Queue[asyncio.Future[_Ready | None] | BaseException | None] = (
            asyncio.Queue(3)
        )
        helpers = [
            asyncio.create_task(self._read_ahead(reader, chunks)),
            asyncio.create_task(self._admit_ahead(chunks, ready, policy, start_row)),
        ]
        try:
            while not self.stop.stopping and self._abort is None:
                item = await ready.get()
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                prepared = await item
                if prepared is not None and not self._cap_hit:
                    # (past the cap the rest is only admitted: pending)
                    await self._render_chunk(queue, prepared, renderer, policy)
        except Exception:
            # The workers still need their sentinels to stop (see `_supervise`); queue them
            # from a task of their own, as the queue may be full.
            self._sentinels = asyncio.create_task(self._put_sentinels(queue, workers))
            raise
        finally:
            try:
                for helper in helpers:
                    helper.cancel()
                await asyncio.gather(*helpers, return_exceptions=True)
                # Admissions still in flight finish (their rows are journaled as pending, to
                # resume), including one whose task was made just before its helper was cancelled.
                if self._admitting:
                    await asyncio.gather(*self._admitting, return_exceptions=True)
            finally:
                # Also when a second cancellation cuts the waits above short (KeyboardInterrupt
                # out of `asyncio.run` cancels every task, and the run cancels its own): the
                # reader's child process and file are closed, not left to the collector.
                await _in_thread_to_the_end(reader.close)
        await self._put_sentinels(queue, workers)

    async def _put_sentinels(self, queue: asyncio.Queue[_Job | None], workers: int) -> None:
        """Workers stop at their sentinel; when stopping they drop what is left before it."""
        for _ in range(workers):
            await queue.put(None)

    def _admissions(
        self, chunk: list[Recipient | InvalidRow], start_row: int
    ) -> tuple[list[runs.Admit], dict[int, Recipient]]:
        channels = self.campaign.channels.enabled()
        first_only = self.campaign.strategy == "first_available"
        keyed = {Channel.WEBHOOK} if self._webhook_by_key else set()
        admits: list[runs.Admit] = []
        recipients: dict[int, Recipient] = {}
        for item in chunk:
            if item.row < start_row:
                continue
            if isinstance(item, InvalidRow):
                for channel in channels[:1] if first_only else channels:
                    admits.append(runs.Admit(item.row, item.line, channel._value_, None, None,
                                             _INVALID, item.reason, item.detail))
                continue
            recipients[item.row] = item
            chosen = channels
            if first_only:
                usable = [c for c in channels if c in item.addresses or c in keyed]
                chosen = tuple(usable[:1]) or channels[:1]
            for channel in chosen:
                address = item.addresses.get(channel)
                if address is None and channel in keyed:
                    address = item.key  # one POST per recipient to the provider's own URL
                if address is not None:
                    admits.append(runs.Admit(item.row, item.line, channel._value_, item.key,
                                             address, _PENDING))
                else:
                    reason, detail = item.problems.get(channel, ("no_address", "no address"))
                    admits.append(runs.Admit(item.row, item.line, channel._value_, item.key, None,
                                             _INVALID, reason, detail))
        return admits, recipients

    async def _admit(
        self, admits: list[runs.Admit]
    ) -> dict[tuple[int, str], tuple[str, str | None, str | None]]:
        run_id = self._run.id
        now = iso(self.clock.now())
        states: dict[tuple[int, str], tuple[str, str | None, str | None]] = await self._writer.call(
            lambda conn: runs.admit(conn, run_id, admits, True, now)
        )
        # Count what this session added, for progress (rows journaled earlier are baseline).
        mark = self._max_row_start
        self._session_counts.update(
            states[(a.row, a.channel)][0] for a in admits if a.row > mark
        )
        return states

    async def _admit_only(self, chunk: list[Recipient | InvalidRow], start_row: int) -> None:
        admits, _ = self._admissions(chunk, start_row)
        if admits:
            await self._admit(admits)

    async def _prepare_chunk(
        self, chunk: Chunk, policy: Policy, start_row: int
    ) -> _Ready | None:
        """Admit a chunk and check its open rows against the policy (one query per channel)."""
        admits, recipients = self._admissions(chunk, start_row)
        if not admits:
            return None
        states = await self._admit(admits)
        resend_policy = self.campaign.in_doubt_policy == "resend"

        # Which admitted rows are still open: pending, or in doubt and allowed a resend.
        open_rows: list[tuple[Recipient, Channel, str, str, str | None]] = []
        hashes: dict[str, list[str]] = {}
        pending = _PENDING
        in_doubt = _IN_DOUBT
        for a in admits:
            if a.address is None:
                continue
            state, provider, rkey = states.get((a.row, a.channel), (None, None, None))
            if state == pending:
                ahash = address_hash(a.address)
                hashes.setdefault(a.channel, []).append(ahash)
                open_rows.append((recipients[a.row], _CHANNELS[a.channel], a.address, ahash,
                                  None))
            elif state == in_doubt:
                # Only to the provider that may already have it, and only if it deduplicates
                # or the campaign accepts a possible duplicate.
                channel = _CHANNELS[a.channel]
                routes = self._routes_by_channel[channel]
                route = next((r for r in routes if r.name == provider), None)
                # A provider that replaced it in the campaign never saw the key, nor did any
                # provider see the key made from another key column (recipients.key changed):
                # deduplication cannot stop a second copy, so the policy decides.
                dedupes = route is not None and route.provider.deduplicates and rkey == a.rkey
                if dedupes or resend_policy:
                    route = route or routes[0]
                    ahash = address_hash(a.address)
                    hashes.setdefault(a.channel, []).append(ahash)
                    open_rows.append((recipients[a.row], channel, a.address, ahash, route.name))
        if not open_rows:
            return None

        # Policy: one query per channel for the whole chunk, a chunk or two before rendering.
        refusals: dict[str, dict[str, tuple[State, str]]] = {}
        for channel_name, chunk_hashes in hashes.items():
            refusals[channel_name] = await asyncio.to_thread(
                policy.check_chunk, channel_name, chunk_hashes
            )
        return _Ready(open_rows, refusals)

    async def _render_chunk(
        self,
        queue: asyncio.Queue[_Job | None],
        prepared: _Ready,
        renderer: Renderer,
        policy: Policy,
    ) -> None:
        """Render, cost and queue a prepared chunk's rows; refusals become final states."""
        open_rows = prepared.open_rows
        refusals = prepared.refusals
        now = iso(self.clock.now())
        dry_rows: list[tuple[Any, ...]] = []
        try:
            await self._render_rows(queue, open_rows, refusals, renderer, policy, now, dry_rows)
        finally:
            if dry_rows:  # one queue item for the chunk's outcomes
                self._writer.submit_many(SQL_DRY_RUN, dry_rows)

    async def _render_rows(
        self,
        queue: asyncio.Queue[_Job | None],
        open_rows: list[tuple[Recipient, Channel, str, str, str | None]],
        refusals: dict[str, dict[str, tuple[State, str]]],
        renderer: Renderer,
        policy: Policy,
        now: str,
        dry_rows: list[tuple[Any, ...]],
    ) -> None:
        run = self._run
        dry_run = self.options.dry_run
        for recipient, channel, address, ahash, pinned in open_rows:
            resend = pinned is not None
            if self.stop.stopping or self._abort is not None:
                return  # the rest stays pending (or in doubt), to be resumed
            channel_name = channel._value_
            refused = refusals[channel_name].get(ahash) or policy.refused_now(channel_name, ahash)
            if refused is not None:
                self._final(recipient.row, channel, refused[0], refused[1], None, now,
                            was=State.IN_DOUBT if resend else State.PENDING)
                continue
            routes = self._routes_by_channel[channel]
            try:
                content = renderer.render(channel, recipient, address)
            except RenderError as exc:
                self._final(recipient.row, channel, State.RENDER_FAILED, "render_failed",
                            redact(str(exc), self.secrets), now,
                            was=State.IN_DOUBT if resend else State.PENDING)
                continue
            if len(routes) == 1:
                route = routes[0]
                cost = cost_of(content, route.price_per_message, route.price_per_segment)
                costs = {route.name: cost}
            else:
                costs = {r.name: cost_of(content, r.price_per_message, r.price_per_segment)
                         for r in routes}
                cost = max(costs.values())
            if not self._budget.try_reserve(cost):
                self._cap_hit = True
                return  # intake stops; the source admits the rest of the file as pending
            if dry_run:
                # Nothing leaves, so there is no intent to journal and nothing to pace: the row
                # records what would have been sent, and at what cost.
                self._budget.commit(cost)
                self._spent += cost
                dry_rows.append((cost, content_hash(content), now, run.id, recipient.row,
                                 channel_name))
                self._count(State.SENT, State.IN_DOUBT if resend else State.PENDING)
                self._sent_this_session += 1
                if resend:
                    self._in_doubt_resent += 1  # what the real resume would report
                continue
            message = OutboundMessage(
                run.id, recipient.row, channel, recipient.key, address,
                idempotency_key(run.campaign, run.run_key, recipient.key, channel_name),
                content, content_hash(content), cost,
            )
            job = _Job(message, ahash, pinned, resend, costs, cost)
            if queue.full():
                await queue.put(job)  # backpressure: wait for the workers
            else:
                queue.put_nowait(job)

    def _final(self, row: int, channel: Channel, state: State, reason: str | None,
               detail: str | None, now: str, content_hash: str | None = None,
               was: State = State.PENDING) -> None:
        self._writer.submit(
            runs.SQL_REFUSED,
            (state.value, reason, detail, content_hash, now, self._run.id, row, channel.value),
        )
        self._count(state, was)

    # -- workers ---------------------------------------------------------------------------

    async def _worker(self, queue: asyncio.Queue[_Job | None]) -> None:
        while True:
            job = await queue.get()
            if job is None:
                return
            if self.stop.stopping or self._abort is not None:
                self._budget.release(job.reserved)
                continue  # not started: stays pending (or in doubt) for the resume
            route = self._batch_route(job)
            if route is None:
                await self._deliver(job)
                continue
            # A local provider takes what is queued for it in one call (one intent commit, one
            # write); anything else found on the way is delivered one by one after it. At most
            # BATCHES_IN_FLIGHT batches per provider: the slot is taken before draining, so
            # waiting workers hold one message each and memory stays bounded (measured: without
            # it, 64 workers held up to 64 batches and the 1M-row console run grew by 13 MiB).
            channel = job.message.channel
            batch, others, last = [job], [], False
            async with route.batch_slots:
                while len(batch) < route.batch_size and not queue.empty():
                    more = queue.get_nowait()
                    if more is None:
                        last = True  # this worker's sentinel: stop after this batch
                        break
                    if more.message.channel is channel:  # one route per channel
                        batch.append(more)
                    else:
                        others.append(more)
                await self._deliver_batch(route, batch)
            for other in others:
                if self.stop.stopping or self._abort is not None:
                    self._budget.release(other.reserved)
                    continue
                await self._deliver(other)
            if last:
                return

    async def _refused_in_store(self, channel: str, jobs: list[_Job]) -> Mapping[str, Refusal]:
        """Nothing, unless more opt-outs arrived during the run than the policy holds: then the
        store's answer for these jobs, asked right before they leave."""
        if not self._policy.overflowed or self.stop.stopping or self._abort is not None:
            return {}
        try:
            return await asyncio.to_thread(
                self._policy.refused_in_store, channel, [job.address_hash for job in jobs]
            )
        except Exception as exc:  # noqa: BLE001 - the run's outcome, decided by _crashed
            # Opt-outs that cannot be read can no longer be honoured: the run stops, as when the
            # poll fails; the callers see the abort and put these back (they never left).
            self._crashed(exc)
            return {}

    def _batch_route(self, job: _Job) -> _Route | None:
        """The route to batch this job on, if any: a provider that takes batches, no failover (a
        batch moves as one, so no breaker decisions per message), and not paced at the moment (a
        batch would bunch paced sends; an adaptive slow-down after a 429 pauses batching too)."""
        routes = self._routes_by_channel[job.message.channel]
        if len(routes) != 1:
            return None
        route = routes[0]
        if route.batch_size <= 1 or route.pacer.rate is not None or route.pacer.paused:
            return None
        return route

    async def _deliver_batch(self, route: _Route, jobs: list[_Job]) -> None:
        """`_deliver` for many messages at once: every intent committed, one `send_batch`, every
        outcome journaled. A message that failed goes on alone through the same retry, dead
        letter and abort decisions as `_deliver` (it is one attempt in)."""
        run_id = self._run.id
        name = route.name
        stamp = self._stamp()
        sending: list[_Job] = []
        intents: list[tuple[Any, ...]] = []
        for job in jobs:
            message = job.message
            if self.stop.stopping or self._abort is not None:
                self._budget.release(job.reserved)
                continue
            refused = self._policy.refused_now(message.channel._value_, job.address_hash)
            if refused is not None:
                self._budget.release(job.reserved)
                self._final(message.row, message.channel, refused[0], refused[1], None, stamp,
                            message.content_hash,
                            State.IN_DOUBT if job.resend else State.PENDING)
                continue
            sending.append(job)
            intents.append((name, job.costs[name], message.content_hash, 1 if job.resend else 0,
                            stamp, run_id, message.row, message.channel._value_))
        if not sending:
            return
        # Intent before action, as in `_deliver`: every row of the batch is `sending`, committed.
        self._writer.submit_many(runs.SQL_INTENT, intents)
        provider = route.batcher  # (isinstance on a runtime Protocol costs ~40 us: once, above)
        assert provider is not None
        loop = asyncio.get_running_loop()
        left = False
        try:
            await self._writer.barrier()
            async with route.semaphore:
                # Opt-outs polled while the batch waited for its commit and its slot (or, past
                # what the policy holds, recorded by now: asked before the stop check, as the
                # run may stop meanwhile).
                channel_name = sending[0].message.channel._value_  # (a batch has one channel)
                stored = await self._refused_in_store(channel_name, sending)
                if self.stop.stopping or self._abort is not None:
                    for job in sending:  # as in `_deliver`: it never left
                        self._unsend((run_id, job.message.row, job.message.channel._value_),
                                     job)
                        self._budget.release(job.reserved)
                    return
                kept: list[_Job] = []
                for job in sending:
                    refused = (self._policy.refused_now(channel_name, job.address_hash)
                               or stored.get(job.address_hash))
                    if refused is None:
                        kept.append(job)
                    else:
                        self._refuse((run_id, job.message.row, channel_name), job, refused,
                                     job.costs[name], intent=True)
                sending = kept
                if not sending:
                    return
                left = True
                started = loop.time()
                try:
                    outcomes = await provider.send_batch([job.message for job in sending])
                    if len(outcomes) != len(sending):
                        raise RuntimeError(f"send_batch answered {len(outcomes)} outcomes for "
                                           f"{len(sending)} messages")
                except ProviderError as exc:  # the provider's answer for every message
                    outcomes = [exc] * len(sending)
                except Exception as exc:  # noqa: BLE001 - which of them left is unknown
                    keys = [(run_id, job.message.row, job.message.channel._value_)
                            for job in sending]
                    self._provider_crashed(keys, 1, name, exc, started)
                    return
        except asyncio.CancelledError:
            # Sent: the rows stay `sending` and become `in_doubt` when the run ends.
            if not left:
                for job in sending:
                    self._unsend((run_id, job.message.row, job.message.channel._value_),
                                 job)
            raise
        done_at = self._stamp()
        latency = round((loop.time() - started) * 1000, 2)
        attempts: list[tuple[Any, ...]] = []
        sent: list[tuple[Any, ...]] = []
        failures: list[tuple[_Job, ProviderError]] = []
        budget = self._budget
        resent = 0
        for job, outcome in zip(sending, outcomes, strict=True):
            message = job.message
            if not isinstance(outcome, SendResult):
                failures.append((job, outcome))
                continue
            channel = message.channel._value_
            attempts.append((run_id, message.row, channel, 1, name, "sent", outcome.status_code,
                             outcome.provider_message_id, None, None, latency, done_at))
            sent.append((outcome.provider_message_id, outcome.status_code, done_at, run_id,
                         message.row, channel))
            cost = job.costs[name]
            budget.settle(job.reserved, cost)
            self._spent += cost
            if job.resend:
                resent += 1
        if sent:
            self._writer.submit_many(runs.SQL_ATTEMPT, attempts)
            self._writer.submit_many(runs.SQL_SENT, sent)
            counts = self._session_counts
            counts[_SENT] += len(sent)
            counts[_PENDING] -= len(sent) - resent
            counts[_IN_DOUBT] -= resent
            self._in_doubt_resent += resent
            self._sent_this_session += len(sent)
            route.refusals.clear()
            route.breaker.success()
            route.pacer.succeeded(len(sent))
        for job, error in failures:
            key = (run_id, job.message.row, job.message.channel._value_)
            self._attempt(key, 1, name, _outcome_of(error), error, None, started, done_at)
            retry, pinned = await self._after_error(job, route, 1, error, key, job.pinned)
            if retry:
                await self._deliver(job, attempt=1, pinned=pinned)

    async def _deliver(self, job: _Job, attempt: int = 0, pinned: str | None = None) -> None:
        message = job.message
        channel = message.channel
        key = (self._run.id, message.row, channel._value_)
        if pinned is None:
            pinned = job.pinned
        loop = asyncio.get_running_loop()
        while True:
            route = self._pick(channel, pinned)
            # Half-open: the probe is taken now, so other workers pick the next provider
            # instead of all waiting for this one's bucket and then all sending to it.
            probe = route.breaker.attempt()
            await self._pause(route)
            if not self.stop.stopping and self._abort is None:
                await route.pacer.acquire()
            if self.stop.stopping or self._abort is not None:
                route.breaker.release(probe)
                self._budget.release(job.reserved)
                return
            refused = self._policy.refused_now(channel._value_, job.address_hash)
            if refused is not None:
                route.breaker.release(probe)
                self._refuse(key, job, refused, job.costs[route.name], intent=False)
                return
            attempt += 1
            cost = job.costs[route.name]
            intent = (route.name, cost, message.content_hash, 1 if job.resend else 0,
                      self._stamp(), *key)
            # Intent before action: the `sending` row is committed before the request leaves.
            self._writer.submit(runs.SQL_INTENT, intent)
            error: ProviderError | None = None
            left = False
            try:
                await self._writer.barrier()
                async with route.semaphore:
                    await self._pause(route)
                    if not self.stop.stopping and self._abort is None:
                        await route.pacer.gate()
                    # Past what the policy holds, the store's answer (asked before the stop
                    # check: the run may stop meanwhile, or stop because it cannot answer).
                    stored = (await self._refused_in_store(channel._value_, [job])
                              if self._policy.overflowed else _NO_REFUSALS)
                    if self.stop.stopping or self._abort is not None:
                        # Stopped (or a 401 came) while this one waited for its commit, the
                        # provider's slot or its bucket: it never left.
                        route.breaker.release(probe)
                        self._unsend(key, job)
                        self._budget.release(job.reserved)
                        return
                    # An opt-out polled while it waited (for its commit, a slot held by slow
                    # sends, a Retry-After pause) is honoured too: it has not left yet.
                    refused = (self._policy.refused_now(channel._value_, job.address_hash)
                               or stored.get(job.address_hash))
                    if refused is not None:
                        route.breaker.release(probe)
                        self._refuse(key, job, refused, cost, intent=True)
                        return
                    left = True
                    started = loop.time()
                    try:
                        result = await route.provider.send(message)
                    except ProviderError as exc:
                        self._attempt(key, attempt, route.name, _outcome_of(exc), exc, None,
                                      started)
                        error = exc
                    except NotSentError as exc:  # it never left, and nothing more can
                        route.breaker.release(probe)
                        self._unsend(key, job)
                        self._budget.release(job.reserved)
                        self._fail_run(_Abort(
                            ExitCode.INTERNAL, "internal_error",
                            f"provider {route.name}: {redact(str(exc), self.secrets)}",
                        ))
                        return
                    except Exception as exc:  # noqa: BLE001 - a bug in an adapter: stop
                        self._provider_crashed([key], attempt, route.name, exc, started)
                        return
                    else:
                        done_at = self._attempt(key, attempt, route.name, "sent", None, result,
                                                started)
            except asyncio.CancelledError:
                # Stopped at once. Sent: the row stays `sending`, and becomes `in_doubt` when
                # the run ends. Not yet sent: not in doubt, just not sent.
                if not left:
                    self._unsend(key, job)
                raise
            if error is None:
                route.refusals.clear()
                route.breaker.success()
                route.pacer.succeeded()
                if result.segments is not None:
                    cost = self._billed(route, message, result.segments, cost, key)
                self._budget.settle(job.reserved, cost)
                self._spent += cost
                self._writer.submit(
                    runs.SQL_SENT,
                    (result.provider_message_id, result.status_code, done_at, *key),
                )
                self._count(State.SENT, State.IN_DOUBT if job.resend else State.PENDING)
                self._sent_this_session += 1
                if job.resend:
                    self._in_doubt_resent += 1
                return
            retry, pinned = await self._after_error(job, route, attempt, error, key, pinned,
                                                    probe)
            if not retry:
                return

    def _billed(self, route: _Route, message: OutboundMessage, segments: int, cost: int,
                key: tuple[int, int, str]) -> int:
        """What a message the provider counted ``segments`` SMS segments for costs. The cap
        reserved our own count; when the provider's differs (an encoding it chose, a character
        counted otherwise), what it bills is what the run records as spent, and it says so."""
        content = message.content
        if not isinstance(content, SmsContent) or segments == content.segments:
            return cost
        billed = route.price_per_message + segments * route.price_per_segment
        self._segment_mismatches += 1
        if self._segment_mismatches == 1:
            self.warnings.append(
                f"{route.name} counted {segments} SMS segment(s) for row {message.row} where "
                f"this run counted {content.segments} ({content.encoding}): the spend records "
                "the provider's count (see `campaign trace` for each such message's cost)"
            )
        self._writer.submit(
            "UPDATE messages SET cost_micros = ? WHERE run_id = ? AND row = ? AND channel = ?",
            (billed, *key),
        )
        return billed

    async def _after_error(
        self, job: _Job, route: _Route, attempt: int, error: ProviderError,
        key: tuple[int, int, str], pinned: str | None, probe: bool = False,
    ) -> tuple[bool, str | None]:
        """What a failed attempt leads to: (True, pinned) to try again (the backoff is already
        slept), or (False, _) once the row's outcome is journaled or left for the resume."""
        cost = job.costs[route.name]
        if isinstance(error, TransientError):  # includes RateLimitedError
            route.breaker.failure()  # a definite failure: failover may move the message
            if isinstance(error, RateLimitedError):
                route.pacer.rate_limited(error.retry_after)
            verdict = await self._retry(route, attempt, error, key, error.retry_after,
                                        job.ambiguous)
            if verdict == "retry":
                return True, pinned
            if job.doubted:  # a timeout this session may have been charged: it stays spent
                self._budget.settle(job.reserved, cost)
                self._spent += cost
            else:
                self._budget.release(job.reserved)
            if verdict == "give_up" and job.ambiguous:
                # Retries ran out after an ambiguous attempt, which may have arrived: the row
                # stays in doubt (reported, pinned, never re-driven), not a dead letter.
                self._unsend(key, job, undo_attempt=False, error=error)
            elif verdict == "give_up":
                self._record(key, State.FAILED, "retries_exhausted", error)
            elif job.ambiguous:
                self._unsend(key, job, undo_attempt=False)
            return False, pinned  # "stop": left pending (or in doubt) for the resume
        if isinstance(error, InDoubtError):
            pinned = route.name  # never move an ambiguous message to another provider
            route.breaker.inconclusive(probe)
            if route.provider.deduplicates and attempt < route.attempts:
                job.doubted = True
                await self._backoff(route, attempt, None)
                return True, pinned  # same idempotency key: the provider drops a second copy
            self._budget.settle(job.reserved, cost)  # it may have been charged
            self._spent += cost
            self._record(key, State.IN_DOUBT, "in_doubt", error)
            return False, pinned
        if isinstance(error, ProviderAuthError):
            self._settle_or_release(job, cost)  # doubted: it stays in doubt, and spent
            self._unsend(key, job)
            self._fail_run(_Abort(
                ExitCode.PROVIDER_AUTH, "provider_auth",
                f"provider {route.name} refused our credentials or configuration: "
                f"{redact(str(error), self.secrets)}",
            ))
            return False, pinned
        assert isinstance(error, PermanentError)
        if error.answered:
            route.breaker.success()  # it answered: the provider is up
        else:
            route.breaker.release(probe)  # refused before it left: the next send may probe
        self._settle_or_release(job, cost)
        if job.doubted:
            # A timeout this session may have been charged: the row ends refused, and what that
            # attempt may have cost is banked as an in-doubt resend's is (`runs.BANK_DOUBT`).
            self._writer.submit(
                "UPDATE messages SET doubt_micros = doubt_micros + cost_micros "
                "WHERE run_id = ? AND row = ? AND channel = ?", key,
            )
        if error.action == "invalid":
            self._record(key, State.INVALID, error.code or "rejected", error)
        else:
            if error.action == "suppress":
                self._suppress(job.message, job.address_hash, error)
            self._record(key, State.FAILED, error.code or "rejected", error)
            if error.action is None:
                self._note_refusal(route, key, error, job.resend)
        return False, pinned

    def _settle_or_release(self, job: _Job, cost: int) -> None:
        """The message is done with this session: spent if an attempt this session may have
        been charged (``doubted``), else its reservation goes back."""
        if job.doubted:
            self._budget.settle(job.reserved, cost)
            self._spent += cost
        else:
            self._budget.release(job.reserved)

    def _note_refusal(self, route: _Route, key: tuple[int, int, str],
                      error: PermanentError, resend: bool) -> None:
        """A provider whose own endpoint refuses `SAME_REFUSALS` messages in a row with the same
        code, none accepted in between, is refusing our configuration (a sender it does not
        know, an account that cannot send there), not the recipients: stop before the list
        burns into dead letters, with exit 6, and put the refused rows back as they were:
        `pending`, or `in_doubt` for an in-doubt resend (an earlier copy may have arrived: it
        stays pinned to its provider, and the resume reports it again)."""
        if not route.refusal_guard:
            return
        code = error.code or f"http_{error.status}"
        if code != route.refusal_code:
            route.refusal_code, route.refusals = code, []
        route.refusals.append((key, resend))
        if len(route.refusals) < SAME_REFUSALS:
            return
        stamp = self._stamp()
        for refused, was_in_doubt in route.refusals:
            # As `_unsend`: what the earlier attempt may have cost was banked by the resend's
            # intent; the refused attempt's own cost comes off it again.
            self._writer.submit(
                "UPDATE messages SET state = ?, reason = ?, detail = NULL, "
                "error_code = NULL, status_code = NULL, "
                "doubt_micros = doubt_micros - ? * cost_micros, updated_at = ? "
                "WHERE run_id = ? AND row = ? AND channel = ? AND state = 'failed'",
                (_IN_DOUBT if was_in_doubt else _PENDING, "in_doubt" if was_in_doubt else None,
                 int(was_in_doubt), stamp, *refused),
            )
            self._count(State.IN_DOUBT if was_in_doubt else State.PENDING, State.FAILED)
        route.refusals = []
        self._fail_run(_Abort(
            ExitCode.PROVIDER_AUTH, "provider_auth",
            f"provider {route.name} refused {SAME_REFUSALS} messages in a row with the same "
            f"error and accepted none in between ({code}: "
            f"{redact(error.text, self.secrets)[:200]}): its configuration (sender, account, "
            "region) is likely wrong; those messages and the rest are left to resume",
        ))

    def _unsend(self, key: tuple[int, int, str], job: _Job, undo_attempt: bool = True,
                error: ProviderError | None = None) -> None:
        """Put back a row whose request did not leave (or was refused outright) as it was
        before its intent: `pending`, or `in_doubt` if an earlier attempt was ambiguous (a
        resend, or a timeout this session), still pinned to its provider by the journal. With
        ``error`` (its retries ran out) the row says so in its reason and detail.

        What an earlier session's attempt may have cost was banked in ``doubt_micros`` by the
        resend's intent (`runs.BANK_DOUBT`); this attempt's ``cost_micros`` comes off it again,
        unless a timeout this session may have charged it."""
        if not job.ambiguous:
            state, unbank = _PENDING, 0
        else:
            state, unbank = _IN_DOUBT, int(not job.doubted)
            if not job.resend:
                self._count(State.IN_DOUBT)
        self._writer.submit(
            "UPDATE messages SET state = ?, attempts = attempts - ?, "
            "doubt_micros = doubt_micros - ? * cost_micros, updated_at = ? "
            "WHERE run_id = ? AND row = ? AND channel = ?",
            (state, int(undo_attempt), unbank, self._stamp(), *key),
        )
        if error is not None:
            self._writer.submit(
                "UPDATE messages SET reason = 'in_doubt', error_code = ?, status_code = ?, "
                "detail = ? WHERE run_id = ? AND row = ? AND channel = ?",
                (error.code, error.status,
                 redact(f"retries ran out after an ambiguous attempt: {error.text}",
                        self.secrets)[:500], *key),
            )

    def _refuse(self, key: tuple[int, int, str], job: _Job, refused: Refusal, cost: int,
                intent: bool) -> None:
        """The policy refuses a message before this attempt left (an opt-out polled meanwhile):
        the row is put back as it was before the attempt's intent (`_unsend`), then refused.
        If an earlier attempt this session may have arrived (``doubted``), the row is refused
        as a resume refuses an in-doubt row: what that attempt may have cost stays spent."""
        if intent or job.doubted:
            self._unsend(key, job, undo_attempt=intent)
        if job.doubted:
            self._budget.settle(job.reserved, cost)
            self._spent += cost
        else:
            self._budget.release(job.reserved)
        message = job.message
        self._final(message.row, message.channel, refused[0], refused[1], None, self._stamp(),
                    message.content_hash, State.IN_DOUBT if job.ambiguous else State.PENDING)

    def _provider_crashed(self, keys: list[tuple[int, int, str]], attempt: int, provider: str,
                          exc: Exception, started: float) -> None:
        """A provider raised something other than a `ProviderError` (a bug, a disk failure):
        whether its message(s) left is unknown, so they are in doubt, and the run stops."""
        for key in keys:
            self._attempt(key, attempt, provider, "error", exc, None, started)
            self._record(key, State.IN_DOUBT, "internal_error", exc)
        self._fail_run(_Abort(
            ExitCode.INTERNAL, "internal_error",
            # Our own failures (the HTTP process died) say what happened; anything else is
            # named by its class, as a bug would be.
            f"provider {provider}: {redact(str(exc), self.secrets)}"
            if isinstance(exc, CampaignError) else
            f"provider {provider} raised {type(exc).__name__}: {redact(str(exc), self.secrets)}",
        ))

    def _attempt(self, key: tuple[int, int, str], attempt: int, provider: str, outcome: str,
                 exc: BaseException | None, result: SendResult | None, started: float,
                 at: str | None = None) -> str:
        """Journal one attempt; returns its timestamp, so the outcome can share it."""
        at = at or self._stamp()
        latency = round((asyncio.get_running_loop().time() - started) * 1000, 2)
        if exc is not None:
            code = getattr(exc, "code", None)
            text = getattr(exc, "text", None) or str(exc) or type(exc).__name__
            params: tuple[Any, ...] = (
                *key, attempt, provider, outcome, getattr(exc, "status", None), None,
                None if code is None else str(code), redact(text, self.secrets)[:500], latency,
                at,
            )
        else:
            assert result is not None
            params = (*key, attempt, provider, outcome, result.status_code,
                      result.provider_message_id, None, None, latency, at)
        self._writer.submit(runs.SQL_ATTEMPT, params)
        return at

    async def _retry(
        self, route: _Route, attempt: int, exc: ProviderError, key: tuple[int, int, str],
        retry_after: float | None, ambiguous: bool = False,
    ) -> str:
        """"retry" after a backoff, "give_up" (attempts exhausted: a dead letter), or "stop" (the
        run is stopping: the row is left pending, since the provider definitely did not take it,
        or in doubt if an earlier attempt may have been delivered)."""
        if attempt >= route.attempts:
            return "give_up"
        # Definitely not accepted: the row is `pending` again while we wait, so a crash during
        # the backoff resumes it instead of doubting it. Unless an earlier attempt was
        # ambiguous: then it stays `sending`, and a crash leaves it in doubt.
        self._writer.submit(
            "UPDATE messages SET state = CASE WHEN ? THEN state ELSE 'pending' END, "
            "error_code = ?, detail = ?, status_code = ?, "
            "updated_at = ? WHERE run_id = ? AND row = ? AND channel = ?",
            (int(ambiguous), exc.code, redact(exc.text, self.secrets)[:500], exc.status,
             iso(self.clock.now()), *key),
        )
        if self.stop.stopping or self._abort is not None:
            return "stop"
        await self._backoff(route, attempt, retry_after)
        return "stop" if self.stop.stopping or self._abort is not None else "retry"

    async def _backoff(self, route: _Route, attempt: int, retry_after: float | None) -> None:
        ceiling = min(route.max_backoff, route.backoff * (2 ** (attempt - 1)))
        delay = self.rng.uniform(0, ceiling)  # full jitter
        if retry_after is not None:
            delay = max(delay, min(retry_after, route.max_backoff))
        await self._sleep_unless_stopped(delay)

    async def _pause(self, route: _Route) -> None:
        """Wait out the provider's Retry-After pause, if one is on, unless the run is stopped
        or aborted meanwhile (as a backoff does): a stop must not wait for a pause of minutes
        with nothing in flight. The caller checks the stop next."""
        left = route.pacer.pause_left()
        if left > 0:
            await self._sleep_unless_stopped(left)

    async def _sleep_unless_stopped(self, delay: float) -> None:
        """A backoff on the run's clock that ends early when the run is asked to stop or is
        aborted: a message waiting to retry must not hold the exit for the whole grace period
        (the caller then sees the stop and leaves the row as the resume needs it)."""
        if self.stop.stopping or self._abort is not None:
            return
        sleeper = asyncio.ensure_future(self.clock.sleep(delay))
        stopper = asyncio.ensure_future(self.stop.wait_graceful())
        halted = asyncio.ensure_future(self._halted.wait())
        try:
            await asyncio.wait((sleeper, stopper, halted), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sleeper, stopper, halted):
                task.cancel()

    def _record(self, key: tuple[int, int, str], state: State, reason: str,
                exc: BaseException) -> None:
        code = getattr(exc, "code", None)
        status = getattr(exc, "status", None)
        text = getattr(exc, "text", None) or str(exc) or type(exc).__name__
        self._writer.submit(
            "UPDATE messages SET state = ?, reason = ?, detail = ?, error_code = ?, "
            "status_code = ?, updated_at = ? WHERE run_id = ? AND row = ? AND channel = ?",
            (state.value, reason, redact(text, self.secrets)[:500],
             None if code is None else str(code), status, iso(self.clock.now()), *key),
        )
        self._count(state)

    def _count(self, state: State, was: State = State.PENDING) -> None:
        counts = self._session_counts
        counts[state._value_] += 1
        counts[was._value_] -= 1

    def _suppress(self, message: OutboundMessage, ahash: str, exc: PermanentError) -> None:
        """The provider says this address opted out (e.g. Twilio 21610): record it for good."""
        self._policy.suppress_now(ahash, message.channel.value)
        self._writer.submit(
            "INSERT OR IGNORE INTO suppressions (address_hash, address, channel, reason, source, "
            "created_at) VALUES (?, ?, ?, ?, 'provider', ?)",
            (ahash, message.address, message.channel.value,
             f"provider {exc.code or 'opt-out'}", iso(self.clock.now())),
        )

    def _fail_run(self, abort: _Abort) -> None:
        if self._abort is None:
            self._abort = abort
            self._halted.set()


# --------------------------------------------------------------------------------------------
# Helpers


SQL_DRY_RUN = (
    "UPDATE messages SET " + runs.BANK_DOUBT + "state = 'sent', provider = 'dry-run', "
    "provider_message_id = 'dry-run', "
    "attempts = attempts + 1, cost_micros = ?, content_hash = ?, updated_at = ? "
    "WHERE run_id = ? AND row = ? AND channel = ?"
)


def _stopped_before_start() -> StoppedBeforeStart:
    return StoppedBeforeStart("stopped before the run started: nothing was sent or recorded")


def _leaves_this_machine(routes: Mapping[Channel, list[_Route]]) -> bool:
    """Whether any of the run's providers delivers beyond this machine. Then each journal commit
    is synced to disk before the run goes on: a `sending` intent lost in a power cut after its
    message left would have the resume send that message again. Only providers that say they
    are ``local`` (console, outbox, the dry run's) may skip the sync: their output is lost in the
    same power cut as their journal rows."""
    return not all(getattr(route.provider, "local", False)
                   for channel_routes in routes.values() for route in channel_routes)


def _reading(campaign: Campaign) -> dict[str, Any]:
    """How a run reads its recipient file, beyond its bytes and key column: which column holds
    each channel's address, the region of national phone numbers, and the delimiter."""
    recipients = campaign.recipients
    return {
        "columns": dict(sorted(recipients.columns.model_dump(exclude_none=True).items())),
        "default_region": recipients.default_region,
        "delimiter": recipients.delimiter,
    }


def _refuse_unread_lines(path: Path, result: suppression_store.ImportResult) -> None:
    if not result.invalid:
        return
    line, value, reason = result.invalid[0]
    field, _, message = reason.partition(": ")
    others = result.invalid_total - 1
    more = f" (and {others} more such lines)" if others > 0 else ""
    text = message or reason
    if repr(value) not in text:  # (an address's own complaint names it already)
        text += f" ({value!r})"
    raise InputError(str(path), line, field or None,
                     f"{text}{more}: a campaign's opt-out and consent lists are read whole; fix "
                     "or remove the line")


def _outcome_of(exc: ProviderError) -> str:
    if isinstance(exc, RateLimitedError):
        return "rate_limited"
    if isinstance(exc, TransientError):
        return "transient"
    if isinstance(exc, InDoubtError):
        return "in_doubt"
    if isinstance(exc, ProviderAuthError):
        return "auth"
    return "permanent"


def _execute(sql: str, params: tuple[Any, ...], conn: sqlite3.Connection) -> None:
    conn.execute(sql, params)


def _valid_run_key(key: str) -> bool:
    import re

    return bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", key))


def _first_open_row(conn: sqlite3.Connection, run_id: int) -> int:
    """Records before this one are all journaled and final (in doubt rows may be re-sent): a
    resume need not normalise them.

    Every record read gets a journal row, so records 1..n are all there, unless a chunk's
    admission failed while chunks after it went in: the first missing record is open too."""
    row = conn.execute(
        "SELECT MIN(row) FROM messages WHERE run_id = ? "
        "AND state IN ('pending', 'sending', 'in_doubt')",
        (run_id,),
    ).fetchone()
    if row[0] is not None:
        bound = int(row[0])
    else:
        row = conn.execute("SELECT MAX(row) FROM messages WHERE run_id = ?", (run_id,)).fetchone()
        bound = 1 if row[0] is None else int(row[0]) + 1
    records = conn.execute(
        "SELECT COUNT(DISTINCT row) FROM messages WHERE run_id = ? AND row < ?", (run_id, bound)
    ).fetchone()[0]
    if records == bound - 1:
        return bound
    # A gap (rare): the first record missing below the bound.
    row = conn.execute(
        "SELECT MIN(m.row) + 1 FROM messages m WHERE m.run_id = :run_id AND m.row < :bound "
        "AND NOT EXISTS (SELECT 1 FROM messages n WHERE n.run_id = :run_id AND n.row = m.row + 1)",
        {"run_id": run_id, "bound": bound},
    ).fetchone()
    has_first = conn.execute(
        "SELECT 1 FROM messages WHERE run_id = ? AND row = 1 LIMIT 1", (run_id,)
    ).fetchone()
    return 1 if has_first is None else int(row[0])


def _max_row(conn: sqlite3.Connection, run_id: int) -> int:
    row = conn.execute("SELECT MAX(row) FROM messages WHERE run_id = ?", (run_id,)).fetchone()
    return 0 if row[0] is None else int(row[0])


def _snapshot_store(source: Path, target: Path, campaign: str, run_key: str) -> Path:
    """A private copy of what a dry run of run (``campaign``, ``run_key``) reads
    (`snapshot.copy_for_dry_run`): the real store is only read. A file that is not a store, or a
    newer program's, is refused here, under its own name (not the copy's)."""
    if not source.exists():
        return target
    connect(source, readonly=True).close()  # a store this program can read, or its own error
    try:
        snapshot.copy_for_dry_run(source, target, campaign, run_key)
    except sqlite3.DatabaseError as exc:
        if is_disk_full(exc):
            raise StoreError(f"{target.parent}: no room for the dry run's copy of the "
                             f"store: {exc}") from None
        raise StoreError(f"{source}: not a usable campaign store: {exc}") from None
    except OSError as exc:
        raise StoreError(f"{target}: cannot make the dry run's copy of the store: "
                         f"{exc.strerror}") from None
    return target


def run_status(conn: sqlite3.Connection, run: runs.RunRecord,
               clock: Clock | None = None, *, live: bool = True) -> RunReport:
    """A run's report from the store alone (for `campaign status`), same shape as a send's.
    A run still going is timed up to ``clock``'s now (the command's clock); one left `running`
    by a process that is gone (``live`` False: killed, or the machine went down) up to its last
    journal change, not for ever (its duration grew and its rate fell to 0/s while it lay)."""
    from datetime import datetime

    # A finished run's counts as its end recorded them: a listing of fifty runs read every
    # journal row of each (9 s for 28 runs of 200,000 rows, growing with every run kept).
    summary = run.summary if run.status != "running" else None
    if summary is None:
        summary = runs.Summary(runs.counts(conn, run.id), runs.committed_spend(conn, run.id),
                               runs.sent_since(conn, run.id, run.started_at))
    duration = 0.0
    if run.started_at:
        end = run.finished_at
        if end is None and not live:
            last = conn.execute("SELECT max(updated_at) FROM messages WHERE run_id = ? "
                                "AND updated_at >= ?", (run.id, run.started_at)).fetchone()[0]
            end = last or run.started_at
        if end is None:
            end = iso((clock or SystemClock()).now())
        duration = max(0.0, (datetime.fromisoformat(end.replace("Z", "+00:00"))
                             - datetime.fromisoformat(run.started_at.replace("Z", "+00:00"))
                             ).total_seconds())
    return RunReport(
        run_id=run.id, run_name=run.name, campaign=run.campaign, run_key=run.run_key,
        dry_run=False, resumed=run.sessions > 1, by_channel=summary.counts,
        total_rows=run.total_rows or 0, spend_micros=summary.spend_micros,
        max_spend_micros=run.max_spend_micros, currency=run.currency, duration_s=duration,
        sent_this_session=summary.sent, exit_code=run.exit_code, status=run.status,
        stopped=run.stopped, error=run.last_error, in_doubt_found=run.in_doubt_found,
        in_doubt_resent=run.in_doubt_resent, started_at=run.started_at,
        finished_at=run.finished_at,
    )


__all__ = [
    "DryRunProvider",
    "Progress",
    "RunReport",
    "Runner",
    "SendOptions",
    "StopController",
    "idempotency_key",
    "run_campaign",
]
