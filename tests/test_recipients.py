"""The streaming recipient reader: encodings, line numbers, hostile files, normalisation, memory."""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from campaign_cli import recipients
from campaign_cli.config import Campaign
from campaign_cli.errors import InputError
from campaign_cli.models import Channel, InvalidRow, Recipient
from campaign_cli.recipients import RecipientSpec, iter_recipient_chunks, scan_recipients

SMS_EMAIL = {Channel.SMS: "phone", Channel.EMAIL: "email"}


def write(tmp_path: Path, content: str | bytes, name: str = "r.csv") -> Path:
    path = tmp_path / name
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    return path


def spec_for(
    path: Path,
    columns: dict[Channel, str] | None = None,
    key: str = "id",
    region: str = "US",
    delimiter: str = ",",
) -> RecipientSpec:
    return RecipientSpec(
        path=path,
        key=key,
        columns=SMS_EMAIL if columns is None else columns,
        default_region=region,
        delimiter=delimiter,
    )


def read_all(spec: RecipientSpec, **kwargs: Any) -> list[Recipient | InvalidRow]:
    return [item for chunk in iter_recipient_chunks(spec, **kwargs) for item in chunk]


def scan_error(spec: RecipientSpec) -> InputError:
    with pytest.raises(InputError) as info:
        scan_recipients(spec)
    err = info.value
    assert err.file == str(spec.path)
    assert "\n" not in str(err) and "\r" not in str(err)
    return err


GOOD = (
    "id,name,phone,email\r\n"
    "1,Ann,+1 (415) 555-0100,Ann@Example.COM\r\n"
    "2,Bob,(415) 555-0101,bob@example.com\r\n"
)


# --------------------------------------------------------------------------------------------
# Reading


def test_reads_crlf_file_with_bom(tmp_path: Path) -> None:
    path = write(tmp_path, b"\xef\xbb\xbf" + GOOD.encode())
    spec = spec_for(path)
    result = scan_recipients(spec)
    assert result.rows == 2
    assert result.header == ["id", "name", "phone", "email"]  # no BOM in the first name
    assert result.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    ann, bob = read_all(spec)
    assert isinstance(ann, Recipient) and isinstance(bob, Recipient)
    assert (ann.row, ann.line, ann.key) == (1, 2, "1")
    assert (bob.row, bob.line) == (2, 3)
    assert ann.fields == {
        "id": "1",
        "name": "Ann",
        "phone": "+1 (415) 555-0100",
        "email": "Ann@Example.COM",
    }
    assert ann.addresses == {Channel.SMS: "+14155550100", Channel.EMAIL: "ann@example.com"}
    assert ann.problems == {}
    assert bob.addresses[Channel.SMS] == "+14155550101"  # national number, region US


def test_national_number_uses_default_region(tmp_path: Path) -> None:
    path = write(tmp_path, "id,phone\n1,020 7946 0018\n2,07400 123456\n")
    spec = spec_for(path, {Channel.SMS: "phone"}, region="GB")
    first, second = read_all(spec)
    assert isinstance(first, Recipient) and isinstance(second, Recipient)
    assert first.addresses == {Channel.SMS: "+442079460018"}
    assert second.addresses == {Channel.SMS: "+447400123456"}
    # The same national number read as a US number is not valid.
    us = read_all(spec_for(path, {Channel.SMS: "phone"}, region="US"))
    assert isinstance(us[0], Recipient) and us[0].problems[Channel.SMS][0] == "bad_phone"


