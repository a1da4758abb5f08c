"""`campaign send`: parse options, call `pipeline.Runner`, show progress, print the outcome."""

from __future__ import annotations

import asyncio
import math
import os
import shlex
import signal
import sqlite3
import sys
from decimal import ROUND_DOWN, Decimal, InvalidOperation
from pathlib import Path
from typing import Annotated, Optional

import typer

from campaign_cli.cli.context import AppContext, app_context, command
from campaign_cli.cli.output import ProgressDisplay, StdoutError
from campaign_cli.config import Campaign, load_campaign
from campaign_cli.errors import (
    CampaignError,
    ExitCode,
    JournalError,
    ResumeRefused,
    StoppedBeforeStart,
    UsageError,
)
from campaign_cli.models import from_micros
from campaign_cli.pipeline import Runner, RunReport, SendOptions, StopController

LOCAL_PROVIDER_TYPES = frozenset({"outbox", "console"})


def register(app: typer.Typer) -> None:
    app.command(
        "send",
        help="Send a campaign to its recipient list, or resume the run with the same key.\n\n"
        "Re-running with the same campaign and run key resumes: finished rows are skipped, "
        "pending rows go on, nobody gets a message twice. Exit codes: 0 done; 1 internal error; "
        "2 bad input; 3 stopped at the spend cap; 4 done with failures; 5 run locked; "
        "6 provider refused credentials; 130 interrupted.",
    )(send)
    app.command(
        "validate",
        help="Preflight a campaign: the same as `send --dry-run` (schema, templates, the "
        "recipient file's columns and every row, opt-outs and consent, rendering, cost against "
        "the cap), with its output and exit codes: 0 ready; 1 internal error; 2 bad input; 3 "
        "the cap would stop the run; 4 some messages would fail to render; 130 interrupted. "
        "Sends nothing, changes nothing.",
    )(validate)


CampaignArg = Annotated[Path, typer.Argument(help="The campaign YAML file.", show_default=False)]
RecipientsOpt = Annotated[Optional[Path], typer.Option(
    "--recipients", "-r", help="Recipient CSV (overrides recipients.file).", show_default=False,
)]
RunKeyOpt = Annotated[Optional[str], typer.Option(
    "--run-key", help="Names the run (default: derived from the recipient file's contents). "
    "Same campaign and key = resume.", show_default=False,
)]
LimitOpt = Annotated[Optional[int], typer.Option(
    "--limit", min=1, help="Only the first N recipients.", show_default=False,
)]


