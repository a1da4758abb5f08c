"""HTTP exchanges in a second process, on another core.

One HTTP send costs ~250 us of Python (aiohttp's request and answer, the httpx objects around
them), and the pipeline ~110 us more per message (policy, render, journal, pacing). In one process
both share one interpreter lock, so `campaign send` reached about half of what the bare client
reaches alone (bench/README.md). `HttpProcess` moves the exchange itself to a child interpreter:
a provider still builds its request and reads its answer here (`HttpProvider`, the adapters, FCM's
token, every error class), and the pipeline keeps every decision (the intent committed before the
send, pacing, breaker, retries, failover). The child only holds the connection pools (one
`_Session` per provider, as `AiohttpTransport` has) and turns each request into an answer or
into the httpx exception that says when it failed (`map_aiohttp_error`).

`ProcessTransport` is the httpx transport a provider's client uses for it; a provider cannot tell
it from `AiohttpTransport`. Requests cross a pipe as length-prefixed pickles, several per write:
up to `FRAME` sends that queue up in one turn of the event loop go together, and the answers come
back the same way.

What each side sees when the other fails:

- The child dies (killed, out of memory, a bug): every request it was given may have left, so
  each waiting exchange raises `HttpProcessError`. That is not a provider's answer: the pipeline
  keeps those rows `sending` (the run ends them `in_doubt`) and stops the run with exit 1. Later
  requests raise it at once, before anything leaves.
- The parent dies (SIGKILL, a crash): the child reads the end of its input, cancels what is in
  flight and exits. A frame still in the pipe is not sent: the child checks before each frame that
  its parent is alive. The rows it held are `sending` in the journal, so the resume reports them
  `in_doubt`.
- Ctrl-C, SIGTERM and SIGHUP are the parent's to handle (a graceful stop finishes the sends in
  flight): the child runs in its own session, so a terminal's signals do not reach it, ignores
  them anyway, and ends when the parent closes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import os
import pickle
import signal
import struct
import sys
import tempfile
from collections.abc import Mapping
from typing import IO, Any

import httpx

from campaign_cli.errors import CampaignError, NotSentError
from campaign_cli.providers.http import (
    RawAnswer,
    raw_request,
    request_body,
    to_response,
)
from campaign_cli.providers.public import NonPublicAddress
from campaign_cli.streams import last_line

_HEADER = struct.Struct("!I")
#: At most this many requests (or answers) wait for the end of the event loop's turn; more are
#: written at once, so the other process starts on the first ones while this one makes the rest.
#: With whole turns the two fell into lock step (every message in flight crossing together, each
#: process idle while the other worked: one core of two used; bench/README.md, session 6).
FRAME = 8
#: How long `start` waits for the child to be ready, and `aclose` for it to finish and exit.
START_TIMEOUT = 60.0
CLOSE_TIMEOUT = 10.0
#: A request not answered this long after all its timeouts (pool + connect + write + read) have
#: run out means the child is wedged (stopped, stuck): it is killed, and what it held is in
#: doubt. Checked every `WATCHDOG_INTERVAL` seconds.
STALL_MARGIN = 30.0
WATCHDOG_INTERVAL = 1.0

#: Answer tags on the pipe. _CRASHED: the client raised something else (a request it refused to
#: write, a bug); the exception itself comes along when it pickles, and is raised as in process.
_OK, _FAILED, _CRASHED = 0, 1, 2
#: The httpx exceptions an exchange may end with (`map_aiohttp_error`, the pool timeout).
_TRANSPORT_ERRORS: dict[str, type[httpx.TransportError]] = {
    cls.__name__: cls for cls in (
        httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.UnsupportedProtocol,
        httpx.ReadTimeout, httpx.RemoteProtocolError, httpx.WriteError, httpx.ReadError,
        httpx.WriteTimeout, httpx.ProxyError, NonPublicAddress,
    )
}


def _frame(item: object) -> bytes:
    """One message on the pipe, either way: its length, then its pickle."""
    data = pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(data)) + data


async def _read_frame(reader: asyncio.StreamReader) -> Any:
    size = _HEADER.unpack(await reader.readexactly(_HEADER.size))[0]
    return pickle.loads(await reader.readexactly(size))  # noqa: S301 - our own process pair


class HttpProcessError(CampaignError):
    """The HTTP process failed while it held this request: it may have left (exit 1)."""


class HttpProcessGone(NotSentError):
    """The HTTP process had already failed, or failed before this request was handed to it:
    the request never left (exit 1, the row stays as it was)."""


class HttpProcess:
    """The child process and the pipe to it. `start` it, make each provider's `transport`, and
    `aclose` it once the providers are closed."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self._process = process
        assert process.stdin is not None and process.stdout is not None
        self._stdin = process.stdin
        self._stdout = process.stdout
        self._ids = itertools.count(1)
        self._pools = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._outgoing: list[tuple[Any, ...]] = []
        self._flush_scheduled = False
        self._failure: str | None = None
        #: The child's output ended: it reads nothing more, so nothing more is written to it.
        self._ended = False
        self._reader: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._deadlines: dict[int, float] = {}  # request id -> when the child is late
        self._closed = False
        self._last_words: IO[bytes] | None = None  # the child's stderr

    @classmethod
    async def start(cls) -> HttpProcess:
        """Start the child; return once it is ready to send."""
        # sys.executable is empty or None when Python cannot tell its own path.
        last_words: IO[bytes] | None = None
        try:
            if not sys.executable:
                raise OSError("no path to this Python interpreter (sys.executable is empty)")
            # Its last words (a crash's one line) go to a file, never to the user's terminal.
            last_words = tempfile.TemporaryFile()  # noqa: SIM115 - closed with the process
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-c", _CHILD_CODE,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=last_words,
                # Its own session: what a terminal sends its foreground process group (Ctrl-C,
                # SIGHUP when it hangs up) is for the parent, even while the child starts up.
                start_new_session=True,
            )
        except BaseException as exc:  # cancelled too: the file would be left to the collector
            if last_words is not None:
                last_words.close()
            if not isinstance(exc, OSError):
                raise
            raise HttpProcessError(
                f"the HTTP process did not start ({type(exc).__name__}: {exc})"
            ) from None
        host = cls(process)
        host._last_words = last_words
        try:
            host._write(("init", {"sys_path": list(sys.path), "parent": os.getpid()}))
            kind, payload = await asyncio.wait_for(host._read(), START_TIMEOUT)
            if kind != "ready":
                raise RuntimeError(str(payload))
        except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError,
                asyncio.IncompleteReadError, asyncio.TimeoutError) as exc:
            await host._kill()
            said = host.last_words()
            host._forget_last_words()
            raise HttpProcessError(
                f"the HTTP process did not start ({type(exc).__name__}: {exc}"
                f"{'; it said: ' + said if said else ''})"
            ) from None
        except BaseException:
            # Cancelled (a user's task, Ctrl-C in `asyncio.run`) while it started: nobody will
            # close it, and it would wait for ever for the pipe this process keeps open.
            await host._kill()
            host._forget_last_words()
            raise
        host._reader = asyncio.create_task(host._read_answers())
        host._watchdog = asyncio.create_task(host._watch())
        return host

    @property
    def pid(self) -> int:
        return self._process.pid

    def transport(self, concurrency: int, keepalive: float = 15.0) -> ProcessTransport:
        """A transport with its own pool of ``concurrency`` connections in the child."""
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        pool = next(self._pools)
        self._outgoing.append(("open", pool, concurrency, keepalive))
        return ProcessTransport(self, pool)

    # -- the exchange ------------------------------------------------------------------------

    async def exchange(self, item: tuple[Any, ...], limit: float | None) -> tuple[Any, ...]:
        """Hand one request to the child and wait for its answer. Cancelling the wait cancels
        the exchange in the child too (its connection slot is freed, as in process). ``limit``:
        the request's timeouts added up (None: it has no bound), for the watchdog."""
        if self._failure is not None:
            raise HttpProcessGone(self._failure)
        loop = asyncio.get_running_loop()
        request_id = next(self._ids)
        future: asyncio.Future[Any] = loop.create_future()
        self._waiting[request_id] = future
        if limit is not None:
            self._deadlines[request_id] = loop.time() + limit + STALL_MARGIN
        self._queue((request_id, *item))
        try:
            answer: tuple[Any, ...] = await future
        except asyncio.CancelledError:
            if self._waiting.pop(request_id, None) is not None and self._failure is None:
                self._queue(("cancel", request_id))
            raise
        finally:
            self._deadlines.pop(request_id, None)
        return answer

    def _queue(self, item: tuple[Any, ...]) -> None:
        outgoing = self._outgoing
        outgoing.append(item)
        if len(outgoing) >= FRAME:
            self._flush()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._ended:
            return  # kept: `_fail` finds them not handed over
        batch, self._outgoing = self._outgoing, []
        if not batch or self._failure is not None:
            return
        try:
            self._write(("send", batch))
        except (OSError, RuntimeError) as exc:  # the pipe is closed: the child is gone
            self._outgoing = batch + self._outgoing  # not handed over
            self._fail(f"the HTTP process stopped reading its requests ({exc})")

    def _write(self, item: object) -> None:
        self._stdin.write(_frame(item))

    async def _read(self) -> Any:
        return await _read_frame(self._stdout)

    async def _read_answers(self) -> None:
        try:
            while True:
                answers = await self._read()
                waiting = self._waiting
                for request_id, answer in answers:
                    future = waiting.pop(request_id, None)
                    if future is not None and not future.done():  # else: an immediate stop
                        future.set_result(answer)
        except (asyncio.IncompleteReadError, OSError, EOFError, ValueError,
                pickle.UnpicklingError) as exc:
            if not self._closed:
                self._ended = True
                code = await self._exit_code()
                why = (type(exc).__name__ if code is None else
                       f"exit code {code}" if code >= 0 else f"killed by signal {-code}")
                said = self.last_words()
                if said:
                    why += f": {said}"
                self._fail(f"the HTTP process ended unexpectedly ({why}); requests it was "
                           "sending may have reached the provider")

    def last_words(self) -> str:
        """The last line the child wrote on its stderr (a crash's exception), at most 300
        characters; empty if none."""
        return last_line(self._last_words)

    async def _watch(self) -> None:
        """Kill a child that has held a request past all its timeouts and `STALL_MARGIN`: the
        run must not hang on a stopped or stuck process (its requests end in doubt)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(WATCHDOG_INTERVAL)
            deadlines = self._deadlines
            if deadlines and min(deadlines.values()) < loop.time() and self._failure is None:
                self._failure = (
                    f"the HTTP process answered nothing within its requests' timeouts (and "
                    f"{STALL_MARGIN:g} s more): it was stopped; requests it was sending may "
                    "have reached the provider"
                )
                await self._kill()
                return

    async def _exit_code(self) -> int | None:
        try:
            return await asyncio.wait_for(self._process.wait(), 2.0)
        except asyncio.TimeoutError:
            return None

    def _fail(self, reason: str) -> None:
        """Fail every exchange still waiting: in doubt if the child had its request, not sent
        if the request was still queued here."""
        if self._failure is None:
            self._failure = reason
        reason = self._failure  # the first cause (the watchdog's, say), not the pipe's end
        unsent = {item[0] for item in self._outgoing if isinstance(item[0], int)}
        self._outgoing = []
        waiting, self._waiting = self._waiting, {}
        for request_id, future in waiting.items():
            if not future.done():
                cls = HttpProcessGone if request_id in unsent else HttpProcessError
                future.set_exception(cls(reason))

    # -- closing -----------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Ask the child to finish and exit; kill it if it does not within `CLOSE_TIMEOUT`
        seconds, or at once when exchanges are still waiting (an immediate stop: those messages
        are in doubt whatever the child does now)."""
        if self._closed:
            return
        self._closed = True
        self._flush()
        try:
            if self._failure is not None or any(not f.done() for f in self._waiting.values()):
                await self._kill()
            else:
                try:
                    self._write(("close",))
                    await asyncio.wait_for(self._close_child(), CLOSE_TIMEOUT)
                except (OSError, RuntimeError, asyncio.TimeoutError):
                    await self._kill()
        except asyncio.CancelledError:
            # Cancelled while the child finished (a second Ctrl-C, an application's timeout):
            # it is killed, not waited for, and the rest is closed all the same (below).
            self._kill_now()
            raise
        finally:
            tasks = [task for task in (self._reader, self._watchdog) if task is not None]
            for task in tasks:
                task.cancel()
            self._fail("the HTTP process is closed")
            self._forget_last_words()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _close_child(self) -> None:
        await self._stdin.drain()
        self._stdin.close()
        await self._process.wait()

    async def _kill(self) -> None:
        self._kill_now()
        await self._process.wait()

    def _kill_now(self) -> None:
        if self._process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._process.kill()

    def _forget_last_words(self) -> None:
        if self._last_words is not None:
            self._last_words.close()
            self._last_words = None


