"""Pacing accuracy: at `rate: 200/s` for 10 s, no one-second window above rate + burst, and the
mean within 2% of the rate.

    .venv/bin/python bench/pacing.py [RATE] [SECONDS]

Runs the real pipeline in process (real clock, real store) with a provider that stamps each send
with the event loop's clock, then slides a one-second window over the stamps.
"""

from __future__ import annotations

import asyncio
import bisect
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import campaign, recipients  # noqa: E402

from campaign_cli.config import load_campaign  # noqa: E402
from campaign_cli.models import OutboundMessage, SendResult  # noqa: E402
from campaign_cli.pacing import default_burst  # noqa: E402
from campaign_cli.pipeline import SendOptions, run_campaign  # noqa: E402
from campaign_cli.providers.base import ProviderRegistry  # noqa: E402
from campaign_cli.testing import FakeProvider  # noqa: E402


class Stamping(FakeProvider):
    def __init__(self) -> None:
        super().__init__("stamping")
        self.stamps: list[float] = []

    async def send(self, message: OutboundMessage) -> SendResult:
        self.stamps.append(asyncio.get_running_loop().time())
        return SendResult()


def main() -> None:
    rate = float(sys.argv[1]) if len(sys.argv) > 1 else 200.0
    seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 10.0
    n = int(rate * seconds)
    path = campaign("pacing", recipients(n), {"type": "console", "rate": rate})
    provider = Stamping()
    registry = ProviderRegistry()
    registry.register("console", lambda name, config, context: provider)
    with tempfile.TemporaryDirectory() as tmp:
        report = run_campaign(load_campaign(path), Path(tmp) / "store.db",
                              SendOptions(), registry=registry)
    stamps = provider.stamps
    burst = default_burst(rate)
    span = stamps[-1] - stamps[0]
    # Over the steady part: every send after the initial burst, mean = (sends - burst) / span.
    mean = (len(stamps) - burst) / span if span > 0 else float("inf")
    worst = max(bisect.bisect_left(stamps, t + 1.0) - i for i, t in enumerate(stamps))
    print(f"rate {rate:g}/s burst {burst}: {len(stamps):,} sends over {span:.2f} s; "
          f"mean {mean:.1f}/s ({100 * (mean - rate) / rate:+.2f}%); busiest 1-s window {worst} "
          f"(limit {rate + burst:g}); run exit {report.exit_code}")
    ok = worst <= rate + burst and abs(mean - rate) <= 0.02 * rate
    print("PASS" if ok else "FAIL")


if __name__ == "__main__":
    main()
