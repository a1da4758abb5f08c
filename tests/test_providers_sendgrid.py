"""The SendGrid adapter: request shape and auth, every answer of PROVIDERS.md section 2, and every
request it builds checked against SendGrid's OpenAPI spec (openapi-core)."""

from __future__ import annotations

import asyncio
import email.utils
import json
from datetime import timedelta
from typing import Any

import httpx
import pytest
from openapi_core import Config, OpenAPI
from openapi_core.testing import MockRequest

from campaign_cli.config import SendGridProviderConfig
from campaign_cli.errors import (
    InDoubtError,
    PermanentError,
    ProviderAuthError,
    RateLimitedError,
    TransientError,
)
from campaign_cli.models import Channel, EmailContent, OutboundMessage, SendResult, SmsContent
from campaign_cli.providers.base import default_registry
from campaign_cli.providers.sendgrid import SendGridAdapter, SendGridProvider
from campaign_cli.testing import FakeClock
from tests import http_support
from tests.http_support import SPECS, check_spec_copy, refuse_connection, withhold_answer

SPEC_FILE = "tsg_mail_v3.json"
SPEC_SERVER = "https://api.sendgrid.com"
KEY = "SG.secret-api-key.value"
UNSUBSCRIBE = (
    ("List-Unsubscribe", "<mailto:unsub@shop.example.com?subject=u1>, <https://shop.example.com/u/t1>"),
    ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"),
)


@pytest.fixture(scope="module")
def spec() -> OpenAPI:
    data = json.loads((SPECS / SPEC_FILE).read_text(encoding="utf-8"))
    return OpenAPI.from_dict(data, config=Config(spec_validator_cls=None))


def validate(spec: OpenAPI, request: httpx.Request) -> dict[str, Any]:
    mock = MockRequest(
        SPEC_SERVER,
        request.method,
        request.url.path,
        headers=dict(request.headers),
        data=request.content,
        content_type=request.headers.get("content-type", ""),
    )
    result = spec.unmarshal_request(mock)
    assert result.errors == [], result.errors
    assert isinstance(result.body, dict)
    return result.body


def mail(
    *,
    text: str | None = "Hello Ann",
    html: str | None = "<p>Hello Ann</p>",
    sender: str = "Shop Team <news@shop.example.com>",
    reply_to: str | None = None,
    headers: tuple[tuple[str, str], ...] = UNSUBSCRIBE,
    subject: str = "Our spring sale",
    address: str = "ann@example.com",
) -> OutboundMessage:
    return OutboundMessage(
        run_id=3, row=7, channel=Channel.EMAIL, recipient_key="c7", address=address,
        idempotency_key="3-c7-email", content=EmailContent(subject, text, html, sender, reply_to,
                                                           headers),
        content_hash="h",
    )


Handler = http_support.Handler


class Recorder(http_support.Recorder):
    def default(self) -> httpx.Response:
        return httpx.Response(202, headers={"X-Message-Id": "msg-abc123"})



def errors(status: int, message: str, field: str | None = None,
           headers: dict[str, str] | None = None) -> httpx.Response:
    item: dict[str, Any] = {"message": message, "help": "http://sendgrid.com/docs"}
    if field is not None:
        item["field"] = field
    return httpx.Response(status, json={"errors": [item, {"message": "second"}]}, headers=headers)


def provider(handler: Handler, clock: FakeClock | None = None, **extra: Any) -> SendGridProvider:
    config = SendGridProviderConfig.model_validate({"type": "sendgrid", "api_key": KEY, **extra})
    context = http_support.mock_context(handler, clock)
    return SendGridProvider.from_config("sg", config, context)


def send(p: SendGridProvider, message: OutboundMessage) -> SendResult:
    return http_support.send_once(p, message)


def failure(handler: Handler, message: OutboundMessage | None = None,
            clock: FakeClock | None = None) -> Exception:
    with pytest.raises(Exception) as info:
        send(provider(handler, clock), message or mail())
    return info.value  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# Request shape


