"""RFC 5322 / MIME bytes for one rendered email, built by hand because it is on the hot path.

Building a stdlib `email.message.EmailMessage` costs more than sending it (DESIGN.md section 6), so
the bytes are written directly. What they hold is deliberately small and easy to check:

- header lines end in CRLF; a line never holds CR, LF or NUL from a value (`ValueError`);
- non-ASCII in Subject, display names and extra headers becomes RFC 2047 encoded words (UTF-8,
  base64, never splitting a character); long ASCII values are folded at spaces; List-Unsubscribe
  and List-Unsubscribe-Post hold URIs and are only ever folded (a receiver decodes no encoded
  words there);
- addresses themselves are written as given: an internationalised address is raw UTF-8
  (RFC 6532, the transport must offer SMTPUTF8);
- each body is UTF-8: ``7bit`` when it is ASCII with short lines, else quoted-printable;
- text and HTML together make a ``multipart/alternative`` (text first, RFC 2046) whose boundary
  starts with ``=_``, which quoted-printable output never contains.

The tests parse the result back with the stdlib parser (``policy.default``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from datetime import datetime

from campaign_cli.models import EmailContent

_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_DOT_ATOM = re.compile(rf"{_ATOM}(?:\.{_ATOM})*")
_MESSAGE_ID = re.compile(rf"<{_DOT_ATOM.pattern}@{_DOT_ATOM.pattern}>")
_LONG_LINE = re.compile(r"[^\n]{999}")
_HEADER_NAME = re.compile(r"[!-9;-~]+")
_BREAKS = re.compile(r"[\r\n\0]")
# Printable ASCII and tab; "=?" would read as the start of an encoded word.
_PLAIN_VALUE = re.compile(r"[\t\x20-\x7e]*")
# A plain ``addr`` or ``Display Name <addr>`` that needs no quoting or encoding.
_ADDR = r"[^<>\s\"(),:;@\\\[\]]+@[^<>\s\"(),:;@\\\[\]]+"
_SIMPLE_ADDRESS = re.compile(rf"(?:[A-Za-z0-9_-]+(?: [A-Za-z0-9_-]+)* )?<{_ADDR}>|{_ADDR}")
_NAME_ADDR = re.compile(rf'(?:"((?:[^"\\]|\\.)*)"|([^<>"]*?))\s*<({_ADDR})>')
_SPECIALS = re.compile(r'[][\\()<>@,:;".]')

_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_LINE = 78  # RFC 5322: lines SHOULD be at most 78 characters
MAX_LINE = 998  # ...and MUST be at most 998
_WORD_BYTES = 30  # UTF-8 bytes per encoded word: "=?utf-8?b?" + 40 base64 + "?=" is 52 characters
#: Headers of URIs (RFC 2369, RFC 8058): folded, never written as encoded words.
_URI_HEADERS = frozenset({"list-unsubscribe", "list-unsubscribe-post"})
#: Headers the message itself sets: a campaign may not set them again.
RESERVED_HEADERS = frozenset(
    {
        "from",
        "to",
        "cc",
        "bcc",
        "subject",
        "date",
        "message-id",
        "mime-version",
        "reply-to",
        "content-type",
        "content-transfer-encoding",
        "sender",
        "return-path",
    }
)


def make_message_id(key: str, domain: str) -> str:
    """``<key@domain>``: the same key always gives the same Message-ID, so a resend keeps it.

    A key that is not a valid dot-atom is replaced by a hash of it (still deterministic).
    """
    if not _DOT_ATOM.fullmatch(domain):
        raise ValueError(f"not a valid Message-ID domain: {domain!r}")
    if not _DOT_ATOM.fullmatch(key):
        key = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:40]
    return f"<{key}@{domain}>"


def build_email(content: EmailContent, to: str, message_id: str, date: datetime) -> bytes:
    """The message as RFC 5322 bytes with CRLF line ends, ready for SMTP ``DATA`` or a file.

    Raises `ValueError` when a header value holds CR, LF or NUL, or a header name is invalid.
    """
    if not _MESSAGE_ID.fullmatch(message_id):
        raise ValueError(f"not a valid Message-ID: {message_id!r}")
    lines = [
        "From: " + _address(content.sender, "From"),
        "To: " + _address(to, "To"),
        _unstructured("Subject", content.subject),
        "Date: " + _date(date),
        "Message-ID: " + message_id,
        "MIME-Version: 1.0",
    ]
    if content.reply_to:
        lines.append("Reply-To: " + _address(content.reply_to, "Reply-To"))
    for name, value in content.headers:
        if not _HEADER_NAME.fullmatch(name):
            raise ValueError(f"not a valid header name: {name!r}")
        if name.lower() in RESERVED_HEADERS:
            raise ValueError(f"header {name} is set by the message itself")
        if name.lower() in _URI_HEADERS:
            lines.append(structured_header(name, value))
        else:
            lines.append(_unstructured(name, value))

    text, html = content.text, content.html
    if text is not None and html is not None:
        text_cte, text_body = _body(text)
        html_cte, html_body = _body(html)
        boundary = "=_" + hashlib.sha256(message_id.encode()).hexdigest()[:28]
        marker = b"--" + boundary.encode()
        if marker in text_body:
            text_cte, text_body = "quoted-printable", _qp(text)
        if marker in html_body:
            html_cte, html_body = "quoted-printable", _qp(html)
        lines.append(f'Content-Type: multipart/alternative; boundary="{boundary}"')
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")
        return b"".join(
            (
                head,
                marker,
                b'\r\nContent-Type: text/plain; charset="utf-8"\r\n',
                b"Content-Transfer-Encoding: ",
                text_cte.encode(),
                b"\r\n\r\n",
                text_body,
                b"\r\n",
                marker,
                b'\r\nContent-Type: text/html; charset="utf-8"\r\n',
                b"Content-Transfer-Encoding: ",
                html_cte.encode(),
                b"\r\n\r\n",
                html_body,
                b"\r\n",
                marker,
                b"--\r\n",
            )
        )
    if text is not None:
        subtype, (cte, body) = "plain", _body(text)
    elif html is not None:
        subtype, (cte, body) = "html", _body(html)
    else:
        raise ValueError("an email needs a text or an HTML body")
    lines.append(f'Content-Type: text/{subtype}; charset="utf-8"')
    lines.append("Content-Transfer-Encoding: " + cte)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + body


# --------------------------------------------------------------------------------------------
# Headers


def _check(name: str, value: str) -> None:
    if _BREAKS.search(value):
        raise ValueError(f"header {name} contains a line break or NUL")


def _unstructured(name: str, value: str) -> str:
    """``Name: value`` folded, with encoded words where the value is not plain ASCII."""
    _check(name, value)
    if _PLAIN_VALUE.fullmatch(value) and "=?" not in value:
        line = f"{name}: {value}"
        if len(line) <= _LINE:
            return line
        folded = _fold(line)
        if folded is not None:
            return folded
    return f"{name}: " + "\r\n ".join(_encoded_words(value))


def structured_header(name: str, value: str) -> str:
    """``Name: value`` folded at spaces only, for a header of URIs, where encoded words are not
    decoded (RFC 2369): a value that cannot be written so is refused."""
    _check(name, value)
    if not _PLAIN_VALUE.fullmatch(value):
        raise ValueError(f"header {name}: not printable ASCII")
    line = f"{name}: {value}"
    folded = line if len(line) <= _LINE else _fold(line, MAX_LINE)
    if folded is None:
        raise ValueError(f"header {name}: a URI longer than a line can hold ({MAX_LINE})")
    return folded


def _fold(line: str, limit: int = 900) -> str | None:
    """Fold at spaces so that lines stay short; None when a word is too long to fold."""
    out: list[str] = []
    current = ""
    for i, word in enumerate(line.split(" ")):
        if i <= 1:  # never fold between the name and the first word of the value
            current = f"{current} {word}" if i else word
        elif len(current) + 1 + len(word) > _LINE and current.strip():
            out.append(current)
            current = " " + word
        else:
            current += " " + word
    out.append(current)
    if any(len(part) > limit for part in out):
        return None
    return "\r\n".join(out)


def _encoded_words(value: str) -> list[str]:
    """RFC 2047 ``=?utf-8?b?...?=`` words of at most `_WORD_BYTES` bytes, split on characters."""
    data = value.encode("utf-8", "surrogatepass")
    words = []
    start = 0
    while start < len(data):
        end = min(start + _WORD_BYTES, len(data))
        while end < len(data) and (data[end] & 0xC0) == 0x80:  # not inside a UTF-8 sequence
            end -= 1
        words.append("=?utf-8?b?" + base64.b64encode(data[start:end]).decode("ascii") + "?=")
        start = end
    return words or ["=?utf-8?b??="]


def format_mailbox(value: str, header: str = "From") -> str:
    """One mailbox as it goes in a header: ``addr`` or ``Name <addr>``, the name quoted or
    encoded if needed. Raises `ValueError` naming ``header`` when it is not one mailbox."""
    return _address(value, header)


def split_mailbox(value: str, header: str = "From") -> tuple[str, str]:
    """The display name (unquoted; "" when there is none) and the address of one mailbox, read
    exactly as `format_mailbox` reads it: for APIs that take the two apart (SendGrid's
    ``{"email", "name"}``). Raises `ValueError` naming ``header`` when it is not one mailbox."""
    _check(header, value)
    value = value.strip()
    m = _NAME_ADDR.fullmatch(value)
    if m is None:
        if _SIMPLE_ADDRESS.fullmatch(value):  # a bare address
            return "", value
        raise ValueError(f"header {header}: not an email address: {value!r}")
    quoted, display, addr = m.groups()
    if quoted is not None:
        display = re.sub(r"\\(.)", r"\1", quoted)
    return display, addr


def _address(value: str, name: str) -> str:
    _check(name, value)
    value = value.strip()
    if _SIMPLE_ADDRESS.fullmatch(value):
        return value
    m = _NAME_ADDR.fullmatch(value)
    if m is None:
        raise ValueError(f"header {name}: not an email address: {value!r}")
    quoted, display, addr = m.groups()
    if quoted is not None:
        display = re.sub(r"\\(.)", r"\1", quoted)
    if not display:
        return addr
    if _PLAIN_VALUE.fullmatch(display) and "=?" not in display:
        if _SPECIALS.search(display):
            display = '"' + display.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return f"{display} <{addr}>"
    return " ".join(_encoded_words(display)) + f" <{addr}>"


def _date(date: datetime) -> str:
    """RFC 5322 date-time (``email.utils.format_datetime`` without its cost); naive is -0000."""
    offset = date.utcoffset()
    if offset is None:
        zone = "-0000"
    else:
        minutes = int(offset.total_seconds()) // 60
        sign = "-" if minutes < 0 else "+"
        zone = f"{sign}{abs(minutes) // 60:02d}{abs(minutes) % 60:02d}"
    return (
        f"{_DAYS[date.weekday()]}, {date.day:02d} {_MONTHS[date.month - 1]} {date.year:04d} "
        f"{date.hour:02d}:{date.minute:02d}:{date.second:02d} {zone}"
    )


# --------------------------------------------------------------------------------------------
# Bodies


def _lines(text: str) -> str:
    """LF line ends and a final line end."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.endswith("\n"):
        text += "\n"
    return text


def _body(text: str) -> tuple[str, bytes]:
    """The transfer encoding and the encoded body, with CRLF line ends."""
    text = _lines(text)
    if text.isascii() and "\0" not in text and not _LONG_LINE.search(text):
        return "7bit", text.replace("\n", "\r\n").encode("ascii")
    return "quoted-printable", _qp(text)


def _qp(text: str) -> bytes:
    encoded = binascii.b2a_qp(_lines(text).encode("utf-8", "surrogatepass"), istext=True)
    return encoded.replace(b"\n", b"\r\n")
