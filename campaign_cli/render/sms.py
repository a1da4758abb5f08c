"""SMS encoding and segments (3GPP TS 23.038; PROVIDERS.md section 5).

A message written only in the GSM-7 alphabet costs one septet per character, two for a character
of the extension table (sent as ESC + character). One segment holds 160 septets; a longer message
is sent as concatenated segments of 153 septets each (the rest of each segment is the UDH), and an
escape pair is never split across two of them. Any other character makes the whole message UCS-2:
70 UTF-16 code units in one segment, 67 per segment when concatenated, and an astral character
(most emoji) is a surrogate pair that is never split either.

The empty message is one GSM-7 segment: a provider bills an empty message as one message, and
``split_segments("")`` is ``[""]`` so that the number of segments is always the length of the
split. (The renderer refuses empty SMS bodies before they get here.)
"""

from __future__ import annotations

import re

GSM7 = "GSM-7"
UCS2 = "UCS-2"

GSM7_SINGLE = 160
GSM7_MULTI = 153
UCS2_SINGLE = 70
UCS2_MULTI = 67

#: The GSM 03.38 basic character set (ESC itself is not a character a message may contain).
GSM7_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
#: The extension table: each costs two septets (ESC + character).
GSM7_EXTENSION = frozenset("\x0c^{}\\[~]|€")
GSM7_ALL = GSM7_BASIC | GSM7_EXTENSION

# ASCII characters that are not one-septet GSM-7: controls other than LF/CR, the extension
# characters and the backtick. An ASCII text without them is the common, fast case.
_ASCII_NOT_BASIC = re.compile(r"[\x00-\x09\x0b\x0c\x0e-\x1f\x7f`^{}\\\[\]~|]")
_EXTENSION = re.compile("[" + re.escape("".join(sorted(GSM7_EXTENSION))) + "]")
_NOT_GSM7 = re.compile("[^" + re.escape("".join(sorted(GSM7_ALL))) + "]")


def sms_info(text: str) -> tuple[str, int]:
    """The encoding (``"GSM-7"`` or ``"UCS-2"``) and the number of segments of ``text``."""
    if text.isascii() and not _ASCII_NOT_BASIC.search(text):
        return GSM7, _plain_count(len(text), GSM7_SINGLE, GSM7_MULTI)
    if not _NOT_GSM7.search(text):
        if not _EXTENSION.search(text):
            return GSM7, _plain_count(len(text), GSM7_SINGLE, GSM7_MULTI)
        if len(text) + len(_EXTENSION.findall(text)) <= GSM7_SINGLE:
            return GSM7, 1
        return GSM7, len(_gsm_cuts(text))
    units = text.encode("utf-16-le")
    if len(units) == 2 * len(text):  # no surrogate pairs
        return UCS2, _plain_count(len(text), UCS2_SINGLE, UCS2_MULTI)
    if len(units) <= 2 * UCS2_SINGLE:
        return UCS2, 1
    return UCS2, len(_ucs2_cuts(units))


def split_segments(text: str) -> list[str]:
    """``text`` cut where the network cuts it; ``"".join(split_segments(t)) == t``."""
    if text.isascii() and not _ASCII_NOT_BASIC.search(text):
        return _plain_split(text, GSM7_SINGLE, GSM7_MULTI)
    if not _NOT_GSM7.search(text):
        if not _EXTENSION.search(text):
            return _plain_split(text, GSM7_SINGLE, GSM7_MULTI)
        if len(text) + len(_EXTENSION.findall(text)) <= GSM7_SINGLE:
            return [text]
        return [text[i:j] for i, j in _gsm_cuts(text)]
    units = text.encode("utf-16-le")
    if len(units) == 2 * len(text):
        return _plain_split(text, UCS2_SINGLE, UCS2_MULTI)
    if len(units) <= 2 * UCS2_SINGLE:
        return [text]
    return [units[2 * i : 2 * j].decode("utf-16-le") for i, j in _ucs2_cuts(units)]


def _plain_count(n: int, single: int, multi: int) -> int:
    if n <= single:
        return 1
    return -(-n // multi)


def _plain_split(text: str, single: int, multi: int) -> list[str]:
    if len(text) <= single:
        return [text]
    return [text[i : i + multi] for i in range(0, len(text), multi)]


def _gsm_cuts(text: str) -> list[tuple[int, int]]:
    """Segment bounds (character indices) of a GSM-7 text with extension characters in it."""
    escapes = [m.start() for m in _EXTENSION.finditer(text)]
    escapes.append(len(text))  # a sentinel: no escape before the end
    cuts = []
    n = len(text)
    k = 0  # escapes[k] is the first extension character at or after j
    i = 0
    while i < n:
        j = i
        room = GSM7_MULTI
        while True:
            take = min(escapes[k] - j, room)
            j += take
            room -= take
            if j == n or room < 2 or j < escapes[k]:
                break
            j += 1  # the extension character at j, two septets
            room -= 2
            k += 1
        cuts.append((i, j))
        i = j
    return cuts


def _ucs2_cuts(units: bytes) -> list[tuple[int, int]]:
    """Segment bounds, in UTF-16 code units, of little-endian UTF-16 bytes."""
    cuts = []
    n = len(units) // 2
    i = 0
    while i < n:
        j = min(i + UCS2_MULTI, n)
        if j < n and 0xD8 <= units[2 * j - 1] <= 0xDB:  # a high surrogate would end the segment
            j -= 1
        cuts.append((i, j))
        i = j
    return cuts