def test_send_posts_json_with_bearer_key(spec: OpenAPI) -> None:
    rec = Recorder()
    result = send(provider(rec), mail(reply_to="Help Desk <help@shop.example.com>"))
    assert result == SendResult(provider_message_id="msg-abc123", status_code=202)
    (request,) = rec.requests
    assert request.method == "POST"
    assert str(request.url) == "https://api.sendgrid.com/v3/mail/send"
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert request.headers["content-type"] == "application/json"
    body = json.loads(request.content)
    assert body == {
        "personalizations": [{
            "to": [{"email": "ann@example.com"}],
            "custom_args": {"idempotency_key": "3-c7-email", "run": "3", "row": "7"},
        }],
        "from": {"email": "news@shop.example.com", "name": "Shop Team"},
        "reply_to": {"email": "help@shop.example.com", "name": "Help Desk"},
        "subject": "Our spring sale",
        "content": [{"type": "text/plain", "value": "Hello Ann"},
                    {"type": "text/html", "value": "<p>Hello Ann</p>"}],
        "headers": dict(UNSUBSCRIBE),
    }
    assert validate(spec, request)["personalizations"][0]["custom_args"]["row"] == "7"


@pytest.mark.parametrize(
    ("kwargs", "content_types"),
    [
        ({"html": None}, ["text/plain"]),
        ({"text": None}, ["text/html"]),
        ({"headers": ()}, ["text/plain", "text/html"]),
        ({"sender": "news@shop.example.com"}, ["text/plain", "text/html"]),
        ({"sender": '"Shop, Inc." <news@shop.example.com>'}, ["text/plain", "text/html"]),
        ({"subject": "Grüße — 50 % off 🎉", "text": "Grüße\n", "html": "<p>Grüße</p>"},
         ["text/plain", "text/html"]),
    ],
)
def test_variants_match_the_spec(spec: OpenAPI, kwargs: dict[str, Any],
                                 content_types: list[str]) -> None:
    rec = Recorder()
    message = mail(**kwargs)
    send(provider(rec), message)
    body = validate(spec, rec.requests[0])
    assert [part["type"] for part in body["content"]] == content_types
    assert body["subject"] == message.content.subject  # type: ignore[union-attr]
    if not kwargs.get("headers", UNSUBSCRIBE):
        assert "headers" not in body


def test_sender_name_parsed() -> None:
    adapter = SendGridAdapter(api_key=KEY)
    body = json.loads(adapter.build(mail(sender='"Shop, Inc." <news@shop.example.com>')).content)
    assert body["from"] == {"email": "news@shop.example.com", "name": "Shop, Inc."}
    body = json.loads(adapter.build(mail(sender="news@shop.example.com")).content)
    assert body["from"] == {"email": "news@shop.example.com"}


def test_base_url_is_configurable(spec: OpenAPI) -> None:
    rec = Recorder()
    send(provider(rec, base_url="http://127.0.0.1:9090"), mail())
    assert str(rec.requests[0].url) == "http://127.0.0.1:9090/v3/mail/send"
    validate(spec, rec.requests[0])


def test_the_validator_can_fail(spec: OpenAPI) -> None:
    good = SendGridAdapter(api_key=KEY).build(mail())
    no_auth = httpx.Request("POST", good.url, content=good.content,
                            headers={"Content-Type": "application/json"})
    body = json.loads(good.content)
    body["from"] = {"email": "not an address"}
    bad_from = httpx.Request("POST", good.url, json=body, headers={"Authorization": f"Bearer {KEY}"})
    del body["personalizations"]
    no_personalizations = httpx.Request("POST", good.url, json=body,
                                        headers={"Authorization": f"Bearer {KEY}"})
    for request in (no_auth, bad_from, no_personalizations):
        with pytest.raises(AssertionError):
            validate(spec, request)


@pytest.mark.parametrize("name", ["DKIM-Signature", "Received", "X-SG-EID", "x-sg-id",
                                  "Content-Type", "Reply-To"])
def test_headers_sendgrid_refuses_are_refused(name: str) -> None:
    rec = Recorder()
    exc = failure(rec, mail(headers=((name, "x"),)))
    assert type(exc) is PermanentError
    assert exc.code == "reserved_header" and name in exc.text
    assert rec.requests == []  # never sent


