"""Everything the CLI shows a person or a script: the one place that imports rich.

Human output and progress go to stderr; `--json` output goes to stdout. Every message passes through
`redact`, so a secret taken from the environment can never be printed.

With ``log_format = "json"`` (`--log-format json`, for log collectors) everything written to
stderr is one JSON object per line: ``{"time", "level", "message", ...}`` with ``level`` one of
``error``, ``warning``, ``info``, ``result`` (a command's result shown on stderr, such as the send
summary and the resume command) and ``progress`` (with the counts as fields). What goes to
stdout (command results, `--json`, the console provider's lines) is unchanged.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import sys
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import IO, Any, Literal

from rich.console import Console
from rich.table import Table
from rich.text import Text

from campaign_cli.clock import iso
from campaign_cli.errors import CampaignError, ExitCode, redact
from campaign_cli.models import from_micros
from campaign_cli.streams import writes_unicode

#: The most rows `Output.listing` draws as a table on a terminal: rich measures every cell first.
TABLE_ROWS = 500

# C0 controls but line feed and tab, DEL, and C1 controls (0x9b is a one-byte CSI).
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


# Every control character a cell of the plain listing writes as an escape (line breaks and tabs
# too: a line is a row, a tab separates cells).
_CELL_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _control_escape(match: re.Match[str]) -> str:
    """A control character as a Python string literal writes it: ``\\n``, ``\\t``, ``\\x1b``."""
    return match[0].encode("unicode_escape").decode("ascii")


def _escaped(text: str, encoding: str) -> str:
    """``text`` with what ``encoding`` cannot carry written as backslash escapes (``\\xfc``)."""
    return text.encode(encoding, "backslashreplace").decode(encoding)


def one_line(text: str) -> str:
    """A field of a line that says one thing (a recipient key, an address, a reason): its line
    breaks written as escapes, so that a value from a recipient file (``c1\\nsuppressed: ...``)
    cannot print a line of its own that looks like the command's."""
    return text.replace("\n", "\\n")  # (a \r is escaped as every control is: `shown`)


class _StderrConsole(Console):
    """rich's Console for stderr, which outlives the program reading it. `campaign send 2>&1 |
    tee log` and Ctrl-C: the terminal signals the whole pipeline, tee dies at once, and the stop
    warning meets a broken pipe. rich's answer, SystemExit(1) raised from the signal handler
    through the event loop, left the run unfinished and the journal's last outcomes unwritten.
    Messages, progress and warnings are for a person who is no longer reading: they are dropped
    (stderr now goes to /dev/null), and the run goes on to its own end and exit code."""

    def _check_buffer(self) -> None:
        try:
            super()._check_buffer()  # (a broken pipe: `on_broken_pipe`)
        except OSError:
            # EIO: the terminal hung up (the SSH session dropped; SIGHUP is stopping the run);
            # ENOSPC: `2>>cron.log` on a full disk. Nobody reads these either.
            self.on_broken_pipe()

    def on_broken_pipe(self) -> None:
        self.quiet = True
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, self.file.fileno())
            finally:
                os.close(devnull)
        except (OSError, ValueError):
            pass  # no descriptor of its own (a test's StringIO): quiet is enough


class StdoutError(CampaignError):
    """Standard output refused a write for another reason than a broken pipe (exit 1)."""


CLOSED_STDOUT = "standard output is closed: what it was to carry is lost"


def unwritable(exc: OSError) -> StdoutError:
    """The error for a write to standard output that failed (not a broken pipe): a full disk
    under `> file`, a hung-up terminal."""
    return StdoutError(f"standard output could not be written ({exc.strerror or exc}): what it "
                       "was to carry is lost")


class _StdoutConsole(Console):
    """rich's Console for stdout: a failed write is `StdoutError`, not an internal error."""

    def _check_buffer(self) -> None:
        try:
            super()._check_buffer()  # (a broken pipe: rich's `on_broken_pipe`)
        except OSError as exc:
            raise unwritable(exc) from None


