"""A fake provider server for integration tests: real HTTP/1.1 on 127.0.0.1.

It speaks the shapes of Twilio Messages, SendGrid v3 mail/send, FCM HTTP v1 (and the OAuth token
endpoint), Slack incoming webhooks and our generic webhook, records every request, and injects
faults on demand. It runs its own asyncio loop in a background thread, so a test can host it while
a ``campaign send`` subprocess talks to it, and it outlives that subprocess being SIGKILLed.

Routes (``base_url`` of every HTTP provider = ``server.url``)::

    POST /2010-04-01/Accounts/{sid}/Messages.json   twilio    form, Basic auth   -> 201 message
    POST /v3/mail/send                              sendgrid  JSON, Bearer       -> 202 + X-Message-Id
    POST /v1/projects/{project}/messages:send       fcm       JSON, Bearer       -> 200 {name}
    POST /token                                     token     OAuth JWT-bearer   -> access token
    POST /slack/{anything}                          slack     JSON               -> 200 "ok"
    POST /webhook/{anything}                        webhook   JSON, dedupe by Idempotency-Key

The recipient of a request (used by ``accepted`` and by ``fail_for``): Twilio ``To``, SendGrid
``personalizations[0].to[0].email``, FCM ``message.token`` (or topic / condition), Slack the path
after ``/slack/``, webhook the ``Idempotency-Key`` header (the path after ``/webhook/`` when the
header is missing), token the JWT's ``iss``.

Fault kinds (``server.fail_next`` / ``fail_rate`` / ``fail_for`` / ``fail_always``):

    "latency:<s>"             answer normally after <s> seconds (accepted before the wait, like a
                              provider that commits and then answers slowly)
    "<status>[:<retry>]"      e.g. "500", "503", "408", "429:2": that status shaped like the
                              service's own errors, with Retry-After: <retry> when given (verbatim,
                              so an HTTP date works too)
    "reset"                   read the request, then reset the connection (RST) without answering
    "withhold"                read the request, never answer until the client closes or the
                              server stops
    "accept_then_reset"       accept the message (it counts), then reset
    "withhold_after_accept"   accept the message (it counts), then withhold
    "auth"                    401 in the service's shape (Twilio 20003)
    "twilio:<code>"           Twilio error body with that code (21610, 21211, 21614, 20003 ...)
    "fcm:<errorCode>"         FCM error (UNREGISTERED 404, INVALID_ARGUMENT 400, ...)
    "slack:<text>"            Slack plain-text error (invalid_payload, channel_not_found, ...)

Only the accepting kinds count a message in ``accepted``; a message that met any other fault was
not taken by the server. A rule without ``service`` applies to the message services (not to the
token endpoint: pass ``service="token"`` to fault that one).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import itertools
import json
import math
import random
import re
import secrets
import socket
import ssl
import struct
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.utils import format_datetime
from http import HTTPStatus
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, unquote

import pytest

MESSAGE_SERVICES = ("twilio", "sendgrid", "fcm", "slack", "webhook")
SERVICES = (*MESSAGE_SERVICES, "token")
TRANSIENT_KINDS = ("429:0", "500", "503", "reset")

DEFAULT_TWILIO_SID = "AC" + "0123456789abcdef" * 2
DEFAULT_TWILIO_TOKEN = "twilio-test-token"
DEFAULT_SENDGRID_KEY = "SG.test-key"
DEFAULT_FCM_TOKEN = "fcm-test-access-token"
DEFAULT_PROJECT = "fake-project"
DEFAULT_FROM = "+15005550006"

JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
TWILIO_PATH = re.compile(r"^/2010-04-01/Accounts/([^/]+)/Messages\.json$")
FCM_PATH = re.compile(r"^/v1/projects/([^/]+)/messages:send$")

_ACCEPTING = frozenset({"latency", "accept_then_reset", "withhold_after_accept"})
_SIMPLE = frozenset({"reset", "withhold", "accept_then_reset", "withhold_after_accept", "auth"})

TWILIO_ERRORS: dict[int, tuple[int, str]] = {
    20003: (401, "Authenticate"),
    20404: (404, "The requested resource was not found"),
    20429: (429, "Too Many Requests"),
    21211: (400, "Invalid 'To' Phone Number"),
    21408: (400, "Permission to send an SMS has not been enabled for the region indicated by "
                 "the 'To' number"),
    21602: (400, "Message body is required."),
    21603: (400, "A 'From' phone number is required."),
    21604: (400, "A 'To' phone number is required."),
    21606: (400, "The 'From' phone number provided is not a valid message-capable Twilio phone "
                 "number for this destination/account"),
    21610: (400, "Attempt to send to unsubscribed recipient"),
    21611: (400, "This 'From' number has exceeded the maximum number of queued messages"),
    21614: (400, "'To' number is not a valid mobile number"),
    21617: (400, "The concatenated message body exceeds the 1600 character limit."),
}
FCM_ERRORS: dict[str, tuple[int, str]] = {
    "UNREGISTERED": (404, "NOT_FOUND"),
    "INVALID_ARGUMENT": (400, "INVALID_ARGUMENT"),
    "SENDER_ID_MISMATCH": (403, "PERMISSION_DENIED"),
    "QUOTA_EXCEEDED": (429, "RESOURCE_EXHAUSTED"),
    "UNAVAILABLE": (503, "UNAVAILABLE"),
    "INTERNAL": (500, "INTERNAL"),
    "THIRD_PARTY_AUTH_ERROR": (401, "UNAUTHENTICATED"),
    "UNSPECIFIED_ERROR": (500, "UNKNOWN"),
}
FCM_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
              404: "NOT_FOUND", 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE",
              504: "DEADLINE_EXCEEDED"}
SLACK_ERRORS = {"invalid_payload": 400, "no_text": 400, "action_prohibited": 403,
                "invalid_token": 403, "channel_not_found": 404, "no_service": 404,
                "channel_is_archived": 410, "rate_limited": 429}
_FCM_ERROR_TYPE = "type.googleapis.com/google.firebase.fcm.v1.FcmError"

GSM_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?¡ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    "ÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà")
GSM_EXTENSION = frozenset("^{}\\[]~|€\f")


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the server saw it, and what it did about it."""

    seq: int
    method: str
    path: str
    query: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    time: float  # epoch seconds, when the request was fully read
    monotonic: float
    connection: int  # same number = same TCP connection (keep-alive)
    service: str  # one of SERVICES, or "unknown"
    recipient: str | None
    attempt: int  # earlier requests for the same (service, recipient)
    fault: str | None
    status: int | None  # None: no answer was sent (reset, withhold)
    outcome: str  # "accepted" | "duplicate" | "rejected" | "fault" | "ok" (token, validate_only)

    def header(self, name: str) -> str | None:
        lowered = name.lower()
        for key, value in self.headers:
            if key.lower() == lowered:
                return value
        return None

    def json(self) -> Any:
        return json.loads(self.body)

    def form(self) -> dict[str, list[str]]:
        return parse_qs(self.body.decode("utf-8", "replace"), keep_blank_values=True)