@pytest.mark.parametrize("message", [
    mail(subject="Hi\r\nBcc: victim@example.com"),
    mail(sender="Shop\n <news@shop.example.com>"),
    mail(reply_to="help@shop.example.com\r\nX: y"),
    mail(headers=(("X-Campaign", "a\nBcc: victim@example.com"),)),
    mail(address="ann@example.com\r\nBcc: victim@example.com"),
])
def test_line_breaks_never_reach_a_header(message: OutboundMessage) -> None:
    rec = Recorder()
    exc = failure(rec, message)
    assert type(exc) is PermanentError and exc.code == "header_injection"
    assert rec.requests == []


def test_provider_facts() -> None:
    p = provider(Recorder())
    assert p.channels == frozenset({Channel.EMAIL})
    assert p.deduplicates is False
    asyncio.run(p.aclose())


def test_registered_in_the_default_registry() -> None:
    config = SendGridProviderConfig.model_validate({"type": "sendgrid", "api_key": KEY})
    context = http_support.mock_context(Recorder())
    p = default_registry().create("sg", config, context)
    assert isinstance(p, SendGridProvider)
    asyncio.run(p.aclose())


def test_only_email() -> None:
    message = OutboundMessage(
        run_id=1, row=1, channel=Channel.SMS, recipient_key="c1", address="+12015550123",
        idempotency_key="k", content=SmsContent("hi", "GSM-7", 1), content_hash="h")
    with pytest.raises(TypeError):
        SendGridAdapter(api_key=KEY).build(message)


# --------------------------------------------------------------------------------------------
# Answers


@pytest.mark.parametrize(
    ("answer", "kind", "text"),
    [
        (errors(400, "The from email does not contain a valid address.", "from.email"),
         PermanentError, "from.email: The from email does not contain a valid address."),
        (errors(413, "Payload Too Large"), PermanentError, "Payload Too Large"),
        (errors(401, "The provided authorization grant is invalid, expired, or revoked"),
         ProviderAuthError, "The provided authorization grant is invalid, expired, or revoked"),
        (errors(403, "access forbidden"), ProviderAuthError, "access forbidden"),
        (errors(404, "not found"), PermanentError, "not found"),
        (errors(500, "internal error"), TransientError, "internal error"),
        (httpx.Response(502, text="<html>bad gateway</html>"), TransientError, "Bad Gateway"),
        (httpx.Response(503), TransientError, "Service Unavailable"),
        # A gateway that waited in vain for SendGrid, which may have queued the mail.
        (httpx.Response(504), InDoubtError, "Gateway Timeout"),
    ],
)
def test_error_mapping(answer: httpx.Response, kind: type[Exception], text: str) -> None:
    exc = failure(Recorder(answer))
    assert type(exc) is kind
    assert exc.text == text  # type: ignore[attr-defined]
    assert exc.status == answer.status_code  # type: ignore[attr-defined]
    assert exc.code == f"http_{answer.status_code}"  # type: ignore[attr-defined]
    assert KEY not in str(exc)


def test_an_answer_nested_deeper_than_the_json_parser_goes_is_read_as_unparsable() -> None:
    """json.loads raises RecursionError, not ValueError, on a body nested some thousands deep:
    a definite refusal then crashed the provider (the pipeline journals that in doubt and stops
    the run, exit 1)."""
    exc = failure(Recorder(httpx.Response(400, text='{"errors":' * 100_000)))
    assert type(exc) is PermanentError and exc.text == "Bad Request"


def test_too_many_requests_retry_after_seconds() -> None:
    exc = failure(Recorder(errors(429, "too many requests", headers={"Retry-After": "3"})))
    assert type(exc) is RateLimitedError and exc.retry_after == 3.0


def test_too_many_requests_retry_after_http_date() -> None:
    clock = FakeClock()
    when = email.utils.format_datetime(clock.now() + timedelta(seconds=45), usegmt=True)
    exc = failure(Recorder(errors(429, "too many requests", headers={"Retry-After": when})),
                  clock=clock)
    assert type(exc) is RateLimitedError and exc.retry_after == 45.0


