"""Test doubles for campaign-cli's own tests and for users testing their campaigns.

* `FakeClock`: time that moves only when something sleeps on it (or `advance` is called), so
  backoff and timestamps need no real time.
* `FakeProvider`: a scripted provider (llm's MockModel, ours). `enqueue` outcomes (a `SendResult`,
  or an exception instance to raise) for the next sends, or give a ``handler`` that decides per
  message; every call is kept in ``history``. Unscripted sends succeed.
* `FakeBatchProvider`: the same, taking batches (`send_batch`) as the local providers do; each
  batch is kept in ``batches``, and ``on_batch`` sees it before any of it is "sent".
* `fake_registry`: a provider registry where every provider ``type`` is served by one FakeProvider.
* `throwaway_store`: a new store in a temporary folder, removed (with its write-ahead log and run
  locks) when the block ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from campaign_cli.errors import ProviderError
from campaign_cli.models import Channel, OutboundMessage, SendResult
from campaign_cli.providers.base import ProviderContext, ProviderRegistry
from campaign_cli.store.db import Store

Outcome = SendResult | BaseException
Handler = Callable[[OutboundMessage], Outcome | None]


class FakeClock:
    def __init__(self, start: datetime | None = None) -> None:
        start = start or datetime(2026, 1, 1, tzinfo=timezone.utc)
        # `Clock.now` is aware UTC: a naive start is UTC, not the machine's local time.
        self._start = start.replace(tzinfo=timezone.utc) if start.tzinfo is None else start
        self._elapsed = 0.0
        self.sleeps: list[float] = []

    def now(self) -> datetime:
        return self._start + timedelta(seconds=self._elapsed)

    def monotonic(self) -> float:
        return self._elapsed

    def advance(self, seconds: float) -> None:
        self._elapsed += max(0.0, seconds)

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.advance(seconds)
        await asyncio.sleep(0)


class FakeProvider:
    def __init__(
        self,
        name: str = "fake",
        *,
        deduplicates: bool = False,
        handler: Handler | None = None,
        delay: float = 0.0,
    ) -> None:
        self.name = name
        self.channels = frozenset(Channel)
        self.deduplicates = deduplicates
        self.handler = handler
        self.delay = delay
        self.history: list[OutboundMessage] = []
        self.accepted: list[OutboundMessage] = []
        self._queue: deque[Outcome] = deque()
        self.closed = False

    def enqueue(self, *outcomes: Outcome) -> None:
        self._queue.extend(outcomes)

    async def send(self, message: OutboundMessage) -> SendResult:
        self.history.append(message)
        if self.delay:
            await asyncio.sleep(self.delay)
        outcome: Outcome | None = self._queue.popleft() if self._queue else None
        if outcome is None and self.handler is not None:
            outcome = self.handler(message)
        if isinstance(outcome, BaseException):
            raise outcome
        self.accepted.append(message)
        return outcome or SendResult(provider_message_id=f"fake-{len(self.accepted)}")

    async def aclose(self) -> None:
        self.closed = True


class FakeBatchProvider(FakeProvider):
    """A `FakeProvider` that also takes batches. Scripted outcomes apply per message: a
    `ProviderError` is that message's answer; any other exception is raised by the whole
    ``send_batch`` (which then does not say which messages left)."""

    def __init__(self, name: str = "fake", *, batch_size: int = 64, deduplicates: bool = False,
                 handler: Handler | None = None,
                 on_batch: Callable[[Sequence[OutboundMessage]], None] | None = None) -> None:
        super().__init__(name, deduplicates=deduplicates, handler=handler)
        self.batch_size = batch_size
        self.on_batch = on_batch
        self.batches: list[list[OutboundMessage]] = []

    async def send_batch(
        self, messages: Sequence[OutboundMessage]
    ) -> list[SendResult | ProviderError]:
        self.batches.append(list(messages))
        if self.on_batch is not None:
            self.on_batch(messages)
        results: list[SendResult | ProviderError] = []
        for message in messages:
            try:
                results.append(await self.send(message))
            except ProviderError as exc:
                results.append(exc)
        return results


def fake_registry(provider: FakeProvider, *types: str) -> ProviderRegistry:
    """A registry whose given provider types (default: outbox and console) are all ``provider``."""
    registry = ProviderRegistry()

    def factory(name: str, config: Any, context: ProviderContext) -> FakeProvider:
        return provider

    for type_name in types or ("outbox", "console"):
        registry.register(type_name, factory)
    return registry


@contextlib.contextmanager
def throwaway_store() -> Iterator[Path]:
    """The path of a new, empty store in a temporary folder, removed when the block ends::

        with throwaway_store() as store:
            report = run_campaign(load_campaign("campaigns/demo.yaml"), store, ...)
    """
    with tempfile.TemporaryDirectory(prefix="campaign-test-store-") as folder:
        path = Path(folder) / "store.db"
        Store.open(path).close()
        yield path
