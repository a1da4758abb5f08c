"""`campaign send` and `campaign status` through Typer's CliRunner: options, output, exit codes."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import socket
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from campaign_cli.cli.main import get_app
from campaign_cli.pipeline import RunReport
from campaign_cli.store import runs
from campaign_cli.store.db import MIGRATIONS
from tests.conftest import CampaignFactory, people, phone, query

ROOT = Path(__file__).resolve().parent.parent
SUMMARY_KEYS = {"run", "campaign", "counts", "by_channel", "spend", "currency", "duration_s",
                "rate_per_s", "exit_code"}


def invoke(store: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(get_app(), ["--store", str(store), *args], env=env)
    return result.exit_code, result.stdout, result.stderr


def test_demo_campaign_runs_and_resumes_without_resending(store_path: Path, tmp_path: Path) -> None:
    code, out, err = invoke(store_path, "send", str(ROOT / "campaigns" / "demo.yaml"),
                            "--dry-run", "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert SUMMARY_KEYS <= set(summary)
    assert summary["dry_run"] is True
    for channel, states in summary["by_channel"].items():
        assert sum(states.values()) == summary["total_rows"], channel
    assert {"invalid", "duplicate", "suppressed", "no_consent", "sent"} <= set(summary["counts"])


def test_send_json_summary_and_status_share_one_shape(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    campaign = make_campaign(people(5))
    code, out, err = invoke(store_path, "send", str(campaign), "--json", "--run-key", "r1")
    assert code == 0, err
    sent = json.loads(out)
    assert sent["counts"] == {"sent": 5} and sent["spend"] == "0.05"
    assert sent["run"] == "test-campaign/r1"

    code, out, _ = invoke(store_path, "status", "test-campaign/r1", "--json")
    assert code == 0
    status = json.loads(out)
    assert SUMMARY_KEYS <= set(status)
    assert {k: status[k] for k in ("run", "counts", "by_channel", "spend", "exit_code")} == {
        k: sent[k] for k in ("run", "counts", "by_channel", "spend", "exit_code")
    }
    code, out, _ = invoke(store_path, "status", "--json")
    assert [r["run"] for r in json.loads(out)] == ["test-campaign/r1"]
    code, out, _ = invoke(store_path, "status")
    assert "test-campaign/r1" in out and "done" in out


def test_a_status_limit_past_what_sqlite_counts_means_every_run(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    """`status --limit 99999999999999999999` was an internal error (exit 1: OverflowError binding
    SQLite's 64-bit LIMIT); it lists every run."""
    campaign = make_campaign(people(2))
    assert invoke(store_path, "send", str(campaign), "--run-key", "r1")[0] == 0
    for huge in ("9223372036854775807", "99999999999999999999"):
        code, out, err = invoke(store_path, "status", "--json", "--limit", huge)
        assert code == 0, err
        assert [r["run"] for r in json.loads(out)] == ["test-campaign/r1"]


def test_a_send_to_a_store_other_users_can_read_is_warned_of(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    """As the store's commands do (`suppress list`), a send says when the store it records in
    can be read by other users; it still sends."""
    campaign = make_campaign(people(2))
    assert invoke(store_path, "send", str(campaign), "--run-key", "r1")[0] == 0
    store_path.chmod(0o640)
    code, out, err = invoke(store_path, "send", str(campaign), "--run-key", "r2", "--json")
    assert code == 0 and json.loads(out)["counts"] == {"sent": 2}
    assert f"warning: {store_path} can be read by other users (mode 0640)" in err


#: Keys `status --json` computes its own way: the session's time from its timestamps (send uses a
#: monotonic clock), and so its rate.
TIMED_KEYS = {"duration_s", "rate_per_s"}


def same_as_status(store: Path, summary: dict[str, object]) -> None:
    """`status RUN --json` says what `send --json` said about the session, key for key."""
    code, out, err = invoke(store, "status", str(summary["run"]), "--json")
    assert code == 0, err
    status = json.loads(out)
    assert {k: status[k] for k in summary if k not in TIMED_KEYS} == {
        k: v for k, v in summary.items() if k not in TIMED_KEYS
    }
    listed = json.loads(invoke(store, "status", "--json")[1])
    assert {k: listed[0][k] for k in summary if k not in TIMED_KEYS} == {
        k: v for k, v in summary.items() if k not in TIMED_KEYS
    }


def test_status_json_means_what_send_json_meant_for_a_stopped_session_and_its_resume(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    """`stopped`, `in_doubt_found` and `in_doubt_resent` are the session's, in both commands: a
    script reading `status --json` after a cron job's `send` learns why it stopped (here the
    spend cap), not a blank; and after the resume, that it finished."""
    campaign = make_campaign(people(5))
    code, out, err = invoke(store_path, "send", str(campaign), "--json", "--run-key", "r1",
                            "--max-spend", "0.03")
    assert code == 3, err
    capped = json.loads(out)
    assert capped["stopped"] == "spend_cap" and capped["counts"] == {"pending": 2, "sent": 3}
    same_as_status(store_path, capped)

    code, out, err = invoke(store_path, "send", str(campaign), "--json", "--run-key", "r1",
                            "--max-spend", "1")
    assert code == 0, err
    resumed = json.loads(out)
    assert resumed["stopped"] is None and resumed["resumed"] is True
    same_as_status(store_path, resumed)


def test_the_status_list_does_not_count_in_doubt_rows_as_failed_too(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    campaign = make_campaign(people(3))
    assert invoke(store_path, "send", str(campaign), "--run-key", "r1")[0] == 0
    with contextlib.closing(sqlite3.connect(store_path)) as conn, conn:  # as a killed session and a dead letter leave them
        conn.execute("UPDATE messages SET state = 'in_doubt' WHERE row = 1")
        conn.execute("UPDATE messages SET state = 'failed' WHERE row = 2")
        # (counted from the journal, as for a run finished before its end recorded them)
        conn.execute("UPDATE runs SET summary = NULL")
    code, out, _ = invoke(store_path, "status")
    assert code == 0
    header = next(line for line in out.splitlines() if "in doubt" in line)
    row = next(line for line in out.splitlines() if "test-campaign/r1" in line)
    cells = dict(zip([c.strip() for c in header.split("┃")], [c.strip() for c in row.split("│")],
                     strict=True))
    assert (cells["sent"], cells["failed"], cells["in doubt"]) == ("1", "1", "1"), cells

    # Killed mid-send: the row it was sending is in doubt (so the columns add up to the rows).
    with contextlib.closing(sqlite3.connect(store_path)) as conn, conn:
        conn.execute("UPDATE messages SET state = 'sending' WHERE row = 3")
        conn.execute("UPDATE runs SET status = 'running'")
    out = invoke(store_path, "status")[1]
    row = next(line for line in out.splitlines() if "test-campaign/r1" in line)
    cells = dict(zip([c.strip() for c in header.split("┃")], [c.strip() for c in row.split("│")],
                     strict=True))
    assert (cells["status"], cells["sent"], cells["failed"], cells["in doubt"]) == (
        "running (stopped: no process)", "0", "1", "2"), cells


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        ("name: x\npurpose: sometimes\n", r"campaign\.yaml:2: purpose: "),
        ("name: x\npurpose: marketing\nrecipents: {}\n", r"campaign\.yaml:3: recipents: unknown key"),
        ("name: x\n  bad: [\n", r"campaign\.yaml:\d+: "),
    ],
)
def test_a_bad_campaign_file_is_one_line_exit_2(
    tmp_path: Path, store_path: Path, yaml_text: str, expected: str
) -> None:
    path = tmp_path / "campaign.yaml"
    path.write_text(yaml_text)
    code, out, err = invoke(store_path, "send", str(path))
    assert code == 2
    assert re.search(expected, err), err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_a_bad_recipient_file_is_one_line_exit_2_naming_file_and_line(
    make_campaign: CampaignFactory, store_path: Path, tmp_path: Path
) -> None:
    campaign = make_campaign(people(3))
    (tmp_path / "recipients.csv").write_bytes(b"id,first_name,phone,email\nc1,Ann,+12012000001,"
                                              b"a@example.com\nc2,\xff\xfe,+12012000002,b@x.com\n")
    code, _, err = invoke(store_path, "send", str(campaign))
    assert code == 2
    assert re.search(r"recipients\.csv:3: .*(UTF-8|utf-8|decode)", err), err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("line", [100, 1234])
def test_an_error_on_line_100_keeps_its_line_number(
    make_campaign: CampaignFactory, store_path: Path, tmp_path: Path, line: int
) -> None:
    # rich reads ":100:" and ":1234:" as emoji codes: "recipients.csv:100: ..." was printed as
    # "recipients.csv💯 ...", losing the line the contract promises.
    campaign = make_campaign(people(3))
    rows = b"".join(b"c%d,Ann,%s,a@example.com\n" % (i, phone_bytes(i)) for i in range(line - 2))
    (tmp_path / "recipients.csv").write_bytes(b"id,first_name,phone,email\n" + rows
                                              + b"cx,\xff,+12012000001,b@x.com\n")
    code, _, err = invoke(store_path, "send", str(campaign))
    assert code == 2
    assert f"recipients.csv:{line}: not valid UTF-8" in err, err


def phone_bytes(i: int) -> bytes:
    return people(1, start=i + 1)[0][2].encode()


def test_missing_secret_names_the_variable(make_campaign: CampaignFactory, store_path: Path) -> None:
    campaign = make_campaign(people(1), extra={"vars": {"token": "${NOT_SET_ANYWHERE}"}})
    code, _, err = invoke(store_path, "send", str(campaign), env={})
    assert code == 2
    assert "NOT_SET_ANYWHERE" in err


def test_secret_values_are_redacted_from_output(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    secret = "hunter2-very-secret"
    campaign = make_campaign(
        people(2),
        providers={"box": {"type": "outbox", "dir": "outbox", "rate": "${API_TOKEN}"}},
    )
    code, out, err = invoke(store_path, "send", str(campaign), env={"API_TOKEN": secret})
    assert code == 2
    assert "providers.box.rate" in err
    assert secret not in out + err


@pytest.mark.parametrize(("limits", "code", "says"), [
    ({"concurrency": 2}, 0, "status done; exit 0"),
    ({"concurrency": 2, "max_spend": "0.03"}, 3, "To resume with a larger budget"),
])
def test_a_signal_while_the_outcome_is_printed_does_not_cut_it_off(
    make_campaign: CampaignFactory, store_path: Path, monkeypatch: pytest.MonkeyPatch,
    limits: dict[str, object], code: int, says: str,
) -> None:
    """The run is over and journaled when its summary and resume command are printed; the stop
    handlers were already gone. A Ctrl-C then (the second of two, a moment late) or a
    supervisor's SIGTERM cut the output short: no resume command, and exit 130 (or death by
    SIGTERM) for a run the store records as done (0) or stopped at its cap (3)."""
    import os
    import signal

    from campaign_cli.cli import send as send_cli

    summary = send_cli._print_summary

    def signalled(*args: object) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        summary(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(send_cli, "_print_summary", signalled)
    before = signal.getsignal(signal.SIGINT)
    campaign = make_campaign(people(10), limits=limits)
    got, _, err = invoke(store_path, "send", str(campaign), "--run-key", "sig")
    assert (got, says in err) == (code, True), err
    assert signal.getsignal(signal.SIGINT) is before  # restored for whoever runs next


def test_spend_cap_exit_3_prints_how_to_resume(make_campaign: CampaignFactory, store_path: Path) -> None:
    campaign = make_campaign(people(10), limits={"concurrency": 2, "max_spend": "0.03"})
    code, out, err = invoke(store_path, "send", str(campaign), "--run-key", "cap")
    assert code == 3, err
    assert "--max-spend" in err and "--run-key cap" in err
    code, out, err = invoke(store_path, "send", str(campaign), "--run-key", "cap",
                            "--max-spend", "1", "--json")
    assert code == 0, err
    assert json.loads(out)["counts"] == {"sent": 10}


def test_bad_max_spend_is_a_usage_error(make_campaign: CampaignFactory, store_path: Path) -> None:
    code, _, err = invoke(store_path, "send", str(make_campaign(people(1))), "--max-spend", "lots")
    assert code == 2 and "--max-spend" in err


@pytest.mark.parametrize("rate", ["inf", "Infinity", "1e999"])
def test_infinite_rate_option_is_a_usage_error(
    make_campaign: CampaignFactory, store_path: Path, rate: str
) -> None:
    # An infinite --rate passed `min=0.001` and crashed the pacer: "internal error:
    # OverflowError: cannot convert float infinity to integer", exit 1.
    code, _, err = invoke(store_path, "send", str(make_campaign(people(1))), "--rate", rate)
    assert code == 2, err
    assert err.startswith("error: --rate") and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("amount", "says"),
    [("1e999999999", "too large"), ("99999999999999999999999", "too large"),
     ("0.0000001", "decimal places"), ("5.1234567", "decimal places")],
)
def test_max_spend_out_of_range_is_a_usage_error(
    make_campaign: CampaignFactory, store_path: Path, amount: str, says: str
) -> None:
    # A huge cap crashed with "internal error: Overflow" or "Python int too large to convert to
    # SQLite INTEGER" (exit 1); a seventh decimal was silently rounded (0.0000001 became a cap
    # of 0: the run stopped at once with exit 3). limits.max_spend refuses both already.
    code, _, err = invoke(store_path, "send", str(make_campaign(people(1))), "--max-spend", amount,
                          "--dry-run")
    assert code == 2, err
    assert err.startswith("error: --max-spend") and says in err
    assert len(err.strip().splitlines()) == 1


def test_status_of_an_unknown_run_is_exit_2(store_path: Path, make_campaign: CampaignFactory) -> None:
    invoke(store_path, "send", str(make_campaign(people(1))))
    code, _, err = invoke(store_path, "status", "nope")
    assert code == 2 and "no run 'nope'" in err


def test_every_command_has_help_and_the_readme_shows_it() -> None:
    readme = (ROOT / "README.md").read_text()
    app = get_app()
    runner = CliRunner()
    commands = [["send"], ["status"]] + [
        [group, sub] for group in ("suppress", "consent")
        for sub in {"suppress": ["add", "remove", "list", "check", "import", "export",
                                 "erase"],
                    "consent": ["grant", "revoke", "import", "list"]}[group]
    ]
    for command in commands:
        result = runner.invoke(app, [*command, "--help"])
        assert result.exit_code == 0, command
        assert "Usage:" in result.stdout
        assert f"campaign {' '.join(command)}" in readme, command
    for code in (0, 1, 2, 3, 4, 5, 6, 130):
        assert f"| {code} |" in readme
    top = readme.split("## ")[0]
    assert top.count("python3 -m venv .venv") == 2  # exactly two set-up commands
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pytest" in ci and "pip install" in ci


def test_status_shows_failures_by_provider_and_reason_and_attempts(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    from campaign_cli.config import load_campaign
    from campaign_cli.errors import PermanentError
    from campaign_cli.pipeline import SendOptions, run_campaign
    from campaign_cli.testing import FakeClock, FakeProvider, fake_registry

    campaign = make_campaign(people(4))
    provider = FakeProvider(handler=lambda m: PermanentError("landline", code="21614")
                            if m.row % 2 else None)
    run_campaign(load_campaign(campaign, {}), store_path, SendOptions(run_key="s"),
                 clock=FakeClock(), registry=fake_registry(provider))
    code, out, _ = invoke(store_path, "status", "test-campaign/s", "--json")
    assert code == 0
    status = json.loads(out)
    assert status["failures"] == [{"provider": "box", "state": "failed", "reason": "21614",
                                   "count": 2}]
    assert {(a["provider"], a["outcome"], a["attempts"]) for a in status["attempts"]} == {
        ("box", "sent", 2), ("box", "permanent", 2)}
    code, out, _ = invoke(store_path, "status", "test-campaign/s")
    assert "attempts by provider" in out and "21614" in out


def test_max_spend_finer_than_a_micro_unit_or_too_large_is_a_usage_error(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    # Spend is kept in micro-units: 0.0000005 would round up to a cap of 0.000001, which a
    # message at that price would spend past the cap given. Like limits.max_spend: at most six
    # decimal places and 18 digits.
    campaign = make_campaign(
        people(1), providers={"box": {"type": "outbox", "dir": "outbox",
                                      "price_per_segment": "0.000001"}})
    for amount in ("0.0000005", "1e20"):
        code, _, err = invoke(store_path, "send", str(campaign), "--max-spend", amount)
        assert code == 2, err
        assert "--max-spend" in err and "Traceback" not in err
    assert not store_path.exists() or query(store_path, "SELECT count(*) FROM messages") == [(0,)]
    code, _, err = invoke(store_path, "send", str(campaign), "--max-spend", "0.000001")
    assert code == 0, err


@pytest.mark.parametrize("key", ["", "../x", "a b"])
def test_an_empty_or_malformed_run_key_is_refused_not_replaced(
    make_campaign: CampaignFactory, store_path: Path, key: str
) -> None:
    # `--run-key "$RUN_KEY"` with the variable unset used to fall back silently to the derived
    # key: a cron job meant to resume a named run would start another one.
    code, _, err = invoke(store_path, "send", str(make_campaign(people(1))), "--run-key", key)
    assert code == 2, err
    assert err.startswith("error: --run-key") and len(err.strip().splitlines()) == 1
    assert not store_path.exists() or query(store_path, "SELECT count(*) FROM messages") == [(0,)]


def test_the_resume_command_after_the_cap_keeps_limit_and_rate(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    """`send --limit 10` stopped at the cap: the printed resume command, run as printed (with a
    larger budget in place of its placeholder), finishes those 10 and no one else. It used to
    leave out --limit (and --rate), so the resume sent to the whole file: money spent on people
    the operator had not chosen."""
    campaign = make_campaign(people(20), limits={"concurrency": 1, "max_spend": "0.05"})
    code, _, err = invoke(store_path, "send", str(campaign), "--limit", "10", "--rate", "500")
    assert code == 3, err
    [hint] = [line for line in err.splitlines() if "To resume" in line]
    command = hint.split(": ", 1)[1].replace("<more than 0.05>", "1")
    args = shlex.split(command)
    assert args[0] == "campaign"
    code, out, err = invoke(store_path, *args[1:], "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["counts"] == {"sent": 10} and summary["total_rows"] == 10
    assert args[args.index("--rate") + 1] == "500.0"


@pytest.mark.parametrize("mode", [("--quiet", "send"), ("send", "--json")])
def test_why_a_run_was_aborted_is_on_stderr_also_with_quiet_or_json(
    make_campaign: CampaignFactory, store_path: Path, tmp_path: Path, mode: tuple[str, str]
) -> None:
    """--quiet is "only errors and results", and --json leaves stderr for people: a run aborted
    by its provider (exit 6) used to say nothing at all with --quiet, and with --json only the
    resume command, never why."""
    (tmp_path / "not-a-folder").write_text("")
    campaign = make_campaign(people(3), providers={"box": {
        "type": "outbox", "dir": "not-a-folder/outbox", "price_per_segment": "0.01"}})
    first, second = mode
    code, out, err = invoke(store_path, first, second, str(campaign), "--run-key", "k")
    assert code == 6, err
    [line] = [line for line in err.splitlines() if line.startswith("error: ")]
    assert "provider box refused our credentials or configuration" in line
    assert "not-a-folder" in line


def test_the_resume_command_is_printed_also_with_quiet(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    """--quiet is "only errors and results": a run stopped at its spend cap (exit 3) printed
    nothing at all, so a cron log held no word of how to go on."""
    campaign = make_campaign(people(5))
    code, out, err = invoke(store_path, "--quiet", "send", str(campaign), "--run-key", "k",
                            "--max-spend", "0.02")
    assert code == 3, err
    assert out == ""
    [hint] = [line for line in err.splitlines() if "To resume" in line]
    assert "--run-key k" in hint and "--max-spend" in hint


@pytest.mark.parametrize("store", ["kept", "deleted", "replaced"])
def test_no_resume_command_when_the_run_s_store_is_gone(
    make_campaign: CampaignFactory, store_path: Path, tmp_path: Path, store: str
) -> None:
    """A run stopped because its store was deleted or replaced under it (exit 1): the printed
    resume command would have started the run afresh in a new store and sent everyone already
    sent their message again. It says the store is gone instead."""
    import io

    from campaign_cli.cli.context import AppContext
    from campaign_cli.cli.output import Output
    from campaign_cli.cli.send import _resume_hint

    campaign = make_campaign(people(2))
    code, out, _ = invoke(store_path, "send", str(campaign), "--run-key", "k", "--json")
    report = run_status_of(store_path, "test-campaign/k")
    report.exit_code = 1
    if store == "deleted":
        store_path.unlink()
    elif store == "replaced":
        store_path.unlink()
        invoke(store_path, "suppress", "add", "+14155550100")  # a new, valid store
    app = AppContext(output=Output(stdout=io.StringIO(), stderr=io.StringIO()),
                     store_option=store_path, env={})
    hint = _resume_hint(app, report, campaign, None, None, None, None) or ""
    if store == "kept":
        assert hint.startswith("to resume: ")
    else:
        assert "to resume" not in hint
        assert hint.startswith("the store that journaled run test-campaign/k is gone from ")


def test_the_status_of_a_finished_run_reads_none_of_its_journal(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    """`campaign status` lists up to 50 runs, and counted each one's journal three times over
    (counts, spend, messages sent): every row of every run listed, 9 s on a store of 28 runs
    of 200,000 rows, growing with every campaign kept. A finished session's end now records
    what it counted, in the same transaction; status reads the journal of running runs only."""
    from campaign_cli.pipeline import run_status
    from campaign_cli.store import runs
    from campaign_cli.store.db import Store

    campaign = make_campaign(people(4))
    code, out, err = invoke(store_path, "send", str(campaign), "--json", "--run-key", "r1",
                            "--max-spend", "0.03")
    assert code == 3, err
    capped = json.loads(out)
    with Store.open(store_path) as opened:
        statements: list[str] = []
        opened.conn.set_trace_callback(statements.append)
        report = run_status(opened.conn, runs.get_run(opened.conn, "test-campaign/r1"))
        opened.conn.set_trace_callback(None)
    assert [s for s in statements if "messages" in s] == []
    assert (report.by_channel, report.spend_micros, report.sent_this_session) == (
        capped["by_channel"], capped["spend_micros"], 3)
    same_as_status(store_path, capped)

    code, out, err = invoke(store_path, "send", str(campaign), "--json", "--run-key", "r1",
                            "--max-spend", "1")
    assert code == 0, err
    same_as_status(store_path, json.loads(out))  # the resumed session's end, not the first's


def run_status_of(store: Path, run: str) -> RunReport:
    from campaign_cli.pipeline import run_status
    from campaign_cli.store import runs
    from campaign_cli.store.db import Store

    with Store.open(store) as opened:
        return run_status(opened.conn, runs.get_run(opened.conn, run))


def test_the_plain_progress_line_shows_spend_exactly_in_the_runs_currency() -> None:
    """Off a terminal, progress is a plain line every few seconds. Its spend was a float printed
    with four decimals: 0.00395 USD showed as 0.0040, 12 JPY as 12.0000; the summary and
    `status` print the exact amount."""
    import io

    from campaign_cli.cli.output import Output, ProgressDisplay
    from campaign_cli.pipeline import Progress

    err = io.StringIO()
    with ProgressDisplay(Output(stdout=io.StringIO(), stderr=err), "t", plain_every=5) as shown:
        for spend, currency, elapsed in ((3950, "USD", 5.0), (12_000_000, "JPY", 10.0),
                                         (1_234_567_890_123, "EUR", 15.0)):
            shown.update(Progress(total=10, done=1, sent=1, skipped=0, failed=0, pending=9,
                                  spend_micros=spend, elapsed_s=elapsed, rate_per_s=0.2,
                                  currency=currency))
    lines = err.getvalue().splitlines()
    assert len(lines) == 3
    assert "spend 0.00395 USD" in lines[0]
    assert "spend 12 JPY" in lines[1]
    assert "spend 1,234,567.890123 EUR" in lines[2]


def test_the_resume_command_names_a_store_given_by_campaign_store(
    make_campaign: CampaignFactory, store_path: Path, tmp_path: Path
) -> None:
    """A cron job sets CAMPAIGN_STORE; the operator pastes the printed resume command into a
    shell that does not. The command left the store out, so it opened the default store, found
    no such run and started it afresh: everyone already sent got the message again."""
    campaign = make_campaign(people(10), limits={"concurrency": 1, "max_spend": "0.05"})
    cron = {"CAMPAIGN_STORE": str(store_path), "XDG_DATA_HOME": str(tmp_path / "cron-home")}
    result = CliRunner().invoke(get_app(), ["send", str(campaign), "--run-key", "nightly"],
                                env=cron)
    assert result.exit_code == 3, result.stderr
    [hint] = [line for line in result.stderr.splitlines() if "To resume" in line]
    args = shlex.split(hint.split(": ", 1)[1].replace("<more than 0.05>", "1"))
    shell = {"CAMPAIGN_STORE": "", "XDG_DATA_HOME": str(tmp_path / "operator-home")}
    result = CliRunner().invoke(get_app(), [*args[1:], "--json"], env=shell)
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["resumed"] is True and summary["counts"] == {"sent": 10}
    assert not (tmp_path / "operator-home").exists()


def test_json_output_stays_json_when_a_value_from_the_environment_is_a_number(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    """Every ${ENV} value is redacted from output. --json redacted the serialized text, so with
    `max_spend: "${MAX_SPEND}"` = 100 and 100 recipients it printed `"sent": ***` and
    `"spend_micros": ***0000`: not JSON, and a script reading it failed on a good run."""
    campaign = make_campaign(people(100), limits={"concurrency": 4, "max_spend": "${MAX_SPEND}"})
    code, out, err = invoke(store_path, "send", str(campaign), "--json",
                            env={"MAX_SPEND": "100"})
    assert code == 0, err
    summary = json.loads(out)
    assert summary["counts"] == {"sent": 100} and summary["total_rows"] == 100
    assert summary["spend_micros"] == 1_000_000
    assert summary["max_spend"] == "100"  # a cap is a setting, not a secret (test_config)


def test_json_output_redacts_a_secret_that_json_escapes() -> None:
    """A secret with a quote or a backslash is written escaped inside a JSON string, so the
    serialized text never contained it verbatim and it went out unredacted."""
    import io

    from campaign_cli.cli.output import Output

    secret = 'pa"ss\\word'
    stdout = io.StringIO()
    Output(stdout=stdout, stderr=io.StringIO(), secrets={secret}).json(
        {"error": f"login failed for {secret}", "n": [secret]})
    assert json.loads(stdout.getvalue()) == {"error": "login failed for ***", "n": ["***"]}


def test_the_resume_command_works_from_another_directory(
    make_campaign: CampaignFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run started with relative paths (`campaign --store s.db send c.yaml`) printed them as
    given: pasted in another directory, the command found no store there, made a new one and
    started the run afresh, sending everyone their message again. The paths are absolute now."""
    campaign = make_campaign(people(10), limits={"concurrency": 1, "max_spend": "0.05"})
    monkeypatch.chdir(campaign.parent)
    code, _, err = invoke(Path("store.db"), "send", campaign.name, "--run-key", "r")
    assert code == 3, err
    [hint] = [line for line in err.splitlines() if "To resume" in line]
    args = shlex.split(hint.split(": ", 1)[1].replace("<more than 0.05>", "1"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = CliRunner().invoke(get_app(), [*args[1:], "--json"])
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["resumed"] is True and summary["counts"] == {"sent": 10}
    assert list(elsewhere.iterdir()) == []


def test_json_still_prints_one_summary_when_the_run_cannot_start(
    make_campaign: CampaignFactory, store_path: Path, tmp_path: Path
) -> None:
    """`campaign send --json | jq .exit_code` in a cron job: a locked run (exit 5) or a bad
    campaign file (exit 2) printed nothing on stdout, and the script choked on empty input."""
    from campaign_cli.store import runs

    campaign = make_campaign(people(2))
    invoke(store_path, "send", str(campaign), "--run-key", "held", "--limit", "1")
    lock = runs.RunLock.acquire(store_path, "test-campaign", "held", "now")
    try:
        code, out, err = invoke(store_path, "send", str(campaign), "--run-key", "held", "--json")
    finally:
        lock.release()
    assert code == 5, err
    locked = json.loads(out)
    assert (locked["exit_code"], locked["status"], locked["counts"]) == (5, "not_started", {})
    assert "held" in locked["error"] and set(locked) >= {"run", "spend", "total_rows"}

    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [\n")
    code, out, err = invoke(store_path, "send", str(broken), "--json")
    assert code == 2 and json.loads(out)["exit_code"] == 2
    assert err.startswith(f"error: {broken}:")


def test_the_readme_names_every_option_of_send_and_status_and_the_help_every_exit_code() -> None:
    """An operator reads the README for what `send` and `status` take: an option it does not
    name (a prompt `--yes` silences, a `--limit` on the run list) is one they never find. The
    top-level help's exit codes say what the README's table says."""
    import typer.main

    readme = (ROOT / "README.md").read_text()
    group = typer.main.get_command(get_app())
    ctx = group.make_context("campaign", ["--help"], resilient_parsing=True)
    sections = {
        "send": readme.split("### `campaign send")[1].split("### `campaign status")[0],
        "status": readme.split("### `campaign status")[1].split("### `campaign suppress")[0],
    }
    for name, section in sections.items():
        command = group.get_command(ctx, name)  # type: ignore[attr-defined]
        for param in command.params:
            for opt in param.opts:
                if opt.startswith("--") and opt != "--help":
                    assert re.search(rf"{re.escape(opt)}\b", section), (name, opt)
    top = " ".join(CliRunner().invoke(get_app(), ["--help"]).stdout.split())
    assert "the store failing mid-run" in top
    assert "the same refusal ten times in a row" in top


def test_the_help_of_send_names_every_exit_code_of_the_readme_table() -> None:
    """`campaign send --help` lists the exit codes a send can end with: it left out 1, the exit
    of a broken pipe or a full disk (the README's table has it), so a cron wrapper written from
    the help took a resumable stop for an unknown failure."""
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Exit codes")[1].split("## ")[0]
    codes = re.findall(r"^\| (\d+) \|", table, flags=re.M)
    assert codes == ["0", "1", "2", "3", "4", "5", "6", "130"]
    shown = " ".join(CliRunner().invoke(get_app(), ["send", "--help"]).stdout.split())
    listed = shown.split("Exit codes:")[1].split("Arguments:")[0]
    for code in codes:
        assert re.search(rf"(^|; ){code} ", listed.strip()), (code, listed)


def test_the_help_of_every_command_lists_its_exit_codes() -> None:
    """DESIGN.md section 5: exit codes are a contract, and each command's `--help` says which it
    ends with. Only the top level, `send` and `validate` did: `status`, `trace`, `preview` and
    every `suppress` and `consent` command said nothing, so a script's author had to guess what
    an unknown run or a bad address exits with. Every code a help names is one of the README's."""
    import typer.main

    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Exit codes")[1].split("## ")[0]
    known = set(re.findall(r"^\| (\d+) \|", table, flags=re.M))
    group = typer.main.get_command(get_app())

    def leaves(command: Any, path: list[str]) -> list[list[str]]:
        if not hasattr(command, "list_commands"):
            return [path]
        ctx = command.make_context("campaign", ["--help"], resilient_parsing=True)
        return [path] * bool(path) + [
            found for name in command.list_commands(ctx)
            for found in leaves(command.get_command(ctx, name), [*path, name])]

    commands = leaves(group, [])
    assert ["status"] in commands and ["suppress", "erase"] in commands and len(commands) >= 18
    for command in commands:
        shown = " ".join(CliRunner().invoke(get_app(), [*command, "--help"]).stdout.split())
        assert "Exit codes:" in shown or "exit codes:" in shown, command
        listed = re.split(r"[Ee]xit codes:", shown)[1]
        codes = re.findall(r"(?:^|; )(\d+) ", listed.strip())
        assert {"0", "1", "2", "130"} <= set(codes) <= known, (command, listed)


def test_the_commands_the_example_campaigns_show_exist() -> None:
    """Each example file's comment shows how to run it: every command it names must be one."""
    import typer.main

    group = typer.main.get_command(get_app())
    ctx = group.make_context("campaign", ["--help"], resilient_parsing=True)
    known = set(group.list_commands(ctx))  # type: ignore[attr-defined]
    shown = 0
    for path in sorted((ROOT / "campaigns").glob("*.yaml")):
        for line in path.read_text().splitlines():
            found = re.match(r"#\s+campaign\s+(?:--store\s+\S+\s+)?([a-z-]+)", line)
            if found:
                shown += 1
                assert found[1] in known, (path.name, line)
    assert shown >= 3


def test_status_of_a_run_without_any_store_is_one_error_line_and_exit_2(tmp_path: Path) -> None:
    # It printed "no store at ... yet" on stdout and exited 2 with nothing on stderr.
    code, out, err = invoke(tmp_path / "none.db", "status", "nope")
    assert code == 2 and out == ""
    assert err.strip() == f"error: no run 'nope': no store at {tmp_path / 'none.db'} yet"
    assert not (tmp_path / "none.db").exists()


def test_a_run_finished_before_version_5_shows_with_its_session_keys_blank(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    """A store from before migration 5 (no `stopped`, `in_doubt_*` on runs) opens, migrates and
    lists its runs: what it did not record reads `null` and 0."""
    assert invoke(store_path, "send", str(make_campaign(people(2))), "--run-key", "r1")[0] == 0
    with contextlib.closing(sqlite3.connect(store_path)) as conn, conn:  # back to version 4, as it wrote runs
        for column in ("stopped", "in_doubt_found", "in_doubt_resent", "recipient_key",
                       "strategy", "reading", "summary"):
            conn.execute(f"ALTER TABLE runs DROP COLUMN {column}")
        conn.execute("PRAGMA user_version = 4")
    code, out, err = invoke(store_path, "status", "test-campaign/r1", "--json")
    assert code == 0, err
    status = json.loads(out)
    assert (status["stopped"], status["in_doubt_found"], status["in_doubt_resent"],
            status["counts"]) == (None, 0, 0, {"sent": 2})
    assert query(store_path, "PRAGMA user_version") == [(len(MIGRATIONS),)]



def test_a_run_of_the_first_campaign_cli_resumes_keeping_its_recipients_claims(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    """The first campaign-cli's journal (its migration 1 was changed after it had written
    stores) had no `dedupe_key` / `dedupe_addr`: it marked claims with `dedupe_address` and
    partial unique indexes on `state`. On such a store every send, dry run and resume aborted,
    "table messages has no column named dedupe_key" (exit 1). A resume must also still take a
    recipient the earlier session journaled for a duplicate, not send to them twice."""
    again = ["c1", "Again", "+12012000009", "again@example.com"]  # row 4: row 1's key
    campaign = make_campaign([*people(3), again])
    code, _, err = invoke(store_path, "send", str(campaign), "--run-key", "r1", "--limit", "2")
    assert code == 0, err
    with contextlib.closing(sqlite3.connect(store_path)) as conn, conn:  # as version 1 wrote it
        conn.execute("DROP INDEX messages_once_per_key")
        conn.execute("DROP INDEX messages_once_per_address")
        conn.execute("ALTER TABLE messages ADD COLUMN dedupe_address INTEGER NOT NULL DEFAULT 0")
        conn.execute("UPDATE messages SET dedupe_address = dedupe_addr IS NOT NULL")
        for table, column in [("messages", "dedupe_key"), ("messages", "dedupe_addr"),
                              ("messages", "doubt_micros"), ("runs", "stopped"),
                              ("runs", "in_doubt_found"), ("runs", "in_doubt_resent"),
                              ("runs", "recipient_key"), ("runs", "strategy"), ("runs", "reading"),
                              ("runs", "summary")]:
            conn.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
        conn.execute("DROP TABLE attempts")
        conn.execute("CREATE UNIQUE INDEX messages_once_per_key ON messages (run_id, channel, rkey) "
                     "WHERE state NOT IN ('invalid', 'duplicate')")
        conn.execute("CREATE UNIQUE INDEX messages_once_per_address ON messages "
                     "(run_id, channel, address) "
                     "WHERE dedupe_address = 1 AND state NOT IN ('invalid', 'duplicate')")
        conn.execute("PRAGMA user_version = 1")
    code, out, err = invoke(store_path, "send", str(campaign), "--run-key", "r1", "--json")
    assert code == 0, err
    assert json.loads(out)["counts"] == {"sent": 3, "duplicate": 1}
    assert query(store_path, "SELECT row, state FROM messages ORDER BY row") == [
        (1, "sent"), (2, "sent"), (3, "sent"), (4, "duplicate")]
    assert len(list((campaign.parent / "outbox").rglob("*.json"))) == 3
    assert query(store_path, "PRAGMA user_version") == [(len(MIGRATIONS),)]

def test_a_dry_run_says_why_messages_would_fail_to_render(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    """A dry run is how an operator checks templates before sending. One whose template failed
    for some recipients exited 4 with `render_failed` counted and no reason anywhere: the exit
    code's "see `campaign status RUN`" cannot help, a dry run leaves the store untouched."""
    body = "Hi {{ first_name }}{% if id == 'c2' %}{{ coupon }}{% endif %}, your code is 1234."
    campaign = make_campaign(people(3), channels={"sms": {"provider": "box", "body": body}})
    code, out, err = invoke(store_path, "send", str(campaign), "--dry-run")
    assert code == 4, err
    assert "'coupon' is undefined" in err
    assert "row 2" in err and "sms" in err
    assert not store_path.exists()
    code, out, err = invoke(store_path, "send", str(campaign), "--dry-run", "--json")
    assert code == 4 and json.loads(out)["counts"]["render_failed"] == 1
    assert "'coupon' is undefined" in err


class _Terminal(io.StringIO):
    """A standard error that says it is a terminal: rich draws its live progress display."""

    def isatty(self) -> bool:
        return True


def _screen_lines(text: str) -> list[str]:
    """The lines a terminal keeps of ``text``: escape codes dropped, each line as left after its
    last carriage return (rich redraws the live line in place)."""
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)
    return [line.rsplit("\r", 1)[-1] for line in plain.split("\n")]


def test_the_live_progress_display_ends_on_the_runs_last_counts(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    """On a terminal the progress display is left on screen when the run ends. It was only fed
    by the once-a-second ticker, so it stayed at its last tick: "0/?" after a run shorter than a
    second, "208/300" after one that sent all 300."""
    from campaign_cli.cli.context import AppContext
    from campaign_cli.cli.output import Output

    campaign = make_campaign(people(10))
    stdout, stderr = io.StringIO(), _Terminal()
    app = AppContext(output=Output(stdout=stdout, stderr=stderr), store_option=store_path)
    result = CliRunner().invoke(get_app(), ["send", str(campaign), "--json"], obj=app)
    assert result.exit_code == 0, stderr.getvalue()
    assert json.loads(stdout.getvalue())["counts"] == {"sent": 10}
    [bar] = [line for line in _screen_lines(stderr.getvalue()) if "test-campaign" in line]
    assert "sent 10 " in bar and "spend 0.1 USD" in bar, bar


def test_validate_is_the_dry_run_under_its_preflight_name(tmp_path: Path) -> None:
    """DESIGN.md's `campaign validate`: the same checks, output and exit codes as
    `send --dry-run`, and nothing written (not even a store)."""
    store = tmp_path / "store.db"
    demo = str(ROOT / "campaigns" / "demo.yaml")
    code, out, err = invoke(store, "validate", demo, "--json")
    assert code == 0, err
    validated = json.loads(out)
    code, out, err = invoke(store, "send", demo, "--dry-run", "--json")
    assert code == 0, err
    dry = json.loads(out)
    assert {k: v for k, v in validated.items() if k not in TIMED_KEYS | {"started_at",
                                                                         "finished_at"}} == {
        k: v for k, v in dry.items() if k not in TIMED_KEYS | {"started_at", "finished_at"}}
    assert validated["dry_run"] is True and validated["counts"]["sent"] == 93
    assert not store.exists()
    code, out, _ = invoke(store, "validate", demo, "--max-spend", "0.1", "--json")
    assert code == 3 and json.loads(out)["stopped"] == "spend_cap"
    code, out, err = invoke(store, "validate", str(tmp_path / "none.yaml"), "--json")
    assert code == 2 and json.loads(out)["status"] == "not_started"
    assert err.strip().endswith("none.yaml: campaign file not found")


def test_validate_as_a_ci_gate_says_on_stderr_why_the_cap_fails_it(tmp_path: Path) -> None:
    """`campaign validate x.yaml --json` as a CI step: exit 3 (the cap would stop the run) came
    with nothing at all on stderr, the CI log's only human words, where exit 4 says which
    messages would fail to render and a real send at the cap prints the way on. One line says
    what the cap would do and how to change it."""
    store = tmp_path / "store.db"
    demo = str(ROOT / "campaigns" / "demo.yaml")
    code, out, err = invoke(store, "validate", demo, "--max-spend", "0.1", "--json")
    assert code == 3 and json.loads(out)["stopped"] == "spend_cap"
    assert err.strip().splitlines() == [
        "dry run: the spend cap (0.1 USD) would stop the run with messages still pending; "
        "raise it with --max-spend or limits.max_spend"]
    assert not store.exists()


def test_a_send_that_ends_with_failures_says_where_to_look_on_stderr(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    """`send --json` from cron exiting 4 (some messages not sent) said nothing on stderr, the cron
    log's only human words: one line now says how many and where to look."""
    campaign = make_campaign(
        [["c1", "Ann", phone(1), "a@example.com"], ["c2", "", phone(2), "b@example.com"],
         ["c3", "Cy", phone(3), "c@example.com"]],
        channels={"sms": {"provider": "box",
                          "body": "Hi {{ first_name or (1 / 0) }}, your code is 1234."}})
    code, out, err = invoke(store_path, "send", str(campaign), "--run-key", "r", "--json")
    assert code == 4 and json.loads(out)["counts"] == {"sent": 2, "render_failed": 1}
    assert err.strip().splitlines() == [
        "1 message(s) not sent (dead letters, or templates that failed for those recipients): "
        "see `campaign status test-campaign/r`"]


def test_validate_of_a_run_being_sent_now_says_so(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    """`validate --run-key K` while a process sends run K answered as of that moment, exit 0,
    without a word that the run was live (and its figures moving)."""
    campaign = make_campaign(people(5))
    assert invoke(store_path, "send", str(campaign), "--run-key", "r1", "--limit", "3")[0] == 0
    lock = runs.RunLock.acquire(store_path, "test-campaign", "r1", "2026-11-27T12:00:00.000Z")
    try:
        code, out, err = invoke(store_path, "validate", str(campaign), "--run-key", "r1")
    finally:
        lock.release()
    assert code == 0, err
    assert (f"warning: run test-campaign/r1 is being sent now (pid {os.getpid()} on "
            f"{socket.gethostname()} since 2026-11-27T12:00:00.000Z): this dry run checks it as "
            "the store holds it at this moment") in err
    assert "being sent now" not in invoke(store_path, "validate", str(campaign), "--run-key",
                                          "r1")[2]


def test_a_refused_resume_s_json_names_the_run(
    make_campaign: CampaignFactory, store_path: Path, tmp_path: Path
) -> None:
    """A resume refused because the recipient file changed under the run's key (exit 2): its
    `--json` said run, run_id and campaign null, though the run is the store's and named in the
    error; a script could not tell which run to look at. The keys are the same, with values."""
    campaign = make_campaign(people(3))
    code, out, _ = invoke(store_path, "send", str(campaign), "--run-key", "daily", "--json")
    assert code == 0
    first = json.loads(out)
    make_campaign(people(4))  # the file rewritten under the same run key
    code, out, err = invoke(store_path, "send", str(campaign), "--run-key", "daily", "--json")
    assert code == 2 and "different recipient file" in err
    refused = json.loads(out)
    assert set(first) <= set(refused)
    assert (refused["status"], refused["run"], refused["run_id"], refused["campaign"],
            refused["run_key"]) == ("not_started", "test-campaign/daily", first["run_id"],
                                    "test-campaign", "daily")


def test_validate_checks_the_resume_of_a_named_run(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    """`validate --run-key K`, as `send --dry-run --run-key K`: the preflight of resuming run K
    (what it would still send, its cap), where validate could only check a new run."""
    campaign = make_campaign(people(5))
    assert invoke(store_path, "send", str(campaign), "--run-key", "r1", "--limit", "3")[0] == 0
    code, out, err = invoke(store_path, "validate", str(campaign), "--run-key", "r1", "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert (summary["run"], summary["resumed"], summary["dry_run"]) == (
        "test-campaign/r1", True, True)
    assert summary["counts"] == {"sent": 5} and summary["total_rows"] == 5


def test_ctrl_c_in_a_command_without_a_run_says_so_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """`suppress import` of a large file, Ctrl-C: typer exited 130 without a word. The import's
    one transaction is rolled back; the operator is told the command was interrupted."""
    import sys

    from campaign_cli.cli import main as entry
    from campaign_cli.cli import suppress

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(suppress.suppressions, "import_csv", interrupted)
    listing = tmp_path / "optouts.csv"
    listing.write_text("phone\n+12015550100\n")
    monkeypatch.setattr(sys, "argv", ["campaign", "--store", str(tmp_path / "s.db"),
                                      "suppress", "import", str(listing)])
    with pytest.raises(SystemExit) as exited:
        entry.main()
    assert exited.value.code == 130
    assert capsys.readouterr().err == "error: interrupted\n"


def test_ctrl_c_while_the_commands_are_set_up_is_one_line_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import sys

    from campaign_cli.cli import main as entry

    def interrupted() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(entry, "_register", interrupted)
    monkeypatch.setattr(sys, "argv", ["campaign", "status"])
    with pytest.raises(SystemExit) as exited:
        entry.main()
    assert exited.value.code == 130
    assert capsys.readouterr().err == "error: interrupted\n"


def test_a_run_raises_its_open_file_limit_to_what_its_connections_need() -> None:
    """Under `ulimit -n 64` a twilio campaign with 200 connections failed to connect ("Too many
    open files") and ended messages `failed` as if the provider had refused them (helper s2).
    The soft limit is raised towards what the campaign's providers need, within the hard one;
    the helper processes inherit it. Checked in a child, to leave this process's limit alone."""
    import subprocess
    import sys

    code = (
        "import resource\n"
        "from campaign_cli.cli.send import raise_fd_limit\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))\n"
        "print(raise_fd_limit(600), resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (64, 100))\n"
        "print(raise_fd_limit(600))\n"
        "print(resource.getrlimit(resource.RLIMIT_NOFILE))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, timeout=60)
    first, warning, after = done.stdout.splitlines()
    assert first == "None 600"
    assert warning.startswith("only 100 open files allowed (ulimit -n) for about 600")
    assert after == "(100, 100)"


def test_the_descriptors_a_campaign_wants_count_every_provider_s_connections(
    make_campaign: CampaignFactory,
) -> None:
    from campaign_cli.cli.send import descriptors_wanted
    from campaign_cli.config import load_campaign

    campaign = make_campaign(people(1), limits={"concurrency": 50}, providers={
        "box": {"type": "outbox", "dir": "outbox"},
        "fast": {"type": "console", "concurrency": 300},
    })
    assert descriptors_wanted(load_campaign(campaign, {}).campaign) == 50 + 300 + 50 + 128


def test_status_of_a_running_run_times_it_on_the_commands_clock(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    """A run still going has no end yet: its duration runs to now. `status` read the wall
    clock for that (`SystemClock` in `run_status`), not the command's injected clock, so a test
    (or anything driving the CLI with its own clock) could not control it: here a run started
    at 2026-01-01T00:00 on the fake clock was a year long or negative, by the machine's date."""
    import io
    from datetime import datetime, timedelta, timezone

    from campaign_cli.cli.context import AppContext
    from campaign_cli.cli.output import Output
    from campaign_cli.config import load_campaign
    from campaign_cli.pipeline import SendOptions, run_campaign
    from campaign_cli.testing import FakeClock, FakeProvider, fake_registry

    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    campaign = make_campaign(people(3))
    run_campaign(load_campaign(campaign, {}), store_path, SendOptions(run_key="live"),
                 clock=FakeClock(start), registry=fake_registry(FakeProvider()))
    with contextlib.closing(sqlite3.connect(store_path)) as conn, conn:  # as while it runs
        conn.execute("UPDATE runs SET status = 'running', exit_code = NULL, finished_at = NULL")
    stdout = io.StringIO()
    app = AppContext(output=Output(stdout=stdout, stderr=io.StringIO()), store_option=store_path,
                     env={}, clock=FakeClock(start + timedelta(seconds=30)))
    lock = runs.RunLock.acquire(store_path, "test-campaign", "live", "now")  # its process, alive
    try:
        result = CliRunner().invoke(get_app(), ["status", "test-campaign/live", "--json"],
                                    obj=app)
        assert result.exit_code == 0, result.output
        status = json.loads(stdout.getvalue())
        assert (status["status"], status["duration_s"], status["rate_per_s"]) == (
            "running", 30.0, 0.1)
        stdout.truncate(0)
        stdout.seek(0)
        result = CliRunner().invoke(get_app(), ["status", "--json"], obj=app)
        assert result.exit_code == 0, result.output
        [listed] = json.loads(stdout.getvalue())
        assert (listed["duration_s"], listed["rate_per_s"]) == (30.0, 0.1)
    finally:
        lock.release()


def test_status_of_a_run_whose_process_is_gone_times_it_to_its_last_change(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    """A run left `running` by a killed process (or a machine that went down) was timed up to
    now: a week later `status` said it had run for a week at 0.0/s. It is timed up to its last
    journal change, as far as anyone can tell it ran."""
    import io
    from datetime import datetime, timedelta, timezone

    from campaign_cli.cli.context import AppContext
    from campaign_cli.cli.output import Output
    from campaign_cli.config import load_campaign
    from campaign_cli.pipeline import SendOptions, run_campaign
    from campaign_cli.testing import FakeClock, FakeProvider, fake_registry

    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    campaign = make_campaign(people(4))
    run_campaign(load_campaign(campaign, {}), store_path, SendOptions(run_key="k"),
                 clock=FakeClock(start), registry=fake_registry(FakeProvider()))
    with contextlib.closing(sqlite3.connect(store_path)) as conn, conn:  # as a kill leaves it
        conn.execute("UPDATE runs SET status = 'running', exit_code = NULL, finished_at = NULL")
        conn.execute("UPDATE messages SET updated_at = '2026-01-01T00:00:08.000Z' WHERE row = 4")
    stdout = io.StringIO()
    app = AppContext(output=Output(stdout=stdout, stderr=io.StringIO()), store_option=store_path,
                     env={}, clock=FakeClock(start + timedelta(days=7)))
    result = CliRunner().invoke(get_app(), ["status", "test-campaign/k", "--json"], obj=app)
    assert result.exit_code == 0, result.output
    status = json.loads(stdout.getvalue())
    assert (status["status"], status["holder"]) == ("running", None)
    assert (status["duration_s"], status["rate_per_s"]) == (8.0, 0.5)
    stdout.truncate(0)
    stdout.seek(0)
    result = CliRunner().invoke(get_app(), ["status", "--json"], obj=app)
    [listed] = json.loads(stdout.getvalue())
    assert (listed["duration_s"], listed["rate_per_s"]) == (8.0, 0.5)
    result = CliRunner().invoke(get_app(), ["status", "test-campaign/k"], obj=app)
    assert "running (stopped: no process)" in stdout.getvalue()
    assert "over 8.0s" in stdout.getvalue()
