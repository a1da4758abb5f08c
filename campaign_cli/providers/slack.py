"""Slack incoming webhooks: POST ``{"text": ...}`` as JSON to the webhook's URL.

The URL is the credential (``url: ${SLACK_WEBHOOK_URL}``): it never appears in an error text, not
even in a transport error's. ``base_url``, when set, replaces its scheme, host and port (so tests
and fakes can stand in for hooks.slack.com); the secret path is kept.

Answers (plain text, PROVIDERS.md section 3): 200 ``ok`` accepted; 429 rate limited
(``Retry-After`` in seconds; Slack allows about one message a second per webhook); 400
``invalid_payload`` and other 4xx permanent for that message; 403 ``action_prohibited``, 404
``channel_not_found``, 410 ``channel_is_archived``, ``no_service`` (the URL was revoked) and the
like stop the run: every later message would meet the same refusal; 408 and 5xx transient,
but 504 in doubt (a gateway gave up waiting for Slack, which may have posted it).
Slack cannot deduplicate: a resend posts again.
"""

from __future__ import annotations

import json
import re

import httpx

from campaign_cli.clock import Clock
from campaign_cli.config import SlackProviderConfig
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
from campaign_cli.providers.http import GATEWAY_TIMEOUT, HttpProvider, client_for, retry_after
from campaign_cli.providers.webhook import redact_error, with_origin

#: Slack takes about one message a second per webhook: a few connections are plenty.
SLACK_CONCURRENCY = 4
#: Error words meaning the webhook itself is gone or refused: no later message can succeed.
CONFIG_ERRORS = frozenset({
    "action_prohibited",
    "channel_is_archived",
    "channel_not_found",
    "invalid_token",
    "no_active_hooks",
    "no_service",
    "no_team",
    "posting_to_general_channel_denied",
    "team_disabled",
})
_WORD = re.compile(r"[a-z][a-z0-9_]{1,63}")


class SlackAdapter:
    """Builds the POST and reads Slack's one-word answers. Pure: no I/O."""

    def __init__(self, url: str, clock: Clock | None = None) -> None:
        self.url = url
        self._clock = clock

    def build(self, message: OutboundMessage) -> httpx.Request:
        content = message.content
        if not isinstance(content, WebhookContent):
            raise PermanentError(f"slack sends webhook messages, not {message.channel.value}",
                                 code="wrong_channel", answered=False)
        body = json.dumps({"text": content.text}, ensure_ascii=False, separators=(",", ":"))
        return httpx.Request("POST", self.url, content=body.encode("utf-8"),
                             headers={"content-type": "application/json; charset=utf-8"})

    def parse(self, message: OutboundMessage, response: httpx.Response) -> SendResult:
        status = response.status_code
        if 200 <= status < 300:
            return SendResult(status_code=status)
        answer = response.content[:100].decode("utf-8", "replace").strip()
        word = answer if _WORD.fullmatch(answer) else None
        code = word or f"http_{status}"
        text = f"Slack answered HTTP {status}" + (f" {word}" if word else "")
        now = self._clock.now() if self._clock is not None else None
        if status == 429:
            raise RateLimitedError(text, code=code, status=status,
                                   retry_after=retry_after(response.headers, now))
        if word in CONFIG_ERRORS or status in (401, 403, 404, 410):
            raise ProviderAuthError(f"{text}: the webhook URL is revoked or its channel gone",
                                    code=code, status=status)
        if status == GATEWAY_TIMEOUT:
            raise InDoubtError(text, code=code, status=status)
        if status == 408 or status >= 500:
            raise TransientError(text, code=code, status=status,
                                 retry_after=retry_after(response.headers, now))
        raise PermanentError(text, code=code, status=status)


class SlackProvider:
    """Slack as a `Provider`: an `HttpProvider` whose errors never show the secret URL."""

    channels = frozenset({Channel.WEBHOOK})
    deduplicates = False

    def __init__(self, name: str, adapter: SlackAdapter, client: httpx.AsyncClient,
                 secrets: tuple[str, ...] = ()) -> None:
        self.name = name
        self.adapter = adapter
        self._secrets = (adapter.url, *secrets)
        self._http = HttpProvider(name, adapter, client, channels=self.channels,
                                  deduplicates=self.deduplicates)

    @classmethod
    def from_config(
        cls, name: str, config: SlackProviderConfig, context: ProviderContext
    ) -> SlackProvider:
        url = with_origin(config.url, config.base_url)
        client = client_for(config, context, url, SLACK_CONCURRENCY)
        path = httpx.URL(config.url).path
        return cls(name, SlackAdapter(url, context.clock), client,
                   secrets=(config.url, path) if path not in ("", "/") else (config.url,))

    async def send(self, message: OutboundMessage) -> SendResult:
        try:
            return await self._http.send(message)
        except ProviderError as exc:
            redact_error(exc, self._secrets)
            raise

    async def aclose(self) -> None:
        await self._http.aclose()
