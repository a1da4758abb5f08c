"""Pacing: a token bucket per provider, and the spend budget.

A provider's ``rate`` (messages per second) and ``burst`` become an aiolimiter leaky bucket of
capacity ``burst`` that drains at ``rate``: at most ``burst`` messages go at once, and over any
window of one second at most ``rate + burst``. The budget reserves each message's cost before it is
sent, so the sum of what may have been charged never crosses ``max_spend``.
"""

from __future__ import annotations

import math

from aiolimiter import AsyncLimiter


def default_burst(rate: float) -> int:
    """A tenth of a second's worth, at least one message."""
    return max(1, math.floor(rate / 10))


class Pacer:
    """The token bucket for one provider. ``rate=None`` means unthrottled.

    Two buckets of the same rate and burst: ``acquire`` before the intent is journaled (so that
    rows wait for their turn as `pending`, not as `sending`), and ``gate`` right before the request
    leaves. The intent's commit takes a variable few milliseconds, which would otherwise bunch
    requests together; the second bucket keeps every one-second window of *requests* within
    ``rate + burst``. A row waits in `sending` only for that short bunching, never for its turn.
    """

    def __init__(self, rate: float | None, burst: int | None = None) -> None:
        self.rate = rate
        self.burst = burst if burst is not None else (default_burst(rate) if rate else None)
        self._admit: AsyncLimiter | None = None
        self._send: AsyncLimiter | None = None
        if rate is not None:
            assert self.burst is not None
            self._admit = AsyncLimiter(self.burst, self.burst / rate)
            self._send = AsyncLimiter(self.burst, self.burst / rate)

    async def acquire(self) -> None:
        if self._admit is not None:
            await self._admit.acquire()

    async def gate(self) -> None:
        if self._send is not None:
            await self._send.acquire()


class Budget:
    """Money in integer micro-units. ``cap=None`` means no cap.

    ``committed`` is what may have been charged (sent, or in doubt); ``reserved`` is what messages
    on their way will cost. A reservation that would take committed + reserved past the cap is
    refused: the caller stops taking new messages."""

    def __init__(self, cap: int | None, committed: int = 0) -> None:
        self.cap = cap
        self.committed = committed
        self.reserved = 0

    def try_reserve(self, cost: int) -> bool:
        if self.cap is not None and self.committed + self.reserved + cost > self.cap:
            return False
        self.reserved += cost
        return True

    def commit(self, cost: int) -> None:
        """The message went out (or may have): its reservation becomes spend."""
        self.reserved -= cost
        self.committed += cost

    def release(self, cost: int) -> None:
        """The message was not sent (refused, failed before sending, or not attempted)."""
        self.reserved -= cost

    @property
    def exhausted(self) -> bool:
        return self.cap is not None and self.committed + self.reserved >= self.cap
