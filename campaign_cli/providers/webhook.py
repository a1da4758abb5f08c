"""The generic webhook provider: one signed JSON POST per message.

Where: the recipient's own URL when the recipient file has a ``webhook_url`` column (the message's
address is then an http(s) URL), else the provider's ``url``. A message with neither fails
permanently (code ``no_url``). ``base_url``, when set, replaces the scheme, host and port of the
provider's ``url`` (recipients' own URLs are left alone). A recipient's own URL may reach only a
public address unless ``allow_private_urls`` (`campaign_cli.providers.public`: SSRF); the row of
one that may not ends ``invalid``, code ``private_address``.

The body (UTF-8 JSON)::

    {"id": <idempotency key>, "recipient": <recipient key>, "channel": "webhook",
     "text": <rendered text>}

When the rendered text is itself a JSON object (templates may render JSON), it is sent as ``"data"``
(the object) instead of ``"text"``.

Headers: ``Content-Type: application/json``, ``Idempotency-Key: <idempotency key>`` (the same on
every attempt and every resume, so a receiver that deduplicates by it never acts twice), the
configured ``headers`` (to the provider's ``url`` only, unless ``headers_to_recipient_urls``: a
recipient file may name anyone's URL, and headers usually carry credentials), and, when
``secret`` is set, a signature header (``signature_header``,
default ``X-Campaign-Signature``) in the style of Stripe's::

    X-Campaign-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<raw body>")>

To verify, a receiver takes ``t`` and ``v1`` from the header, computes the HMAC over the decimal
timestamp, a full stop and the exact bytes of the body, compares it in constant time, and rejects
timestamps older than a few minutes (replay). `verify_signature` does exactly that. Recipients'
own URLs all verify with the one secret: a receiver can replay what it got to another, which
should therefore also check that ``recipient`` is its own.

Answers: 2xx accepted; 409 accepted too (the receiver already has this idempotency key: a
deduplicated resend); 408, 425, 429 and 5xx transient (``Retry-After`` honoured), but 504 in
doubt (a gateway gave up waiting for the receiver, which may have it); 401 and 403 from
the provider's own ``url`` stop the run (our secret or headers are refused), while from a
recipient's own URL they fail that message only; other 4xx permanent. URLs never appear in
error texts: they may carry secrets.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

import httpx

from campaign_cli.clock import Clock
from campaign_cli.config import WebhookProviderConfig
from campaign_cli.errors import (
    InDoubtError,
    PermanentError,
    ProviderAuthError,
    ProviderError,
    RateLimitedError,
    TransientError,
)
from campaign_cli.models import Channel, OutboundMessage, SendResult, WebhookContent
from campaign_cli.providers.base import ProviderContext
from campaign_cli.providers.http import (
    GATEWAY_TIMEOUT,
    HttpProvider,
    client_for,
    retry_after,
)
from campaign_cli.providers.public import PUBLIC_ONLY

REDACTED = "<redacted>"
_URL = re.compile(r"^https?://", re.IGNORECASE)
_ANY_URL = re.compile(r"https?://\S+", re.IGNORECASE)
#: The end of a text that may be part of a longer word (a token, a key).
_WORD_TAIL = re.compile(r"[^\s\"',;:{}\[\]()<>]+$")


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """The signature header's value: ``t=<timestamp>,v1=<hex HMAC-SHA256>``."""
    mac = hmac.new(secret.encode("utf-8"), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def verify_signature(
    secret: str, header: str, body: bytes, now: float, tolerance: float = 300.0
) -> bool:
    """True when ``header`` signs ``body`` with ``secret`` and is at most ``tolerance`` seconds
    old (``now`` in Unix seconds). For receivers, and for our own fake servers."""
    parts: dict[str, list[str]] = {}
    for item in header.split(","):
        key, _, value = item.strip().partition("=")
        parts.setdefault(key, []).append(value)
    try:
        timestamp = int(parts["t"][0])
    except (KeyError, ValueError):
        return False
    try:
        if abs(now - timestamp) > tolerance:
            return False
    except OverflowError:  # an int past a float, taken from a float ``now``: far too old or new
        return False
    expected = signature(secret, timestamp, body).rpartition("v1=")[2]
    return any(hmac.compare_digest(expected, v) for v in parts.get("v1", []))


def with_origin(url: str, base_url: str | None) -> str:
    """``url`` with the scheme, host and port of ``base_url`` (whose path, if any, is prefixed)."""
    if not base_url:
        return url
    base, target = httpx.URL(base_url), httpx.URL(url)
    path = base.path.rstrip("/") + target.path
    return str(target.copy_with(scheme=base.scheme, host=base.host, port=base.port, path=path))


def redact_error(exc: ProviderError, secrets: Iterable[str | None]) -> None:
    """Remove every secret (and any URL at all) from an error's text, in place."""
    text = exc.text
    for secret in secrets:
        if secret and len(secret) >= 8:
            text = text.replace(secret, REDACTED)
    text = _ANY_URL.sub(REDACTED, text)
    if text != exc.text:
        exc.text = text
        exc.args = (f"{exc.code}: {text}" if exc.code else text,)


def _snippet(response: httpx.Response) -> str:
    """A short, single-line, URL-free excerpt of an error body for the dead-letter text."""
    text = _cut(response.content[:400].decode("utf-8", "replace"), 300)
    text = " ".join(text.split())
    return _cut(_ANY_URL.sub(REDACTED, text), 200)


def _cut(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters between words, never inside one: a receiver may echo
    a secret of ours (a header's value), and half a secret no longer matches the value the run
    redacts from every error text."""
    if len(text) <= limit or not _WORD_TAIL.match(text[limit]):
        return text[:limit]
    return _WORD_TAIL.sub("", text[:limit])


class WebhookAdapter:
    """Builds the signed POST for one message and reads the answer. Pure apart from reading the
    clock for the signature's timestamp."""

    def __init__(
        self,
        url: str | None,
        clock: Clock,
        *,
        secret: str | None = None,
        signature_header: str = "X-Campaign-Signature",
        headers: Mapping[str, str] | None = None,
        headers_to_recipient_urls: bool = False,
        allow_private_urls: bool = False,
        recipient_urls: bool = True,
    ) -> None:
        self.url = url
        self._clock = clock
        self._secret = secret
        self._signature_header = signature_header
        self._headers = dict(headers or {})
        self._headers_to_recipient_urls = headers_to_recipient_urls
        #: Else a recipient's own URL may reach public addresses only (`public.PUBLIC_ONLY`).
        self._allow_private = allow_private_urls
        #: False when addresses are recipients' keys (no webhook_url column), never URLs.
        self._recipient_urls = recipient_urls

    def _recipients_own(self, message: OutboundMessage) -> bool:
        """Whether ``message`` goes to the recipient's own URL (its address) rather than ours."""
        return self._recipient_urls and _URL.match(message.address) is not None

    def url_for(self, message: OutboundMessage) -> str | None:
        """The recipient's own URL if the address is one, else the provider's."""
        return message.address if self._recipients_own(message) else self.url

    def body(self, message: OutboundMessage) -> bytes:
        content = message.content
        if not isinstance(content, WebhookContent):
            raise PermanentError(f"webhook sends webhook messages, not {message.channel.value}",
                                 code="wrong_channel", answered=False)
        payload: dict[str, Any] = {
            "id": message.idempotency_key,
            "recipient": message.recipient_key,
            "channel": message.channel.value,
        }
        if content.json:  # rendered from a JSON template and checked to be an object
            payload["data"] = json.loads(content.text)
        else:  # text, however much it looks like JSON: a recipient's value is not a payload
            payload["text"] = content.text
        return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")

    def build(self, message: OutboundMessage) -> httpx.Request:
        theirs = self._recipients_own(message)  # (a recipient's own URL: anyone's)
        url = message.address if theirs else self.url
        if url is None:
            raise PermanentError(
                "no webhook URL: the recipient has no webhook_url and the provider no url",
                code="no_url", answered=False)
        body = self.body(message)
        headers = httpx.Headers(
            self._headers if not theirs or self._headers_to_recipient_urls else {})
        headers["Content-Type"] = "application/json"
        headers["Idempotency-Key"] = message.idempotency_key
        if self._secret:
            timestamp = int(self._clock.now().timestamp())
            headers[self._signature_header] = signature(self._secret, timestamp, body)
        # (a dict of its own: the client writes the timeout into a request's extensions)
        return httpx.Request("POST", url, content=body, headers=headers,
                             extensions={PUBLIC_ONLY: True} if theirs and not self._allow_private
                             else None)

    def parse(self, message: OutboundMessage, response: httpx.Response) -> SendResult:
        status = response.status_code
        if 200 <= status < 300:
            return SendResult(provider_message_id=_answer_id(response), status_code=status)
        if status == 409:
            return SendResult(status_code=status,
                              detail="duplicate: the receiver already had this idempotency key")
        code = f"http_{status}"
        snippet = _snippet(response)
        text = f"HTTP {status}: {snippet}" if snippet else f"HTTP {status}"
        if status == 429:
            raise RateLimitedError(text, code=code, status=status,
                                   retry_after=retry_after(response.headers, self._clock.now()))
        if status == GATEWAY_TIMEOUT:
            raise InDoubtError(text, code=code, status=status)
        if status in (408, 425) or status >= 500:
            raise TransientError(text, code=code, status=status,
                                 retry_after=retry_after(response.headers, self._clock.now()))
        if status in (401, 403) and not self._recipients_own(message):
            raise ProviderAuthError(f"the webhook refused our signature or headers ({text})",
                                    code=code, status=status)
        raise PermanentError(text, code=code, status=status)


def _answer_id(response: httpx.Response) -> str | None:
    if not response.content:
        return None
    try:
        data = json.loads(response.content)
    except (ValueError, RecursionError):  # RecursionError: a body nested thousands deep
        return None
    value = data.get("id") if isinstance(data, dict) else None
    return str(value) if isinstance(value, (str, int)) and not isinstance(value, bool) else None


class WebhookProvider:
    """The webhook type as a `Provider`: an `HttpProvider` whose errors never name a URL."""

    channels = frozenset({Channel.WEBHOOK})
    deduplicates = True

    def __init__(self, name: str, adapter: WebhookAdapter, client: httpx.AsyncClient) -> None:
        self.name = name
        self.adapter = adapter
        self._http = HttpProvider(name, adapter, client, channels=self.channels,
                                  deduplicates=self.deduplicates)

    @classmethod
    def from_config(
        cls, name: str, config: WebhookProviderConfig, context: ProviderContext
    ) -> WebhookProvider:
        url = with_origin(config.url, config.base_url) if config.url else None
        adapter = WebhookAdapter(url, context.clock, secret=config.secret,
                                 signature_header=config.signature_header, headers=config.headers,
                                 headers_to_recipient_urls=config.headers_to_recipient_urls,
                                 allow_private_urls=config.allow_private_urls,
                                 recipient_urls=context.recipient_urls)
        client = client_for(config, context, url or config.base_url or "")
        return cls(name, adapter, client)

    async def send(self, message: OutboundMessage) -> SendResult:
        try:
            return await self._http.send(message)
        except ProviderError as exc:
            redact_error(exc, (self.adapter.url, message.address if _URL.match(message.address)
                               else None))
            raise

    async def aclose(self) -> None:
        await self._http.aclose()
