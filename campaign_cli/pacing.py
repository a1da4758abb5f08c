"""Pacing: a token bucket per provider, and the spend budget.

A provider's ``rate`` (messages per second) and ``burst`` become an aiolimiter leaky bucket of
capacity ``burst`` that drains at ``rate``: at most ``burst`` messages go at once, and over any
window of one second at most ``rate + burst``. The budget reserves each message's cost before it is
sent, so the sum of what may have been charged never crosses ``max_spend``.
"""

from __future__ import annotations

import math

from aiolimiter import AsyncLimiter

from campaign_cli.clock import Clock, SystemClock


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

    Adaptive (AIMD, as TCP): a 429 (`rate_limited`) halves the rate for every worker and pauses
    the provider for its ``Retry-After``; each good answer (`succeeded`) adds one message per
    second back, up to the configured rate (or back to unthrottled).
    """

    MIN_RATE = 0.2

    def __init__(self, rate: float | None, burst: int | None = None,
                 clock: Clock | None = None) -> None:
        # The run's clock times the Retry-After pause and the rate's recovery (a test's fake
        # clock passes them without waiting); the token buckets are aiolimiter's, on the loop's.
        self._clock: Clock = clock if clock is not None else SystemClock()
        self.configured = rate
        self.burst_configured = burst
        self.rate: float | None = None
        self.burst: int | None = None
        self._admit: AsyncLimiter | None = None
        self._send: AsyncLimiter | None = None
        self._paused_until = 0.0
        self._last_limited = -math.inf
        self._last_raise = 0.0
        self._window_start = 0.0
        self._window_count = 0
        self._observed = 0.0
        self._unthrottle_at: float | None = None
        self._gained = 0
        self._set_rate(rate)

    def _set_rate(self, rate: float | None) -> None:
        self.rate = rate
        if rate is None:
            self.burst = None
            self._admit = self._send = None
            return
        burst = self.burst_configured if self.burst_configured is not None else default_burst(rate)
        self.burst = max(1, min(burst, math.ceil(rate))) if rate < burst else burst
        self._admit = AsyncLimiter(self.burst, self.burst / rate)
        self._send = AsyncLimiter(self.burst, self.burst / rate)

    async def _wait_pause(self) -> None:
        clock = self._clock
        while (delay := self._paused_until - clock.monotonic()) > 0:
            await clock.sleep(delay)

    async def acquire(self) -> None:
        if self._paused_until:
            await self._wait_pause()
        if self._admit is not None:
            await self._admit.acquire()

    async def gate(self) -> None:
        if self._paused_until:
            await self._wait_pause()
        if self._send is not None:
            await self._send.acquire()

    def rate_limited(self, retry_after: float | None) -> None:
        """The provider said 429: halve the rate for every worker (at most once a second), and
        pause the provider for its Retry-After."""
        now = self._clock.monotonic()
        if retry_after:
            self._paused_until = max(self._paused_until, now + min(retry_after, 300.0))
        if now - self._last_limited < 1.0:
            return
        self._last_limited = now
        current = self.rate if self.rate is not None else self._throughput(now)
        if self.rate is None:
            self._unthrottle_at = current * 2  # unthrottled again once well past this
        self._set_rate(max(self.MIN_RATE, current / 2))
        self._gained = 0

    def _throughput(self, now: float) -> float:
        elapsed = now - self._window_start
        if elapsed >= 0.05 and self._window_count:
            return self._window_count / elapsed
        return max(self._observed, 10.0)

    def pause_left(self) -> float:
        """Seconds left of a Retry-After pause (0 when there is none)."""
        return max(0.0, self._paused_until - self._clock.monotonic())

    @property
    def paused(self) -> bool:
        """Within a Retry-After pause the provider asked for."""
        return self._paused_until > self._clock.monotonic()

    def succeeded(self, count: int = 1) -> None:
        """``count`` good answers. Additive increase: a lowered rate gains one message per second
        per good answer (so it can at most double in a second), applied every tenth of a second."""
        now = self._clock.monotonic()
        self._window_count += count
        if now - self._window_start >= 1.0:
            self._observed = self._window_count / (now - self._window_start)
            self._window_start, self._window_count = now, 0
        if self.rate is None or self.rate == self.configured:
            return
        self._gained += count
        if now - self._last_raise < 0.1:
            return
        self._last_raise = now
        raised = self.rate + self._gained
        self._gained = 0
        if self.configured is not None:
            self._set_rate(min(raised, self.configured))
        elif self._unthrottle_at is not None and raised >= self._unthrottle_at:
            self._set_rate(None)
        else:
            self._set_rate(raised)


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

    def settle(self, reserved: int, actual: int) -> None:
        """The message went out (or may have) at ``actual``, having reserved ``reserved``."""
        self.reserved -= reserved
        self.committed += actual

    def release(self, cost: int) -> None:
        """The message was not sent (refused, failed before sending, or not attempted)."""
        self.reserved -= cost

    @property
    def exhausted(self) -> bool:
        return self.cap is not None and self.committed + self.reserved >= self.cap
