"""`campaign status`: the runs in the store, or one run in detail (same JSON as `send --json`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from campaign_cli.cli.context import EXIT_CODES, app_context, command
from campaign_cli.errors import UsageError
from campaign_cli.models import from_micros
from campaign_cli.pipeline import RunReport, run_status
from campaign_cli.store import runs


def register(app: typer.Typer) -> None:
    app.command(
        "status",
        epilog=EXIT_CODES,
        help="Show the runs in the store, or one run (RUN = id, campaign/key, or campaign "
        "name for its latest run): state, counts per state and channel, spend, rate, last errors.",
    )(status)


@command
def status(
    ctx: typer.Context,
    run: Optional[str] = typer.Argument(None, help="A run: id, campaign/key or campaign name.",
                                        show_default=False),
    as_json: bool = typer.Option(False, "--json", help="JSON on stdout."),
    limit: int = typer.Option(50, "--limit", min=1, help="How many runs to list."),
) -> None:
    app = app_context(ctx)
    out = app.output
    if not app.store_path.exists():
        if as_json:
            out.json([] if run is None else None)
        if run is not None:  # asked for a run that cannot exist: an error, on stderr
            raise UsageError(f"no run {run!r}: no store at {app.store_path} yet")
        if not as_json:
            out.result(f"no store at {app.store_path} yet: nothing has been sent")
        return
    with app.open_store(create=False) as store:
        conn = store.conn
        if run is None:
            records = runs.list_runs(conn, limit)
            holders = [_holder(app.store_path, r) for r in records]
            reports = [run_status(conn, r, app.clock, live=_live(r, h))
                       for r, h in zip(records, holders, strict=True)]
            if as_json:
                out.json([{**r.to_json(), "holder": h}
                          for r, h in zip(reports, holders, strict=True)])
                return
            if not reports:
                out.result("no runs yet")
                return
            out.table(
                ["id", "run", "status", "rows", "sent", "skipped", "failed", "in doubt",
                 "pending", "spend", "started", "finished"],
                [[r.run_id, r.run_name, _shown_status(r, live), r.total_rows, r.sent,
                  r.skipped, r.definitely_failed, _in_doubt(r, live),
                  r.counts.get("pending", 0),
                  f"{from_micros(r.spend_micros)} {r.currency}", r.started_at or "",
                  r.finished_at or ""]
                 for r, h in zip(reports, holders, strict=True) for live in [h is not None]],
            )
            return
        record = runs.get_run(conn, run)
        holder = _holder(app.store_path, record)
        live = _live(record, holder)
        report = run_status(conn, record, app.clock, live=live)
        if as_json:
            payload = report.to_json()
            payload["failures"] = [
                {"provider": p, "state": s, "reason": reason, "count": n}
                for p, s, reason, n in runs.failure_summary(conn, record.id)
            ]
            payload["last_errors"] = runs.last_errors(conn, record.id)
            payload["attempts"] = runs.attempt_summary(conn, record.id)
            payload["holder"] = holder
            out.json(payload)
            return
        out.result(f"run {report.run_name} (id {report.run_id}): {_shown_status(report, live)}"
                   + (f", exit {report.exit_code}" if report.exit_code is not None else ""))
        if not live:
            out.result("no process holds this run: it was stopped without finishing (killed, or "
                       "the machine went down); the same `campaign send` command resumes it")
        out.result(f"started {record.started_at}  finished {record.finished_at or '-'}  "
                   f"sessions {record.sessions}  rows {report.total_rows}")
        channels = list(report.by_channel)
        states = sorted({s for c in report.by_channel.values() for s in c})
        out.table(["state", *channels, "total"],
                  [[s, *[report.by_channel[c].get(s, 0) for c in channels],
                    report.counts.get(s, 0)] for s in states])
        cap = "" if report.max_spend_micros is None else \
            f" (cap {from_micros(report.max_spend_micros)})"
        out.result(f"spend {from_micros(report.spend_micros)} {report.currency}{cap}; "
                   f"{report.rate_per_s}/s over {report.duration_s:.1f}s")
        attempts = runs.attempt_summary(conn, record.id)
        if attempts:
            out.table(["provider", "outcome", "attempts", "mean ms", "max ms"],
                      [[a["provider"], a["outcome"], a["attempts"], a["mean_ms"], a["max_ms"]]
                       for a in attempts], title="attempts by provider")
        failures = runs.failure_summary(conn, record.id)
        if failures:
            out.table(["provider", "state", "reason", "count"], failures,
                      title="not sent, by provider and reason")
        errors = runs.last_errors(conn, record.id)
        if errors:
            out.table(["row", "channel", "state", "reason", "code", "detail", "at"],
                      [[e["row"], e["channel"], e["state"], e["reason"], e["error_code"],
                        e["detail"], e["at"]] for e in errors], title="last errors")
        if record.last_error:
            out.result(f"last error: {record.last_error}")


def _holder(store_path: Path, run: runs.RunRecord) -> str | None:
    """Who drives a `running` run now (`pid N on HOST since ...`), None if no live process."""
    if run.status != "running":
        return None
    return runs.RunLock.holder(store_path, run.campaign, run.run_key)


def _live(run: runs.RunRecord, holder: str | None) -> bool:
    """False for a run left `running` by a process that is gone."""
    return run.status != "running" or holder is not None


def _in_doubt(report: RunReport, live: bool) -> int:
    """In doubt, and rows left `sending` by a process that is gone (killed: they become
    `in_doubt` when the run resumes), so that the columns add up to the rows. ``live``: a
    process holds the run (and is sending them now)."""
    left = 0 if live else report.counts.get("sending", 0)
    return report.counts.get("in_doubt", 0) + left


def _shown_status(report: RunReport, live: bool) -> str:
    if report.status == "running" and not live:
        return "running (stopped: no process)"
    return report.status
