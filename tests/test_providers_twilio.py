"""The Twilio adapter: request shape and auth, every error code of PROVIDERS.md section 1, and every
request it builds checked against Twilio's OpenAPI spec (openapi-core)."""

from __future__ import annotations

import asyncio
import base64
import email.utils
import json
from datetime import timedelta
from typing import Any
from urllib.parse import parse_qsl

import httpx
import pytest
from openapi_core import Config, OpenAPI
from openapi_core.testing import MockRequest

from campaign_cli.config import TwilioProviderConfig
from campaign_cli.errors import (
    InDoubtError,
    PermanentError,
    ProviderAuthError,
    RateLimitedError,
    TransientError,
)
from campaign_cli.models import Channel, EmailContent, OutboundMessage, SendResult, SmsContent
from campaign_cli.providers.base import default_registry
from campaign_cli.providers.twilio import TwilioAdapter, TwilioProvider
from campaign_cli.testing import FakeClock
from tests import http_support
from tests.http_support import SPECS, check_spec_copy, refuse_connection, withhold_answer

SPEC_FILE = "twilio_api_v2010.json"
SPEC_SERVER = "https://api.twilio.com"

ACCOUNT = "AC" + "0123456789abcdef" * 2
API_KEY = "SK" + "fedcba9876543210" * 2
SERVICE = "MG" + "00112233445566778899aabbccddeeff"
TOKEN = "s3cr3t-auth-token"
SENDER = "+12015550100"


@pytest.fixture(scope="module")
def spec() -> OpenAPI:
    data = json.loads((SPECS / SPEC_FILE).read_text(encoding="utf-8"))
    return OpenAPI.from_dict(data, config=Config(spec_validator_cls=None))


def validate(spec: OpenAPI, request: httpx.Request) -> dict[str, Any]:
    """Unmarshal the request with the spec (whatever its base_url: the path is what Twilio sees);
    returns the typed body."""
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


def sms(body: str = "Hello Ann, reply STOP to opt out", address: str = "+12015550123",
        row: int = 7) -> OutboundMessage:
    return OutboundMessage(
        run_id=3, row=row, channel=Channel.SMS, recipient_key=f"c{row}", address=address,
        idempotency_key=f"key-{row}", content=SmsContent(body, "GSM-7", 1), content_hash="h",
    )


def config(**extra: Any) -> TwilioProviderConfig:
    data: dict[str, Any] = {"type": "twilio", "account_sid": ACCOUNT, "auth_token": TOKEN}
    if "messaging_service_sid" not in extra:
        data["from"] = SENDER
    data.update(extra)
    return TwilioProviderConfig.model_validate(data)


Handler = http_support.Handler


class Recorder(http_support.Recorder):
    def default(self) -> httpx.Response:
        return created()



def created(sid: str = "SM" + "a" * 32) -> httpx.Response:
    return httpx.Response(201, json={"sid": sid, "status": "queued", "num_segments": "1",
                                     "error_code": None, "price": None})


def error(status: int, code: int | None, message: str = "boom",
          headers: dict[str, str] | None = None) -> httpx.Response:
    payload: dict[str, Any] = {"message": message, "more_info": "https://www.twilio.com/docs/errors",
                               "status": status}
    if code is not None:
        payload["code"] = code
    return httpx.Response(status, json=payload, headers=headers)


def provider(handler: Handler, clock: FakeClock | None = None, **extra: Any) -> TwilioProvider:
    context = http_support.mock_context(handler, clock)
    return TwilioProvider.from_config("tw", config(**extra), context)


def send(p: TwilioProvider, message: OutboundMessage) -> SendResult:
    return http_support.send_once(p, message)


def failure(handler: Handler, message: OutboundMessage | None = None,
            clock: FakeClock | None = None) -> Exception:
    with pytest.raises(Exception) as info:
        send(provider(handler, clock), message or sms())
    return info.value  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# Request shape


