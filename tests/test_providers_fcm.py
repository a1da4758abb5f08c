"""The FCM provider through httpx.MockTransport: request shape, OAuth token fetch from a service
account (JWT-bearer grant), caching and refresh, and every error mapping."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from campaign_cli.config import FcmProviderConfig
from campaign_cli.errors import (
    ConfigError,
    InDoubtError,
    PermanentError,
    ProviderAuthError,
    ProviderError,
    RateLimitedError,
    TransientError,
)
from campaign_cli.models import Channel, OutboundMessage, PushContent, SendResult
from campaign_cli.providers.base import ProviderContext, default_registry
from campaign_cli.providers.fcm import (
    FCM_SCOPE,
    JWT_BEARER_GRANT,
    FcmProvider,
    ServiceAccountTokens,
)
from campaign_cli.testing import FakeClock
from tests import http_support

FCM = "https://fcm.test"
TOKEN_URL = "https://oauth.test/token"
SEND_URL = f"{FCM}/v1/projects/demo-proj/messages:send"
DEVICE = "dEvIcE-tOkEn_0123456789:abc"

Answer = httpx.Response | Callable[[httpx.Request], Awaitable[httpx.Response]]


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def sa_file(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> Path:
    pem = rsa_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    path = tmp_path / "service-account.json"
    path.write_text(json.dumps({
        "type": "service_account",
        "project_id": "demo-proj",
        "private_key_id": "key-id-1",
        "private_key": pem,
        "client_email": "sender@demo-proj.iam.gserviceaccount.com",
        "token_uri": "https://file-token-uri.test/token",
    }))
    return path


@dataclass
class FakeGoogle:
    """Serves the token endpoint and FCM; records every request; answers from queues, else OK."""

    fcm_answers: list[httpx.Response] = field(default_factory=list)
    token_answers: list[httpx.Response] = field(default_factory=list)
    fcm_requests: list[httpx.Request] = field(default_factory=list)
    token_requests: list[httpx.Request] = field(default_factory=list)
    issued: list[str] = field(default_factory=list)
    token_delay_steps: int = 0
    expires_in: Any = 3600

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        if str(request.url).startswith(TOKEN_URL) or "token" in request.url.host:
            self.token_requests.append(request)
            for _ in range(self.token_delay_steps):
                await asyncio.sleep(0)  # let other senders run while the token is on its way
            if self.token_answers:
                return self.token_answers.pop(0)
            token = f"ya29.token-{len(self.token_requests)}"
            self.issued.append(token)
            return httpx.Response(200, json={"access_token": token, "expires_in": self.expires_in,
                                             "token_type": "Bearer"})
        assert str(request.url) == SEND_URL
        self.fcm_requests.append(request)
        if self.fcm_answers:
            return self.fcm_answers.pop(0)
        return httpx.Response(200, json={"name": f"projects/demo-proj/messages/{len(self.fcm_requests)}"})


def message(**changes: Any) -> OutboundMessage:
    base = OutboundMessage(
        run_id=1, row=1, channel=Channel.PUSH, recipient_key="c1", address=DEVICE,
        idempotency_key="key-1",
        content=PushContent(title="Sale", body="Fifty percent off, Ann", data={"sku": "42"}),
        content_hash="h",
    )
    return replace(base, **changes)


def provider(fake: FakeGoogle, clock: FakeClock, **config: Any) -> FcmProvider:
    settings: dict[str, Any] = {"type": "fcm", "project_id": "demo-proj", "base_url": FCM}
    settings.update(config)
    context = http_support.mock_context(fake, clock)
    created = default_registry().create("push", FcmProviderConfig.model_validate(settings), context)
    assert isinstance(created, FcmProvider)
    return created


def static(fake: FakeGoogle, clock: FakeClock | None = None) -> FcmProvider:
    return provider(fake, clock or FakeClock(), access_token="static-token")


def sa(fake: FakeGoogle, clock: FakeClock, sa_file: Path) -> FcmProvider:
    return provider(fake, clock, service_account_file=str(sa_file), token_url=TOKEN_URL)


def run(p: FcmProvider, *messages: OutboundMessage) -> list[SendResult]:
    return http_support.send_all(p, *messages)


def failure(p: FcmProvider, msg: OutboundMessage | None = None) -> ProviderError:
    with pytest.raises(ProviderError) as info:
        run(p, msg or message())
    return info.value


def fcm_error(status: int, name: str, text: str, error_code: str | None = None,
              violations: tuple[str, ...] = (),
              headers: dict[str, str] | None = None) -> httpx.Response:
    details: list[dict[str, Any]] = []
    if error_code:
        details.append({"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
                        "errorCode": error_code})
    if violations:
        details.append({"@type": "type.googleapis.com/google.rpc.BadRequest",
                        "fieldViolations": [{"field": f, "description": "bad"} for f in violations]})
    return httpx.Response(status, headers=headers, json={
        "error": {"code": status, "message": text, "status": name, "details": details}})


# --------------------------------------------------------------------------------------------
# Request shape


def test_request_shape_with_a_static_token() -> None:
    fake = FakeGoogle()
    [result] = run(static(fake), message())
    assert result == SendResult(provider_message_id="projects/demo-proj/messages/1", status_code=200)
    [request] = fake.fcm_requests
    assert request.method == "POST"
    assert str(request.url) == SEND_URL
    assert request.headers["authorization"] == "Bearer static-token"
    assert request.headers["content-type"].startswith("application/json")
    assert json.loads(request.content) == {"message": {
        "token": DEVICE,
        "notification": {"title": "Sale", "body": "Fifty percent off, Ann"},
        "data": {"sku": "42"},
    }}
    assert fake.token_requests == []


def test_empty_title_and_data_are_left_out() -> None:
    fake = FakeGoogle()
    run(static(fake), message(content=PushContent(title="", body="Just a body")))
    body = json.loads(fake.fcm_requests[0].content)
    assert body == {"message": {"token": DEVICE, "notification": {"body": "Just a body"}}}


def test_default_base_url_is_googles() -> None:
    fake_urls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        fake_urls.append(str(request.url))
        return httpx.Response(200, json={"name": "projects/p/messages/1"})

    config = FcmProviderConfig.model_validate({"type": "fcm", "project_id": "p", "access_token": "t"})
    context = http_support.mock_context(handler, run_name="r")
    p = FcmProvider.from_config("push", config, context)
    run(p, message())
    assert fake_urls == ["https://fcm.googleapis.com/v1/projects/p/messages:send"]
    assert p.channels == frozenset({Channel.PUSH}) and p.deduplicates is False


# --------------------------------------------------------------------------------------------
# Tokens from a service account


def test_service_account_token_is_fetched_with_a_signed_assertion(
    sa_file: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    fake, clock = FakeGoogle(), FakeClock()
    run(sa(fake, clock, sa_file), message(), message(row=2))
    [token_request] = fake.token_requests
    assert str(token_request.url) == TOKEN_URL
    assert token_request.headers["content-type"] == "application/x-www-form-urlencoded"
    form = parse_qs(token_request.content.decode())
    assert form["grant_type"] == [JWT_BEARER_GRANT]
    [assertion] = form["assertion"]
    assert jwt.get_unverified_header(assertion) == {"alg": "RS256", "typ": "JWT", "kid": "key-id-1"}
    claims = jwt.decode(assertion, rsa_key.public_key(), algorithms=["RS256"], audience=TOKEN_URL,
                        options={"verify_exp": False, "verify_iat": False})
    now = int(clock.now().timestamp())
    assert claims == {"iss": "sender@demo-proj.iam.gserviceaccount.com", "scope": FCM_SCOPE,
                      "aud": TOKEN_URL, "iat": now, "exp": now + 3600}
    assert [r.headers["authorization"] for r in fake.fcm_requests] == ["Bearer ya29.token-1"] * 2


def test_a_forged_assertion_would_not_verify(sa_file: Path) -> None:
    """The claim check above is real: another key does not verify the assertion."""
    fake = FakeGoogle()
    run(sa(fake, FakeClock(), sa_file), message())
    assertion = parse_qs(fake.token_requests[0].content.decode())["assertion"][0]
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(assertion, other.public_key(), algorithms=["RS256"], audience=TOKEN_URL,
                   options={"verify_exp": False, "verify_iat": False})


def test_token_is_cached_until_a_minute_before_expiry(sa_file: Path) -> None:
    fake, clock = FakeGoogle(expires_in=600), FakeClock()
    p = sa(fake, clock, sa_file)

    async def go() -> None:
        await p.send(message())
        clock.advance(600 - 61)
        await p.send(message())
        assert len(fake.token_requests) == 1
        clock.advance(2)  # now within the last minute: refresh first
        await p.send(message())
        await p.aclose()

    asyncio.run(go())
    assert len(fake.token_requests) == 2
    assert [r.headers["authorization"] for r in fake.fcm_requests] == [
        "Bearer ya29.token-1", "Bearer ya29.token-1", "Bearer ya29.token-2"]


@pytest.mark.parametrize("expires_in", [10**400, "NaN"])
def test_a_token_lifetime_that_is_no_number_of_seconds_is_taken_as_the_default(
    sa_file: Path, expires_in: Any
) -> None:
    """``expires_in`` of 400 digits (a JSON integer) made float() raise OverflowError, which
    was not caught: the token fetch crashed the send (the pipeline stops the run, exit 1).
    "NaN" read as a lifetime of nothing: a token fetched for every message. Unreadable as a
    lifetime, it is the assertion's, as a string one is."""
    fake, clock = FakeGoogle(expires_in=expires_in), FakeClock()
    p = sa(fake, clock, sa_file)

    async def go() -> None:
        await p.send(message())
        clock.advance(3600 - 61)
        await p.send(message())
        assert len(fake.token_requests) == 1
        clock.advance(2)
        await p.send(message())
        await p.aclose()

    asyncio.run(go())
    assert len(fake.token_requests) == 2


