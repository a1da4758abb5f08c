"""Text output that never loses bytes, whatever PYTHONUNBUFFERED says.

Under ``PYTHONUNBUFFERED=1`` or ``python -u`` (common in container images), Python's standard
output writes straight to a raw file, and a raw ``write()`` may write less than it was given: a
write blocked on a full pipe returns what it managed when a stop and continue (Ctrl-Z then ``fg``,
``docker pause``, a debugger or py-spy attaching) interrupts it. Python's text layer ignores the
short count, so the rest is silently dropped: for the console provider, messages journaled as
sent that the reading program never saw. A buffered writer finishes every write it is given.
"""

from __future__ import annotations

import io
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
