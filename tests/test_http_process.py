"""`HttpProcess`: HTTP exchanges in a child process. What each side does when the other fails,
and that a run uses it only when it sends over HTTP.

The exchanges themselves (answers, every transport failure and what it classifies as) are
tested over both transports in tests/test_http_transport.py; the chaos tests in
tests/test_integration_http.py SIGKILL `campaign send` while its child holds requests.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from campaign_cli.providers.http import make_client
from campaign_cli.providers.process import (
    _CHILD_CODE,
    HttpProcess,
    HttpProcessError,
    HttpProcessGone,
    _frame,
)
from tests.conftest import (
    CampaignFactory,
    journal,
    people,
    query,
    signals_as_a_terminal_leaves_them,
)
from tests.fakeserver import (  # noqa: F401 - pytest fixtures
    FakeProviderServer,
    fake_server_fixture,
)
from tests.test_cli_process import DEADLINE, campaign_cmd, sent_rows, start, wait_for
from tests.test_http_transport import post, run, sink


def http_children(pid: int) -> list[int]:
    """The HTTP processes `campaign send` (process ``pid``) has started."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid and b"campaign_cli.providers.process" in cmdline:
            found.append(int(entry))
    return found


def gone(pid: int) -> bool:
    """The process has exited (reaped, or a zombie waiting for its new parent)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")


def wait_until(condition: object, what: str, deadline: float = DEADLINE) -> None:
    end = time.monotonic() + deadline
    while not condition():  # type: ignore[operator]
        if time.monotonic() > end:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


@asynccontextmanager
async def hosted(url: str) -> AsyncIterator[tuple[HttpProcess, httpx.AsyncClient]]:
    """A started `HttpProcess` and a client of two connections sending through it; both closed
    on the way out."""
    host = await HttpProcess.start()
    client = make_client(base_url=url, timeout=30.0, concurrency=2, transport=host.transport(2))
    try:
        yield host, client
    finally:
        await client.aclose()
        await host.aclose()


# --------------------------------------------------------------------------------------------
# The child fails


def test_a_killed_child_leaves_what_it_held_in_doubt_and_takes_nothing_more() -> None:
    async def scenario() -> None:
        async with sink() as s:
            s.mode = "withhold"
            async with hosted(s.url) as (host, client):
                held = asyncio.create_task(client.send(post(s.url)))
                await asyncio.wait_for(s.received.wait(), 10)
                os.kill(host.pid, signal.SIGKILL)
                with pytest.raises(HttpProcessError) as info:
                    await asyncio.wait_for(held, 10)
                # It had the request: it may have left (the pipeline keeps the row in doubt).
                assert type(info.value) is HttpProcessError
                assert "killed by signal 9" in str(info.value)
                # Later requests are refused before they leave: not sent, not in doubt.
                with pytest.raises(HttpProcessGone):
                    await client.send(post(s.url))
                assert len(s.requests) == 1

    run(scenario())


def test_a_request_made_after_the_child_s_output_ended_is_not_sent_not_in_doubt(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Once the child's output has ended it reads nothing more: a request written after that
    (while its exit status is collected) never reached it. It is not sent (`HttpProcessGone`),
    not in doubt."""

    async def scenario() -> None:
        async with sink() as s:
            async with hosted(s.url) as (host, client):
                assert (await client.send(post(s.url))).status_code == 201
                collecting, collected = asyncio.Event(), asyncio.Event()
                exit_code = host._exit_code

                async def slow_exit_code() -> int | None:
                    collecting.set()
                    await collected.wait()
                    return await exit_code()

                monkeypatch.setattr(host, "_exit_code", slow_exit_code)
                os.kill(host.pid, signal.SIGKILL)
                await asyncio.wait_for(collecting.wait(), 10)  # its output has ended
                late = asyncio.create_task(client.send(post(s.url)))
                for _ in range(5):  # the send is queued and its frame written (or held)
                    await asyncio.sleep(0)
                collected.set()
                with pytest.raises(HttpProcessGone):
                    await asyncio.wait_for(late, 10)
                assert len(s.requests) == 1

    run(scenario())


