"""SendGrid v3 Mail Send (email): ``POST /v3/mail/send``, JSON, ``Authorization: Bearer <key>``.
PROVIDERS.md section 2.

One request per recipient. The message's idempotency key, run and row travel in the
personalization's ``custom_args``, which SendGrid echoes in every event, so receipts can be matched
to journal rows. SendGrid has no idempotency key of its own: ``deduplicates = False``.

Answers:

    202                     accepted: SendResult(X-Message-Id)
    400, 413                PermanentError with SendGrid's first error message
    401, 403                ProviderAuthError: abort the run
    429                     RateLimitedError(retry_after from Retry-After or X-RateLimit-Reset)
    408, 5xx                TransientError
    504                     InDoubtError: a gateway gave up waiting; SendGrid may have it
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from typing import Any

import httpx

from campaign_cli.clock import Clock
from campaign_cli.config import SendGridProviderConfig
from campaign_cli.errors import PermanentError, RateLimitedError
from campaign_cli.models import Channel, EmailContent, OutboundMessage, SendResult
from campaign_cli.providers.base import ProviderContext
from campaign_cli.providers.http import (
    HttpProvider,
    client_for,
    clock_now,
    raise_for_generic_status,
    retry_after,
)
from campaign_cli.render.email import split_mailbox

DEFAULT_BASE_URL = "https://api.sendgrid.com"

#: Headers SendGrid sets itself and refuses in ``headers`` (PROVIDERS.md section 2), plus the ones
#: the JSON body carries in fields of its own. ``x-sg-*`` is refused by prefix.
RESERVED_HEADERS = frozenset(
    {
        "to",
        "from",
        "subject",
        "reply-to",
        "cc",
        "bcc",
        "content-type",
        "content-transfer-encoding",
        "dkim-signature",
        "received",
        "date",
        "message-id",
        "mime-version",
        "sender",
        "return-path",
    }
)
_BREAKS = re.compile(r"[\r\n\0]")


class SendGridAdapter:
    """Builds the mail/send request for one email and reads SendGrid's answer. No I/O."""

    def __init__(
        self, *, api_key: str, base_url: str | None = None, clock: Clock | None = None
    ) -> None:
        self.url = f"{(base_url or DEFAULT_BASE_URL).rstrip('/')}/v3/mail/send"
        self._url = httpx.URL(self.url)  # parsed once, not per message
        self._headers = httpx.Headers({
            "Authorization": f"Bearer {api_key}",
            "Content-Type": "application/json",
            "Accept": "application/json",
            "User-Agent": "campaign-cli",
        })
        self._clock = clock
        # Sender, reply-to and extra headers are the same for a whole run: parse them once.
        self._mailboxes: dict[str, dict[str, str]] = {}
        self._extra: dict[tuple[tuple[str, str], ...], dict[str, str]] = {}

    def build(self, message: OutboundMessage) -> httpx.Request:
        content = message.content
        if not isinstance(content, EmailContent):
            raise TypeError(f"sendgrid sends email only, not {type(content).__name__}")
        personalization: dict[str, Any] = {
            "to": [{"email": _clean("to", message.address)}],
            "custom_args": {
                "idempotency_key": message.idempotency_key,
                "run": str(message.run_id),
                "row": str(message.row),
            },
        }
        body: dict[str, Any] = {
            "personalizations": [personalization],
            "from": self._mailbox("from", content.sender),
            "subject": _clean("subject", content.subject),
            "content": _parts(content),
        }
        if content.reply_to:
            body["reply_to"] = self._mailbox("reply_to", content.reply_to)
        if content.headers:
            body["headers"] = self._headers_of(content.headers)
        data = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        return httpx.Request("POST", self._url, headers=self._headers, content=data)

    def parse(self, message: OutboundMessage, response: httpx.Response) -> SendResult:
        status = response.status_code
        if 200 <= status < 300:
            return SendResult(
                provider_message_id=response.headers.get("x-message-id"), status_code=status
            )
        text, field = _first_error(response)
        code = f"http_{status}"
        if field:
            text = f"{field}: {text}"
        now = self._now()
        if status == 429:
            wait = retry_after(response.headers, now)
            if wait is None:
                wait = _reset_in(response.headers, now)
            raise RateLimitedError(text, code=code, status=status, retry_after=wait)
        raise_for_generic_status(response, code, text, now=now)
        raise PermanentError(text, code=code, status=status)  # 1xx, 3xx: not accepted

    def _mailbox(self, field: str, value: str) -> dict[str, str]:
        found = self._mailboxes.get(value)
        if found is None:
            _clean(field, value)
            # Read as the campaign check and the SMTP provider read it: parseaddr would split
            # an unquoted "Shop, Inc. <news@...>" at the comma.
            try:
                name, address = split_mailbox(value, field)
            except ValueError:
                raise PermanentError(f"{field}: not an email address",
                                     code="bad_address", answered=False) from None
            found = {"email": address, "name": name} if name else {"email": address}
            self._mailboxes[value] = found
        return found

    def _headers_of(self, headers: tuple[tuple[str, str], ...]) -> dict[str, str]:
        found = self._extra.get(headers)
        if found is None:
            found = {}
            for name, value in headers:
                lower = name.lower()
                if lower in RESERVED_HEADERS or lower.startswith("x-sg-"):
                    raise PermanentError(
                        f"header {name} cannot be set through SendGrid", code="reserved_header",
                        answered=False)
                found[name] = _clean(f"header {name}", value)
            self._extra[headers] = found
        return found

    def _now(self) -> datetime | None:
        return clock_now(self._clock)


