"""`campaign send` as a real process: SIGKILL and resume, Ctrl-C, the run lock, and an opt-out
added from another terminal while a paced run is going.

These runs are paced (a few dozen messages a second) so that the event lands mid-run; the tests wait
on conditions in the journal (rows sent so far), never on fixed sleeps.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import (
    CampaignFactory,
    journal,
    people,
    phone,
    query,
    signals_as_a_terminal_leaves_them,
)
from tests.fakeserver import FakeProviderServer, fake_server_fixture  # noqa: F401

CAMPAIGN = [sys.executable, "-m", "campaign_cli"]
DEADLINE = 60.0


def campaign_cmd(store: Path, *args: str) -> list[str]:
    return [*CAMPAIGN, "--store", str(store), *args]


def start(store: Path, *args: str, stdout: int | object = subprocess.PIPE,
          ignored: tuple[signal.Signals, ...] = ()) -> subprocess.Popen[str]:
    with signals_as_a_terminal_leaves_them(*ignored):
        return subprocess.Popen(campaign_cmd(store, *args), stdout=stdout,  # type: ignore[arg-type]
                                stderr=subprocess.PIPE, text=True)


def sent_rows(store: Path) -> int:
    if not store.exists():
        return 0
    try:
        conn = sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=5)
        try:
            return int(conn.execute("SELECT count(*) FROM messages WHERE state = 'sent'")
                       .fetchone()[0])
        finally:
            conn.close()
    except sqlite3.OperationalError:
        return 0  # schema not created yet


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen[str], what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"process ended (exit {proc.returncode}) before {what}: {err}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def run(store: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(campaign_cmd(store, *args), capture_output=True, text=True,
                          timeout=DEADLINE)


def console_campaign(make_campaign: CampaignFactory, total: int, **compliance: str) -> Path:
    """``total`` people, one SMS each, through the `console` provider (unthrottled: batches)."""
    return make_campaign(
        people(total),
        providers={"con": {"type": "console", "price_per_segment": "0.01"}},
        channels={"sms": {"provider": "con", "body": "Hi {{ first_name }}, your code is 1234."}},
        compliance={"consent": "not_required", **compliance},
    )


@pytest.fixture
def paced(make_campaign: CampaignFactory) -> Path:
    return make_campaign(
        people(120),
        providers={"box": {"type": "outbox", "dir": "outbox", "rate": "40/s", "burst": 2,
                           "price_per_segment": "0.01"}},
        limits={"concurrency": 4},
    )


@pytest.fixture
def long_paced(make_campaign: CampaignFactory) -> Path:
    """15 s of sending: for tests that start another command while the run is going (which can
    take seconds on a loaded machine) and end the run themselves."""
    return make_campaign(
        people(600),
        providers={"box": {"type": "outbox", "dir": "outbox", "rate": "40/s", "burst": 2,
                           "price_per_segment": "0.01"}},
        limits={"concurrency": 4},
    )


def journal_state(store: Path, row: int) -> str | None:
    try:
        found = query(store, "SELECT state FROM messages WHERE row = ?", row)
    except sqlite3.OperationalError:
        return None
    return str(found[0][0]) if found else None


def hold_between_commits(proc: subprocess.Popen[str], store: Path) -> None:
    """Stop ``proc`` (SIGSTOP) at a moment it holds no write lock on the store, so that another
    command can write there while it is held. SIGCONT lets it go on."""
    deadline = time.monotonic() + DEADLINE
    while True:
        proc.send_signal(signal.SIGSTOP)
        wait_for(lambda: Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
                 == "T", proc, "the run stopped")
        probe = sqlite3.connect(store, timeout=0, isolation_level=None)
        try:
            probe.execute("BEGIN IMMEDIATE")
            probe.execute("ROLLBACK")
            return
        except sqlite3.OperationalError:  # stopped inside a commit: let it finish it
            proc.send_signal(signal.SIGCONT)
            assert time.monotonic() < deadline, "the run never left its write lock"
            time.sleep(0.02)
        finally:
            probe.close()


def test_sigkill_mid_run_then_resume_sends_everyone_exactly_once(
    paced: Path, store_path: Path, tmp_path: Path
) -> None:
    proc = start(store_path, "send", str(paced), "--run-key", "crash")
    wait_for(lambda: sent_rows(store_path) >= 30, proc, "30 messages sent")
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    before = Counter(r["state"] for r in journal(store_path))
    assert before["sent"] >= 30 and sum(before.values()) < 120 + 1

    result = run(store_path, "send", str(paced), "--run-key", "crash", "--rate", "1000",
                 "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    rows = journal(store_path)
    assert len(rows) == 120 and {r["row"] for r in rows} == set(range(1, 121))
    assert summary["counts"] == {"sent": 120}
    assert sum(summary["counts"].values()) == summary["total_rows"] == 120
    # The outbox names each file by idempotency key: exactly one file per recipient.
    files = sorted((tmp_path / "outbox" / "test-campaign_crash").glob("*.json"))
    assert len(files) == 120
    assert sorted(json.loads(f.read_text())["recipient_key"] for f in files) == sorted(
        f"c{i}" for i in range(1, 121)
    )
    resent = sum(r["resent_in_doubt"] for r in rows)
    assert summary["in_doubt_resent"] == resent == summary["in_doubt_found"]
    # status says the same of that session (not the in-doubt rows left now: none)
    status = json.loads(run(store_path, "status", summary["run"], "--json").stdout)
    assert (status["in_doubt_found"], status["in_doubt_resent"], status["stopped"]) == (
        summary["in_doubt_found"], summary["in_doubt_resent"], None)


def test_status_tells_a_live_run_from_one_whose_process_was_killed(
    long_paced: Path, store_path: Path
) -> None:
    """A killed run stays `running` in the store until it is resumed; status says whether a
    process still drives it (and who), so an operator is not left waiting for a dead one."""
    proc = start(store_path, "send", str(long_paced), "--run-key", "live")
    wait_for(lambda: sent_rows(store_path) >= 5, proc, "5 messages sent")
    hold_between_commits(proc, store_path)  # (the run could end while `status` starts up)
    try:
        live = json.loads(run(store_path, "status", "test-campaign/live", "--json").stdout)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    assert live["status"] == "running"
    assert live["holder"] is not None and live["holder"].startswith(f"pid {proc.pid} on ")

    dead = json.loads(run(store_path, "status", "test-campaign/live", "--json").stdout)
    assert (dead["status"], dead["holder"]) == ("running", None)
    shown = run(store_path, "status", "test-campaign/live")
    assert "running (stopped: no process)" in shown.stdout
    assert "the same `campaign send` command resumes it" in shown.stdout
    assert "running (stopped: no process)" in run(store_path, "status").stdout
    [listed] = json.loads(run(store_path, "status", "--json").stdout)
    assert (listed["status"], listed["holder"]) == ("running", None)


def test_sigkill_with_a_provider_that_cannot_deduplicate_reports_doubts_instead_of_resending(
    make_campaign: CampaignFactory, store_path: Path, tmp_path: Path
) -> None:
    campaign = make_campaign(
        people(120), purpose="marketing",
        channels={"sms": {"provider": "con", "body": "Hi {{ first_name }}. Reply STOP to opt out"}},
        providers={"con": {"type": "console", "rate": "40/s", "burst": 2}},
        compliance={"consent": "not_required"},
    )
    printed = tmp_path / "printed.jsonl"
    with printed.open("a") as out:
        proc = start(store_path, "send", str(campaign), "--run-key", "k", stdout=out)
        wait_for(lambda: sent_rows(store_path) >= 20, proc, "20 messages sent")
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        done = subprocess.run(campaign_cmd(store_path, "send", str(campaign), "--run-key", "k",
                                           "--rate", "1000"),
                              stdout=out, stderr=subprocess.PIPE, text=True, timeout=DEADLINE)
    assert done.returncode == 0, done.stderr
    keys = Counter(json.loads(line)["recipient_key"] for line in printed.read_text().splitlines())
    assert max(keys.values()) == 1  # nobody got the message twice
    states = Counter(r["state"] for r in journal(store_path))
    assert sum(states.values()) == 120
    assert set(states) <= {"sent", "in_doubt"}
    assert states["sent"] + states["in_doubt"] == 120
    # Every in-doubt row is reported, not silently dropped.
    status = json.loads(run(store_path, "status", "test-campaign/k", "--json").stdout)
    assert status["counts"].get("in_doubt", 0) == states["in_doubt"]


def test_ctrl_c_exits_130_prints_the_resume_command_and_resume_completes(
    paced: Path, store_path: Path
) -> None:
    proc = start(store_path, "send", str(paced), "--run-key", "int")
    wait_for(lambda: sent_rows(store_path) >= 10, proc, "10 messages sent")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=DEADLINE)
    assert proc.returncode == 130, err
    assert "to resume:" in err and "--run-key int" in err
    assert "Traceback" not in err
    assert sum(1 for r in journal(store_path) if r["state"] == "sending") == 0

    result = run(store_path, "send", str(paced), "--run-key", "int", "--rate", "1000", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["counts"] == {"sent": 120}


def test_a_second_process_on_the_same_run_exits_5_naming_the_holder(
    long_paced: Path, store_path: Path
) -> None:
    proc = start(store_path, "send", str(long_paced), "--run-key", "lock")
    try:
        wait_for(lambda: sent_rows(store_path) >= 1, proc, "the first message")
        hold_between_commits(proc, store_path)  # (the run could end while the second starts)
        second = run(store_path, "send", str(long_paced), "--run-key", "lock")
        assert second.returncode == 5, second.stderr
        assert f"pid {proc.pid}" in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()


def test_an_opt_out_added_mid_run_is_honoured(
    long_paced: Path, store_path: Path, tmp_path: Path
) -> None:
    proc = start(store_path, "send", str(long_paced), "--run-key", "optout")
    wait_for(lambda: sent_rows(store_path) >= 5, proc, "5 messages sent")
    late = phone(200)  # row 200, five seconds from being sent at 40/s
    # The run is held while the opt-out is added: on a loaded machine `suppress add` alone (a
    # fresh interpreter) took longer than those five seconds, and row 200 had been sent.
    hold_between_commits(proc, store_path)
    try:
        added = run(store_path, "suppress", "add", late.replace("+1", ""), "--channel", "sms")
    finally:
        proc.send_signal(signal.SIGCONT)
    assert added.returncode == 0, added.stderr
    assert journal_state(store_path, 200) in ("pending", None), "the opt-out came too late"
    wait_for(lambda: journal_state(store_path, 201) == "sent", proc, "row 201 sent")
    proc.send_signal(signal.SIGINT)  # the rest would take ten more seconds
    _, err = proc.communicate(timeout=DEADLINE)
    assert proc.returncode == 130, err
    assert journal_state(store_path, 200) == "suppressed"
    printed = [json.loads(f.read_text())["to"]
               for f in (tmp_path / "outbox" / "test-campaign_optout").glob("*.json")]
    # (rows just before it may still have been waiting for their turn when the run stopped)
    assert late not in printed and phone(201) in printed


def test_a_run_started_under_nohup_outlives_its_terminal(paced: Path, store_path: Path) -> None:
    """`nohup campaign send ... &` asks for the run to go on when the terminal closes. The run
    stopped on SIGHUP anyway (its stop handler replaced the ignore it was started with), so
    logging out stopped a campaign its operator had put in the background for that purpose."""
    proc = start(store_path, "send", str(paced), "--run-key", "nohup",
                 ignored=(signal.SIGHUP,))
    wait_for(lambda: sent_rows(store_path) >= 5, proc, "5 messages sent")
    proc.send_signal(signal.SIGHUP)  # the terminal closed
    _, err = proc.communicate(timeout=DEADLINE)
    assert proc.returncode == 0, err
    assert Counter(r["state"] for r in journal(store_path)) == {"sent": 120}
    assert "SIGHUP" not in err


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_are_handled_like_ctrl_c(
    paced: Path, store_path: Path, signum: signal.Signals
) -> None:
    """SIGTERM (a supervisor, `kill`) and SIGHUP (the SSH session or terminal went away) stop
    the run as Ctrl-C does: in-flight sends finish, nothing is left in doubt, exit 130."""
    proc = start(store_path, "send", str(paced), "--run-key", "term")
    wait_for(lambda: sent_rows(store_path) >= 5, proc, "5 messages sent")
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=DEADLINE)
    assert proc.returncode == 130, err
    assert signum.name in err
    states = Counter(r["state"] for r in journal(store_path))
    assert set(states) <= {"sent", "pending"} and states["sent"] >= 5



def test_a_terminal_that_hangs_up_mid_run_still_gets_the_summary_and_exit_130(
    paced: Path, store_path: Path
) -> None:
    """`ssh host 'campaign send x.yaml --json > summary.json'` and the SSH session drops: the
    terminal hangs up, SIGHUP stops the run, and every write to stderr (the live display, the
    stop warning) now fails with EIO, not EPIPE. Only a broken pipe was dropped: the display's
    last redraw raised OSError out of `send`, the summary was never written to the file that
    could take it, and the exit code was 1 ("internal error, a bug") for a run the journal
    records as interrupted (130). What cannot be shown is dropped, as for a broken pipe."""
    import pty
    import select

    summary = store_path.parent / "summary.json"
    master, slave = pty.openpty()
    with summary.open("w") as out, signals_as_a_terminal_leaves_them():
        proc = subprocess.Popen(campaign_cmd(store_path, "send", str(paced), "--json"),
                                stdin=subprocess.DEVNULL, stdout=out, stderr=slave,
                                close_fds=True)
    os.close(slave)
    try:
        def shown() -> bool:  # (and keep the terminal's buffer drained)
            while select.select([master], [], [], 0)[0]:
                os.read(master, 65536)
            return sent_rows(store_path) >= 5

        wait_for(shown, proc, "5 messages sent")
    finally:
        os.close(master)  # the terminal hangs up: writes to it fail with EIO
    proc.send_signal(signal.SIGHUP)
    assert proc.wait(timeout=DEADLINE) == 130
    result = json.loads(summary.read_text())
    assert (result["status"], result["exit_code"]) == ("interrupted", 130)
    assert query(store_path, "SELECT status, exit_code FROM runs") == [("interrupted", 130)]


def test_ctrl_c_whose_log_reader_died_with_it_still_stops_gracefully(
    paced: Path, store_path: Path
) -> None:
    """`campaign send x.yaml 2>&1 | tee send.log`, then Ctrl-C: the terminal signals the whole
    pipeline, tee dies at once, and our stderr is a broken pipe. Writing the stop warning there
    made rich raise SystemExit(1) out of the signal handler, through the event loop: the run
    was left `running` (not finished, no resume command), outcomes still queued for the journal
    were lost, and the exit code was 1. What cannot be shown is dropped; the stop goes on."""
    read_end, write_end = os.pipe()
    with signals_as_a_terminal_leaves_them():
        proc = subprocess.Popen(campaign_cmd(store_path, "send", str(paced), "--run-key", "tee"),
                                stdout=write_end, stderr=write_end)
    os.close(write_end)
    try:
        wait_for(lambda: sent_rows(store_path) >= 5, proc, "5 messages sent")
    finally:
        os.close(read_end)  # tee is gone
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=DEADLINE) == 130
    assert query(store_path, "SELECT status, exit_code, stopped FROM runs") == [
        ("interrupted", 130, "interrupted")]
    states = Counter(r["state"] for r in journal(store_path))
    assert set(states) <= {"sent", "pending"} and states["sent"] >= 5

    result = run(store_path, "send", str(paced), "--run-key", "tee", "--rate", "1000", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["counts"] == {"sent": 120}


def test_sigkill_inside_an_unthrottled_console_batch_prints_nobody_twice_and_reports_doubts(
    make_campaign: CampaignFactory, store_path: Path, tmp_path: Path
) -> None:
    """Unthrottled, the console provider takes batches: one write for many lines. Nobody reads
    the first process's stdout, so its pipe fills and it blocks inside a batch's write; it is
    killed there. The batch's rows were committed `sending` before the write, so the resume
    finds them in doubt, reports them, and (console cannot deduplicate; `in_doubt: skip`) does
    not print them again; everyone else is printed exactly once over the two runs."""
    total = 3000
    campaign = console_campaign(make_campaign, total, in_doubt="skip")
    proc = start(store_path, "send", str(campaign), "--run-key", "k")
    wchan = Path(f"/proc/{proc.pid}/wchan")
    wait_for(lambda: sent_rows(store_path) >= 1 and "pipe_write" in wchan.read_text(), proc,
             "blocked writing a batch to a full pipe")
    proc.send_signal(signal.SIGKILL)
    first, _ = proc.communicate()
    complete, _, partial = first.rpartition("\n")
    printed = Counter(json.loads(line)["recipient_key"] for line in complete.splitlines())
    killed = Counter(r["state"] for r in journal(store_path))
    assert killed["sending"] >= 1  # a batch was on its way

    with (tmp_path / "second.jsonl").open("w") as out:
        done = subprocess.run(campaign_cmd(store_path, "send", str(campaign), "--run-key", "k"),
                              stdout=out, stderr=subprocess.PIPE, text=True, timeout=DEADLINE)
    assert done.returncode == 0, done.stderr
    printed.update(json.loads(line)["recipient_key"]
                   for line in (tmp_path / "second.jsonl").read_text().splitlines())
    assert max(printed.values()) == 1  # nobody printed twice

    rows = journal(store_path)
    states = Counter(r["state"] for r in rows)
    assert len(rows) == total and set(states) == {"sent", "in_doubt"}
    assert states["in_doubt"] == killed["sending"]  # the batch cut off, and nothing else
    doubted = {r["rkey"] for r in rows if r["state"] == "in_doubt"}
    # Every row is either printed once and sent, or in doubt (printed or not: unknown).
    assert {r["rkey"] for r in rows if r["state"] == "sent"} == set(printed) - doubted
    if cut := re.search(r'"recipient_key": "(c\d+)"', partial):  # a line cut in half
        assert cut[1] in doubted
    status = json.loads(run(store_path, "status", "test-campaign/k", "--json").stdout)
    assert status["counts"] == {"sent": states["sent"], "in_doubt": states["in_doubt"]}


def test_a_stop_and_continue_while_console_output_is_blocked_loses_no_line(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    """Ctrl-Z then `fg` (or `docker pause`, or a debugger attaching) while `campaign send` is
    blocked writing console lines to a full pipe. Under PYTHONUNBUFFERED, Python's stdout wrote
    straight to the pipe and dropped whatever the interrupted write had not written: messages
    journaled `sent` that the reading program never got. Every line must arrive, once."""
    total = 3000
    campaign = console_campaign(make_campaign, total)
    proc = subprocess.Popen(campaign_cmd(store_path, "send", str(campaign)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wchan = Path(f"/proc/{proc.pid}/wchan")
    wait_for(lambda: "pipe_write" in wchan.read_text(), proc,
             "blocked writing console lines to a full pipe")
    proc.send_signal(signal.SIGSTOP)
    state = Path(f"/proc/{proc.pid}/stat")
    wait_for(lambda: state.read_text().rsplit(")", 1)[1].split()[0] == "T", proc, "stopped")
    proc.send_signal(signal.SIGCONT)
    out, err = proc.communicate(timeout=DEADLINE)
    assert proc.returncode == 0, err
    printed = Counter(json.loads(line)["recipient_key"] for line in out.splitlines())
    assert len(printed) == total and max(printed.values()) == 1
    assert Counter(r["state"] for r in journal(store_path)) == {"sent": total}


@pytest.mark.parametrize("unbuffered", ["1", ""])
def test_a_reader_that_goes_away_stops_the_run_with_a_documented_exit_code(
    make_campaign: CampaignFactory, store_path: Path, unbuffered: str
) -> None:
    """`campaign send ... | head -1`: the console's reader exits after one line. The batch whose
    write failed is in doubt, the rest stays pending, and the exit code is the run's (1), not
    Python's 120 from a failed last flush, with no "Exception ignored" noise on stderr."""
    total = 2000
    campaign = console_campaign(make_campaign, total)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if unbuffered:
        env["PYTHONUNBUFFERED"] = unbuffered
    proc = subprocess.Popen(campaign_cmd(store_path, "send", str(campaign)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.readline()
    proc.stdout.close()  # the reading program is gone
    err = proc.stderr.read().decode()
    proc.stderr.close()
    proc.wait(timeout=DEADLINE)
    assert json.loads(first)["recipient_key"] == "c1"
    assert proc.returncode == 1, err
    assert "Exception ignored" not in err and "Traceback" not in err
    assert "BrokenPipeError" in err  # the run's one-line error says what happened
    # What the run had read is journaled; the abort stops the reader, so the rows it had not
    # read yet are not (as after Ctrl-C): the resume reads them, and everyone ends sent.
    states = Counter(r["state"] for r in journal(store_path))
    assert sum(states.values()) <= total and states["in_doubt"] >= 1
    assert set(states) <= {"sent", "in_doubt", "pending"}
    resumed = subprocess.run(campaign_cmd(store_path, "send", str(campaign)),
                             capture_output=True, text=True, timeout=DEADLINE)
    assert resumed.returncode == 0, resumed.stderr
    assert Counter(r["state"] for r in journal(store_path)) == {"sent": total}


def test_a_closed_standard_output_gives_exit_1_and_one_line_not_python_s_120(
    store_path: Path,
) -> None:
    """Output that cannot be written (its reader is gone) is reported in one line with the
    documented code. Python's own last flush would otherwise print "Exception ignored" and
    make the exit code 120."""
    assert run(store_path, "suppress", "add", "+12012000001").returncode == 0
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run(campaign_cmd(store_path, "suppress", "list", "--json"),
                              stdout=write_end, stderr=subprocess.PIPE, text=True,
                              timeout=DEADLINE)
    finally:
        os.close(write_end)
    assert done.returncode == 1
    assert done.stderr.strip() == ("error: standard output was closed before everything was "
                                   "written (broken pipe): the program reading it exited")


@pytest.mark.parametrize("args", [["status"], ["suppress", "list"], ["suppress", "export", "-"],
                                  ["trace", "+12012000001"]])
def test_a_full_or_closed_standard_output_is_one_line_not_a_bug_for_every_command(
    store_path: Path, args: list[str]
) -> None:
    """`campaign suppress export - > /backup/optouts.csv` on a full disk (a nightly backup job),
    or `campaign status > report.txt`: the write failed with ENOSPC, reported as "internal
    error: OSError ... (a bug: please report it)"; with stdout closed, `export -` said "internal
    error: TypeError: argument 1 must have a "write" method". Exit 1 (output that cannot be
    written), and one line that says what happened."""
    assert run(store_path, "suppress", "add", "+12012000001").returncode == 0
    with open("/dev/full", "w") as full:  # every write: ENOSPC
        done = subprocess.run(campaign_cmd(store_path, *args), stdout=full,
                              stderr=subprocess.PIPE, text=True, timeout=DEADLINE)
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines() == [
        "error: standard output could not be written (No space left on device): what it was "
        "to carry is lost"]
    if args[-1] == "-":
        done = subprocess.run(["/bin/sh", "-c", 'exec "$@" >&-', "sh",
                               *campaign_cmd(store_path, *args)],
                              capture_output=True, text=True, timeout=DEADLINE)
        assert done.returncode == 1, done.stderr
        assert done.stderr.strip().splitlines() == [
            "error: standard output is closed: what it was to carry is lost"]


def test_a_summary_that_cannot_be_written_still_leaves_the_resume_command_and_the_error(
    paced: Path, store_path: Path
) -> None:
    """`campaign send x.yaml --json --max-spend 0.3 > summary.json` on a full disk, and the run
    stops at the cap: the summary's failed write ended the command there, before the resume
    command (with the --max-spend it needs) and the run's own error line reached stderr, the
    cron log that is all the operator has left. They are said, then the lost output (exit 1)."""
    with open("/dev/full", "w") as full:  # every write: ENOSPC
        done = subprocess.run(
            campaign_cmd(store_path, "send", str(paced), "--json", "--rate", "1000",
                         "--max-spend", "0.3"),
            stdout=full, stderr=subprocess.PIPE, text=True, timeout=DEADLINE)
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[0].startswith("stopped at the spend cap; the rest is pending. To resume with "
                               "a larger budget: campaign --store"), lines
    assert lines[-1].startswith("error: standard output could not be written"), lines
    assert len(lines) == 2, lines
    assert query(store_path, "SELECT status, exit_code FROM runs") == [("spend_cap", 3)]

    bad = paced.parent / "bad.yaml"
    bad.write_text("name: [\n")
    with open("/dev/full", "w") as full:
        done = subprocess.run(campaign_cmd(store_path, "send", str(bad), "--json"),
                              stdout=full, stderr=subprocess.PIPE, text=True, timeout=DEADLINE)
    lines = done.stderr.strip().splitlines()
    # Why it did not start (exit 2), and that its summary was lost.
    assert done.returncode == 2, lines
    assert [line.split(":")[0] for line in lines] == ["error", "error"], lines
    assert "bad.yaml:2: not valid YAML" in lines[-1]
    assert "standard output could not be written" in lines[0]


@pytest.mark.parametrize("command", ["send", "status"])
def test_a_full_disk_under_standard_output_gives_exit_1_and_one_line_not_python_s_120(
    paced: Path, store_path: Path, command: str
) -> None:
    """`campaign send x.yaml --json > /var/log/job/summary.json` on a full disk: the summary's
    write fails with ENOSPC. That was "internal error: OSError ... (a bug: please report it)",
    then Python's own last flush failed again: "Exception ignored in: <_io.TextIOWrapper
    name=1 ...>" and exit 120, a code the contract does not have. Now: exit 1 (output that
    cannot be written) and one line that says what happened; the run itself is journaled."""
    args = ["send", str(paced), "--json", "--rate", "1000"] if command == "send" else \
        ["status", "--json"]
    if command == "status":
        assert run(store_path, "send", str(paced), "--rate", "1000").returncode == 0
    with open("/dev/full", "w") as full:  # every write: ENOSPC
        done = subprocess.run(campaign_cmd(store_path, *args), stdout=full,
                              stderr=subprocess.PIPE, text=True, timeout=DEADLINE)
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: standard output could not be written"), lines
    assert "No space left on device" in lines[0] and "a bug" not in lines[0]
    assert query(store_path, "SELECT status, exit_code FROM runs") == [("done", 0)]


@pytest.mark.parametrize(
    ("args", "says"),
    [(["send", str(Path(__file__).parent.parent / "campaigns" / "demo.yaml"), "--limit", "-1"], "Invalid value for '--limit'"),
     (["suppress", "add", "+14155550100", "--region", "zz"], "'zz' is not a region code"),
     (["send"], "Missing argument"),
     (["sendd"], "No such command 'sendd'")],
)
def test_a_command_line_mistake_is_one_line_and_exit_2(
    store_path: Path, args: list[str], says: str
) -> None:
    # click's usage block was four lines, the error last ("Usage: ... Try ... Error: ...").
    done = run(store_path, *args)
    assert done.returncode == 2
    assert done.stderr.startswith("error: ") and says in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "--help" in done.stderr


def test_no_command_at_all_still_shows_the_help(store_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "campaign_cli"], capture_output=True, text=True,
                          timeout=DEADLINE)
    assert done.returncode == 2 and "COMMAND [ARGS]" in done.stdout + done.stderr


def _signal_state(pid: int) -> str:
    """The signals a process blocks, ignores and has pending (Linux), for a failure message."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return ""
    return " ".join(line for line in lines if line.startswith(("SigBlk", "SigIgn", "SigPnd",
                                                               "ShdPnd", "State")))


@pytest.mark.parametrize(("key", "expected", "as_json"), [
    ("SIGINT", 130, False), (b"\x04", 2, False), (b"n\r", 2, True), ("SIGINT", 130, True)])
def test_ctrl_c_or_ctrl_d_at_the_confirmation_prompt_is_not_an_internal_error(
    make_campaign: CampaignFactory, store_path: Path, key: str | bytes, expected: int,
    as_json: bool,
) -> None:
    """`send` through a real provider asks first. Ctrl-C there exited 1 ("internal error: a bug")
    with "error: aborted"; it is an interruption by a signal (130). Ctrl-D, no answer, is the
    answer no (2, as typing n). Either way nothing is sent. With `--json`, a run that does not
    start still prints its one `not_started` object (README): the answer n or a Ctrl-C exited
    with nothing on stdout, so a script reading the summary had nothing to parse.

    The prompt reads a pseudo-terminal. The child is started by subprocess (fork and exec in C):
    `pty.fork()` runs Python in a child forked from this multi-threaded test process, which can
    deadlock before exec (seen under load). Ctrl-C is therefore the SIGINT the terminal would
    send; Ctrl-D is the byte itself, which the terminal turns into end of input."""
    import pty
    import select

    campaign = make_campaign(people(2), providers={"hook": {
        "type": "webhook", "url": "http://127.0.0.1:9/never-contacted"}},
        channels={"webhook": {"provider": "hook", "body": "Hi {{ first_name }}"}})
    master, slave = pty.openpty()
    with signals_as_a_terminal_leaves_them():
        proc = subprocess.Popen(
            campaign_cmd(store_path, "send", str(campaign), *(["--json"] if as_json else [])),
            stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    seen = b""
    deadline = time.monotonic() + DEADLINE
    try:
        while b"[y/N]" not in seen:
            assert time.monotonic() < deadline, f"no prompt: {seen!r}"
            assert proc.poll() is None, f"exited before the prompt: {seen!r}"
            if select.select([master], [], [], 0.1)[0]:
                seen += os.read(master, 1024)
        if key == "SIGINT":
            # CPython's input() can miss a SIGINT that lands between the prompt's last write
            # and its wait for a key (the handler has run; the wait has not begun): a person's
            # Ctrl-C a moment later is not lost. So, as a person would, press it again if the
            # first one found the prompt not yet waiting: the wait is on the exit, not on time.
            # The terminal is read all the while, as a real one is: a child writing more than
            # the pty holds (a warning, a traceback) would otherwise block and never exit.
            proc.send_signal(signal.SIGINT)
            pressed = first = time.monotonic()
            while proc.poll() is None:
                assert time.monotonic() < first + 20, (
                    f"still running: {seen!r} {_signal_state(proc.pid)}")
                if select.select([master], [], [], 0.1)[0]:
                    try:
                        seen += os.read(master, 1024)
                    except OSError:
                        pass
                if time.monotonic() - pressed >= 1:
                    proc.send_signal(signal.SIGINT)
                    pressed = time.monotonic()
            code = proc.returncode
        else:
            assert isinstance(key, bytes)
            os.write(master, key)
            code = proc.wait(timeout=DEADLINE)
        while select.select([master], [], [], 0.1)[0]:
            try:
                chunk = os.read(master, 1024)
            except OSError:  # the other side is closed: all read
                break
            if not chunk:
                break
            seen += chunk
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    assert code == expected, seen
    said = b"error: not confirmed" if key == b"n\r" else b"error: aborted"
    assert b"Traceback" not in seen and said in seen
    if as_json:
        # (after a Ctrl-C it follows the prompt on the same line)
        [summary] = [json.loads(found) for found in re.findall(rb'\{"run".*', seen)]
        assert summary["status"] == "not_started" and summary["exit_code"] == expected
        assert summary["campaign_file"] == str(campaign)
    assert not store_path.exists() or journal(store_path) == []


@pytest.mark.parametrize("unused", [{"type": "slack", "url": "http://127.0.0.1:9/never"},
                                    {"type": "twilio", "account_sid": "AC" + "0" * 32, "auth_token": "t",
                                     "from": "+14155550100"}])
def test_the_confirmation_asks_only_about_providers_that_channels_send_through(
    make_campaign: CampaignFactory, store_path: Path, tmp_path: Path, unused: dict[str, str]
) -> None:
    """A provider defined but named by no channel sends nothing. The question was asked of every
    real provider *defined*: a campaign sending only to the outbox stopped to ask "real messages,
    real money?" on a terminal (and a person answering n sent nothing), and one sending through
    a webhook named the unused provider too. Here the terminal has "n" typed ahead: asked, the
    run would read it and send nothing."""
    import pty

    outbox_only = make_campaign(people(2), providers={
        "box": {"type": "outbox", "dir": "outbox", "price_per_segment": "0.01"},
        "spare": unused})
    master, slave = pty.openpty()
    try:
        os.write(master, b"n\r")
        proc = subprocess.run(campaign_cmd(store_path, "send", str(outbox_only), "--json"),
                              stdin=slave, capture_output=True, timeout=DEADLINE, check=False)
    finally:
        os.close(slave)
        os.close(master)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["counts"] == {"sent": 2}
    assert b"real money" not in proc.stderr

    campaign = make_campaign(people(2), providers={
        "hook": {"type": "webhook", "url": "http://127.0.0.1:9/never-contacted"},
        "spare": unused}, channels={"webhook": {"provider": "hook", "body": "Hi"}})
    master, slave = pty.openpty()
    try:
        os.write(master, b"n\r")
        proc = subprocess.run(campaign_cmd(store_path, "send", str(campaign)),
                              stdin=slave, capture_output=True, timeout=DEADLINE, check=False)
    finally:
        os.close(slave)
        os.close(master)
    assert proc.returncode == 2, proc.stderr
    assert b"through webhook (real messages" in proc.stderr
    assert unused["type"].encode() not in proc.stderr


def test_a_real_provider_with_standard_input_closed_sends_without_asking(
    make_campaign: CampaignFactory, store_path: Path, fake_server: FakeProviderServer
) -> None:
    """A job started with standard input closed (`<&-`, a supervisor that closes it): Python
    has no sys.stdin, and the confirmation's terminal check (`sys.stdin.isatty()`) raised
    AttributeError: "internal error ... (a bug)", exit 1, and no `--json` summary. No terminal,
    so no question: the run goes on as off any other terminal."""
    campaign = make_campaign(people(3), providers={"hook": fake_server.provider_config("webhook")},
                             channels={"webhook": {"provider": "hook", "body": "Hi"}})
    done = subprocess.run(["/bin/sh", "-c", 'exec "$@" <&-', "sh",
                           *campaign_cmd(store_path, "send", str(campaign), "--json")],
                          capture_output=True, text=True, timeout=DEADLINE)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["counts"] == {"sent": 3}
    assert len(fake_server.accepted("webhook")) == 3


def test_json_output_on_a_standard_output_that_is_not_utf8(
    make_campaign: CampaignFactory, tmp_path: Path
) -> None:
    """`--json` where standard output is ASCII (PYTHONIOENCODING=ascii, a C locale on an old
    system, a Windows console): a summary holding a character outside it (here the error names a
    folder "campañas") made the last write raise UnicodeEncodeError, so the run's exit 6 became
    an "internal error" exit 1 and the summary was lost. It is printed as ASCII JSON instead."""
    folder = tmp_path / "campañas"
    folder.mkdir()
    campaign = make_campaign(people(5), providers={"box": {
        "type": "outbox", "dir": str(folder / "outbox"), "price_per_segment": "0.01"}})
    (folder / "outbox").mkdir()
    (folder / "outbox" / "test-campaign_k").write_text("a file where the run's folder should be")
    store = tmp_path / "store.db"
    done = subprocess.run(campaign_cmd(store, "send", str(campaign), "--json", "--run-key", "k"),
                          capture_output=True, timeout=DEADLINE,
                          env={**os.environ, "PYTHONIOENCODING": "ascii"})
    err = done.stderr.decode("ascii", "replace")
    assert done.returncode == 6, err
    summary = json.loads(done.stdout.decode("ascii"))
    assert summary["exit_code"] == 6 and "campañas" in summary["error"]
    assert "Traceback" not in err
    status = run(store, "status", "test-campaign/" + summary["run_key"], "--json")
    assert json.loads(status.stdout)["exit_code"] == 6


@pytest.mark.parametrize("mistake", [["--bogus"], ["--limit", "ten"], ["--", "extra"]])
def test_a_command_line_click_refuses_still_prints_the_json_summary(
    store_path: Path, make_campaign: CampaignFactory, mistake: list[str]
) -> None:
    """`campaign send ... --json | jq .exit_code` with a mistyped option: the one error line on
    stderr, exit 2, and the not-started summary on stdout, as for every other input error (click
    refuses these before `send` runs). Through the real entry point: CliRunner skips it."""
    campaign = console_campaign(make_campaign, 2)
    result = run(store_path, "send", str(campaign), "--json", "--run-key", "k", *mistake)
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line.startswith("error: ") and line.endswith(" send --help)")
    summary = json.loads(result.stdout)
    assert (summary["exit_code"], summary["status"], summary["counts"]) == (2, "not_started", {})
    assert summary["error"] == line.removeprefix("error: ")
    sent = run(store_path, "send", str(campaign), "--json", "--run-key", "k").stdout
    assert set(summary) == {*json.loads(sent.splitlines()[-1]), "campaign_file"}  # (console first)
    # without --json: stdout stays empty
    assert run(store_path, "send", str(campaign), "--run-key", "k2", *mistake).stdout == ""


@pytest.mark.parametrize("mistake", [["--bogus"], ["--limit", "ten"], ["--", "extra"]])
def test_validate_json_prints_its_summary_for_a_command_line_click_refuses_too(
    store_path: Path, make_campaign: CampaignFactory, mistake: list[str]
) -> None:
    """`campaign validate x.yaml --json` is `send --dry-run --json` under its preflight name: a
    mistyped option gave `send` its not-started summary on stdout but left `validate`'s empty,
    so a CI step's `jq .exit_code` failed on no input instead of reading 2."""
    campaign = console_campaign(make_campaign, 2)
    result = run(store_path, "validate", str(campaign), "--json", *mistake)
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line.startswith("error: ") and line.endswith(" validate --help)")
    summary = json.loads(result.stdout)
    assert (summary["exit_code"], summary["status"], summary["dry_run"], summary["error"]) == (
        2, "not_started", True, line.removeprefix("error: "))
    dry = json.loads(run(store_path, "send", str(campaign), "--dry-run", "--json",
                         *mistake).stdout)
    assert set(summary) == set(dry)
    # The dry run asked for is said, though click stopped before it read `--dry-run`.
    assert dry["dry_run"] is True
    assert run(store_path, "validate", str(campaign), *mistake).stdout == ""


@pytest.mark.parametrize("words", [["--run-key", "--json", "--limit", "ten"],
                                   ["-r", "--json", "--bogus"],
                                   ["--max-spend", "--json", "--rate", "x"]])
def test_json_as_the_value_of_another_option_is_not_a_request_for_json(
    store_path: Path, make_campaign: CampaignFactory, words: list[str]
) -> None:
    """`--run-key --json` names the run "--json": it does not ask for the JSON summary, so a
    command line click refuses prints its one error line and nothing on stdout (a script that
    did not ask for JSON must not find it there)."""
    campaign = console_campaign(make_campaign, 2)
    result = run(store_path, "send", str(campaign), *words)
    assert result.returncode == 2
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith("error: ")


@pytest.mark.parametrize("mistake", [[], ["--limit", "ten"]])
def test_a_closed_standard_error_never_puts_messages_on_standard_output(
    store_path: Path, make_campaign: CampaignFactory, mistake: list[str]
) -> None:
    """`campaign send ... --json 2>&-` (a supervisor that closes stderr): Python then has no
    sys.stderr, and rich's console and print(file=None) fell back to standard output, so the
    resume command and error lines came after the console lines and the summary, and the summary
    was no longer the last line a script reads. What stderr would have carried is dropped."""
    campaign = console_campaign(make_campaign, 5)
    cmd = campaign_cmd(store_path, "send", str(campaign), "--json", "--max-spend", "0.02",
                       *mistake)
    done = subprocess.run(["/bin/sh", "-c", 'exec "$@" 2>&-', "sh", *cmd],
                          capture_output=True, text=True, timeout=DEADLINE)
    lines = done.stdout.splitlines()
    summary = json.loads(lines[-1])
    assert done.returncode == summary["exit_code"] == (3 if not mistake else 2), done.stdout
    assert all(json.loads(line)["recipient_key"] for line in lines[:-1]), done.stdout
    assert done.stderr == ""


def test_console_lines_on_the_same_terminal_as_the_progress_display_stay_whole(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    """`campaign send console.yaml` in a terminal: stdout (the console provider's lines) and
    stderr (the live progress display) are the same screen. The display redraws its line in
    place and the console line written after it was glued onto it: the screen showed
    `demo ━━━ 20/40 sent 20 ... 0:00:01{"channel": "sms", ...}`. There, progress is the plain
    line (whole lines) instead."""
    import pty
    import select

    campaign = make_campaign(
        people(40),
        providers={"con": {"type": "console", "rate": "20/s", "burst": 1,
                           "price_per_segment": "0.01"}},
        channels={"sms": {"provider": "con", "body": "Hi {{ first_name }}"}},
    )
    master, slave = pty.openpty()
    proc = subprocess.Popen(campaign_cmd(store_path, "send", str(campaign)),
                            stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    seen = b""
    try:
        while True:
            try:
                ready = select.select([master], [], [], 1)[0]
                chunk = os.read(master, 65536) if ready else b""
            except OSError:  # the other side is closed: all read
                break
            if ready and not chunk:
                break
            seen += chunk
            assert proc.poll() is None or ready, f"exited {proc.returncode}"
        assert proc.wait(timeout=DEADLINE) == 0, seen
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", seen.decode())
    screen = [line.rstrip("\r").rsplit("\r", 1)[-1] for line in plain.split("\n")]
    messages = [line for line in screen if '"channel"' in line]
    assert len(messages) == 40, plain
    for line in messages:
        assert json.loads(line)["channel"] == "sms", line


@pytest.mark.parametrize("args", [["suppress", "add", "+12012000001"], ["status"]])
def test_a_command_that_succeeds_with_standard_output_closed_exits_0_without_a_traceback(
    store_path: Path, args: list[str]
) -> None:
    """`campaign suppress add ... >&-` (a supervisor that closes stdout): Python then has no
    sys.stdout, and the last flush before exiting raised AttributeError on None: a traceback
    and exit 1 for an opt-out that was recorded."""
    done = subprocess.run(["/bin/sh", "-c", 'exec "$@" >&-', "sh",
                           *campaign_cmd(store_path, *args)],
                          capture_output=True, text=True, timeout=DEADLINE)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("args", [["send", "--json"], ["status", "--json"]])
def test_json_with_standard_output_closed_is_one_line_saying_so_not_an_internal_error(
    paced: Path, store_path: Path, args: list[str]
) -> None:
    """`campaign send x.yaml --json >&-` (a unit file or a wrapper that closes stdout): Python
    has no sys.stdout, and printing the summary into None was reported as "internal error:
    AttributeError: 'NoneType' object has no attribute 'write' (a bug: please report it)".
    The run is done and journaled; the one line says the summary had nowhere to go (exit 1,
    output that cannot be written)."""
    if args[0] == "send":
        args = ["send", str(paced), "--rate", "1000", "--json"]
    else:
        assert run(store_path, "send", str(paced), "--rate", "1000").returncode == 0
    done = subprocess.run(["/bin/sh", "-c", 'exec "$@" >&-', "sh",
                           *campaign_cmd(store_path, *args)],
                          capture_output=True, text=True, timeout=DEADLINE)
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines() == [
        "error: standard output is closed: what it was to carry is lost"]
    assert query(store_path, "SELECT status, exit_code FROM runs") == [("done", 0)]


def test_a_console_campaign_with_standard_output_closed_is_refused_before_anything_is_sent(
    store_path: Path, make_campaign: CampaignFactory
) -> None:
    """`campaign send console.yaml >&-`: the console provider's messages have nowhere to go. It
    "sent" them into None: each raised AttributeError, the rows ended in doubt though nothing was
    written, and the run exited 1 as a provider failure. Now: one line, exit 2, no run."""
    campaign = console_campaign(make_campaign, 3)
    done = subprocess.run(["/bin/sh", "-c", 'exec "$@" >&-', "sh",
                           *campaign_cmd(store_path, "send", str(campaign))],
                          capture_output=True, text=True, timeout=DEADLINE)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "error: provider con: standard output is closed, and the console provider writes its "
        "messages there"]
    assert query(store_path, "SELECT count(*) FROM runs") == [(0,)]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_signal_stops_a_preview_and_leaves_no_copy_of_the_store(
    make_campaign: CampaignFactory, store_path: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, signum: signal.Signals,
) -> None:
    """`campaign preview --row N` dry-runs rows 1..N on a private copy of the store, in the
    temporary folder. It had no signal handling: SIGTERM (a supervisor, `timeout`) or SIGHUP
    (the terminal went away) killed it and left the copy, every address and opt-out in the store,
    behind; Ctrl-C cancelled the run mid-step, which now and then crashed the interpreter (a
    policy thread reading a connection being closed). Each stops it as it stops `send`: exit 130,
    one line, nothing printed as a preview, the copy removed, the real store untouched."""
    campaign = console_campaign(make_campaign, 60_000)
    assert run(store_path, "suppress", "add", phone(3)).returncode == 0
    before = store_path.read_bytes()
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))
    proc = start(store_path, "preview", str(campaign), "--row", "60000")

    def dry_run_going() -> bool:  # rows decided in the dry run's copy of the store
        return any(sent_rows(copy) >= 5 for copy in temp.glob("campaign-preview-*/preview.db"))

    wait_for(dry_run_going, proc, "the dry run under way")
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=DEADLINE)
    assert proc.returncode == 130, err
    assert out == "" and err == "error: interrupted: nothing was previewed (nor sent or changed)\n"
    assert list(temp.iterdir()) == []
    assert store_path.read_bytes() == before
