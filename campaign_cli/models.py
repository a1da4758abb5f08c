"""Plain data shared by every layer: states, channels, recipients, messages and send results.

Everything here is a frozen dataclass or an enum: no I/O, no behaviour beyond small derived values.
Money is always an integer count of micro-units (1/1,000,000 of the currency unit), never a float.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from enum import Enum
from typing import Any

MICRO = 1_000_000


def to_micros(amount: Decimal) -> int:
    """An amount of money as integer micro-units (exact for up to six decimal places)."""
    return int((amount * MICRO).to_integral_value(rounding=ROUND_HALF_UP))


def from_micros(micros: int) -> Decimal:
    """Micro-units as an amount, without trailing zeros and never in exponent form
    (``7900``, not ``7.9E+3``: the --json summary prints it)."""
    amount = (Decimal(micros) / MICRO).quantize(Decimal("0.000001")).normalize()
    return amount.quantize(Decimal(1)) if amount == amount.to_integral_value() else amount


def url_refusal(url: str) -> str | None:
    """Why the HTTP client would refuse ``url`` when the message is sent (None: it would not):
    httpx's parse (a bad port or IP address, an unclosed bracket, an invalid IDNA host), then
    yarl's, as aiohttp makes it (a port past 65535, a backslash in the host), then the host's
    IDNA encoding, as the resolver makes it (an empty or over-long label). Raised mid-run, that
    refusal is no provider's answer: the run stopped with exit 1, a message in doubt. So a
    recipient's webhook_url is checked with it (`addresses`), and a provider's URLs (`config`)."""
    import httpx  # imported here: only a URL needs them (httpx costs ~0.1 s to import)
    from yarl import URL

    try:
        parsed = httpx.URL(url)
        host = URL(str(parsed), encoded=True).raw_host
        if not host or not parsed.host:  # (`.host` decodes: an A-label not IDNA raises)
            return "no host"
        if ":" not in host:  # the name the resolver is given (an IPv6 address is not)
            host.encode("idna")
            if _legacy_ipv4(host):
                return f"{host} is not a canonical IPv4 address"
            if "\\" in host or "%" in host:
                # (yarl before 1.13 and httpx before 0.28 pass a backslash, percent-encoded:
                # no resolver finds that name, and the send failed as a transient error)
                return f"{host!r} is not a host name (a backslash or a percent sign)"
    except (httpx.InvalidURL, ValueError) as exc:  # UnicodeError is a ValueError
        return str(exc) or type(exc).__name__
    return None


def inet_aton_address(text: str) -> ipaddress.IPv4Address | None:
    """The IPv4 address the C library reads ``text`` as (``127.1``, ``0x7f000001``,
    ``2130706433``, ``0177.0.0.1``; a resolver turns these into an address without asking DNS),
    or None: a name."""
    if not text or any(c not in "0123456789abcdefxABCDEFX." for c in text):
        return None
    try:
        return ipaddress.IPv4Address(socket.inet_aton(text))
    except OSError:
        return None  # a name (``cafe.be``, ``deadbeef``)


def _legacy_ipv4(host: str) -> bool:
    """An IPv4 address in a spelling aiohttp (3.14) refuses: any host of digits and dots that is
    not the canonical dotted quad (``127.1``, ``127.0.0.1.``, ``1.2.3.4.5``), and the other
    spellings the C library takes (``0x7f000001``). Refused here, where it is the recipient's
    bad address, rather than at send time; and no two spellings of one address."""
    if not host or any(c not in "0123456789abcdefxABCDEFX." for c in host):
        return False
    try:
        ipaddress.IPv4Address(host)
        return False  # canonical
    except ValueError:
        pass
    if host.replace(".", "").isdigit():  # (ASCII: the characters were checked above)
        return True
    return inet_aton_address(host) is not None


class Channel(str, Enum):
    SMS = "sms"
    EMAIL = "email"
    PUSH = "push"
    WEBHOOK = "webhook"


class State(str, Enum):
    """A journal row's state. DESIGN.md section 4; a contract: scripts read these names."""

    PENDING = "pending"
    SENDING = "sending"
    SENT = "sent"
    DELIVERED = "delivered"
    UNDELIVERED = "undelivered"
    BOUNCED = "bounced"
    INVALID = "invalid"
    DUPLICATE = "duplicate"
    SUPPRESSED = "suppressed"
    NO_CONSENT = "no_consent"
    CAPPED = "capped"
    QUIET_HOURS = "quiet_hours"
    RENDER_FAILED = "render_failed"
    FAILED = "failed"
    IN_DOUBT = "in_doubt"


#: States a row never leaves during a run (receipts may later move `sent` on).
FINAL_STATES = frozenset(State) - {State.PENDING, State.SENDING}


class Purpose(str, Enum):
    MARKETING = "marketing"
    TRANSACTIONAL = "transactional"


@dataclass(frozen=True, slots=True)
class Recipient:
    """One data row of the recipient file, with its addresses normalised.

    ``row`` counts data records from 1 (the header is not a record); ``line`` is the physical line
    on which the record starts, for messages a person reads. ``addresses`` holds the normalised
    address for each channel whose column was present and valid; ``problems`` the reason code and
    detail for each channel whose address was missing or bad.
    """

    row: int
    line: int
    key: str
    fields: Mapping[str, str]
    addresses: Mapping[Channel, str]
    problems: Mapping[Channel, tuple[str, str]] = field(default_factory=dict)

    def __reduce__(self) -> tuple[type[Recipient], tuple[Any, ...]]:
        # Chunks cross from the reader process by pickle. A slots dataclass unpickles through
        # `dataclasses.fields()` per object; the constructor is twice as quick both ways.
        return (Recipient, (self.row, self.line, self.key, self.fields, self.addresses,
                            self.problems))


@dataclass(frozen=True, slots=True)
class InvalidRow:
    """A data row that cannot become a recipient at all (for example its key is empty)."""

    row: int
    line: int
    reason: str
    detail: str


@dataclass(frozen=True, slots=True)
class SmsContent:
    body: str
    encoding: str  # "GSM-7" or "UCS-2"
    segments: int


@dataclass(frozen=True, slots=True)
class EmailContent:
    subject: str
    text: str | None
    html: str | None
    sender: str
    reply_to: str | None = None
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class PushContent:
    title: str
    body: str
    data: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class WebhookContent:
    text: str
    #: The template is a JSON object (decided when it was compiled, never from the values): the
    #: `webhook` provider sends it as ``data``; otherwise the text is sent as ``text``.
    json: bool = False


Content = SmsContent | EmailContent | PushContent | WebhookContent


@dataclass(frozen=True, slots=True)
class OutboundMessage:
    """One rendered message for one recipient on one channel, ready for a provider.

    ``idempotency_key`` is derived from (run, recipient key, channel) and is the same on every
    attempt and every resume, so a provider that deduplicates by key never delivers it twice.
    """

    run_id: int
    row: int
    channel: Channel
    recipient_key: str
    address: str
    idempotency_key: str
    content: Content
    content_hash: str
    cost_micros: int = 0
    attempt: int = 1


@dataclass(frozen=True, slots=True)
class SendResult:
    """A provider accepted the message."""

    provider_message_id: str | None = None
    status_code: int | None = None
    detail: str | None = None
    #: How many SMS segments the provider says it will bill (Twilio's ``num_segments``), when
    #: it says: the run records that cost, and warns when it differs from its own count.
    segments: int | None = None
