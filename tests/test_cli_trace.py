"""`campaign trace RECIPIENT`: every decision the store holds about one recipient, found by its
key or by an address written any way an operator would type it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from campaign_cli.cli.main import get_app
from campaign_cli.config import load_campaign
from campaign_cli.errors import TransientError
from campaign_cli.models import SendResult
from campaign_cli.pipeline import SendOptions, run_campaign
from campaign_cli.testing import FakeClock, FakeProvider, fake_registry
from tests.conftest import CampaignFactory, people, phone

ROOT = Path(__file__).resolve().parent.parent


def invoke(store: Path, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(get_app(), ["--store", str(store), *args])
    return result.exit_code, result.stdout, result.stderr


def traced(store: Path, *args: str) -> dict[str, Any]:
    code, out, err = invoke(store, "trace", *args, "--json")
    assert code == 0, err
    found: dict[str, Any] = json.loads(out)
    return found


@pytest.fixture
def demo(tmp_path: Path) -> Path:
    """The demo campaign sent once, to its outbox, in a store of its own."""
    for folder in ("campaigns", "templates"):
        shutil.copytree(ROOT / folder, tmp_path / folder)
    store = tmp_path / "store.db"
    code, _, err = invoke(store, "send", str(tmp_path / "campaigns" / "demo.yaml"), "--yes",
                          "--run-key", "spring")
    assert code == 0, err
    return store


def test_a_recipient_key_finds_every_row_of_it_including_its_duplicate(demo: Path) -> None:
    found = traced(demo, "C1007")
    rows = [(m["row"], m["channel"], m["state"]) for m in found["messages"]]
    assert rows == [(7, "email", "sent"), (7, "sms", "sent"),
                    (48, "email", "duplicate"), (48, "sms", "duplicate")]
    first = found["messages"][0]
    assert first["run"] == "demo-spring/spring" and first["line"] == 8
    assert first["provider"] == "email-outbox" and first["cost"] == "0.0004"
    [attempt] = first["attempt_log"]
    assert (attempt["attempt"], attempt["outcome"]) == (1, "sent")
    assert attempt["provider_message_id"] == first["provider_message_id"]
    # The addresses it was sent to, and what the store holds for them now.
    assert found["addresses"] == ["sophia.kim@example.org", "+13055550106"]
    assert {(c["address"], c["channel"], c["status"]) for c in found["consents"]} == {
        ("sophia.kim@example.org", "email", "granted"), ("+13055550106", "sms", "granted")}
    assert found["suppressions"] == [] and found["more"] is False


def test_a_recipient_file_s_value_cannot_print_a_line_of_its_own(
    make_campaign: CampaignFactory, tmp_path: Path
) -> None:
    """A key (or any value from a recipient file) with a line break in it printed as lines of
    their own in `trace` and `preview`: a row from a web form could show the operator a
    "suppressed: ..." or "consent: ..." line the store never held. Its breaks are written as
    escapes, on the line they belong to."""
    forged = "c1\nsuppressed: +12015550100 on all: stop (cli, 2026-01-01)"
    campaign = make_campaign([[forged, "Ann", phone(1), "a@example.com"]])
    store = tmp_path / "store.db"
    assert invoke(store, "send", str(campaign), "--yes")[0] == 0
    code, out, err = invoke(store, "trace", phone(1))
    assert code == 0, err
    assert [line for line in out.splitlines() if line.startswith("suppressed:")] == [
        "suppressed: no"]
    assert "key c1\\nsuppressed: +12015550100 on all" in out
    code, out, err = invoke(store, "preview", str(campaign), "--row", "1")
    assert code == 0, err
    assert not any(line.startswith("suppressed:") for line in out.splitlines())
    assert ", key c1\\nsuppressed: +12015550100" in out


@pytest.mark.parametrize("written", ["(202) 555-0101", "+1 202-555-0101", "2025550101"])
def test_a_phone_number_is_found_however_it_is_written(demo: Path, written: str) -> None:
    found = traced(demo, written)
    assert found["addresses"] == ["+12025550101"]
    assert [(m["recipient_key"], m["channel"]) for m in found["messages"]] == [("C1002", "sms")]


def test_an_email_address_is_found_in_any_case(demo: Path) -> None:
    found = traced(demo, "Liam.Carter@EXAMPLE.com")
    assert [(m["recipient_key"], m["channel"], m["state"]) for m in found["messages"]] == [
        ("C1002", "email", "sent")]


def test_an_opted_out_recipient_shows_the_refusal_and_the_opt_out_behind_it(
    demo: Path,
) -> None:
    found = traced(demo, "benjamin.walsh@example.com")
    [message] = found["messages"]
    assert (message["state"], message["provider"], message["attempt_log"]) == (
        "suppressed", None, [])
    [entry] = found["suppressions"]
    assert (entry["channel"], entry["reason"], entry["source"]) == (
        "email", "unsubscribed", "list:demo-suppressions.csv")
    code, out, _ = invoke(demo, "trace", "benjamin.walsh@example.com")
    assert code == 0
    assert "suppressed: benjamin.walsh@example.com on email: unsubscribed" in out


def test_the_human_output_says_what_the_json_says(demo: Path) -> None:
    code, out, err = invoke(demo, "trace", "C1045")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "'C1045' (ethan.wright@example.com): 2 journal row(s) in 1 run(s)"
    assert ("run demo-spring/spring (id 1) row 45 (line 46) sms - key C1045: "
            "invalid (bad_phone), at ") in out
    assert "    not a valid phone number: '555-0144'" in lines
    assert "email ethan.wright@example.com key C1045: sent via email-outbox, cost 0.0004 USD" \
        in out
    assert "suppressed: no" in lines


def test_an_erased_address_is_found_only_as_its_erasure(demo: Path) -> None:
    code, _, err = invoke(demo, "suppress", "erase", "liam.carter@example.com")
    assert code == 0, err
    found = traced(demo, "liam.carter@example.com")
    assert found["messages"] == []
    [entry] = found["suppressions"]
    assert (entry["channel"], entry["reason"]) == ("all", "erased")
    # By its key, the row is still there, without the address.
    rows = {m["channel"]: m["address"] for m in traced(demo, "C1002")["messages"]}
    assert rows == {"email": None, "sms": "+12025550101"}


def test_run_restricts_the_trace_to_one_run(demo: Path, tmp_path: Path) -> None:
    code, _, err = invoke(demo, "send", str(tmp_path / "campaigns" / "demo.yaml"), "--yes",
                          "--run-key", "autumn")
    assert code == 0, err
    assert {m["run"] for m in traced(demo, "C1002")["messages"]} == {
        "demo-spring/spring", "demo-spring/autumn"}
    assert {m["run"] for m in traced(demo, "C1002", "--run", "demo-spring/autumn")["messages"]
            } == {"demo-spring/autumn"}
    code, _, err = invoke(demo, "trace", "C1002", "--run", "nope")
    assert code == 2 and err.strip() == (
        "error: no run 'nope' in this store (see `campaign status`)")


def test_limit_bounds_the_rows_and_says_there_are_more(demo: Path) -> None:
    found = traced(demo, "C1007", "--limit", "3")
    assert len(found["messages"]) == 3 and found["more"] is True
    code, out, _ = invoke(demo, "trace", "C1007", "--limit", "3")
    assert "3 journal row(s) in 1 run(s), more than 3" in out.splitlines()[0]


def test_a_limit_past_what_sqlite_counts_means_every_row(demo: Path) -> None:
    """`--limit 9223372036854775807` (or any "all of them" number) is every row, not an internal
    error from SQLite's 64-bit integers."""
    every = traced(demo, "C1007")["messages"]
    for huge in ("9223372036854775807", "99999999999999999999999"):
        found = traced(demo, "C1007", "--limit", huge)
        assert found["messages"] == every and found["more"] is False


