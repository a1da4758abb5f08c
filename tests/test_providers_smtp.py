"""The smtp provider against a real SMTP server (aiosmtpd) on 127.0.0.1.

Every received message is parsed back with the stdlib parser. Faults are injected by the handler:
reply codes per command, a stall (the client times out) and a dropped connection.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP as SMTPServer
from aiosmtpd.smtp import AuthResult, Envelope, Session

from campaign_cli.config import Campaign, SmtpProviderConfig, load_campaign
from campaign_cli.errors import (
    ExitCode,
    InDoubtError,
    PermanentError,
    ProviderAuthError,
    ProviderError,
    TransientError,
)
from campaign_cli.models import Channel, EmailContent, OutboundMessage, Recipient, SmsContent
from campaign_cli.pipeline import SendOptions, run_campaign
from campaign_cli.providers.base import Provider, ProviderContext, default_registry
from campaign_cli.providers.smtp import SmtpProvider
from campaign_cli.render.email import make_message_id
from campaign_cli.render.engine import Renderer, RenderError
from campaign_cli.testing import FakeClock
from tests.conftest import CampaignFactory, people

T = TypeVar("T")
INJECTION = "x\r\nBcc: evil@example.com"


def run(coro: Awaitable[T]) -> T:
    async def main() -> T:
        return await coro

    return asyncio.run(main())


def body_of(part: Any) -> str:
    """A part's decoded content with LF line ends (a 7bit part keeps the wire's CRLF)."""
    return str(part.get_content()).replace("\r\n", "\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------------------------
# The server


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    peer: Any

    @property
    def message(self) -> EmailMessage:
        parsed = message_from_bytes(self.data, policy=policy.default)
        assert isinstance(parsed, EmailMessage)
        return parsed


@dataclass
class Sink:
    """An aiosmtpd handler that records everything and answers as told."""

    replies: dict[str, str] = field(default_factory=dict)  # "MAIL" / "RCPT" / "DATA" -> reply
    stall: str | None = None  # a command never answered ("RCPT" or "DATA")
    # A fault at the DATA command itself, before its 354 go-ahead: "drop" or "stall".
    data_command: str | None = None
    drop_on_data: bool = False  # close the connection once the message is in
    received: list[Received] = field(default_factory=list)
    ehlos: int = 0
    quits: int = 0
    data_commands: int = 0
    servers: list[SMTPServer] = field(default_factory=list)
    logins: list[tuple[str, Any]] = field(default_factory=list)

    async def handle_EHLO(
        self, server: SMTPServer, session: Session, envelope: Envelope, hostname: str,
        responses: list[str],
    ) -> list[str]:
        self.ehlos += 1
        self.servers.append(server)
        session.host_name = hostname
        return responses

    async def handle_MAIL(
        self, server: SMTPServer, session: Session, envelope: Envelope, address: str,
        options: list[str],
    ) -> str:
        if "MAIL" in self.replies:
            return self.replies["MAIL"]
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RCPT(
        self, server: SMTPServer, session: Session, envelope: Envelope, address: str,
        options: list[str],
    ) -> str:
        if self.stall == "RCPT":
            await asyncio.Event().wait()
        if "RCPT" in self.replies:
            return self.replies["RCPT"]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTPServer, session: Session, envelope: Envelope) -> str:
        self.data_commands += 1
        if self.stall == "DATA":
            await asyncio.Event().wait()
        if "DATA" in self.replies:
            return self.replies["DATA"]
        data = envelope.original_content
        assert isinstance(data, bytes)
        self.received.append(Received(str(envelope.mail_from), list(envelope.rcpt_tos), data,
                                      session.peer))
        if self.drop_on_data:
            assert server.transport is not None
            server.transport.abort()
        return f"250 2.0.0 Ok: queued as Q{len(self.received)}"

    async def handle_QUIT(self, server: SMTPServer, session: Session, envelope: Envelope) -> str:
        self.quits += 1
        return "221 Bye"


class FaultyServer(SMTPServer):
    """aiosmtpd's server, with `Sink.data_command` faults before the message is asked for."""

    async def smtp_DATA(self, arg: str) -> None:
        fault = getattr(self.event_handler, "data_command", None)
        if fault == "drop":
            assert self.transport is not None
            self.transport.abort()
            return
        if fault == "stall":
            await asyncio.Event().wait()
        await super().smtp_DATA(arg)


