"""What every HTTP provider shares: the client, the transport, and the translation of HTTP answers
and transport failures into the error classes of `campaign_cli.errors` (STYLE.md 5).

An adapter (twilio.py, sendgrid.py, ...) has two pure methods, so unit tests can drive it through
`httpx.MockTransport` and check the requests against the providers' OpenAPI specs:

    build(message) -> httpx.Request          the request for one message
    parse(message, response) -> SendResult   or raises TransientError / RateLimitedError /
                                             PermanentError / ProviderAuthError

`HttpProvider` wraps an adapter into a `Provider`: it sends the request and decides what a
transport failure means. A failure *before* the request was written (connection refused, DNS,
connect timeout, no free connection) is transient: the provider never saw the message. A failure
*after* it was written (read timeout, connection reset while waiting) is `InDoubtError`: the
provider may have accepted it.

`make_client` sends through `AiohttpTransport`: the httpx API (requests, `MockTransport` in tests)
over aiohttp's connection pool, because httpx's own pool is the bottleneck on the hot path
(DESIGN.md section 6: 543 requests/s against 3,320/s over aiohttp, at concurrency 100). Its client,
`ProviderClient`, also skips what httpx's `send` does per request that no provider needs (cookies,
auth and redirect flows): 3,050 -> 4,850 requests/s against a local nginx (bench/README.md).
"""

from __future__ import annotations

import asyncio
import email.utils
import re
import ssl
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Protocol

import httpx

if TYPE_CHECKING:  # aiohttp costs ~0.15 s to import: only a run that sends over HTTP pays it
    import aiohttp
    import aiohttp.abc
    from yarl import URL

from campaign_cli.clock import Clock
from campaign_cli.errors import (
    InDoubtError,
    PermanentError,
    ProviderAuthError,
    RateLimitedError,
    TransientError,
)
from campaign_cli.models import Channel, OutboundMessage, SendResult
from campaign_cli.providers.base import ProviderContext
from campaign_cli.providers.public import PUBLIC_ONLY, NonPublicAddress, check_literal


class HttpAdapter(Protocol):
    def build(self, message: OutboundMessage) -> httpx.Request: ...

    def parse(self, message: OutboundMessage, response: httpx.Response) -> SendResult: ...


def retry_after(headers: Mapping[str, str], now: datetime | None = None) -> float | None:
    """``Retry-After`` as seconds: either delta-seconds or an HTTP date (RFC 9110 10.2.3)."""
    value = headers.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():  # "\u00b2" is a digit to isdigit, not to float
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, OverflowError):  # a year past a C long: OverflowError
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    now = now or datetime.now(timezone.utc)
    return max(0.0, (when - now).total_seconds())


#: 504 Gateway Timeout: a gateway passed the request on and gave up waiting for the answer
#: (RFC 9110 15.6.5; Google's DEADLINE_EXCEEDED, which "may be returned even if the operation
#: has completed successfully"). The provider may have taken the message, as after a read
#: timeout of our own: in doubt, never retried blindly nor moved to another provider.
GATEWAY_TIMEOUT = 504


def raise_for_generic_status(
    response: httpx.Response, code: str | None, text: str, *, now: datetime | None = None
) -> None:
    """The HTTP-level meaning shared by every provider; adapters handle their own codes first.
    ``now`` (from the run's clock) turns a ``Retry-After`` HTTP date into seconds."""
    status = response.status_code
    if status in (401, 403):
        raise ProviderAuthError(text, code=code, status=status)
    if status == 429:
        raise RateLimitedError(text, code=code, status=status,
                               retry_after=retry_after(response.headers, now))
    if status == GATEWAY_TIMEOUT:
        raise InDoubtError(text, code=code, status=status)
    if status == 408 or status >= 500:
        raise TransientError(text, code=code, status=status,
                             retry_after=retry_after(response.headers, now))
    if status >= 400:
        raise PermanentError(text, code=code, status=status)


class HttpProvider:
    """A `Provider` made of an adapter and a client."""

    def __init__(
        self,
        name: str,
        adapter: HttpAdapter,
        client: httpx.AsyncClient,
        *,
        channels: frozenset[Channel],
        deduplicates: bool,
    ) -> None:
        self.name = name
        self.adapter = adapter
        self.client = client
        self.channels = channels
        self.deduplicates = deduplicates

    async def send(self, message: OutboundMessage) -> SendResult:
        request = self.adapter.build(message)
        try:
            response = await self.client.send(request)
            await response.aread()
        except httpx.HTTPError as exc:
            raise classify_transport_error(exc) from None
        return self.adapter.parse(message, response)

    async def aclose(self) -> None:
        await self.client.aclose()


