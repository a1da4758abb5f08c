"""One recipient's messages as a run would send them: `campaign preview CAMPAIGN --row N`.

The answer comes from the run itself, not from a second implementation of its rules: a dry run
of the first N rows (``--limit N``) on a private copy of the store decides row N on each channel
exactly as `campaign send` would (its address, the strategy, duplicates of earlier rows, opt-outs
and consent, including the campaign's own lists, the spend cap, an earlier session of the same
run), and row N is then rendered with the store's own unsubscribe secret, so links and tokens are
the ones the real run would write. Nothing is sent and the store is only read.

A row an earlier session of the run already decided (sent, suppressed, ...) is reported as such
(``already``), from the real journal.
"""

from __future__ import annotations

import contextlib
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from campaign_cli.clock import Clock
from campaign_cli.config import LoadedCampaign
from campaign_cli.errors import ExitCode, StoppedBeforeStart, UsageError
from campaign_cli.models import FINAL_STATES, Channel, Content, Recipient, State
from campaign_cli.pipeline import SendOptions, StopController, TooFewRows, run_campaign
from campaign_cli.recipients import RecipientSpec, iter_recipient_chunks
from campaign_cli.render.engine import Renderer, RenderError
from campaign_cli.store import runs, snapshot
from campaign_cli.store.db import Store, connect

#: The folder a preview's dry run copies the store into, in the temporary folder.
PREVIEW_FOLDER = "campaign-preview-"
#: What the dry run's journal calls a message it would send.
WOULD_SEND = "send"
_DECIDED = frozenset(s.value for s in FINAL_STATES - {State.IN_DOUBT})


@dataclass(frozen=True)
class ChannelPreview:
    channel: str
    address: str | None
    #: ``"send"``, or the state that keeps it from being sent (`State` names: suppressed,
    #: no_consent, invalid, duplicate, render_failed; pending when the run stops before it, at
    #: the spend cap; sent when an earlier session sent it).
    outcome: str
    reason: str | None
    detail: str | None
    already: bool  # decided by an earlier session of this run, in the real journal
    providers: tuple[str, ...]  # the channel's providers, in order of failover
    cost_micros: int  # what the dry run reserved (the dearest of the channel's providers)
    #: The rendered message, when it would be sent, was sent, or waits (a stop before it).
    content: Content | None


@dataclass(frozen=True)
class Preview:
    run: str
    row: int
    line: int
    key: str | None
    currency: str
    channels: list[ChannelPreview]
    stopped: str | None  # why the dry run ended before row N, if it did ("spend_cap", ...)
    warnings: list[str] = field(default_factory=list)


def preview_row(
    loaded: LoadedCampaign,
    store_path: Path,
    row: int,
    *,
    recipients: Path | None = None,
    run_key: str | None = None,
    clock: Clock | None = None,
    stop: StopController | None = None,
) -> Preview:
    """Row ``row`` (data record number, from 1) of the recipient file, as the run would send it.
    Raises `CampaignError` subclasses as `campaign send` does, `UsageError` for a row the file
    does not have, and `StoppedBeforeStart` when ``stop`` was requested during the dry run."""
    if row < 1:
        raise UsageError("--row must be at least 1")
    campaign = loaded.campaign
    with snapshot.private_folder(PREVIEW_FOLDER) as folder:
        private = folder / "preview.db"
        path = recipients or campaign.recipients.file
        try:
            # (A row past the end is refused once the file is counted, before the dry run.)
            report = run_campaign(
                loaded, store_path,
                SendOptions(dry_run=True, limit=row, recipients=recipients, run_key=run_key,
                            reader="inline", dry_run_store=private, rows_needed=row),
                clock=clock, stop=stop,
            )
        except TooFewRows as exc:
            raise UsageError(f"{exc.path}: --row {row}: the file has {exc.rows} data "
                             f"row{'s' if exc.rows != 1 else ''}") from None
        if report.exit_code == ExitCode.INTERRUPTED:
            raise StoppedBeforeStart("interrupted: nothing was previewed (nor sent or changed)")
        assert path is not None  # the dry run refused a campaign without one
        with Store.open(private, create=False) as store:
            decided = _journal(store.conn, report.campaign, report.run_key, row)
            secret = store.setting("unsubscribe_secret") or ""
    earlier = _journal_if_any(store_path, report.campaign, report.run_key, row)
    spec = RecipientSpec.from_config(campaign, Path(path))
    with contextlib.closing(iter_recipient_chunks(spec, 1, start_row=row, limit=row)) as chunks:
        [item] = next(chunks)
    renderer = Renderer.compile(campaign, secret, source=loaded)
    channels: list[ChannelPreview] = []
    for channel, (state, reason, detail, address, cost) in decided.items():
        already = earlier.get(channel) in _DECIDED
        content: Content | None = None
        outcome = WOULD_SEND if state == State.SENT.value and not already else state
        if (isinstance(item, Recipient) and address is not None
                and outcome in (WOULD_SEND, State.SENT.value, State.PENDING.value)):
            try:
                content = renderer.render(Channel(channel), item, address)
            except RenderError:
                content = None  # the journal row says why (render_failed)
        channels.append(ChannelPreview(
            channel=channel, address=address, outcome=outcome, reason=reason, detail=detail,
            already=already,
            providers=tuple(campaign.channels.get(Channel(channel)).provider_names),
            cost_micros=cost if outcome == WOULD_SEND else 0, content=content,
        ))
    key = item.key if isinstance(item, Recipient) else None
    warnings = list(report.warnings)
    if renderer.uses_secret and not store_path.exists():
        warnings.append(f"no store at {store_path} yet: unsubscribe links and tokens use a "
                        "secret made for this preview; the real run's will differ")
    return Preview(run=report.run_name, row=row, line=item.line, key=key, currency=report.currency,
                   channels=channels, stopped=report.stopped, warnings=warnings)


def _journal(conn: sqlite3.Connection, campaign: str, run_key: str,
             row: int) -> dict[str, tuple[str, str | None, str | None, str | None, int]]:
    """Row ``row``'s journal entries in the dry run's copy, by channel (in the campaign's
    channel order as admitted)."""
    run = runs.find_run(conn, campaign, run_key)
    assert run is not None  # the dry run just recorded it
    return {
        channel: (state, reason, detail, address, cost)
        for channel, state, reason, detail, address, cost in conn.execute(
            "SELECT channel, state, reason, detail, address, cost_micros FROM messages "
            "WHERE run_id = ? AND row = ? ORDER BY rowid", (run.id, row))
    }


def _journal_if_any(store_path: Path, campaign: str, run_key: str, row: int) -> dict[str, str]:
    """The real journal's states for row ``row`` of the run, by channel: empty when the store
    or the run does not exist yet."""
    if not store_path.exists():
        return {}
    conn = connect(store_path, readonly=True)
    try:
        # Read as it is, not migrated: only what every schema version holds (not `find_run`,
        # whose columns a store of an older campaign-cli lacks).
        found = conn.execute("SELECT id FROM runs WHERE campaign = ? AND run_key = ?",
                             (campaign, run_key)).fetchone()
        if found is None:
            return {}
        return {channel: state for channel, state in conn.execute(
            "SELECT channel, state FROM messages WHERE run_id = ? AND row = ?", (found[0], row))}
    finally:
        conn.close()
