"""`campaign trace RECIPIENT`: every decision the store holds about one recipient."""

from __future__ import annotations

from typing import Annotated, Any, Optional

import typer

from campaign_cli.cli.context import EXIT_CODES, app_context, command
from campaign_cli.cli.output import one_line
from campaign_cli.cli.suppress import JsonOpt, RegionOpt
from campaign_cli.errors import UsageError
from campaign_cli.store import runs
from campaign_cli.store.trace import trace as trace_recipient


def register(app: typer.Typer) -> None:
    app.command(
        "trace",
        epilog=EXIT_CODES,
        help="Show every decision taken for one recipient (its key, or an address: phone, "
        "email, push token, webhook URL): each run's journal row with its state and reason, "
        "every send attempt and what the provider answered, and the opt-outs and consents held "
        "for its addresses.",
    )(trace)


@command
def trace(
    ctx: typer.Context,
    recipient: Annotated[str, typer.Argument(metavar="RECIPIENT", show_default=False)],
    run: Annotated[Optional[str], typer.Option(
        "--run", help="Only this run (id, campaign/key, or campaign name for its latest run).",
        show_default=False,
    )] = None,
    region: RegionOpt = "US",
    limit: Annotated[int, typer.Option("--limit", min=1,
                                       help="At most this many journal rows.")] = 1000,
    as_json: JsonOpt = False,
) -> None:
    app = app_context(ctx)
    out = app.output
    if not recipient.strip():
        raise UsageError("RECIPIENT is empty: give a recipient key or an address")
    if not app.store_path.exists():
        raise UsageError(f"no store at {app.store_path} yet: nothing has been sent")
    with app.open_store(create=False) as store:
        run_id = None if run is None else runs.get_run(store.conn, run).id
        found = trace_recipient(store.conn, recipient, default_region=region, run_id=run_id,
                                limit=limit)
    if as_json:
        out.json(found)
        return
    _show(out, found, limit)


def _show(out: Any, found: dict[str, Any], limit: int) -> None:
    messages = found["messages"]
    runs_seen = len({m["run_id"] for m in messages})
    addresses = ", ".join(one_line(a) for a in found["addresses"]) or "no address"
    out.result(f"{found['recipient']!r} ({addresses}): {len(messages)} journal row(s) in "
               f"{runs_seen} run(s)" + (f", more than {limit}" if found["more"] else ""))
    for m in messages:
        reason = (f" ({one_line(m['reason'])})" if m["reason"] and m["reason"] != m["state"]
                  else "")
        via = f" via {m['provider']}" if m["provider"] else ""
        cost = f", cost {m['cost']} {m['currency']}" if m["cost"] != "0" else ""
        out.result(
            f"run {m['run']} (id {m['run_id']}) row {m['row']} (line {m['line']}) "
            f"{m['channel']} {one_line(m['address'] or '-')} "
            f"key {one_line(m['recipient_key'] or '-')}: "
            f"{m['state']}{reason}{via}{cost}, at {m['updated_at']}"
        )
        if m["detail"]:
            out.result(f"    {one_line(m['detail'])}")
        if m["resent_in_doubt"]:
            out.result("    sent again after being in doubt: the recipient may have it twice")
        for a in m["attempt_log"]:
            parts = [f"attempt {a['attempt']}", a["provider"], a["outcome"]]
            parts += [str(v) for v in (a["status_code"], a["provider_message_id"],
                                       a["error_code"]) if v is not None]
            if a["latency_ms"] is not None:
                parts.append(f"{a['latency_ms']} ms")
            parts.append(f"at {a['at']}")
            out.result("    " + "  ".join(parts))
            if a["error_text"]:
                out.result(f"      {one_line(a['error_text'])}")
    if not found["suppressions"]:
        out.result("suppressed: no")
    for s in found["suppressions"]:
        out.result(f"suppressed: {one_line(s['address'] or '(erased)')} on {s['channel']}: "
                   f"{one_line(s['reason'])} ({one_line(s['source'])}, {s['created_at']})")
    for c in found["consents"]:
        via = "" if c["via"] == c["channel"] else f" (by its {c['via']} record)"
        out.result(f"consent: {one_line(c['address'] or c['address_hash'])} {c['channel']} "
                   f"{c['purpose']}: {c['status']}{via} ({one_line(c['source'])}, "
                   f"{c['recorded_at']})")
