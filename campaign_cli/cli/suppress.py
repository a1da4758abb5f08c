"""`campaign suppress`: the opt-out list (add, remove, list, check, import, export)."""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import phonenumbers
import typer  # noqa: TID251 - this is campaign_cli/cli/

from campaign_cli.addresses import AddressError, normalize_push_token
from campaign_cli.cli.context import EXIT_CODES, app_context, command
from campaign_cli.cli.output import Output
from campaign_cli.clock import iso
from campaign_cli.errors import UsageError
from campaign_cli.store import suppressions
from campaign_cli.store.suppressions import normalize_for
from campaign_cli.streams import utf8_text

app = typer.Typer(
    help="The suppression (opt-out) list: addresses that must not be sent to. Every run checks "
    "it, including for suppressions added while the run is going.",
    epilog=EXIT_CODES,
    no_args_is_help=True,
    rich_markup_mode=None,
)


class ChannelChoice(str, Enum):
    SMS = "sms"
    EMAIL = "email"
    PUSH = "push"
    WEBHOOK = "webhook"
    ALL = "all"


def channel_value(channel: ChannelChoice | None) -> str | None:
    return None if channel is None else channel.value


def normalize_all(
    raws: Sequence[str], channel: str | None, region: str, output: Output | None = None
) -> list[tuple[str, str]]:
    """Normalise every address or none: the first bad one is a usage error naming it. A phone
    number written without its country code is read in ``region``, and ``output`` is told how
    (an opt-out recorded for another country's number would silently miss its recipient)."""
    items: list[tuple[str, str]] = []
    for raw in raws:
        try:
            address, kind = normalize_for(raw, channel, region)
        except AddressError as exc:
            raise UsageError(f"address {raw!r}: {exc.detail}{_push_hint(raw, channel)}") from None
        items.append((address, kind))
        if output is not None and address.startswith("+") and "@" not in raw \
                and not raw.strip().lstrip("(").startswith(("+", "00")):
            output.info(f"read {raw!r} as {address} (region {region}; give --region for "
                        "another country)")
    return items


def _push_hint(raw: str, channel: str | None) -> str:
    """A push token cannot be told from the shape of an address: say how to name one."""
    if channel is not None:
        return ""
    try:
        normalize_push_token(raw)
    except AddressError:
        return ""
    return " (a push token? add --channel push)"


def normalize_lookup(raw: str, channel: str | None, region: str) -> str:
    """The address to look up, read as ``channel`` if it can be, else by its shape: checking an
    email address on the SMS channel is a fair question (an 'all' entry may cover it)."""
    try:
        return normalize_for(raw, channel, region)[0]
    except AddressError as exc:
        if channel is None:
            raise UsageError(f"address {raw!r}: {exc.detail}") from None
        first = exc
    try:
        return normalize_for(raw, None, region)[0]
    except AddressError:
        raise UsageError(f"address {raw!r}: {first.detail}") from None


def report_invalid(output: Output, file: Path, result: suppressions.ImportResult) -> None:
    for line, _value, reason in result.invalid:
        output.warn(f"{file}:{line}: {reason}")
    unshown = result.invalid_total - len(result.invalid)
    if unshown > 0:
        output.warn(f"{file}: {unshown} more invalid line(s) not shown")


CHANNEL_HELP = (
    "The channel. Default: inferred from each address (phone: sms, email: email, http(s) URL: "
    "webhook; push tokens need --channel push). 'all' suppresses every channel."
)
REGION_HELP = "Region for phone numbers written without a country code."

Addresses = Annotated[list[str], typer.Argument(metavar="ADDRESS...", show_default=False)]
ChannelOpt = Annotated[
    Optional[ChannelChoice],
    typer.Option("--channel", "-c", help=CHANNEL_HELP, show_default=False),
]


def region_value(region: str) -> str:
    """``--region``: a region phone numbers know, any case. A typo must not quietly turn every
    national number of an import into an invalid line (opt-outs left out)."""
    code = region.strip().upper()
    if code not in phonenumbers.SUPPORTED_REGIONS:
        raise typer.BadParameter(f"{region!r} is not a region code (e.g. US, GB, DE)")
    return code


