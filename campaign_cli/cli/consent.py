"""`campaign consent`: consent evidence (grant, revoke, import, list).

Records are only ever added: a revocation does not delete the grant, it outranks it. The state in
force is the latest record by the time the person gave or withdrew consent; a tie goes to revoked.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Annotated, Optional

import typer  # noqa: TID251 - this is campaign_cli/cli/

from campaign_cli.cli.context import EXIT_CODES, app_context, command
from campaign_cli.cli.suppress import (
    Addresses,
    ChannelChoice,
    ImportChannelOpt,
    JsonOpt,
    LimitOpt,
    RegionOpt,
    channel_value,
    normalize_all,
    normalize_lookup,
    report_invalid,
)
from campaign_cli.clock import iso
from campaign_cli.errors import UsageError
from campaign_cli.models import Purpose
from campaign_cli.store import consents

app = typer.Typer(
    help="Consent evidence: who agreed to (or withdrew from) which messages, and when. Marketing "
    "campaigns send only where consent is in force.",
    epilog=EXIT_CODES,
    no_args_is_help=True,
    rich_markup_mode=None,
)

AT_HELP = (
    "When the person gave or withdrew consent (ISO 8601; without an offset: UTC). "
    "Default: now."
)
ChannelOpt = Annotated[
    Optional[ChannelChoice],
    typer.Option(
        "--channel", "-c", show_default=False,
        help="The channel. Default: inferred from each address (phone: sms, email: email, "
        "http(s) URL: webhook; push tokens need --channel push). 'all' covers every channel.",
    ),
]
PurposeOpt = Annotated[Purpose, typer.Option("--purpose", help="What the consent covers.")]
AtOpt = Annotated[Optional[str], typer.Option("--at", help=AT_HELP, show_default=False)]


def _record(
    ctx: typer.Context,
    status: str,
    addresses: list[str],
    channel: ChannelChoice | None,
    purpose: Purpose,
    source: str,
    at: str | None,
    region: str,
) -> None:
    app_ctx = app_context(ctx)
    items = normalize_all(addresses, channel_value(channel), region, app_ctx.output)
    now = iso(app_ctx.clock.now())
    recorded_at = now
    if at is not None:
        try:
            consents.parse_timestamp(at)
        except ValueError as exc:
            raise UsageError(f"--at: {exc}") from None
        recorded_at = at  # as written: a bare date is read by the record's status
    with app_ctx.open_store() as store:
        try:
            result = consents.record_consents(
                store.conn, items, purpose.value, status, source, recorded_at, now
            )
        except ValueError as exc:
            raise UsageError(f"--at: {exc}") from None
        for address, item_channel in items:
            # Kept as evidence either way, but a later record may decide: say so.
            for where, deciding in consents.outranked(
                store.conn, address, item_channel, purpose.value, status
            ):
                app_ctx.output.warn(
                    f"{address}: not in force on {where}: the {deciding['status']} record of "
                    f"{deciding['recorded_at']} ({deciding['source']}, via {deciding['via']}) "
                    "decides (a record dated no earlier than it would)"
                )
    app_ctx.output.result(
        f"{status} {purpose.value} consent: recorded {result.added}, "
        f"already present {result.already}"
    )


@app.command("grant", epilog=EXIT_CODES)
@command
def grant(
    ctx: typer.Context,
    addresses: Addresses,
    channel: ChannelOpt = None,
    purpose: PurposeOpt = Purpose.MARKETING,
    source: Annotated[str, typer.Option("--source", help="How we know (a form, ...).")] = "cli",
    at: AtOpt = None,
    region: RegionOpt = "US",
) -> None:
    """Record that addresses gave consent."""
    _record(ctx, "granted", addresses, channel, purpose, source, at, region)


@app.command("revoke", epilog=EXIT_CODES)
@command
def revoke(
    ctx: typer.Context,
    addresses: Addresses,
    channel: ChannelOpt = None,
    purpose: PurposeOpt = Purpose.MARKETING,
    source: Annotated[str, typer.Option("--source", help="How we know.")] = "cli",
    at: AtOpt = None,
    region: RegionOpt = "US",
) -> None:
    """Record that addresses withdrew consent (a running campaign honours it within a poll)."""
    _record(ctx, "revoked", addresses, channel, purpose, source, at, region)


@app.command("import", epilog=EXIT_CODES)
@command
def import_(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(metavar="FILE", show_default=False)],
    channel: ImportChannelOpt = None,
    purpose: Annotated[Purpose, typer.Option(
        "--purpose", help="Purpose for rows without a 'purpose' cell."
    )] = Purpose.MARKETING,
    region: RegionOpt = "US",
) -> None:
    """Record the consent evidence of a CSV file.

    Columns: address (or phone or email), status (granted or revoked) and recorded_at (ISO 8601)
    are required; channel, purpose and source are optional. Bad lines are reported and skipped;
    importing a file twice adds nothing."""
    app_ctx = app_context(ctx)
    with app_ctx.open_store() as store:
        result = consents.import_csv(
            store.conn, file, channel_value(channel), purpose.value, f"import:{file.name}",
            region, iso(app_ctx.clock.now()),
        )
    report_invalid(app_ctx.output, file, result)
    app_ctx.output.result(
        f"recorded {result.added}, already present {result.already}, "
        f"invalid {result.invalid_total}"
    )


@app.command("list", epilog=EXIT_CODES)
@command
def list_(
    ctx: typer.Context,
    address: Annotated[Optional[str], typer.Argument(
        metavar="[ADDRESS]", help="Only this address.", show_default=False
    )] = None,
    channel: Annotated[Optional[ChannelChoice], typer.Option(
        "--channel", "-c", show_default=False,
        help="How to read ADDRESS. Default: inferred from it.",
    )] = None,
    region: RegionOpt = "US",
    limit: LimitOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The consent in force for each address, channel and purpose that has records."""
    app_ctx = app_context(ctx)
    normalised = None
    if address is not None:
        normalised = normalize_lookup(address, channel_value(channel), region)
    with app_ctx.open_store() as store:
        # Written as it is read, a page at a time (`Output.listing`).
        entries = itertools.islice(consents.list_consents(store.conn, normalised), limit)
        if as_json:
            app_ctx.output.json_array(entries)
            return
        count = app_ctx.output.listing(
            ("address", "channel", "purpose", "status", "recorded_at", "source", "via"),
            (
                (e["address"] if e["address"] is not None else "(erased)", e["channel"],
                 e["purpose"], e["status"], e["recorded_at"], e["source"], e["via"])
                for e in entries
            ),
        )
    app_ctx.output.info(f"{count} entries")