def test_send_posts_the_form_with_basic_auth(spec: OpenAPI) -> None:
    rec = Recorder()
    result = send(provider(rec, status_callback="https://hooks.example.com/twilio"), sms())
    assert result == SendResult(provider_message_id="SM" + "a" * 32, status_code=201,
                                detail="queued", segments=1)
    (request,) = rec.requests
    assert request.method == "POST"
    assert str(request.url) == f"https://api.twilio.com/2010-04-01/Accounts/{ACCOUNT}/Messages.json"
    assert request.headers["content-type"] == "application/x-www-form-urlencoded"
    scheme, _, encoded = request.headers["authorization"].partition(" ")
    assert scheme == "Basic"
    assert base64.b64decode(encoded).decode() == f"{ACCOUNT}:{TOKEN}"
    form = parse_qsl(request.content.decode(), strict_parsing=True)
    assert form == [("To", "+12015550123"), ("From", SENDER),
                    ("StatusCallback", "https://hooks.example.com/twilio"),
                    ("Body", "Hello Ann, reply STOP to opt out")]
    body = validate(spec, request)
    assert body["To"] == "+12015550123" and body["From"] == SENDER


def test_messaging_service_and_api_key(spec: OpenAPI) -> None:
    rec = Recorder()
    send(provider(rec, messaging_service_sid=SERVICE, api_key_sid=API_KEY), sms())
    (request,) = rec.requests
    form = dict(parse_qsl(request.content.decode()))
    assert form == {"To": "+12015550123", "MessagingServiceSid": SERVICE,
                    "Body": "Hello Ann, reply STOP to opt out"}
    # An API key authenticates as itself; the URL still names the account.
    assert base64.b64decode(request.headers["authorization"][6:]).decode() == f"{API_KEY}:{TOKEN}"
    assert f"/Accounts/{ACCOUNT}/" in request.url.path
    assert validate(spec, request)["MessagingServiceSid"] == SERVICE


@pytest.mark.parametrize("body", [
    "Grüße & Küsse = ❤️ 100% sure? a+b",
    "line one\nline two\r\nthree",
    "x" * 1600,
])
def test_any_body_survives_form_encoding(spec: OpenAPI, body: str) -> None:
    rec = Recorder()
    send(provider(rec), sms(body))
    form = dict(parse_qsl(rec.requests[0].content.decode(), strict_parsing=True))
    assert form["Body"] == body
    assert validate(spec, rec.requests[0])["Body"] == body


def test_base_url_is_configurable(spec: OpenAPI) -> None:
    rec = Recorder()
    send(provider(rec, base_url="http://127.0.0.1:8080/"), sms())
    url = str(rec.requests[0].url)
    assert url == f"http://127.0.0.1:8080/2010-04-01/Accounts/{ACCOUNT}/Messages.json"
    validate(spec, rec.requests[0])


def test_the_validator_can_fail(spec: OpenAPI) -> None:
    """The spec check is not vacuous: a request without auth, or without To, is refused."""
    good = TwilioAdapter(account_sid=ACCOUNT, auth_token=TOKEN, sender=SENDER).build(sms())
    no_auth = httpx.Request("POST", good.url, content=good.content,
                            headers={"Content-Type": "application/x-www-form-urlencoded"})
    no_to = httpx.Request("POST", good.url, content=b"From=%2B12015550100&Body=hi",
                          headers=dict(good.headers))
    bad_account = httpx.Request("POST", str(good.url).replace(ACCOUNT, "AC123"),
                                content=good.content, headers=dict(good.headers))
    for request in (no_auth, no_to, bad_account):
        with pytest.raises(AssertionError):
            validate(spec, request)


def test_provider_facts() -> None:
    p = provider(Recorder())
    assert p.name == "tw"
    assert p.channels == frozenset({Channel.SMS})
    assert p.deduplicates is False  # Twilio has no idempotency key for messages
    asyncio.run(p.aclose())


def test_registered_in_the_default_registry() -> None:
    context = http_support.mock_context(Recorder())
    p = default_registry().create("tw", config(), context)
    assert isinstance(p, TwilioProvider)
    asyncio.run(p.aclose())


