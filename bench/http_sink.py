"""`campaign send` to the `twilio` provider against a local nginx sink, and the bare HTTP client.

    .venv/bin/python bench/http_sink.py [N] [--runs R]      # default 100,000 recipients, 1 run

Needs Debian's nginx (`apt-get install nginx-light`). The script writes a private nginx config
under bench/out/ (worker_processes 1, keepalive_requests 100000, access_log off) that answers
``POST /2010-04-01/Accounts/*/Messages.json`` with ``201 {"sid": ..., "status": "queued"}``, starts
nginx on a free port of 127.0.0.1, and stops it at the end (also on error).

Measured (issue #3, target: >= 2,500 messages/s end to end AND >= 75% of the bare loop):

(a) `campaign send` end to end as a subprocess (imports, CSV scan, the reader child process, the
    HTTP process holding the connection pool (`campaign_cli/providers/process.py`, since session
    6), the journal with an intent and an outcome per message, a real store file under bench/out/):
    unthrottled (no rate), provider concurrency 64, limits.concurrency 64. Messages/s from the wall
    time and from the run's own JSON ``rate_per_s``.
(b) a bare loop of the same HTTP client (`campaign_cli.providers.http.make_client`, i.e. httpx's
    API over `AiohttpTransport`) posting the same N requests built by `TwilioAdapter.build`:
    64 worker coroutines over a queue, each request built, sent and its body read (as
    `HttpProvider.send` does), no journal, no pipeline, all in this one process. Requests/s.
    Since session 6, (a) does the exchanges in a second process, so it can pass (b).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
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

from campaign_cli.models import Channel, OutboundMessage, SmsContent  # noqa: E402
from campaign_cli.providers.http import make_client  # noqa: E402
from campaign_cli.providers.twilio import TwilioAdapter  # noqa: E402

CAMPAIGN = [sys.executable, "-m", "campaign_cli"]
ACCOUNT_SID = "AC" + "0" * 31 + "1"
AUTH_TOKEN = "bench-token-not-a-secret"  # noqa: S105 - the sink checks nothing
SENDER = "+15551230000"
CONCURRENCY = 64
BODY = "Hi {{ first_name }}, your order {{ row }} has shipped."
ANSWER = '{"sid":"SM00000000000000000000000000000000","status":"queued"}'

NGINX_CONF = """\
daemon off;
master_process on;
worker_processes 1;
pid {out}/nginx.pid;
error_log {out}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {out}/nginx-tmp/body;
    proxy_temp_path {out}/nginx-tmp/proxy;
    fastcgi_temp_path {out}/nginx-tmp/fastcgi;
    uwsgi_temp_path {out}/nginx-tmp/uwsgi;
    scgi_temp_path {out}/nginx-tmp/scgi;
    keepalive_requests 100000;
    keepalive_timeout 60s;
    server {{
        listen 127.0.0.1:{port};
        location ~ ^/2010-04-01/Accounts/[^/]+/Messages\\.json$ {{
            if ($request_method != POST) {{ return 405; }}
            default_type application/json;
            return 201 '{answer}';
        }}
        location / {{ return 404; }}
    }}
}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Nginx:
    """nginx in the foreground (daemon off) as our child; `stop` ends it by its pid."""

    def __init__(self) -> None:
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        if not Path(binary).exists():
            raise SystemExit("nginx not found: apt-get install -y nginx-light")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        out = OUT / "nginx"
        (out / "nginx-tmp").mkdir(parents=True, exist_ok=True)
        conf = out / "nginx.conf"
        conf.write_text(NGINX_CONF.format(out=out, port=self.port, answer=ANSWER))
        self.proc = subprocess.Popen(
            [binary, "-p", str(out), "-c", str(conf), "-e", str(out / "nginx-error.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 10
        while True:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise SystemExit(f"nginx exited {self.proc.returncode}: {err}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise SystemExit("nginx did not start listening within 10 s") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: nginx's fast shutdown, workers included
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def write_campaign(csv_path: Path, base_url: str) -> Path:
    data = {
        "name": "bench-twilio",
        "purpose": "transactional",
        "recipients": {"file": str(csv_path), "key": "id", "columns": {"phone": "phone"}},
        "channels": {"sms": {"provider": "twilio", "body": BODY}},
        "providers": {"twilio": {
            "type": "twilio", "account_sid": ACCOUNT_SID, "auth_token": AUTH_TOKEN,
            "from": SENDER, "base_url": base_url, "concurrency": CONCURRENCY,
            "price_per_segment": "0.0079",
        }},
        "limits": {"concurrency": CONCURRENCY},
        "compliance": {"consent": "not_required"},
    }
    path = OUT / "bench-twilio.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path



def messages(csv_path: Path) -> list[OutboundMessage]:
    """The same messages the campaign sends (the body rendered the same way)."""
    out: list[OutboundMessage] = []
    with csv_path.open(newline="", encoding="utf-8") as f:
        for row, rec in enumerate(csv.DictReader(f), start=1):
            body = f"Hi {rec['first_name']}, your order {row} has shipped."
            out.append(OutboundMessage(
                run_id=1, row=row, channel=Channel.SMS, recipient_key=rec["id"],
                address=rec["phone"], idempotency_key=f"k{row}",
                content=SmsContent(body=body, encoding="GSM-7", segments=1), content_hash="",
            ))
    return out


async def bare_loop(base_url: str, batch: list[OutboundMessage]) -> tuple[float, int]:
    adapter = TwilioAdapter(account_sid=ACCOUNT_SID, auth_token=AUTH_TOKEN, sender=SENDER,
                            base_url=base_url)
    client = make_client(base_url=base_url, timeout=10.0, concurrency=CONCURRENCY)
    queue: asyncio.Queue[OutboundMessage | None] = asyncio.Queue()
    for m in batch:
        queue.put_nowait(m)
    for _ in range(CONCURRENCY):
        queue.put_nowait(None)
    ok = 0

    async def worker() -> None:
        nonlocal ok
        while True:
            m = await queue.get()
            if m is None:
                return
            response = await client.send(adapter.build(m))
            await response.aread()
            if response.status_code == 201:
                ok += 1

    try:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        return time.perf_counter() - t0, ok
    finally:
        await client.aclose()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("n", nargs="?", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    n: int = args.n
    csv_path = recipients(n)
    print(reference())
    store = OUT / "http-sink-store.db"
    batch = messages(csv_path)
    nginx = Nginx()
    try:
        campaign = write_campaign(csv_path, nginx.url)
        print(f"nginx sink on {nginx.url} (pid {nginx.proc.pid}); {n:,} recipients; "
              f"concurrency {CONCURRENCY}")
        e2e: list[float] = []
        bare: list[float] = []
        for i in range(args.runs):
            wall, summary = end_to_end(campaign, store)
            counts = summary["counts"]
            assert isinstance(counts, dict)
            sent = int(counts.get("sent", 0))
            if sent != n:
                raise SystemExit(f"only {sent:,} of {n:,} sent: {summary}")
            e2e.append(sent / wall)
            print(f"[{i + 1}] campaign send  {sent:>9,} sent    {wall:6.2f} s wall  "
                  f"{sent / wall:8,.0f} msg/s (whole process)   run's rate_per_s "
                  f"{summary['rate_per_s']:,.0f}/s over {summary['duration_s']} s")
            seconds, ok = asyncio.run(bare_loop(nginx.url, batch))
            if ok != n:
                raise SystemExit(f"bare loop: only {ok:,} of {n:,} answered 201")
            bare.append(ok / seconds)
            print(f"[{i + 1}] bare client    {ok:>9,} 201s    {seconds:6.2f} s       "
                  f"{ok / seconds:8,.0f} req/s")
        a, b = statistics.median(e2e), statistics.median(bare)
        print(f"median of {args.runs}: end to end {a:,.0f} msg/s, bare {b:,.0f} req/s, "
              f"ratio {100 * a / b:.0f}% (targets: >= 2,500 msg/s and >= 75%: "
              f"{'MET' if a >= 2500 and a >= 0.75 * b else 'NOT met'})")
    finally:
        nginx.stop()


if __name__ == "__main__":
    main()