def test_concurrent_senders_share_one_refresh(sa_file: Path) -> None:
    fake, clock = FakeGoogle(token_delay_steps=5), FakeClock()
    p = sa(fake, clock, sa_file)

    async def go() -> list[SendResult]:
        try:
            return await asyncio.gather(*(p.send(message(row=i)) for i in range(20)))
        finally:
            await p.aclose()

    results = asyncio.run(go())
    assert len(results) == 20
    assert len(fake.token_requests) == 1
    assert {r.headers["authorization"] for r in fake.fcm_requests} == {"Bearer ya29.token-1"}


def test_a_401_refreshes_the_token_once_and_retries(sa_file: Path) -> None:
    fake, clock = FakeGoogle(), FakeClock()
    fake.fcm_answers.append(fcm_error(401, "UNAUTHENTICATED", "Request had invalid credentials."))
    [result] = run(sa(fake, clock, sa_file), message())
    assert result.provider_message_id == "projects/demo-proj/messages/2"
    assert len(fake.token_requests) == 2
    assert [r.headers["authorization"] for r in fake.fcm_requests] == [
        "Bearer ya29.token-1", "Bearer ya29.token-2"]
    assert fake.fcm_requests[0].content == fake.fcm_requests[1].content


def test_a_second_401_is_an_auth_error(sa_file: Path) -> None:
    fake = FakeGoogle()
    fake.fcm_answers += [fcm_error(401, "UNAUTHENTICATED", "invalid credentials")] * 2
    exc = failure(sa(fake, FakeClock(), sa_file))
    assert isinstance(exc, ProviderAuthError)
    assert exc.status == 401 and exc.code == "UNAUTHENTICATED"
    assert len(fake.fcm_requests) == 2 and len(fake.token_requests) == 2


