"""The recipient file: a streaming CSV reader that never holds the file.

Two passes, both memory-flat:

* `scan_recipients` reads the file once before anything is sent: it hashes the raw bytes (the
  hash names the run), checks that the file is UTF-8, that the header names every column the
  campaign needs exactly once, and counts the data records. Every problem is an `InputError`
  naming the file, the physical line and, where there is one, the column.
* `iter_recipient_chunks` reads it again, in chunks, turning each record into a `Recipient` with
  normalised addresses or into an `InvalidRow` with a journal reason.

What counts as what:

* The file is UTF-8, with or without a byte-order mark; lines end in LF, CRLF or CR; a quoted
  field may span several lines. ``line`` is always the physical line (from 1) on which a record
  starts; ``row`` counts data records from 1, the header not included.
* A record with no content at all (a blank line, or nothing but delimiters and whitespace, as
  spreadsheets leave at the end of a sheet) is skipped: it is not a row and gets no number. Every
  other record is a row, valid or not, so the journal's counts add up to `ScanResult.rows`.
* The header is the first record with content. Column names lose surrounding whitespace; an empty
  or repeated name is an error. Field values are kept exactly as written (addresses are stripped
  by normalisation, the key is stripped).
* A record with more or fewer fields than the header is ``malformed_row``; an empty key is
  ``missing_key``; an address that is empty or wrong does not make the row invalid, it is recorded
  in `Recipient.problems` for that channel (``no_address``, ``bad_phone``, ``bad_email``, ...).

`ProcessChunkReader` runs `iter_recipient_chunks` in a separate process (normalising addresses is
most of the reading cost, and it then runs on another core) and hands the chunks over through a
pipe, whose small buffer keeps the reader at most a chunk or two ahead; `InlineChunkReader` is the
same interface over the generator in this process, for small files where starting a process
would cost more than it saves. Both yield exactly what `iter_recipient_chunks` yields.

`iter_recipient_chunks` checks the header again (it needs the column positions) and reports
undecodable bytes and CSV errors, but relies on `scan_recipients` for whole-file checks such as
NUL bytes: run the scan first.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import os
import pickle
import signal
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, BinaryIO, NamedTuple, Protocol

from campaign_cli.addresses import AddressError, normalize_address
from campaign_cli.errors import InputError, ReaderProcessError, StoppedBeforeStart
from campaign_cli.models import Channel, InvalidRow, Recipient
from campaign_cli.streams import last_line

if TYPE_CHECKING:
    from _csv import Reader

    from _typeshed import WriteableBuffer

    from campaign_cli.config import Campaign

_BLOCK = 1 << 16


@dataclass(frozen=True)
class RecipientSpec:
    """Where the recipients are and which columns matter.

    ``columns`` maps each channel the campaign sends on to the column holding its address; a
    webhook channel may have none (it then goes to the provider's one URL).
    """

    path: Path
    key: str
    columns: dict[Channel, str]
    default_region: str = "US"
    delimiter: str = ","
    #: The file as `scan_recipients` saw it (`ScanResult.identity`). When set, the readers refuse
    #: to start on another file and stop if this one changes under them.
    expect: FileIdentity | None = None

    @classmethod
    def from_config(cls, campaign: Campaign, path: Path) -> RecipientSpec:
        config = campaign.recipients
        columns: dict[Channel, str] = {}
        for channel in campaign.channels.enabled():
            column = config.columns.for_channel(channel)
            if column is not None:
                columns[channel] = column
        return cls(
            path=path,
            key=config.key,
            columns=columns,
            default_region=config.default_region,
            delimiter=config.delimiter,
        )

    @property
    def required_columns(self) -> list[str]:
        """The key column, then each channel's address column, without repeats."""
        return list(dict.fromkeys([self.key, *self.columns.values()]))


class FileIdentity(NamedTuple):
    """Which file, and which version of it: what a scan hashed and the readers must read."""

    device: int
    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, handle: IO[Any]) -> FileIdentity:
        st = os.fstat(handle.fileno())
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass
class ScanResult:
    sha256: str
    rows: int
    header: list[str]
    identity: FileIdentity