def test_quoted_newlines_give_correct_lines(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "id,note,phone\r\n"
        '1,"two\r\nlines",+14155550100\r\n'
        '2,"three\nmixed\rbreaks",+14155550101\r\n'
        "3,plain,+14155550102\r\n"
        '"4","a ""quoted"" word, and a comma",+14155550103\r\n',
    )
    spec = spec_for(path, {Channel.SMS: "phone"})
    items = read_all(spec)
    assert [(i.row, i.line) for i in items] == [(1, 2), (2, 4), (3, 7), (4, 8)]
    assert isinstance(items[0], Recipient) and items[0].fields["note"] == "two\r\nlines"
    assert isinstance(items[1], Recipient) and items[1].fields["note"] == "three\nmixed\rbreaks"
    assert isinstance(items[3], Recipient)
    assert items[3].fields["note"] == 'a "quoted" word, and a comma'
    assert scan_recipients(spec).rows == 4


def test_blank_records_are_skipped_but_their_lines_counted(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "\r\nid,phone\r\n\r\n1,+14155550100\r\n,\r\n  ,  \r\n2,+14155550101\r\n\r\n\r\n",
    )
    spec = spec_for(path, {Channel.SMS: "phone"})
    items = read_all(spec)
    assert [(i.row, i.line) for i in items] == [(1, 4), (2, 7)]
    result = scan_recipients(spec)
    assert result.rows == 2 and result.header == ["id", "phone"]


def test_cr_line_endings_and_other_delimiter(tmp_path: Path) -> None:
    path = write(tmp_path, "id;phone\r1;+14155550100\r2;+14155550101\r")
    spec = spec_for(path, {Channel.SMS: "phone"}, delimiter=";")
    assert [(i.row, i.line) for i in read_all(spec)] == [(1, 2), (2, 3)]
    assert scan_recipients(spec).rows == 2


def test_header_names_are_stripped_values_kept(tmp_path: Path) -> None:
    path = write(tmp_path, " id , phone \n 7 ,  +14155550100  \n")
    (item,) = read_all(spec_for(path, {Channel.SMS: "phone"}))
    assert isinstance(item, Recipient)
    assert item.key == "7"
    assert item.fields == {"id": " 7 ", "phone": "  +14155550100  "}
    assert item.addresses == {Channel.SMS: "+14155550100"}


def test_invalid_rows_and_address_problems(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "id,phone,email\n"
        "1,12,not-an-email\n"  # bad phone, bad email: still a recipient, with problems
        ",+14155550100,a@example.com\n"  # no key
        "3,+14155550100\n"  # too few fields
        "4,+14155550100,a@example.com,extra\n"  # too many
        "5,,\n"  # no addresses at all
        "6,+14155550100,a@example.com\n",
    )
    spec = spec_for(path)
    items = read_all(spec)
    assert [i.row for i in items] == [1, 2, 3, 4, 5, 6]
    assert [i.line for i in items] == [2, 3, 4, 5, 6, 7]
    bad, no_key, short, long, empty, good = items
    assert isinstance(bad, Recipient)
    assert bad.addresses == {}
    assert bad.problems[Channel.SMS][0] == "bad_phone"
    assert bad.problems[Channel.EMAIL][0] == "bad_email"
    assert isinstance(no_key, InvalidRow) and no_key.reason == "missing_key"
    assert isinstance(short, InvalidRow) and short.reason == "malformed_row"
    assert "found 2" in short.detail
    assert isinstance(long, InvalidRow) and long.reason == "malformed_row"
    assert isinstance(empty, Recipient)
    assert {ch: p[0] for ch, p in empty.problems.items()} == {
        Channel.SMS: "no_address",
        Channel.EMAIL: "no_address",
    }
    assert isinstance(good, Recipient) and good.problems == {}
    assert scan_recipients(spec).rows == 6


def test_whitespace_key_is_missing(tmp_path: Path) -> None:
    path = write(tmp_path, "id,phone\n   ,+14155550100\n")
    (item,) = read_all(spec_for(path, {Channel.SMS: "phone"}))
    assert isinstance(item, InvalidRow) and item.reason == "missing_key"


