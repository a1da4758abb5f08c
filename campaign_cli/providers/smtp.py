"""The smtp provider: email through any SMTP server, over a small pool of kept-alive connections.

A send checks a connection out of the pool (opening one when none is idle, at most ``concurrency``
at a time), runs one mail transaction on it (MAIL FROM, RCPT TO, DATA) and checks it back in. The
transaction is driven step by step rather than through ``sendmail`` so that a failure is known to
have happened before or after the message was handed over:

- opening a connection (TCP, greeting, EHLO, STARTTLS, AUTH) fails as `TransientError`, or as
  `ProviderAuthError` when the server refuses our credentials or the HELO name, TLS is missing,
  or it greets or answers STARTTLS with a 5xx code (a 554 greeting: no service for us);
  connections are opened one at a time until one is logged in, and after such a refusal none is
  tried again (each refused login counts towards the account's lockout);
- a reply code is definite: 4xx is `TransientError`; 5xx is `PermanentError`, except 530/534/535
  (authentication) and a refused sender on MAIL FROM, which refuse every message alike and so are
  `ProviderAuthError`;
- a lost connection or a timeout before the server's 354 go-ahead to DATA is `TransientError`
  (nothing of the message was written); once the message is on its way it is `InDoubtError`: the
  server may have queued it;
- a kept-alive connection the server has closed meanwhile shows at MAIL FROM; it is replaced once.

The message bytes come from `campaign_cli.render.email.build_email`; its Message-ID is derived from
the idempotency key, so a resend carries the same Message-ID. SMTP cannot deduplicate.
"""

from __future__ import annotations

import asyncio
import email.utils
import re
import ssl
from typing import Literal

import aiosmtplib

from campaign_cli.clock import Clock
from campaign_cli.config import SmtpProviderConfig
from campaign_cli.errors import (
    InDoubtError,
    PermanentError,
    ProviderAuthError,
    ProviderError,
    TransientError,
)
from campaign_cli.models import Channel, EmailContent, OutboundMessage, SendResult
from campaign_cli.providers.base import ProviderContext
from campaign_cli.render.email import build_email, make_message_id

Security = Literal["starttls", "tls", "none"]

DEFAULT_PORTS: dict[str, int] = {"starttls": 587, "tls": 465, "none": 25}
DEFAULT_POOL_SIZE = 4
_AUTH_CODES = frozenset({530, 534, 535, 538})
# On MAIL FROM these refuse the sender itself (not allowed, no relaying for it): every message
# of the run would be refused alike, so the run stops rather than burning the list.
_SENDER_REFUSED = frozenset({550, 551, 553})
_QUIT_TIMEOUT = 5.0
_DETAIL_LENGTH = 200


