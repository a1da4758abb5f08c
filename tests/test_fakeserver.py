"""The fake provider server itself: each service's shape, each fault seen from the client side,
recording, determinism of random faults, keep-alive and concurrency."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import httpx
import pytest
from pydantic import TypeAdapter

from campaign_cli.config import ProviderConfig
from tests.fakeserver import (
    DEFAULT_FCM_TOKEN,
    DEFAULT_SENDGRID_KEY,
    DEFAULT_TWILIO_SID,
    DEFAULT_TWILIO_TOKEN,
    FakeProviderServer,
    fake_server_factory_fixture,  # noqa: F401
    fake_server_fixture,  # noqa: F401
    sms_segments,
)

TWILIO_PATH = f"/2010-04-01/Accounts/{DEFAULT_TWILIO_SID}/Messages.json"
TWILIO_AUTH = (DEFAULT_TWILIO_SID, DEFAULT_TWILIO_TOKEN)
SENDGRID_AUTH = {"Authorization": f"Bearer {DEFAULT_SENDGRID_KEY}"}
FCM_AUTH = {"Authorization": f"Bearer {DEFAULT_FCM_TOKEN}"}
FCM_PATH = "/v1/projects/fake-project/messages:send"


def client(server: FakeProviderServer, timeout: float = 5.0) -> httpx.Client:
    return httpx.Client(base_url=server.url, timeout=timeout)


def sms(c: httpx.Client, to: str = "+12015550100", body: str = "hello",
        **extra: str) -> httpx.Response:
    return c.post(TWILIO_PATH, data={"To": to, "From": "+15005550006", "Body": body, **extra},
                  auth=TWILIO_AUTH)


def email(to: str = "a@example.com") -> dict[str, Any]:
    return {"personalizations": [{"to": [{"email": to}], "custom_args": {"key": "k1"}}],
            "from": {"email": "news@example.org"}, "subject": "Hi",
            "content": [{"type": "text/plain", "value": "x"}, {"type": "text/html", "value": "y"}]}


def push(token: str = "tok-1") -> dict[str, Any]:
    return {"message": {"token": token, "notification": {"title": "t", "body": "b"},
                        "data": {"k": "v"}}}


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwt(claims: dict[str, Any] | None = None) -> str:
    claims = claims if claims is not None else {
        "iss": "sender@fake-project.iam.gserviceaccount.com",
        "scope": "https://www.googleapis.com/auth/firebase.messaging",
        "aud": "http://127.0.0.1/token", "iat": 1000, "exp": 4600}
    header = {"alg": "RS256", "typ": "JWT"}
    return ".".join([b64url(json.dumps(header).encode()), b64url(json.dumps(claims).encode()),
                     b64url(b"signature")])


# --------------------------------------------------------------------------- happy paths


def test_twilio_creates_a_message(fake_server: FakeProviderServer) -> None:
    with client(fake_server) as c:
        r = sms(c, body="héllo 👋")
    assert r.status_code == 201
    data = r.json()
    assert re.fullmatch(r"SM[0-9a-f]{32}", data["sid"])
    assert (data["status"], data["to"], data["from"], data["body"]) == (
        "queued", "+12015550100", "+15005550006", "héllo 👋")
    assert data["num_segments"] == "1" and data["account_sid"] == DEFAULT_TWILIO_SID
    assert fake_server.accepted("twilio") == ["+12015550100"]
    (record,) = fake_server.requests
    assert (record.service, record.recipient, record.status, record.outcome, record.fault) == (
        "twilio", "+12015550100", 201, "accepted", None)
    assert record.method == "POST" and record.path == TWILIO_PATH
    assert record.form()["Body"] == ["héllo 👋"]
    assert record.header("content-type") == "application/x-www-form-urlencoded"


def test_twilio_messaging_service_api_key_and_validation(
        fake_server_factory: Any) -> None:
    key = ("SK" + "ab" * 16, "key-secret")
    server: FakeProviderServer = fake_server_factory(twilio_api_key=key)
    with client(server) as c:
        r = c.post(TWILIO_PATH, data={"To": "+12015550100", "MessagingServiceSid": "MG" + "0" * 32,
                                      "Body": "x" * 161}, auth=key)
        assert r.status_code == 201
        assert (r.json()["status"], r.json()["num_segments"]) == ("accepted", "2")
        missing_to = c.post(TWILIO_PATH, data={"From": "+15005550006", "Body": "x"},
                            auth=TWILIO_AUTH)
        no_sender = c.post(TWILIO_PATH, data={"To": "+12015550101", "Body": "x"},
                           auth=TWILIO_AUTH)
        as_json = c.post(TWILIO_PATH, json={"To": "+12015550102"}, auth=TWILIO_AUTH)
        wrong_account = c.post(TWILIO_PATH.replace(DEFAULT_TWILIO_SID, "AC" + "f" * 32),
                               data={"To": "+1", "From": "+1", "Body": "x"}, auth=TWILIO_AUTH)
    assert (missing_to.status_code, missing_to.json()["code"]) == (400, 21604)
    assert (no_sender.status_code, no_sender.json()["code"]) == (400, 21603)
    assert as_json.json()["code"] == 21604
    assert (wrong_account.status_code, wrong_account.json()["code"]) == (404, 20404)
    assert server.accepted("twilio") == ["+12015550100"]
    assert [r.outcome for r in server.requests] == ["accepted"] + ["rejected"] * 4


def test_twilio_checks_basic_auth(fake_server: FakeProviderServer) -> None:
    with client(fake_server) as c:
        wrong = c.post(TWILIO_PATH, data={"To": "+12015550100", "From": "+1", "Body": "x"},
                       auth=(DEFAULT_TWILIO_SID, "nope"))
        none = c.post(TWILIO_PATH, data={"To": "+12015550100", "From": "+1", "Body": "x"})
    for r in (wrong, none):
        assert r.status_code == 401
        assert r.json() == {"code": 20003, "message": "Authenticate", "status": 401,
                            "more_info": "https://www.twilio.com/docs/errors/20003"}
    assert fake_server.accepted("twilio") == []


def test_sendgrid_accepts_with_message_id(fake_server: FakeProviderServer) -> None:
    with client(fake_server) as c:
        r = c.post("/v3/mail/send", json=email(), headers=SENDGRID_AUTH)
        bad_key = c.post("/v3/mail/send", json=email(), headers={"Authorization": "Bearer x"})
        no_personalizations = c.post("/v3/mail/send", json={**email(), "personalizations": []},
                                     headers=SENDGRID_AUTH)
        html_first = c.post("/v3/mail/send", json={**email(), "content": [
            {"type": "text/html", "value": "y"}, {"type": "text/plain", "value": "x"}]},
            headers=SENDGRID_AUTH)
    assert (r.status_code, r.content) == (202, b"")
    assert len(r.headers["X-Message-Id"]) == 22
    assert bad_key.status_code == 401 and "errors" in bad_key.json()
    assert no_personalizations.status_code == 400
    assert no_personalizations.json()["errors"][0]["field"] == "personalizations"
    assert html_first.json()["errors"][0]["field"] == "content.0.type"
    assert fake_server.accepted("sendgrid") == ["a@example.com"]


def test_fcm_token_endpoint_then_send(fake_server: FakeProviderServer) -> None:
    with client(fake_server) as c:
        t = c.post("/token", data={"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer",
                                   "assertion": jwt()})
        assert t.status_code == 200
        token = t.json()
        assert token["token_type"] == "Bearer" and token["expires_in"] == 3600
        issued = {"Authorization": f"Bearer {token['access_token']}"}
        sent = c.post(FCM_PATH, json=push("tok-1"), headers=issued)
        static = c.post(FCM_PATH, json=push("tok-2"), headers=FCM_AUTH)
        dry = c.post(FCM_PATH, json={**push("tok-3"), "validate_only": True}, headers=FCM_AUTH)
        bad_data = c.post(FCM_PATH, json={"message": {"token": "tok-4", "data": {"n": 1}}},
                          headers=FCM_AUTH)
        fake_server.revoke_tokens()
        revoked = c.post(FCM_PATH, json=push("tok-5"), headers=issued)
        bad_grant = c.post("/token", data={"grant_type": "password", "assertion": jwt()})
        bad_jwt = c.post("/token", data={"grant_type": "urn:ietf:params:oauth:grant-type:"
                                                       "jwt-bearer", "assertion": "a.b"})
    assert sent.status_code == 200
    assert re.fullmatch(r"projects/fake-project/messages/.+", sent.json()["name"])
    assert static.status_code == 200 and dry.status_code == 200
    assert bad_data.status_code == 400
    assert bad_data.json()["error"]["details"][0]["errorCode"] == "INVALID_ARGUMENT"
    assert revoked.status_code == 401
    assert revoked.json()["error"]["status"] == "UNAUTHENTICATED"
    assert bad_grant.json()["error"] == "unsupported_grant_type"
    assert bad_jwt.json()["error"] == "invalid_grant"
    assert fake_server.accepted("fcm") == ["tok-1", "tok-2"]
    assert fake_server.token_claims[0]["iss"].startswith("sender@")
    assert fake_server.requests_for("token")[0].recipient == (
        "sender@fake-project.iam.gserviceaccount.com")


def test_slack_answers_ok(fake_server: FakeProviderServer) -> None:
    with client(fake_server) as c:
        ok = c.post("/slack/T1/B1/secret", json={"text": "hi"})
        no_text = c.post("/slack/T1/B1/secret", json={"username": "x"})
        garbage = c.post("/slack/T1/B1/secret", content=b"{nope")
    assert (ok.status_code, ok.text) == (200, "ok")
    assert (no_text.status_code, no_text.text) == (400, "no_text")
    assert (garbage.status_code, garbage.text) == (400, "invalid_payload")
    assert fake_server.accepted("slack") == ["T1/B1/secret"]


def test_webhook_deduplicates_by_idempotency_key(fake_server: FakeProviderServer) -> None:
    with client(fake_server) as c:
        first = c.post("/webhook/hook", json={"n": 1}, headers={"Idempotency-Key": "k1"})
        again = c.post("/webhook/hook", json={"n": 1}, headers={"Idempotency-Key": "k1"})
        other = c.post("/webhook/hook", json={"n": 2}, headers={"Idempotency-Key": "k2"})
    assert [r.status_code for r in (first, again, other)] == [200, 200, 200]
    assert again.json() == first.json() and again.headers["Idempotent-Replayed"] == "true"
    assert other.json()["id"] != first.json()["id"]
    assert fake_server.accepted("webhook") == ["k1", "k2"]
    assert fake_server.duplicates("webhook") == ["k1"]
    assert [r.outcome for r in fake_server.requests] == ["accepted", "duplicate", "accepted"]
    assert [r.attempt for r in fake_server.requests] == [0, 1, 0]


def test_unknown_routes_and_methods(fake_server: FakeProviderServer) -> None:
    with client(fake_server) as c:
        assert c.post("/nowhere").status_code == 404
        assert c.get("/v3/mail/send").status_code == 405
    assert fake_server.requests[0].service == "unknown"


def test_chunked_request_body(fake_server: FakeProviderServer) -> None:
    def chunks() -> Any:
        yield b'{"text":'
        yield b' "hi"}'

    with client(fake_server) as c:
        r = c.post("/slack/x", content=chunks())
    assert r.text == "ok"
    assert fake_server.requests[0].header("transfer-encoding") == "chunked"
    assert fake_server.requests[0].body == b'{"text": "hi"}'


def test_provider_config_is_a_valid_campaign_provider(fake_server: FakeProviderServer) -> None:
    adapter: TypeAdapter[Any] = TypeAdapter(ProviderConfig)
    for service in ("twilio", "sendgrid", "fcm", "slack", "webhook"):
        config = adapter.validate_python(fake_server.provider_config(service))
        assert config.type == service
    via_service = fake_server.provider_config("twilio", from_=None,
                                              messaging_service_sid="MG" + "1" * 32)
    assert "from" not in via_service
    adapter.validate_python(via_service)


def test_sms_segments() -> None:
    assert sms_segments("a" * 160) == 1 and sms_segments("a" * 161) == 2
    assert sms_segments("€" * 80) == 1 and sms_segments("€" * 81) == 2
    assert sms_segments("ж" * 70) == 1 and sms_segments("ж" * 71) == 2


# --------------------------------------------------------------------------- faults


@pytest.mark.parametrize("service", ["twilio", "sendgrid", "fcm", "slack", "webhook"])
@pytest.mark.parametrize("kind,status", [("500", 500), ("503", 503), ("auth", 401),
                                         ("429:7", 429), ("408", 408)])
def test_status_faults_in_each_service_shape(fake_server: FakeProviderServer, service: str,
                                             kind: str, status: int) -> None:
    fake_server.fail_next(1, kind, service=service)
    with client(fake_server) as c:
        r = send(c, service)
        after = send(c, service)
    assert r.status_code == status
    assert after.status_code < 300
    if kind == "429:7":
        assert r.headers["Retry-After"] == "7"
    else:
        assert "Retry-After" not in r.headers
    if service == "twilio":
        assert r.json()["status"] == status
        assert r.json()["code"] == {401: 20003, 429: 20429}.get(status, 20000 + status)
    elif service == "sendgrid":
        assert r.json()["errors"][0]["message"]
    elif service == "fcm":
        assert r.json()["error"]["code"] == status
    elif service == "slack":
        assert r.text
    assert len(fake_server.accepted(service)) == 1
    assert [x.fault for x in fake_server.requests] == [kind, None]
    assert fake_server.requests[0].outcome == "fault"


def send(c: httpx.Client, service: str, recipient: str = "r1") -> httpx.Response:
    if service == "twilio":
        return sms(c, to=recipient)
    if service == "sendgrid":
        return c.post("/v3/mail/send", json=email(f"{recipient}@example.com"),
                      headers=SENDGRID_AUTH)
    if service == "fcm":
        return c.post(FCM_PATH, json=push(recipient), headers=FCM_AUTH)
    if service == "slack":
        return c.post(f"/slack/{recipient}", json={"text": "hi"})
    return c.post("/webhook/hook", json={"n": 1}, headers={"Idempotency-Key": recipient})


def test_429_without_retry_after(fake_server: FakeProviderServer) -> None:
    fake_server.fail_next(1, "429")
    with client(fake_server) as c:
        r = sms(c)
    assert r.status_code == 429 and "Retry-After" not in r.headers


@pytest.mark.parametrize("code,status", [(21610, 400), (21211, 400), (21614, 400), (20003, 401)])
def test_twilio_permanent_codes(fake_server: FakeProviderServer, code: int, status: int) -> None:
    fake_server.fail_for("+12015550100", f"twilio:{code}")
    with client(fake_server) as c:
        r = sms(c)
        other = sms(c, to="+12015550199")
        r2 = sms(c)
    assert (r.status_code, r.json()["code"], r.json()["status"]) == (status, code, status)
    assert r2.json()["code"] == code
    assert other.status_code == 201
    assert fake_server.accepted("twilio") == ["+12015550199"]


@pytest.mark.parametrize("error,status", [("UNREGISTERED", 404), ("INVALID_ARGUMENT", 400),
                                          ("QUOTA_EXCEEDED", 429), ("UNAVAILABLE", 503)])
def test_fcm_error_codes(fake_server: FakeProviderServer, error: str, status: int) -> None:
    fake_server.fail_for("dead-token", f"fcm:{error}", times=1)
    with client(fake_server) as c:
        r = c.post(FCM_PATH, json=push("dead-token"), headers=FCM_AUTH)
        r2 = c.post(FCM_PATH, json=push("dead-token"), headers=FCM_AUTH)
    assert r.status_code == status
    assert r.json()["error"]["details"][0]["errorCode"] == error
    assert r2.status_code == 200


def test_slack_error_texts(fake_server: FakeProviderServer) -> None:
    fake_server.fail_next(1, "slack:channel_is_archived")
    with client(fake_server) as c:
        r = c.post("/slack/x", json={"text": "hi"})
    assert (r.status_code, r.text) == (410, "channel_is_archived")


@pytest.mark.parametrize("kind,counted", [("reset", False), ("accept_then_reset", True)])
def test_reset_closes_without_answer(fake_server: FakeProviderServer, kind: str,
                                     counted: bool) -> None:
    fake_server.fail_next(1, kind)
    with client(fake_server) as c:
        with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
            sms(c)
        assert sms(c, to="+12015550101").status_code == 201  # a fresh connection works
    assert fake_server.accepted("twilio") == (["+12015550100"] if counted else []) + [
        "+12015550101"]
    record = fake_server.requests[0]
    assert (record.status, record.fault) == (None, kind)
    assert record.outcome == ("accepted" if counted else "fault")


@pytest.mark.parametrize("kind,counted", [("withhold", False), ("withhold_after_accept", True)])
def test_withhold_until_client_times_out(fake_server: FakeProviderServer, kind: str,
                                         counted: bool) -> None:
    fake_server.fail_next(1, kind, service="webhook")
    with client(fake_server, timeout=0.2) as c:
        with pytest.raises(httpx.ReadTimeout):
            c.post("/webhook/h", json={}, headers={"Idempotency-Key": "k1"})
        retry = c.post("/webhook/h", json={}, headers={"Idempotency-Key": "k1"})
    assert retry.status_code == 200
    assert fake_server.accepted("webhook") == ["k1"]
    assert fake_server.duplicates("webhook") == (["k1"] if counted else [])
    assert fake_server.requests[0].status is None


def test_stop_releases_withheld_requests(fake_server_factory: Any) -> None:
    server: FakeProviderServer = fake_server_factory()
    server.fail_always("withhold")
    errors: list[BaseException] = []

    def call() -> None:
        try:
            with client(server, timeout=30) as c:
                sms(c)
        except httpx.HTTPError as exc:
            errors.append(exc)

    thread = threading.Thread(target=call)
    thread.start()
    assert server.wait_for_requests(1)
    server.stop()
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], httpx.RemoteProtocolError | httpx.ReadError)


def test_latency_then_answer_and_accepted_even_if_client_gave_up(
        fake_server: FakeProviderServer) -> None:
    fake_server.fail_next(1, "latency:0.1")
    fake_server.fail_next(1, "latency:5")
    with client(fake_server, timeout=1.0) as c:
        started = time.monotonic()
        assert sms(c, to="+12015550101").status_code == 201
        assert time.monotonic() - started >= 0.1
    with client(fake_server, timeout=0.2) as c, pytest.raises(httpx.ReadTimeout):
        sms(c, to="+12015550102")
    assert fake_server.accepted("twilio") == ["+12015550101", "+12015550102"]


def test_fail_next_fail_for_and_fail_always_precedence(fake_server: FakeProviderServer) -> None:
    fake_server.fail_next(2, "500")
    fake_server.fail_next(1, "503")
    fake_server.fail_for("+12015550109", "twilio:21211", times=1)
    with client(fake_server) as c:
        codes = [sms(c, to=f"+1201555010{i}").status_code for i in range(10)]
        fake_server.fail_always("503", service="sendgrid")
        assert send(c, "sendgrid").status_code == 503
        assert send(c, "sendgrid").status_code == 503
        assert sms(c).status_code == 201
        fake_server.clear_faults()
        assert send(c, "sendgrid").status_code == 202
    assert codes == [500, 500, 503] + [201] * 6 + [400]


def test_token_endpoint_only_faulted_when_named(fake_server: FakeProviderServer) -> None:
    fake_server.fail_always("500")
    with client(fake_server) as c:
        form = {"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer", "assertion": jwt()}
        assert c.post("/token", data=form).status_code == 200
        fake_server.fail_next(1, "503", service="token")
        assert c.post("/token", data=form).status_code == 503


def test_unknown_fault_kinds_are_refused(fake_server: FakeProviderServer) -> None:
    for kind in ("bogus", "latency:x", "fcm:NOPE", "twilio:abc", "600"):
        with pytest.raises(ValueError):
            fake_server.fail_next(1, kind)
    with pytest.raises(ValueError):
        fake_server.fail_rate(1.5)


def fault_pattern(server: FakeProviderServer, recipients: list[str]) -> dict[str, str | None]:
    with client(server) as c:
        for to in recipients:
            try:
                sms(c, to=to)
            except httpx.TransportError:
                pass
    return {r.recipient or "": r.fault for r in server.requests}


def test_fail_rate_is_deterministic_with_a_seed(fake_server_factory: Any) -> None:
    recipients = [f"+1201555{i:04d}" for i in range(400)]
    kinds = ["500", "503", "429:0", "reset"]
    patterns = []
    for seed, order in ((7, recipients), (7, recipients[::-1]), (8, recipients)):
        server: FakeProviderServer = fake_server_factory()
        server.fail_rate(0.10, kinds=kinds, seed=seed)
        patterns.append(fault_pattern(server, order))
    same, reversed_order, other_seed = patterns
    assert same == reversed_order  # per message, not per arrival order
    assert same != other_seed
    faulted = [f for f in same.values() if f]
    assert 20 <= len(faulted) <= 60
    assert set(faulted) == set(kinds)
    assert len(server.accepted("twilio")) == sum(1 for f in other_seed.values() if f is None)


def test_fail_rate_retries_draw_again(fake_server: FakeProviderServer) -> None:
    fake_server.fail_rate(0.5, kinds=["503"], seed=1)
    with client(fake_server) as c:
        attempts = 0
        while sms(c).status_code != 201:
            attempts += 1
            assert attempts < 30
    assert [r.attempt for r in fake_server.requests] == list(range(attempts + 1))


# --------------------------------------------------------------------------- transport


def test_keep_alive_many_requests_over_one_connection(fake_server: FakeProviderServer) -> None:
    with client(fake_server) as c:
        for i in range(300):
            assert sms(c, to=f"+1201555{i:04d}").status_code == 201
        closing = [c.post("/slack/x", json={"text": "t"}, headers={"Connection": "close"})
                   for _ in range(2)]
    assert all(r.text == "ok" and r.headers["Connection"] == "close" for r in closing)
    connections = [r.connection for r in fake_server.requests]
    first = connections[0]
    # the first "Connection: close" request still rides the kept-alive connection, then it ends
    assert connections[:301] == [first] * 301 and connections[301] != first
    assert len(fake_server.accepted("twilio")) == 300


def test_64_concurrent_requests_are_served_in_parallel(fake_server: FakeProviderServer) -> None:
    """64 requests at once are all read by the server while none of them is answered (each is
    withheld until its client lets go): served in parallel, each on a connection of its own.
    Served one at a time, the second would never be read. (The test timed them before, and a
    slow enough machine would have failed it.)"""
    fake_server.fail_always("withhold", service="twilio")

    async def main() -> bool:
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(base_url=fake_server.url, limits=limits,
                                     timeout=120) as ac:
            posts = [asyncio.create_task(ac.post(TWILIO_PATH, auth=TWILIO_AUTH, data={
                "To": f"+1201{i:07d}", "From": "+15005550006", "Body": "hi"}))
                for i in range(64)]
            try:
                return await asyncio.to_thread(fake_server.wait_for_requests, 64, 60.0)
            finally:
                for post in posts:
                    post.cancel()
                await asyncio.gather(*posts, return_exceptions=True)

    assert asyncio.run(main()), "the server did not read 64 requests at once"
    assert len({r.connection for r in fake_server.requests}) == 64
    assert {r.status for r in fake_server.requests} == {None}  # none answered meanwhile


async def raw_posts(url: str, connections: int, per_connection: int) -> list[bytes]:
    """A minimal keep-alive HTTP/1.1 client: httpx's async pool measures itself (a few hundred
    requests/s here, less with the server's thread in the same process), not the server."""
    host, port = url.removeprefix("http://").split(":")
    auth = base64.b64encode(f"{DEFAULT_TWILIO_SID}:{DEFAULT_TWILIO_TOKEN}".encode()).decode()
    statuses: list[bytes] = []

    async def connection(c: int) -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        for i in range(per_connection):
            body = f"To=%2B1{c:03d}{i:07d}&From=%2B15005550006&Body=hi".encode()
            writer.write(f"POST {TWILIO_PATH} HTTP/1.1\r\nHost: {host}\r\n"
                         f"Authorization: Basic {auth}\r\n"
                         "Content-Type: application/x-www-form-urlencoded\r\n"
                         f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            await reader.readexactly(length)
            statuses.append(head[9:12])
        writer.close()
        await writer.wait_closed()

    await asyncio.gather(*(connection(c) for c in range(connections)))
    return statuses


def test_thousands_of_requests_over_64_connections(fake_server: FakeProviderServer) -> None:
    # (Its speed, ~4,000 requests/s here, is bench/'s business, not a timed assertion's.)
    statuses = asyncio.run(raw_posts(fake_server.url, 64, 80))
    assert statuses == [b"201"] * 64 * 80
    counts = fake_server.accepted_counts("twilio")
    assert len(counts) == 64 * 80 and set(counts.values()) == {1}
    assert len({r.connection for r in fake_server.requests}) == 64


def test_survives_a_killed_client_process_and_garbage(fake_server: FakeProviderServer) -> None:
    fake_server.fail_next(1, "withhold")
    script = ("import httpx, sys; httpx.post(sys.argv[1] + '/webhook/h', json={}, "
              "headers={'Idempotency-Key': 'k'}, timeout=60)")
    proc = subprocess.Popen([sys.executable, "-c", script, fake_server.url])
    try:
        assert fake_server.wait_for_requests(1, timeout=30)
    finally:
        proc.kill()
        proc.wait()
    with socket.create_connection(("127.0.0.1", fake_server.port)) as raw:
        raw.sendall(b"POST /slack/x HTTP/1.1\r\nContent-Length: 100\r\n\r\n{")  # then hang up
    with socket.create_connection(("127.0.0.1", fake_server.port)) as raw:
        raw.sendall(b"NONSENSE\r\n\r\n")
        assert raw.recv(100).startswith(b"HTTP/1.1 400")
    with client(fake_server) as c:
        assert c.post("/webhook/h", json={}, headers={"Idempotency-Key": "k"}).status_code == 200
    assert fake_server.accepted("webhook") == ["k"]
    assert fake_server.errors == []


def test_records_and_reset_records(fake_server: FakeProviderServer) -> None:
    with client(fake_server) as c:
        sms(c)
        c.post("/webhook/h", json={}, headers={"Idempotency-Key": "k"})
        c.post("/webhook/h", json={}, headers={"Idempotency-Key": "k"})
    first = fake_server.requests[0]
    assert first.seq == 0 and first.time > 0 and first.body.startswith(b"To=")
    assert fake_server.wait_for_requests(2, where=lambda r: r.service == "webhook")
    assert not fake_server.wait_for_requests(4, timeout=0.01)
    fake_server.reset_records()
    assert fake_server.requests == [] and fake_server.accepted("twilio") == []
    assert fake_server.duplicates("webhook") == []
    with client(fake_server) as c:
        c.post("/webhook/h", json={}, headers={"Idempotency-Key": "k"})
    assert fake_server.accepted("webhook") == ["k"]


def test_context_manager_binds_loopback() -> None:
    with FakeProviderServer() as server:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", server.url)
        url = server.url
    with pytest.raises(httpx.ConnectError):
        httpx.post(url + "/slack/x", json={"text": "t"}, timeout=2)