@command
def validate(
    ctx: typer.Context,
    campaign_file: CampaignArg,
    recipients: RecipientsOpt = None,
    limit: LimitOpt = None,
    run_key: RunKeyOpt = None,
    max_spend: Optional[str] = typer.Option(
        None, "--max-spend", help="Spend cap to check against (overrides limits.max_spend).",
        show_default=False,
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON summary on stdout."),
) -> None:
    _command(app_context(ctx), campaign_file, recipients, True, limit, run_key, None,
             max_spend, as_json, True, None, 10.0)


@command
def send(
    ctx: typer.Context,
    campaign_file: CampaignArg,
    recipients: RecipientsOpt = None,
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Read, check, render and cost everything; send nothing and "
        "leave the store untouched."
    ),
    limit: LimitOpt = None,
    run_key: RunKeyOpt = None,
    rate: Optional[float] = typer.Option(
        None, "--rate", min=0.001, help="Messages per second per provider (overrides the "
        "campaign).", show_default=False,
    ),
    max_spend: Optional[str] = typer.Option(
        None, "--max-spend", help="Spend cap for the whole run, e.g. 20 or 20.50 (overrides "
        "limits.max_spend).", show_default=False,
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON summary on stdout."),
    yes: bool = typer.Option(
        False, "--yes", "-y", help="Do not ask for confirmation before sending through real "
        "providers."
    ),
    retry_failed: Optional[str] = typer.Option(
        None, "--retry-failed", metavar="RUN", help="Re-drive the messages of run RUN (its key, "
        "or campaign/key) whose retries ran out on transient errors; permanent refusals stay "
        "failed.", show_default=False,
    ),
    grace: float = typer.Option(
        10.0, "--grace", min=0, help="Seconds in-flight sends get to finish after Ctrl-C."
    ),
    single_process: bool = typer.Option(
        False, "--single-process", help="Read the recipient file and send HTTP requests in this "
        "process, not in helper processes: ~60 MiB less memory, slower on large runs."
    ),
) -> None:
    _command(app_context(ctx), campaign_file, recipients, dry_run, limit, run_key, rate,
             max_spend, as_json, yes, retry_failed, grace, single_process)


def _command(app: AppContext, campaign_file: Path, recipients: Path | None, dry_run: bool,
             limit: int | None, run_key: str | None, rate: float | None,
             max_spend: str | None, as_json: bool, yes: bool, retry_failed: str | None,
             grace: float, single_process: bool = False) -> None:
    """`send` and `validate`: the run, the not-started JSON when it cannot start, and the
    signal handlers as they were on the way out."""
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    try:
        _send(app, campaign_file, recipients, dry_run, limit, run_key, rate, max_spend,
              as_json, yes, retry_failed, grace, single_process)
    except CampaignError as exc:
        # The one JSON object a script reads, also when the run could not start (not when it
        # was the summary that could not be printed).
        if as_json and not isinstance(exc, StdoutError):
            try:
                app.output.json(_not_started(app, campaign_file, run_key, dry_run, exc))
            except StdoutError as lost:  # said; why the run did not start is the error
                app.output.error(str(lost))
        raise
    finally:  # (ignored once the run ended: see `_send`)
        for sig, handler in previous.items():
            if handler is not None:
                signal.signal(sig, handler)


def _send(app: AppContext, campaign_file: Path, recipients: Path | None, dry_run: bool,
          limit: int | None, run_key: str | None, rate: float | None, max_spend: str | None,
          as_json: bool, yes: bool, retry_failed: str | None, grace: float,
          single_process: bool = False) -> None:
    out = app.output
    loaded = load_campaign(campaign_file, app.env)
    out.secrets.update(loaded.secrets)
    cap = _parse_money(max_spend)
    if rate is not None and not math.isfinite(rate):
        raise UsageError(f"--rate: {rate} is not a number of messages per second")
    if retry_failed is not None:
        campaign, slash, key = retry_failed.rpartition("/")
        if slash and campaign != loaded.campaign.name:
            raise UsageError(f"--retry-failed {retry_failed}: that run belongs to campaign "
                             f"{campaign!r}, not {loaded.campaign.name!r}")
        if run_key is not None and run_key != key:
            raise UsageError("--retry-failed names the run: leave out --run-key")
        run_key = key
    options = SendOptions(
        recipients=recipients, dry_run=dry_run, limit=limit, run_key=run_key, rate=rate,
        max_spend=cap, grace_seconds=grace, retry_failed=retry_failed is not None,
        reader="inline" if single_process else "auto", http_process=not single_process,
    )
    low = raise_fd_limit(descriptors_wanted(loaded.campaign))
    if low is not None:
        out.warn(low)
    providers = loaded.campaign.providers
    real = {providers[name].type for name in loaded.campaign.providers_in_use()}
    real -= LOCAL_PROVIDER_TYPES
    # (`<&-`: no sys.stdin at all, and so no terminal to ask on)
    if real and not dry_run and not yes and sys.stdin is not None and sys.stdin.isatty():
        names = ", ".join(sorted(real))
        # Not sent, whatever the answer: errors, so that `--json` still prints its one object.
        try:
            confirmed = typer.confirm(f"Send {loaded.campaign.name} through {names} (real "
                                      "messages, real money)?", err=True)
        except typer.Abort as exc:  # Ctrl-C: an interruption (130); Ctrl-D: no answer, so no
            if isinstance(exc.__cause__ or exc.__context__, KeyboardInterrupt):
                raise StoppedBeforeStart("aborted") from None
            raise UsageError("aborted") from None
        if not confirmed:
            raise UsageError("not confirmed: nothing sent")

    stop = StopController()
    runner = Runner(loaded, app.store_path, options, clock=app.clock, registry=None, stop=stop,
                    stdout=out.stdout)
    title = f"{loaded.campaign.name}{' (dry run)' if dry_run else ''}"

    # The console provider's lines on the terminal that shows the live display would be glued
    # onto the line it redraws in place: there, progress is the plain line.
    console_on_terminal = any(p.type == "console" for p in loaded.campaign.providers.values()) \
        and bool(getattr(out.stdout, "isatty", lambda: False)())
    with ProgressDisplay(out, title, live=not console_on_terminal) as display:
        runner.on_progress = display.update

        async def main() -> RunReport:
            loop = asyncio.get_running_loop()

            def on_signal(signum: int) -> None:
                stop.request()
                if stop.requests == 1:
                    out.warn(f"{signal.Signals(signum).name}: stopping intake, letting in-flight "
                             f"messages finish (up to {grace:g}s); again to stop at once")
                else:
                    out.warn("stopping now; the journal stays consistent")

            # A signal this process was started ignoring stays ignored: `nohup campaign send
            # ... &` asked for the run to outlive a closed terminal (SIGHUP), and a background
            # job of a script ignores SIGINT. SIGTERM and the others stop it as usual.
            watched = [sig for sig in STOP_SIGNALS if signal.getsignal(sig) != signal.SIG_IGN]
            for sig in watched:
                loop.add_signal_handler(sig, on_signal, sig)
            try:
                return await runner.execute()
            finally:
                for sig in watched:
                    loop.remove_signal_handler(sig)
                    # The run is over and journaled: a signal from here on (a second Ctrl-C
                    # a moment late, a supervisor's SIGTERM) must not cut off its outcome and
                    # resume command, nor make a finished run's exit code 130. `send` puts
                    # the handlers back on its way out.
                    signal.signal(sig, signal.SIG_IGN)

        report = asyncio.run(main())

    for warning in report.warnings:
        out.warn(warning)
    app.warn_if_exposed()  # (the store the run recorded in: said once it opened as one)
    lost: Exception | None = None
    if as_json:
        try:
            out.json(report.to_json())
        except (BrokenPipeError, StdoutError) as exc:
            lost = exc  # (exit 1), once the run's error and resume command are said on stderr
    elif not out.quiet:
        _print_summary(app, report)
    if report.error:  # also with --quiet ("only errors and results") and --json
        out.error(report.error)
    hint = _resume_hint(app, report, campaign_file, recipients, max_spend, limit, rate,
                        single_process)
    if hint:  # the way on from a stop: a result, also with --quiet (a cron log needs it most)
        out.result(hint, err=True)
    if lost is not None:
        raise lost
    raise typer.Exit(int(report.exit_code or 0))


def descriptors_wanted(campaign: Campaign) -> int:
    """File descriptors a run may hold at once: a connection per provider slot (each provider's
    `concurrency`, else the campaign's), and a margin for the store, the journal, pipes to the
    helper processes, the recipient file and the outbox's files."""
    slots = sum(p.concurrency or campaign.limits.concurrency
                for p in campaign.providers.values())
    return slots + campaign.limits.concurrency + 128


def raise_fd_limit(wanted: int) -> str | None:
    """Raise this process's soft limit on open files towards ``wanted`` (never past the hard
    limit; the helper processes inherit it). Many systems start programs at 1,024 or less: a
    provider with a few hundred connections then fails to connect, and its messages end
    `failed` as if the provider had refused them. A warning when the limit stays too low."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on this platform
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return None
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft >= wanted:
        return None
    return (f"only {soft} open files allowed (ulimit -n) for about {wanted} this campaign may "
            "use (its providers' connections): some connections may fail and their messages "
            "end failed; lower limits.concurrency or raise the limit")


def _not_started(app: AppContext, campaign_file: Path | None, run_key: str | None,
                 dry_run: bool, exc: CampaignError) -> dict[str, object]:
    """The `--json` summary's shape for a run that never started (bad input, exit 2; locked by
    another process, exit 5; ...): status ``not_started``, nothing counted, the error. Built by
    `RunReport.to_json` itself, so that its keys can never drift from a started run's."""
    empty = RunReport(
        run_id=0, run_name="", campaign="", run_key="", dry_run=dry_run, resumed=False,
        by_channel={}, total_rows=0, spend_micros=0, max_spend_micros=None, currency="",
        duration_s=0.0, sent_this_session=0, exit_code=int(exc.exit_code),
        # (a journal that failed even to record the end: the run did start, and was cut short)
        status="aborted" if isinstance(exc, JournalError) else "not_started",
        error=app.output.redact(str(exc)),
    ).to_json()
    # What is not known before a run starts is null, not an empty stand-in.
    empty.update(run=None, run_id=None, campaign=None, run_key=run_key, currency=None,
                 campaign_file=None if campaign_file is None else str(campaign_file))
    if isinstance(exc, ResumeRefused):  # a run the store holds, whose resume was refused
        empty.update(run=f"{exc.campaign}/{exc.run_key}", run_id=exc.run_id,
                     campaign=exc.campaign, run_key=exc.run_key)
    return empty


