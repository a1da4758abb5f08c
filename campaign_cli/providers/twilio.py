"""Twilio Messaging (SMS): ``POST /2010-04-01/Accounts/{AccountSid}/Messages.json``, form-encoded,
HTTP Basic with the account SID (or an API key SID) and its secret. PROVIDERS.md section 1.

Twilio has no idempotency key for messages: a request that timed out after it was written is
`InDoubtError` and must not be resent blindly, so the provider says ``deduplicates = False``.

Answers, from PROVIDERS.md's table:

    201                     accepted: SendResult(sid)
    20003 (401)             ProviderAuthError: abort the run
    21610                   PermanentError(action="suppress"): the recipient sent STOP
    21211, 21614            PermanentError(action="invalid"): ``To`` is not a usable SMS number
    other 21xxx             PermanentError
    20429, HTTP 429         RateLimitedError(retry_after from Retry-After)
    21611                   RateLimitedError: the sender's queue is full; retry after a minute
    408, 5xx                TransientError
    504                     InDoubtError: a gateway gave up waiting; Twilio may have it
    other 4xx               PermanentError (401/403 without a Twilio code: ProviderAuthError)
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any
from urllib.parse import quote_plus, urlencode

import httpx

from campaign_cli.clock import Clock
from campaign_cli.config import TwilioProviderConfig
from campaign_cli.errors import PermanentError, ProviderAuthError, RateLimitedError
from campaign_cli.models import Channel, OutboundMessage, SendResult, SmsContent
from campaign_cli.providers.base import ProviderContext
from campaign_cli.providers.http import (
    HttpProvider,
    client_for,
    clock_now,
    raise_for_generic_status,
    retry_after,
)

DEFAULT_BASE_URL = "https://api.twilio.com"
#: How long to wait after 21611 (the sender's queue holds ~10 h of messages) when Twilio gives no
#: Retry-After: long enough for the queue to drain a little, short enough to finish the run.
QUEUE_FULL_RETRY_AFTER = 60.0
_INVALID_TO = frozenset({21211, 21614})


class TwilioAdapter:
    """Builds the Messages API request for one SMS and reads Twilio's answer. No I/O."""

    def __init__(
        self,
        *,
        account_sid: str,
        auth_token: str,
        api_key_sid: str | None = None,
        sender: str | None = None,
        messaging_service_sid: str | None = None,
        status_callback: str | None = None,
        base_url: str | None = None,
        clock: Clock | None = None,
    ) -> None:
        if (sender is None) == (messaging_service_sid is None):
            raise ValueError("give exactly one of sender or messaging_service_sid")
        root = (base_url or DEFAULT_BASE_URL).rstrip("/")
        self.url = f"{root}/2010-04-01/Accounts/{account_sid}/Messages.json"
        credentials = f"{api_key_sid or account_sid}:{auth_token}".encode()
        self._url = httpx.URL(self.url)  # parsed once, not per message
        self._headers = httpx.Headers({
            "Authorization": "Basic " + base64.b64encode(credentials).decode("ascii"),
            "Content-Type": "application/x-www-form-urlencoded",
            "Accept": "application/json",
            "User-Agent": "campaign-cli",
        })
        # Every header but Content-Length, in the order httpx would give them (Host first).
        self._head: tuple[tuple[bytes, bytes], ...] = (
            (b"Host", self._url.netloc), *self._headers.raw
        )
        fields: list[tuple[str, str]] = []
        if sender is not None:
            fields.append(("From", sender))
        else:
            assert messaging_service_sid is not None
            fields.append(("MessagingServiceSid", messaging_service_sid))
        if status_callback:
            fields.append(("StatusCallback", status_callback))
        self._fields: Sequence[tuple[str, str]] = tuple(fields)
        self._middle = "&" + urlencode(self._fields) + "&Body="  # the same for every message
        self._clock = clock

    def build(self, message: OutboundMessage) -> httpx.Request:
        """``To=..&From=..&Body=..``, form-encoded exactly as `urlencode` would. The constant
        fields are encoded once, and the request is made from a ready body and headers, which
        takes a build from 25 to 10 us (bench/README.md)."""
        content = message.content
        if not isinstance(content, SmsContent):
            raise TypeError(f"twilio sends SMS only, not {type(content).__name__}")
        form = ("To=" + quote_plus(message.address) + self._middle
                + quote_plus(content.body)).encode()
        headers = httpx.Headers([*self._head, (b"Content-Length", b"%d" % len(form))])
        request = httpx.Request("POST", self._url, headers=headers, stream=httpx.ByteStream(form))
        request.read()  # a body built whole: `request.content` is there, as with content=
        return request

    def parse(self, message: OutboundMessage, response: httpx.Response) -> SendResult:
        status = response.status_code
        data = _json(response)
        if 200 <= status < 300:
            sid = data.get("sid")
            raw = data.get("num_segments")  # a string in Twilio's answers ("2")
            segments = raw if type(raw) is int else _int(raw)
            return SendResult(
                provider_message_id=sid if isinstance(sid, str) else None,
                status_code=status,
                detail=data.get("status") if isinstance(data.get("status"), str) else None,
                segments=segments if segments is not None and 0 < segments <= 100 else None,
            )
        raw_code = data.get("code")
        number = raw_code if isinstance(raw_code, int) else _int(raw_code)
        code = str(number) if number is not None else None
        text = str(data.get("message") or response.reason_phrase or f"HTTP {status}")
        if number == 20003:
            raise ProviderAuthError(text, code=code, status=status)
        if number == 21610:
            raise PermanentError(text, code=code, status=status, action="suppress")
        if number in _INVALID_TO:
            raise PermanentError(text, code=code, status=status, action="invalid")
        if number == 20429 or status == 429:
            raise RateLimitedError(text, code=code, status=status,
                                   retry_after=retry_after(response.headers, self._now()))
        if number == 21611:
            wait = retry_after(response.headers, self._now())
            raise RateLimitedError(text, code=code, status=status,
                                   retry_after=QUEUE_FULL_RETRY_AFTER if wait is None else wait)
        if number is not None and 21000 <= number < 22000 and status < 500:
            raise PermanentError(text, code=code, status=status)
        raise_for_generic_status(response, code, text, now=self._now())
        # A 1xx or 3xx: Twilio never answers so; the message was not created.
        raise PermanentError(text, code=code, status=status)

    def _now(self) -> datetime | None:
        return clock_now(self._clock)


class TwilioProvider(HttpProvider):
    deduplicates = False  # no idempotency key (from_config passes this on)

    #: Its own endpoint answers for every message: ten identical refusals in a row mean our
    #: configuration is refused (the pipeline stops the run, exit 6).
    refusals_mean_config = True

    @classmethod
    def from_config(
        cls, name: str, config: TwilioProviderConfig, context: ProviderContext
    ) -> TwilioProvider:
        adapter = TwilioAdapter(
            account_sid=config.account_sid,
            auth_token=config.auth_token,
            api_key_sid=config.api_key_sid,
            sender=config.sender,
            messaging_service_sid=config.messaging_service_sid,
            status_callback=config.status_callback,
            base_url=config.base_url,
            clock=context.clock,
        )
        client = client_for(config, context, config.base_url or DEFAULT_BASE_URL)
        return cls(name, adapter, client, channels=frozenset({Channel.SMS}),
                   deduplicates=cls.deduplicates)


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        data = json.loads(response.content) if response.content else {}
    except (ValueError, RecursionError):  # RecursionError: a body nested thousands deep
        return {}
    return data if isinstance(data, dict) else {}


def _int(value: object) -> int | None:
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return int(value)
    return None
