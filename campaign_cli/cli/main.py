"""The `campaign` command: global options, and the command groups joined with add_typer."""

from __future__ import annotations

import os
import sys
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from campaign_cli import __version__
from campaign_cli.cli.context import AppContext
from campaign_cli.cli.output import Output
from campaign_cli.errors import ExitCode
from campaign_cli.streams import whole_writes

EXIT_CODES_HELP = """
Exit codes: 0 done, nothing failed; 1 internal error (a bug, or output cut off: a broken pipe,
a provider that failed in a way it cannot classify, the store failing mid-run; resumable); 2
usage, configuration or input error, nothing sent; 3 stopped at the spend cap (resumable); 4
done, but some messages failed (dead letters, or a template that failed to render); 5 the run
is locked by another process; 6 a provider refused our credentials or configuration, or gave
the same refusal ten times in a row (resumable once fixed); 130 interrupted by a signal
(resumable).
"""

app = typer.Typer(
    name="campaign",
    help="Send one campaign (SMS, email, push, webhook) to a recipient list: safely, resumably, "
    "within budget.\n\n" + EXIT_CODES_HELP,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


class LogFormat(str, Enum):
    text = "text"
    json = "json"


def _version(value: bool) -> None:
    if value:
        typer.echo(f"campaign-cli {__version__}")
        raise typer.Exit(0)


@app.callback()
def main_callback(
    ctx: typer.Context,
    store: Optional[Path] = typer.Option(
        None, "--store", help="The store (SQLite file). Default: $CAMPAIGN_STORE, else the "
        "platform's user data directory.", show_default=False,
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only errors and results."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Tracebacks on errors."),
    log_format: LogFormat = typer.Option(
        "text", "--log-format", envvar="CAMPAIGN_LOG_FORMAT", case_sensitive=False,
        help="What stderr carries: text for people, or json, one object per line ({\"time\", "
        "\"level\", \"message\", ...}) for log collectors.",
    ),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    existing = ctx.obj if isinstance(ctx.obj, AppContext) else None
    if existing is not None:  # a test built the context itself
        existing.store_option = store or existing.store_option
        existing.output.quiet = quiet or existing.output.quiet
        existing.output.verbose = verbose or existing.output.verbose
        if log_format == "json":
            existing.output.log_format = "json"
        return
    ctx.obj = AppContext(
        output=Output(quiet=quiet, verbose=verbose, log_format=log_format.value),
        store_option=store, env=dict(os.environ),
    )


def _register() -> None:
    from campaign_cli.cli import consent, preview, send, status, suppress, trace

    app.add_typer(suppress.app, name="suppress")
    app.add_typer(consent.app, name="consent")
    send.register(app)
    status.register(app)
    trace.register(app)
    preview.register(app)


def main() -> None:
    # Whatever a command prints (a console campaign, `suppress list`, `--json`) reaches the
    # reading program whole, also under PYTHONUNBUFFERED (campaign_cli/streams.py).
    sys.stdout = whole_writes(sys.stdout)
    if sys.stderr is None:
        # `2>&-`: Python has no sys.stderr, and rich's console and print(file=None) would write
        # errors, warnings and progress to stdout, after the summary a script reads last.
        sys.stderr = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115 - for the process
    try:
        try:
            _register()
            code = _run()
        except KeyboardInterrupt:  # Ctrl-C while the commands are being set up
            _error("interrupted")
            code = int(ExitCode.INTERRUPTED)
    finally:
        _flush_stdout()
    sys.exit(code)


def _run() -> int:
    """Run the app; a command-line mistake is one line, as every other input error: ``error:
    Invalid value for '--limit': ... (campaign send --help)`` and exit 2, not click's usage
    block (four lines in a cron log, the error last)."""
    try:
        result = app(standalone_mode=False)
    except typer.Abort as exc:
        # Ctrl-C (outside a run's own handlers, e.g. at the confirmation prompt) is an
        # interruption by a signal, not a bug; Ctrl-D at a prompt is no answer, so no.
        _error("aborted")
        if isinstance(exc.__cause__ or exc.__context__, KeyboardInterrupt):
            return int(ExitCode.INTERRUPTED)
        return int(ExitCode.USAGE)
    except Exception as exc:
        # click's ClickException family (typer vendors click; only these carry both).
        message = getattr(exc, "format_message", None)
        exit_code = getattr(exc, "exit_code", None)
        if not callable(message) or not isinstance(exit_code, int):
            raise
        ctx = getattr(exc, "ctx", None)
        if type(exc).__name__ == "NoArgsIsHelpError" or ctx is None:
            exc.show()  # type: ignore[attr-defined]  # the help text itself, as asked for
            return exit_code
        text = " ".join(str(message()).split())
        line = f"{text} (see: {ctx.command_path} --help)"
        _error(line)
        if ctx.info_name in ("send", "validate") and _flag_given(ctx, sys.argv[1:], "--json"):
            # The one JSON object a cron job's `send --json` (or a CI step's `validate --json`)
            # parses, also for a mistyped option.
            from campaign_cli.cli.send import print_not_started

            print_not_started(ctx, line, exit_code,
                              dry_run=_flag_given(ctx, sys.argv[1:], "--dry-run"))
        return exit_code
    return result if isinstance(result, int) else 0


def _error(message: str) -> None:
    """An error found before the command ran (its options were not all read): in the log format
    the command line or $CAMPAIGN_LOG_FORMAT asked for, if it can be told."""
    Output(stdout=sys.stdout, stderr=sys.stderr,
           log_format="json" if _wants_json_logs(sys.argv[1:], os.environ) else "text",
           ).error(message)


def _wants_json_logs(argv: list[str], env: dict[str, str] | os._Environ[str]) -> bool:
    chosen = env.get("CAMPAIGN_LOG_FORMAT", "text")
    words = iter(argv)
    for word in words:
        if word == "--":
            break
        if word == "--log-format":
            chosen = next(words, chosen)
        elif word.startswith("--log-format="):
            chosen = word.partition("=")[2]
    return chosen.strip().lower() == "json"


def _flag_given(ctx: typer.Context, argv: list[str], flag: str) -> bool:
    """Whether the command line gave ``flag`` (`--json`, `--dry-run`), read from the raw
    arguments: click stops at the first mistake, so the option may not have been parsed."""
    if ctx.params.get({"--json": "as_json", "--dry-run": "dry_run"}.get(flag, flag)):
        return True
    # The options that take a value (`--run-key --json` names the run "--json"), this command's
    # and the group's (`--store`).
    commands = [c.command for c in (ctx, ctx.parent) if c is not None]
    valued = {name for command in commands for param in command.params
              if param.param_type_name == "option"
              and not getattr(param, "is_flag", False) and not getattr(param, "count", False)
              for name in param.opts}
    words = iter(argv)
    for word in words:
        if word == flag:
            return True
        if word == "--":
            return False
        if word in valued:
            next(words, None)  # its value
        elif word.startswith("-") and not word.startswith("--"):
            for at, char in enumerate(word[1:], start=2):  # `-yr FILE`, `-rFILE`
                if f"-{char}" in valued:
                    if at == len(word):
                        next(words, None)
                    break
    return False


def _flush_stdout() -> None:
    """Flush standard output before the interpreter does. When the program reading it has gone
    (`campaign send ... | head`), the interpreter's own last flush would print "Exception
    ignored ... BrokenPipeError" and exit 120 in place of our exit code: instead, what could not
    be written goes to /dev/null (the journal already says what was printed and what is in
    doubt)."""
    if sys.stdout is None:  # `>&-`: closed before we started; nothing was written there
        return
    try:
        sys.stdout.flush()
    except OSError:  # a broken pipe; a full disk or a hung-up terminal (EIO) alike
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        except (OSError, ValueError):
            pass
    except ValueError:
        pass  # closed or unusable: nothing more can be said there


def get_app() -> typer.Typer:
    """The fully assembled app, for tests (CliRunner) and docs."""
    if not app.registered_groups:
        _register()
    return app
