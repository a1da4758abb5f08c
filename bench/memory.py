"""Peak RSS of `campaign send` for 10,000 and 1,000,000 recipients: it must be flat.

    .venv/bin/python bench/memory.py [N ...]       # default: 10000 25000 1000000

Each run is a fresh process; its peak RSS comes from wait4() (the kernel's ru_maxrss for that
child alone). Target (issue #2): at most 100 MiB for 1,000,000, within 20% of the 10,000 figure.

From 20,000 rows the recipient file is read by a second process (`ProcessChunkReader`), a child of
the `campaign` process that the bench cannot wait4() on. Its peak comes from polling: every 10 ms
each descendant's ``VmHWM`` (the kernel's peak-RSS high-water mark, so a late read still sees an
earlier peak) is read from /proc; the last reading before it exits is kept. The main process is
polled the same way as a cross-check of wait4(). "sum" adds the two peaks: an upper bound of the
pair's combined peak (the two need not peak at the same moment).

Growth is printed three ways: the main process from the smallest to the largest size; the sum
over the same sizes (the smallest run has no reader child, so this counts the child's fixed
~21 MiB as growth); and the sum like for like, from the smallest size that has a reader child
(25,000 by default) to the largest, which is what "flat" asks: whether memory grows with the
number of recipients.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, campaign, recipients  # noqa: E402


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found.extend(int(c) for c in f.read().split())
    except OSError:
        pass
    return found


def _hwm_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class Poller(threading.Thread):
    """Peak RSS (VmHWM, KiB) of a process and of each of its descendants, read every 10 ms."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peaks: dict[int, int] = {}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.01):
            todo = [self.pid]
            while todo:
                pid = todo.pop()
                hwm = _hwm_kib(pid)
                if hwm is not None:
                    self.peaks[pid] = max(self.peaks.get(pid, 0), hwm)
                todo.extend(_children(pid))


def peak_rss_mib(args: list[str]) -> tuple[float, float, float]:
    """(main process by wait4, main by /proc polling, largest descendant by polling) in MiB."""
    with open(os.devnull, "wb") as null:
        proc = subprocess.Popen([sys.executable, "-m", "campaign_cli", *args], stdout=null,
                                stderr=subprocess.PIPE)
        poller = Poller(proc.pid)
        poller.start()
        # stderr is only read after the exit: --quiet keeps it far below a pipe's 64 KiB.
        _, status, usage = os.wait4(proc.pid, 0)
        poller.done.set()
        poller.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
        err = proc.stderr.read().decode() if proc.stderr else ""
    if proc.returncode != 0:
        raise SystemExit(f"exit {proc.returncode}: {err}")
    main_polled = poller.peaks.get(proc.pid, 0) / 1024
    child = max((v for k, v in poller.peaks.items() if k != proc.pid), default=0) / 1024
    return usage.ru_maxrss / 1024, main_polled, child


def main() -> None:
    sizes = [int(a) for a in sys.argv[1:]] or [10_000, 25_000, 1_000_000]
    store = OUT / "memory-store.db"
    figures: dict[tuple[str, int], float] = {}
    totals: dict[tuple[str, int], float] = {}
    children: dict[tuple[str, int], float] = {}
    for mode in ("dry-run", "console"):
        for n in sizes:
            for leftover in OUT.glob("memory-store.db*"):
                if leftover.is_file():
                    leftover.unlink()
            path = campaign(f"mem-{mode}-{n}", recipients(n), {"type": "console"})
            extra = ["--dry-run"] if mode == "dry-run" else []
            rss, polled, child = peak_rss_mib(
                ["--store", str(store), "--quiet", "send", str(path), *extra]
            )
            figures[(mode, n)] = rss
            totals[(mode, n)] = rss + child
            children[(mode, n)] = child
            print(f"{mode:8} {n:>9,} recipients  peak RSS main {rss:6.1f} MiB (polled "
                  f"{polled:.1f}), reader child {child:6.1f} MiB, sum {rss + child:6.1f} MiB")
        lo, hi = sizes[0], sizes[-1]
        with_child = [n for n in sizes if children[(mode, n)] > 0]
        growths = [("main", figures, lo), ("sum", totals, lo)]
        if with_child and with_child[0] not in (lo, hi):
            growths.append(("sum, like for like", totals, with_child[0]))
        for label, table, small_n in growths:
            small, big = table[(mode, small_n)], table[(mode, hi)]
            print(f"{mode:8} {label} growth {small_n:,} -> {hi:,}: "
                  f"{100 * (big - small) / small:+.1f}% "
                  f"({'flat' if big <= small * 1.2 and big <= 100 else 'NOT flat'}: target "
                  "<= 100 MiB and within 20%)")

if __name__ == "__main__":
    main()