def print_not_started(ctx: typer.Context, message: str, exit_code: int, *,
                      dry_run: bool = False) -> None:
    """`_not_started` for a command line click refused before `send` or `validate` ran (an
    unknown option, a value of the wrong type): what was parsed of it, the rest null.
    ``dry_run``: the command line asked for one (read from it, as click may not have)."""
    app = ctx.find_object(AppContext)
    if app is None:
        return
    params = ctx.params
    file = params.get("campaign_file")
    dry_run = dry_run or ctx.info_name == "validate"
    summary = _not_started(app, Path(file) if file else None, params.get("run_key"), dry_run,
                           UsageError(message))
    summary["exit_code"] = exit_code
    app.output.json(summary)


# Ctrl-C, `kill`/a supervisor, and a terminal or SSH session that went away: each stops the run
# gracefully (in-flight sends finish; resumable), never mid-send.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _parse_money(text: str | None) -> Decimal | None:
    if text is None:
        return None
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise UsageError(f"--max-spend: {text!r} is not an amount (e.g. 20 or 20.50)") from None
    if not value.is_finite() or value < 0:
        raise UsageError(f"--max-spend: {text!r} must be zero or more")
    # As limits.max_spend: spend is counted in micro-units, so a finer cap would be rounded
    # (up, past the amount given); and it must fit the store's integers.
    if value >= 10**12:  # (checked first: quantizing 1e999999999 is itself an error)
        raise UsageError(f"--max-spend: {text!r} is too large (less than 10^12)")
    if value != value.quantize(Decimal("0.000001"), rounding=ROUND_DOWN):
        raise UsageError(f"--max-spend: {text!r} has more than six decimal places")
    return value