@dataclass
class _Request:
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    hmap: dict[str, str]
    body: bytes
    path: str = ""
    query: str = ""

    def keep_alive(self) -> bool:
        conn = self.hmap.get("connection", "").lower()
        if self.version == "HTTP/1.0":
            return "keep-alive" in conn
        return "close" not in conn


@dataclass
class _Response:
    status: int
    body: bytes = b""
    content_type: str | None = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)

    def encode(self, close: bool) -> bytes:
        lines = [f"HTTP/1.1 {self.status} {_phrase(self.status)}", "Server: fake-provider",
                 f"Content-Length: {len(self.body)}"]
        if self.content_type is not None:
            lines.append(f"Content-Type: {self.content_type}")
        lines.extend(f"{k}: {v}" for k, v in self.headers)
        if close:
            lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + self.body


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def _json(status: int, obj: Any, headers: list[tuple[str, str]] | None = None) -> _Response:
    return _Response(status, json.dumps(obj).encode(), "application/json", headers or [])


class _BadRequest(Exception):
    def __init__(self, status: int = 400) -> None:
        super().__init__(status)
        self.status = status


# --------------------------------------------------------------------------- faults


def parse_kind(kind: str) -> tuple[str, str]:
    """Split and check a fault kind: ("latency", "0.5"), ("status", "429:2"), ("reset", "") ..."""
    if kind in _SIMPLE:
        return kind, ""
    head, sep, arg = kind.partition(":")
    if head == "latency" and sep:
        if not math.isfinite(float(arg)) or float(arg) < 0:
            raise ValueError(f"bad latency in fault kind {kind!r}")
        return "latency", arg
    if re.fullmatch(r"[1-5]\d\d", head):
        return "status", kind
    if head == "twilio" and arg.isdigit():
        return "twilio", arg
    if head == "fcm" and arg in FCM_ERRORS:
        return "fcm", arg
    if head == "slack" and arg:
        return "slack", arg
    raise ValueError(f"unknown fault kind {kind!r}")


@dataclass
class _Rule:
    kind: str
    service: str | None
    remaining: float  # math.inf = always

    def matches(self, service: str) -> bool:
        if self.service is None:
            return service in MESSAGE_SERVICES
        return service == self.service


@dataclass
class _RateRule:
    rate: float
    kinds: tuple[str, ...]
    service: str | None
    seed: int | str | None
    rng: random.Random

    def matches(self, service: str) -> bool:
        if self.service is None:
            return service in MESSAGE_SERVICES
        return service == self.service

    def draw(self, service: str, recipient: str, attempt: int) -> str | None:
        if self.seed is None:
            u, pick = self.rng.random(), self.rng.randrange(len(self.kinds))
        else:
            # A function of (seed, service, recipient, attempt), not of arrival order: the same
            # messages meet the same faults however the client interleaves them.
            digest = hashlib.sha256(
                f"{self.seed}\0{service}\0{recipient}\0{attempt}".encode()).digest()
            u = int.from_bytes(digest[:8], "big") / 2.0**64
            pick = int.from_bytes(digest[8:16], "big") % len(self.kinds)
        return self.kinds[pick] if u < self.rate else None