class FaultyController(Controller):
    def factory(self) -> SMTPServer:
        return FaultyServer(self.handler, **self.SMTP_kwargs)


class Server:
    def __init__(self, sink: Sink, **kwargs: Any) -> None:
        self.sink = sink
        self.port = free_port()
        self.controller = FaultyController(sink, hostname="127.0.0.1", port=self.port, **kwargs)
        self.controller.start()
        self.running = True

    def close_connections(self) -> None:
        """Close every connection from the server's side, as an idle timeout would."""

        async def close() -> None:
            for server in self.sink.servers:
                if server.transport is not None:
                    server.transport.close()

        asyncio.run_coroutine_threadsafe(close(), self.controller.loop).result(timeout=5)

    def stop(self) -> None:
        if self.running:
            self.running = False
            self.controller.stop()


ServerFactory = Callable[..., Server]


@pytest.fixture
def smtpd() -> Iterator[ServerFactory]:
    started: list[Server] = []

    def start(sink: Sink | None = None, **kwargs: Any) -> Server:
        server = Server(sink or Sink(), **kwargs)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


# --------------------------------------------------------------------------------------------
# Messages and providers


SENDER = "Spring Shop <shop@example.com>"


def content(**overrides: Any) -> EmailContent:
    values: dict[str, Any] = {
        "subject": "Spring sale",
        "text": "Hi Ann,\nspring is here.\n",
        "html": "<p>Hi Ann,</p>",
        "sender": SENDER,
    }
    values.update(overrides)
    return EmailContent(**values)


def message(i: int = 1, address: str | None = None, body: EmailContent | None = None
            ) -> OutboundMessage:
    return OutboundMessage(
        run_id=1,
        row=i,
        channel=Channel.EMAIL,
        recipient_key=f"c{i}",
        address=address or f"person{i}@example.org",
        idempotency_key=f"r1-c{i}-email",
        content=body or content(),
        content_hash="h",
    )


def provider(server: Server | None, *, port: int | None = None, clock: FakeClock | None = None,
             **config: Any) -> SmtpProvider:
    values: dict[str, Any] = {"type": "smtp", "host": "127.0.0.1", "security": "none",
                              "port": port or (server.port if server else free_port())}
    values.update(config)
    cfg = SmtpProviderConfig.model_validate(values)
    return SmtpProvider.from_config("mail", cfg, ProviderContext(clock or FakeClock(), "run"))


async def send_all(p: SmtpProvider, messages: list[OutboundMessage]) -> list[Any]:
    try:
        return [await p.send(m) for m in messages]
    finally:
        await p.aclose()


async def send_one_expecting_error(p: SmtpProvider, m: OutboundMessage) -> ProviderError:
    try:
        await p.send(m)
    except ProviderError as exc:
        return exc
    finally:
        await p.aclose()
    raise AssertionError("the send succeeded")


# --------------------------------------------------------------------------------------------
# Configuration


def test_registered_and_configured_with_default_ports() -> None:
    registry = default_registry()
    assert "smtp" in registry.types()
    context = ProviderContext(FakeClock(), "run")
    for security, port in (("starttls", 587), ("tls", 465), ("none", 25)):
        cfg = SmtpProviderConfig.model_validate(
            {"type": "smtp", "host": "mail.example", "security": security})
        p = registry.create("mail", cfg, context)
        assert isinstance(p, SmtpProvider) and isinstance(p, Provider)
        assert p.port == port and p.channels == frozenset({Channel.EMAIL})
        assert p.deduplicates is False and p.pool_size == 4
    cfg = SmtpProviderConfig.model_validate(
        {"type": "smtp", "host": "mail.example", "port": 2525, "concurrency": 9})
    p = registry.create("mail", cfg, context)
    assert isinstance(p, SmtpProvider) and (p.port, p.pool_size, p.security) == (2525, 9, "starttls")