def test_limit_and_start_row(tmp_path: Path) -> None:
    lines = ["id,phone"] + [f"{n},+1415555{n:04d}" for n in range(1, 11)]
    path = write(tmp_path, "\n".join(lines) + "\n")
    spec = spec_for(path, {Channel.SMS: "phone"})
    assert [i.row for i in read_all(spec, limit=3)] == [1, 2, 3]
    assert [i.row for i in read_all(spec, start_row=8)] == [8, 9, 10]
    assert [i.line for i in read_all(spec, start_row=8)] == [9, 10, 11]
    assert [i.row for i in read_all(spec, start_row=4, limit=6)] == [4, 5, 6]
    assert read_all(spec, start_row=7, limit=6) == []
    assert read_all(spec, limit=0) == []
    assert read_all(spec, start_row=11) == []
    chunks = list(iter_recipient_chunks(spec, chunk_size=4))
    assert [len(c) for c in chunks] == [4, 4, 2]


def test_start_row_does_not_normalise_skipped_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, "id,phone\n1,+14155550100\n2,+14155550101\n3,+14155550102\n")
    seen: list[str] = []
    real = recipients.normalize_address

    def spy(channel: Channel, raw: str, default_region: str = "US") -> str:
        seen.append(raw)
        return real(channel, raw, default_region)

    monkeypatch.setattr(recipients, "normalize_address", spy)
    items = read_all(spec_for(path, {Channel.SMS: "phone"}), start_row=3)
    assert [i.row for i in items] == [3]
    assert seen == ["+14155550102"]


def test_bad_arguments(tmp_path: Path) -> None:
    spec = spec_for(write(tmp_path, GOOD))
    with pytest.raises(ValueError):
        next(iter_recipient_chunks(spec, chunk_size=0))
    with pytest.raises(ValueError):
        next(iter_recipient_chunks(spec, limit=-1))


def test_from_config() -> None:
    campaign = Campaign.model_validate(
        {
            "name": "spring",
            "purpose": "transactional",
            "recipients": {
                "key": "customer_id",
                "columns": {"phone": "mobile", "email": "mail"},
                "default_region": "GB",
                "delimiter": ";",
            },
            "channels": {
                "webhook": {"provider": "box", "body": "hi"},
                "sms": {"provider": "box", "body": "hi {{ name }}"},
            },
            "providers": {"box": {"type": "outbox", "dir": "out"}},
        }
    )
    spec = RecipientSpec.from_config(campaign, Path("x.csv"))
    # Only the channels the campaign uses; the webhook has no column.
    assert spec == RecipientSpec(Path("x.csv"), "customer_id", {Channel.SMS: "mobile"}, "GB", ";")


# --------------------------------------------------------------------------------------------
# Hostile files: one line naming file and line


def test_missing_file(tmp_path: Path) -> None:
    spec = spec_for(tmp_path / "nope.csv")
    err = scan_error(spec)
    assert "not found" in err.message
    with pytest.raises(InputError, match="not found"):
        next(iter_recipient_chunks(spec))


def test_directory_is_unreadable(tmp_path: Path) -> None:
    err = scan_error(spec_for(tmp_path))
    assert "cannot read" in err.message


@pytest.mark.parametrize("content", [b"", b"\xef\xbb\xbf", b"\r\n\r\n", b" , \n"])
def test_empty_file(tmp_path: Path, content: bytes) -> None:
    spec = spec_for(write(tmp_path, content))
    err = scan_error(spec)
    assert err.line == 1 and "empty" in err.message
    with pytest.raises(InputError, match="empty"):
        next(iter_recipient_chunks(spec))


def test_header_only(tmp_path: Path) -> None:
    err = scan_error(spec_for(write(tmp_path, "id,phone,email\r\n\r\n")))
    assert err.line == 1
    assert err.message == "no recipients: the file has a header but no data rows"


def test_header_only_yields_nothing(tmp_path: Path) -> None:
    assert list(iter_recipient_chunks(spec_for(write(tmp_path, "id,phone,email\n")))) == []