# --------------------------------------------------------------------------------------------
# Scanning


class _HashingReader(io.RawIOBase):
    """A raw binary stream over ``source`` that hashes every byte read and notes the first NUL."""

    def __init__(self, source: BinaryIO) -> None:
        super().__init__()
        self._source = source
        self.digest = hashlib.sha256()
        self.size = 0
        self.nul_at: int | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        view = memoryview(buffer).cast("B")
        data = self._source.read(len(view))
        n = len(data)
        view[:n] = data
        self.digest.update(data)
        if self.nul_at is None:
            at = data.find(b"\x00")
            if at >= 0:
                self.nul_at = self.size + at
        self.size += n
        return n


#: How many records the scan reads between two looks at its ``stopped`` callback.
SCAN_STOP_EVERY = 4096


def scan_recipients(spec: RecipientSpec,
                    stopped: Callable[[], bool] | None = None) -> ScanResult:
    """Hash, validate and count the recipient file in one pass. Blocking; raises `InputError`,
    or `StoppedBeforeStart` once ``stopped()`` says so (asked every few thousand records: a
    large file takes seconds, and Ctrl-C must not wait for the end of it).

    ``rows`` is the number of items `iter_recipient_chunks` will yield (valid or not).
    """
    path = spec.path
    shown = str(path)
    try:
        source = open(path, "rb")
    except OSError as exc:
        raise _unreadable(shown, exc) from None
    with source:
        if not stat.S_ISREG(os.fstat(source.fileno()).st_mode):
            raise InputError(shown, None, None, "not a regular file: the recipient file is read "
                             "twice (checked and hashed first, then sent), which a pipe or a "
                             "device cannot be; save it to a file first")
        identity = FileIdentity.of(source)
        raw = _HashingReader(source)
        text = io.TextIOWrapper(io.BufferedReader(raw, _BLOCK), encoding="utf-8-sig", newline="")
        reader = csv.reader(text, delimiter=spec.delimiter, strict=True)
        rows = 0
        start = 1  # the line on which the record being read starts
        try:
            header, key_index, header_at = _read_header(reader, spec)
            width = len(header)
            start = reader.line_num + 1
            records = 0
            for record in reader:
                start = reader.line_num + 1
                if raw.nul_at is not None:
                    break
                records += 1
                if stopped is not None and records % SCAN_STOP_EVERY == 0 and stopped():
                    raise StoppedBeforeStart(
                        f"{shown}: stopped while the file was being checked; nothing was sent")
                if (len(record) != width or not record[key_index].strip()) and _blank(record):
                    continue
                rows += 1
        except InputError:
            if raw.nul_at is None:  # a binary file: say so rather than blame its "header"
                raise
        except UnicodeDecodeError:
            raise _decode_error(path) from None
        except csv.Error as exc:
            if raw.nul_at is None:
                raise _csv_error(shown, exc, start, reader.line_num) from None
        except OSError as exc:
            raise _unreadable(shown, exc) from None
        if FileIdentity.of(source) != identity:
            raise InputError(shown, None, None,
                             "the recipient file changed while it was being checked; try again")
    if raw.nul_at is not None:
        raise _nul_error(path, raw.nul_at)
    if rows == 0:
        raise InputError(
            shown, header_at, None, "no recipients: the file has a header but no data rows"
        )
    return ScanResult(sha256=raw.digest.hexdigest(), rows=rows, header=header, identity=identity)


# --------------------------------------------------------------------------------------------
# Reading


