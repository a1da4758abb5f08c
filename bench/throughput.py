"""End-to-end throughput of `campaign send`, journal on, as a subprocess (imports included).

    .venv/bin/python bench/throughput.py [N]        # default 1,000,000 recipients

Paths measured: --dry-run (read, validate, policy, render, cost, journal) and a real run to the
console provider with stdout sent to /dev/null (everything above plus pacing-free sends, intents
and outcomes committed). Prints messages/s for each and the run's own JSON figures.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, campaign, recipients, reference  # noqa: E402

CAMPAIGN = [sys.executable, "-m", "campaign_cli"]


def run(args: list[str], store: Path, stdout: int | None) -> tuple[float, dict[str, object]]:
    for leftover in store.parent.glob(store.name + "*"):
        if leftover.is_file():
            leftover.unlink()
    t0 = time.perf_counter()
    proc = subprocess.run([*CAMPAIGN, "--store", str(store), "--quiet", *args],
                          stdout=stdout, stderr=subprocess.PIPE, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"exit {proc.returncode}: {proc.stderr}")
    if stdout == subprocess.PIPE:  # --json: the run's own summary
        return wall, json.loads(proc.stdout)
    status = subprocess.run([*CAMPAIGN, "--store", str(store), "status", "--json"],
                            capture_output=True, text=True, check=True)
    return wall, json.loads(status.stdout)[0]


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    csv_path = recipients(n)
    print(reference())
    store = OUT / "bench-store.db"
    dry = campaign("bench-dry", csv_path, {"type": "console"})
    wall, summary = run(["send", str(dry), "--dry-run", "--json"], store, subprocess.PIPE)
    sent = summary["counts"].get("sent", 0)  # type: ignore[union-attr]
    print(f"dry run      {sent:>9,} messages    {wall:6.1f} s wall  {sent / wall:9,.0f} msg/s "
          f"(whole process; pipeline alone {summary['rate_per_s']:,.0f}/s; journal on a "
          "snapshot store)")
    console = campaign("bench-console", csv_path, {"type": "console"})
    wall, summary = run(["send", str(console)], store, subprocess.DEVNULL)
    sent = summary["counts"].get("sent", 0)  # type: ignore[union-attr]
    print(f"console>null {sent:>9,} messages    {wall:6.1f} s wall  {sent / wall:9,.0f} msg/s "
          f"(whole process; pipeline alone {summary['rate_per_s']:,.0f}/s; journal: intent + "
          "outcome per message)")


if __name__ == "__main__":
    main()
