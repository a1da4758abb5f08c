"""`campaign send` as a real process against the fake provider server over real HTTP on 127.0.0.1:
chaos (transient faults and two SIGKILLs), failover, and an auth failure."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import CampaignFactory, journal, people, query
from tests.fakeserver import (  # noqa: F401 - pytest fixtures
    FakeProviderServer,
    fake_server_factory_fixture,
    fake_server_fixture,
)
from tests.test_cli_process import DEADLINE, campaign_cmd, sent_rows, start, wait_for
from tests.test_http_process import gone, http_children, wait_until

CHAOS_ROWS = 5_000


def webhook_url_campaign(make_campaign: CampaignFactory, urls: list[str],
                         **provider: Any) -> Path:
    """A webhook campaign whose recipients' own URLs (a ``webhook_url`` column) are ``urls``,
    rows c1, c2, ...; ``provider``: more of the webhook provider's settings."""
    rows = [[f"c{i}", f"Name{i}", url] for i, url in enumerate(urls, 1)]
    return make_campaign(
        rows, header=("id", "first_name", "url"),
        channels={"webhook": {"provider": "hook", "body": '{"n": "{{ row }}"}'}},
        providers={"hook": {"type": "webhook", "secret": "whsec-test", **provider}},
        extra={"recipients": {"file": "recipients.csv", "key": "id",
                              "columns": {"webhook_url": "url"}}},
    )