class ProcessTransport(httpx.AsyncBaseTransport):
    """An httpx transport whose exchanges happen in an `HttpProcess`: the same answers and the
    same exceptions as `AiohttpTransport`, whose pool it has in the child."""

    def __init__(self, host: HttpProcess, pool: int) -> None:
        self._host = host
        self._pool = pool
        self._closed = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._closed:
            raise RuntimeError("the transport is closed")
        method, url, headers, timeouts, sni, public_only = raw_request(request)
        body = await request_body(request)
        bounds = [timeouts.get(name) for name in ("pool", "connect", "write", "read")]
        limit = None if None in bounds else sum(b for b in bounds if b is not None)
        answer = await self._host.exchange(
            (self._pool, method, url, headers, body, timeouts, sni, public_only), limit
        )
        tag = answer[0]
        if tag == _OK:
            return to_response(request, answer[1:])
        if tag == _FAILED:
            raise _TRANSPORT_ERRORS[answer[1]](answer[2], request=request)
        if answer[2] is not None:  # what the client raised (a request it refused to write)
            raise answer[2]
        raise HttpProcessError(f"the HTTP process failed: {answer[1]}")

    async def aclose(self) -> None:
        self._closed = True  # the pool closes with the process


# ------------------------------------------------------------------------------------------
# The child

