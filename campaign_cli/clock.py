"""The one source of time. Everything that waits or stamps asks a `Clock`; tests pass `FakeClock`
(see `campaign_cli.testing`) so that backoff, pacing windows and timestamps need no real time."""

from __future__ import annotations

import asyncio
import math
import time
from datetime import datetime, timezone
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime:
        """The current wall-clock time, timezone-aware UTC."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes backwards."""

    async def sleep(self, seconds: float) -> None:
        """Wait this long (on a fake clock: advance time without waiting)."""


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(timezone.utc)

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


def iso(dt: datetime) -> str:
    """A timestamp as stored: ISO 8601, UTC, millisecond precision."""
    return dt.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Stamper:
    """`iso(clock.now())`, cheaper when asked many times a millisecond: the formatted text is kept
    for the current second and only the milliseconds are formatted anew. Same text as `iso`.

    On the system clock it reads `time.time()` instead of building a `datetime` per call (the
    journal stamps every attempt: measured, a quarter of the per-message send path's own time)."""

    __slots__ = ("_clock", "_second", "_prefix", "_system", "_epoch", "_epoch_prefix")

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._system = type(clock) is SystemClock
        self._second: datetime | None = None  # `now` on other clocks: this second's text
        self._prefix = ""
        self._epoch: int | None = None  # `at`: this second's text
        self._epoch_prefix = ""

    def now(self) -> str:
        if self._system:
            return self.at(time.time())
        dt = self._clock.now()
        if dt.tzinfo is not timezone.utc:
            return iso(dt)
        micro = dt.microsecond
        second = dt.replace(microsecond=0)
        if second != self._second:
            self._second = second
            self._prefix = iso(second)[:-4]  # "YYYY-MM-DDTHH:MM:SS."
        return f"{self._prefix}{micro // 1000:03d}Z"

    def at(self, timestamp: float) -> str:
        """``iso(datetime.fromtimestamp(timestamp, timezone.utc))``, rounded the same way."""
        frac, whole = math.modf(timestamp)
        epoch = int(whole)
        micro = round(frac * 1e6)
        if micro >= 1_000_000:
            epoch, micro = epoch + 1, micro - 1_000_000
        elif micro < 0:
            epoch, micro = epoch - 1, micro + 1_000_000
        if epoch != self._epoch:
            self._epoch = epoch
            self._epoch_prefix = iso(datetime.fromtimestamp(epoch, timezone.utc))[:-4]
        return f"{self._epoch_prefix}{micro // 1000:03d}Z"
