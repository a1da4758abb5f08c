"""The Slack and generic webhook providers through httpx.MockTransport: request shapes, the
HMAC signature, the Idempotency-Key, error mapping, and secret URLs kept out of error texts."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from dataclasses import replace
from typing import Any

import httpx
import pytest

from campaign_cli.config import SlackProviderConfig, WebhookProviderConfig
from campaign_cli.errors import (
    InDoubtError,
    PermanentError,
    ProviderAuthError,
    ProviderError,
    RateLimitedError,
    TransientError,
    redact,
)
from campaign_cli.models import Channel, OutboundMessage, SendResult, WebhookContent
from campaign_cli.providers.base import Provider, ProviderContext, default_registry
from campaign_cli.providers.slack import SlackProvider
from campaign_cli.providers.webhook import WebhookProvider, signature, verify_signature
from campaign_cli.testing import FakeClock
from tests import http_support

SLACK_SECRET = "T00000000/B00000000/XXXXXXXXXXXXXXXXXXXXXXXX"
SLACK_URL = f"https://hooks.slack.com/services/{SLACK_SECRET}"
HOOK_URL = "https://hooks.example.com/in/s3cr3t-path-token"
RECIPIENT_URL = "https://customer.example.org/hooks/c1-private"
SECRET = "whsec_test_0123456789"

Handler = http_support.Handler
Recorder = http_support.Recorder



def message(text: str = "Deploy finished", **changes: Any) -> OutboundMessage:
    base = OutboundMessage(
        run_id=1, row=1, channel=Channel.WEBHOOK, recipient_key="c1", address="c1",
        idempotency_key="r1-c1-webhook-7f3a", content=WebhookContent(text=text), content_hash="h",
    )
    return replace(base, **changes)


def context(handler: Recorder, clock: FakeClock | None = None) -> ProviderContext:
    return http_support.mock_context(handler, clock)


def slack(handler: Recorder, **config: Any) -> Provider:
    settings: dict[str, Any] = {"type": "slack", "url": SLACK_URL, **config}
    return default_registry().create("team", SlackProviderConfig.model_validate(settings),
                                     context(handler))


def webhook(handler: Recorder, clock: FakeClock | None = None, **config: Any) -> Provider:
    settings: dict[str, Any] = {"type": "webhook", "url": HOOK_URL, **config}
    return default_registry().create("hook", WebhookProviderConfig.model_validate(settings),
                                     context(handler, clock))


def run(p: Provider, *messages: OutboundMessage) -> list[SendResult]:
    return http_support.send_all(p, *messages)


def failure(p: Provider, msg: OutboundMessage | None = None) -> ProviderError:
    with pytest.raises(ProviderError) as info:
        run(p, msg or message())
    return info.value


# --------------------------------------------------------------------------------------------
# Slack


def test_slack_request_shape() -> None:
    rec = Recorder()
    p = slack(rec)
    assert isinstance(p, SlackProvider)
    assert p.channels == frozenset({Channel.WEBHOOK}) and p.deduplicates is False
    [result] = run(p, message("Héllo *team*"))
    assert result == SendResult(status_code=200)
    [request] = rec.requests
    assert request.method == "POST" and str(request.url) == SLACK_URL
    assert request.headers["content-type"].startswith("application/json")
    assert json.loads(request.content) == {"text": "Héllo *team*"}


def test_slack_base_url_replaces_the_origin_and_keeps_the_secret_path() -> None:
    rec = Recorder()
    run(slack(rec, base_url="http://127.0.0.1:8089"), message())
    assert str(rec.requests[0].url) == f"http://127.0.0.1:8089/services/{SLACK_SECRET}"


@pytest.mark.parametrize("status, body, kind, code", [
    (400, "invalid_payload", PermanentError, "invalid_payload"),
    (400, "no_text", PermanentError, "no_text"),
    (403, "action_prohibited", ProviderAuthError, "action_prohibited"),
    (404, "channel_not_found", ProviderAuthError, "channel_not_found"),
    (410, "channel_is_archived", ProviderAuthError, "channel_is_archived"),
    (404, "no_service", ProviderAuthError, "no_service"),
    (400, "no_service", ProviderAuthError, "no_service"),
    (500, "", TransientError, "http_500"),
    (503, "<html>Service Unavailable</html>", TransientError, "http_503"),
    # A gateway that waited in vain for Slack, which may have posted it meanwhile.
    (504, "<html>Gateway Time-out</html>", InDoubtError, "http_504"),
])
def test_slack_error_mapping(status: int, body: str, kind: type[ProviderError], code: str) -> None:
    exc = failure(slack(Recorder(httpx.Response(status, text=body))))
    assert type(exc) is kind
    assert exc.code == code and exc.status == status
    assert SLACK_SECRET not in str(exc) and "hooks.slack.com" not in str(exc)


def test_slack_429_is_rate_limited_with_retry_after() -> None:
    exc = failure(slack(Recorder(httpx.Response(429, headers={"Retry-After": "30"},
                                                text="rate_limited"))))
    assert isinstance(exc, RateLimitedError)
    assert exc.retry_after == 30.0


@pytest.mark.parametrize("error, kind", [
    (httpx.ConnectError(f"cannot connect to {SLACK_URL}"), TransientError),
    (httpx.ReadTimeout(f"read timed out on POST /services/{SLACK_SECRET}"), InDoubtError),
])
def test_slack_secret_url_never_in_transport_error_texts(error: httpx.HTTPError,
                                                         kind: type[ProviderError]) -> None:
    exc = failure(slack(Recorder(error)))
    assert type(exc) is kind
    for text in (str(exc), exc.text, repr(exc.args)):
        assert SLACK_SECRET not in text
        assert "XXXXXXXX" not in text


# --------------------------------------------------------------------------------------------
# Webhook: shape


def test_webhook_request_shape_to_the_provider_url() -> None:
    rec = Recorder()
    p = webhook(rec, headers={"X-Team": "growth", "Idempotency-Key": "must-not-win"})
    assert isinstance(p, WebhookProvider)
    assert p.channels == frozenset({Channel.WEBHOOK}) and p.deduplicates is True
    run(p, message("Your order shipped"))
    [request] = rec.requests
    assert request.method == "POST" and str(request.url) == HOOK_URL
    assert request.headers["content-type"] == "application/json"
    assert request.headers["idempotency-key"] == "r1-c1-webhook-7f3a"
    assert request.headers.get_list("idempotency-key") == ["r1-c1-webhook-7f3a"]
    assert request.headers["x-team"] == "growth"
    assert "x-campaign-signature" not in request.headers  # no secret, no signature
    assert json.loads(request.content) == {
        "id": "r1-c1-webhook-7f3a", "recipient": "c1", "channel": "webhook",
        "text": "Your order shipped"}


def test_webhook_posts_to_the_recipients_own_url() -> None:
    rec = Recorder()
    run(webhook(rec), message(address=RECIPIENT_URL))
    assert str(rec.requests[0].url) == RECIPIENT_URL


def test_webhook_headers_go_to_the_provider_url_not_to_urls_a_recipient_file_names() -> None:
    """The configured headers (an Authorization bearer, typically) went to every URL the
    recipient file named: one row from a web form pointing at its author's server collected the
    operator's credentials. They go to the provider's own `url`; the signature and the
    Idempotency-Key go everywhere (a recipient's receiver verifies by them)."""
    rec = Recorder()
    headers = {"Authorization": "Bearer tok_live_1", "X-Team": "growth"}
    run(webhook(rec, headers=headers, secret="s"), message(), message(address=RECIPIENT_URL))
    own, theirs = rec.requests
    assert str(own.url) == HOOK_URL and own.headers["authorization"] == "Bearer tok_live_1"
    assert str(theirs.url) == RECIPIENT_URL
    assert "authorization" not in theirs.headers and "x-team" not in theirs.headers
    assert theirs.headers["idempotency-key"] and theirs.headers["x-campaign-signature"]
    rec = Recorder()  # when the operator says the recipients' URLs are theirs to trust
    run(webhook(rec, headers=headers, headers_to_recipient_urls=True),
        message(address=RECIPIENT_URL))
    assert rec.requests[0].headers["authorization"] == "Bearer tok_live_1"


def test_webhook_without_a_provider_url_uses_recipient_urls_and_fails_others() -> None:
    rec = Recorder()
    p = webhook(rec, url=None)

    async def go() -> None:
        assert (await p.send(message(address=RECIPIENT_URL))).status_code == 200
        with pytest.raises(PermanentError) as info:
            await p.send(message(address="c2"))
        assert info.value.code == "no_url"
        await p.aclose()

    asyncio.run(go())
    assert len(rec.requests) == 1


def test_webhook_json_content_is_sent_as_data() -> None:
    rec = Recorder()
    run(webhook(rec), message(content=WebhookContent('  {"order": 17, "items": ["tea"]}\n',
                                                     json=True)))
    body = json.loads(rec.requests[0].content)
    assert body["data"] == {"order": 17, "items": ["tea"]}
    assert "text" not in body


@pytest.mark.parametrize("text", ['{"broken": ', "[1, 2]", "plain {braces}",
                                  '{"admin": true}'])
def test_webhook_text_that_is_not_a_json_object_stays_text(text: str) -> None:
    rec = Recorder()
    run(webhook(rec), message(text))
    assert json.loads(rec.requests[0].content)["text"] == text


def test_webhook_base_url_applies_to_the_provider_url_only() -> None:
    rec = Recorder()
    run(webhook(rec, base_url="http://127.0.0.1:8090"), message(), message(address=RECIPIENT_URL))
    assert [str(r.url) for r in rec.requests] == [
        "http://127.0.0.1:8090/in/s3cr3t-path-token", RECIPIENT_URL]


# --------------------------------------------------------------------------------------------
# Webhook: signature and idempotency


def test_webhook_signature_is_hmac_sha256_over_timestamp_and_body() -> None:
    clock = FakeClock()
    rec = Recorder()
    run(webhook(rec, clock, secret=SECRET, signature_header="X-Sig"), message("hi"))
    [request] = rec.requests
    header = request.headers["x-sig"]
    ts = int(clock.now().timestamp())
    expected = hmac.new(SECRET.encode(), f"{ts}.".encode() + request.content,
                        hashlib.sha256).hexdigest()
    assert header == f"t={ts},v1={expected}"
    assert verify_signature(SECRET, header, request.content, now=ts)
    assert not verify_signature(SECRET, header, request.content + b" ", now=ts)
    assert not verify_signature("wrong-secret", header, request.content, now=ts)
    assert not verify_signature(SECRET, header, request.content, now=ts + 301)
    assert not verify_signature(SECRET, "garbage", request.content, now=ts)
    assert SECRET not in header and SECRET.encode() not in request.content


@pytest.mark.parametrize("stamp", ["9" * 400, "-" + "9" * 400])
def test_a_signature_timestamp_past_a_float_is_refused_not_a_crash(stamp: str) -> None:
    """A receiver checks with ``now=time.time()``, a float: ``t=`` followed by 400 digits made
    ``now - timestamp`` raise OverflowError, so an unsigned request crashed the receiver's
    check (a 500) instead of being refused."""
    now = 1767225600.5
    header = signature(SECRET, int(stamp), b"{}")
    assert header.startswith(f"t={stamp},")
    assert not verify_signature(SECRET, header, b"{}", now=now)


def test_signature_helper_matches_a_hand_computed_vector() -> None:
    mac = hmac.new(b"k", b"1700000000.{}", hashlib.sha256).hexdigest()
    assert signature("k", 1700000000, b"{}") == f"t=1700000000,v1={mac}"


def test_idempotency_key_is_stable_across_attempts_while_signatures_renew() -> None:
    clock = FakeClock()
    rec = Recorder(httpx.Response(503), httpx.Response(503), httpx.Response(201))
    p = webhook(rec, clock, secret=SECRET)

    async def go() -> SendResult:
        for attempt in (1, 2):
            with pytest.raises(TransientError):
                await p.send(message(attempt=attempt))
            clock.advance(5)
        result = await p.send(message(attempt=3))
        await p.aclose()
        return result

    assert asyncio.run(go()).status_code == 201
    assert [r.headers["idempotency-key"] for r in rec.requests] == ["r1-c1-webhook-7f3a"] * 3
    assert len({r.content for r in rec.requests}) == 1
    stamps = [r.headers["x-campaign-signature"].split(",")[0] for r in rec.requests]
    start = int(FakeClock().now().timestamp())
    assert stamps == [f"t={start}", f"t={start + 5}", f"t={start + 10}"]
    for r in rec.requests:
        ts = int(r.headers["x-campaign-signature"].split(",")[0][2:])
        assert verify_signature(SECRET, r.headers["x-campaign-signature"], r.content, now=ts)


# --------------------------------------------------------------------------------------------
# Webhook: answers


def test_webhook_accepts_2xx_and_reads_an_id() -> None:
    rec = Recorder(httpx.Response(202, json={"id": "evt_9"}), httpx.Response(204))
    first, second = run(webhook(rec), message(), message(row=2))
    assert first == SendResult(provider_message_id="evt_9", status_code=202)
    assert second == SendResult(status_code=204)


def test_webhook_answer_nested_deeper_than_the_json_parser_goes_is_accepted_without_an_id(
) -> None:
    """A recipient's own endpoint (any server at all) answered 200 with brackets nested some
    thousands deep: json.loads raises RecursionError, not ValueError, and the delivered message
    crashed its provider, which the pipeline journals in doubt before it stops the whole run
    (exit 1)."""
    [result] = run(webhook(Recorder(httpx.Response(200, text="[" * 100_000))), message())
    assert result == SendResult(status_code=200)


def test_webhook_409_means_already_delivered() -> None:
    [result] = run(webhook(Recorder(httpx.Response(409, text="duplicate key"))), message())
    assert result.status_code == 409
    assert result.detail is not None and "duplicate" in result.detail


@pytest.mark.parametrize("status, kind", [
    (408, TransientError), (425, TransientError), (500, TransientError), (502, TransientError),
    (503, TransientError), (504, InDoubtError), (400, PermanentError), (404, PermanentError), (410, PermanentError),
    (422, PermanentError), (401, ProviderAuthError), (403, ProviderAuthError),
    (301, PermanentError),
])
def test_webhook_error_mapping(status: int, kind: type[ProviderError]) -> None:
    exc = failure(webhook(Recorder(httpx.Response(status, text=f"nope, see {HOOK_URL}"))))
    assert type(exc) is kind
    assert exc.status == status and exc.code == f"http_{status}"
    assert "s3cr3t" not in str(exc) and "hooks.example.com" not in str(exc)


def test_an_echoed_secret_is_never_cut_in_half_where_redaction_cannot_see_it() -> None:
    """A receiver that echoes our request in its error (debug receivers, request bins) sends
    the Authorization header back. The adapter cut the body to 300 bytes and then 200
    characters; a token cut in half no longer matches the secret the run redacts (what
    `_attempt` and `_record` do with every error text), and its first half went to
    attempts.error_text and the message's detail."""
    token = "tok_live_9f8e7d6c5b4a39281706f5e4d3c2b1a0"
    leaks = []
    for padding in range(0, 80):
        body = "echo " * padding + f'{{"headers": {{"authorization": "Bearer {token}"}}}}'
        provider = webhook(Recorder(httpx.Response(400, text=body)),
                           headers={"Authorization": f"Bearer {token}"})
        exc = failure(provider)
        assert type(exc) is PermanentError
        stored = redact(exc.text, {token})[:500]
        if token[:6] in stored:
            leaks.append((padding, stored[-60:]))
    assert leaks == []


def test_webhook_429_is_rate_limited_with_retry_after() -> None:
    exc = failure(webhook(Recorder(httpx.Response(429, headers={"Retry-After": "12"}))))
    assert isinstance(exc, RateLimitedError) and exc.retry_after == 12.0


def test_webhook_5xx_retry_after_as_a_date_uses_the_run_clock() -> None:
    answer = httpx.Response(503, headers={"Retry-After": "Thu, 01 Jan 2026 00:01:00 GMT"})
    exc = failure(webhook(Recorder(answer), FakeClock()))
    assert isinstance(exc, TransientError) and exc.retry_after == 60.0


@pytest.mark.parametrize("status", [401, 403])
def test_webhook_refusal_by_a_recipients_own_url_fails_that_message_only(status: int) -> None:
    exc = failure(webhook(Recorder(httpx.Response(status))), message(address=RECIPIENT_URL))
    assert type(exc) is PermanentError


@pytest.mark.parametrize("status", [401, 403])
def test_webhook_a_recipients_url_that_is_ours_is_still_the_recipients(status: int) -> None:
    """A recipient file's webhook_url naming the provider's own url gets the recipient's
    treatment (no configured headers, public addresses only), so its 401 is that row's refusal,
    not our credentials refused: one CSV row must not stop the run (exit 6)."""
    recorder = Recorder(httpx.Response(status))
    exc = failure(webhook(recorder, headers={"Authorization": "Bearer tok-0123456789"}),
                  message(address=HOOK_URL))
    assert "authorization" not in recorder.requests[0].headers
    assert type(exc) is PermanentError


@pytest.mark.parametrize("error, kind", [
    (httpx.ConnectError(f"cannot connect to {HOOK_URL}"), TransientError),
    (httpx.ReadTimeout(f"timed out reading {RECIPIENT_URL}"), InDoubtError),
])
def test_webhook_urls_never_in_transport_error_texts(error: httpx.HTTPError,
                                                     kind: type[ProviderError]) -> None:
    target = RECIPIENT_URL if RECIPIENT_URL in str(error) else "c1"
    exc = failure(webhook(Recorder(error)), message(address=target))
    assert type(exc) is kind
    for text in (str(exc), exc.text):
        assert "s3cr3t" not in text and "c1-private" not in text


def test_registry_knows_the_new_types() -> None:
    assert {"fcm", "slack", "webhook"} <= set(default_registry().types())
