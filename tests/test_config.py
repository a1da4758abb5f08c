"""The campaign file: every shipped campaign loads, and every kind of mistake is one line
``FILE:LINE: key.path: message`` with the right line and key."""

from __future__ import annotations

import csv
import time
from collections import Counter
from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path

import pytest

from campaign_cli.addresses import AddressError, normalize_email, normalize_phone
from campaign_cli.config import LoadedCampaign, load_campaign
from campaign_cli.errors import ConfigError, ExitCode
from campaign_cli.models import Channel, Purpose

ROOT = Path(__file__).resolve().parent.parent
CAMPAIGNS = sorted((ROOT / "campaigns").glob("*.yaml"))

# A valid campaign. The line numbers asserted below are this text's (1-based).
BASE = """\
name: t
purpose: marketing
recipients:
  file: data/r.csv
  key: customer_id
  columns: {phone: phone, email: email}
channels:
  sms:
    provider: p
    template: ../templates/sms.txt.j2
  email:
    provider: p
    from: shop@example.com
    subject: "Hi {{ first_name }}"
    text: ../templates/email.txt.j2
    list_unsubscribe: {mailto: unsubscribe@example.com}
providers:
  p:
    type: outbox
    dir: ../outbox
    rate: 5/s
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """tmp/campaigns/data/r.csv and tmp/templates/*: what BASE refers to."""
    (tmp_path / "campaigns" / "data").mkdir(parents=True)
    (tmp_path / "campaigns" / "data" / "r.csv").write_text("customer_id,phone,email\n")
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "sms.txt.j2").write_text("Hi. Reply STOP to opt out.\n")
    (tmp_path / "templates" / "email.txt.j2").write_text("Hi {{ first_name }}\n")
    return tmp_path


def write(project: Path, text: str) -> Path:
    path = project / "campaigns" / "c.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def edit(old: str, new: str, text: str = BASE) -> str:
    assert text.count(old) == 1, f"{old!r} is not unique in the campaign text"
    return text.replace(old, new)


def error_of(path: Path, env: Mapping[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_campaign(path, {} if env is None else env)
    return info.value


def assert_error(err: ConfigError, path: Path, line: int | None, field: str | None) -> None:
    assert (err.file, err.line, err.field) == (str(path), line, field)
    assert "\n" not in str(err)
    assert str(err) == err.one_line()
    where = str(path) if line is None else f"{path}:{line}"
    assert str(err) == (f"{where}: {field}: {err.message}" if field else f"{where}: {err.message}")


# --------------------------------------------------------------------------------------------
# The campaigns we ship


def test_there_are_campaigns_to_check() -> None:
    names = {p.name for p in CAMPAIGNS}
    assert {"demo.yaml", "transactional-example.yaml"} <= names


@pytest.mark.parametrize("path", CAMPAIGNS, ids=[p.name for p in CAMPAIGNS])
def test_every_shipped_campaign_loads_without_credentials(path: Path) -> None:
    loaded = load_campaign(path, {})
    campaign = loaded.campaign
    assert loaded.secrets == frozenset()
    assert campaign.recipients.file is not None
    assert campaign.recipients.file.is_file()
    for channel in campaign.channels.enabled():
        assert campaign.channels.get(channel).provider in campaign.providers


def test_demo_campaign_is_what_the_readme_promises() -> None:
    loaded = load_campaign(ROOT / "campaigns" / "demo.yaml", {})
    c = loaded.campaign
    assert c.name == "demo-spring"
    assert c.purpose is Purpose.MARKETING
    assert c.consent_required
    assert c.channels.enabled() == (Channel.SMS, Channel.EMAIL)
    assert c.strategy == "all"
    assert {p.type for p in c.providers.values()} == {"outbox"}
    sms = c.channels.sms
    email = c.channels.email
    assert sms is not None and email is not None
    assert c.providers[sms.provider].price_per_segment == Decimal("0.0079")
    assert c.providers[email.provider].price_per_message == Decimal("0.0004")
    assert c.limits.max_spend == Decimal("5.00")
    assert c.limits.concurrency == 8
    assert sms.template is not None
    assert "Reply STOP to opt out" in sms.template.read_text(encoding="utf-8")
    assert email.list_unsubscribe is not None
    assert email.list_unsubscribe.url == "https://example.com/unsubscribe?t={{ unsubscribe_token }}"
    assert email.list_unsubscribe.mailto == "unsubscribe@example.com"
    assert "{{ first_name }}" in email.subject
    assert email.html is not None and email.text is not None
    assert "unsubscribe" in email.html.read_text(encoding="utf-8").lower()
    assert c.vars == {"brand": "Acme", "offer": "20% off"}
    assert len(c.compliance.suppression_lists) == 1
    assert len(c.compliance.consent_records) == 1


def test_demo_data_has_one_of_each_hard_case() -> None:
    data = ROOT / "campaigns" / "data"
    with open(data / "demo.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    assert 45 <= len(rows) <= 60
    assert set(rows[0]) == {"customer_id", "first_name", "phone", "email", "city"}

    bad: Counter[str] = Counter()
    phones: dict[str, str] = {}
    emails: dict[str, str] = {}
    for row in rows:
        if not row["customer_id"]:
            bad["missing_key"] += 1
        try:
            phones[row["customer_id"]] = normalize_phone(row["phone"], "US")
        except AddressError as exc:
            bad[exc.reason] += 1
        try:
            emails[row["customer_id"]] = normalize_email(row["email"])
        except AddressError as exc:
            bad[exc.reason] += 1
        assert row["email"].endswith(("@example.com", "@example.org", "@example"))
    assert bad == {"missing_key": 1, "bad_phone": 1, "bad_email": 1}
    keys = Counter(r["customer_id"] for r in rows if r["customer_id"])
    assert [k for k, n in keys.items() if n > 1] == [keys.most_common(1)[0][0]]
    assert keys.most_common(1)[0][1] == 2

    names = [r["first_name"] for r in rows]
    assert any(not n.isascii() and n.isalpha() and ord(max(n)) < 0x500 for n in names)  # Zoë
    assert any(any(ord(ch) > 0x2FFF for ch in n) for n in names)  # UCS-2 SMS

    with open(data / "demo-suppressions.csv", encoding="utf-8", newline="") as f:
        suppressed = list(csv.DictReader(f))
    assert [set(s) for s in suppressed] == [{"address", "channel", "reason"}]
    listed = set(phones.values()) | set(emails.values())
    assert normalize_email(suppressed[0]["address"]) in listed

    with open(data / "demo-consents.csv", encoding="utf-8", newline="") as f:
        consents = list(csv.DictReader(f))
    assert set(consents[0]) == {"address", "channel", "purpose", "status", "recorded_at", "source"}
    assert {c["status"] for c in consents} == {"granted"}
    assert {c["purpose"] for c in consents} == {"marketing"}
    assert {c["channel"] for c in consents} == {"sms", "email", "all"}
    consented = {c["address"] for c in consents}
    assert consented <= listed  # stored normalised
    without = {k for k in keys if phones.get(k) not in consented and emails.get(k) not in consented}
    assert len(without) == 1


# --------------------------------------------------------------------------------------------
# What loads


def test_base_campaign_loads(project: Path) -> None:
    loaded = load_campaign(write(project, BASE), {})
    assert isinstance(loaded, LoadedCampaign)
    assert loaded.campaign.providers["p"].rate == 5.0
    assert loaded.line_of("providers", "p", "rate") == 21
    assert loaded.line_of("channels", "email", "no-such-key") == 11


def test_channels_keep_the_order_written(project: Path) -> None:
    sms = "  sms:\n    provider: p\n    template: ../templates/sms.txt.j2\n"
    unsubscribe = "    list_unsubscribe: {mailto: unsubscribe@example.com}\n"
    text = edit(unsubscribe, unsubscribe + sms, edit(sms, ""))
    loaded = load_campaign(write(project, text), {})
    assert loaded.campaign.channels.enabled() == (Channel.EMAIL, Channel.SMS)


@pytest.mark.parametrize(
    ("rate", "per_second"),
    [("30/s", 30.0), ("120/min", 2.0), ("3600/h", 1.0), ("2.5", 2.5), ("0.5/s", 0.5)],
)
def test_rates(project: Path, rate: str, per_second: float) -> None:
    loaded = load_campaign(write(project, edit("rate: 5/s", f"rate: {rate}")), {})
    assert loaded.campaign.providers["p"].rate == pytest.approx(per_second)


def test_relative_paths_are_resolved_against_the_campaign_file(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    text = BASE + "compliance:\n  suppression_lists: [data/r.csv]\n"
    path = write(project, text)
    c = load_campaign(path, {}).campaign
    assert c.recipients.file == project / "campaigns" / "data" / "r.csv"
    assert c.channels.sms is not None and c.channels.email is not None
    assert c.channels.sms.template == project / "templates" / "sms.txt.j2"
    assert c.channels.email.text == project / "templates" / "email.txt.j2"
    outbox = c.providers["p"]
    assert outbox.type == "outbox"
    assert outbox.dir == project / "outbox"  # normalised: no ".." left
    assert c.compliance.suppression_lists == [project / "campaigns" / "data" / "r.csv"]

    # A relative campaign path still gives absolute paths, so a run resumed from another working
    # directory reads the same files.
    monkeypatch.chdir(project)
    c = load_campaign(Path("campaigns") / "c.yaml", {}).campaign
    assert c.recipients.file == project.resolve() / "campaigns" / "data" / "r.csv"
    assert c.channels.sms is not None
    assert c.channels.sms.template == project.resolve() / "templates" / "sms.txt.j2"


def test_a_path_starting_with_tilde_is_in_the_home_directory(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # "~/outbox" was taken as a folder named "~" beside the campaign file: the outbox wrote
    # campaigns/~/outbox/... (and a later "rm -rf ~" there is a disaster), and a template or
    # list under ~ was "file not found: .../campaigns/~/...".
    home = tmp_path / "home"
    (home / "tpl").mkdir(parents=True)
    (home / "tpl" / "sms.txt.j2").write_text("Hi. Reply STOP to opt out.\n")
    monkeypatch.setenv("HOME", str(home))
    text = edit("dir: ../outbox", "dir: ~/outbox", edit("../templates/sms.txt.j2",
                                                         "~/tpl/sms.txt.j2"))
    c = load_campaign(write(project, text), {}).campaign
    assert c.channels.sms is not None and c.channels.sms.template == home / "tpl" / "sms.txt.j2"
    outbox = c.providers["p"]
    assert outbox.type == "outbox" and outbox.dir == home / "outbox"


def test_a_tilde_user_that_does_not_exist_is_a_config_error(project: Path) -> None:
    path = write(project, edit("dir: ../outbox", "dir: ~no-such-user-xyz/outbox"))
    err = error_of(path)
    assert_error(err, path, 20, "providers.p.dir")
    assert "home directory" in err.message


@pytest.mark.parametrize(("old", "new", "line", "field"), [
    ("file: data/r.csv", "file: ''", 4, "recipients.file"),
    ("template: ../templates/sms.txt.j2", "template: ' '", 10, "channels.sms.template"),
    ("dir: ../outbox", "dir: ''", 20, "providers.p.dir"),
])
def test_an_empty_path_is_refused_naming_its_key(
    project: Path, old: str, new: str, line: int, field: str
) -> None:
    """An empty path named the campaign's own folder: "Is a directory", or a template "file not
    found: .../campaigns", far from the key at fault."""
    path = write(project, edit(old, new))
    err = error_of(path)
    assert_error(err, path, line, field)
    assert err.message == "must not be empty"


def test_an_outbox_dir_that_is_a_file_is_refused_when_the_file_loads(project: Path) -> None:
    """`dir: data/r.csv` loaded, passed the dry run, and stopped the real run (exit 6)."""
    path = write(project, edit("dir: ../outbox", "dir: data/r.csv"))
    err = error_of(path)
    assert_error(err, path, 20, "providers.p.dir")
    assert err.message.startswith("not a folder: ")


def test_absolute_paths_are_kept(project: Path) -> None:
    absolute = project / "templates" / "sms.txt.j2"
    path = write(project, edit("../templates/sms.txt.j2", str(absolute)))
    sms = load_campaign(path, {}).campaign.channels.sms
    assert sms is not None and sms.template == absolute


def test_env_values_are_substituted_and_remembered_as_secrets(project: Path) -> None:
    text = BASE + 'vars:\n  token: "Bearer ${API_TOKEN}"\n  brand: ${BRAND}\n'
    loaded = load_campaign(write(project, text), {"API_TOKEN": "tok-123", "BRAND": "Acme"})
    assert loaded.campaign.vars == {"token": "Bearer tok-123", "brand": "Acme"}
    assert loaded.secrets == {"tok-123", "Acme"}


def test_env_values_of_plain_settings_are_not_secrets(project: Path) -> None:
    """A rate or a cap taken from the environment is a setting: redacting it turned every "5" or
    "100" the tool printed (counts, times, spend) into "***". A key, token, password or URL is
    still a secret, and so is any value of a key not known to be a plain setting."""
    text = BASE.replace("    rate: 5/s", '    rate: "${RATE}"') + (
        'limits: {max_spend: "${CAP}", concurrency: "${CONC}"}\nvars: {key: "${KEY}"}\n')
    loaded = load_campaign(write(project, text),
                           {"RATE": "5/s", "CAP": "100", "CONC": "8", "KEY": "k-9"})
    assert loaded.campaign.providers["p"].rate == 5.0
    assert loaded.secrets == {"k-9"}


def test_double_dollar_is_a_literal_dollar(project: Path) -> None:
    text = BASE + 'vars:\n  price: "$$5 off"\n  literal: "$${HOME} and $$$$"\n'
    loaded = load_campaign(write(project, text), {})  # HOME unset: not a reference
    assert loaded.campaign.vars == {"price": "$5 off", "literal": "${HOME} and $$"}
    assert loaded.secrets == frozenset()


# --------------------------------------------------------------------------------------------
# Each kind of mistake: one line, with the file, the line and the key path


def test_unknown_key_names_the_misspelling_not_the_missing_key(project: Path) -> None:
    path = write(project, edit("recipients:", "recipents:"))
    err = error_of(path)
    assert_error(err, path, 3, "recipents")
    assert err.message == "unknown key (and 1 more problem)"
    assert str(err) == f"{path}:3: recipents: unknown key (and 1 more problem)"
    assert err.exit_code is ExitCode.USAGE


def test_unknown_nested_key(project: Path) -> None:
    path = write(project, edit("    rate: 5/s", "    rate: 5/s\n    api_key: k"))
    err = error_of(path)
    assert str(err) == f"{path}:22: providers.p.api_key: unknown key"


def test_unknown_channel(project: Path) -> None:
    path = write(project, edit("  email:", "  emial:"))
    assert str(error_of(path)) == f"{path}:11: channels.emial: unknown key"


def test_missing_required_key(project: Path) -> None:
    path = write(project, edit("  key: customer_id\n", ""))
    err = error_of(path)
    assert str(err) == f"{path}:3: recipients.key: required key is missing"


def test_missing_top_level_key_points_at_the_top(project: Path) -> None:
    path = write(project, edit("purpose: marketing\n", ""))
    assert str(error_of(path)) == f"{path}:1: purpose: required key is missing"


def test_wrong_type(project: Path) -> None:
    path = write(project, BASE + "limits: {concurrency: lots}\n")
    err = error_of(path)
    assert_error(err, path, 22, "limits.concurrency")
    assert "valid integer" in err.message


def test_wrong_type_of_section(project: Path) -> None:
    path = write(project, edit("  columns: {phone: phone, email: email}", "  columns: phone"))
    err = error_of(path)
    assert_error(err, path, 6, "recipients.columns")


def test_bad_rate(project: Path) -> None:
    path = write(project, edit("rate: 5/s", "rate: fast"))
    err = error_of(path)
    assert str(err) == f"{path}:21: providers.p.rate: a rate looks like 30/s, 100/min or 3600/h"


def test_zero_rate(project: Path) -> None:
    path = write(project, edit("rate: 5/s", "rate: 0/s"))
    assert str(error_of(path)) == f"{path}:21: providers.p.rate: must be greater than 0"


def test_unknown_provider_type(project: Path) -> None:
    path = write(project, edit("type: outbox", "type: carrier-pigeon"))
    err = error_of(path)
    assert_error(err, path, 19, "providers.p.type")
    assert "'carrier-pigeon'" in err.message and "'outbox'" in err.message


def test_provider_type_that_cannot_carry_the_channel(project: Path) -> None:
    path = write(project, edit("    type: outbox\n    dir: ../outbox\n",
                               "    type: sendgrid\n    api_key: k\n"))
    err = error_of(path)
    assert err.field == "channels.sms.provider"
    assert "cannot send sms" in err.message


def test_provider_without_type(project: Path) -> None:
    path = write(project, edit("    type: outbox\n", ""))
    assert str(error_of(path)) == f"{path}:18: providers.p.type: required key is missing"


def test_channel_naming_a_missing_provider(project: Path) -> None:
    path = write(project, edit("  sms:\n    provider: p", "  sms:\n    provider: twilio"))
    err = error_of(path)
    assert str(err) == (
        f"{path}:9: channels.sms.provider: no provider named 'twilio' (providers: p)"
    )


def test_missing_template_file(project: Path) -> None:
    path = write(project, edit("sms.txt.j2", "nope.txt.j2"))
    err = error_of(path)
    missing = project / "templates" / "nope.txt.j2"
    assert str(err) == f"{path}:10: channels.sms.template: file not found: {missing}"


def test_missing_file_in_a_list_names_the_item(project: Path) -> None:
    text = BASE + "compliance:\n  suppression_lists:\n    - data/r.csv\n    - data/gone.csv\n"
    path = write(project, text)
    err = error_of(path)
    assert_error(err, path, 25, "compliance.suppression_lists.1")
    assert err.message == f"file not found: {project / 'campaigns' / 'data' / 'gone.csv'}"


def test_unset_env_variable_is_named_at_the_line_of_its_reference(project: Path) -> None:
    text = BASE + 'vars:\n  brand: Acme\n  token: "Bearer ${API_TOKEN}"\n'
    path = write(project, text)
    err = error_of(path, {"OTHER": "x"})
    assert str(err) == f"{path}:24: vars.token: environment variable API_TOKEN is not set"


def test_unset_env_variable_in_a_list_item(project: Path) -> None:
    text = BASE + "compliance:\n  suppression_lists:\n    - data/r.csv\n    - ${LISTS}/x.csv\n"
    path = write(project, text)
    err = error_of(path)
    assert str(err) == (
        f"{path}:25: compliance.suppression_lists.1: environment variable LISTS is not set"
    )


@pytest.mark.parametrize("ref", ["${API_TOKEN:-}", "${API_TOKEN:-dev-token}", "${API_TOKEN-x}",
                                 "${API_TOKEN:?set it}", "${API_TOKEN:=x}", "${API_TOKEN:+x}"])
def test_a_shell_default_in_an_env_reference_is_refused(project: Path, ref: str) -> None:
    # Shell and docker-compose spellings were left as they are, set or not: the literal text
    # "${API_TOKEN:-}" went out as the credential (refused mid-run, exit 6) or the value.
    path = write(project, BASE + f'vars:\n  brand: Acme\n  token: "Bearer {ref}"\n')
    for env in ({}, {"API_TOKEN": "abc-secret-123"}):
        err = error_of(path, env)
        assert_error(err, path, 24, "vars.token")
        assert "API_TOKEN" in err.message and "abc-secret-123" not in str(err)


def test_dollar_before_a_jinja_expression_is_kept(project: Path) -> None:
    path = write(project, BASE + 'vars:\n  price: "${{ amount }} or $${NOT_ENV}"\n')
    assert load_campaign(path, {}).campaign.vars == {"price": "${{ amount }} or ${NOT_ENV}"}


@pytest.mark.parametrize(("old", "new", "shown"), [
    ("name: t\n", 'name: t\n"colour\\nscheme": 1\n', "colour\\nscheme: unknown key"),
    ("name: t\n", 'name: t\n"pur\\rpose": 1\n', "pur\\rpose: unknown key"),
    ("type: outbox", 'type: "out\\nbox"', "Input tag 'out\\nbox'"),
])
def test_a_line_break_in_a_key_or_value_is_shown_escaped(
    project: Path, old: str, new: str, shown: str
) -> None:
    # The error line printed the key or the value as it is: a newline split it in two, a CR
    # sent the cursor back over the file name.
    err = error_of(write(project, edit(old, new)))
    assert "\n" not in str(err) and "\r" not in str(err)
    assert shown in str(err)


def test_empty_env_variable_is_set(project: Path) -> None:
    path = write(project, BASE + 'vars:\n  suffix: "${SUFFIX}"\n')
    loaded = load_campaign(path, {"SUFFIX": ""})
    assert loaded.campaign.vars == {"suffix": ""}
    assert loaded.secrets == frozenset()


SECRET = "hunter2-xyz"


@pytest.mark.parametrize(
    ("old", "new", "line", "field"),
    [
        ("type: outbox", 'type: "${SECRET}"', 19, "providers.p.type"),
        ("../templates/sms.txt.j2", "${SECRET}", 10, "channels.sms.template"),
        ("../templates/sms.txt.j2", "../templates/${SECRET}.j2", 10, "channels.sms.template"),
        (
            "  sms:\n    provider: p",
            '  sms:\n    provider: "${SECRET}"',
            9,
            "channels.sms.provider",
        ),
        ("rate: 5/s", "rate: ${SECRET}", 21, "providers.p.rate"),
    ],
)
def test_secret_never_appears_in_an_error(
    project: Path, monkeypatch: pytest.MonkeyPatch, old: str, new: str, line: int, field: str
) -> None:
    monkeypatch.setenv("SECRET", SECRET)
    path = write(project, edit(old, new))
    with pytest.raises(ConfigError) as info:
        load_campaign(path)  # from os.environ
    err = info.value
    assert_error(err, path, line, field)
    assert SECRET not in str(err)
    assert SECRET not in repr(err.args)
    assert SECRET not in err.message


def test_secret_is_redacted_where_the_message_would_echo_it(project: Path) -> None:
    path = write(project, edit("type: outbox", 'type: "${SECRET}"'))
    err = error_of(path, {"SECRET": SECRET})
    assert "'***'" in err.message


def test_yaml_syntax_error_gives_the_line(project: Path) -> None:
    path = write(project, edit("  key: customer_id", "  key: customer_id: oops"))
    err = error_of(path)
    assert_error(err, path, 5, None)
    assert err.message.startswith("not valid YAML: ")


def test_yaml_unclosed_bracket(project: Path) -> None:
    path = write(
        project, edit("  columns: {phone: phone, email: email}", "  columns: {phone: phone")
    )
    err = error_of(path)
    assert err.line is not None and err.line >= 6
    assert err.field is None
    assert err.message.startswith("not valid YAML: ")


@pytest.mark.parametrize("text", ["- name: t\n- purpose: marketing\n", "just words\n", "42\n"])
def test_not_a_mapping_at_the_top(project: Path, text: str) -> None:
    path = write(project, text)
    err = error_of(path)
    assert str(err) == f"{path}:1: a campaign file is a mapping of keys (name, purpose, ...)"


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n"])
def test_empty_file(project: Path, text: str) -> None:
    path = write(project, text)
    err = error_of(path)
    assert_error(err, path, 1, None)
    assert "mapping" in err.message


def test_missing_campaign_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    assert str(error_of(path)) == f"{path}: campaign file not found"


def test_marketing_email_needs_list_unsubscribe(project: Path) -> None:
    path = write(project, edit("    list_unsubscribe: {mailto: unsubscribe@example.com}\n", ""))
    err = error_of(path)
    assert_error(err, path, 11, "channels.email")
    assert "list_unsubscribe" in err.message


def test_transactional_email_does_not_need_list_unsubscribe(project: Path) -> None:
    text = edit("    list_unsubscribe: {mailto: unsubscribe@example.com}\n", "")
    text = edit("purpose: marketing", "purpose: transactional", text)
    c = load_campaign(write(project, text), {}).campaign
    assert c.purpose is Purpose.TRANSACTIONAL
    assert not c.consent_required


def test_list_unsubscribe_url_must_be_https(project: Path) -> None:
    path = write(
        project,
        edit("{mailto: unsubscribe@example.com}", "{url: 'http://example.com/u?t=x'}"),
    )
    err = error_of(path)
    assert_error(err, path, 16, "channels.email.list_unsubscribe")
    assert "https" in err.message


def test_header_with_a_line_break(project: Path) -> None:
    headers = '    headers:\n      X-Tag: "spring\\r\\nBcc: everyone@example.com"\n'
    path = write(project, edit("    subject:", headers + "    subject:"))
    err = error_of(path)
    assert (
        str(err) == f"{path}:15: channels.email.headers.X-Tag: header X-Tag contains a line break"
    )


@pytest.mark.parametrize(
    ("provider", "field"),
    [
        ("  hook:\n    type: webhook\n    url: https://example.com/h\n    headers:\n"
         "      Authorization: \"Bearer ${TOKEN}\"\n", "providers.hook.headers.Authorization"),
        ("  hook:\n    type: sendgrid\n    api_key: ${TOKEN}\n", "providers.hook.api_key"),
        ("  hook:\n    type: fcm\n    project_id: p\n    access_token: ${TOKEN}\n",
         "providers.hook.access_token"),
        ("  hook:\n    type: slack\n    url: https://hooks.example.com/${TOKEN}\n",
         "providers.hook.url"),
    ],
)
def test_a_secret_read_with_its_newline_is_refused_at_load(
    project: Path, provider: str, field: str
) -> None:
    """`TOKEN=$(cat token.txt)` strips the newline, an env file or a secrets mount may not. In a
    header or a URL it made the HTTP client refuse every request mid-run (exit 1, the rows in
    doubt though nothing left): it is bad input, exit 2, named, with the value not shown."""
    path = write(project, BASE + provider)
    err = error_of(path, {"TOKEN": "tok-0123456789\n"})
    assert err.field == field
    assert "line break" in err.message
    assert "tok-0123456789" not in str(err)


@pytest.mark.parametrize(
    ("provider", "field"),
    [
        ("  hook:\n    type: twilio\n    base_url: ${URL}\n    account_sid: AC" + "0" * 32
         + "\n    auth_token: t\n    from: '+15005550006'\n", "providers.hook.base_url"),
        ("  hook:\n    type: sendgrid\n    base_url: ${URL}\n    api_key: k\n",
         "providers.hook.base_url"),
        ("  hook:\n    type: fcm\n    project_id: p\n    access_token: t\n"
         "    token_url: ${URL}/token\n", "providers.hook.token_url"),
    ],
)
def test_a_base_or_token_url_read_with_its_newline_is_refused_at_load(
    project: Path, provider: str, field: str
) -> None:
    """`base_url: ${TWILIO_BASE_URL}` (a regional or proxy endpoint from an env file) with its
    newline passed the load: httpx refused it when the run built its client, `campaign send`
    said 'internal error ... (a bug: please report it)', exit 1, and left the run `running`."""
    path = write(project, BASE + provider)
    err = error_of(path, {"URL": "https://api.example.com\n"})
    assert err.field == field
    assert "line break" in err.message
    assert "api.example.com" not in str(err)
    # httpx refuses every control character in a URL, not only line breaks: a tab, an escape.
    for control in ("\t", "\x1b", "\x7f"):
        err = error_of(path, {"URL": f"https://api.example.com{control}"})
        assert err.field == field and "control character" in err.message


@pytest.mark.parametrize(
    ("provider", "field"),
    [
        ("  hook:\n    type: slack\n    url: ${URL}\n", "providers.hook.url"),
        ("  hook:\n    type: webhook\n    url: ${URL}\n", "providers.hook.url"),
        ("  hook:\n    type: sendgrid\n    base_url: ${URL}\n    api_key: k\n",
         "providers.hook.base_url"),
    ],
)
@pytest.mark.parametrize("url", ["https://hooks.example.com:99999/services/T0/B0/s3cr3tpath",
                                 "https://hooks.exa\\mple.com/services/T0/B0/s3cr3tpath",
                                 "https://[::1/services/T0/B0/s3cr3tpath",
                                 "https://hooks..example.com/services/T0/B0/s3cr3tpath"])
def test_a_provider_url_the_http_client_cannot_send_to_is_refused_at_load(
    project: Path, provider: str, field: str, url: str
) -> None:
    """A Slack or webhook URL (or a base_url) with a port past 65535, a backslash in the host, an
    unclosed IPv6 bracket or an empty host label passed the load. The HTTP client refused it
    when the first message was sent: a ValueError, no provider's answer, so that message was
    left in doubt though nothing left and the run stopped with exit 1 (an unclosed bracket:
    "internal error ... a bug", exit 1). It is a configuration error: exit 2, nothing sent,
    the field named, the URL (its path is Slack's secret) not shown."""
    path = write(project, BASE + provider)
    err = error_of(path, {"URL": url})
    assert err.field == field
    assert "s3cr3tpath" not in str(err)


@pytest.mark.parametrize(
    ("provider", "field"),
    [
        ("  hook:\n    type: twilio\n    account_sid: AC" + "0" * 32
         + "\n    auth_token: ${TOKEN}\n    from: '+15005550006'\n",
         "providers.hook.auth_token"),
        ("  hook:\n    type: webhook\n    url: https://example.com/h\n    secret: ${TOKEN}\n",
         "providers.hook.secret"),
    ],
)
def test_a_signing_key_or_basic_auth_token_read_with_its_newline_is_refused_at_load(
    project: Path, provider: str, field: str
) -> None:
    """README: 'a key, token ... that still ends in a line break is refused when the file is
    loaded'. Twilio's auth token (in Basic auth) and the webhook's signing secret were not: the
    run went out and Twilio refused every request (exit 6, 'refused our credentials', for a
    token that looks right), or every webhook went with a signature its receiver cannot check."""
    path = write(project, BASE + provider)
    err = error_of(path, {"TOKEN": "tok-0123456789\n"})
    assert err.field == field
    assert "line break" in err.message
    assert "tok-0123456789" not in str(err)


@pytest.mark.parametrize(
    ("provider", "field"),
    [
        ("  hook:\n    type: sendgrid\n    api_key: ${TOKEN}\n", "providers.hook.api_key"),
        ("  hook:\n    type: fcm\n    project_id: p\n    access_token: ${TOKEN}\n",
         "providers.hook.access_token"),
        ("  hook:\n    type: webhook\n    url: https://example.com/h\n    headers:\n"
         "      Authorization: ${TOKEN}\n", "providers.hook.headers.Authorization"),
    ],
)
@pytest.mark.parametrize("stray", ["\u200b", "\u00a0", "\u00e9", "\x01", "\x1b"])
def test_a_header_value_with_a_character_no_header_can_carry_is_refused_at_load(
    project: Path, provider: str, field: str, stray: str
) -> None:
    """A key pasted from a web page often brings a zero-width or no-break space with it. In a
    header (SendGrid's and FCM's bearer token, a webhook's headers) httpx could not encode it:
    `campaign send` said "internal error: UnicodeEncodeError ... (a bug: please report it)",
    exit 1; and aiohttp refuses a control character mid-run (a ValueError: the message in
    doubt though nothing left). Bad configuration: exit 2 at load, the field named, the value
    not shown."""
    path = write(project, BASE + provider)
    err = error_of(path, {"TOKEN": f"SG.tok-0123{stray}456789"})
    assert err.field == field
    assert "tok-0123" not in str(err)


def test_a_webhook_header_name_must_be_a_header_name(project: Path) -> None:
    provider = ("  hook:\n    type: webhook\n    url: https://example.com/h\n    headers:\n"
                "      \"X Tag\": spring\n")
    err = error_of(write(project, BASE + provider))
    assert err.field == "providers.hook.headers.X Tag"
    assert err.message == "not a valid header field name"


def test_header_with_a_bad_name(project: Path) -> None:
    headers = '    headers:\n      "X Tag": spring\n'
    path = write(project, edit("    subject:", headers + "    subject:"))
    err = error_of(path)
    assert str(err) == f"{path}:15: channels.email.headers.X Tag: not a valid header field name"


def test_both_body_and_template(project: Path) -> None:
    text = edit(
        "    template: ../templates/sms.txt.j2\n",
        "    template: ../templates/sms.txt.j2\n    body: Hi\n",
    )
    path = write(project, text)
    err = error_of(path)
    assert str(err) == (
        f"{path}:8: channels.sms: give exactly one of body (inline) or template (a file)"
    )


def test_neither_body_nor_template(project: Path) -> None:
    path = write(project, edit("    template: ../templates/sms.txt.j2\n", ""))
    err = error_of(path)
    assert_error(err, path, 8, "channels.sms")


def test_channel_needs_its_address_column(project: Path) -> None:
    path = write(project, edit("{phone: phone, email: email}", "{email: email}"))
    err = error_of(path)
    assert str(err) == f"{path}:6: recipients.columns: channel sms needs recipients.columns.phone"


def test_bad_campaign_name(project: Path) -> None:
    path = write(project, edit("name: t", "name: 'spring sale'"))
    err = error_of(path)
    assert_error(err, path, 1, "name")


def test_several_problems_report_the_first_and_count_the_rest(project: Path) -> None:
    text = edit("rate: 5/s", "rate: fast", edit("  key: customer_id\n", "  key: ''\n"))
    path = write(project, text)
    err = error_of(path)
    assert err.line == 5 and err.field == "recipients.key"
    assert err.message.endswith("(and 1 more problem)")


def test_duplicate_key_is_refused_not_silently_overwritten(project: Path) -> None:
    # YAML keeps the last of two equal keys: a second `consent:` or `price_per_segment:` pasted
    # below the first would silently change the campaign. Refuse it, at the second key's line.
    path = write(project, BASE + "    rate: 50/s\n")
    err = error_of(path)
    assert_error(err, path, 22, "providers.p.rate")
    assert "duplicate key" in err.message and "line 21" in err.message
    top = write(project, BASE + "purpose: transactional\n")
    assert_error(error_of(top), top, 22, "purpose")


def test_merge_keys_may_be_overridden(project: Path) -> None:
    # `<<: *anchor` then an explicit key is YAML's way to override a shared value: no duplicate.
    text = edit("providers:\n  p:\n    type: outbox\n",
                "shared: &shared {type: outbox, rate: 1/s}\nproviders:\n  p:\n    <<: *shared\n")
    text = text.replace("shared: &shared", "vars:\n  shared: &shared")
    loaded = load_campaign(write(project, text), {})
    assert loaded.campaign.providers["p"].rate == 5.0


@pytest.mark.parametrize("style", ["flow list", "flow mapping", "block mapping"])
def test_very_deep_nesting_is_an_input_error_not_a_crash(project: Path, style: str) -> None:
    # PyYAML composes recursively: thousands of levels raised RecursionError (exit 1, "a bug").
    if style == "flow list":
        deep = "  deep: " + "[" * 3000 + "x" + "]" * 3000 + "\n"
    elif style == "flow mapping":
        deep = "  deep: " + "{a: " * 3000 + "x" + "}" * 3000 + "\n"
    else:
        deep = "".join(f"{'  ' * (i + 1)}k:\n" for i in range(3000)) + "  " * 3001 + "x\n"
    path = write(project, BASE + "vars:\n" + deep)
    err = error_of(path)
    assert err.line is not None and 23 <= err.line
    assert "nested more than" in err.message


def test_nesting_within_the_limit_loads(project: Path) -> None:
    path = write(project, BASE + "vars:\n  deep: " + "[" * 40 + "x" + "]" * 40 + "\n")
    loaded = load_campaign(path, {})
    value = loaded.campaign.vars["deep"]
    for _ in range(40):
        value = value[0]
    assert value == "x"


def test_alias_bomb_is_refused_quickly(project: Path) -> None:
    # "Billion laughs": nine levels of nine aliases each are 9**9 strings once expanded. Loading
    # walked (and copied) every one: gigabytes of memory and minutes, or a crash.
    levels = ["  l0: &l0 [" + ", ".join(["lol"] * 9) + "]"]
    for n in range(1, 9):
        levels.append(f"  l{n}: &l{n} [" + ", ".join([f"*l{n - 1}"] * 9) + "]")
    path = write(project, BASE + "vars:\n" + "\n".join(levels) + "\n")
    started = time.monotonic()
    err = error_of(path)
    assert time.monotonic() - started < 5
    assert err.line is not None and 24 <= err.line <= 31
    assert err.field is not None and err.field.startswith("vars.l")
    assert "aliases" in err.message


def test_aliases_within_reason_load(project: Path) -> None:
    text = BASE + "vars:\n  base: &base {a: 1, b: [1, 2, 3]}\n" + "".join(
        f"  v{i}: *base\n" for i in range(50)
    )
    loaded = load_campaign(write(project, text), {})
    assert loaded.campaign.vars["v49"] == {"a": 1, "b": [1, 2, 3]}


@pytest.mark.parametrize("rate", [".nan", ".inf", "-.inf", ".NaN"])
def test_rate_must_be_a_finite_number(project: Path, rate: str) -> None:
    # `.nan` passed the "greater than 0" check (every comparison with NaN is false) and `.inf`
    # passed it too: --dry-run said all was well, then the real send died in the pacer with
    # "internal error: ValueError: cannot convert float NaN to integer" (exit 1).
    path = write(project, edit("rate: 5/s", f"rate: {rate}"))
    err = error_of(path)
    assert_error(err, path, 21, "providers.p.rate")


def test_bytes_that_are_not_utf8_are_named_with_their_line(project: Path) -> None:
    path = project / "campaigns" / "c.yaml"
    path.write_bytes(BASE.replace("shop@example.com", "caf\xe9@example.com").encode("latin-1"))
    err = error_of(path)
    assert_error(err, path, 13, None)
    assert "not UTF-8" in err.message and "0xe9" in err.message


@pytest.mark.parametrize(("value", "kind"), [("no", "a boolean"), ("+15551230000", "a number")])
def test_a_yaml_1_1_surprise_says_to_quote_the_value(project: Path, value: str, kind: str) -> None:
    # `name: no` is False and `from: +15551230000` an int to YAML 1.1: "Input should be a valid
    # string" alone leaves the operator staring at a value that looks like a string.
    path = write(project, edit("name: t", f"name: {value}"))
    err = error_of(path)
    assert_error(err, path, 1, "name")
    assert f"YAML read this value as {kind}: write it in quotes" in err.message


@pytest.mark.parametrize("rate", ["0.0000001", "1/h", "0.0009/s"])
def test_a_rate_below_one_message_per_1000_seconds_is_refused(project: Path, rate: str) -> None:
    # As --rate's floor: `rate: 0.0000001` sent one message and then waited for months.
    path = write(project, edit("rate: 5/s", f"rate: {rate}"))
    err = error_of(path)
    assert_error(err, path, 21, "providers.p.rate")
    assert "at least 0.001/s" in err.message


def test_the_slowest_rate_allowed_loads(project: Path) -> None:
    loaded = load_campaign(write(project, edit("rate: 5/s", "rate: 3.6/h")), {})
    assert loaded.campaign.providers["p"].rate == pytest.approx(0.001)


TWILIO = (
    "  tw:\n"
    "    type: twilio\n"
    "    account_sid: AC0123456789abcdef0123456789abcdef\n"
    "    auth_token: t0ken\n"
    "    from: '+12015550100'\n"
)


@pytest.mark.parametrize("url", [
    "hooks.example.com/twilio",  # no scheme
    "ftp://hooks.example.com/twilio",
    "https://",
    "https:///twilio",
    "https://hooks_1.example.com/twilio",  # Twilio refuses underscores in the host name
    "https://hooks.example.com/a b",
    "https://hooks.example.com/" + "x" * 4000,  # Twilio's limit is 4000 characters
])
def test_a_status_callback_twilio_would_refuse_is_a_config_error(project: Path, url: str) -> None:
    # Twilio answers 21609 (Invalid 'StatusCallback') to every message that carries such a URL:
    # without this check the whole list ended `failed`, one request at a time.
    path = write(project, BASE + TWILIO + f"    status_callback: '{url}'\n")
    err = error_of(path)
    assert_error(err, path, 27, "providers.tw.status_callback")
    assert "http:// or https:// URL" in err.message


@pytest.mark.parametrize("url", [
    "https://hooks.example.com/twilio",
    "http://127.0.0.1:8080/cb?campaign=spring%20sale&x=1",
    "https://hooks.example.com",
])
def test_a_status_callback_twilio_takes_loads(project: Path, url: str) -> None:
    loaded = load_campaign(write(project, BASE + TWILIO + f"    status_callback: '{url}'\n"), {})
    assert loaded.campaign.providers["tw"].status_callback == url  # type: ignore[union-attr]


def _push_campaign(data_key: str, provider: str = "f") -> str:
    text = edit("  columns: {phone: phone, email: email}",
                "  columns: {phone: phone, email: email, push_token: token}")
    text = edit("providers:\n",
                "  push:\n"
                f"    provider: {provider}\n"
                "    title: Sale\n"
                "    body: Hi {{ first_name }}\n"
                "    data:\n"
                "      screen: sale\n"
                f"      '{data_key}': x\n"
                "providers:\n", text)
    return text + ("  f:\n"
                   "    type: fcm\n"
                   "    project_id: shop-app\n"
                   "    access_token: tok\n")


@pytest.mark.parametrize("key", ["from", "message_type", "google.sent_time", "googleId",
                                 "gcm.notification.title", "gcmx", ""])
def test_a_data_key_fcm_reserves_is_a_config_error(project: Path, key: str) -> None:
    # FCM answers 400 INVALID_ARGUMENT to every message whose data holds a reserved key ("from",
    # "message_type", anything starting with "google" or "gcm"): without this check the whole
    # push list ended `failed`, one request at a time.
    path = write(project, _push_campaign(key))
    err = error_of(path)
    assert_error(err, path, 23, f"channels.push.data.{key}")
    assert "FCM" in err.message and "reserve" in err.message


def test_a_data_key_fcm_reserves_is_fine_elsewhere_and_others_load(project: Path) -> None:
    load_campaign(write(project, _push_campaign("from", provider="p")), {})  # the outbox
    loaded = load_campaign(write(project, _push_campaign("sender")), {})
    assert loaded.campaign.channels.push is not None
    assert loaded.campaign.channels.push.data == {"screen": "sale", "sender": "x"}


def test_error_redaction_hides_a_secret_that_contains_another_and_skips_tiny_values(
    project: Path,
) -> None:
    """The message of a campaign error is redacted as every other output is (`errors.redact`):
    the longest secret first, so a password that contains the user name is not shown as
    "***-2026-secret", and values shorter than three characters are not secrets, so a one-letter
    `${VAR}` does not turn the message into "Inp***t tag ..."."""
    text = edit("type: outbox", 'type: "${SMTP_PASSWORD}"')
    text = edit("from: shop@example.com", 'from: "${SMTP_USER}@example.com"', text)
    text += 'vars: {initial: "${INITIAL}"}\n'
    path = write(project, text)
    err = error_of(path, {"SMTP_PASSWORD": "mailer-2026-secret", "SMTP_USER": "mailer",
                          "INITIAL": "e"})
    assert "2026" not in err.message
    assert "'***'" in err.message
    assert "does not match any of the expected tags" in err.message


@pytest.mark.parametrize(("written", "env", "per_second"), [
    ("${RATE}", {"RATE": "50"}, 50.0),
    ('"${RATE}"', {"RATE": "2.5"}, 2.5),
    ('"12"', {}, 12.0),
])
def test_a_rate_that_is_a_bare_number_in_a_string_is_per_second(
    project: Path, written: str, env: dict[str, str], per_second: float
) -> None:
    """README: a rate is `30/s`, `100/min`, `3600/h` "or a number per second", and `rate` is a
    plain setting meant to come from `${ENV}`. A value from the environment is always a string:
    `rate: ${RATE}` with RATE=50 was refused ("a rate looks like 30/s, ...") while the same
    number written in the file loaded."""
    loaded = load_campaign(write(project, edit("rate: 5/s", f"rate: {written}")), env)
    assert loaded.campaign.providers["p"].rate == pytest.approx(per_second)
    assert not loaded.secrets


@pytest.mark.parametrize(
    "value",
    ["!!int x", "!!int 0b2", "!!float x", "!!bool maybe", "!!timestamp 2020-13-45",
     "!!timestamp soon"],
)
def test_a_yaml_tag_that_does_not_fit_its_value_is_an_input_error(
    project: Path, value: str
) -> None:
    # PyYAML's constructors raised ValueError, KeyError or AttributeError for these: exit 1,
    # "internal error ... a bug", instead of the line of the value.
    path = write(project, BASE + "vars:\n  a: 1\n  b: " + value + "\n")
    err = error_of(path)
    assert_error(err, path, 24, None)
    assert err.message.startswith("not valid YAML: ")
    assert value.split()[0] in err.message