def test_a_401_with_a_static_token_is_an_auth_error_at_once() -> None:
    fake = FakeGoogle()
    fake.fcm_answers.append(fcm_error(401, "UNAUTHENTICATED", "invalid credentials"))
    assert isinstance(failure(static(fake)), ProviderAuthError)
    assert len(fake.fcm_requests) == 1


def test_refresh_keeps_a_newer_token(sa_file: Path) -> None:
    """invalidate() only forgets the token that was refused, not one fetched since."""
    fake, clock = FakeGoogle(), FakeClock()
    p = sa(fake, clock, sa_file)
    assert isinstance(p.tokens, ServiceAccountTokens)
    tokens = p.tokens

    async def go() -> None:
        first = await tokens.token()
        tokens.invalidate(first)
        second = await tokens.token()
        tokens.invalidate(first)  # a late 401 for the old token
        assert await tokens.token() == second
        await p.aclose()

    asyncio.run(go())
    assert tokens.fetches == 2


@pytest.mark.parametrize("status", [400, 401, 403])
def test_token_endpoint_refusal_is_an_auth_error(sa_file: Path, status: int) -> None:
    fake = FakeGoogle()
    fake.token_answers.append(httpx.Response(status, json={
        "error": "invalid_grant", "error_description": "Invalid JWT Signature."}))
    exc = failure(sa(fake, FakeClock(), sa_file))
    assert isinstance(exc, ProviderAuthError)
    assert exc.code == "invalid_grant" and exc.status == status
    assert "Invalid JWT Signature." in exc.text
    assert "PRIVATE KEY" not in str(exc) and "assertion" not in str(exc)
    assert fake.fcm_requests == []


