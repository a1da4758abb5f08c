"""`whole_writes`: standard output that finishes every write (campaign_cli/streams.py). The
stop-and-continue case itself is in tests/test_cli_process.py."""

from __future__ import annotations

import io
import os
from pathlib import Path

from campaign_cli.streams import whole_writes


def test_streams_that_buffer_or_have_no_file_are_left_alone(tmp_path: Path) -> None:
    text = io.StringIO()
    assert whole_writes(text) is text
    with (tmp_path / "out.txt").open("w") as buffered:
        assert whole_writes(buffered) is buffered


def test_a_stream_on_a_raw_file_is_replaced_by_a_buffered_one_on_the_same_descriptor(
    tmp_path: Path,
) -> None:
    path = tmp_path / "out.txt"
    raw = io.FileIO(path, "w")
    unbuffered = io.TextIOWrapper(raw, encoding="utf-8", write_through=True)  # what -u makes
    unbuffered.write("before\n")
    safe = whole_writes(unbuffered)
    assert safe is not unbuffered and isinstance(safe.buffer, io.BufferedWriter)  # type: ignore[attr-defined]
    assert safe.fileno() == raw.fileno()
    safe.write("é after\n")  # line-buffered: written at the newline
    assert path.read_text(encoding="utf-8") == "before\né after\n"
    safe.close()  # closes only its own layer: the descriptor stays open
    os.fstat(raw.fileno())
    unbuffered.close()