@dataclass
class Output:
    stdout: IO[str] = field(default_factory=lambda: sys.stdout)
    stderr: IO[str] = field(default_factory=lambda: sys.stderr)
    quiet: bool = False
    verbose: bool = False
    secrets: set[str] = field(default_factory=set)
    log_format: Literal["text", "json"] = "text"
    now: Callable[[], datetime] = field(default=lambda: datetime.now(timezone.utc))

    def __post_init__(self) -> None:
        # Off a terminal (cron logs, pipes) rich would assume 80 columns and squeeze tables.
        def width(stream: IO[str]) -> int | None:
            return None if getattr(stream, "isatty", lambda: False)() else 200

        # No emoji codes: rich would print "file.csv:100: ..." as "file.csv💯 ...".
        self.err = _StderrConsole(file=self.stderr, highlight=False, soft_wrap=True,
                                  emoji=False, width=width(self.stderr))
        self.out = _StdoutConsole(file=self.stdout, highlight=False, soft_wrap=True, emoji=False,
                           width=width(self.stdout))

    @property
    def stderr_is_tty(self) -> bool:
        return bool(getattr(self.stderr, "isatty", lambda: False)())

    def redact(self, text: str) -> str:
        return redact(text, self.secrets)

    def shown(self, text: str) -> str:
        """``text`` redacted, for a person: control characters (an escape sequence in a reason
        from an imported file or a provider's answer would clear the screen or retitle the
        window) are written as escapes, line breaks and tabs kept."""
        return _CONTROL.sub(_control_escape, self.redact(text))

    @property
    def logs_json(self) -> bool:
        return self.log_format == "json"

    def log(self, level: str, message: str, **fields: Any) -> None:
        """One JSON log record on stderr (``log_format = "json"``)."""
        if self.err.quiet:  # its reader is gone (`_StderrConsole`): nobody reads these
            return
        record = {"time": iso(self.now()), "level": level, "message": self.redact(message),
                  **self._redacted(fields)}
        try:
            self.stderr.write(
                json.dumps(record, ensure_ascii=not writes_unicode(self.stderr)) + "\n")
            self.stderr.flush()
        except OSError:  # a broken pipe, a hung-up terminal, a full disk
            self.err.on_broken_pipe()  # as for text: dropped, and the command goes on

    def error(self, message: str) -> None:
        if self.logs_json:
            self.log("error", message)
            return
        self.err.print(f"error: {self.shown(message)}", markup=False)

    def warn(self, message: str) -> None:
        if self.logs_json:
            self.log("warning", message)
            return
        self.err.print(f"warning: {self.shown(message)}", markup=False)

    def info(self, message: str, level: str = "info", **fields: Any) -> None:
        """Chatter for a person (not with ``quiet``); as JSON, a ``level`` record with
        ``fields`` (progress gives its counts)."""
        if self.quiet:
            return
        if self.logs_json:
            self.log(level, message, **fields)
            return
        self.err.print(self.shown(message), markup=False)

    def result(self, message: str, *, err: bool = False) -> None:
        """A command's result, for a person: stdout (stderr with ``err``, when stdout carries
        data, such as the console provider's messages)."""
        if err and self.logs_json:
            self.log("result", message)
            return
        (self.err if err else self.out).print(self.shown(message), markup=False)

    def traceback(self) -> None:
        """The traceback of the exception being handled, with ``verbose``."""
        if not self.verbose:
            return
        text = traceback.format_exc()
        if self.logs_json:
            self.log("error", "traceback", traceback=text)
            return
        self.err.print(self.shown(text), markup=False)

    @contextlib.contextmanager
    def writing(self) -> Iterator[IO[str]]:
        """Standard output, to write data to: closed (`>&-`: Python has no sys.stdout), or a
        write that fails (a full disk under `> summary.json`, a hung-up terminal), is a
        `StdoutError`; a broken pipe stays one (its reader is gone: `fail` says so)."""
        if self.stdout is None:
            raise StdoutError(CLOSED_STDOUT)
        try:
            yield self.stdout
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise unwritable(exc) from None

    def json(self, payload: Any) -> None:
        with self.writing() as stdout:
            # Redact the values, not the serialized text: a secret such as "100" would turn
            # numbers into `***` (not JSON), and one with a quote or backslash is escaped in the
            # text. An ASCII or Latin-1 standard output gets JSON's escapes, not an encoding
            # error.
            text = json.dumps(self._redacted(payload), ensure_ascii=not writes_unicode(stdout))
            stdout.write(text + "\n")
            stdout.flush()

    def _redacted(self, value: Any) -> Any:
        if isinstance(value, dict):
            return {str(k): self._redacted(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self._redacted(v) for v in value]
        if value is None or isinstance(value, (bool, int, float)):
            return value
        return self.redact(value if isinstance(value, str) else str(value))  # Decimal, Path

    def table(
        self, columns: Sequence[str], rows: Iterable[Sequence[Any]], *, title: str | None = None,
        err: bool = False,
    ) -> None:
        if err and self.logs_json:
            self.log("result", title or "", columns=list(columns),
                     rows=[["" if v is None else v for v in row] for row in rows])
            return
        table = Table(*columns, title=title, show_edge=False, pad_edge=False)
        for row in rows:
            # Cells are data (reasons, sources, provider answers), never rich markup: "[/x]"
            # would raise MarkupError.
            table.add_row(*(Text(self.shown("" if v is None else str(v))) for v in row))
        (self.err if err else self.out).print(table)

    def listing(self, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> int:
        """A list that may be long (`suppress list`, `consent list`) on stdout, written as it
        is read; returns the number of rows. On a terminal, up to `TABLE_ROWS` rows are a table
        as `table` draws it; more, or stdout not a terminal (a pipe, a file, cron), are
        tab-separated lines: a header line with the column names, then one line per row. rich
        measured every cell of every row before printing the first (98 s and 850 MB for
        150,000 opt-outs, the whole list held in memory). A cell is shown as `shown` shows it,
        its line breaks and tabs written ``\\n`` and ``\\t``, so that a line is a row; on a
        standard output that is not UTF-8 (``PYTHONIOENCODING=ascii``, a Latin-1 locale), a
        character it cannot write as ``\\xfc`` or ``\\U0001f600``, not an encoding error."""
        found = iter(rows)
        unencodable = None
        if not writes_unicode(self.stdout):
            unencodable = getattr(self.stdout, "encoding", None) or "ascii"
        if self.stdout_is_tty:
            head = list(itertools.islice(found, TABLE_ROWS + 1))
            if len(head) <= TABLE_ROWS:
                if unencodable is not None:  # (redacted before it is escaped)
                    head = [[_escaped(self.shown("" if v is None else str(v)), unencodable)
                             for v in row] for row in head]
                self.table(columns, head)
                return len(head)
            found = itertools.chain(head, found)
        count = 0
        with self.writing() as stdout:
            stdout.write("\t".join(columns) + "\n")
            for row in found:
                stdout.write("\t".join(self._cell(v, unencodable) for v in row) + "\n")
                count += 1
            stdout.flush()
        return count

    def _cell(self, value: Any, unencodable: str | None) -> str:
        """A cell of the plain form: redacted, then backslash escapes as in a Python string
        literal (``\\\\``, ``\\n``, ``\\t``, ``\\x1b``; and for an ``unencodable`` encoding, what it
        lacks: ``\\xfc``), so that a line is a row and every cell reads back exactly."""
        text = self.redact("" if value is None else str(value)).replace("\\", "\\\\")
        text = _CELL_CONTROL.sub(_control_escape, text)
        return text if unencodable is None else _escaped(text, unencodable)

    def json_array(self, items: Iterable[Any]) -> int:
        """`json` of a list, written item by item as ``items`` yields them (a list of 150,000
        opt-outs is not held in memory): the same document, byte for byte. Returns the count."""
        count = 0
        with self.writing() as stdout:
            ascii_only = not writes_unicode(stdout)
            stdout.write("[")
            for item in items:
                if count:
                    stdout.write(", ")
                stdout.write(json.dumps(self._redacted(item), ensure_ascii=ascii_only))
                count += 1
            stdout.write("]\n")
            stdout.flush()
        return count

    @property
    def stdout_is_tty(self) -> bool:
        return bool(getattr(self.stdout, "isatty", lambda: False)())

    def fail(self, exc: BaseException) -> int:
        """Report an exception on one line and return the exit code for it."""
        if isinstance(exc, CampaignError):
            self.error(str(exc))
            self.traceback()
            return int(exc.exit_code)
        if isinstance(exc, BrokenPipeError):  # `campaign ... | head`: not a bug
            self.error("standard output was closed before everything was written (broken pipe): "
                       "the program reading it exited")
            return int(ExitCode.INTERNAL)
        self.error(f"internal error: {type(exc).__name__}: {exc} (a bug: please report it; "
                   "--verbose shows the traceback)")
        self.traceback()
        return int(ExitCode.INTERNAL)


def guarded(fn: Callable[..., Any], output: Output, *args: Any, **kwargs: Any) -> Any:
    """Call ``fn``; a CampaignError becomes one line on stderr and its exit code."""
    import typer

    try:
        return fn(*args, **kwargs)
    except (typer.Exit, typer.Abort):
        raise
    except KeyboardInterrupt:
        # Ctrl-C outside a run's own handlers (`suppress import`, `status`): typer would exit
        # 130 without a word. What was not committed is rolled back by the store.
        output.error("interrupted")
        raise typer.Exit(int(ExitCode.INTERRUPTED)) from None
    except Exception as exc:  # noqa: BLE001 - the one place errors become exit codes
        raise typer.Exit(output.fail(exc)) from None


class ProgressDisplay:
    """Run progress on stderr: a rich live display on a terminal (unless ``live`` is false),
    else a plain line every few seconds (fit for cron logs). Fed `pipeline.Progress` snapshots;
    never touches stdout."""

    def __init__(self, output: Output, title: str, *, plain_every: float = 5.0,
                 live: bool = True) -> None:
        self._output = output
        self._live_allowed = live
        self._title = title
        self._plain_every = plain_every
        self._last_plain = 0.0
        self._live: Any = None
        self._progress: Any = None
        self._task: Any = None

    def __enter__(self) -> ProgressDisplay:
        if self._output.quiet:
            return self
        if self._output.stderr_is_tty and self._live_allowed and not self._output.logs_json:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[detail]}"), TimeRemainingColumn(),
                console=self._output.err, transient=False,
            )
            self._task = self._progress.add_task(self._title, total=None, detail="")
            self._progress.start()
        return self

    def update(self, p: Any) -> None:
        """``p`` is a `campaign_cli.pipeline.Progress`."""
        if self._output.quiet:
            return
        detail = (f"sent {p.sent:,}  skipped {p.skipped:,}  failed {p.failed:,}  "
                  f"{p.rate_per_s:,.0f}/s  spend {from_micros(p.spend_micros):,} {p.currency}")
        if self._progress is not None:
            self._progress.update(self._task, total=p.total, completed=p.done, detail=detail)
            return
        if p.elapsed_s - self._last_plain >= self._plain_every:
            self._last_plain = p.elapsed_s
            eta = "" if p.eta_s is None else f"  eta {p.eta_s:,.0f}s"
            self._output.info(
                f"{self._title}: {p.done:,}/{p.total:,} done  {detail}{eta}", level="progress",
                done=p.done, total=p.total, sent=p.sent, skipped=p.skipped, failed=p.failed,
                pending=p.pending, rate_per_s=round(p.rate_per_s, 1),
                spend=str(from_micros(p.spend_micros)), currency=p.currency,
                eta_s=None if p.eta_s is None else round(p.eta_s, 1),
            )

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()