def test_a_wedged_child_is_stopped_once_a_request_is_past_all_its_timeouts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A stopped (SIGSTOP, a debugger) or stuck child answers nothing, not even timeouts: the run
    would hang. Once a request it holds is past its timeouts and the margin, the child is
    killed and what it held is in doubt."""
    from campaign_cli.providers import process

    monkeypatch.setattr(process, "STALL_MARGIN", 0.3)
    monkeypatch.setattr(process, "WATCHDOG_INTERVAL", 0.05)

    async def scenario() -> None:
        async with sink() as s:
            async with hosted(s.url) as (host, client):
                assert (await client.send(post(s.url))).status_code == 201
                os.kill(host.pid, signal.SIGSTOP)
                quick = {"connect": 0.1, "read": 0.1, "write": 0.1, "pool": 0.1}
                with pytest.raises(HttpProcessError, match="answered nothing within") as info:
                    await asyncio.wait_for(client.send(post(s.url, quick)), 30)
                assert type(info.value) is HttpProcessError  # handed over: in doubt
                assert gone(host.pid) or host._process.returncode == -signal.SIGKILL
                with pytest.raises(HttpProcessGone, match="answered nothing within"):
                    await client.send(post(s.url, quick))

    run(scenario())


def test_close_lets_the_child_finish_or_kills_it_when_requests_are_still_held() -> None:
    async def scenario() -> None:
        async with sink() as s:
            host = await HttpProcess.start()
            client = make_client(base_url=s.url, timeout=30.0, concurrency=2,
                                 transport=host.transport(2))
            assert (await client.send(post(s.url))).status_code == 201
            await client.aclose()
            await host.aclose()
            assert host._process.returncode == 0  # asked to close, it closed its pools and left

            s.mode = "withhold"
            s.received.clear()  # set by the first request: wait for the held one itself
            host = await HttpProcess.start()
            client = make_client(base_url=s.url, timeout=30.0, concurrency=2,
                                 transport=host.transport(2))
            held = asyncio.create_task(client.send(post(s.url)))
            await asyncio.wait_for(s.received.wait(), 10)
            # An immediate stop closes while a request is held: no waiting for its answer.
            await asyncio.wait_for(host.aclose(), 5)
            assert host._process.returncode == -signal.SIGKILL
            with pytest.raises(HttpProcessError):
                await held
            await client.aclose()

    run(scenario())


def test_a_close_cancelled_while_the_child_finishes_still_closes_everything(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`aclose` cancelled while it waited for the child to finish (a second Ctrl-C, an
    application's timeout) left its answer reader and watchdog tasks to the loop and the file of
    the child's last words open, and the child running until it got round to exiting."""

    async def scenario() -> HttpProcess:
        host = await HttpProcess.start()
        finishing = asyncio.Event()

        async def close_child() -> None:  # a child slow to finish
            finishing.set()
            await asyncio.Event().wait()

        monkeypatch.setattr(host, "_close_child", close_child)
        closing = asyncio.create_task(host.aclose())
        await finishing.wait()
        closing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await closing
        assert host._reader is not None and host._reader.done()
        assert host._watchdog is not None and host._watchdog.done()
        assert host._last_words is None
        await asyncio.wait_for(host._process.wait(), DEADLINE)  # killed: it ends
        return host

    host = run(scenario())
    assert host._process.returncode == -signal.SIGKILL