def classify_transport_error(
    exc: httpx.HTTPError,
) -> TransientError | InDoubtError | PermanentError:
    """Before the request was written: transient. After: in doubt. A recipient's URL that may not
    be reached (`NonPublicAddress`, nothing sent): that recipient's bad address."""
    if isinstance(exc, NonPublicAddress):
        return PermanentError(str(exc), code="private_address", action="invalid",
                              answered=False)
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout,
                        httpx.UnsupportedProtocol, httpx.ProxyError)):
        return TransientError(text, code="connect")
    return InDoubtError(text, code="no_response")


#: Connections per provider when its config names no ``concurrency``.
DEFAULT_CONCURRENCY = 100

#: aiohttp adds these when a request lacks them; the request httpx built is sent as it is.
_NO_AUTO_HEADERS = frozenset({"Accept", "Accept-Encoding", "User-Agent", "Content-Type"})

#: A URL in an error text, reduced to scheme and host: a path may be a secret (a Slack webhook)
#: and user info always is.
_URL = re.compile(r"\b(https?)://(?:[^@/\s'\"]*@)?([^/\s'\"?#]+)[^\s'\")]*")


def make_client(
    *,
    base_url: str,
    timeout: float,
    concurrency: int,
    transport: httpx.AsyncBaseTransport | None = None,
    headers: Mapping[str, str] | None = None,
) -> httpx.AsyncClient:
    """The client for one provider: a keep-alive pool sized to its concurrency.

    ``transport`` is for tests (`httpx.MockTransport`); by default `AiohttpTransport` is used
    (DESIGN.md section 6: httpx's own pool is the bottleneck on the hot path). Proxies from the
    environment are not used: the providers are reached directly."""
    return ProviderClient(
        base_url=base_url,
        timeout=httpx.Timeout(timeout),
        transport=transport if transport is not None else AiohttpTransport(concurrency=concurrency),
        headers=headers,
        follow_redirects=False,
        trust_env=False,
    )


class _HttpSettings(Protocol):
    """What every HTTP provider's config has (`campaign_cli.config`)."""

    @property
    def timeout(self) -> float: ...

    @property
    def concurrency(self) -> int | None: ...


def client_for(
    config: _HttpSettings, context: ProviderContext, base_url: str,
    default_concurrency: int = DEFAULT_CONCURRENCY,
) -> httpx.AsyncClient:
    """`make_client` for a provider's config: its timeout and pool size, and the transport a
    test may put in the context's extras, else the run's process transport if it has one."""
    concurrency = config.concurrency or default_concurrency
    transport = context.extras.get("transport")
    if transport is None and context.transports is not None:
        transport = context.transports(concurrency)
    return make_client(
        base_url=base_url,
        timeout=config.timeout,
        concurrency=concurrency,
        transport=transport,
    )


def clock_now(clock: Clock | None) -> datetime | None:
    """The time to read a Retry-After date against (None: no clock, the header's date alone)."""
    return clock.now() if clock is not None else None


class ProviderClient(httpx.AsyncClient):
    """`httpx.AsyncClient` whose `send` hands a request straight to the transport.

    httpx's own `send` runs every request through an auth flow, a redirect loop, event hooks,
    the cookie jar (stdlib `http.cookiejar` behind two compatibility wrappers) and a log line:
    122 us of each request's ~330 us against a local sink (bench/README.md), though a provider's
    request is built whole by its adapter, carries its own credentials, follows no redirect and
    needs no cookie. So, when the client has no auth, no event hooks and does not follow
    redirects, and the caller asks for none of them nor a stream, `send` applies the client's
    timeouts, sends through the transport and reads the answer; anything else goes the long way.
    Skipped: cookies are not stored (no provider API uses them) and httpx's per-request INFO
    log line is not written (it would name a Slack webhook's secret URL)."""

    def __init__(self, *, transport: httpx.AsyncBaseTransport, **kwargs: Any) -> None:
        super().__init__(transport=transport, **kwargs)
        self._direct = transport

    async def send(
        self,
        request: httpx.Request,
        *,
        stream: bool = False,
        # httpx's own annotations (AuthTypes, UseClientDefault) live in its private modules.
        auth: Any = httpx.USE_CLIENT_DEFAULT,
        follow_redirects: Any = httpx.USE_CLIENT_DEFAULT,
    ) -> httpx.Response:
        hooks = self.event_hooks
        if (stream or auth is not httpx.USE_CLIENT_DEFAULT or follow_redirects is True
                or self.follow_redirects or self.auth is not None
                or hooks["request"] or hooks["response"]):
            return await super().send(
                request, stream=stream, auth=auth, follow_redirects=follow_redirects
            )
        if self.is_closed:
            raise RuntimeError("Cannot send a request, as the client has been closed.")
        if "timeout" not in request.extensions:
            request.extensions["timeout"] = self.timeout.as_dict()
        try:
            response = await self._direct.handle_async_request(request)
        except httpx.RequestError as exc:
            exc.request = request  # as httpx's own send does
            raise
        try:
            await response.aread()
        except BaseException:
            await response.aclose()
            raise
        response.request = request
        return response