def test_only_sms() -> None:
    message = OutboundMessage(
        run_id=1, row=1, channel=Channel.EMAIL, recipient_key="c1", address="a@example.com",
        idempotency_key="k", content=EmailContent("s", "t", None, "a@example.com"),
        content_hash="h")
    adapter = TwilioAdapter(account_sid=ACCOUNT, auth_token=TOKEN, sender=SENDER)
    with pytest.raises(TypeError):
        adapter.build(message)


def test_exactly_one_sender() -> None:
    with pytest.raises(ValueError):
        TwilioAdapter(account_sid=ACCOUNT, auth_token=TOKEN)
    with pytest.raises(ValueError):
        TwilioAdapter(account_sid=ACCOUNT, auth_token=TOKEN, sender=SENDER,
                      messaging_service_sid=SERVICE)


# --------------------------------------------------------------------------------------------
# Answers


@pytest.mark.parametrize(
    ("answer", "kind", "code", "action"),
    [
        (error(401, 20003, "Authenticate"), ProviderAuthError, "20003", None),
        (error(400, 21610, "Attempt to send to unsubscribed recipient"), PermanentError,
         "21610", "suppress"),
        (error(400, 21211, "Invalid 'To' Phone Number"), PermanentError, "21211", "invalid"),
        (error(400, 21614, "'To' number is not a valid mobile number"), PermanentError,
         "21614", "invalid"),
        (error(400, 21408, "Permission to send an SMS has not been enabled"), PermanentError,
         "21408", None),
        (error(400, 21606, "The From phone number is not a valid, SMS-capable number"),
         PermanentError, "21606", None),
        (error(400, 21999, "some new 21xxx code"), PermanentError, "21999", None),
        (error(404, 20404, "The requested resource was not found"), PermanentError, "20404", None),
        (error(400, None, "Bad request"), PermanentError, None, None),
        (httpx.Response(403, text="Forbidden"), ProviderAuthError, None, None),
        (error(500, 20500, "Internal Server Error"), TransientError, "20500", None),
        (httpx.Response(502, text="<html>Bad Gateway</html>"), TransientError, None, None),
        (httpx.Response(503), TransientError, None, None),
        (error(408, None, "Request Timeout"), TransientError, None, None),
        # A gateway that waited in vain for Twilio, which may have created the message.
        (httpx.Response(504, text="<html>Gateway Time-out</html>"), InDoubtError, None, None),
    ],
)
def test_error_mapping(answer: httpx.Response, kind: type[Exception], code: str | None,
                       action: str | None) -> None:
    exc = failure(Recorder(answer))
    assert type(exc) is kind
    assert exc.code == code  # type: ignore[attr-defined]
    assert exc.status == answer.status_code  # type: ignore[attr-defined]
    if isinstance(exc, PermanentError):
        assert exc.action == action
    assert TOKEN not in str(exc)


def test_an_answer_nested_deeper_than_the_json_parser_goes_is_read_as_unparsable() -> None:
    """json.loads raises RecursionError, not ValueError, on a body nested some thousands deep:
    a message Twilio had accepted (201) then crashed its provider, which the pipeline journals
    in doubt before it stops the whole run (exit 1)."""
    nested = "[" * 100_000
    assert send(provider(Recorder(httpx.Response(201, text=nested))), sms()) == SendResult(
        status_code=201)
    exc = failure(Recorder(httpx.Response(400, text='{"code":' * 100_000)))
    assert type(exc) is PermanentError and exc.status == 400


def test_error_text_is_twilios_message() -> None:
    exc = failure(Recorder(error(400, 21610, "Attempt to send to unsubscribed recipient")))
    assert isinstance(exc, PermanentError)
    assert exc.text == "Attempt to send to unsubscribed recipient"


def test_too_many_requests_with_retry_after_seconds() -> None:
    exc = failure(Recorder(error(429, 20429, "Too Many Requests", {"Retry-After": "7"})))
    assert type(exc) is RateLimitedError
    assert exc.code == "20429" and exc.retry_after == 7.0