def test_too_many_requests_rate_limit_reset() -> None:
    clock = FakeClock()
    reset = str(int(clock.now().timestamp()) + 20)
    exc = failure(Recorder(errors(429, "too many requests",
                                  headers={"X-RateLimit-Reset": reset})), clock=clock)
    assert type(exc) is RateLimitedError and exc.retry_after == 20.0


@pytest.mark.parametrize("reset", [b"\xb2", b"-1", b"12.5", b"later", b"9" * 400])
def test_too_many_requests_with_a_garbled_rate_limit_reset(reset: bytes) -> None:
    """A reset that is not epoch seconds is no hint; b"\\xb2" reads as "\u00b2", which passes
    str.isdigit but not int(), and crashed the parse (exit 1, the refused message in doubt).
    So did 400 digits: an int too large to subtract a float from (OverflowError)."""
    body = errors(429, "too many requests").content
    exc = failure(Recorder(httpx.Response(429, content=body,
                                          headers=[(b"X-RateLimit-Reset", reset)])))
    assert type(exc) is RateLimitedError and exc.retry_after is None


def test_too_many_requests_retry_after_date_out_of_range() -> None:
    """An HTTP date with a year past a C long raised OverflowError from the date parser, which
    crashed the parse (exit 1, the refused message in doubt): no hint, as other garbage is."""
    when = "Mon, 1 Jan 100000000000000000000 00:00:00 GMT"
    exc = failure(Recorder(errors(429, "too many requests", headers={"Retry-After": when})),
                  clock=FakeClock())
    assert type(exc) is RateLimitedError and exc.retry_after is None


def test_too_many_requests_without_hint() -> None:
    exc = failure(Recorder(httpx.Response(429)))
    assert type(exc) is RateLimitedError and exc.retry_after is None


def test_failure_before_sending_is_transient() -> None:
    assert type(failure(refuse_connection)) is TransientError


def test_timeout_after_sending_is_in_doubt() -> None:
    assert type(failure(withhold_answer)) is InDoubtError


def test_spec_copy_matches_shared() -> None:
    check_spec_copy(SPEC_FILE, "4ba24d0feb8a6b347f60528161d1cf0e7591987d2b3a64a6533685dc2b39d19f")


@pytest.mark.parametrize(
    ("sender", "expected"),
    [
        ("Shop, Inc. <news@shop.example.com>",
         {"email": "news@shop.example.com", "name": "Shop, Inc."}),
        ("Shop: News <news@shop.example.com>",
         {"email": "news@shop.example.com", "name": "Shop: News"}),
        ("Shop @ Home <news@shop.example.com>",
         {"email": "news@shop.example.com", "name": "Shop @ Home"}),
        ("Shop [UK]; Sales <news@shop.example.com>",
         {"email": "news@shop.example.com", "name": "Shop [UK]; Sales"}),
        ("Café, Ünï <news@shop.example.com>",
         {"email": "news@shop.example.com", "name": "Café, Ünï"}),
        ('"Sh\\"op" <news@shop.example.com>', {"email": "news@shop.example.com", "name": 'Sh"op'}),
        ("<news@shop.example.com>", {"email": "news@shop.example.com"}),
    ],
)
def test_sender_is_read_as_the_campaign_check_and_smtp_read_it(
        spec: OpenAPI, sender: str, expected: dict[str, str]) -> None:
    """The campaign check (format_mailbox) accepts a display name with specials unquoted, and
    SMTP quotes it; SendGrid's adapter read it with email.utils.parseaddr instead, which
    splits at the comma or colon: "Shop, Inc. <news@...>" became the address "Shop" (every
    message refused before sending: the whole list dead-lettered), "Shop @ Home <...>" the
    address "Shop@Home" (sent, and refused by SendGrid), "Shop: News" the name "News"."""
    from campaign_cli.render.email import format_mailbox

    format_mailbox(sender, "From")  # what `campaign check` accepts
    rec = Recorder()
    send(provider(rec), mail(sender=sender, reply_to=sender))
    body = validate(spec, rec.requests[0])
    assert body["from"] == expected
    assert body["reply_to"] == expected
