"""A recipient's own webhook URL reaches public addresses only (SSRF): the address classes, the
resolver's check, both transports over real loopback HTTP, and `campaign send` end to end."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import httpx
import pytest

from campaign_cli.errors import PermanentError
from campaign_cli.models import Channel, OutboundMessage, WebhookContent
from campaign_cli.providers.http import classify_transport_error
from campaign_cli.providers.public import (
    PUBLIC_ONLY,
    NonPublicAddress,
    literal_address,
    not_public,
    public_only_resolver,
)
from campaign_cli.providers.webhook import WebhookAdapter
from campaign_cli.testing import FakeClock
from tests.conftest import CampaignFactory, journal
from tests.fakeserver import (  # noqa: F401 - pytest fixtures
    FakeProviderServer,
    fake_server_fixture,
)
from tests.test_http_transport import client, run, sink, where  # noqa: F401 - a fixture
from tests.test_integration_http import run_to_end, webhook_url_campaign


@pytest.mark.parametrize(("address", "reason"), [
    ("127.0.0.1", "loopback"), ("127.255.0.9", "loopback"), ("::1", "loopback"),
    ("10.0.0.1", "private"), ("172.16.5.4", "private"), ("192.168.1.1", "private"),
    ("169.254.169.254", "link-local"), ("fe80::1%eth0", "link-local"),
    ("100.64.0.1", "shared"), ("0.0.0.0", "this network"), ("::", "unspecified"),
    ("fd00::1", "unique local"), ("224.0.0.1", "multicast"), ("ff02::1", "multicast"),
    ("255.255.255.255", "reserved"), ("198.18.0.1", "benchmarking"),
    ("192.0.2.1", "documentation"), ("2001:db8::1", "documentation"),
    # IPv6 addresses that carry an IPv4 one reach it: mapped, 6to4, NAT64, IPv4-compatible
    ("::ffff:127.0.0.1", "loopback"), ("2002:7f00:1::", "loopback"),
    ("2002:a9fe:a9fe::1", "link-local"), ("64:ff9b::a00:1", "private"), ("::7f00:1", "reserved"),
])
def test_addresses_that_are_not_public(address: str, reason: str) -> None:
    found = not_public(address)
    assert found is not None and reason in found


@pytest.mark.parametrize("address", [
    "8.8.8.8", "1.1.1.1", "93.184.215.14", "2606:4700:4700::1111", "::ffff:8.8.8.8",
    "2002:808:808::1", "64:ff9b::808:808",
])
def test_public_addresses(address: str) -> None:
    assert not_public(address) is None


@pytest.mark.parametrize(("host", "address"), [
    ("127.0.0.1", "127.0.0.1"), ("[::1]", "::1"),
    # legacy spellings the C library turns into an address without DNS
    ("127.1", "127.0.0.1"), ("0x7f000001", "127.0.0.1"), ("2130706433", "127.0.0.1"),
    ("0177.0.0.1", "127.0.0.1"),
])
def test_hosts_written_as_addresses(host: str, address: str) -> None:
    assert str(literal_address(host)) == address


@pytest.mark.parametrize("host", ["example.com", "localhost", "deadbeef", "cafe.be", "a1.b2"])
def test_host_names_are_left_to_the_resolver(host: str) -> None:
    assert literal_address(host) is None


class _Answers:
    """An aiohttp resolver that answers what it is told (one list per call)."""

    def __init__(self, *answers: list[str]) -> None:
        self.answers = list(answers)
        self.closed = False

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[dict[str, Any]]:
        return [{"hostname": host, "host": a, "port": port, "family": family, "proto": 0,
                 "flags": 0} for a in self.answers.pop(0)]

    async def close(self) -> None:
        self.closed = True


def test_the_resolver_refuses_a_name_if_any_address_is_not_public() -> None:
    """One private address among public ones refuses the name (which one a connection tries
    first is the connector's choice); a name that answered a public address once and a private
    one the next time (DNS rebinding) is refused the next time."""
    async def main() -> None:
        inner = _Answers(["93.184.215.14"], ["93.184.215.14", "10.0.0.7"], ["169.254.169.254"])
        resolver = public_only_resolver(inner)  # type: ignore[arg-type]
        ok = await resolver.resolve("hooks.example", 443)
        assert [r["host"] for r in ok] == ["93.184.215.14"]
        with pytest.raises(NonPublicAddress, match=r"hooks\.example resolves to 10\.0\.0\.7"):
            await resolver.resolve("hooks.example", 443)
        with pytest.raises(NonPublicAddress, match="link-local"):
            await resolver.resolve("hooks.example", 443)
        await resolver.close()
        assert inner.closed

    run(main())


def test_a_refusal_is_the_recipients_bad_address_not_a_transient_failure() -> None:
    """Nothing was sent and no retry can change the answer: `invalid`, code private_address.
    (A `httpx.ConnectError` otherwise: transient, retried for nothing.)"""
    error = classify_transport_error(NonPublicAddress("x resolves to 10.0.0.1"))
    assert isinstance(error, PermanentError)
    assert (error.code, error.action) == ("private_address", "invalid")


def _message(address: str) -> OutboundMessage:
    return OutboundMessage(1, 1, Channel.WEBHOOK, "c1", address, "key-1",
                           WebhookContent("hi"), "hash", 0)


def test_only_requests_to_a_recipients_own_url_ask_for_public_addresses() -> None:
    adapter = WebhookAdapter("http://10.0.0.5/hook", FakeClock())
    assert not adapter.build(_message("c1")).extensions.get(PUBLIC_ONLY)  # the provider's url
    assert adapter.build(_message("https://hooks.example/h1")).extensions[PUBLIC_ONLY] is True
    allowed = WebhookAdapter(None, FakeClock(), allow_private_urls=True)
    assert not allowed.build(_message("https://hooks.example/h1")).extensions.get(PUBLIC_ONLY)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "127.1", "[::ffff:127.0.0.1]"])
def test_both_transports_refuse_a_loopback_recipient_url_before_connecting(
    where: str, host: str,  # noqa: F811 - the fixture
) -> None:
    """Over real loopback HTTP, in process and through the HTTP process: the sink would answer,
    but no connection is made to it. A request without the mark reaches it."""
    async def main() -> None:
        async with sink() as server, client(where) as http:
            url = f"http://{host}:{server.port}/hook"
            marked = httpx.Request("POST", url, content=b"{}", extensions={PUBLIC_ONLY: True})
            with pytest.raises(NonPublicAddress, match="loopback"):
                await http.send(marked)
            assert server.connections == 0 and server.requests == []
            # (aiohttp 3.14 refuses 127.1 itself; IPv4-mapped sockets may be off)
            if host in ("127.0.0.1", "localhost"):
                answer = await http.send(httpx.Request("POST", url, content=b"{}"))
                assert answer.status_code == 201 and len(server.requests) == 1

    run(main())


def _hook_campaign(make_campaign: CampaignFactory, fake: FakeProviderServer,
                   **provider: Any) -> Path:
    port = fake.url.rsplit(":", 1)[1]
    urls = [f"{fake.url}/webhook/h1", f"http://localhost:{port}/webhook/h2"]
    return webhook_url_campaign(make_campaign, urls, **provider)


def test_send_refuses_recipient_urls_on_loopback_unless_the_provider_allows_them(
    make_campaign: CampaignFactory, store_path: Path, fake_server: FakeProviderServer,
) -> None:
    """`campaign send` as a real process: two recipient URLs that reach this machine (an
    address, a name that resolves to it) end `invalid` private_address, and the server there
    hears nothing; the run goes on (exit 0). With ``allow_private_urls: true`` both are sent."""
    campaign = _hook_campaign(make_campaign, fake_server)
    done = run_to_end(store_path, "send", str(campaign), "--run-key", "k", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["counts"] == {"invalid": 2}
    rows = journal(store_path)
    assert {(r["state"], r["reason"]) for r in rows} == {("invalid", "private_address")}
    assert all("not a public address" in r["detail"] for r in rows)
    assert fake_server.requests_for("webhook") == []

    allowed = _hook_campaign(make_campaign, fake_server, allow_private_urls=True)
    done = run_to_end(store_path, "send", str(allowed), "--run-key", "k2", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["counts"] == {"sent": 2}
    assert len(fake_server.accepted("webhook")) == 2


def test_the_providers_own_url_may_be_on_loopback(
    make_campaign: CampaignFactory, store_path: Path, fake_server: FakeProviderServer,
) -> None:
    """The campaign's author chose ``url`` (an internal gateway is a fine place): not checked."""
    campaign = make_campaign(
        [["c1", "Ann", "x"]], header=("id", "first_name", "unused"),
        channels={"webhook": {"provider": "hook", "body": "hi {{ first_name }}"}},
        providers={"hook": {"type": "webhook", "url": f"{fake_server.url}/webhook/own"}},
        extra={"recipients": {"file": "recipients.csv", "key": "id", "columns": {}}},
    )
    done = run_to_end(store_path, "send", str(campaign), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["counts"] == {"sent": 1}



def test_a_recipient_key_that_looks_like_a_url_is_not_where_the_post_goes(
    make_campaign: CampaignFactory, store_path: Path, fake_server: FakeProviderServer,
) -> None:
    """Without a webhook_url column every message goes to the provider's ``url``, its address
    being the recipient's key. A key is anyone's text too: one written as a URL must not become
    where that row's signed POST goes (to a host of the file's choosing; here this machine, which
    the provider's own url may be but a recipient's URL may not)."""
    own = f"{fake_server.url}/webhook/own"
    campaign = make_campaign(
        [["c1", "Ann"], [f"{fake_server.url}/webhook/elsewhere", "Bob"]],
        header=("id", "first_name"),
        channels={"webhook": {"provider": "hook", "body": "hi {{ first_name }}"}},
        providers={"hook": {"type": "webhook", "url": own, "secret": "whsec-test"}},
        extra={"recipients": {"file": "recipients.csv", "key": "id", "columns": {}}},
    )
    done = run_to_end(store_path, "send", str(campaign), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["counts"] == {"sent": 2}
    assert len(fake_server.accepted("webhook")) == 2
    assert all(r.path == "/webhook/own" for r in fake_server.requests_for("webhook"))


def test_closing_the_transport_closes_the_public_pools_resolver(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """aiohttp's connector does not close a resolver it was given (with aiodns installed, one
    holds a share of a process-wide DNS channel): the transport does."""
    import campaign_cli.providers.public as public
    from campaign_cli.providers.http import AiohttpTransport

    inner = _Answers(["10.0.0.7"])
    made = public.public_only_resolver
    monkeypatch.setattr(public, "public_only_resolver", lambda: made(inner))  # type: ignore[arg-type]

    async def main() -> None:
        transport = AiohttpTransport(concurrency=2)
        request = httpx.Request("POST", "http://hooks.example/h", content=b"{}",
                                extensions={PUBLIC_ONLY: True})
        with pytest.raises(NonPublicAddress, match="10.0.0.7"):
            await transport.handle_async_request(request)
        assert not inner.closed
        await transport.aclose()
        assert inner.closed

    run(main())