# --------------------------------------------------------------------------------------------
# What arrives


def test_multipart_message_arrives_with_envelope_ids_and_date(smtpd: ServerFactory) -> None:
    server = smtpd()
    clock = FakeClock()
    results = run(send_all(provider(server, clock=clock), [message(1)]))

    [got] = server.sink.received
    assert got.mail_from == "shop@example.com"
    assert got.rcpt_tos == ["person1@example.org"]
    msg = got.message
    assert msg.get_content_type() == "multipart/alternative"
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "text/html"]
    assert body_of(parts[0]) == "Hi Ann,\nspring is here.\n"
    assert body_of(parts[1]) == "<p>Hi Ann,</p>\n"
    expected_id = make_message_id("r1-c1-email", "example.com")
    assert msg["Message-ID"] == expected_id
    assert msg["Date"].datetime == clock.now()
    assert msg["From"] == SENDER and msg["To"] == "person1@example.org"
    assert msg["Subject"] == "Spring sale"
    assert results[0].provider_message_id == expected_id
    assert results[0].status_code == 250 and "queued as Q1" in results[0].detail


@pytest.mark.parametrize(
    ("text", "html", "kind"),
    [("Just text.\n", None, "text/plain"), (None, "<b>Just HTML</b>", "text/html")],
)
def test_single_part_message(smtpd: ServerFactory, text: str | None, html: str | None,
                             kind: str) -> None:
    server = smtpd()
    run(send_all(provider(server), [message(body=content(text=text, html=html))]))
    msg = server.sink.received[0].message
    assert not msg.is_multipart()
    assert msg.get_content_type() == kind
    assert body_of(msg).strip() == (text or html or "").strip()


def test_non_ascii_subject_and_body_are_encoded_and_decode_back(smtpd: ServerFactory) -> None:
    server = smtpd()
    subject = "Grüße aus Köln — 春のセール 🌸 " * 3
    body = content(subject=subject.strip(), text="Schöne Grüße, Zoë 🌸\n", html=None,
                   sender="Zoë Laden <shop@example.com>")
    run(send_all(provider(server), [message(body=body)]))
    got = server.sink.received[0]
    assert got.data.isascii()  # encoded words and quoted-printable, nothing raw
    assert b"=?utf-8?b?" in got.data
    msg = got.message
    assert msg["Subject"] == subject.strip()
    assert msg["From"].addresses[0].display_name == "Zoë Laden"
    assert body_of(msg) == "Schöne Grüße, Zoë 🌸\n"


def test_a_body_line_of_a_single_dot_cannot_end_the_message(smtpd: ServerFactory) -> None:
    # SMTP smuggling: a lone "." line would end DATA and let the rest read as commands.
    server = smtpd()
    text = "before\r\n.\r\nMAIL FROM:<evil@example.com>\r\nRCPT TO:<victim@example.com>\n.\nafter\n"
    run(send_all(provider(server), [message(body=content(text=text, html=None))]))
    assert len(server.sink.received) == 1
    assert body_of(server.sink.received[0].message) == (
        "before\n.\nMAIL FROM:<evil@example.com>\nRCPT TO:<victim@example.com>\n.\nafter\n")


def test_non_ascii_address_uses_smtputf8(smtpd: ServerFactory) -> None:
    server = smtpd(enable_SMTPUTF8=True)
    run(send_all(provider(server), [message(address="zoë@example.org")]))
    [got] = server.sink.received
    assert got.rcpt_tos == ["zoë@example.org"]
    assert got.message["To"] == "zoë@example.org"


def test_non_ascii_address_without_smtputf8_is_permanent(smtpd: ServerFactory) -> None:
    server = smtpd(enable_SMTPUTF8=False)
    p = provider(server)
    error = run(send_one_expecting_error(p, message(address="zoë@example.org")))
    assert isinstance(error, PermanentError) and error.code == "smtputf8"
    assert server.sink.received == []


# --------------------------------------------------------------------------------------------
# Header injection