def test_missing_column(tmp_path: Path) -> None:
    spec = spec_for(write(tmp_path, "id,name,mobile\n1,Ann,+14155550100\n"), {Channel.SMS: "phone"})
    err = scan_error(spec)
    assert (err.line, err.field) == (1, "phone")
    assert "id, name, mobile" in err.message
    assert str(err).startswith(f"{spec.path}:1: phone: ")
    with pytest.raises(InputError, match="phone"):
        next(iter_recipient_chunks(spec))


def test_error_about_a_multiline_column_name_stays_on_one_line(tmp_path: Path) -> None:
    err = scan_error(spec_for(write(tmp_path, 'id,"ph\none",email,"ph\none"\n1,2,3,4\n')))
    assert err.field == "'ph\\none'" and "duplicate" in err.message
    err = scan_error(spec_for(write(tmp_path, 'id,"ph\r\none",email\n1,2,3\n')))
    assert err.field == "phone" and "'ph\\r\\none'" in err.message


def test_missing_key_column(tmp_path: Path) -> None:
    spec = spec_for(write(tmp_path, "\n\nname,phone\nAnn,+14155550100\n"), {Channel.SMS: "phone"})
    err = scan_error(spec)
    assert (err.line, err.field) == (3, "id")  # the header's own line, after blank lines


def test_duplicate_header(tmp_path: Path) -> None:
    err = scan_error(spec_for(write(tmp_path, "id,phone,email,phone\n1,2,3,4\n")))
    assert (err.line, err.field) == (1, "phone")
    assert "duplicate" in err.message and "2 and 4" in err.message


def test_duplicate_after_stripping(tmp_path: Path) -> None:
    err = scan_error(spec_for(write(tmp_path, "id,phone,email, email\n1,2,3,4\n")))
    assert err.field == "email" and "duplicate" in err.message


def test_empty_header_name(tmp_path: Path) -> None:
    err = scan_error(spec_for(write(tmp_path, "id,phone,email,\n1,2,3,4\n")))
    assert (err.line, err.field) == (1, "column 4")
    assert "empty column name" in err.message


def test_undecodable_byte_names_its_line(tmp_path: Path) -> None:
    content = GOOD.encode() + b"3,Caf\xe9,+14155550102,c@example.com\r\n"
    spec = spec_for(write(tmp_path, content))
    err = scan_error(spec)
    offset = content.index(b"\xe9")
    assert err.line == 4
    assert f"byte offset {offset}" in err.message and "0xe9" in err.message
    assert "UTF-8" in err.message
    with pytest.raises(InputError) as info:
        read_all(spec)
    assert info.value.line == 4


def test_undecodable_byte_far_into_the_file(tmp_path: Path) -> None:
    # Past several read blocks, after quoted newlines, with LF, CRLF and CR line ends.
    rows = [f'{n},"x\r\ny",+1415555{n % 10000:04d},a@example.com' for n in range(9000)]
    head = "id,name,phone,email\n" + "\r\n".join(rows) + "\r"
    body = head.encode() + "é".encode() + b"\n1,\xff\xfe,2,3\n"
    spec = spec_for(write(tmp_path, body))
    err = scan_error(spec)
    assert err.line == 1 + 9000 * 2 + 2  # header, 9000 two-line rows, the "é" line, then ours
    offset = body.index(b"\xff")
    assert f"byte offset {offset}" in err.message


def test_error_location_across_read_blocks(tmp_path: Path) -> None:
    # A CRLF split across the first 64 KiB block boundary counts as one line break, and a
    # two-byte character split across the second still leaves the bad byte's offset exact.
    block = 64 * 1024
    head = b"id,phone,email\r\n"
    first = head + b"1,x," + b"a" * (block - 1 - len(head) - 4) + b"\r\n"
    assert first.index(b"\r\n", len(head)) == block - 1
    second = b"2,y,"
    second += b"b" * (2 * block - 1 - len(first) - len(second)) + "é".encode() + b"\n"
    assert (first + second).index("é".encode()) == 2 * block - 1
    content = first + second + b"3,z,\x80\n"
    err = scan_error(spec_for(write(tmp_path, content)))
    assert err.line == 4
    assert f"byte offset {len(content) - 2}" in err.message