def _print_summary(app: AppContext, report: RunReport) -> None:
    out = app.output
    channels = list(report.by_channel)
    states = sorted({s for c in report.by_channel.values() for s in c})
    rows = [[state, *[report.by_channel[c].get(state, 0) for c in channels],
             report.counts.get(state, 0)] for state in states]
    out.table(["state", *channels, "total"], rows,
              title=f"{report.run_name}{' (dry run: nothing sent)' if report.dry_run else ''}",
              err=True)
    spend = from_micros(report.spend_micros)
    cap = "" if report.max_spend_micros is None else \
        f" (cap {from_micros(report.max_spend_micros)})"
    what = "estimated spend" if report.dry_run else "spend"
    out.result(f"{what} {spend} {report.currency}{cap}; {report.total_rows} recipient rows; "
               f"{report.duration_s:.1f}s; status {report.status}; exit {report.exit_code}",
               err=True)
    if report.in_doubt_found or report.in_doubt_resent:
        out.warn(f"{report.in_doubt_found} message(s) were in doubt from an earlier session "
                 f"(in flight when it stopped, or never answered); {report.in_doubt_resent} "
                 "re-sent (a provider that deduplicates drops a second copy by its idempotency "
                 "key; one that cannot, such as twilio, may have delivered it twice); see "
                 "`campaign status`")