def test_too_many_requests_with_retry_after_http_date() -> None:
    clock = FakeClock()
    when = email.utils.format_datetime(clock.now() + timedelta(seconds=90), usegmt=True)
    exc = failure(Recorder(error(429, None, "Too Many Requests", {"Retry-After": when})),
                  clock=clock)
    assert type(exc) is RateLimitedError
    assert exc.retry_after == 90.0  # measured from the run's clock, not the wall clock


def test_too_many_requests_without_retry_after() -> None:
    exc = failure(Recorder(error(429, 20429, "Too Many Requests")))
    assert type(exc) is RateLimitedError
    assert exc.retry_after is None


@pytest.mark.parametrize("value", [b"\xb2", b"\xb9\xb3", b"-5", b"1.5", b"soon", b"",
                                   b"Mon, 1 Jan 100000000000000000000 00:00:00 GMT"])
def test_a_retry_after_that_is_not_delta_seconds_or_a_date_is_ignored(value: bytes) -> None:
    """Garbage is no hint (the backoff's own jitter applies). b"\\xb2" reads as "\u00b2" (httpx
    decodes such a header as latin-1), which passes str.isdigit but not float(): it crashed the
    parse with a ValueError, which stopped the run with exit 1 and left a message Twilio had
    refused in doubt. An HTTP date whose year does not fit a C long raised OverflowError from
    the date parser, to the same effect."""
    answer = error(429, 20429, "Too Many Requests")
    answer = httpx.Response(429, content=answer.content,
                            headers=[(b"Content-Type", b"application/json"),
                                     (b"Retry-After", value)])
    exc = failure(Recorder(answer))
    assert type(exc) is RateLimitedError
    assert exc.code == "20429" and exc.retry_after is None


def test_a_twilio_code_that_is_not_a_number_is_no_code() -> None:
    answer = httpx.Response(400, json={"code": "\u00b2", "message": "odd", "status": 400})
    exc = failure(Recorder(answer))
    assert type(exc) is PermanentError and exc.code is None


def test_queue_full_retries_later() -> None:
    exc = failure(Recorder(error(400, 21611, "This 'From' number has exceeded the maximum "
                                             "number of queued messages")))
    assert type(exc) is RateLimitedError
    assert exc.code == "21611" and exc.retry_after == 60.0
    exc = failure(Recorder(error(400, 21611, "queue full", {"Retry-After": "300"})))
    assert type(exc) is RateLimitedError and exc.retry_after == 300.0


def test_server_error_keeps_retry_after() -> None:
    exc = failure(Recorder(httpx.Response(503, headers={"Retry-After": "12"})))
    assert type(exc) is TransientError and exc.retry_after == 12.0


def test_accepted_without_json_still_succeeds() -> None:
    result = send(provider(Recorder(httpx.Response(201, text="ok"))), sms())
    assert result.status_code == 201 and result.provider_message_id is None


@pytest.mark.parametrize(("num_segments", "segments"), [
    ("3", 3), (2, 2), (None, None), ("", None), ("many", None), ("0", None), (True, None),
    ("1000", None),
])
def test_the_segments_twilio_counts_are_read_from_its_answer(num_segments: object,
                                                             segments: int | None) -> None:
    """Twilio bills the segments it counts (`num_segments`, a string in its Message resource);
    the run records that cost when it differs from its own count. Anything that is not a
    plausible count is no count."""
    answer = httpx.Response(201, json={"sid": "SM" + "b" * 32, "status": "queued",
                                       "num_segments": num_segments})
    assert send(provider(Recorder(answer)), sms()).segments == segments


# --------------------------------------------------------------------------------------------
# Transport failures


def test_failure_before_sending_is_transient() -> None:
    assert type(failure(refuse_connection)) is TransientError


def test_timeout_after_sending_is_in_doubt() -> None:
    assert type(failure(withhold_answer)) is InDoubtError


# --------------------------------------------------------------------------------------------
# The spec copy


def test_spec_copy_matches_shared() -> None:
    check_spec_copy(SPEC_FILE, "99cae87a6bb1725f71363364cbd30282a13140374b2d5f9bdd5bdfa5d4c8a6d7")