def test_truncated_utf8_at_end(tmp_path: Path) -> None:
    content = GOOD.encode() + b"3,x,y,\xc3"
    err = scan_error(spec_for(write(tmp_path, content)))
    assert err.line == 4
    assert f"byte offset {len(content) - 1}" in err.message


def test_nul_byte(tmp_path: Path) -> None:
    content = GOOD + "3,Ca\x00rl,+14155550102,c@example.com\r\n"
    err = scan_error(spec_for(write(tmp_path, content)))
    assert err.line == 4 and "NUL" in err.message


def test_nul_byte_in_header_wins_over_header_checks(tmp_path: Path) -> None:
    err = scan_error(spec_for(write(tmp_path, b"\x00\x01\x02\n1\n")))
    assert err.line == 1 and "NUL" in err.message


def test_field_larger_than_limit(tmp_path: Path) -> None:
    huge = "x" * (csv.field_size_limit() + 10)
    spec = spec_for(write(tmp_path, GOOD + f'3,"{huge}",+14155550102,c@example.com\r\n'))
    err = scan_error(spec)
    assert err.line == 4 and "field larger than field limit" in err.message
    with pytest.raises(InputError) as info:
        read_all(spec)
    assert info.value.line == 4


@pytest.mark.parametrize(
    "content",
    [
        'id,phone\n1,"+14155550100\n2,+14155550101\n3,+14155550102\n',
        # In the last column the row even has the right width: rows 2 and 3 were swallowed into
        # row 1's note, row 1 was sent, and the run counted 1 row of 3 with nothing said.
        'id,phone,note\n1,+14155550100,"VIP\n2,+14155550101,x\n3,+14155550102,y\n',
    ],
)
def test_unterminated_quote_is_an_error_naming_its_line(tmp_path: Path, content: str) -> None:
    # The csv module (non-strict) reads a quote left open to the end of the file: every later
    # line vanished into one field. A quote still open at the end is an error, at its line.
    spec = spec_for(write(tmp_path, content), {Channel.SMS: "phone"})
    err = scan_error(spec)
    assert err.line == 2
    assert "quoted field" in err.message and "never closed" in err.message
    with pytest.raises(InputError) as info:
        read_all(spec)
    assert info.value.line == 2


# --------------------------------------------------------------------------------------------
# Properties: never lose, invent or reorder a row


field_text = st.text(
    alphabet=st.one_of(
        st.sampled_from([",", ";", '"', "'", "\r", "\n", " ", "\t", "\ufeff", "é", "名"]),
        st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)),
    ),
    max_size=12,
)
key_text = field_text.filter(lambda s: s.strip() != "")


@st.composite
def tables(draw: st.DrawFn) -> tuple[list[str], list[list[str]]]:
    width = draw(st.integers(min_value=1, max_value=4))
    header = ["id"] + [f"c{i}" for i in range(1, width)]
    records = draw(
        st.lists(
            st.tuples(key_text, st.lists(field_text, min_size=width - 1, max_size=width - 1)),
            min_size=1,
            max_size=25,
        )
    )
    return header, [[key, *rest] for key, rest in records]