def _store_holds(store_path: Path, report: RunReport) -> bool:
    """Whether the store at ``store_path`` still journals the run (read only; a store that
    cannot be read for another reason is given the benefit of the doubt)."""
    if not store_path.exists():
        return False
    try:
        conn = sqlite3.connect(f"{store_path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            found = conn.execute("SELECT 1 FROM runs WHERE id = ? AND campaign = ? AND "
                                 "run_key = ?", (report.run_id, report.campaign,
                                                 report.run_key)).fetchone()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        return "no such table" not in str(exc)  # (another kind of file under the name)
    return found is not None


def _resume_hint(app: AppContext, report: RunReport, campaign_file: Path,
                 recipients: Path | None, max_spend: str | None, limit: int | None,
                 rate: float | None, single_process: bool = False) -> str | None:
    if report.dry_run and report.exit_code == ExitCode.SPEND_CAP:
        # (`validate` as a CI gate: exit 3 and, with --json, no other word on stderr)
        return (f"dry run: the spend cap ({from_micros(report.max_spend_micros or 0)} "
                f"{report.currency}) would stop the run with messages still pending; raise it "
                "with --max-spend or limits.max_spend")
    if report.exit_code == ExitCode.FAILURES and not report.dry_run:
        # (with --json, else the only word on stderr a cron log keeps of exit 4)
        return (f"{report.definitely_failed} message(s) not sent (dead letters, or templates "
                f"that failed for those recipients): see `campaign status {report.run_name}`")
    if report.dry_run or report.exit_code not in (ExitCode.SPEND_CAP, ExitCode.INTERRUPTED,
                                                   ExitCode.PROVIDER_AUTH, ExitCode.INTERNAL):
        return None
    if not _store_holds(app.store_path, report):
        # Deleted or replaced under the run: the same command would start it afresh in a new
        # store and send everyone already sent their message again.
        return (f"the store that journaled run {report.run_name} is gone from "
                f"{app.store_path} (deleted or replaced): do not resume against another store, "
                "which would send everyone again; restore it from a backup first")
    parts = ["campaign"]
    # The store this run used, always and as an absolute path, as are the files: pasted into
    # another shell (no CAMPAIGN_STORE, another working directory), the command would otherwise
    # open another store and start the run afresh, sending everyone their message again.
    parts += ["--store", os.path.abspath(app.store_path)]
    parts += ["send", os.path.abspath(campaign_file), "--run-key", report.run_key]
    if recipients is not None:
        parts += ["--recipients", os.path.abspath(recipients)]
    # The run as it was started: without --limit the resume would go on to the whole file.
    if limit is not None:
        parts += ["--limit", str(limit)]
    if rate is not None:
        parts += ["--rate", str(rate)]
    if single_process:  # the machine it runs on is short of memory: so is the resume's
        parts += ["--single-process"]
    if report.exit_code == ExitCode.SPEND_CAP:
        cap = from_micros(report.max_spend_micros or 0)
        parts += ["--max-spend", "<more than " + str(cap) + ">"]
        return ("stopped at the spend cap; the rest is pending. To resume with a larger budget: "
                + " ".join(shlex.quote(p) if not p.startswith("<") else p for p in parts))
    if max_spend is not None:
        parts += ["--max-spend", max_spend]
    return "to resume: " + shlex.join(parts)