class SmtpProvider:
    channels = frozenset({Channel.EMAIL})
    deduplicates = False

    def __init__(
        self,
        name: str,
        *,
        host: str,
        port: int | None = None,
        security: Security = "starttls",
        username: str | None = None,
        password: str | None = None,
        timeout: float = 30.0,
        helo: str | None = None,
        pool_size: int = DEFAULT_POOL_SIZE,
        clock: Clock,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        if pool_size < 1:
            raise ValueError("pool_size must be at least 1")
        self.name = name
        self.host = host
        self.port = port if port is not None else DEFAULT_PORTS[security]
        self.security: Security = security
        self.pool_size = pool_size
        self._username = username
        self._password = password
        self._timeout = timeout
        self._helo = helo
        self._clock = clock
        self._tls_context = tls_context
        self._idle: list[aiosmtplib.SMTP] = []
        self._slots = asyncio.Semaphore(pool_size)
        self._closing = False
        self._sender: tuple[str, str, str] | None = None  # (From, envelope sender, id domain)
        self._opening = asyncio.Lock()  # held while the first connection is opened
        self._proven = False  # a connection has been opened and logged in
        self._refused: ProviderAuthError | None = None  # how the first connection was refused

    @classmethod
    def from_config(
        cls, name: str, config: SmtpProviderConfig, context: ProviderContext
    ) -> SmtpProvider:
        tls_context = context.extras.get("tls_context")
        return cls(
            name,
            host=config.host,
            port=config.port,
            security=config.security,
            username=config.username,
            password=config.password,
            timeout=config.timeout,
            helo=config.helo,
            pool_size=config.concurrency or DEFAULT_POOL_SIZE,
            clock=context.clock,
            tls_context=tls_context if isinstance(tls_context, ssl.SSLContext) else None,
        )

    # ----------------------------------------------------------------------------------------
    # Sending

    async def send(self, message: OutboundMessage) -> SendResult:
        content = message.content
        if not isinstance(content, EmailContent):
            raise PermanentError(
                f"the smtp provider sends email, not {message.channel.value}", code="channel",
                answered=False)
        envelope_from, domain = self._sender_of(content.sender)
        message_id = make_message_id(message.idempotency_key, domain)
        try:
            data = build_email(
                content, to=message.address, message_id=message_id, date=self._clock.now()
            )
        except ValueError as exc:
            raise PermanentError(f"cannot build the message: {exc}", code="bad_message",
                                 answered=False) from None
        utf8 = not (envelope_from.isascii() and message.address.isascii())
        async with self._slots:
            response = await self._transaction(envelope_from, message.address, data, utf8)
        return SendResult(
            provider_message_id=message_id,
            status_code=response.code,
            detail=response.message[:_DETAIL_LENGTH] or None,
        )

    async def _transaction(
        self, sender: str, recipient: str, data: bytes, utf8: bool
    ) -> aiosmtplib.SMTPResponse:
        smtp, reused = await self._checkout()
        step = "MAIL FROM"
        try:
            try:
                await self._mail(smtp, sender, len(data), utf8)
            except aiosmtplib.SMTPServerDisconnected:
                if not reused:
                    raise
                # The server closed the kept-alive connection while it was idle: nothing of this
                # message reached it, so one fresh connection may carry it.
                smtp.close()
                smtp = await self._connect()
                await self._mail(smtp, sender, len(data), utf8)
            step = "RCPT TO"
            reply = await smtp.execute_command(b"RCPT", b"TO:" + _path(recipient, utf8))
            if reply.code not in (250, 251):
                raise aiosmtplib.SMTPRecipientRefused(reply.code, reply.message, recipient)
            step = "DATA command"
            reply = await smtp.execute_command(b"DATA")
            if reply.code != 354:
                raise aiosmtplib.SMTPDataError(reply.code, reply.message)
            step = "DATA"  # the message goes out now: from here a lost reply leaves it in doubt
            response = await _send_message(smtp, data, self._timeout)
        except ProviderError:
            smtp.close()
            raise
        except (aiosmtplib.SMTPException, OSError, ValueError) as exc:
            error = _classify(exc, step)
            await self._recover(smtp, exc)
            raise error from None
        except BaseException:  # cancelled mid-transaction: the session state is unknown
            smtp.close()
            raise
        self._checkin(smtp)
        return response

    async def _mail(self, smtp: aiosmtplib.SMTP, sender: str, size: int, utf8: bool) -> None:
        options = []
        if smtp.supports_extension("size"):
            options.append(f"SIZE={size}")
        if utf8:
            if not smtp.supports_extension("smtputf8"):
                raise aiosmtplib.SMTPNotSupported(
                    "the server does not offer SMTPUTF8, needed for a non-ASCII address"
                )
            options.append("SMTPUTF8")
            if smtp.supports_extension("8bitmime"):
                options.append("BODY=8BITMIME")
        # MAIL and RCPT are written directly rather than through smtp.mail() / smtp.rcpt(), which
        # re-parse each address with email.utils (an eighth of the client's time per message).
        reply = await smtp.execute_command(
            b"MAIL", b"FROM:" + _path(sender, utf8), *(o.encode("ascii") for o in options)
        )
        if reply.code != 250:
            raise aiosmtplib.SMTPSenderRefused(reply.code, reply.message, sender)

    async def _recover(self, smtp: aiosmtplib.SMTP, exc: BaseException) -> None:
        """After a refusal the connection is still good once the envelope is reset."""
        if isinstance(exc, aiosmtplib.SMTPNotSupported) and smtp.is_connected:
            self._checkin(smtp)  # refused before anything was sent
            return
        if not isinstance(exc, aiosmtplib.SMTPResponseException) or not smtp.is_connected:
            smtp.close()
            return
        try:
            await smtp.rset()
        except (aiosmtplib.SMTPException, OSError):
            smtp.close()
            return
        self._checkin(smtp)

    def _sender_of(self, sender: str) -> tuple[str, str]:
        """The envelope sender and the Message-ID domain for a From value (the last one kept)."""
        cached = self._sender
        if cached is not None and cached[0] == sender:
            return cached[1], cached[2]
        address = email.utils.parseaddr(sender)[1]
        if "@" not in address:
            raise PermanentError(f"sender is not an email address: {sender!r}", code="bad_sender",
                                 answered=False)
        domain = address.rpartition("@")[2]
        try:
            domain = domain.encode("idna").decode("ascii")
            make_message_id("x", domain)
        except (UnicodeError, ValueError):
            domain = "campaign.invalid"
        self._sender = (sender, address, domain)
        return address, domain

    # ----------------------------------------------------------------------------------------
    # The pool

    async def _checkout(self) -> tuple[aiosmtplib.SMTP, bool]:
        """An idle connection (reused: True) or a new one. The caller holds a slot."""
        while self._idle:
            smtp = self._idle.pop()
            if smtp.is_connected:
                return smtp, True
            smtp.close()
        return await self._connect(), False

    def _checkin(self, smtp: aiosmtplib.SMTP) -> None:
        if self._closing or not smtp.is_connected:
            smtp.close()
        else:
            self._idle.append(smtp)

    async def _connect(self) -> aiosmtplib.SMTP:
        """A connection ready for MAIL FROM. Until one has been opened they are opened one at a
        time, and once the server refused the first one no other is tried: a wrong password must
        cost one refused login, not one per queued message (which locks accounts)."""
        if not self._proven:
            async with self._opening:
                refused = self._refused
                if refused is not None:
                    raise ProviderAuthError(refused.text, code=refused.code, status=refused.status)
                if not self._proven:
                    try:
                        smtp = await self._open()
                    except ProviderAuthError as exc:
                        self._refused = exc
                        raise
                    self._proven = True
                    return smtp
        return await self._open()

    async def _open(self) -> aiosmtplib.SMTP:
        """A connection ready for MAIL FROM: greeted, encrypted as configured, logged in."""
        tls_context = await self._tls() if self.security != "none" else None
        smtp = aiosmtplib.SMTP(
            hostname=self.host,
            port=self.port,
            local_hostname=self._helo,
            timeout=self._timeout,
            use_tls=self.security == "tls",
            start_tls=False,
            tls_context=tls_context,
        )
        where = f"{self.host}:{self.port}"
        try:
            await smtp.connect()
            self._helo = smtp.local_hostname  # look the FQDN up once, not per connection
            await _greet(smtp)
            if self.security == "starttls":
                if not smtp.supports_extension("starttls"):
                    raise ProviderAuthError(
                        f"SMTP server {where} does not offer STARTTLS; use security: tls for an "
                        "implicit-TLS port (465), or security: none to send unencrypted",
                        code="starttls",
                    )
                await smtp.starttls()
                await _greet(smtp)
            if self._username is not None:
                await self._login(smtp, where)
        except ProviderError:
            smtp.close()
            raise
        except (aiosmtplib.SMTPException, OSError) as exc:
            smtp.close()
            raise _classify_connect(exc, where) from None
        except BaseException:
            smtp.close()
            raise
        return smtp

    async def _login(self, smtp: aiosmtplib.SMTP, where: str) -> None:
        if not smtp.supports_extension("auth"):
            raise ProviderAuthError(
                f"SMTP server {where} does not offer AUTH, but a username is configured",
                code="auth",
            )
        await smtp.login(self._username or "", self._password or "")

    async def _tls(self) -> ssl.SSLContext:
        if self._tls_context is None:
            # Loading the CA store reads files: once per provider, off the event loop.
            self._tls_context = await asyncio.to_thread(ssl.create_default_context)
        return self._tls_context

    async def aclose(self) -> None:
        self._closing = True
        idle, self._idle = self._idle, []
        await asyncio.gather(*(_quit(smtp) for smtp in idle))


# --------------------------------------------------------------------------------------------
# Helpers


_NOT_IN_PATH = frozenset("<> \t\r\n\0")
_LINE_END = re.compile(rb"\r\n|\r|\n")
_DOT_AT_LINE_START = re.compile(rb"(?m)^\.")


def _path(address: str, utf8: bool) -> bytes:
    """``<address>`` for MAIL FROM / RCPT TO; refuses what could break out of the command."""
    if not address or not _NOT_IN_PATH.isdisjoint(address):
        raise ValueError(f"address cannot go on an SMTP command line: {address!r}")
    return b"<" + address.encode("utf-8" if utf8 else "ascii") + b">"


async def _send_message(
    smtp: aiosmtplib.SMTP, data: bytes, timeout: float
) -> aiosmtplib.SMTPResponse:
    """The message after DATA's 354, as ``smtp.data`` sends it (CRLF line ends, dot-stuffed, a
    lone "." at the end), and the server's reply to it."""
    protocol = smtp.protocol
    if protocol is None:
        raise aiosmtplib.SMTPServerDisconnected("Connection lost")
    data = _DOT_AT_LINE_START.sub(b"..", _LINE_END.sub(b"\r\n", data))
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    protocol.write(data + b".\r\n")
    response = await protocol.read_response(timeout=timeout)
    if response.code != 250:
        raise aiosmtplib.SMTPDataError(response.code, response.message)
    return response


async def _greet(smtp: aiosmtplib.SMTP) -> None:
    """EHLO, falling back to HELO for a server that knows no ESMTP."""
    try:
        await smtp.ehlo()
    except aiosmtplib.SMTPHeloError:
        if not smtp.is_connected:
            raise
        await smtp.helo()


async def _quit(smtp: aiosmtplib.SMTP) -> None:
    try:
        if smtp.is_connected:
            await smtp.quit(timeout=_QUIT_TIMEOUT)
    except (aiosmtplib.SMTPException, OSError):
        pass  # closing anyway; a server that cannot say goodbye changes nothing
    finally:
        smtp.close()


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _from_code(code: int, text: str, step: str) -> ProviderError:
    """A definite reply of the server, by its code."""
    status = str(code)
    if 400 <= code < 500:
        return TransientError(text, code=status, status=code)
    if code in _AUTH_CODES:
        return ProviderAuthError(text, code=status, status=code)
    if step == "MAIL FROM" and code in _SENDER_REFUSED:
        return ProviderAuthError(text, code=status, status=code)
    if 500 <= code < 600:
        return PermanentError(text, code=status, status=code)
    # Not an SMTP reply at all: the session is out of step; what the server did is unknown.
    if step == "DATA":
        return InDoubtError(text, code="bad_reply", status=code)
    return TransientError(text, code="bad_reply", status=code)


def _classify(exc: BaseException, step: str) -> ProviderError:
    """A failure during the mail transaction, at ``step`` (MAIL FROM, RCPT TO or DATA)."""
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        text = f"{step}: {exc.code} {exc.message}".strip()
        return _from_code(exc.code, text, step)
    if isinstance(exc, aiosmtplib.SMTPNotSupported):
        return PermanentError(f"{step}: {exc}", code="smtputf8")
    if isinstance(exc, ValueError):  # an address aiosmtplib will not put on a command line
        return PermanentError(f"{step}: {exc}", code="bad_address", action="invalid")
    timed_out = isinstance(exc, (aiosmtplib.SMTPTimeoutError, TimeoutError))
    code = "timeout" if timed_out else "disconnected"
    text = f"{step}: {_describe(exc)}"
    if step == "DATA":
        # The message may have been written in full and queued before the reply was lost.
        return InDoubtError(text, code=code)
    return TransientError(text, code=code)


def _classify_connect(exc: BaseException, where: str) -> ProviderError:
    """A failure while opening a connection: nothing of any message was sent yet."""
    if _caused_by(exc, ssl.SSLCertVerificationError):
        return ProviderAuthError(f"{where}: TLS certificate refused: {exc}", code="tls")
    if isinstance(exc, aiosmtplib.SMTPAuthenticationError):
        text = f"SMTP {where} refused the login: {exc.code} {exc.message}"
        if 400 <= exc.code < 500:
            return TransientError(text, code=str(exc.code), status=exc.code)
        return ProviderAuthError(text, code=str(exc.code), status=exc.code)
    if isinstance(exc, aiosmtplib.SMTPHeloError):
        text = f"SMTP {where} refused HELO/EHLO: {exc.code} {exc.message}"
        if 400 <= exc.code < 500:
            return TransientError(text, code=str(exc.code), status=exc.code)
        return ProviderAuthError(text, code=str(exc.code), status=exc.code)
    if isinstance(exc, aiosmtplib.SMTPResponseException):  # the greeting, STARTTLS
        text = f"SMTP {where}: {exc.code} {exc.message}"
        if 500 <= exc.code < 600:
            # 554 in place of the 220 greeting (RFC 5321 3.1: no service for us, often our
            # address blocked), or STARTTLS refused for good: every message alike.
            return ProviderAuthError(text, code=str(exc.code), status=exc.code)
        return TransientError(text, code=str(exc.code), status=exc.code)
    if isinstance(exc, (aiosmtplib.SMTPTimeoutError, TimeoutError)):
        return TransientError(f"SMTP {where}: {_describe(exc)}", code="timeout")
    if isinstance(exc, aiosmtplib.SMTPServerDisconnected):
        return TransientError(f"SMTP {where}: {_describe(exc)}", code="disconnected")
    if isinstance(exc, (aiosmtplib.SMTPConnectError, OSError)):
        return TransientError(f"SMTP {where}: {_describe(exc)}", code="connect")
    # Anything else aiosmtplib refuses while setting up (no usable AUTH mechanism, ...) is
    # a mismatch between the configuration and the server.
    return ProviderAuthError(f"SMTP {where}: {_describe(exc)}", code="smtp_setup")


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    seen: BaseException | None = exc
    for _ in range(10):
        if seen is None:
            return False
        if isinstance(seen, kind):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