def test_a_start_cancelled_before_the_child_is_ready_ends_the_child(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A user's task cancelled (or Ctrl-C in `asyncio.run`) while the child starts: the child
    is ended, not left waiting for ever on a pipe this process keeps open (with a thread and
    two descriptors of this process)."""
    import campaign_cli.providers.process as process

    # A child that never says it is ready (the real one takes a few hundred ms to).
    monkeypatch.setattr(process, "_CHILD_CODE",
                        "# campaign_cli.providers.process\nimport sys\nsys.stdin.buffer.read()\n")

    async def scenario() -> list[int]:
        starting = asyncio.create_task(HttpProcess.start())
        end = time.monotonic() + DEADLINE
        while not (children := http_children(os.getpid())):
            assert time.monotonic() < end, "the HTTP process never started"
            await asyncio.sleep(0.01)
        starting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await starting
        return children

    children = run(scenario())
    alive = [pid for pid in children if not gone(pid)]
    for pid in alive:
        os.kill(pid, signal.SIGKILL)
    assert alive == []


def test_a_start_cancelled_while_the_child_is_made_closes_its_stderr_file(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Cancelled before the child exists (asyncio is still making it): the file kept for its
    last words is closed, not left open for the garbage collector (a ResourceWarning, which a
    test suite that turns warnings into errors fails on)."""
    import tempfile

    opened: list[Any] = []
    real = tempfile.TemporaryFile
    making = asyncio.Event()

    def temporary_file(*args: Any, **kwargs: Any) -> Any:
        opened.append(real(*args, **kwargs))
        return opened[-1]

    async def create_subprocess_exec(*args: Any, **kwargs: Any) -> Any:
        making.set()
        await asyncio.Event().wait()  # never made

    monkeypatch.setattr(tempfile, "TemporaryFile", temporary_file)
    monkeypatch.setattr(asyncio, "create_subprocess_exec", create_subprocess_exec)

    async def scenario() -> None:
        starting = asyncio.create_task(HttpProcess.start())
        await making.wait()
        starting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await starting

    run(scenario())
    assert len(opened) == 1
    closed = opened[0].closed
    opened[0].close()
    assert closed


# --------------------------------------------------------------------------------------------
# The parent fails


def test_a_frame_left_in_the_pipe_by_a_dead_parent_is_not_sent() -> None:
    """After a SIGKILL of `campaign send`, the child may still find requests in its pipe. It
    checks before each frame that its parent is the one that started it (here the init names
    another process, as if the parent had died and the child been adopted): nothing leaves."""

    async def scenario() -> None:
        async with sink() as s:
            child = await asyncio.create_subprocess_exec(
                sys.executable, "-c", _CHILD_CODE, stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
            )
            assert child.stdin is not None and child.stdout is not None
            request = post(s.url)
            child.stdin.write(_frame(("init", {"sys_path": sys.path, "parent": 1})))
            child.stdin.write(_frame(("send", [
                ("open", 1, 2, 15.0),
                (1, 1, "POST", str(request.url), [("Host", request.url.netloc.decode())],
                 request.content, {"connect": 5.0, "read": 5.0, "write": 5.0, "pool": 5.0},
                 None),
            ])))
            await child.stdin.drain()
            assert await asyncio.wait_for(child.wait(), 30) == 0
            assert s.requests == []
            assert s.connections == 0

    run(scenario())


def test_the_child_ends_when_its_parent_is_killed(tmp_path: Path) -> None:
    script = tmp_path / "parent.py"
    script.write_text(
        "import asyncio, sys\n"
        "from campaign_cli.providers.process import HttpProcess\n"
        "async def main():\n"
        "    host = await HttpProcess.start()\n"
        "    print(host.pid, flush=True)\n"
        "    await asyncio.sleep(3600)\n"
        "asyncio.run(main())\n"
    )
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert not gone(child)
        parent.kill()
        parent.wait()
        wait_until(lambda: gone(child), "the HTTP process to exit after its parent's SIGKILL")
    finally:
        parent.kill()
        parent.wait()
        if parent.stdout is not None:
            parent.stdout.close()


# --------------------------------------------------------------------------------------------
# `campaign send` and the process


def test_campaign_send_stops_with_exit_1_when_its_http_process_dies_and_resume_sends_none_twice(
    make_campaign: CampaignFactory, store_path: Path, fake_server: FakeProviderServer
) -> None:
    """Twilio cannot deduplicate. The messages the dead child held may have arrived: they end in
    doubt, never pending, so the resume of a marketing run (in doubt: skip) does not send them
    again; the rest stay pending and go out on the resume."""
    fake_server.latency = 0.3
    campaign = make_campaign(
        people(200), purpose="marketing", compliance={"consent": "not_required"},
        channels={"sms": {"provider": "tw", "body": "Sale {{ row }}. Reply STOP to opt out"}},
        providers={"tw": {**fake_server.provider_config("twilio"), "concurrency": 4,
                          "rate": "40/s"}},
        limits={"concurrency": 4},
    )
    proc = start(store_path, "send", str(campaign), "--run-key", "k")
    wait_for(lambda: sent_rows(store_path) >= 20, proc, "20 messages sent")
    children = http_children(proc.pid)
    assert len(children) == 1
    os.kill(children[0], signal.SIGKILL)
    _, err = proc.communicate(timeout=DEADLINE)
    assert proc.returncode == 1, err
    assert "Traceback" not in err
    assert "provider tw: the HTTP process ended unexpectedly (killed by signal 9)" in err

    rows = journal(store_path)
    states = Counter(r["state"] for r in rows)
    assert set(states) <= {"sent", "in_doubt", "pending"}, states
    assert 1 <= states["in_doubt"] <= 4  # what the child held: at most the concurrency
    assert states["pending"] > 0
    accepted = set(fake_server.accepted("twilio"))
    sent_or_doubt = {r["address"] for r in rows if r["state"] in ("sent", "in_doubt")}
    assert accepted <= sent_or_doubt  # nothing that may have arrived is left to send again

    done = subprocess.run(
        [sys.executable, "-m", "campaign_cli", "--store", str(store_path), "send",
         str(campaign), "--run-key", "k", "--json"],
        capture_output=True, text=True, timeout=DEADLINE * 2,
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["counts"] == {"sent": 200 - states["in_doubt"],
                                 "in_doubt": states["in_doubt"]}
    assert max(Counter(fake_server.accepted("twilio")).values()) == 1  # nobody got two


def count_starts(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The pids of the HTTP processes started from now on (in this process)."""
    started: list[int] = []
    real_start = HttpProcess.start

    async def counting_start() -> HttpProcess:
        host = await real_start()
        started.append(host.pid)
        return host

    monkeypatch.setattr(HttpProcess, "start", staticmethod(counting_start))
    return started


def test_only_a_real_run_with_an_http_provider_starts_the_process(
    make_campaign: CampaignFactory, store_path: Path, fake_server: FakeProviderServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from campaign_cli.config import load_campaign
    from campaign_cli.pipeline import SendOptions, run_campaign

    started = count_starts(monkeypatch)
    outbox = make_campaign(people(3), file_name="outbox.yaml")
    report = run_campaign(load_campaign(outbox), store_path, SendOptions(run_key="o"))
    assert report.exit_code == 0 and started == []

    twilio = make_campaign(
        people(3), file_name="twilio.yaml",
        channels={"sms": {"provider": "tw", "body": "Code {{ row }}"}},
        providers={"tw": fake_server.provider_config("twilio")},
    )
    report = run_campaign(load_campaign(twilio), store_path,
                          SendOptions(run_key="dry", dry_run=True))
    assert report.exit_code == 0 and started == []
    report = run_campaign(load_campaign(twilio), store_path,
                          SendOptions(run_key="inline", http_process=False))
    assert report.exit_code == 0 and started == []
    assert len(fake_server.accepted("twilio")) == 3
    report = run_campaign(load_campaign(twilio), store_path, SendOptions(run_key="process"))
    assert report.exit_code == 0 and len(started) == 1
    assert len(fake_server.accepted("twilio")) == 6
    assert gone(started[0])  # closed with the run


def test_a_provider_that_cannot_be_built_closes_the_http_process_and_records_no_session(
    make_campaign: CampaignFactory, store_path: Path, fake_server: FakeProviderServer,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The HTTP process starts before the providers are built: an FCM key file that is not
    JSON is exit 2 (a configuration error, nothing started), the child is closed with it, and
    the store holds no session that `send --json`'s not_started summary would contradict."""
    from campaign_cli.config import load_campaign
    from campaign_cli.errors import CampaignError
    from campaign_cli.pipeline import SendOptions, run_campaign

    started = count_starts(monkeypatch)
    bad_key = tmp_path / "service-account.json"
    bad_key.write_text("not json")
    tokens = [[key, name, phone, f"dEvIcE-tOkEn_0123456789:{key}"]
              for key, name, phone, _ in people(2)]
    campaign = make_campaign(
        tokens, compliance={"consent": "not_required"},
        channels={"push": {"provider": "fcm", "title": "Hi", "body": "Hi {{ row }}"}},
        providers={"fcm": fake_server.provider_config(
            "fcm", access_token=None, service_account_file=str(bad_key))},
        extra={"recipients": {"file": "recipients.csv", "key": "id",
                              "columns": {"push_token": "email"}}},
    )
    with pytest.raises(CampaignError, match="not JSON") as info:
        run_campaign(load_campaign(campaign), store_path, SendOptions(run_key="k"))
    assert info.value.exit_code == 2
    assert len(started) == 1 and gone(started[0])
    assert query(store_path, "SELECT count(*) FROM runs") == [(0,)]
    assert fake_server.requests == []


def test_a_child_that_dies_during_fcm_s_token_fetch_leaves_the_push_message_pending(
    make_campaign: CampaignFactory, store_path: Path, fake_server: FakeProviderServer,
    tmp_path: Path,
) -> None:
    """The child held only the OAuth token request, not the message: the push message never
    left, so its row goes back to pending (FCM cannot deduplicate: an in-doubt marketing row
    would never be sent), and the run still stops with exit 1."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    sa_file = tmp_path / "service-account.json"
    sa_file.write_text(json.dumps({
        "client_email": "sender@demo-proj.iam.gserviceaccount.com",
        "private_key": key.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()).decode(),
    }))
    fake_server.faults.fail_next(1, "withhold", service="token")
    tokens = [[key, name, phone, f"dEvIcE-tOkEn_0123456789:{key}"]
              for key, name, phone, _ in people(20)]
    campaign = make_campaign(
        tokens, purpose="marketing", compliance={"consent": "not_required"},
        channels={"push": {"provider": "fcm", "title": "Sale", "body": "Sale {{ row }}"}},
        providers={"fcm": fake_server.provider_config(
            "fcm", access_token=None, service_account_file=str(sa_file))},
        limits={"concurrency": 4},
        extra={"recipients": {"file": "recipients.csv", "key": "id",
                              "columns": {"push_token": "email"}}},
    )
    proc = start(store_path, "send", str(campaign), "--run-key", "k")
    wait_for(lambda: len(fake_server.requests_for("token")) == 1, proc, "the token request")
    children = http_children(proc.pid)
    assert len(children) == 1
    os.kill(children[0], signal.SIGKILL)
    _, err = proc.communicate(timeout=DEADLINE)
    assert proc.returncode == 1, err
    assert "HTTP process" in err and "Traceback" not in err
    assert fake_server.requests_for("fcm") == []
    assert Counter(r["state"] for r in journal(store_path)) == {"pending": 20}


@pytest.mark.parametrize("interpreter", ["/nonexistent/python3", "", None])
def test_an_interpreter_that_cannot_be_started_sends_from_the_run_s_own_process(
    make_campaign: CampaignFactory, store_path: Path, fake_server: FakeProviderServer,
    monkeypatch: pytest.MonkeyPatch, interpreter: str | None,
) -> None:
    """`sys.executable` may be empty or None (Python could not tell its own path: an embedded
    interpreter) or name no file: the HTTP process cannot start. That is no reason to refuse
    the run: it sends from its own process, as before the split, and says why in a warning
    (it was once an exception taken for a bug, the run left `running`)."""
    from campaign_cli.config import load_campaign
    from campaign_cli.pipeline import SendOptions, run_campaign

    with pytest.raises(HttpProcessError, match="the HTTP process did not start"):
        monkeypatch.setattr(sys, "executable", interpreter)
        run(HttpProcess.start())
    twilio = make_campaign(
        people(3), channels={"sms": {"provider": "tw", "body": "Code {{ row }}"}},
        providers={"tw": fake_server.provider_config("twilio")},
    )
    report = run_campaign(load_campaign(twilio), store_path, SendOptions(run_key="k"))
    assert report.exit_code == 0
    assert report.counts == {"sent": 3}
    assert len(fake_server.accepted("twilio")) == 3
    assert [w for w in report.warnings if "the HTTP process did not start" in w
            and "sent from this process instead" in w]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_stop_signal_to_the_whole_process_group_stops_gracefully(
    make_campaign: CampaignFactory, store_path: Path, fake_server: FakeProviderServer,
    signum: signal.Signals,
) -> None:
    """A terminal sends Ctrl-C (SIGINT) to its whole foreground process group, and SIGHUP when
    it hangs up; a supervisor may signal the whole group or cgroup. The HTTP process is in that
    group: it must leave the stop to its parent, whose graceful stop lets the requests in flight
    finish (exit 130, nothing in doubt), not die with them."""
    fake_server.latency = 0.5
    campaign = make_campaign(
        people(100), compliance={"consent": "not_required"},
        channels={"sms": {"provider": "tw", "body": "Code {{ row }}"}},
        providers={"tw": {**fake_server.provider_config("twilio"), "concurrency": 4}},
        limits={"concurrency": 4},
    )
    with signals_as_a_terminal_leaves_them():
        proc = subprocess.Popen(campaign_cmd(store_path, "send", str(campaign), "--run-key", "k"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    try:
        wait_for(lambda: len(fake_server.requests_for("twilio")) >= 6, proc,
                 "requests in flight")
        os.killpg(proc.pid, signum)
        _, err = proc.communicate(timeout=DEADLINE)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 130, err
    states = Counter(r["state"] for r in journal(store_path))
    assert set(states) == {"sent", "pending"}, states
    assert states["sent"] == len(fake_server.accepted("twilio"))


def test_a_journal_that_cannot_be_opened_finishes_the_run_and_ends_the_process(
    make_campaign: CampaignFactory, store_path: Path, fake_server: FakeProviderServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The journal writer's connection is opened after the providers and the HTTP process: when
    it fails, the run is finished as aborted (it was left `running`) and the process ends."""
    import sqlite3

    from campaign_cli.config import load_campaign
    from campaign_cli.errors import StoreError
    from campaign_cli.pipeline import SendOptions, run_campaign
    from campaign_cli.store.journal import JournalWriter

    started = count_starts(monkeypatch)

    def refuse(self: JournalWriter) -> JournalWriter:
        raise StoreError("journal writer could not open the store: disk I/O error")

    monkeypatch.setattr(JournalWriter, "start", refuse)
    twilio = make_campaign(
        people(3), channels={"sms": {"provider": "tw", "body": "Code {{ row }}"}},
        providers={"tw": fake_server.provider_config("twilio")},
    )
    with pytest.raises(StoreError):
        run_campaign(load_campaign(twilio), store_path, SendOptions(run_key="k"))
    conn = sqlite3.connect(store_path)
    try:
        assert conn.execute("SELECT status, exit_code FROM runs").fetchall() == [("aborted", 2)]
    finally:
        conn.close()
    assert len(started) == 1 and gone(started[0])
    assert fake_server.requests == []


def test_single_process_sends_http_from_the_run_s_process_and_its_resume_does_too(
    make_campaign: CampaignFactory, store_path: Path, fake_server: FakeProviderServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`--single-process`: for a machine short of memory (the HTTP process is ~40 MiB, the
    reader ~21 MiB), nothing is started beside the run; the resume command it prints keeps the
    flag, since the resume runs on the same machine."""
    import shlex

    from typer.testing import CliRunner

    from campaign_cli.cli.main import get_app
    from campaign_cli.recipients import ProcessChunkReader

    started = count_starts(monkeypatch)
    readers: list[object] = []
    real_reader = ProcessChunkReader.__init__

    def counting_reader(self: ProcessChunkReader, *args: object, **kwargs: object) -> None:
        readers.append(self)
        real_reader(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(ProcessChunkReader, "__init__", counting_reader)
    campaign = make_campaign(
        people(25_000), channels={"sms": {"provider": "tw", "body": "Code {{ row }}"}},
        providers={"tw": {**fake_server.provider_config("twilio"),
                          "price_per_segment": "0.01"}},
        limits={"max_spend": "0.05"},
    )
    result = CliRunner().invoke(get_app(), ["--store", str(store_path), "send", str(campaign),
                                            "--single-process", "--run-key", "k"])
    assert result.exit_code == 3, result.stderr  # the cap: 5 sent, the rest pending
    assert started == [] and readers == []
    assert len(fake_server.accepted("twilio")) == 5
    [hint] = [line for line in result.stderr.splitlines() if "To resume" in line]
    assert "--single-process" in shlex.split(hint.split(": ", 1)[1].replace("<", "").replace(
        ">", ""))


def test_a_child_that_crashes_says_why_in_one_line() -> None:
    """A bug in the child ends it with exit 1; the parent's error carries the child's last line
    (its exception), not only "exit code 1", and nothing reaches the user's terminal."""

    async def scenario() -> None:
        async with sink() as s, hosted(s.url) as (host, client):
            assert (await client.send(post(s.url))).status_code == 201
            host._queue(("bogus",))  # a frame the child cannot read: a bug, as far as it knows
            for _ in range(1000):  # until the parent has seen the end of the child's output
                if host._failure is not None:
                    break
                await asyncio.sleep(0.01)
            with pytest.raises(HttpProcessGone) as info:
                await client.send(post(s.url))
            assert "exit code 1: ValueError: not enough values to unpack" in str(info.value)

    run(scenario())


def test_a_keyboard_interrupt_out_of_the_loop_still_closes_both_child_processes(
    make_campaign: CampaignFactory, store_path: Path, fake_server: FakeProviderServer,
    monkeypatch: pytest.MonkeyPatch, opened_readers: list[Any],
) -> None:
    """KeyboardInterrupt raised in the loop (here by a progress callback) leaves `asyncio.run`,
    which cancels every task while the run cancels its own too: the source's cleanup, cut short
    by the second cancellation, still ends the reader's child process and reaps it, and the
    HTTP process ends with the run."""
    from campaign_cli.config import load_campaign
    from campaign_cli.pipeline import SendOptions, run_campaign

    readers = opened_readers
    started = count_starts(monkeypatch)
    campaign = make_campaign(
        people(2000), channels={"sms": {"provider": "tw", "body": "Code {{ row }}"}},
        providers={"tw": fake_server.provider_config("twilio")}, limits={"concurrency": 8},
    )

    def interrupt(progress: Any) -> None:
        if progress.sent >= 50:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_campaign(load_campaign(campaign), store_path,
                     SendOptions(reader="process", poll_interval=0.05), on_progress=interrupt)
    assert len(readers) == 1 and len(started) == 1
    reaped = readers[0]._process.returncode is not None
    if not reaped:
        readers[0].close()
    assert reaped
    assert gone(started[0])