class FaultPlan:
    """What goes wrong next. Precedence: fail_for rules, then fail_next/fail_always in the order
    they were added, then fail_rate rules. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._for: dict[str, list[_Rule]] = {}
        self._next: list[_Rule] = []
        self._rates: list[_RateRule] = []

    def fail_next(self, n: int, kind: str, *, service: str | None = None) -> None:
        """The next n matching requests meet ``kind``."""
        parse_kind(kind)
        if n > 0:
            with self._lock:
                self._next.append(_Rule(kind, service, n))

    def fail_always(self, kind: str, *, service: str | None = None) -> None:
        """Every matching request meets ``kind`` until ``clear()``."""
        parse_kind(kind)
        with self._lock:
            self._next.append(_Rule(kind, service, math.inf))

    def fail_for(self, recipient: str, kind: str, *, times: int | None = None,
                 service: str | None = None) -> None:
        """Requests for ``recipient`` meet ``kind`` (every time, or ``times`` times)."""
        parse_kind(kind)
        with self._lock:
            self._for.setdefault(recipient, []).append(
                _Rule(kind, service, math.inf if times is None else times))

    def fail_rate(self, rate: float, kinds: Sequence[str] = TRANSIENT_KINDS, *,
                  seed: int | str | None = None, service: str | None = None) -> None:
        """Each matching request meets one of ``kinds`` with probability ``rate``. With a seed the
        choice is a function of (seed, service, recipient, attempt number of that recipient)."""
        if not 0.0 <= rate <= 1.0 or not kinds:
            raise ValueError("rate must be within [0, 1] and kinds not empty")
        for kind in kinds:
            parse_kind(kind)
        with self._lock:
            self._rates.append(_RateRule(rate, tuple(kinds), service, seed, random.Random(seed)))

    def clear(self) -> None:
        with self._lock:
            self._for.clear()
            self._next.clear()
            self._rates.clear()

    def decide(self, service: str, recipient: str, attempt: int) -> str | None:
        with self._lock:
            for rule in self._for.get(recipient, ()):
                if rule.remaining > 0 and rule.matches(service):
                    rule.remaining -= 1
                    return rule.kind
            for rule in self._next:
                if rule.matches(service):
                    rule.remaining -= 1
                    if rule.remaining <= 0:
                        self._next.remove(rule)
                    return rule.kind
            for rate in self._rates:
                if rate.matches(service):
                    kind = rate.draw(service, recipient, attempt)
                    if kind is not None:
                        return kind
        return None


# --------------------------------------------------------------------------- helpers


def sms_segments(body: str) -> int:
    """Segments as Twilio would count them (GSM-7 153/160, else UCS-2 67/70); approximate."""
    if all(c in GSM_BASIC or c in GSM_EXTENSION for c in body):
        units = sum(2 if c in GSM_EXTENSION else 1 for c in body)
        single, multi = 160, 153
    else:
        units = len(body.encode("utf-16-le")) // 2
        single, multi = 70, 67
    return 1 if units <= single else math.ceil(units / multi)


def _b64url_json(part: str) -> Any:
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


def _bearer(req: _Request) -> str | None:
    auth = req.hmap.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def _basic(req: _Request) -> tuple[str, str] | None:
    scheme, _, encoded = req.hmap.get("authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, sep, password = base64.b64decode(encoded.strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return (user, password) if sep else None


def _form(req: _Request) -> dict[str, list[str]]:
    if "application/x-www-form-urlencoded" not in req.hmap.get("content-type", "").lower():
        return {}
    return parse_qs(req.body.decode("utf-8", "replace"), keep_blank_values=True)


def _load_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None


# --------------------------------------------------------------------------- the server


class FakeProviderServer:
    """See the module docstring. ``start()`` binds 127.0.0.1 on a free port; ``url`` is then
    ``http://127.0.0.1:PORT``. Use as a context manager or through the ``fake_server`` fixture."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        twilio_account_sid: str = DEFAULT_TWILIO_SID,
        twilio_auth_token: str = DEFAULT_TWILIO_TOKEN,
        twilio_api_key: tuple[str, str] | None = None,
        sendgrid_api_key: str = DEFAULT_SENDGRID_KEY,
        fcm_project: str = DEFAULT_PROJECT,
        fcm_access_token: str | None = DEFAULT_FCM_TOKEN,
        token_expires_in: int = 3600,
        check_auth: bool = True,
        latency: float = 0.0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.host = host
        self.tls = tls  # serve HTTPS with this context
        self.port = port
        self.twilio_account_sid = twilio_account_sid
        self.twilio_auth_token = twilio_auth_token
        self.twilio_api_key = twilio_api_key
        self.sendgrid_api_key = sendgrid_api_key
        self.fcm_project = fcm_project
        self.fcm_access_token = fcm_access_token
        self.token_expires_in = token_expires_in
        self.check_auth = check_auth
        self.latency = latency  # added before every answer
        self.faults = FaultPlan()
        self.errors: list[str] = []  # tracebacks of the server's own bugs: tests assert empty

        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._requests: list[RecordedRequest] = []
        self._accepted: dict[str, list[str]] = {s: [] for s in SERVICES}
        self._duplicates: dict[str, list[str]] = {s: [] for s in SERVICES}
        self._attempts: Counter[tuple[str, str]] = Counter()
        self._webhook_answers: dict[str, bytes] = {}
        self._tokens: set[str] = set()
        self._revoked: set[str] = set()
        self.token_claims: list[dict[str, Any]] = []
        self._seq = itertools.count()
        self._conn_ids = itertools.count(1)
        self._fcm_ids = itertools.count(1)

        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop_event: asyncio.Event | None = None
        self._start_error: BaseException | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    # ----------------------------------------------------------------- lifecycle

    @property
    def url(self) -> str:
        if not self.port:
            raise RuntimeError("server not started")
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    def start(self) -> FakeProviderServer:
        if self._thread is not None:
            raise RuntimeError("server already started")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="fake-provider-server",
                                        daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout=10):
            raise RuntimeError("fake provider server did not start")
        if self._start_error is not None:
            self._thread.join()
            raise RuntimeError("fake provider server failed to start") from self._start_error
        return self

    def stop(self) -> None:
        """Close the listener and every connection (withheld ones included), join the thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if thread.is_alive() and self._stop_event is not None:
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(self._stop_event.set)
        thread.join(timeout=10)
        self._thread = None

    def __enter__(self) -> FakeProviderServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def _run(self) -> None:
        assert self._loop is not None
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._serve())
        except BaseException as exc:  # reported by start() or kept in errors
            if not self._ready.is_set():
                self._start_error = exc
            else:
                self.errors.append(traceback.format_exc())
        finally:
            self._ready.set()
            self._loop.close()

    async def _serve(self) -> None:
        self._stop_event = asyncio.Event()
        server = await asyncio.start_server(self._handle, self.host, self.port, backlog=1024,
                                            ssl=self.tls)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            await self._stop_event.wait()
        finally:
            server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await server.wait_closed()

    # ----------------------------------------------------------------- faults (shortcuts)

    def fail_next(self, n: int, kind: str, *, service: str | None = None) -> None:
        self.faults.fail_next(n, kind, service=service)

    def fail_always(self, kind: str, *, service: str | None = None) -> None:
        self.faults.fail_always(kind, service=service)

    def fail_for(self, recipient: str, kind: str, *, times: int | None = None,
                 service: str | None = None) -> None:
        self.faults.fail_for(recipient, kind, times=times, service=service)

    def fail_rate(self, rate: float, kinds: Sequence[str] = TRANSIENT_KINDS, *,
                  seed: int | str | None = None, service: str | None = None) -> None:
        self.faults.fail_rate(rate, kinds, seed=seed, service=service)

    def clear_faults(self) -> None:
        self.faults.clear()

    # ----------------------------------------------------------------- records

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def requests_for(self, service: str) -> list[RecordedRequest]:
        with self._lock:
            return [r for r in self._requests if r.service == service]

    def accepted(self, service: str) -> list[str]:
        """Recipients of the messages the server took, in order; a repeat is a second message
        (except for the webhook, whose repeated keys go to ``duplicates``)."""
        with self._lock:
            return list(self._accepted[service])

    def accepted_counts(self, service: str) -> Counter[str]:
        with self._lock:
            return Counter(self._accepted[service])

    def duplicates(self, service: str) -> list[str]:
        """Deliveries answered as repeats of an accepted idempotency key, not taken again."""
        with self._lock:
            return list(self._duplicates[service])

    def reset_records(self) -> None:
        """Forget requests, acceptances, duplicates and attempt counts (not faults or tokens)."""
        with self._lock:
            self._requests.clear()
            self._attempts.clear()
            self._webhook_answers.clear()
            self.token_claims.clear()
            for service in SERVICES:
                self._accepted[service].clear()
                self._duplicates[service].clear()

    def wait_for_requests(self, n: int, timeout: float = 10.0,
                          where: Callable[[RecordedRequest], bool] | None = None) -> bool:
        """Block until at least n recorded requests (matching ``where``); False on timeout."""
        def enough() -> bool:
            found = self._requests if where is None else [r for r in self._requests if where(r)]
            return len(found) >= n

        with self._changed:
            return self._changed.wait_for(enough, timeout=timeout)

    @property
    def issued_tokens(self) -> list[str]:
        with self._lock:
            return sorted(self._tokens)

    def revoke_tokens(self) -> None:
        """Access tokens issued so far stop working (FCM answers 401 UNAUTHENTICATED)."""
        with self._lock:
            self._revoked |= self._tokens
            self._tokens.clear()

    def provider_config(self, service: str, **overrides: Any) -> dict[str, Any]:
        """A provider entry for a campaign file pointing at this server; an override of None
        removes the key (e.g. ``from_=None, messaging_service_sid="MG..."``: use ``from_``)."""
        configs: dict[str, dict[str, Any]] = {
            "twilio": {"type": "twilio", "base_url": self.url,
                       "account_sid": self.twilio_account_sid,
                       "auth_token": self.twilio_auth_token, "from": DEFAULT_FROM},
            "sendgrid": {"type": "sendgrid", "base_url": self.url,
                         "api_key": self.sendgrid_api_key},
            "fcm": {"type": "fcm", "base_url": self.url, "project_id": self.fcm_project,
                    "access_token": self.fcm_access_token, "token_url": f"{self.url}/token"},
            "slack": {"type": "slack", "url": f"{self.url}/slack/T000/B000/XXXX"},
            "webhook": {"type": "webhook", "url": f"{self.url}/webhook/hook",
                        "secret": "whsec-test"},
        }
        config = dict(configs[service])
        for key, value in overrides.items():
            key = "from" if key == "from_" else key
            if value is None:
                config.pop(key, None)
            else:
                config[key] = value
        return config

    # ----------------------------------------------------------------- connection handling

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        conn_id = next(self._conn_ids)
        try:
            while True:
                try:
                    req = await self._read_request(reader)
                except _BadRequest as bad:
                    writer.write(_json(bad.status, {"error": "bad request"}).encode(close=True))
                    await writer.drain()
                    break
                if req is None:
                    break
                if not await self._respond(req, conn_id, reader, writer):
                    break
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass  # the client went away (timed out, or its process was killed)
        except asyncio.CancelledError:
            pass  # server stopping
        except Exception:
            self.errors.append(traceback.format_exc())
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _read_request(self, reader: asyncio.StreamReader) -> _Request | None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None  # EOF between requests
        except asyncio.LimitOverrunError as exc:
            raise _BadRequest(431) from exc
        lines = head[:-4].decode("latin-1").lstrip("\r\n").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise _BadRequest(400)
        method, target, version = parts
        headers: list[tuple[str, str]] = []
        hmap: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                raise _BadRequest(400)
            name, value = name.strip(), value.strip()
            headers.append((name, value))
            key = name.lower()
            hmap[key] = f"{hmap[key]}, {value}" if key in hmap else value
        if "chunked" in hmap.get("transfer-encoding", "").lower():
            body = await self._read_chunked(reader)
        elif "content-length" in hmap:
            try:
                length = int(hmap["content-length"])
            except ValueError as exc:
                raise _BadRequest(400) from exc
            body = await reader.readexactly(length)
        else:
            body = b""
        path, _, query = target.partition("?")
        return _Request(method, target, version, headers, hmap, body, unquote(path), query)

    @staticmethod
    async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
        chunks: list[bytes] = []
        while True:
            size_line = await reader.readuntil(b"\r\n")
            try:
                size = int(size_line.split(b";")[0].strip(), 16)
            except ValueError as exc:
                raise _BadRequest(400) from exc
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass  # trailers
                return b"".join(chunks)
            chunks.append(await reader.readexactly(size))
            await reader.readexactly(2)

    async def _respond(self, req: _Request, conn_id: int, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> bool:
        now, mono = time.time(), time.monotonic()
        service, recipient = self._classify(req)
        with self._lock:
            key = (service, recipient or "")
            attempt = self._attempts[key]
            self._attempts[key] += 1
        fault = (self.faults.decide(service, recipient or "", attempt)
                 if service in SERVICES and req.method == "POST" else None)
        action, arg = parse_kind(fault) if fault is not None else ("", "")

        response: _Response | None
        with self._lock:
            if fault is None or action in _ACCEPTING:
                response, outcome = self._handle_service(req, service)
            else:
                response, outcome = self._fault_response(service, action, arg), "fault"
            if action in ("reset", "withhold", "accept_then_reset", "withhold_after_accept"):
                response = None
            self._requests.append(RecordedRequest(
                seq=next(self._seq), method=req.method, path=req.path, query=req.query,
                headers=tuple(req.headers), body=req.body, time=now, monotonic=mono,
                connection=conn_id, service=service, recipient=recipient, attempt=attempt,
                fault=fault, status=None if response is None else response.status,
                outcome=outcome))
            self._changed.notify_all()

        if self.latency > 0:
            await asyncio.sleep(self.latency)
        if action == "latency":
            await asyncio.sleep(float(arg))
        if action in ("reset", "accept_then_reset"):
            sock = writer.get_extra_info("socket")
            if sock is not None:
                # linger 0: close() sends RST, the client sees "connection reset"
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return False
        if action in ("withhold", "withhold_after_accept"):
            await reader.read()  # until the client gives up (EOF) or stop() cancels us
            return False
        assert response is not None
        keep = req.keep_alive()
        writer.write(response.encode(close=not keep))
        await writer.drain()
        return keep

    def _classify(self, req: _Request) -> tuple[str, str | None]:
        path = req.path
        if TWILIO_PATH.match(path):
            to = _form(req).get("To")
            return "twilio", to[0] if to else None
        if path == "/v3/mail/send":
            data = _load_json(req.body)
            try:
                return "sendgrid", str(data["personalizations"][0]["to"][0]["email"])
            except (KeyError, IndexError, TypeError):
                return "sendgrid", None
        if FCM_PATH.match(path):
            data = _load_json(req.body)
            message = data.get("message") if isinstance(data, dict) else None
            if isinstance(message, dict):
                for target in ("token", "topic", "condition"):
                    if isinstance(message.get(target), str):
                        return "fcm", message[target]
            return "fcm", None
        if path == "/token":
            assertion = _form(req).get("assertion", [""])[0]
            try:
                return "token", str(_b64url_json(assertion.split(".")[1])["iss"])
            except (IndexError, KeyError, ValueError, TypeError, binascii.Error):
                return "token", None
        if path.startswith("/slack/"):
            return "slack", path[len("/slack/"):]
        if path.startswith("/webhook/"):
            return "webhook", req.hmap.get("idempotency-key") or path[len("/webhook/"):]
        return "unknown", None

    # ----------------------------------------------------------------- services (under _lock)

    def _handle_service(self, req: _Request, service: str) -> tuple[_Response, str]:
        if service == "unknown":
            return _json(404, {"error": "not found", "path": req.path}), "rejected"
        if req.method != "POST":
            return _json(405, {"error": "method not allowed"}, [("Allow", "POST")]), "rejected"
        handler = {"twilio": self._twilio, "sendgrid": self._sendgrid, "fcm": self._fcm,
                   "token": self._token, "slack": self._slack, "webhook": self._webhook}[service]
        return handler(req)

    def _accept(self, service: str, recipients: Iterable[str]) -> None:
        self._accepted[service].extend(recipients)

    def _twilio(self, req: _Request) -> tuple[_Response, str]:
        match = TWILIO_PATH.match(req.path)
        assert match is not None
        credentials = _basic(req)
        allowed = {(self.twilio_account_sid, self.twilio_auth_token)}
        if self.twilio_api_key is not None:
            allowed.add(self.twilio_api_key)
        if self.check_auth and credentials not in allowed:
            return self._fault_response("twilio", "twilio", "20003"), "rejected"
        if match.group(1) != self.twilio_account_sid:
            return self._fault_response("twilio", "twilio", "20404"), "rejected"
        form = _form(req)

        def first(name: str) -> str | None:
            values = form.get(name)
            return values[0] if values else None

        to, sender, service_sid = first("To"), first("From"), first("MessagingServiceSid")
        body, media = first("Body"), form.get("MediaUrl")
        code = (21604 if not to else 21603 if not (sender or service_sid)
                else 21602 if not (body or media or first("ContentSid"))
                else 21617 if body is not None and len(body) > 1600 else None)
        if code is not None:
            return self._fault_response("twilio", "twilio", str(code)), "rejected"
        assert to is not None
        sid = "SM" + secrets.token_hex(16)
        stamp = format_datetime(datetime.now(timezone.utc))
        base = f"/2010-04-01/Accounts/{self.twilio_account_sid}/Messages/{sid}"
        self._accept("twilio", [to])
        return _json(201, {
            "account_sid": self.twilio_account_sid, "api_version": "2010-04-01",
            "body": body or "", "date_created": stamp, "date_sent": None, "date_updated": stamp,
            "direction": "outbound-api", "error_code": None, "error_message": None,
            "from": sender, "messaging_service_sid": service_sid,
            "num_media": str(len(media or [])), "num_segments": str(sms_segments(body or "")),
            "price": None, "price_unit": "USD", "sid": sid,
            "status": "queued" if sender else "accepted",
            "subresource_uris": {"media": f"{base}/Media.json"}, "to": to, "uri": f"{base}.json",
        }), "accepted"

    def _sendgrid(self, req: _Request) -> tuple[_Response, str]:
        if self.check_auth and _bearer(req) != self.sendgrid_api_key:
            return self._fault_response("sendgrid", "auth", ""), "rejected"

        def bad(message: str, where: str | None) -> tuple[_Response, str]:
            return _json(400, {"errors": [{"message": message, "field": where,
                                           "help": None}]}), "rejected"

        data = _load_json(req.body)
        if not isinstance(data, dict):
            return bad("Bad Request", None)
        personalizations = data.get("personalizations")
        if not isinstance(personalizations, list) or not personalizations:
            return bad("The personalizations field is required and must have at least one "
                       "personalization.", "personalizations")
        recipients: list[str] = []
        for i, p in enumerate(personalizations):
            tos = p.get("to") if isinstance(p, dict) else None
            if (not isinstance(tos, list) or not tos
                    or not all(isinstance(t, dict) and "@" in str(t.get("email", ""))
                               for t in tos)):
                return bad("The to array is required for all personalization objects, and must "
                           "have at least one email object with a valid email address.",
                           f"personalizations.{i}.to")
            recipients.extend(str(t["email"]) for t in tos)
        sender = data.get("from")
        if not isinstance(sender, dict) or "@" not in str(sender.get("email", "")):
            return bad("The from object must be provided for every email send.", "from")
        template = data.get("template_id")
        if not template and not data.get("subject") and not all(
                isinstance(p, dict) and p.get("subject") for p in personalizations):
            return bad("The subject is required.", "subject")
        content = data.get("content")
        if not template and (not isinstance(content, list) or not content):
            return bad("Unless a valid template_id is provided, the content parameter is "
                       "required.", "content")
        if isinstance(content, list):
            types = [c.get("type") if isinstance(c, dict) else None for c in content]
            if "text/plain" in types and types[0] != "text/plain":
                return bad("If present, text/plain must be first, followed by text/html, "
                           "followed by any other content.", "content.0.type")
        self._accept("sendgrid", recipients)
        message_id = base64.urlsafe_b64encode(secrets.token_bytes(16)).decode()[:22]
        return _Response(202, b"", None, [("X-Message-Id", message_id)]), "accepted"

    def _fcm(self, req: _Request) -> tuple[_Response, str]:
        match = FCM_PATH.match(req.path)
        assert match is not None
        token = _bearer(req)
        if self.check_auth and not (token is not None and (
                token in self._tokens or (token == self.fcm_access_token
                                          and token not in self._revoked))):
            return self._fault_response("fcm", "auth", ""), "rejected"
        if match.group(1) != self.fcm_project:
            return self._fault_response("fcm", "fcm", "SENDER_ID_MISMATCH"), "rejected"
        data = _load_json(req.body)
        message = data.get("message") if isinstance(data, dict) else None

        def invalid(text: str) -> tuple[_Response, str]:
            return _json(400, {"error": {
                "code": 400, "message": text, "status": "INVALID_ARGUMENT",
                "details": [{"@type": _FCM_ERROR_TYPE, "errorCode": "INVALID_ARGUMENT"}]}}), \
                "rejected"

        if not isinstance(message, dict):
            return invalid("Request contains an invalid argument.")
        targets = [t for t in ("token", "topic", "condition") if message.get(t)]
        if len(targets) != 1:
            return invalid("Exactly one of token, topic or condition must be given.")
        payload = message.get("data", {})
        if not isinstance(payload, dict) or not all(isinstance(v, str) for v in payload.values()):
            return invalid("Invalid value at 'message.data': values must be strings.")
        if len(json.dumps(message).encode()) > 4096:
            return invalid("Message is too big.")
        name = f"projects/{self.fcm_project}/messages/0:{next(self._fcm_ids)}%{secrets.token_hex(8)}"
        if data.get("validate_only") is True:
            return _json(200, {"name": f"projects/{self.fcm_project}/messages/fake_message_id"}), "ok"
        self._accept("fcm", [str(message[targets[0]])])
        return _json(200, {"name": name}), "accepted"

    def _token(self, req: _Request) -> tuple[_Response, str]:
        form = _form(req)
        if form.get("grant_type", [""])[0] != JWT_BEARER:
            return _json(400, {"error": "unsupported_grant_type",
                               "error_description": "Invalid grant_type"}), "rejected"
        parts = form.get("assertion", [""])[0].split(".")
        try:
            header, claims = _b64url_json(parts[0]), _b64url_json(parts[1])
            valid = (len(parts) == 3 and isinstance(header, dict) and isinstance(claims, dict)
                     and header.get("alg") == "RS256"
                     and all(k in claims for k in ("iss", "scope", "aud", "iat", "exp"))
                     and float(claims["exp"]) > float(claims["iat"]))
        except (IndexError, ValueError, TypeError, binascii.Error):
            valid = False
        if not valid:
            return _json(400, {"error": "invalid_grant",
                               "error_description": "Invalid JWT assertion"}), "rejected"
        self.token_claims.append(claims)
        token = f"ya29.fake-{secrets.token_hex(12)}"
        self._tokens.add(token)
        return _json(200, {"access_token": token, "expires_in": self.token_expires_in,
                           "token_type": "Bearer"}), "ok"

    def _slack(self, req: _Request) -> tuple[_Response, str]:
        data = _load_json(req.body)
        if not isinstance(data, dict):
            return _Response(400, b"invalid_payload", "text/html"), "rejected"
        if not (data.get("text") or data.get("blocks") or data.get("attachments")):
            return _Response(400, b"no_text", "text/html"), "rejected"
        self._accept("slack", [req.path[len("/slack/"):]])
        return _Response(200, b"ok", "text/html"), "accepted"

    def _webhook(self, req: _Request) -> tuple[_Response, str]:
        if "json" in req.hmap.get("content-type", "") and _load_json(req.body) is None:
            return _json(400, {"error": "invalid JSON"}), "rejected"
        key = req.hmap.get("idempotency-key")
        recipient = key or req.path[len("/webhook/"):]
        if key is not None and key in self._webhook_answers:
            self._duplicates["webhook"].append(key)
            return _Response(200, self._webhook_answers[key], "application/json",
                             [("Idempotent-Replayed", "true")]), "duplicate"
        answer = json.dumps({"ok": True, "id": secrets.token_hex(8)}).encode()
        if key is not None:
            self._webhook_answers[key] = answer
        self._accept("webhook", [recipient])
        return _Response(200, answer, "application/json"), "accepted"

    # ----------------------------------------------------------------- error shapes

    def _fault_response(self, service: str, action: str, arg: str) -> _Response:
        """The answer for a non-accepting fault (reset/withhold answers are dropped later)."""
        if action == "twilio":
            code = int(arg)
            status, message = TWILIO_ERRORS.get(code, (400, f"Error {code}"))
            headers = [("WWW-Authenticate", 'Basic realm="Twilio API"')] if status == 401 else []
            return _json(status, {"code": code, "message": message, "status": status,
                                  "more_info": f"https://www.twilio.com/docs/errors/{code}"},
                         headers)
        if action == "fcm":
            status, text = FCM_ERRORS[arg]
            return _json(status, {"error": {
                "code": status, "message": f"{arg} (fake)", "status": text,
                "details": [{"@type": _FCM_ERROR_TYPE, "errorCode": arg}]}})
        if action == "slack":
            return _Response(SLACK_ERRORS.get(arg, 400), arg.encode(), "text/html")
        if action == "auth":
            return self._status_response(service, 401, None)
        if action == "status":
            status_text, _, retry_after = arg.partition(":")
            return self._status_response(service, int(status_text), retry_after or None)
        return _Response(204, b"", None)  # reset / withhold: never sent

    @staticmethod
    def _status_response(service: str, status: int, retry_after: str | None) -> _Response:
        headers = [("Retry-After", retry_after)] if retry_after is not None else []
        phrase = _phrase(status)
        if service == "twilio":
            code = {401: 20003, 404: 20404, 429: 20429}.get(status, 20000 + status)
            message = TWILIO_ERRORS.get(code, (status, phrase))[1]
            if status == 401:
                headers.append(("WWW-Authenticate", 'Basic realm="Twilio API"'))
            return _json(status, {"code": code, "message": message, "status": status,
                                  "more_info": f"https://www.twilio.com/docs/errors/{code}"},
                         headers)
        if service == "sendgrid":
            message = {401: "The provided authorization grant is invalid, expired, or revoked",
                       429: "too many requests"}.get(status, phrase)
            return _json(status, {"errors": [{"message": message, "field": None,
                                              "help": None}]}, headers)
        if service == "fcm":
            error: dict[str, Any] = {"code": status, "message": phrase,
                                     "status": FCM_STATUS.get(status, "UNKNOWN")}
            if status == 429:
                error["details"] = [{"@type": _FCM_ERROR_TYPE, "errorCode": "QUOTA_EXCEEDED"}]
            return _json(status, {"error": error}, headers)
        if service == "slack":
            text = {401: "invalid_token", 429: "rate_limited"}.get(
                status, phrase.lower().replace(" ", "_"))
            return _Response(status, text.encode(), "text/html", headers)
        if service == "token" and status in (400, 401):
            return _json(status, {"error": "invalid_grant",
                                  "error_description": "Invalid JWT Signature."}, headers)
        return _json(status, {"error": phrase}, headers)


# --------------------------------------------------------------------------- fixtures


# Registered under the names "fake_server" / "fake_server_factory" but defined under other names,
# so a test module can import them and take ``fake_server`` as a parameter without ruff's F811:
#     from tests.fakeserver import fake_server_fixture  # noqa: F401


@pytest.fixture(name="fake_server")
def fake_server_fixture() -> Iterator[FakeProviderServer]:
    """A started FakeProviderServer with default credentials; stopped after the test."""
    with FakeProviderServer() as server:
        yield server
    assert not server.errors, "fake server bugs:\n" + "\n".join(server.errors)


@pytest.fixture(name="fake_server_factory")
def fake_server_factory_fixture() -> Iterator[Callable[..., FakeProviderServer]]:
    """Start several servers (e.g. primary and secondary for failover): factory(**kwargs)."""
    servers: list[FakeProviderServer] = []

    def make(**kwargs: Any) -> FakeProviderServer:
        server = FakeProviderServer(**kwargs).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()
    errors = [e for s in servers for e in s.errors]
    assert not errors, "fake server bugs:\n" + "\n".join(errors)


# The plain names work too (``from tests.fakeserver import fake_server``), but then ruff reports
# F811 on every test that takes the fixture as a parameter.
fake_server = fake_server_fixture
fake_server_factory = fake_server_factory_fixture