def _breaks(text: str) -> int:
    return text.count("\n") + text.count("\r") - text.count("\r\n")


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    table=tables(),
    chunk_size=st.sampled_from([1, 2, 3, 7, 500]),
    delimiter=st.sampled_from([",", ";", "\t"]),
    bom=st.booleans(),
    # csv.writer quotes a field holding CR or LF only if that character is in its line
    # terminator, so an LF-terminated file needs QUOTE_ALL to be read back as written.
    style=st.sampled_from(
        [("\r\n", csv.QUOTE_MINIMAL), ("\r\n", csv.QUOTE_ALL), ("\n", csv.QUOTE_ALL)]
    ),
)
def test_roundtrip_property(
    tmp_path: Path,
    table: tuple[list[str], list[list[str]]],
    chunk_size: int,
    delimiter: str,
    bom: bool,
    style: tuple[str, int],
) -> None:
    header, records = table
    buffer = io.StringIO(newline="")
    terminator, quoting = style
    writer = csv.writer(buffer, delimiter=delimiter, lineterminator=terminator, quoting=quoting)
    writer.writerow(header)
    writer.writerows(records)
    data = ("\ufeff" if bom else "") + buffer.getvalue()
    path = write(tmp_path, data, "prop.csv")
    spec = spec_for(path, {}, delimiter=delimiter)

    chunks = list(iter_recipient_chunks(spec, chunk_size=chunk_size))
    assert all(0 < len(c) <= chunk_size for c in chunks)
    assert all(len(c) == chunk_size for c in chunks[:-1])
    items = [item for chunk in chunks for item in chunk]
    assert [i.row for i in items] == list(range(1, len(records) + 1))
    line = 2
    for item, record in zip(items, records, strict=True):
        assert isinstance(item, Recipient)
        assert item.fields == dict(zip(header, record, strict=True))
        assert item.key == record[0].strip()
        assert item.line == line
        line += 1 + sum(_breaks(value) for value in record)
    result = scan_recipients(spec)
    assert result.rows == len(records)
    assert result.header == header
    assert result.sha256 == hashlib.sha256(data.encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# Memory: the file is streamed, never held


def _big_file(tmp_path: Path, rows: int) -> tuple[Path, list[int]]:
    """A file of ``rows`` rows, and the byte offset at which each row (from 1) ends."""
    lines = ["id,phone,note"]
    lines += [f"{n},+1415555{n % 10000:04d},some text for row {n}" for n in range(rows)]
    ends = list(itertools.accumulate(len(line) + 1 for line in lines))
    return write(tmp_path, "\n".join(lines) + "\n", "big.csv"), ends


def _spy_on_open(monkeypatch: pytest.MonkeyPatch) -> list[io.TextIOWrapper]:
    handles: list[io.TextIOWrapper] = []

    def spying_open(*args: Any, **kwargs: Any) -> io.TextIOWrapper:
        handle: io.TextIOWrapper = open(*args, **kwargs)  # noqa: SIM115
        handles.append(handle)
        return handle

    monkeypatch.setattr(recipients, "open", spying_open, raising=False)
    return handles


def test_first_chunk_arrives_before_the_file_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _ = _big_file(tmp_path, 200_000)
    size = path.stat().st_size  # ~8 MB
    handles = _spy_on_open(monkeypatch)
    chunks = iter_recipient_chunks(spec_for(path, {Channel.SMS: "phone"}), chunk_size=500)
    tracemalloc.start()
    try:
        first = next(chunks)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(first) == 500
    (handle,) = handles
    assert handle.buffer.tell() < size / 50  # a few read blocks, no more
    assert peak < 1_000_000
    chunks.close()
    assert handle.closed


def test_reading_keeps_pace_with_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # At every chunk, the reader is at most a few read blocks ahead of the last row it yielded:
    # the file is streamed, whatever its size.
    path, ends = _big_file(tmp_path, 200_000)
    handles = _spy_on_open(monkeypatch)
    count = 0
    for chunk in iter_recipient_chunks(spec_for(path, {}), chunk_size=1000):
        count += len(chunk)
        (handle,) = handles
        ahead = handle.buffer.tell() - ends[chunk[-1].row]
        assert 0 <= ahead < 256 * 1024
    assert count == 200_000


def test_scan_is_memory_flat(tmp_path: Path) -> None:
    path, _ = _big_file(tmp_path, 30_000)
    size = path.stat().st_size  # ~1.2 MB
    tracemalloc.start()
    try:
        result = scan_recipients(spec_for(path, {}))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result.rows == 30_000
    assert peak < 400_000 < size / 2
