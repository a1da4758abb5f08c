"""Peak RSS of `campaign send` for 10,000 and 1,000,000 recipients: it must be flat.

    .venv/bin/python bench/memory.py

Each run is a fresh process; its peak RSS comes from wait4() (the kernel's ru_maxrss for that
child alone). Target (issue #2): at most 100 MiB for 1,000,000, within 20% of the 10,000 figure.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, campaign, recipients  # noqa: E402


def peak_rss_mib(args: list[str]) -> tuple[float, int]:
    with open(os.devnull, "wb") as null:
        proc = subprocess.Popen([sys.executable, "-m", "campaign_cli", *args], stdout=null,
                                stderr=subprocess.PIPE)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        err = proc.stderr.read().decode() if proc.stderr else ""
    if proc.returncode != 0:
        raise SystemExit(f"exit {proc.returncode}: {err}")
    return usage.ru_maxrss / 1024, proc.returncode


def main() -> None:
    store = OUT / "memory-store.db"
    figures: dict[tuple[str, int], float] = {}
    for mode in ("dry-run", "console"):
        for n in (10_000, 1_000_000):
            for leftover in OUT.glob("memory-store.db*"):
                if leftover.is_file():
                    leftover.unlink()
            path = campaign(f"mem-{mode}-{n}", recipients(n), {"type": "console"})
            extra = ["--dry-run"] if mode == "dry-run" else []
            rss, _ = peak_rss_mib(["--store", str(store), "--quiet", "send", str(path), *extra])
            figures[(mode, n)] = rss
            print(f"{mode:8} {n:>9,} recipients  peak RSS {rss:6.1f} MiB")
        small, big = figures[(mode, 10_000)], figures[(mode, 1_000_000)]
        print(f"{mode:8} growth 10k -> 1M: {100 * (big - small) / small:+.1f}% "
              f"({'flat' if big <= small * 1.2 and big <= 100 else 'NOT flat'})")


if __name__ == "__main__":
    main()