def iter_recipient_chunks(
    spec: RecipientSpec,
    chunk_size: int = 500,
    start_row: int = 1,
    limit: int | None = None,
) -> Generator[list[Recipient | InvalidRow], None, None]:
    """Yield the data rows in order, ``chunk_size`` at a time (the last chunk may be shorter).

    Rows before ``start_row`` are parsed (they must be, to find the later ones) but neither
    normalised nor yielded: a resumed run skips them cheaply. ``limit`` keeps the first ``limit``
    rows of the file, counted from row 1 rather than from ``start_row``, so a resumed run with
    the same limit covers the same rows. Raises `InputError` for a bad header, undecodable bytes
    or a record the CSV parser refuses.
    """
    if chunk_size < 1:
        raise ValueError("chunk_size must be at least 1")
    if limit is not None and limit < 0:
        raise ValueError("limit must not be negative")
    path = spec.path
    shown = str(path)
    region = spec.default_region
    stop = -1 if limit is None else limit + 1  # the first row not to read; rows start at 1
    try:
        handle = open(path, encoding="utf-8-sig", newline="")
    except OSError as exc:
        raise _unreadable(shown, exc) from None
    reader = csv.reader(handle, delimiter=spec.delimiter, strict=True)
    expect = spec.expect
    before = 0
    try:
        with handle:
            _check_unchanged(handle, expect, shown, None, "since it was checked")
            header, key_index, _ = _read_header(reader, spec)
            width = len(header)
            index = {name: i for i, name in enumerate(header)}
            wanted = [(channel, index[column]) for channel, column in spec.columns.items()]
            chunk: list[Recipient | InvalidRow] = []
            row = 0
            before = reader.line_num
            for record in reader:
                line = before + 1
                before = reader.line_num
                malformed = len(record) != width
                key = "" if malformed else record[key_index].strip()
                if not key and _blank(record):
                    continue  # a blank line is no record
                row += 1
                if row == stop:
                    break
                if row < start_row:
                    continue
                if malformed:
                    chunk.append(InvalidRow(
                        row, line, "malformed_row",
                        f"expected {width} fields as in the header, found {len(record)}",
                    ))
                elif not key:
                    chunk.append(InvalidRow(row, line, "missing_key", f"{spec.key} is empty"))
                else:
                    addresses: dict[Channel, str] = {}
                    problems: dict[Channel, tuple[str, str]] = {}
                    for channel, i in wanted:
                        try:
                            addresses[channel] = normalize_address(channel, record[i], region)
                        except AddressError as err:
                            problems[channel] = (err.reason, err.detail)
                    fields = dict(zip(header, record, strict=False))  # same length: checked
                    chunk.append(Recipient(row, line, key, fields, addresses, problems))
                if len(chunk) >= chunk_size:
                    _check_unchanged(handle, expect, shown, line, "while the run was reading it")
                    yield chunk
                    chunk = []
            if chunk:
                _check_unchanged(handle, expect, shown, before, "while the run was reading it")
                yield chunk
    except UnicodeDecodeError:
        raise _decode_error(path) from None
    except csv.Error as exc:
        raise _csv_error(shown, exc, before + 1, reader.line_num) from None
    except OSError as exc:
        raise _unreadable(shown, exc) from None


# --------------------------------------------------------------------------------------------
# Chunk readers: the same chunks, read here or in another process

Chunk = list[Recipient | InvalidRow]


class ChunkReader(Protocol):
    def next_chunk(self) -> Chunk | None:
        """The next chunk, or None at the end of the file. Blocking; raises `InputError`."""

    def close(self) -> None:
        """Stop reading (at any time; idempotent)."""


def _check_chunk_args(chunk_size: int, limit: int | None) -> None:
    if chunk_size < 1:
        raise ValueError("chunk_size must be at least 1")
    if limit is not None and limit < 0:
        raise ValueError("limit must not be negative")


class InlineChunkReader:
    """`iter_recipient_chunks` in this process (call `next_chunk` from one thread at a time).

    `close` waits for a `next_chunk` running in another thread (a run that stops mid-read
    cancels the coroutine awaiting it, not the thread) and then closes the file: a generator
    cannot be closed while it runs, and leaving it to the garbage collector left the file open."""

    def __init__(
        self, spec: RecipientSpec, chunk_size: int = 500, start_row: int = 1,
        limit: int | None = None,
    ) -> None:
        _check_chunk_args(chunk_size, limit)
        self._chunks = iter_recipient_chunks(spec, chunk_size, start_row, limit)
        self._reading = threading.Lock()

    def next_chunk(self) -> Chunk | None:
        with self._reading:
            return next(self._chunks, None)

    def close(self) -> None:
        with self._reading:  # one chunk at most: milliseconds
            self._chunks.close()


