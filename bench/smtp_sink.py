"""`campaign send` to the `smtp` provider against Postfix's `smtp-sink` on 127.0.0.1.

    .venv/bin/python bench/smtp_sink.py [N] [--concurrency 16,32,64] [--runs R] [--text-only]

Needs Debian's postfix for the `smtp-sink` binary (`apt-get install postfix`; the postfix service
itself is not used). The script starts ``smtp-sink -c -u nobody 127.0.0.1:PORT 1000`` (it answers
every command with 250 and throws the mail away; ``-u nobody`` is needed when running as root;
``-c`` writes a running ``sess=.. quit=.. mesg=..`` counter, which the script reads to check that
the sink received every message of each run), and stops it at the end (also on error).

Measured (issue #3, target: >= 2,000 messages/s end to end): `campaign send` as a subprocess, the
journal on, a real store file under bench/out/, N emails (default 20,000; multipart/alternative,
text + HTML, unless --text-only) through the `smtp` provider with ``security: none``; the SMTP pool
size is the provider's ``concurrency`` (and limits.concurrency is set to the same), tried at each
of the given values. Messages/s from the wall time and from the run's JSON ``rate_per_s``.
"""

from __future__ import annotations

import argparse
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import yaml  # noqa: E402
from common import OUT, end_to_end, recipients, reference  # noqa: E402

CAMPAIGN = [sys.executable, "-m", "campaign_cli"]
TEXT = """\
Hi {{ first_name }},

Your order {{ row }} has shipped and should arrive within three working days.

Track it: https://example.com/orders/{{ row }}

Thanks,
The Example team
"""
HTML = """\
<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Order {{ row }}</title></head>
<body style="font-family: sans-serif;">
  <h1 style="font-size: 20px;">Hi {{ first_name }},</h1>
  <p>Your order <strong>{{ row }}</strong> has shipped and should arrive within three working
     days.</p>
  <p><a href="https://example.com/orders/{{ row }}">Track it</a></p>
  <p>Thanks,<br>The Example team</p>
</body></html>
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class SmtpSink:
    def __init__(self) -> None:
        binary = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
        if not Path(binary).exists():
            raise SystemExit("smtp-sink not found: apt-get install -y postfix")
        self.port = free_port()
        OUT.mkdir(exist_ok=True)
        self.counter = OUT / "smtp-sink-counter.txt"
        with self.counter.open("wb") as counter:
            self.proc = subprocess.Popen(
                [binary, "-c", "-u", "nobody", f"127.0.0.1:{self.port}", "1000"],
                stdout=counter, stderr=subprocess.PIPE,
            )
        deadline = time.monotonic() + 10
        while True:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise SystemExit(f"smtp-sink exited {self.proc.returncode}: {err}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.recv(100)  # the greeting
                    s.sendall(b"QUIT\r\n")
                break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise SystemExit("smtp-sink did not start listening within 10 s") from None
                time.sleep(0.05)

    def received(self) -> int:
        """Messages the sink has accepted so far (the last ``mesg=`` of its counter)."""
        for _ in range(50):  # the counter is written as the sink goes: give it a moment
            found = re.findall(rb"mesg=(\d+)", self.counter.read_bytes()[-200:])
            if found:
                return int(found[-1])
            time.sleep(0.02)
        return 0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def write_campaign(csv_path: Path, port: int, concurrency: int, text_only: bool) -> Path:
    templates = OUT / "smtp-templates"
    templates.mkdir(parents=True, exist_ok=True)
    (templates / "email.txt.j2").write_text(TEXT)
    (templates / "email.html.j2").write_text(HTML)
    email: dict[str, object] = {
        "provider": "smtp", "from": "Example <orders@example.com>",
        "subject": "Your order {{ row }} has shipped", "text": str(templates / "email.txt.j2"),
    }
    if not text_only:
        email["html"] = str(templates / "email.html.j2")
    data = {
        "name": f"bench-smtp-{concurrency}",
        "purpose": "transactional",
        "recipients": {"file": str(csv_path), "key": "id", "columns": {"email": "email"}},
        "channels": {"email": email},
        "providers": {"smtp": {
            "type": "smtp", "host": "127.0.0.1", "port": port, "security": "none",
            "helo": "bench.example.com", "concurrency": concurrency,
        }},
        "limits": {"concurrency": concurrency},
        "compliance": {"consent": "not_required"},
    }
    path = OUT / f"bench-smtp-{concurrency}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path



def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("n", nargs="?", type=int, default=20_000)
    parser.add_argument("--concurrency", default="16,32,64")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--text-only", action="store_true")
    args = parser.parse_args()
    n: int = args.n
    csv_path = recipients(n)
    print(reference())
    store = OUT / "smtp-sink-store.db"
    sink = SmtpSink()
    try:
        print(f"smtp-sink on 127.0.0.1:{sink.port} (pid {sink.proc.pid}); {n:,} emails "
              f"({'text only' if args.text_only else 'text + HTML'})")
        for concurrency in (int(c) for c in args.concurrency.split(",")):
            campaign = write_campaign(csv_path, sink.port, concurrency, args.text_only)
            rates: list[float] = []
            for i in range(args.runs):
                before = sink.received()
                wall, summary = end_to_end(campaign, store)
                time.sleep(0.1)  # the sink's last counter line
                got = sink.received() - before
                counts = summary["counts"]
                assert isinstance(counts, dict)
                sent = int(counts.get("sent", 0))
                if sent != n or got != n:
                    raise SystemExit(f"{sent:,} of {n:,} sent, sink counted {got:,}: {summary}")
                rates.append(sent / wall)
                print(f"concurrency {concurrency:3} [{i + 1}] {sent:>7,} sent  {wall:6.2f} s wall  "
                      f"{sent / wall:7,.0f} msg/s (whole process)   run's rate_per_s "
                      f"{summary['rate_per_s']:,.0f}/s over {summary['duration_s']} s; "
                      f"sink counted {got:,}")
            median = statistics.median(rates)
            print(f"concurrency {concurrency:3} median {median:7,.0f} msg/s "
                  f"(target >= 2,000: {'MET' if median >= 2000 else 'NOT met'})")
    finally:
        sink.stop()


if __name__ == "__main__":
    main()
