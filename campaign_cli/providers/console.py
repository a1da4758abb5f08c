"""The console provider: each message as one JSON line on a stream (standard output by default).
It cannot deduplicate: a resend prints again.

Unthrottled runs hand it batches (`send_batch`): one write and one flush for a batch's lines.
The batch's intents are committed first, so a crash inside the write leaves those rows `in_doubt`
(reported), never silently `pending`.

Lines are UTF-8 JSON where the stream is UTF-8. A stream in another encoding (a Latin-1 locale,
``PYTHONIOENCODING=ascii``, a Windows console) gets ASCII JSON instead: ``\\u`` escapes read back as
the same text, where a character the stream cannot encode would fail the whole batch."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from json.encoder import encode_basestring, encode_basestring_ascii
from typing import IO, Any

from campaign_cli.config import ConsoleProviderConfig
from campaign_cli.errors import ProviderError, UsageError
from campaign_cli.models import Channel, EmailContent, OutboundMessage, SendResult, SmsContent
from campaign_cli.providers.base import ProviderContext
from campaign_cli.providers.outbox import _payload
from campaign_cli.streams import whole_writes, writes_unicode


class ConsoleProvider:
    channels = frozenset(Channel)
    deduplicates = False
    batch_size = 256
    local = True  # its output stays on this machine (`Provider`: the journal need not sync)

    def __init__(self, name: str, stream: IO[str]) -> None:
        self.name = name
        self._stream = stream
        self._count = 0
        self._ascii = not writes_unicode(stream)

    @classmethod
    def from_config(
        cls, name: str, config: ConsoleProviderConfig, context: ProviderContext
    ) -> ConsoleProvider:
        stream = context.stdout or (None if sys.stdout is None else whole_writes(sys.stdout))
        if stream is None:  # `>&-`: nowhere to write; refused before anything is journaled
            raise UsageError(f"provider {name}: standard output is closed, and the console "
                             "provider writes its messages there")
        return cls(name, stream)

    async def send(self, message: OutboundMessage) -> SendResult:
        self._stream.write(_ascii_line(message) if self._ascii else _line(message))
        # A line printed is a message sent: never leave it in a buffer a crash would throw away.
        self._stream.flush()
        self._count += 1
        return SendResult(provider_message_id=f"console-{self._count}")

    async def send_batch(
        self, messages: Sequence[OutboundMessage]
    ) -> list[SendResult | ProviderError]:
        line = _ascii_line if self._ascii else _line
        self._stream.write("".join([line(message) for message in messages]))
        self._stream.flush()
        first = self._count + 1
        self._count += len(messages)
        return [SendResult(provider_message_id=f"console-{n}")
                for n in range(first, self._count + 1)]

    async def aclose(self) -> None:
        self._stream.flush()


# `json.dumps` with any option builds a new encoder per call; one is enough.
_encode = json.JSONEncoder(ensure_ascii=False).encode
# How that encoder quotes a string (ensure_ascii=False): json's own C function.
_quote = encode_basestring
# The same for a stream that is not UTF-8 (ensure_ascii=True, json.dumps's default).
_encode_ascii = json.JSONEncoder().encode
_quote_ascii = encode_basestring_ascii


def _line(
    message: OutboundMessage,
    quote: Callable[[str], str] = _quote,
    encode: Callable[[Any], str] = _encode,
) -> str:
    content = message.content
    if type(content) is SmsContent:
        # The common case, spelled out: the same text as the generic path below (tested against
        # it), without a dict and the encoder's generic walk: a tenth of a console run's CPU.
        return (
            f'{{"channel": {quote(message.channel._value_)}, "to": {quote(message.address)}, '
            f'"recipient_key": {quote(message.recipient_key)}, '
            f'"idempotency_key": {quote(message.idempotency_key)}, '
            f'"body": {quote(content.body)}, "encoding": {quote(content.encoding)}, '
            f'"segments": {int(content.segments)}}}\n'
        )
    payload: dict[str, Any] = _payload(message)
    if isinstance(content, EmailContent):
        payload.update(subject=content.subject, text=content.text, html=content.html,
                       sender=content.sender, headers=dict(content.headers))
    return encode(payload) + "\n"


def _ascii_line(message: OutboundMessage) -> str:
    """`_line` in ASCII (``json.dumps`` with its default ensure_ascii=True)."""
    return _line(message, _quote_ascii, _encode_ascii)