class _Session:
    """What `AiohttpTransport` creates on first use, inside the running event loop."""

    def __init__(self, concurrency: int, keepalive: float, ssl_: ssl.SSLContext | bool) -> None:
        import aiohttp
        from yarl import URL

        self.concurrency, self.keepalive, self.ssl = concurrency, keepalive, ssl_
        self.session = self._new_session()
        #: For requests to a recipient's own URL (`public.PUBLIC_ONLY`): a pool of its own, whose
        #: resolver answers public addresses only. Made on first use.
        self.public: aiohttp.ClientSession | None = None
        self.resolver: aiohttp.abc.AbstractResolver
        self.slots = asyncio.Semaphore(concurrency)
        self.url_class = URL
        self.last_url: tuple[str, URL] = ("", URL())
        self.timeout_class = aiohttp.ClientTimeout
        self.failures: tuple[type[BaseException], ...] = (aiohttp.ClientError, asyncio.TimeoutError)
        self.timeouts: dict[tuple[float | None, ...], aiohttp.ClientTimeout] = {}

    def _new_session(self, resolver: aiohttp.abc.AbstractResolver | None = None,
                     ) -> aiohttp.ClientSession:
        import aiohttp

        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=self.concurrency, keepalive_timeout=self.keepalive, ssl=self.ssl,
                resolver=resolver,
            ),
            cookie_jar=aiohttp.DummyCookieJar(),  # cookies are httpx's business (none kept)
            auto_decompress=False,  # `to_response` decodes Content-Encoding, capped
            skip_auto_headers=_NO_AUTO_HEADERS,  # once here, not merged again per request
            trust_env=False,
        )

    def _public_session(self, url: URL) -> aiohttp.ClientSession:
        """The pool for a request that may reach public addresses only: `NonPublicAddress`
        at once for a host written as another address, the resolver's check for a name."""
        check_literal(url.raw_host or "")
        if self.public is None:
            from campaign_cli.providers.public import public_only_resolver

            self.resolver = public_only_resolver()
            self.public = self._new_session(self.resolver)
        return self.public

    async def close(self) -> None:
        await self.session.close()
        if self.public is not None:
            await self.public.close()
            await self.resolver.close()  # (a connector does not close a resolver it was given)

    def url(self, url: str) -> URL:
        """yarl's URL for httpx's, taken as already encoded; the last one is kept, since a
        provider usually posts every message to the same URL."""
        last, parsed = self.last_url
        if url != last:
            parsed = self.url_class(url, encoded=True)
            self.last_url = (url, parsed)
        return parsed

    def timeout(self, timeouts: Mapping[str, float | None]) -> aiohttp.ClientTimeout:
        connect, read = timeouts.get("connect"), timeouts.get("read")
        write = timeouts.get("write")
        found = self.timeouts.get((connect, read, write))
        if found is None:
            # sock_read bounds each wait for a piece of the answer, not the answer: a peer that
            # trickles bytes, or stops reading our request (aiohttp has no write timeout), would
            # hold the send for ever. The whole exchange gets connect + write + read.
            total = None if read is None else (connect or 0.0) + (write or 0.0) + read
            found = self.timeout_class(total=total, connect=connect, sock_connect=connect,
                                       sock_read=read)
            self.timeouts[(connect, read, write)] = found
        return found

    async def request(
        self, method: str, url: str, headers: list[tuple[str, str]], body: bytes,
        timeouts: Mapping[str, float | None], sni_hostname: str | None,
        public_only: bool = False,
    ) -> RawAnswer:
        """One exchange: a free slot (or `httpx.PoolTimeout` after the ``pool`` timeout), the
        request, the whole answer. aiohttp's failures are raised as httpx's (`map_aiohttp_error`),
        without their request (the caller sets it). ``public_only``: the URL's host must be a
        public address (`campaign_cli.providers.public`), else `NonPublicAddress`."""
        parsed = self.url(url)
        session = self._public_session(parsed) if public_only else self.session
        slots = self.slots
        if slots.locked():
            pool = timeouts.get("pool")
            try:
                await asyncio.wait_for(slots.acquire(), pool)
            except asyncio.TimeoutError:
                raise httpx.PoolTimeout(f"no free connection within {pool} s") from None
        else:
            await slots.acquire()  # free: returns at once
        try:
            async with session.request(
                method,
                parsed,
                headers=headers,
                data=body or None,
                timeout=self.timeout(timeouts),
                allow_redirects=False,
                server_hostname=sni_hostname,
            ) as answer:
                length = answer.content_length
                if length is not None and length <= MAX_ANSWER_BYTES:
                    content = await answer.read()
                else:
                    content = await _read_capped(answer)
                return answer.status, answer.raw_headers, answer.reason, content
        except self.failures as exc:
            raise map_aiohttp_error(exc) from exc
        finally:
            slots.release()


