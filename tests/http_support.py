"""Helpers shared by the provider adapter tests that drive httpx.MockTransport."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import httpx

from campaign_cli.models import OutboundMessage, SendResult
from campaign_cli.providers.base import ProviderContext
from campaign_cli.testing import FakeClock

Handler = Callable[[httpx.Request], httpx.Response]


class Recorder:
    """A MockTransport handler that records requests and answers from a queue (an exception in
    the queue is raised, as a transport failure), else with `default`."""

    def __init__(self, *answers: httpx.Response | Exception) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def default(self) -> httpx.Response:
        return httpx.Response(200, text="ok")

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.answers:
            answer = self.answers.pop(0)
            if isinstance(answer, Exception):
                raise answer
            return answer
        return self.default()


def mock_context(handler: Handler, clock: FakeClock | None = None,
                 run_name: str = "run") -> ProviderContext:
    """A provider context whose HTTP transport is ``httpx.MockTransport(handler)``."""
    return ProviderContext(clock=clock or FakeClock(), run_name=run_name,
                           extras={"transport": httpx.MockTransport(handler)})


class _Sender(Protocol):
    async def send(self, message: OutboundMessage) -> SendResult: ...

    async def aclose(self) -> None: ...


def send_all(provider: _Sender, *messages: OutboundMessage) -> list[SendResult]:
    """Send messages in turn on a fresh event loop, then close the provider."""

    async def go() -> list[SendResult]:
        try:
            return [await provider.send(message) for message in messages]
        finally:
            await provider.aclose()

    return asyncio.run(go())


def send_once(provider: _Sender, message: OutboundMessage) -> SendResult:
    """Send one message on a fresh event loop, then close the provider."""
    return send_all(provider, message)[0]


def refuse_connection(request: httpx.Request) -> httpx.Response:
    """A handler for a request that never left: the connection was refused."""
    raise httpx.ConnectError("refused", request=request)


def withhold_answer(request: httpx.Request) -> httpx.Response:
    """A handler for a request that was written and never answered."""
    raise httpx.ReadTimeout("no answer", request=request)


SPECS = Path(__file__).resolve().parent / "specs"
SHARED_SPECS = Path(__file__).resolve().parents[2] / "shared" / "specs"


def check_spec_copy(name: str, pinned_sha256: str) -> None:
    """Our copy of a provider's spec is the pinned upstream file (tests/specs/README.md), and
    still equals the project's reference copy wherever ../shared/specs is checked out beside
    this repository."""
    ours = hashlib.sha256((SPECS / name).read_bytes()).hexdigest()
    assert ours == pinned_sha256
    shared = SHARED_SPECS / name
    if shared.exists():
        assert ours == hashlib.sha256(shared.read_bytes()).hexdigest()