def test_a_key_pasted_with_spaces_is_found(demo: Path) -> None:
    """The run strips the key column (" C1002 " in the file is key C1002): a key pasted with a
    space from a spreadsheet found nothing, and "0 journal row(s)" reads as "never contacted"."""
    assert len(traced(demo, " C1002\t")["messages"]) == 2
    assert traced(demo, " C1002\t")["messages"] == traced(demo, "C1002")["messages"]


def test_an_unknown_recipient_is_no_rows_not_an_error(demo: Path) -> None:
    found = traced(demo, "nobody")
    assert (found["messages"], found["addresses"], found["suppressions"]) == ([], [], [])


def test_no_store_and_an_empty_recipient_are_usage_errors(tmp_path: Path, demo: Path) -> None:
    code, _, err = invoke(tmp_path / "none.db", "trace", "C1")
    assert code == 2 and "no store at" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "none.db").exists()  # asking created nothing
    code, _, err = invoke(demo, "trace", " ")
    assert code == 2 and err.strip() == (
        "error: RECIPIENT is empty: give a recipient key or an address")


def test_every_attempt_is_listed_with_what_the_provider_said(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    provider = FakeProvider()
    provider.enqueue(TransientError("503 Service Unavailable", code="503", status=503),
                     SendResult(provider_message_id="SM2", status_code=201))
    campaign = make_campaign(people(1), limits={"concurrency": 1})
    report = run_campaign(load_campaign(campaign, {}), store_path, SendOptions(run_key="k"),
                          clock=FakeClock(), registry=fake_registry(provider))
    assert report.counts == {"sent": 1}
    [message] = traced(store_path, phone(1))["messages"]
    assert [(a["attempt"], a["outcome"], a["status_code"], a["provider_message_id"],
             a["error_code"], a["error_text"]) for a in message["attempt_log"]] == [
        (1, "transient", 503, None, "503", "503 Service Unavailable"),
        (2, "sent", 201, "SM2", None, None),
    ]
    assert (message["state"], message["attempts"], message["provider_message_id"]) == (
        "sent", 2, "SM2")
    code, out, _ = invoke(store_path, "trace", "c1")
    assert "    attempt 1  box  transient  503  503" in out
    assert "      503 Service Unavailable" in out
    assert "    attempt 2  box  sent  201  SM2" in out


def test_attempts_are_listed_in_the_order_they_were_made_when_the_clock_steps_back(
    make_campaign: CampaignFactory, store_path: Path
) -> None:
    """The attempt log was sorted by its wall-clock stamps: after the clock was stepped back
    between two attempts (NTP, a VM resumed), the trace listed the retry that was sent before
    the refusal it followed, and an operator read "sent, then failed"."""
    from datetime import datetime, timedelta

    class SteppedBack(FakeClock):
        def __init__(self) -> None:
            super().__init__()
            self.back = timedelta(0)

        def now(self) -> datetime:
            return super().now() - self.back

    clock = SteppedBack()

    def step_back_before_the_retry(message: Any) -> None:
        if len(provider.history) == 2:
            clock.back = timedelta(hours=1)

    provider = FakeProvider(handler=step_back_before_the_retry)
    provider.enqueue(TransientError("503 Service Unavailable", code="503", status=503))
    campaign = make_campaign(people(1), limits={"concurrency": 1})
    report = run_campaign(load_campaign(campaign, {}), store_path, SendOptions(run_key="k"),
                          clock=clock, registry=fake_registry(provider))
    assert report.counts == {"sent": 1}
    [message] = traced(store_path, phone(1))["messages"]
    assert [(a["attempt"], a["outcome"]) for a in message["attempt_log"]] == [
        (1, "transient"), (2, "sent")]