def run_to_end(store: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(campaign_cmd(store, *args), capture_output=True, text=True,
                          timeout=DEADLINE * 3)


def kill_when(store: Path, campaign: Path, key: str, at_least: int) -> None:
    """SIGKILL `campaign send` once ``at_least`` messages are sent. Its HTTP process (which
    holds the requests in flight) must not outlive it: it ends on its own."""
    proc = start(store, "send", str(campaign), "--run-key", key)
    wait_for(lambda: sent_rows(store) >= at_least, proc, f"{at_least} messages sent")
    children = http_children(proc.pid)
    assert len(children) == 1
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    wait_until(lambda: gone(children[0]), "the HTTP process to end with its parent")


@pytest.mark.slow
def test_chaos_webhook_faults_and_two_sigkills_every_recipient_once(
    make_campaign: CampaignFactory, store_path: Path, fake_server: FakeProviderServer
) -> None:
    fake_server.fail_rate(0.10, seed=7, service="webhook")
    campaign = make_campaign(
        people(CHAOS_ROWS),
        channels={"webhook": {"provider": "hook", "body": '{"code": "{{ row }}"}'}},
        providers={"hook": {**fake_server.provider_config("webhook"), "concurrency": 16,
                            "rate": "1500/s", "retry": {"attempts": 8, "backoff": 0.01,
                                                        "max_backoff": 0.05}}},
        limits={"concurrency": 16},
    )
    kill_when(store_path, campaign, "chaos", 1_000)
    kill_when(store_path, campaign, "chaos", 2_500)
    done = run_to_end(store_path, "send", str(campaign), "--run-key", "chaos", "--json")
    assert done.returncode in (0, 4), done.stderr
    summary = json.loads(done.stdout)

    rows = journal(store_path)
    assert len(rows) == CHAOS_ROWS and {r["row"] for r in rows} == set(range(1, CHAOS_ROWS + 1))
    states = Counter(r["state"] for r in rows)
    assert sum(summary["counts"].values()) == CHAOS_ROWS
    assert set(states) <= {"sent", "failed", "in_doubt"}
    # The webhook deduplicates by Idempotency-Key: each recipient was accepted exactly once, and
    # every message the journal calls sent is among them.
    accepted = Counter(fake_server.accepted("webhook"))
    assert max(accepted.values()) == 1
    assert states["sent"] <= len(accepted)
    sent_rows_ = {r["row"] for r in rows if r["state"] == "sent"}
    assert len(sent_rows_) == states["sent"]
    # Any copy the server saw twice was refused as a duplicate, and it was a resend of a message
    # in doubt (same key), never a second message.
    for key in fake_server.duplicates("webhook"):
        assert accepted[key] == 1


@pytest.mark.slow
def test_chaos_twilio_never_resends_a_message_in_doubt(
    make_campaign: CampaignFactory, store_path: Path, fake_server: FakeProviderServer
) -> None:
    """Twilio cannot deduplicate: a marketing message cut off mid-send is reported in doubt and
    not sent again, so no number receives two."""
    fake_server.fail_rate(0.10, seed=11, service="twilio")
    campaign = make_campaign(
        people(2_000), purpose="marketing",
        channels={"sms": {"provider": "tw", "body": "Sale {{ row }}. Reply STOP to opt out"}},
        providers={"tw": {**fake_server.provider_config("twilio"), "concurrency": 16,
                          "rate": "800/s", "retry": {"attempts": 8, "backoff": 0.01,
                                                     "max_backoff": 0.05}}},
        limits={"concurrency": 16},
        compliance={"consent": "not_required"},
    )
    kill_when(store_path, campaign, "tw", 500)
    kill_when(store_path, campaign, "tw", 1_200)
    done = run_to_end(store_path, "send", str(campaign), "--run-key", "tw", "--json")
    assert done.returncode in (0, 4), done.stderr
    rows = journal(store_path)
    assert len(rows) == 2_000
    states = Counter(r["state"] for r in rows)
    accepted = Counter(fake_server.accepted("twilio"))
    assert max(accepted.values()) == 1  # nobody got two
    sent_numbers = {r["address"] for r in rows if r["state"] == "sent"}
    assert sent_numbers <= set(accepted)
    # Every accepted message is either journaled sent, or reported in doubt.
    doubt = {r["address"] for r in rows if r["state"] == "in_doubt"}
    assert set(accepted) <= sent_numbers | doubt
    assert states["in_doubt"] == json.loads(done.stdout)["counts"].get("in_doubt", 0)


def test_failover_primary_503_moves_to_secondary_and_no_message_goes_twice(
    make_campaign: CampaignFactory, store_path: Path,
    fake_server_factory: Callable[..., FakeProviderServer],
) -> None:
    primary = fake_server_factory()
    secondary = fake_server_factory()
    primary.fail_always("503", service="twilio")
    campaign = make_campaign(
        people(200),
        channels={"sms": {"provider": ["primary", "secondary"], "body": "Code {{ row }}"}},
        providers={
            "primary": {**primary.provider_config("twilio"), "retry": {"attempts": 6,
                                                                     "backoff": 0.01}},
            "secondary": {**secondary.provider_config("twilio"), "retry": {"attempts": 6,
                                                                         "backoff": 0.01}},
        },
        limits={"concurrency": 4, "circuit_breaker": {"threshold": 3, "cooldown": 600}},
    )
    done = run_to_end(store_path, "send", str(campaign), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["counts"] == {"sent": 200}
    assert primary.accepted("twilio") == []
    assert sorted(secondary.accepted("twilio")) == sorted(p[2] for p in people(200))
    assert len(primary.requests_for("twilio")) <= 3 + 4  # threshold, plus those already in flight
    assert {r["provider"] for r in journal(store_path)} == {"secondary"}


def test_auth_failure_aborts_with_exit_6_after_a_handful_of_requests(
    make_campaign: CampaignFactory, store_path: Path, fake_server: FakeProviderServer
) -> None:
    campaign = make_campaign(
        people(500),
        providers={"box": fake_server.provider_config("twilio", auth_token="wrong-token-value")},
        limits={"concurrency": 4},
    )
    done = run_to_end(store_path, "send", str(campaign), "--json")
    assert done.returncode == 6, done.stderr
    assert len(fake_server.requests_for("twilio")) <= 8
    assert "wrong-token-value" not in done.stdout + done.stderr
    counts = json.loads(done.stdout)["counts"]
    assert counts.get("failed", 0) == 0 and counts.get("sent", 0) == 0


@pytest.mark.parametrize("bad", [
    # an ASCII control character (a stray \x01 or ESC from an export)
    "{url}/webhook/\x01h2", "{url}/webhook/\x1bh2", "{url}/webhook/\x7fh2",
    # a port past 65535, a backslash in the host, an unclosed IPv6 bracket, a host no IDNA
    # encoding takes, an empty label
    "http://127.0.0.1:99999/h2", "http://exa\\mple.com/h2", "http://[::1/h2",
    "http://xn--zz.com/h2", "http://a..b/h2",
    # an IPv4 address spelt as the C library takes it and aiohttp (3.14) refuses
    "http://127.1:8080/h2", "http://0x7f000001/h2",
    # digits and dots that are no canonical IPv4 address: aiohttp takes the host for an address
    # (never a name to resolve) and refuses it
    "http://127.0.0.1.:8080/h2", "http://1.2.3.4.5/h2",
])
def test_a_recipient_webhook_url_the_client_cannot_send_to_is_invalid_not_a_stuck_run(
    make_campaign: CampaignFactory, store_path: Path, fake_server: FakeProviderServer, bad: str,
) -> None:
    """A webhook_url cell (a CRM export, a web form: anyone's text) the HTTP client refuses to
    send to passed normalisation; the client refused it at send time (InvalidURL, ValueError:
    "Port out of range 0-65535", UnicodeError), so the run stopped with exit 1, the row in doubt
    though nothing left, and every resume stopped on it again: one hostile row held the whole
    list. It is that recipient's bad address: the row is `invalid`, the rest go."""
    urls = [bad.format(url=fake_server.url) if i == 2 else f"{fake_server.url}/webhook/h{i}"
            for i in range(1, 5)]
    # (the fake server is on loopback, which a recipient's URL reaches only so)
    campaign = webhook_url_campaign(make_campaign, urls, allow_private_urls=True)
    done = run_to_end(store_path, "send", str(campaign), "--run-key", "k", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["counts"] == {"invalid": 1, "sent": 3}
    states = {r["row"]: (r["state"], r["reason"]) for r in journal(store_path)}
    assert states[2] == ("invalid", "bad_webhook_url")
    assert len(fake_server.accepted("webhook")) == 3


def _tls_files(root: Path) -> tuple[Path, Path, Path]:
    """A CA, and a certificate it signed for 127.0.0.1 with its key (PEM files in ``root``)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "campaign-cli test CA")])

    def build(subject: x509.Name, public: ec.EllipticCurvePublicKey) -> x509.CertificateBuilder:
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_name)
                .public_key(public).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(hours=1))
                .not_valid_after(now + datetime.timedelta(days=1)))

    ca = (build(ca_name, ca_key.public_key())
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False),
                         critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))
    cert = (build(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]),
                  key.public_key())
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    paths = root / "ca.pem", root / "cert.pem", root / "key.pem"
    paths[0].write_bytes(ca.public_bytes(pem))
    paths[1].write_bytes(cert.public_bytes(pem))
    paths[2].write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


def test_https_sends_with_the_ca_from_ssl_cert_file_ignores_proxies_and_an_untrusted_one_is_never_sent(
    make_campaign: CampaignFactory, tmp_path: Path
) -> None:
    """The HTTP process inherits `campaign send`'s environment: a private CA given in
    SSL_CERT_FILE is trusted, proxy variables are ignored (the providers are reached directly),
    and a certificate nobody vouches for fails every attempt before anything is sent (transient,
    then a dead letter: never in doubt), as when the requests go from the run's own process."""
    ca, cert, key = _tls_files(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    proxy = socket.create_server(("127.0.0.1", 0))  # a proxy that would see any CONNECT
    proxy.setblocking(False)
    proxy_url = f"http://127.0.0.1:{proxy.getsockname()[1]}"
    fast = {"attempts": 2, "backoff": 0.01, "max_backoff": 0.02}
    with proxy, FakeProviderServer(tls=context) as server:
        campaign = make_campaign(
            people(4), channels={"sms": {"provider": "tw", "body": "Code {{ row }}"}},
            providers={"tw": {**server.provider_config("twilio"), "retry": fast}},
        )
        env = {k: v for k, v in os.environ.items() if k not in ("SSL_CERT_FILE", "SSL_CERT_DIR")}
        proxies = {name: proxy_url for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY",
                                                 "http_proxy", "ALL_PROXY", "all_proxy")}
        trusted = tmp_path / "trusted.db"
        done = subprocess.run(campaign_cmd(trusted, "send", str(campaign), "--json"),
                              capture_output=True, text=True, timeout=DEADLINE,
                              env={**env, **proxies, "SSL_CERT_FILE": str(ca)})
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["counts"] == {"sent": 4}
        assert len(server.accepted("twilio")) == 4
        with pytest.raises(BlockingIOError):
            proxy.accept()  # nobody connected to the proxy

        untrusted = tmp_path / "untrusted.db"
        done = subprocess.run(campaign_cmd(untrusted, "send", str(campaign), "--json"),
                              capture_output=True, text=True, timeout=DEADLINE, env=env)
        assert done.returncode == 4, done.stderr
        assert json.loads(done.stdout)["counts"] == {"failed": 4}
        assert len(server.accepted("twilio")) == 4  # nothing more
        rows = journal(untrusted)
        assert {(r["state"], r["reason"], r["error_code"]) for r in rows} == {
            ("failed", "retries_exhausted", "connect")}
        assert all("CERTIFICATE_VERIFY_FAILED" in r["detail"] for r in rows)
        outcomes = query(untrusted, "SELECT DISTINCT outcome FROM attempts")
        assert outcomes == [("transient",)]
