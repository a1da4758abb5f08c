"""Helpers shared by the provider adapter tests that drive httpx.MockTransport."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

import httpx

from campaign_cli.models import OutboundMessage, SendResult

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


class _Sender(Protocol):
    async def send(self, message: OutboundMessage) -> SendResult: ...

    async def aclose(self) -> None: ...


def send_once(provider: _Sender, message: OutboundMessage) -> SendResult:
    """Send one message on a fresh event loop, then close the provider."""

    async def go() -> SendResult:
        try:
            return await provider.send(message)
        finally:
            await provider.aclose()

    return asyncio.run(go())