def email_campaign(tmp_path: Path, port: int) -> Campaign:
    (tmp_path / "t.txt").write_text("Hi {{ first_name }},\nspring is here.\n", encoding="utf-8")
    (tmp_path / "h.html").write_text("<p>Hi {{ first_name }}</p>\n", encoding="utf-8")
    data = {
        "name": "spring-sale",
        "purpose": "transactional",
        "recipients": {"key": "id", "columns": {"email": "email"}},
        "channels": {"email": {"provider": "mail", "from": SENDER,
                               "subject": "Spring sale, {{ first_name }}",
                               "text": "t.txt", "html": "h.html"}},
        "providers": {"mail": {"type": "smtp", "host": "127.0.0.1", "port": port,
                               "security": "none"}},
    }
    return Campaign.model_validate(data, context={"base_dir": tmp_path})


def recipient(first_name: str) -> Recipient:
    fields = {"id": "c1", "first_name": first_name, "email": "ann@example.org"}
    return Recipient(row=1, line=2, key="c1", fields=fields, addresses={})


def test_crlf_in_recipient_data_never_reaches_a_header(smtpd: ServerFactory,
                                                       tmp_path: Path) -> None:
    server = smtpd()
    renderer = Renderer.compile(email_campaign(tmp_path, server.port), "secret")
    # In the subject the render refuses it...
    with pytest.raises(RenderError, match="line break"):
        renderer.render(Channel.EMAIL, recipient(INJECTION), "ann@example.org")
    # ...and were it to get past the renderer, the provider refuses to send it.
    for body, address in [
        (content(subject=f"Hi {INJECTION}"), "ann@example.org"),
        (content(sender=f"Shop {INJECTION} <shop@example.com>"), "ann@example.org"),
        (content(headers=(("X-Name", INJECTION),)), "ann@example.org"),
        (content(), f"ann@example.org{INJECTION[1:]}"),
    ]:
        error = run(send_one_expecting_error(provider(server), message(body=body,
                                                                       address=address)))
        assert isinstance(error, PermanentError), error
        assert error.code in ("bad_message", "bad_address", "bad_sender")
    assert server.sink.received == [] and server.sink.data_commands == 0


def test_crlf_in_a_body_field_stays_in_the_body(smtpd: ServerFactory, tmp_path: Path) -> None:
    server = smtpd()
    campaign = email_campaign(tmp_path, server.port)
    campaign.channels.email.subject = "Spring sale"  # type: ignore[union-attr]
    renderer = Renderer.compile(campaign, "secret")
    body = renderer.render(Channel.EMAIL, recipient(INJECTION), "ann@example.org")
    assert isinstance(body, EmailContent)
    run(send_all(provider(server), [message(body=body, address="ann@example.org")]))
    [got] = server.sink.received
    assert got.rcpt_tos == ["ann@example.org"]
    msg = got.message
    assert msg["Bcc"] is None and b"\r\nBcc:" not in got.data.split(b"\r\n\r\n", 1)[0]
    assert [k for k in msg.keys() if k.lower() == "bcc"] == []
    text = msg.get_body(("plain",))
    assert text is not None and "Bcc: evil@example.com" in body_of(text)


# --------------------------------------------------------------------------------------------
# The pool


def test_sequential_sends_reuse_one_connection(smtpd: ServerFactory) -> None:
    server = smtpd()
    run(send_all(provider(server), [message(i) for i in range(1, 6)]))
    assert len(server.sink.received) == 5
    assert server.sink.ehlos == 1
    assert len({r.peer for r in server.sink.received}) == 1
    assert server.sink.quits == 1  # aclose says goodbye


def test_concurrent_sends_use_at_most_pool_size_connections(smtpd: ServerFactory) -> None:
    server = smtpd()
    p = provider(server, concurrency=3)

    async def scenario() -> None:
        try:
            await asyncio.gather(*(p.send(message(i)) for i in range(1, 21)))
        finally:
            await p.aclose()

    run(scenario())
    assert sorted(r.rcpt_tos[0] for r in server.sink.received) == sorted(
        f"person{i}@example.org" for i in range(1, 21))
    assert 1 <= server.sink.ehlos <= 3
    assert len({r.peer for r in server.sink.received}) <= 3
    ids = {r.message["Message-ID"] for r in server.sink.received}
    assert len(ids) == 20