# `-c` puts the working directory ('') first on the path: drop it before importing anything, or
# a user's pickle.py (struct.py, ...) there would be imported instead of the library's. The
# parent's path comes in the first frame, read with os.read (a buffered read could swallow the
# frames after it) before campaign_cli is imported: it may only be importable from that path.
_CHILD_CODE = (
    "import sys\n"
    "sys.path[:] = [p for p in sys.path if p]\n"
    "import os, pickle, struct\n"
    "def take(n):\n"
    "    data = b''\n"
    "    while len(data) < n:\n"
    "        more = os.read(0, n - len(data))\n"
    "        if not more:\n"
    "            raise SystemExit(1)\n"
    "        data += more\n"
    "    return data\n"
    "init = pickle.loads(take(struct.unpack('!I', take(4))[0]))[1]\n"
    "sys.path[:] = init['sys_path']\n"
    "from campaign_cli.providers.process import _child_main\n"
    "_child_main(init)\n"
)


def _portable(exc: Exception) -> Exception | None:
    """``exc`` if it crosses the pipe intact (most exceptions do), else None: the parent then
    raises `HttpProcessError` with its text."""
    try:
        copy = pickle.loads(pickle.dumps(exc, protocol=pickle.HIGHEST_PROTOCOL))  # noqa: S301
    except Exception:  # noqa: BLE001 - any reason it does not round-trip
        return None
    return copy if type(copy) is type(exc) and str(copy) == str(exc) else None