class SendGridProvider(HttpProvider):
    deduplicates = False  # no idempotency key (from_config passes this on)

    #: Its own endpoint answers for every message: ten identical refusals in a row mean our
    #: configuration is refused (the pipeline stops the run, exit 6).
    refusals_mean_config = True

    @classmethod
    def from_config(
        cls, name: str, config: SendGridProviderConfig, context: ProviderContext
    ) -> SendGridProvider:
        adapter = SendGridAdapter(
            api_key=config.api_key, base_url=config.base_url, clock=context.clock
        )
        client = client_for(config, context, config.base_url or DEFAULT_BASE_URL)
        return cls(name, adapter, client, channels=frozenset({Channel.EMAIL}),
                   deduplicates=cls.deduplicates)


def _clean(field: str, value: str) -> str:
    """A value that ends up in a header: CR, LF or NUL could inject another (PROVIDERS.md 4)."""
    if _BREAKS.search(value):
        raise PermanentError(f"{field} contains a line break or NUL", code="header_injection",
                             answered=False)
    return value


def _parts(content: EmailContent) -> list[dict[str, str]]:
    """text/plain before text/html (SendGrid requires that order); empty parts are left out."""
    parts = []
    if content.text:
        parts.append({"type": "text/plain", "value": content.text})
    if content.html:
        parts.append({"type": "text/html", "value": content.html})
    if not parts:
        raise PermanentError("the email has no text or HTML body", code="empty_body",
                             answered=False)
    return parts


def _first_error(response: httpx.Response) -> tuple[str, str | None]:
    """SendGrid's ``{"errors": [{"message", "field", "help"}]}``: the first message and field."""
    fallback = response.reason_phrase or f"HTTP {response.status_code}"
    try:
        data = json.loads(response.content) if response.content else None
    except (ValueError, RecursionError):  # RecursionError: a body nested thousands deep
        return fallback, None
    errors = data.get("errors") if isinstance(data, dict) else None
    if isinstance(errors, list) and errors and isinstance(errors[0], dict):
        message = errors[0].get("message")
        field = errors[0].get("field")
        return (
            str(message) if message else fallback,
            str(field) if isinstance(field, str) and field else None,
        )
    return fallback, None


def _reset_in(headers: httpx.Headers, now: datetime | None) -> float | None:
    """``X-RateLimit-Reset`` (epoch seconds) as seconds from now."""
    value = headers.get("x-ratelimit-reset", "").strip()
    if not (value.isascii() and value.isdigit()):
        return None
    if now is None:
        now = datetime.now(timezone.utc)
    try:
        return max(0.0, int(value) - now.timestamp())
    except OverflowError:  # an int too large to take a float from: no hint
        return None