def test_connection_closed_by_the_server_while_idle_is_replaced(smtpd: ServerFactory) -> None:
    server = smtpd()
    p = provider(server)

    async def scenario() -> None:
        try:
            await p.send(message(1))
            server.close_connections()  # the pooled connection is now dead
            await p.send(message(2))
        finally:
            await p.aclose()

    run(scenario())
    assert [r.rcpt_tos for r in server.sink.received] == [["person1@example.org"],
                                                          ["person2@example.org"]]
    assert server.sink.ehlos == 2


def test_a_refusal_leaves_the_connection_usable(smtpd: ServerFactory) -> None:
    server = smtpd()
    p = provider(server)

    async def scenario() -> None:
        try:
            server.sink.replies["RCPT"] = "550 5.1.1 No such user"
            with pytest.raises(PermanentError):
                await p.send(message(1))
            server.sink.replies.clear()
            await p.send(message(2))
        finally:
            await p.aclose()

    run(scenario())
    assert len(server.sink.received) == 1 and server.sink.ehlos == 1


# --------------------------------------------------------------------------------------------
# Failures


@pytest.mark.parametrize(
    ("command", "reply", "kind", "code"),
    [
        ("RCPT", "451 4.3.0 Try again later", TransientError, "451"),
        ("RCPT", "452 4.2.2 Mailbox full", TransientError, "452"),
        ("DATA", "451 4.3.0 Local error in processing", TransientError, "451"),
        ("MAIL", "421 4.7.0 Too many connections", TransientError, "421"),
        ("RCPT", "550 5.1.1 No such user", PermanentError, "550"),
        ("RCPT", "551 5.1.6 User not local", PermanentError, "551"),
        ("RCPT", "553 5.1.3 Bad mailbox", PermanentError, "553"),
        ("DATA", "552 5.3.4 Message too big", PermanentError, "552"),
        ("DATA", "554 5.7.1 Rejected as spam", PermanentError, "554"),
        ("MAIL", "530 5.7.0 Authentication required", ProviderAuthError, "530"),
        ("MAIL", "553 5.7.1 Sender not allowed", ProviderAuthError, "553"),
    ],
)
def test_reply_codes_map_to_error_classes(smtpd: ServerFactory, command: str, reply: str,
                                         kind: type[ProviderError], code: str) -> None:
    server = smtpd(Sink(replies={command: reply}))
    error = run(send_one_expecting_error(provider(server), message()))
    assert type(error) is kind
    assert error.code == code and error.status == int(code)
    assert reply.split(" ", 1)[1] in error.text