@pytest.mark.parametrize("token", ["ya29.a0Zq\u200b9x", "ya29.a0Zq\x019x", "ya29.a0Zq 9x\r\nX: y"])
def test_a_token_no_header_can_carry_is_the_token_endpoint_s_refusal(
    sa_file: Path, token: str
) -> None:
    """The token endpoint's answer comes over the network (a proxy, a broken or hostile
    endpoint at a configured token_url). An access_token with a non-ASCII or control character
    made every push fail inside httpx or aiohttp (UnicodeEncodeError, ValueError): no provider's
    answer, so the message was left in doubt though nothing left, and the run stopped with exit
    1. It is an unusable answer from the token endpoint: an auth error (exit 6, rows pending),
    before any message is sent."""
    fake = FakeGoogle()
    fake.token_answers.append(httpx.Response(200, json={"access_token": token,
                                                        "expires_in": 3600}))
    exc = failure(sa(fake, FakeClock(), sa_file))
    assert isinstance(exc, ProviderAuthError)
    assert "a0Zq" not in str(exc)
    assert fake.fcm_requests == []


def test_token_endpoint_outage_is_transient_and_retried_later(sa_file: Path) -> None:
    fake, clock = FakeGoogle(), FakeClock()
    fake.token_answers.append(httpx.Response(503, headers={"Retry-After": "4"}, text="busy"))
    p = sa(fake, clock, sa_file)

    async def go() -> None:
        with pytest.raises(TransientError) as info:
            await p.send(message())
        assert not isinstance(info.value, RateLimitedError)
        assert info.value.retry_after == 4.0
        await p.send(message())  # the next attempt fetches again
        await p.aclose()

    asyncio.run(go())
    assert len(fake.token_requests) == 2 and len(fake.fcm_requests) == 1


def test_token_endpoint_timeout_is_transient_not_in_doubt(sa_file: Path) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    context = http_support.mock_context(handler, run_name="r")
    config = FcmProviderConfig.model_validate({
        "type": "fcm", "project_id": "demo-proj", "service_account_file": str(sa_file),
        "token_url": TOKEN_URL})
    exc = failure(FcmProvider.from_config("push", config, context))
    assert type(exc) is TransientError
    assert exc.code == "token_no_response"


def test_token_uri_from_the_key_file_when_the_config_names_none(sa_file: Path) -> None:
    urls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        urls.append(str(request.url))
        if "token" in request.url.host:
            return httpx.Response(200, json={"access_token": "t", "expires_in": 3600})
        return httpx.Response(200, json={"name": "n"})

    config = FcmProviderConfig.model_validate({
        "type": "fcm", "project_id": "demo-proj", "service_account_file": str(sa_file)})
    context = http_support.mock_context(handler, run_name="r")
    run(FcmProvider.from_config("push", config, context), message())
    assert urls[0] == "https://file-token-uri.test/token"


@pytest.mark.parametrize("content, complaint", [
    ("not json", "not JSON"),
    ("[]", "not a JSON object"),
    ('{"private_key": "x"}', "no client_email"),
    ('{"client_email": "a@b", "private_key": "-----BEGIN PRIVATE KEY-----\\nnope\\n"}',
     "not an unencrypted PEM private key"),
])
def test_a_bad_key_file_is_a_config_error(tmp_path: Path, content: str, complaint: str) -> None:
    path = tmp_path / "sa.json"
    path.write_text(content)
    config = FcmProviderConfig.model_validate({
        "type": "fcm", "project_id": "p", "service_account_file": str(path)})
    context = ProviderContext(clock=FakeClock(), run_name="r")
    with pytest.raises(ConfigError) as info:
        FcmProvider.from_config("push", config, context)
    assert complaint in str(info.value)
    assert "nope" not in str(info.value)


# --------------------------------------------------------------------------------------------
# Error mapping


TOKEN_INVALID = "The registration token is not a valid FCM registration token"