async def _read_capped(answer: aiohttp.ClientResponse) -> bytes:
    """At most `MAX_ANSWER_BYTES` of an answer's body; the rest is not read (the connection is
    closed). A provider's answer is a few hundred bytes; a webhook recipient's endpoint could
    answer with gigabytes, which would fill this process's memory."""
    chunks: list[bytes] = []
    room = MAX_ANSWER_BYTES
    while True:
        chunk = await answer.content.read(65536)
        if not chunk:
            break
        if len(chunk) >= room:
            chunks.append(chunk[:room])
            answer.close()
            break
        chunks.append(chunk)
        room -= len(chunk)
    return b"".join(chunks)


#: The most of an answer's body that is kept (`_read_capped`): its status and headers decide.
MAX_ANSWER_BYTES = 1 << 20

#: An answer read whole: status, raw header pairs, reason phrase, body.
RawAnswer = tuple[int, Sequence[tuple[bytes, bytes]], str | None, bytes]


def raw_request(request: httpx.Request) -> tuple[str, str, list[tuple[str, str]],
                                                  Mapping[str, float | None], str | None, bool]:
    """What a transport sends of an httpx request, its body aside: method, URL (already
    encoded), headers as text, the timeouts, the TLS server name, whether only a public address
    may be reached (`public.PUBLIC_ONLY`)."""
    encoding = request.headers.encoding
    headers = [(k.decode(encoding), v.decode(encoding)) for k, v in request.headers.raw]
    extensions = request.extensions
    return (request.method, str(request.url), headers, extensions.get("timeout", {}),
            extensions.get("sni_hostname"), bool(extensions.get(PUBLIC_ONLY)))


async def request_body(request: httpx.Request) -> bytes:
    try:
        return request.content
    except httpx.RequestNotRead:
        return await request.aread()


def to_response(request: httpx.Request, answer: RawAnswer) -> httpx.Response:
    """An httpx response for an answer read whole, its Content-Encoding decoded here
    (`_decoded`), never by httpx: httpx decodes a body whole, and a mebibyte of gzip is a
    gibibyte of memory."""
    status, raw, reason, content = answer
    extensions: dict[str, object] = {"http_version": b"HTTP/1.1"}
    if reason:
        extensions["reason_phrase"] = reason.encode("latin-1", "replace")
    codings = [c.strip().lower() for k, v in raw if k.lower() == b"content-encoding"
               for c in v.decode("latin-1").split(",")]
    if codings:
        raw = [(k, v) for k, v in raw if k.lower() != b"content-encoding"]
        content = _decoded([c for c in codings if c not in ("", "identity")], content)
    # A stream read here rather than content=: the body is whole and its headers are the
    # server's, so httpx need not compute content headers.
    response = httpx.Response(
        status, headers=list(raw), stream=httpx.ByteStream(content), request=request,
        extensions=extensions,
    )
    response.read()
    return response


def _decoded(codings: Sequence[str], content: bytes) -> bytes:
    """``content`` with its content codings undone, last first, each to at most
    `MAX_ANSWER_BYTES` (a gzip inside a gzip multiplies). A body its codings do not fit, or a
    coding other than gzip and deflate (we ask for none: no Accept-Encoding is sent), is kept
    as it came: the status line came whole and decides (a 2xx accepted the message), and the
    adapter finds the body unparsable, as it may."""
    import zlib

    decoded = content
    for coding in reversed(codings):
        if coding in ("gzip", "x-gzip"):
            tries = [zlib.MAX_WBITS | 16]
        elif coding == "deflate":  # zlib-wrapped as RFC 9110 says, or raw as some servers send
            tries = [zlib.MAX_WBITS, -zlib.MAX_WBITS]
        else:
            return content
        for wbits in tries:
            try:
                decoded = zlib.decompressobj(wbits).decompress(decoded, MAX_ANSWER_BYTES)
                break
            except zlib.error:
                continue
        else:
            return content
    return decoded


