"""Text output that never loses bytes, whatever PYTHONUNBUFFERED says.

Under ``PYTHONUNBUFFERED=1`` or ``python -u`` (common in container images), Python's standard
output writes straight to a raw file, and a raw ``write()`` may write less than it was given: a
write blocked on a full pipe returns what it managed when a stop and continue (Ctrl-Z then ``fg``,
``docker pause``, a debugger or py-spy attaching) interrupts it. Python's text layer ignores the
short count, so the rest is silently dropped: for the console provider, messages journaled as
sent that the reading program never saw. A buffered writer finishes every write it is given.
"""

from __future__ import annotations

import codecs
import io
import re
from json.encoder import encode_basestring_ascii
from typing import IO


def whole_writes(stream: IO[str]) -> IO[str]:
    """``stream``, or, when it writes straight to a raw file, a line-buffered text stream on the
    same file descriptor (not closing it) whose writes always complete."""
    raw = getattr(stream, "buffer", None)
    if not isinstance(raw, io.RawIOBase):
        return stream
    try:
        fd = stream.fileno()
    except (OSError, ValueError):
        return stream
    stream.flush()
    return open(  # noqa: SIM115 - it lives as long as the stream it replaces
        fd, "w", buffering=1, encoding=getattr(stream, "encoding", None) or "utf-8",
        errors=getattr(stream, "errors", None) or "strict", closefd=False,
    )


def writes_unicode(stream: IO[str]) -> bool:
    """Whether ``stream`` can write any character: a UTF encoding, or none (an in-memory one).
    Elsewhere (``PYTHONIOENCODING=ascii``, a Latin-1 locale, a Windows console) a character it
    cannot encode makes the write raise `UnicodeEncodeError`."""
    encoding = getattr(stream, "encoding", None)
    if not encoding:
        return True
    try:
        return codecs.lookup(encoding).name.startswith("utf")
    except LookupError:
        return False


def ascii_json(text: str) -> str:
    """JSON text with every non-ASCII character written as a ``\\u`` escape (there are none
    outside strings): the same JSON, fit for any stream. Redact before this, not after."""
    return _NON_ASCII.sub(lambda m: encode_basestring_ascii(m[0])[1:-1], text)


_NON_ASCII = re.compile(r"[^\x00-\x7f]")


def last_line(file: IO[bytes] | None, limit: int = 300) -> str:
    """The last non-blank line written to ``file`` (a child process's stderr: a crash's
    exception), at most ``limit`` characters; empty if there is none or it cannot be read."""
    if file is None:
        return ""
    try:
        file.seek(0, io.SEEK_END)
        size = file.tell()
        file.seek(max(0, size - 4096))
        tail = file.read().decode("utf-8", "replace")
    except (OSError, ValueError):
        return ""
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    return lines[-1][:limit] if lines else ""


class _Utf8Bytes(io.TextIOBase):
    """Text written to a binary stream as UTF-8, as given (no newline translation); every
    byte of it, even on a raw file (``PYTHONUNBUFFERED``) whose writes may fall short."""

    def __init__(self, binary: IO[bytes]) -> None:
        super().__init__()
        self._binary = binary

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        view = memoryview(text.encode("utf-8"))
        while view:
            done = self._binary.write(view)
            view = view[done or 0:]
        return len(text)

    def flush(self) -> None:
        self._binary.flush()


def utf8_text(stream: IO[str]) -> IO[str]:
    """``stream`` for a file format (a CSV export that `suppress import` reads back): UTF-8
    with its lines ending as written, whatever the locale's encoding (Latin-1, a Windows code
    page) and line ending (Windows: CR LF, which turns a CSV's CR LF into CR CR LF). A stream
    without a binary layer (an in-memory one) is written as it is."""
    binary = getattr(stream, "buffer", None)
    if binary is None:
        return stream
    stream.flush()  # (what was written before goes first)
    return _Utf8Bytes(binary)  # type: ignore[return-value]
