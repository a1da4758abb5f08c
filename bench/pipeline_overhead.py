"""What the pipeline itself costs per message: the real pipeline, store and journal, in process, with
a provider that does nothing but yield to the event loop ``YIELDS`` times and answer "sent".

    .venv/bin/python bench/pipeline_overhead.py [N] [YIELDS]      # default 100,000 and 1

Concurrency 64, unthrottled, the same campaign shape as bench/http_sink.py. No target of its own:
it explains the others. A real provider's cost per message adds to this figure (bench/README.md:
bench/http_sink.py's bare client against the end-to-end run).
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import campaign, recipients, reference  # noqa: E402

from campaign_cli.config import load_campaign  # noqa: E402
from campaign_cli.models import OutboundMessage, SendResult  # noqa: E402
from campaign_cli.pipeline import SendOptions, run_campaign  # noqa: E402
from campaign_cli.providers.base import ProviderRegistry  # noqa: E402
from campaign_cli.testing import FakeProvider  # noqa: E402


class Null(FakeProvider):
    def __init__(self, yields: int) -> None:
        super().__init__("null")
        self.yields = yields

    async def send(self, message: OutboundMessage) -> SendResult:
        for _ in range(self.yields):
            await asyncio.sleep(0)
        return SendResult(provider_message_id="null", status_code=201)


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    yields = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    print(reference())
    path = campaign("pipeline-overhead", recipients(n), {"type": "console"}, concurrency=64)
    provider = Null(yields)
    registry = ProviderRegistry()
    registry.register("console", lambda name, config, context: provider)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        report = run_campaign(load_campaign(path), Path(tmp) / "store.db", SendOptions(),
                              registry=registry)
        wall = time.perf_counter() - t0
    print(f"null provider ({yields} yields): {report.sent:,} sent in {wall:.2f} s = "
          f"{report.sent / wall:,.0f} msg/s ({1e6 * wall / report.sent:.0f} us per message; "
          f"scan, journal and reader child included, imports not)")


if __name__ == "__main__":
    main()