RegionOpt = Annotated[str, typer.Option("--region", help=REGION_HELP, callback=region_value)]
LimitOpt = Annotated[
    Optional[int], typer.Option("--limit", min=0, help="At most this many.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="JSON on stdout.")]
ImportChannelOpt = Annotated[Optional[ChannelChoice], typer.Option(
    "--channel", "-c", show_default=False,
    help="Channel for rows without a 'channel' cell. Default: inferred per address.",
)]


def _display(entry: dict[str, Any]) -> str:
    return str(entry["address"]) if entry["address"] is not None else "(erased)"


@app.command("add", epilog=EXIT_CODES)
@command
def add(
    ctx: typer.Context,
    addresses: Addresses,
    channel: ChannelOpt = None,
    reason: Annotated[str, typer.Option("--reason", help="Why (kept with the entry).")] = "manual",
    region: RegionOpt = "US",
) -> None:
    """Add addresses to the list. Nothing is added if any address is bad."""
    app_ctx = app_context(ctx)
    items = normalize_all(addresses, channel_value(channel), region, app_ctx.output)
    with app_ctx.open_store() as store:
        result = suppressions.add_suppressions(
            store.conn, items, reason, "cli", iso(app_ctx.clock.now())
        )
    app_ctx.output.result(f"added {result.added}, already present {result.already}")


@app.command("remove", epilog=EXIT_CODES)
@command
def remove(
    ctx: typer.Context,
    addresses: Addresses,
    channel: Annotated[Optional[ChannelChoice], typer.Option(
        "--channel", "-c", show_default=False,
        help="Remove only the entry for this channel. Default: every entry of the address.",
    )] = None,
    region: RegionOpt = "US",
) -> None:
    """Remove addresses from the list (an opt-in again: be sure you may)."""
    app_ctx = app_context(ctx)
    wanted = channel_value(channel)
    # Without --channel every entry of the address goes, whatever its channel.
    normalised = [normalize_lookup(raw, wanted, region) for raw in addresses]
    removed = 0
    with app_ctx.open_store() as store:
        for address in normalised:
            entries = suppressions.remove_entries(store.conn, address, wanted)
            removed += len(entries)
            for entry in entries:
                _warn_removed(app_ctx.output, address, entry)
            if wanted is not None and wanted != "all":
                if any(e["channel"] == "all" for e in
                       suppressions.is_suppressed(store.conn, address, wanted)):
                    app_ctx.output.warn(
                        f"{address} is still suppressed on every channel "
                        "(remove it with --channel all)"
                    )
    app_ctx.output.result(f"removed {removed}")


def _warn_removed(output: Output, address: str, entry: dict[str, Any]) -> None:
    """Removing an opt-out the recipient gave the provider (a STOP), or one a campaign's own list
    holds, is allowed but never silent."""
    source = str(entry["source"])
    where = f"{address}: the {entry['channel']} entry"
    if source == "provider":
        output.warn(
            f"{where} was an opt-out the provider reported ({entry['reason']}, "
            f"{entry['created_at']}): the recipient opted out themselves; the provider may keep "
            "refusing until they opt in again with it (e.g. reply START)"
        )
    elif source.startswith("list:"):
        output.warn(
            f"{where} came from the list {source[len('list:'):]}: while the file holds it, a "
            "campaign naming that list imports it again before its next run"
        )


@app.command("list", epilog=EXIT_CODES)
@command
def list_(
    ctx: typer.Context,
    channel: Annotated[Optional[ChannelChoice], typer.Option(
        "--channel", "-c", show_default=False,
        help="Only the entries that apply to this channel (these include the 'all' entries).",
    )] = None,
    limit: LimitOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List the suppressed addresses, oldest first."""
    app_ctx = app_context(ctx)
    with app_ctx.open_store() as store:
        # Written as it is read, a page at a time (`Output.listing`).
        entries = suppressions.list_suppressions(store.conn, channel_value(channel), limit)
        if as_json:
            app_ctx.output.json_array(entries)
            return
        count = app_ctx.output.listing(
            ("address", "channel", "reason", "source", "created_at"),
            ((_display(e), e["channel"], e["reason"], e["source"], e["created_at"])
             for e in entries),
        )
    app_ctx.output.info(f"{count} entries")


@app.command("erase", epilog=EXIT_CODES)
@command
def erase(
    ctx: typer.Context,
    addresses: Addresses,
    channel: Annotated[Optional[ChannelChoice], typer.Option(
        "--channel", "-c", show_default=False,
        help="How to read each ADDRESS (push tokens need --channel push). Default: inferred "
        "from it. The address is suppressed on every channel either way.",
    )] = None,
    region: RegionOpt = "US",
) -> None:
    """Erase addresses (a data-protection request) and keep them from ever being sent to: each
    becomes a suppression on every channel kept only as a hash, and its text is blanked from the
    store's suppressions, consent records and run journals. Files outside the store (outboxes,
    exports, recipient files) are yours to delete."""
    app_ctx = app_context(ctx)
    normalised = normalize_all(addresses, channel_value(channel), region, app_ctx.output)
    with app_ctx.open_store() as store:
        for address, _ in normalised:
            done = suppressions.erase_address(
                store.conn, address, iso(app_ctx.clock.now()), region
            )
            app_ctx.output.result(
                f"erased {address}: suppressed on every channel by hash"
                f"{' (added)' if done.suppressed_now else ''}; blanked in "
                f"{done.suppressions} suppression, {done.consents} consent and "
                f"{done.journal_rows} journal entries"
            )


@app.command("check", epilog=EXIT_CODES)
@command
def check(
    ctx: typer.Context,
    address: Annotated[str, typer.Argument(metavar="ADDRESS", show_default=False)],
    channel: Annotated[Optional[ChannelChoice], typer.Option(
        "--channel", "-c", show_default=False,
        help="Check this channel (its own entry or an 'all' entry). Default: any channel.",
    )] = None,
    region: RegionOpt = "US",
    as_json: JsonOpt = False,
) -> None:
    """Say whether an address is suppressed. Exits 0 either way: read the output (or --json)."""
    app_ctx = app_context(ctx)
    wanted = channel_value(channel)
    normalised = normalize_lookup(address, wanted, region)
    with app_ctx.open_store() as store:
        entries = suppressions.is_suppressed(store.conn, normalised, wanted)
    if as_json:
        app_ctx.output.json(
            {"address": normalised, "suppressed": bool(entries), "entries": entries}
        )
        return
    if not entries:
        where = f" on {wanted}" if wanted else ""
        app_ctx.output.result(f"not suppressed{where}: {normalised}")
        return
    details = "; ".join(
        f"{e['channel']}: {e['reason']} ({e['source']}, {e['created_at']})" for e in entries
    )
    app_ctx.output.result(f"suppressed: {normalised} ({details})")


@app.command("import", epilog=EXIT_CODES)
@command
def import_(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(metavar="FILE", show_default=False)],
    channel: ImportChannelOpt = None,
    reason: Annotated[
        str, typer.Option("--reason", help="Reason for rows without one.")
    ] = "import",
    region: RegionOpt = "US",
) -> None:
    """Add the addresses of a CSV file.

    A header row is required; columns: address (or phone or email), and optionally channel and
    reason. A leading apostrophe (from `suppress export`) is removed. Bad lines are reported and
    skipped; the rest is added."""
    app_ctx = app_context(ctx)
    with app_ctx.open_store() as store:
        result = suppressions.import_csv(
            store.conn, file, channel_value(channel), reason, f"import:{file.name}", region,
            iso(app_ctx.clock.now()),
        )
    report_invalid(app_ctx.output, file, result)
    app_ctx.output.result(
        f"added {result.added}, already present {result.already}, invalid {result.invalid_total}"
    )


@app.command("export", epilog=EXIT_CODES)
@command
def export(
    ctx: typer.Context,
    file: Annotated[str, typer.Argument(metavar="FILE", help="Where to write; '-' for stdout.")],
) -> None:
    """Write the list as CSV.

    Columns: address, channel, reason, source, created_at, address_hash (erased entries have no
    address but keep their hash). Cells that a spreadsheet would run as a formula get a leading
    apostrophe, so phone numbers appear as '+14155550100; `suppress import` removes it again.
    The file is made private (mode 0600); a symbolic link is not followed."""
    app_ctx = app_context(ctx)
    with app_ctx.open_store() as store:
        if file == "-":
            with app_ctx.output.writing() as stdout:
                # The bytes `export FILE` writes (UTF-8, CR LF), whatever the locale's: a
                # backup `export - > file` made under Latin-1 is one `import` reads back.
                count = suppressions.export_csv(store.conn, utf8_text(stdout))
        else:
            try:
                count = suppressions.export_csv(store.conn, Path(file))
            except OSError as exc:
                raise UsageError(f"{file}: cannot write: {exc.strerror}") from None
    app_ctx.output.info(f"exported {count} entries to {'stdout' if file == '-' else file}")