class AiohttpTransport(httpx.AsyncBaseTransport):
    """httpx requests sent over one aiohttp `ClientSession` with a keep-alive pool.

    At most ``concurrency`` requests are in flight; the next one waits for a slot up to the
    request's ``pool`` timeout (`httpx.PoolTimeout`). ``connect`` bounds DNS, TCP and TLS set-up
    (`httpx.ConnectTimeout`), ``read`` the wait for each piece of the answer (`httpx.ReadTimeout`);
    aiohttp has no write timeout, so the whole exchange is bounded by ``connect + write + read``
    instead (a peer that trickles its answer or stops reading ours: `httpx.ReadTimeout`, in
    doubt). Each answer is read whole before it
    is returned (provider answers are small), so a slot and its connection are never held by a
    response the caller forgot to close.

    aiohttp's failures become httpx's by *when* they happened (see `map_aiohttp_error`), which is
    what `classify_transport_error` needs to tell "never sent" from "in doubt". The session is
    created on first use, inside the running event loop, and closed by `aclose`. Requests are sent
    as httpx built them: aiohttp adds no headers, follows no redirects and never retries a POST.
    """

    def __init__(
        self,
        *,
        concurrency: int = DEFAULT_CONCURRENCY,
        keepalive: float = 15.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.concurrency = concurrency
        self.keepalive = keepalive
        self._ssl: ssl.SSLContext | bool = ssl_context if ssl_context is not None else True
        self._live: _Session | None = None
        self._closed = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        live = self._live
        if live is None:
            if self._closed:
                raise RuntimeError("the transport is closed")
            live = self._live = _Session(self.concurrency, self.keepalive, self._ssl)
        method, url, headers, timeouts, sni, public_only = raw_request(request)
        body = await request_body(request)
        try:
            answer = await live.request(method, url, headers, body, timeouts, sni, public_only)
        except httpx.TransportError as exc:
            exc.request = request
            raise
        return to_response(request, answer)

    async def aclose(self) -> None:
        self._closed = True
        live, self._live = self._live, None
        if live is not None:
            await live.close()


def map_aiohttp_error(
    exc: BaseException, request: httpx.Request | None = None
) -> httpx.TransportError:
    """The httpx exception that says what an aiohttp failure means for delivery.

    Before the request was written (the provider never saw it; `TransientError` downstream):
    no connection (`ClientConnectorError`: refused, DNS, TLS) -> `httpx.ConnectError`; connection
    set-up too slow (`ConnectionTimeoutError`) -> `httpx.ConnectTimeout`; a malformed URL ->
    `httpx.UnsupportedProtocol`. After it may have been written (`InDoubtError` downstream): no
    answer in time (`SocketTimeoutError`, any other timeout) -> `httpx.ReadTimeout`; the server
    closed without answering, or answered garbage or half a body (`ServerDisconnectedError`,
    `ClientResponseError`, `ClientPayloadError`) -> `httpx.RemoteProtocolError`; the connection
    broke while writing (`ClientConnectionResetError`) -> `httpx.WriteError`; while reading, or
    anything else (`ClientOSError`, other `ClientError`) -> `httpx.ReadError`. Order matters: the
    connector errors are subclasses of `ClientOSError`, the connect timeout of the read timeout.
    URLs in the text keep only scheme and host (a webhook's path is its secret).
    """
    import aiohttp

    text = _URL.sub(r"\1://\2/...", str(exc)) or type(exc).__name__
    mapped: type[httpx.TransportError]
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        mapped = httpx.ConnectTimeout
    elif isinstance(exc, aiohttp.ClientConnectorError):
        mapped = httpx.ConnectError
    elif isinstance(exc, (aiohttp.InvalidURL, aiohttp.NonHttpUrlClientError)):
        mapped = httpx.UnsupportedProtocol
    elif isinstance(exc, asyncio.TimeoutError):  # SocketTimeoutError, ServerTimeoutError, total
        mapped = httpx.ReadTimeout
    elif isinstance(exc, (aiohttp.ServerDisconnectedError, aiohttp.ClientResponseError,
                          aiohttp.ClientPayloadError)):
        mapped = httpx.RemoteProtocolError
    elif isinstance(exc, aiohttp.ClientConnectionResetError):
        mapped = httpx.WriteError
    else:
        mapped = httpx.ReadError
    return mapped(text, request=request)