def test_login_refused_is_an_auth_error(smtpd: ServerFactory) -> None:
    sink = Sink()

    def refuse(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
        sink.logins.append((mechanism, data))
        return AuthResult(success=False, handled=False)

    server = smtpd(sink, authenticator=refuse, auth_require_tls=False)
    p = provider(server, username="ann", password="wrong-secret")
    error = run(send_one_expecting_error(p, message()))
    assert isinstance(error, ProviderAuthError)
    assert error.code == "535" and error.status == 535
    assert "wrong-secret" not in str(error)
    assert sink.logins and sink.received == [] and sink.data_commands == 0


def refusing_server(smtpd: ServerFactory) -> Server:
    sink = Sink()

    def refuse(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
        sink.logins.append((mechanism, data))
        return AuthResult(success=False, handled=False)

    return smtpd(sink, authenticator=refuse, auth_require_tls=False)


def test_a_refused_login_is_not_tried_again_by_every_queued_message(smtpd: ServerFactory) -> None:
    # Servers lock an account after a few failed logins: a wrong password costs one connection's
    # login, not one per message waiting for the pool.
    server = refusing_server(smtpd)
    p = provider(server, username="ann", password="wrong-secret", concurrency=4)

    async def scenario() -> list[BaseException | None]:
        try:
            return await asyncio.gather(*(p.send(message(i)) for i in range(1, 21)),
                                        return_exceptions=True)
        finally:
            await p.aclose()

    errors = run(scenario())
    assert all(isinstance(e, ProviderAuthError) and e.code == "535" for e in errors), errors
    assert server.sink.ehlos == 1  # one connection; aiosmtplib tries each offered mechanism
    assert 1 <= len(server.sink.logins) <= 2 and server.sink.data_commands == 0


def test_a_run_with_a_wrong_password_stops_after_a_handful_of_logins(
    smtpd: ServerFactory, make_campaign: CampaignFactory, store_path: Path
) -> None:
    server = refusing_server(smtpd)
    campaign = make_campaign(
        people(60),
        channels={"email": {"provider": "mail", "from": SENDER, "subject": "Hi",
                            "text": "t.txt"}},
        providers={"mail": {"type": "smtp", "host": "127.0.0.1", "port": server.port,
                            "security": "none", "username": "ann", "password": "${SMTP_PW}"}},
        limits={"concurrency": 32},
    )
    (campaign.parent / "t.txt").write_text("Hello {{ first_name }}\n", encoding="utf-8")
    loaded = load_campaign(campaign, {"SMTP_PW": "wrong-secret"})
    report = run_campaign(loaded, store_path, SendOptions(), clock=FakeClock())
    assert report.exit_code == ExitCode.PROVIDER_AUTH
    assert report.counts == {"pending": 60}
    assert len(server.sink.logins) <= 2 and server.sink.received == []


def test_login_accepted_then_sent(smtpd: ServerFactory) -> None:
    sink = Sink()

    def accept(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
        sink.logins.append((mechanism, data))
        return AuthResult(success=data.login == b"ann" and data.password == b"pw")

    server = smtpd(sink, authenticator=accept, auth_require_tls=False)
    run(send_all(provider(server, username="ann", password="pw"), [message(1), message(2)]))
    assert len(sink.received) == 2 and len(sink.logins) == 1


def test_starttls_required_but_not_offered_is_a_clear_auth_error(smtpd: ServerFactory) -> None:
    sink = Sink()
    server = smtpd(sink, authenticator=lambda *a: AuthResult(success=True),
                   auth_require_tls=False)
    p = provider(server, security="starttls", username="ann", password="pw")
    error = run(send_one_expecting_error(p, message()))
    assert isinstance(error, ProviderAuthError) and error.code == "starttls"
    assert "does not offer STARTTLS" in error.text and "security: none" in error.text
    assert sink.logins == [] and sink.data_commands == 0  # no AUTH in the clear


def test_username_without_auth_on_the_server_is_an_auth_error(smtpd: ServerFactory) -> None:
    server = smtpd()
    error = run(send_one_expecting_error(provider(server, username="ann", password="pw"),
                                         message()))
    assert isinstance(error, ProviderAuthError) and error.code == "auth"


class Greeting:
    """A server on 127.0.0.1 that greets with ``reply`` instead of 220 and then, as RFC 5321
    3.1 asks of a 554 greeting, answers every command but QUIT with 503."""

    def __init__(self, reply: str) -> None:
        self.reply = reply
        self.connections = 0

    async def __aenter__(self) -> int:
        self._server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()
        await self._server.wait_closed()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        writer.write(f"{self.reply}\r\n".encode())
        try:
            while line := await reader.readline():
                if line.upper().startswith(b"QUIT"):
                    writer.write(b"221 bye\r\n")
                    break
                writer.write(b"503 5.5.1 no service\r\n")
                await writer.drain()
        finally:
            writer.close()


def greeted(reply: str, **config: Any) -> tuple[ProviderError, int]:
    """What a send meets from a server that greets with ``reply``, and how many connections it
    made."""
    greeting = Greeting(reply)

    async def scenario() -> ProviderError:
        async with greeting as port:
            p = provider(None, port=port, **config)
            first = await send_one_expecting_error(p, message(1))
            return first

    return run(scenario()), greeting.connections


def test_a_5xx_greeting_is_the_server_refusing_us_not_a_passing_fault() -> None:
    """554 in place of the 220 greeting (RFC 5321 3.1: "no SMTP service here", or our address is
    blocked) refuses every message alike: the run must stop with exit 6 and say why, rather
    than retry every recipient into a dead letter."""
    error, _ = greeted("554 5.7.1 No SMTP service here")
    assert isinstance(error, ProviderAuthError)
    assert (error.code, error.status) == ("554", 554)
    assert "554 5.7.1 No SMTP service here" in error.text


def test_a_4xx_greeting_is_transient() -> None:
    error, _ = greeted("421 4.3.2 Service not available, try later")
    assert isinstance(error, TransientError) and error.code == "421"


def test_server_gone_is_transient() -> None:
    error = run(send_one_expecting_error(provider(None), message()))
    assert isinstance(error, TransientError) and error.code == "connect"


def test_server_stopped_after_a_send_is_transient(smtpd: ServerFactory) -> None:
    server = smtpd()
    p = provider(server)

    async def scenario() -> ProviderError:
        await p.send(message(1))
        server.stop()
        return await send_one_expecting_error(p, message(2))

    error = run(scenario())
    assert isinstance(error, TransientError)
    assert error.code in ("connect", "disconnected")


def test_connection_dropped_after_the_message_was_sent_is_in_doubt(smtpd: ServerFactory) -> None:
    server = smtpd(Sink(drop_on_data=True))
    error = run(send_one_expecting_error(provider(server), message()))
    assert isinstance(error, InDoubtError)
    # The server did take the message: exactly why this must not read as a failure.
    assert len(server.sink.received) == 1 and server.sink.data_commands == 1


@pytest.mark.parametrize("fault", ["drop", "stall"])
def test_failure_at_the_data_command_before_its_go_ahead_is_transient(
    smtpd: ServerFactory, fault: str
) -> None:
    # Before the server's 354 not a byte of the message was written: a definite failure, safe
    # to retry or fail over, not a message that may have been queued.
    server = smtpd(Sink(data_command=fault))
    p = provider(server, timeout=0.2)

    async def scenario() -> ProviderError:
        error = await send_one_expecting_error(p, message(1))
        server.sink.data_command = None
        await send_all(provider(server), [message(2)])  # and the server takes the next one
        return error

    error = run(scenario())
    assert type(error) is TransientError
    assert error.code == ("disconnected" if fault == "drop" else "timeout")
    assert server.sink.data_commands == 1
    assert [r.rcpt_tos for r in server.sink.received] == [["person2@example.org"]]


@pytest.mark.parametrize(("stall", "kind"), [("RCPT", TransientError), ("DATA", InDoubtError)])
def test_timeout_before_data_is_transient_and_after_is_in_doubt(
    smtpd: ServerFactory, stall: str, kind: type[ProviderError]
) -> None:
    server = smtpd(Sink(stall=stall))
    error = run(send_one_expecting_error(provider(server, timeout=0.2), message()))
    assert type(error) is kind and error.code == "timeout"
    assert server.sink.data_commands == (1 if stall == "DATA" else 0)


def test_other_channels_are_refused() -> None:
    p = provider(None)
    m = message()
    sms = OutboundMessage(m.run_id, m.row, Channel.SMS, m.recipient_key, "+12015550100",
                          m.idempotency_key, SmsContent("hi", "GSM-7", 1), "h")
    error = run(send_one_expecting_error(p, sms))
    assert isinstance(error, PermanentError)


@pytest.mark.parametrize("address", ["a@b.example>", "<a@b.example", "a b@example.org",
                                     "a@example.org\r\nRCPT TO:<x@y.example>", ""])
def test_an_address_never_breaks_out_of_the_command_line(address: str) -> None:
    from campaign_cli.providers.smtp import _path

    with pytest.raises(ValueError):
        _path(address, utf8=True)
    assert _path("zoë@example.org", utf8=True) == "<zoë@example.org>".encode()
