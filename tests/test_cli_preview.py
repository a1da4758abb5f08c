"""`campaign preview CAMPAIGN --row N`: one recipient's messages as `campaign send` would send
them, decided by a dry run of the rows up to N (so by the run's own rules), and never a change
to the store."""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from campaign_cli.cli.main import get_app
from tests.conftest import CampaignFactory, people, phone

ROOT = Path(__file__).resolve().parent.parent


def invoke(store: Path, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(get_app(), ["--store", str(store), *args])
    return result.exit_code, result.stdout, result.stderr


def previewed(store: Path, campaign: Path, row: int, *args: str) -> dict[str, Any]:
    code, out, err = invoke(store, "preview", str(campaign), "--row", str(row), *args, "--json")
    assert code == 0, err
    found: dict[str, Any] = json.loads(out)
    return found


def by_channel(found: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["channel"]: c for c in found["channels"]}


@pytest.fixture
def demo(tmp_path: Path) -> Path:
    for folder in ("campaigns", "templates"):
        shutil.copytree(ROOT / folder, tmp_path / folder)
    return tmp_path / "campaigns" / "demo.yaml"


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_row_shows_each_channel_s_message_as_it_would_be_sent(
    demo: Path, tmp_path: Path
) -> None:
    store = tmp_path / "store.db"
    found = previewed(store, demo, 1)
    assert (found["row"], found["line"], found["key"]) == (1, 2, "C1001")
    sms, email = by_channel(found)["sms"], by_channel(found)["email"]
    assert (sms["address"], sms["outcome"], sms["providers"], sms["cost"]) == (
        "+12015550100", "send", ["sms-outbox"], "0.0079")
    assert sms["content"] == {
        "body": "Acme: Hi Olivia, spring sale: 20% off this week. Reply STOP to opt out.",
        "encoding": "GSM-7", "segments": 1}
    assert (email["outcome"], email["cost"]) == ("send", "0.0004")
    assert email["content"]["subject"] == "Olivia, our spring sale starts now"
    assert email["content"]["from"] == "Acme <news@example.com>"
    assert "Hi Olivia," in email["content"]["text"] and "<h1" in email["content"]["html"]
    assert "List-Unsubscribe" in email["content"]["headers"]
    # No store yet: nothing was created, and the preview says its links will differ.
    assert not store.exists()
    assert any("unsubscribe links" in w for w in found["warnings"])


def test_refusals_are_shown_with_their_reason(demo: Path, tmp_path: Path) -> None:
    store = tmp_path / "store.db"
    # Row 45's phone is not a number; row 48 repeats row 7's key; the demo's own opt-out list
    # holds row 14's email (a run imports it first, so the preview does too).
    sms = by_channel(previewed(store, demo, 45))["sms"]
    assert (sms["outcome"], sms["reason"], sms["content"]) == ("invalid", "bad_phone", None)
    assert sms["detail"] == "not a valid phone number: '555-0144'"
    duplicate = by_channel(previewed(store, demo, 48))
    assert {c["outcome"] for c in duplicate.values()} == {"duplicate"}
    assert all(not c["already"] for c in duplicate.values())
    listed = by_channel(previewed(store, demo, 14))
    assert (listed["email"]["outcome"], listed["sms"]["outcome"]) == ("suppressed", "send")


def test_an_opt_out_in_the_store_shows_as_suppressed(demo: Path, tmp_path: Path) -> None:
    store = tmp_path / "store.db"
    assert invoke(store, "suppress", "add", "(212) 555-0102", "--reason", "stop")[0] == 0
    before = digest(store)
    channels = by_channel(previewed(store, demo, 3))
    assert (channels["sms"]["outcome"], channels["sms"]["reason"]) == ("suppressed",
                                                                         "suppressed")
    assert (channels["sms"]["cost"], channels["sms"]["content"]) == ("0", None)
    assert channels["email"]["outcome"] == "send"
    assert digest(store) == before  # the store is only read
    assert not any("unsubscribe links" in w for w in previewed(store, demo, 3)["warnings"])


def test_a_row_an_earlier_session_decided_is_shown_as_decided(
    demo: Path, tmp_path: Path
) -> None:
    store = tmp_path / "store.db"
    code, _, err = invoke(store, "send", str(demo), "--yes", "--limit", "2")
    assert code == 0, err
    first = by_channel(previewed(store, demo, 1))
    assert {(c["outcome"], c["already"]) for c in first.values()} == {("sent", True)}
    third = by_channel(previewed(store, demo, 3))  # not reached by the limited session
    assert {(c["outcome"], c["already"]) for c in third.values()} == {("send", False)}
    # Another run key is another run: nothing decided there yet.
    other = by_channel(previewed(store, demo, 1, "--run-key", "other"))
    assert {(c["outcome"], c["already"]) for c in other.values()} == {("send", False)}
    assert previewed(store, demo, 1, "--run-key", "other")["run"] == "demo-spring/other"



def test_a_store_an_older_campaign_cli_wrote_is_previewed_without_being_upgraded(
    demo: Path, tmp_path: Path
) -> None:
    """`preview` reads the real store without migrating it (it changes nothing). On a store of
    an older campaign-cli (version 4: runs without `stopped`, `recipient_key` ...) it read the
    run with today's columns: an internal error, "no such column: stopped" (exit 1)."""
    store = tmp_path / "store.db"
    code, _, err = invoke(store, "send", str(demo), "--yes", "--limit", "2")
    assert code == 0, err
    with contextlib.closing(sqlite3.connect(store)) as conn, conn:  # back to version 4
        for column in ("stopped", "in_doubt_found", "in_doubt_resent", "recipient_key",
                       "strategy", "reading", "summary"):
            conn.execute(f"ALTER TABLE runs DROP COLUMN {column}")
        conn.execute("PRAGMA user_version = 4")
    before = digest(store)
    first = by_channel(previewed(store, demo, 1))
    assert {(c["outcome"], c["already"]) for c in first.values()} == {("sent", True)}
    third = by_channel(previewed(store, demo, 3))
    assert {(c["outcome"], c["already"]) for c in third.values()} == {("send", False)}
    assert digest(store) == before  # read as it is: not upgraded


def test_marketing_without_consent_is_no_consent(
    make_campaign: CampaignFactory, tmp_path: Path
) -> None:
    campaign = make_campaign(people(2), purpose="marketing",
                             channels={"sms": {"provider": "box",
                                               "body": "Hi {{ first_name }}. Reply STOP to opt out"}},
                             compliance={"consent": "required"})
    store = tmp_path / "store.db"
    assert invoke(store, "consent", "grant", phone(2), "--channel", "sms",
                  "--purpose", "marketing", "--source", "form")[0] == 0
    assert by_channel(previewed(store, campaign, 1))["sms"]["outcome"] == "no_consent"
    assert by_channel(previewed(store, campaign, 2))["sms"]["outcome"] == "send"


def test_a_template_that_fails_for_this_row_says_why(
    make_campaign: CampaignFactory, tmp_path: Path
) -> None:
    campaign = make_campaign(
        [["c1", "Ann", phone(1), "a@example.com"], ["c2", "", phone(2), "b@example.com"]],
        channels={"sms": {"provider": "box",
                          "body": "{% if not first_name %}{{ missing }}{% endif %}Hi"}})
    sms = by_channel(previewed(tmp_path / "s.db", campaign, 2))["sms"]
    assert (sms["outcome"], sms["content"]) == ("render_failed", None)
    assert "missing" in sms["detail"]
    assert by_channel(previewed(tmp_path / "s.db", campaign, 1))["sms"]["content"]["body"] == "Hi"


def test_a_spend_cap_reached_before_the_row_leaves_it_pending(
    make_campaign: CampaignFactory, tmp_path: Path
) -> None:
    campaign = make_campaign(people(5), limits={"concurrency": 1, "max_spend": "0.02"})
    found = previewed(tmp_path / "s.db", campaign, 3)
    assert by_channel(found)["sms"]["outcome"] == "pending"
    assert found["stopped"] == "spend_cap"
    code, out, _ = invoke(tmp_path / "s.db", "preview", str(campaign), "--row", "3")
    assert code == 0
    assert "sms +12012000003: pending" in out
    assert "(the dry run stopped before this row: spend_cap)" in out


def test_the_human_output(demo: Path, tmp_path: Path) -> None:
    code, out, err = invoke(tmp_path / "store.db", "preview", str(demo), "--row", "45")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "row 45 (line 46, key C1045) in run " + \
        previewed(tmp_path / "store.db", demo, 45)["run"]
    assert lines[1:3] == ["sms -: invalid (bad_phone)",
                          "    not a valid phone number: '555-0144'"]
    assert lines[3] == ("email ethan.wright@example.com: would send via email-outbox, "
                        "cost 0.0004 USD")
    assert "    Subject: Ethan, our spring sale starts now" in lines
    assert "    --- text ---" in lines and "    --- html ---" in lines
    assert "unsubscribe links" in err


@pytest.mark.parametrize(("row", "message"), [
    ("0", "error: --row must be at least 1"),
    ("52", "--row 52: the file has 51 data rows"),
])
def test_a_row_the_file_does_not_have_is_a_usage_error(demo: Path, tmp_path: Path, row: str,
                                                        message: str) -> None:
    code, out, err = invoke(tmp_path / "store.db", "preview", str(demo), "--row", row)
    assert (code, out) == (2, "")
    assert message in err and len(err.strip().splitlines()) == 1


def test_no_store_yet_is_warned_of_only_where_a_template_uses_the_store_s_secret(
    make_campaign: CampaignFactory, tmp_path: Path
) -> None:
    """Without a store, a preview makes a secret of its own, so unsubscribe tokens differ from
    the real run's: said. A campaign whose templates use no token was told so too, for
    nothing (helper t1)."""
    plain = make_campaign(people(2))
    found = previewed(tmp_path / "none.db", plain, 1)
    assert not any("unsubscribe links" in w for w in found["warnings"])
    tokens = make_campaign(people(2), channels={"sms": {
        "provider": "box", "body": "Hi. Stop: https://x.test/u/{{ unsubscribe_token }}"}})
    found = previewed(tmp_path / "none.db", tokens, 1)
    assert any("unsubscribe links" in w for w in found["warnings"])


def test_a_row_past_the_end_is_refused_before_any_row_is_dry_run(
    demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`preview --row N` dry-ran every row of the file before it found N past the end: a typo
    of one digit too many on a 400,000-row file cost ~80 s before the error. The count that
    the run takes first (the file's scan) refuses it: the dry run's store is never made."""
    import campaign_cli.pipeline as pipeline_module

    snapshots: list[Path] = []
    real = pipeline_module._snapshot_store

    def snapshot(source: Path, target: Path, campaign: str, run_key: str) -> Path:
        snapshots.append(target)
        return real(source, target, campaign, run_key)

    monkeypatch.setattr(pipeline_module, "_snapshot_store", snapshot)
    code, out, err = invoke(tmp_path / "store.db", "preview", str(demo), "--row", "5000000")
    assert (code, out) == (2, "")
    assert "--row 5000000: the file has 51 data rows" in err
    assert snapshots == []
    assert invoke(tmp_path / "store.db", "preview", str(demo), "--row", "51")[0] == 0
    assert len(snapshots) == 1


@pytest.mark.parametrize("command", [["preview", "--row", "1"], ["validate"],
                                     ["send", "--dry-run"]])
def test_a_store_that_cannot_be_used_is_named_in_one_line(
    demo: Path, tmp_path: Path, command: list[str]
) -> None:
    """A dry run reads the store through a private copy. A file that is not a store was an
    internal error (exit 1, "DatabaseError: file is not a database"), and a newer program's
    store was refused under the copy's temporary name, a path that no longer exists; both are
    the store's own one-line error (exit 2), as `send` and `trace` give them."""
    not_a_store = tmp_path / "notes.db"
    not_a_store.write_text("hello\n")
    code, out, err = invoke(not_a_store, command[0], str(demo), *command[1:])
    assert code == 2 and out == ""
    assert err == f"error: {not_a_store}: not a usable campaign store: file is not a database\n"
    newer = tmp_path / "newer.db"
    assert invoke(newer, "send", str(demo), "--yes")[0] == 0
    with contextlib.closing(sqlite3.connect(newer)) as conn:
        conn.execute("PRAGMA user_version = 99")
    before = digest(newer)
    code, out, err = invoke(newer, command[0], str(demo), *command[1:])
    assert code == 2 and out == ""
    assert err.startswith(f"error: {newer}: the store has schema version 99, newer than")
    assert len(err.splitlines()) == 1 and digest(newer) == before