def _child_main(init: dict[str, Any]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if hasattr(signal, "SIGHUP"):  # not on Windows
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        asyncio.run(_serve(init["parent"]))
    except BaseException as exc:  # noqa: BLE001 - the parent reports it, with this line
        try:
            os.write(2, f"{type(exc).__name__}: {exc}".encode("utf-8", "replace")[:300] + b"\n")
        except OSError:
            pass
        os._exit(1)


async def _serve(parent: int) -> None:
    from campaign_cli.providers.http import _Session

    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=2**31)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    out = os.fdopen(sys.stdout.fileno(), "wb", closefd=False)
    transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, out)
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)

    def write(item: object) -> None:
        writer.write(_frame(item))

    write(("ready", None))

    pools: dict[int, _Session] = {}
    answers: list[tuple[int, tuple[Any, ...]]] = []
    scheduled = False
    tasks: dict[int, asyncio.Task[None]] = {}

    def forget(request_id: int, _: object) -> None:
        tasks.pop(request_id, None)

    def flush() -> None:
        nonlocal scheduled, answers
        scheduled = False
        batch, answers = answers, []
        if batch:
            write(batch)

    async def exchange(request_id: int, session: _Session, method: str, url: str,
                       headers: list[tuple[str, str]], body: bytes,
                       timeouts: Mapping[str, float | None], sni: str | None,
                       public_only: bool) -> None:
        nonlocal scheduled
        answer: tuple[Any, ...]
        try:
            raw: RawAnswer = await session.request(method, url, headers, body, timeouts, sni,
                                                   public_only)
            answer = (_OK, *raw)
        except httpx.TransportError as exc:
            name = type(exc).__name__
            answer = ((_FAILED, name, str(exc)) if name in _TRANSPORT_ERRORS
                      else (_FAILED, "ReadError", str(exc)))
        except Exception as exc:  # noqa: BLE001 - raised in the parent, as in process
            answer = (_CRASHED, f"{type(exc).__name__}: {exc}", _portable(exc))
        answers.append((request_id, answer))
        if len(answers) >= FRAME:
            flush()
        elif not scheduled:
            scheduled = True
            loop.call_soon(flush)

    closing = False
    try:
        while True:
            try:
                frame = await _read_frame(reader)
            except (asyncio.IncompleteReadError, EOFError):
                break  # the parent is gone: nothing more leaves
            if frame[0] == "close":
                closing = True
                break
            if os.getppid() != parent:
                break  # a frame the dead parent left in the pipe: not sent
            for item in frame[1]:
                if item[0] == "open":
                    _, pool, concurrency, keepalive = item
                    pools[pool] = _Session(concurrency, keepalive, True)
                elif item[0] == "cancel":
                    cancelled = tasks.get(item[1])
                    if cancelled is not None:
                        cancelled.cancel()
                else:
                    request_id, pool, *request = item
                    task = loop.create_task(exchange(request_id, pools[pool], *request))
                    tasks[request_id] = task
                    task.add_done_callback(functools.partial(forget, request_id))
        if closing:
            if tasks:
                await asyncio.gather(*tasks.values(), return_exceptions=True)
            flush()
            await writer.drain()
        else:
            for task in tasks.values():
                task.cancel()
    finally:
        for session in pools.values():
            await session.close()