@pytest.mark.parametrize("answer, kind, code, action", [
    (fcm_error(404, "NOT_FOUND", "Requested entity was not found.", "UNREGISTERED"),
     PermanentError, "UNREGISTERED", "suppress"),
    (fcm_error(400, "INVALID_ARGUMENT", "Invalid registration", "INVALID_ARGUMENT",
               ("message.token",)),
     PermanentError, "INVALID_ARGUMENT", "suppress"),
    (fcm_error(400, "INVALID_ARGUMENT", TOKEN_INVALID, "INVALID_ARGUMENT"),
     PermanentError, "INVALID_ARGUMENT", "suppress"),
    (fcm_error(400, "INVALID_ARGUMENT", "Invalid value at 'message.data[0].value'",
               "INVALID_ARGUMENT", ("message.data[0].value",)),
     PermanentError, "INVALID_ARGUMENT", None),
    (fcm_error(403, "PERMISSION_DENIED", "SenderId mismatch", "SENDER_ID_MISMATCH"),
     PermanentError, "SENDER_ID_MISMATCH", "suppress"),
    (fcm_error(401, "UNAUTHENTICATED", "Auth error from APNS or Web Push Service",
               "THIRD_PARTY_AUTH_ERROR"),
     ProviderAuthError, "THIRD_PARTY_AUTH_ERROR", None),
    (fcm_error(403, "PERMISSION_DENIED", "Permission 'cloudmessaging.messages.create' denied"),
     ProviderAuthError, "PERMISSION_DENIED", None),
    (httpx.Response(404, text="<html>Not Found</html>"), ProviderAuthError, "http_404", None),
    (fcm_error(503, "UNAVAILABLE", "The service is currently unavailable.", "UNAVAILABLE"),
     TransientError, "UNAVAILABLE", None),
    (fcm_error(500, "INTERNAL", "Internal error encountered.", "INTERNAL"),
     TransientError, "INTERNAL", None),
    (httpx.Response(502, text="<html>Bad Gateway</html>"), TransientError, "http_502", None),
    # google.rpc DEADLINE_EXCEEDED: "may be returned even if the operation has completed".
    (fcm_error(504, "DEADLINE_EXCEEDED", "Deadline expired before operation could complete."),
     InDoubtError, "DEADLINE_EXCEEDED", None),
    (httpx.Response(504, text="<html>Gateway Timeout</html>"), InDoubtError, "http_504", None),
    (httpx.Response(302, headers={"location": "https://elsewhere.test/"}),
     PermanentError, "http_302", None),
])
def test_error_mapping(answer: httpx.Response, kind: type[ProviderError], code: str,
                       action: str | None) -> None:
    fake = FakeGoogle(fcm_answers=[answer])
    exc = failure(static(fake))
    assert type(exc) is kind
    assert exc.code == code
    assert exc.status == answer.status_code
    if isinstance(exc, PermanentError):
        assert exc.action == action


def test_an_answer_nested_deeper_than_the_json_parser_goes_is_read_as_unparsable() -> None:
    """json.loads raises RecursionError, not ValueError, on a body nested some thousands deep:
    a push FCM had accepted (200) then crashed its provider, which the pipeline journals in
    doubt before it stops the whole run (exit 1)."""
    fake = FakeGoogle(fcm_answers=[httpx.Response(200, text="[" * 100_000),
                                   httpx.Response(503, text='{"error":' * 100_000)])
    assert run(static(fake), message()) == [SendResult(status_code=200)]
    assert type(failure(static(fake))) is TransientError


def test_quota_exceeded_is_rate_limited_with_retry_after() -> None:
    fake = FakeGoogle(fcm_answers=[fcm_error(
        429, "RESOURCE_EXHAUSTED", "Quota exceeded", "QUOTA_EXCEEDED", headers={"Retry-After": "7"})])
    exc = failure(static(fake))
    assert isinstance(exc, RateLimitedError)
    assert exc.code == "QUOTA_EXCEEDED" and exc.retry_after == 7.0


def test_retry_after_as_a_date_is_read_on_the_run_clock() -> None:
    clock = FakeClock()  # 2026-01-01T00:00:00Z
    fake = FakeGoogle(fcm_answers=[fcm_error(
        503, "UNAVAILABLE", "down", "UNAVAILABLE",
        headers={"Retry-After": "Thu, 01 Jan 2026 00:00:30 GMT"})])
    exc = failure(static(fake, clock))
    assert isinstance(exc, TransientError) and exc.retry_after == 30.0


@pytest.mark.parametrize("error, kind", [
    (httpx.ConnectError("connection refused"), TransientError),
    (httpx.ReadTimeout("timed out"), InDoubtError),
])
def test_transport_failures(error: httpx.HTTPError, kind: type[ProviderError]) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise error

    config = FcmProviderConfig.model_validate({"type": "fcm", "project_id": "p", "access_token": "t"})
    context = http_support.mock_context(handler, run_name="r")
    assert type(failure(FcmProvider.from_config("push", config, context))) is kind


def test_an_error_never_shows_the_token() -> None:
    fake = FakeGoogle(fcm_answers=[fcm_error(403, "PERMISSION_DENIED", "denied")])
    assert "static-token" not in str(failure(static(fake)))