class ProcessChunkReader:
    """`iter_recipient_chunks` in a child process: a fresh interpreter (like multiprocessing's
    'spawn', never a fork of this threaded process), started with ``python -c`` rather than through
    multiprocessing so that it never re-imports the caller's ``__main__`` (a script that calls
    `run_campaign` at top level would otherwise run again in the child). Chunks come back pickled
    on the child's standard output; a full pipe blocks the child, so it runs at most a chunk or two
    ahead and memory stays flat. `InputError` and other failures in the child are raised here by
    `next_chunk`."""

    def __init__(
        self, spec: RecipientSpec, chunk_size: int = 500, start_row: int = 1,
        limit: int | None = None,
    ) -> None:
        _check_chunk_args(chunk_size, limit)
        self._done = False
        # Its last words (a crash's one line) go to a file, never to the user's terminal.
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed with the process
        # The stop signals are blocked while the child is started: it inherits the mask, so one
        # that arrives while its interpreter starts up waits until its code ignores it (the
        # parent's, held meanwhile, is delivered when the mask is put back).
        masked = hasattr(signal, "pthread_sigmask")
        if masked:
            mask = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            self._process = subprocess.Popen(  # noqa: S603 - our own interpreter, fixed code
                [sys.executable, "-c", _CHILD_CODE],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
            )
        except BaseException:
            self._stderr.close()
            raise
        finally:
            if masked:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        args = {
            "sys_path": list(sys.path),
            "path": str(spec.path),
            "key": spec.key,
            "columns": [(channel.value, column) for channel, column in spec.columns.items()],
            "default_region": spec.default_region,
            "delimiter": spec.delimiter,
            # A plain tuple: the child unpickles these before it can import this module.
            "expect": None if spec.expect is None else tuple(spec.expect),
            "chunk_size": chunk_size,
            "start_row": start_row,
            "limit": limit,
        }
        assert self._process.stdin is not None and self._process.stdout is not None
        self._stdout = self._process.stdout
        try:
            pickle.dump(args, self._process.stdin, protocol=pickle.HIGHEST_PROTOCOL)
            self._process.stdin.close()
        except OSError:
            pass  # the child died at once: next_chunk reports it

    def next_chunk(self) -> Chunk | None:
        if self._done:
            return None
        try:
            kind, payload = pickle.load(self._stdout)  # noqa: S301 - our own child
        except (EOFError, OSError, pickle.UnpicklingError, ValueError) as exc:
            if self._done:
                return None  # closed while waiting
            self._done = True
            # It died (its output ended, perhaps inside a chunk), or its output broke while it
            # lives, most likely blocked writing the rest to a full pipe: then waiting for it to
            # exit would wait for ever, so it is stopped.
            try:
                code = self._process.wait(timeout=5.0 if isinstance(exc, EOFError) else 0.5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
                raise ReaderProcessError(
                    f"the recipient reader process sent data that could not be read "
                    f"({type(exc).__name__}: {exc})"
                ) from None
            why = _exit_status(code)
            said = last_line(self._stderr)
            if said:
                why += f": {said}"
            raise ReaderProcessError(
                f"the recipient reader process ended unexpectedly ({why})"
            ) from None
        if kind == "chunk":
            chunk: Chunk = payload
            return chunk
        self._done = True
        if kind == "error":
            file, line, column, message = payload
            raise InputError(file, line, column, message)
        if kind == "failed":
            raise ReaderProcessError(f"reading the recipient file failed: {payload}")
        return None  # "done"

    def close(self) -> None:
        self._done = True
        process = self._process
        if process.poll() is None:
            process.kill()  # (it ignores SIGTERM: see `_CHILD_CODE`)
        process.wait()
        self._stdout.close()
        self._stderr.close()


def _exit_status(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "a signal"
        return f"killed by {name}"
    return f"exit code {code}"


#: Ctrl-C, and the SIGTERM or SIGHUP that `systemctl stop` (every process of the unit) or a
#: terminal hanging up (its process group) sends the reader child too: stopping is the parent's
#: to decide, so the child ignores them (`close` ends it with SIGKILL).
_STOP_SIGNALS = frozenset(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP")
                          if hasattr(signal, name))

# `-c` puts the working directory ('') first on the path: drop it before importing anything, or
# a user's pickle.py (struct.py, re.py, ...) there would be imported instead of the library's.
# The stop signals are ignored first, then let through (they were blocked from the start).
_CHILD_CODE = (
    "import sys\n"
    "sys.path[:] = [p for p in sys.path if p]\n"
    "import signal\n"
    "stops = [getattr(signal, n) for n in ('SIGINT', 'SIGTERM', 'SIGHUP') if hasattr(signal, n)]\n"
    "for s in stops:\n"
    "    signal.signal(s, signal.SIG_IGN)\n"
    "if hasattr(signal, 'pthread_sigmask'):\n"
    "    signal.pthread_sigmask(signal.SIG_UNBLOCK, stops)\n"
    "import pickle\n"
    "args = pickle.load(sys.stdin.buffer)\n"
    "sys.path[:] = args['sys_path']\n"
    "from campaign_cli.recipients import _child_main\n"
    "_child_main(args)\n"
)


def _child_main(args: dict[str, Any]) -> None:
    """The child process: read, normalise and send each chunk, then a final message."""
    # Buffered, whatever PYTHONUNBUFFERED says. Under it `sys.stdout.buffer` is a raw file whose
    # write() may stop short: a write blocked on a full pipe returns what it wrote so far when a
    # stop and continue (Ctrl-Z, `fg`, a debugger or py-spy attaching) interrupts it, and pickle
    # ignores the count, so the stream lost bytes and the parent could not read it. A
    # BufferedWriter writes all it is given.
    out = open(sys.stdout.fileno(), "wb", closefd=False)  # noqa: SIM115 - lives as long as we do
    spec = RecipientSpec(
        path=Path(args["path"]), key=args["key"],
        columns={Channel(channel): column for channel, column in args["columns"]},
        default_region=args["default_region"], delimiter=args["delimiter"],
        expect=None if args["expect"] is None else FileIdentity(*args["expect"]),
    )
    message: tuple[str, Any]
    try:
        try:
            for chunk in iter_recipient_chunks(
                spec, args["chunk_size"], args["start_row"], args["limit"]
            ):
                pickle.dump(("chunk", chunk), out, protocol=pickle.HIGHEST_PROTOCOL)
                out.flush()
            message = ("done", None)
        except InputError as exc:
            message = ("error", (exc.file, exc.line, exc.field, exc.message))
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises it
            message = ("failed", f"{type(exc).__name__}: {exc}")
        pickle.dump(message, out, protocol=pickle.HIGHEST_PROTOCOL)
        out.flush()
    except OSError:
        pass  # the parent stopped listening


# --------------------------------------------------------------------------------------------
# Helpers


def _check_unchanged(
    handle: IO[Any], expect: FileIdentity | None, shown: str, line: int | None, when: str
) -> None:
    """Stop (an `InputError`) if the open file is not the one the run hashed: rows from an
    edited, appended or replaced file must not go out under this run's hash."""
    if expect is not None and FileIdentity.of(handle) != expect:
        raise InputError(
            shown, line, None,
            f"the recipient file changed {when}: stopped before sending from it; rows already "
            "sent stay journaled. Restore the file to resume this run, or start a new run with "
            "another --run-key",
        )


def _blank(record: list[str]) -> bool:
    """A record with no content: ``[]`` for an empty line, or only empty or blank fields."""
    for value in record:
        if value and not value.isspace():
            return False
    return True


def _read_header(reader: Reader, spec: RecipientSpec) -> tuple[list[str], int, int]:
    """Read and check the header: the column names, the key column's index, the header's line."""
    shown = str(spec.path)
    before = reader.line_num
    for record in reader:
        if not _blank(record):
            break
        before = reader.line_num
    else:
        raise InputError(
            shown, 1, None, "the file is empty: expected a header row naming the columns"
        )
    line = before + 1
    header = [name.strip() for name in record]
    seen: dict[str, int] = {}
    for number, name in enumerate(header, 1):
        if not name:
            raise InputError(
                shown,
                line,
                f"column {number}",
                "empty column name in the header (every column needs a name)",
            )
        if name in seen:
            raise InputError(
                shown,
                line,
                _printable(name),
                f"duplicate column name (columns {seen[name]} and {number})",
            )
        seen[name] = number
    for column in spec.required_columns:
        if column not in seen:
            present = ", ".join(_printable(name) for name in header)
            raise InputError(
                shown,
                line,
                _printable(column),
                f"no such column in the header (the columns are: {present})",
            )
    return header, seen[spec.key] - 1, line


def _printable(name: str) -> str:
    """A column name fit for a one-line message: quoted if it holds line breaks or the like."""
    return name if name.isprintable() else repr(name)


def _csv_error(shown: str, exc: csv.Error, start: int, line: int) -> InputError:
    """A record the (strict) CSV parser refuses. A quote still open at the end of the file is
    named at the line where its record starts: read leniently, every later line would vanish
    into that one field."""
    if "unexpected end of data" in str(exc):
        return InputError(shown, start, None, "a quoted field is never closed: add the closing "
                          'quote (a quote inside a quoted field is written "")')
    return InputError(shown, line, None, f"cannot parse CSV: {exc}")


def _unreadable(shown: str, exc: OSError) -> InputError:
    if isinstance(exc, FileNotFoundError):
        return InputError(shown, None, None, "recipient file not found")
    reason = exc.strerror or str(exc)
    return InputError(shown, None, None, f"cannot read the recipient file: {reason}")


def _nul_error(path: Path, offset: int) -> InputError:
    return InputError(
        str(path),
        _line_at(path, offset),
        None,
        f"NUL byte at byte offset {offset}: this looks like a binary file, not CSV text",
    )


def _decode_error(path: Path) -> InputError:
    """Re-read the file to find the first byte that is not UTF-8, and name its line."""
    shown = str(path)
    decoder = codecs.getincrementaldecoder("utf-8")()
    fed = 0
    try:
        with open(path, "rb") as handle:
            while True:
                block = handle.read(_BLOCK)
                pending = len(decoder.getstate()[0])
                try:
                    decoder.decode(block, final=not block)
                except UnicodeDecodeError as exc:
                    offset = fed - pending + exc.start
                    bad = exc.object[exc.start : exc.start + 1].hex()
                    return InputError(
                        shown,
                        _line_at(path, offset),
                        None,
                        f"not valid UTF-8: byte 0x{bad} at byte offset {offset}"
                        " (save the file as UTF-8)",
                    )
                if not block:
                    break
                fed += len(block)
    except OSError as exc:
        return _unreadable(shown, exc)
    return InputError(shown, None, None, "not valid UTF-8 (save the file as UTF-8)")


def _line_at(path: Path, offset: int) -> int:
    """The physical line (from 1) holding byte ``offset``; a line ends at LF, CRLF or CR."""
    breaks = 0
    after_cr = False
    remaining = offset
    with open(path, "rb") as handle:
        while remaining > 0:
            block = handle.read(min(_BLOCK, remaining))
            if not block:
                break
            remaining -= len(block)
            breaks += block.count(b"\n") + block.count(b"\r") - block.count(b"\r\n")
            if after_cr and block.startswith(b"\n"):
                breaks -= 1  # a CRLF split across two blocks is one line break
            after_cr = block.endswith(b"\r")
    return breaks + 1
