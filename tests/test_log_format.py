"""`--log-format json` (or $CAMPAIGN_LOG_FORMAT=json): every line on stderr is one JSON object
with time, level and message, for log collectors; stdout is unchanged."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from campaign_cli.cli.main import get_app
from campaign_cli.cli.output import Output, ProgressDisplay
from campaign_cli.pipeline import Progress
from tests.conftest import CampaignFactory, people

ROOT = Path(__file__).resolve().parent.parent
NOON = datetime(2026, 5, 1, 12, 0, tzinfo=timezone.utc)


def records(stderr: str) -> list[dict[str, Any]]:
    """Every stderr line, each of which must be one JSON object with time, level, message."""
    found = [json.loads(line) for line in stderr.splitlines()]
    for record in found:
        assert {"time", "level", "message"} <= set(record), record
    return found


def invoke(store: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(get_app(), ["--store", str(store), *args], env=env)
    return result.exit_code, result.stdout, result.stderr


def test_a_dry_run_logs_its_summary_and_warnings_as_json(tmp_path: Path) -> None:
    code, out, err = invoke(tmp_path / "s.db", "--log-format", "json", "send",
                            str(ROOT / "campaigns" / "demo.yaml"), "--dry-run")
    assert code == 0, err
    logged = records(err)
    table, line = [r for r in logged if r["level"] == "result"]
    assert table["columns"] == ["state", "email", "sms", "total"]
    assert ["sent", 46, 47, 93] in table["rows"]
    assert line["message"].startswith("estimated spend 0.3897 USD")
    assert out == ""  # results a script reads stay where they were


def test_an_error_is_one_json_record_and_keeps_its_exit_code(
    make_campaign: CampaignFactory, tmp_path: Path
) -> None:
    campaign = make_campaign(people(1), extra={"limits": {"concurrency": "many"}})
    code, out, err = invoke(tmp_path / "s.db", "send", str(campaign),
                            env={"CAMPAIGN_LOG_FORMAT": "json"})
    assert (code, out) == (2, "")
    [record] = records(err)
    assert record["level"] == "error"
    assert record["message"].startswith(f"{campaign}:") and "limits.concurrency" in \
        record["message"]


def test_secrets_are_redacted_in_json_records() -> None:
    err = io.StringIO()
    output = Output(stdout=io.StringIO(), stderr=err, secrets={"s3cret"}, log_format="json",
                    now=lambda: NOON)
    output.error("refused token s3cret")
    output.warn("again s3cret")
    assert records(err.getvalue()) == [
        {"time": "2026-05-01T12:00:00.000Z", "level": "error", "message": "refused token ***"},
        {"time": "2026-05-01T12:00:00.000Z", "level": "warning", "message": "again ***"},
    ]


def test_progress_is_a_record_with_the_counts_as_fields() -> None:
    err = io.StringIO()
    output = Output(stdout=io.StringIO(), stderr=err, log_format="json", now=lambda: NOON)
    with ProgressDisplay(output, "demo", plain_every=5) as shown:
        shown.update(Progress(total=10, done=4, sent=3, skipped=1, failed=0, pending=6,
                              spend_micros=30_000, elapsed_s=5.0, rate_per_s=0.6,
                              currency="USD"))
    [record] = records(err.getvalue())
    assert record["level"] == "progress"
    assert {k: record[k] for k in ("done", "total", "sent", "skipped", "failed", "pending",
                                   "rate_per_s", "spend", "currency")} == {
        "done": 4, "total": 10, "sent": 3, "skipped": 1, "failed": 0, "pending": 6,
        "rate_per_s": 0.6, "spend": "0.03", "currency": "USD"}
    assert record["message"].startswith("demo: 4/10 done")


def test_quiet_still_logs_errors_but_not_progress() -> None:
    err = io.StringIO()
    output = Output(stdout=io.StringIO(), stderr=err, log_format="json", quiet=True)
    output.info("chatter")
    output.error("bad")
    assert [r["level"] for r in records(err.getvalue())] == ["error"]


def test_a_mistyped_command_line_is_logged_as_json_too(tmp_path: Path) -> None:
    """Click refuses the command line before any option is read: the format still comes from
    the command line (either spelling) or the environment."""
    for args, env in ((["--log-format", "json"], {}), (["--log-format=json"], {}),
                      ([], {"CAMPAIGN_LOG_FORMAT": "JSON"})):
        done = subprocess.run(
            [sys.executable, "-m", "campaign_cli", "--store", str(tmp_path / "s.db"), *args,
             "send", "x.yaml", "--bogus"],
            capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", **env}, check=False,
        )
        assert done.returncode == 2
        [record] = records(done.stderr)
        # (click words it "No such option: --bogus" or "No such option '--bogus'.")
        assert "No such option" in record["message"] and "--bogus" in record["message"]
        assert record["message"].endswith("send --help)")


def test_text_stays_the_default(tmp_path: Path) -> None:
    code, _, err = invoke(tmp_path / "s.db", "send", "missing.yaml")
    assert code == 2 and err == "error: missing.yaml: campaign file not found\n"


def test_json_records_to_a_stderr_whose_reader_died_are_dropped_not_raised() -> None:
    """`campaign --log-format json send ... 2>&1 | tee log` and Ctrl-C: tee dies first. The
    records nobody reads are dropped, as text lines are, and the command goes on to its own
    end (a BrokenPipeError from a signal handler would leave the run unfinished)."""
    import os

    read, write = os.pipe()
    os.close(read)
    stream = os.fdopen(write, "w")
    try:
        output = Output(stdout=io.StringIO(), stderr=stream, log_format="json")
        output.warn("stopping intake")  # would raise BrokenPipeError
        output.error("and again")
        assert output.err.quiet
    finally:
        stream.close()
