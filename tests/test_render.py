"""Rendering: the sandbox, escaping, per-channel rules, compile-time errors and email bytes."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from datetime import datetime, timedelta, timezone
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from campaign_cli.config import Campaign, load_campaign
from campaign_cli.errors import ConfigError
from campaign_cli.models import (
    Channel,
    EmailContent,
    OutboundMessage,
    PushContent,
    Recipient,
    SmsContent,
    WebhookContent,
)
from campaign_cli.render.email import build_email, make_message_id
from campaign_cli.render.engine import (
    PUSH_PAYLOAD_LIMIT,
    SMS_BODY_LIMIT,
    Renderer,
    RenderError,
    content_hash,
    cost_of,
    unsubscribe_token,
)

SECRET = "test-secret"
DATE = datetime(2026, 3, 1, 9, 30, tzinfo=timezone(timedelta(hours=1)))


def campaign(
    tmp_path: Path,
    channels: dict[str, Any],
    *,
    purpose: str = "transactional",
    vars: dict[str, Any] | None = None,
    files: dict[str, str] | None = None,
    providers: dict[str, Any] | None = None,
) -> Campaign:
    for name, text in (files or {}).items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    data = {
        "name": "spring-sale",
        "purpose": purpose,
        "recipients": {
            "key": "id",
            "columns": {"phone": "phone", "email": "email", "push_token": "token"},
        },
        "channels": {name: {"provider": "box", **config} for name, config in channels.items()},
        "providers": {"box": {"type": "outbox", "dir": "out"}, **(providers or {})},
        "vars": vars or {},
    }
    return Campaign.model_validate(data, context={"base_dir": tmp_path})


def person(**fields: str) -> Recipient:
    values = {"id": "c1", "first_name": "Ann", **fields}
    return Recipient(row=7, line=8, key=values["id"], fields=values, addresses={})


def render(
    c: Campaign, channel: Channel, who: Recipient | None = None, address: str = "addr"
) -> Any:
    return Renderer.compile(c, SECRET).render(channel, who or person(), address)


# --------------------------------------------------------------------------------------------
# Context and the sandbox


def test_context_names_and_precedence(tmp_path: Path) -> None:
    body = (
        "{{ greeting }} {{ first_name }} row={{ row }} key={{ recipient.key }} "
        "to={{ recipient.address }} c={{ campaign.name }}/{{ campaign.purpose }} "
        "v={{ vars.first_name }} shadow={{ campaign_x }}"
    )
    c = campaign(
        tmp_path,
        {"webhook": {"body": body}},
        vars={"greeting": "Hello", "first_name": "FromVars", "campaign_x": "var"},
    )
    who = person(campaign_x="field", row="field-row", vars="field-vars")
    content = render(c, Channel.WEBHOOK, who, "https://hook.example/x")
    assert content == WebhookContent(
        "Hello Ann row=7 key=c1 to=https://hook.example/x c=spring-sale/transactional "
        "v=FromVars shadow=field"
    )


def test_undefined_is_a_render_error_naming_the_template(tmp_path: Path) -> None:
    c = campaign(tmp_path, {"sms": {"body": "Hi {{ nickname }}"}})
    with pytest.raises(RenderError) as info:
        render(c, Channel.SMS)
    assert str(info.value) == "sms body: 'nickname' is undefined"
    assert info.value.template == "sms body"


def test_undefined_in_a_condition_is_an_error_too(tmp_path: Path) -> None:
    c = campaign(tmp_path, {"sms": {"body": "{% if vip %}VIP{% endif %} hello"}})
    with pytest.raises(RenderError, match="'vip' is undefined"):
        render(c, Channel.SMS)


def test_render_error_names_the_line_of_a_multiline_template(tmp_path: Path) -> None:
    c = campaign(
        tmp_path,
        {"email": {"from": "shop@example.com", "subject": "Hi", "text": "body.txt"}},
        files={"body.txt": "Hello {{ first_name }},\n\nYour order:\n{{ order_id }}\n"},
    )
    with pytest.raises(RenderError) as info:
        render(c, Channel.EMAIL)
    assert str(info.value) == "email text (line 4): 'order_id' is undefined"


def test_python_errors_in_expressions_are_render_errors(tmp_path: Path) -> None:
    c = campaign(tmp_path, {"sms": {"body": "{{ 1 // (first_name | length - 3) }}"}})
    with pytest.raises(RenderError, match="sms body: ZeroDivisionError"):
        render(c, Channel.SMS)


@pytest.mark.parametrize(
    "body",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ first_name.__class__ }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ (1).__class__.__base__ }}",
    ],
)
def test_sandbox_blocks_attribute_escapes(tmp_path: Path, body: str) -> None:
    c = campaign(tmp_path, {"sms": {"body": body}})
    with pytest.raises(RenderError, match="^sms body: access to attribute .* is unsafe"):
        render(c, Channel.SMS)


def test_templates_cannot_mutate_shared_vars(tmp_path: Path) -> None:
    c = campaign(
        tmp_path,
        {"sms": {"body": "{{ vars.tags.append('x') }}{{ vars.tags }}"}},
        vars={"tags": ["a"]},
    )
    renderer = Renderer.compile(c, SECRET)
    with pytest.raises(RenderError, match="unsafe"):
        renderer.render(Channel.SMS, person(), "+12015550100")
    assert c.vars == {"tags": ["a"]}


def test_set_in_one_render_does_not_leak_into_the_next(tmp_path: Path) -> None:
    body = "{% if first_name == 'Ann' %}{% set note = 'first' %}{% endif %}{{ note | default('none') }}"
    c = campaign(tmp_path, {"webhook": {"body": body}})
    renderer = Renderer.compile(c, SECRET)
    assert renderer.render(Channel.WEBHOOK, person(), "u") == WebhookContent("first")
    other = person(id="c2", first_name="Bob")
    assert renderer.render(Channel.WEBHOOK, other, "u") == WebhookContent("none")


def test_html_is_autoescaped_but_text_is_not(tmp_path: Path) -> None:
    c = campaign(
        tmp_path,
        {
            "email": {
                "from": "shop@example.com",
                "subject": "Hi {{ first_name }}",
                "text": "t.txt",
                "html": "h.html",
            },
            "sms": {"body": "Hi {{ first_name }}"},
        },
        files={"t.txt": "Hi {{ first_name }}\n", "h.html": "<p>Hi {{ first_name }}</p>\n"},
    )
    who = person(first_name="<script>alert(1)</script>&")
    email = render(c, Channel.EMAIL, who)
    assert email.html == "<p>Hi &lt;script&gt;alert(1)&lt;/script&gt;&amp;</p>"
    assert email.text == "Hi <script>alert(1)</script>&"
    assert email.subject == "Hi <script>alert(1)</script>&"
    assert render(c, Channel.SMS, who).body == "Hi <script>alert(1)</script>&"


# --------------------------------------------------------------------------------------------
# SMS


def test_sms_is_stripped_and_counted(tmp_path: Path) -> None:
    c = campaign(
        tmp_path,
        {"sms": {"template": "sms.txt"}},
        files={"sms.txt": "\n  Hi {{ first_name }}, 20% off [today]!  \n\n"},
    )
    assert render(c, Channel.SMS) == SmsContent("Hi Ann, 20% off [today]!", "GSM-7", 1)
    assert render(c, Channel.SMS, person(first_name="Renée")).encoding == "GSM-7"
    assert render(c, Channel.SMS, person(first_name="Łucja")).encoding == "UCS-2"


def test_sms_longer_than_twilio_takes_is_refused_at_render(tmp_path: Path) -> None:
    # Twilio refuses a Body over 1,600 characters (PROVIDERS.md section 1): the message was
    # rendered, costed at 11 segments and sent, to fail as a dead letter (ten in a row abort the
    # run as "the sender or account is wrong"); a dry run said nothing.
    c = campaign(tmp_path, {"sms": {"body": "{{ first_name }}"}})
    assert render(c, Channel.SMS, person(first_name="x" * SMS_BODY_LIMIT)).segments == 11
    with pytest.raises(RenderError, match="sms body: 1601 characters, over the 1600"):
        render(c, Channel.SMS, person(first_name="x" * (SMS_BODY_LIMIT + 1)))


def test_empty_sms_is_refused(tmp_path: Path) -> None:
    c = campaign(tmp_path, {"sms": {"body": "{{ first_name }}"}})
    with pytest.raises(RenderError, match="sms body: rendered to an empty message"):
        render(c, Channel.SMS, person(first_name="   "))


def test_marketing_sms_without_opt_out_is_refused_at_render(tmp_path: Path) -> None:
    c = campaign(
        tmp_path,
        {"sms": {"body": "Hi {{ first_name }}, 20% off. {{ footer }}"}},
        purpose="marketing",
    )
    renderer = Renderer.compile(c, SECRET)
    with pytest.raises(RenderError, match="marketing SMS must tell the recipient how to opt out"):
        renderer.render(Channel.SMS, person(footer=""), "+12015550100")
    for footer in (
        "Reply STOP to opt out",
        "Txt stop to end",
        "Opt-out: text QUIT",
        "To unsubscribe reply UNSUBSCRIBE",
    ):
        assert renderer.render(Channel.SMS, person(footer=footer), "+12015550100")


@pytest.mark.parametrize(
    "text", ["Hi, 20% off this weekend", "Don't stop shopping!", "Sale ends at the end of May"]
)
def test_marketing_sms_that_never_changes_is_refused_at_compile(tmp_path: Path, text: str) -> None:
    c = campaign(tmp_path, {"sms": {"body": text}}, purpose="marketing")
    with pytest.raises(ConfigError) as info:
        Renderer.compile(c, SECRET)
    assert info.value.field == "channels.sms.body"
    assert "opt out" in info.value.message


def test_transactional_sms_needs_no_opt_out(tmp_path: Path) -> None:
    c = campaign(tmp_path, {"sms": {"body": "Your code is 1234"}})
    assert render(c, Channel.SMS).body == "Your code is 1234"


# --------------------------------------------------------------------------------------------
# Email


def email_campaign(tmp_path: Path, **overrides: Any) -> Campaign:
    config: dict[str, Any] = {
        "from": "Spring Shop <shop@example.com>",
        "reply_to": "help@example.com",
        "subject": "Spring sale, {{ first_name }}",
        "text": "t.txt",
        "html": "h.html",
        "headers": {"X-Campaign": "spring"},
        "list_unsubscribe": {
            "url": "https://shop.example/u/{{ unsubscribe_token }}",
            "mailto": "unsubscribe@shop.example?subject={{ unsubscribe_token }}",
        },
    }
    config.update(overrides)
    config = {k: v for k, v in config.items() if v is not None}
    return campaign(
        tmp_path,
        {"email": config},
        purpose="marketing",
        files={
            "t.txt": "Hi {{ first_name }},\nspring is here.\n",
            "h.html": "<p>Hi {{ first_name }},</p>\n<p>spring is here.</p>\n",
        },
    )


def test_email_content_with_list_unsubscribe(tmp_path: Path) -> None:
    c = email_campaign(tmp_path)
    content = render(c, Channel.EMAIL, address="ann@example.org")
    token = unsubscribe_token(SECRET, "spring-sale", Channel.EMAIL, "ann@example.org")
    assert len(token) == 22 and "=" not in token
    assert content == EmailContent(
        subject="Spring sale, Ann",
        text="Hi Ann,\nspring is here.",
        html="<p>Hi Ann,</p>\n<p>spring is here.</p>",
        sender="Spring Shop <shop@example.com>",
        reply_to="help@example.com",
        headers=(
            ("X-Campaign", "spring"),
            (
                "List-Unsubscribe",
                f"<mailto:unsubscribe@shop.example?subject={token}>, "
                f"<https://shop.example/u/{token}>",
            ),
            ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"),
        ),
    )


def test_unsubscribe_token_differs_per_address_and_channel(tmp_path: Path) -> None:
    a = unsubscribe_token(SECRET, "spring-sale", Channel.EMAIL, "a@example.org")
    assert a != unsubscribe_token(SECRET, "spring-sale", Channel.EMAIL, "b@example.org")
    assert a != unsubscribe_token(SECRET, "spring-sale", Channel.SMS, "a@example.org")
    assert a != unsubscribe_token("other", "spring-sale", Channel.EMAIL, "a@example.org")


def test_one_click_needs_the_url(tmp_path: Path) -> None:
    c = email_campaign(tmp_path, list_unsubscribe={"mailto": "unsub@shop.example"})
    headers = dict(render(c, Channel.EMAIL).headers)
    assert headers["List-Unsubscribe"] == "<mailto:unsub@shop.example>"
    assert "List-Unsubscribe-Post" not in headers
    c = email_campaign(
        tmp_path, list_unsubscribe={"url": "https://s.example/u", "one_click": False}
    )
    headers = dict(render(c, Channel.EMAIL).headers)
    assert headers["List-Unsubscribe"] == "<https://s.example/u>"
    assert "List-Unsubscribe-Post" not in headers


def test_unsubscribe_uri_that_cannot_go_in_a_header_is_refused(tmp_path: Path) -> None:
    c = email_campaign(tmp_path, list_unsubscribe={"url": "https://s.example/u/{{ first_name }}"})
    with pytest.raises(RenderError, match="list_unsubscribe.url"):
        render(c, Channel.EMAIL, person(first_name="a b>"))


@pytest.mark.parametrize("name", ["Ann\r\nBcc: victim@example.org", "Ann\nX: y", "Ann\rX"])
def test_line_break_in_subject_is_refused(tmp_path: Path, name: str) -> None:
    c = email_campaign(tmp_path)
    with pytest.raises(RenderError, match="email subject: contains a line break"):
        render(c, Channel.EMAIL, person(first_name=name))


def test_subject_trailing_newline_is_trimmed_not_refused(tmp_path: Path) -> None:
    c = email_campaign(tmp_path)
    assert render(c, Channel.EMAIL, person(first_name="Ann\n")).subject == "Spring sale, Ann"


def test_email_header_set_by_us_cannot_be_configured(tmp_path: Path) -> None:
    c = email_campaign(tmp_path, headers={"List-Unsubscribe": "<https://x.example>"})
    with pytest.raises(ConfigError) as info:
        Renderer.compile(c, SECRET)
    assert info.value.field == "channels.email.headers.List-Unsubscribe"


def test_bad_sender_is_a_config_error(tmp_path: Path) -> None:
    c = email_campaign(tmp_path, **{"from": "not an address"})
    with pytest.raises(ConfigError) as info:
        Renderer.compile(c, SECRET)
    assert info.value.field == "channels.email.from"


# --------------------------------------------------------------------------------------------
# build_email


def parse(data: bytes) -> EmailMessage:
    message = message_from_bytes(data, policy=policy.default)
    assert isinstance(message, EmailMessage)
    return message


def test_build_email_multipart_parses_back(tmp_path: Path) -> None:
    content = EmailContent(
        subject="Frühling: 20 % Rabatt für Zoë 🌷",
        text="Hallo Zoë,\nFrühling ist da.",
        html="<p>Hallo Zoë,</p>\n<p>Frühling ist da.</p>",
        sender="Frühlings Laden <shop@example.com>",
        reply_to='"Help, Desk" <help@example.com>',
        headers=(
            ("List-Unsubscribe", "<https://shop.example/u/abc>"),
            ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"),
        ),
    )
    message_id = make_message_id("run-1-c1-email", "shop.example")
    data = build_email(content, "zoe@example.org", message_id, DATE)
    assert data.isascii()
    assert all(len(line) <= 78 for line in data.split(b"\r\n"))
    assert b"\n" not in data.replace(b"\r\n", b"")
    message = parse(data)
    assert message.defects == []
    assert message.get_content_type() == "multipart/alternative"
    assert message["Subject"] == content.subject
    assert message["From"].addresses[0].display_name == "Frühlings Laden"
    assert message["From"].addresses[0].addr_spec == "shop@example.com"
    assert message["Reply-To"].addresses[0].display_name == "Help, Desk"
    assert message["To"] == "zoe@example.org"
    assert message["Message-ID"] == "<run-1-c1-email@shop.example>"
    assert message["MIME-Version"] == "1.0"
    assert message["Date"].datetime == DATE
    assert message["List-Unsubscribe"] == "<https://shop.example/u/abc>"
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    text, html = message.iter_parts()
    assert text.get_content_type() == "text/plain"
    assert html.get_content_type() == "text/html"
    assert text.get_content().replace("\r\n", "\n") == content.text + "\n"
    assert html.get_content().replace("\r\n", "\n") == (content.html or "") + "\n"


@pytest.mark.parametrize(
    ("text", "html", "kind"),
    [("Hello\nthere", None, "text/plain"), (None, "<b>Hi</b>", "text/html")],
)
def test_build_email_single_part(text: str | None, html: str | None, kind: str) -> None:
    content = EmailContent(subject="Plain", text=text, html=html, sender="a@example.com")
    message = parse(build_email(content, "b@example.org", "<x@y.example>", DATE))
    assert message.defects == []
    assert message.get_content_type() == kind
    assert not message.is_multipart()
    assert message.get_content().replace("\r\n", "\n") == (text or html) + "\n"
    assert message["Subject"] == "Plain"
    assert "Reply-To" not in message


@pytest.mark.parametrize("long_line", [False, True])
def test_build_email_body_that_looks_like_the_boundary(long_line: bool) -> None:
    message_id = make_message_id("k", "d.example")
    boundary = "--=_" + hashlib.sha256(message_id.encode()).hexdigest()[:28]
    text = boundary + "\nnot the end\n" + boundary + "--\nend"
    if long_line:
        text = "x" * 2000 + "\n" + text
    content = EmailContent(subject="s " * 100, text=text, html=text, sender="a@b.example")
    data = build_email(content, "c@d.example", message_id, DATE)
    assert max(len(line) for line in data.split(b"\r\n")) <= 998
    message = parse(data)
    assert message.defects == []
    assert message["Subject"] == content.subject
    plain, html = message.iter_parts()
    assert plain.get_content().replace("\r\n", "\n") == text + "\n"
    assert html.get_content().replace("\r\n", "\n") == text + "\n"


def test_encoded_words_hold_whole_characters() -> None:
    subject = "Zoë \U0001f600 €" * 20
    content = EmailContent(subject=subject, text="t", html=None, sender="a@b.example")
    head = build_email(content, "c@d.example", "<x@y.example>", DATE).split(b"\r\n\r\n")[0]
    words = re.findall(rb"=\?utf-8\?b\?([A-Za-z0-9+/=]*)\?=", head)
    assert len(words) > 5
    decoded = [base64.b64decode(w).decode("utf-8") for w in words]  # raises if a char is cut
    assert "".join(decoded) == subject
    assert all(len(line) <= 76 for line in head.split(b"\r\n"))


@pytest.mark.parametrize(
    "url",
    [
        "https://shop.example/u?t=" + "a" * 900,  # a long signed token
        "https://shop.example/u?t=x=?y",  # "=?" reads as an encoded word only in text
    ],
)
def test_list_unsubscribe_is_never_written_as_encoded_words(url: str) -> None:
    # RFC 2369 / 8058 headers hold URIs: a receiver does not decode RFC 2047 words there, so an
    # encoded List-Unsubscribe is no unsubscribe link at all (and no one-click button).
    value = f"<mailto:unsubscribe@shop.example?subject=t>, <{url}>"
    content = EmailContent(
        subject="s", text="t", html=None, sender="a@b.example",
        headers=(("List-Unsubscribe", value),
                 ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click")),
    )
    data = build_email(content, "c@d.example", "<x@y.example>", DATE)
    head = data.split(b"\r\n\r\n")[0]
    assert b"=?utf-8?" not in head
    assert max(len(line) for line in head.split(b"\r\n")) <= 998
    unfolded = head.replace(b"\r\n ", b" ").decode("ascii").split("\r\n")
    assert f"List-Unsubscribe: {value}" in unfolded
    assert parse(data)["List-Unsubscribe"] == value


def test_list_unsubscribe_too_long_for_a_line_is_refused() -> None:
    url = "https://shop.example/u?t=" + "a" * 1000
    content = EmailContent(subject="s", text="t", html=None, sender="a@b.example",
                           headers=(("List-Unsubscribe", f"<{url}>"),))
    with pytest.raises(ValueError, match="List-Unsubscribe"):
        build_email(content, "c@d.example", "<x@y.example>", DATE)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("subject", "Hi\r\nBcc: x@evil.example"),
        ("subject", "a\nb"),
        ("sender", "a@b.c\r\nX: y"),
        ("reply_to", "a@b.c\nX: y"),
        ("headers", (("X-Tag", "a\r\nBcc: v@evil.example"),)),
        ("headers", (("Bad Name", "v"),)),
        ("headers", (("Content-Type", "text/evil"),)),
    ],
)
def test_build_email_refuses_header_injection(field: str, value: Any) -> None:
    values: dict[str, Any] = {"subject": "s", "text": "t", "html": None, "sender": "a@b.example"}
    values[field] = value
    with pytest.raises(ValueError):
        build_email(EmailContent(**values), "c@d.example", "<x@y.example>", DATE)
    with pytest.raises(ValueError):
        build_email(
            EmailContent(subject="s", text="t", html=None, sender="a@b.example"),
            "c@d.example\r\nBcc: v@evil.example",
            "<x@y.example>",
            DATE,
        )


@pytest.mark.parametrize(
    "subject",
    [
        "=?utf-8?q?not_an_encoded_word?=",
        "two  spaces",
        "x" * 1200,
        "tab\there",
        "a" * 77 + " b",
        "Zoë " * 40,
        "€" * 200,
        "\U0001f600" * 30,
        'quote " and \\ backslash',
    ],
)
def test_build_email_subjects_round_trip(subject: str) -> None:
    content = EmailContent(subject=subject, text="t", html=None, sender="Zoë <a@b.example>")
    data = build_email(content, "c@d.example", "<x@y.example>", DATE)
    assert max(len(line) for line in data.split(b"\r\n")) <= 998
    message = parse(data)
    assert message["Subject"] == subject
    assert message["From"].addresses[0].display_name == "Zoë"


def test_make_message_id_is_deterministic() -> None:
    assert make_message_id("run-1.c1", "outbox.invalid") == "<run-1.c1@outbox.invalid>"
    odd = make_message_id("run 1/<c1>", "outbox.invalid")
    assert odd == make_message_id("run 1/<c1>", "outbox.invalid")
    assert odd != make_message_id("run 1/<c2>", "outbox.invalid")
    assert odd.startswith("<") and odd.endswith("@outbox.invalid>") and " " not in odd
    with pytest.raises(ValueError):
        make_message_id("k", "bad domain\r\n")


header_text = (
    st.text(
        alphabet=st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp")),
        min_size=1,
        max_size=200,
    )
    .map(str.strip)
    .filter(bool)
)
body_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=500)


@settings(max_examples=150, deadline=None)
@given(subject=header_text, text=body_text, html=body_text)
def test_build_email_round_trips(subject: str, text: str, html: str) -> None:
    content = EmailContent(subject=subject, text=text, html=html, sender="a@b.example")
    message = parse(build_email(content, "c@d.example", "<x@y.example>", DATE))
    assert message["Subject"] == subject
    plain, rich = message.iter_parts()

    def normal(s: str) -> str:
        s = s.replace("\r\n", "\n").replace("\r", "\n")
        return s if s.endswith("\n") else s + "\n"

    assert normal(plain.get_content()) == normal(text)
    assert normal(rich.get_content()) == normal(html)


# --------------------------------------------------------------------------------------------
# Push and webhook


def test_push_content_and_payload_limit(tmp_path: Path) -> None:
    c = campaign(
        tmp_path,
        {
            "push": {
                "title": "Sale {{ first_name }}",
                "body": "{{ note }}",
                "data": {"url": "https://s.example/{{ id }}", "kind": "sale"},
            }
        },
    )
    renderer = Renderer.compile(c, SECRET)
    ok = renderer.render(Channel.PUSH, person(note="Hi"), "tok")
    assert ok == PushContent("Sale Ann", "Hi", {"url": "https://s.example/c1", "kind": "sale"})

    def size(note: str) -> int:
        payload = {
            "notification": {"title": "Sale Ann", "body": note},
            "data": {"url": "https://s.example/c1", "kind": "sale"},
        }
        return len(json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode())

    fill = PUSH_PAYLOAD_LIMIT - size("")
    assert renderer.render(Channel.PUSH, person(note="é" * (fill // 2)), "tok")
    with pytest.raises(RenderError, match="over the 4000-byte limit"):
        renderer.render(Channel.PUSH, person(note="é" * (fill // 2 + 1)), "tok")
    with pytest.raises(RenderError, match="over the 4000-byte limit"):
        renderer.render(Channel.PUSH, person(note='"' * (fill // 2 + 1)), "tok")


def test_webhook_keeps_its_text(tmp_path: Path) -> None:
    c = campaign(
        tmp_path,
        {"webhook": {"template": "hook.j2"}},
        files={"hook.j2": "New order from {{ first_name }}\n  details\n"},
    )
    assert render(c, Channel.WEBHOOK) == WebhookContent("New order from Ann\n  details")


_INJECT = 'x", "amount": 1000000, "admin": true, "y": "'


@pytest.mark.parametrize(
    "body",
    [
        '{"event": "order", "name": "{{ first_name }}", "amount": 5}',  # the fast path
        '{"event": "order", "name": "{{ first_name | trim }}", "amount": 5}',  # Jinja's
        '\n  {"event": "order",{% if id %} "name": "{{ first_name }}",{% endif %} "amount": 5}',
    ],
)
def test_a_json_webhook_body_cannot_be_rewritten_by_a_recipient_s_value(
    tmp_path: Path, body: str
) -> None:
    """A JSON template with values printed inside its strings: a name that closes its string
    used to add or override keys of the payload (here the amount, and an admin flag)."""
    c = campaign(tmp_path, {"webhook": {"body": body}})
    content = render(c, Channel.WEBHOOK, person(first_name=_INJECT))
    assert content.json
    assert json.loads(content.text) == {"event": "order", "name": _INJECT, "amount": 5}


def test_a_json_webhook_body_broken_by_a_value_fails_that_recipient(tmp_path: Path) -> None:
    c = campaign(tmp_path, {"webhook": {"body": '{"amount": {{ amount }}}'}})
    assert json.loads(render(c, Channel.WEBHOOK, person(amount="12")).text) == {"amount": 12}
    with pytest.raises(RenderError, match="made it invalid JSON"):
        render(c, Channel.WEBHOOK, person(amount='1, "admin": true'))


@pytest.mark.parametrize(
    ("body", "is_json"),
    [
        ("{{ {'event': 'x', 'name': first_name} | tojson }}", True),
        ("{{ note }}", False),  # text, whatever a recipient's note looks like
        ("Order {{ id }}: {\"a\": 1}", False),
        ("{% if id %}{\"a\": 1}{% endif %}", False),
    ],
)
def test_whether_a_webhook_body_is_json_is_decided_by_the_template_alone(
    tmp_path: Path, body: str, is_json: bool
) -> None:
    c = campaign(tmp_path, {"webhook": {"body": body}})
    content = render(c, Channel.WEBHOOK, person(note='{"admin": true}'))
    assert content.json is is_json
    if is_json:
        assert json.loads(content.text) == {"event": "x", "name": "Ann"}


_SLACK = {"team": {"type": "slack", "url": "https://hooks.slack.example/services/T0/B0/x"}}
_HOSTILE = "<!channel> Tom & <@U123> <https://evil.example|click>"
_ESCAPED = "&lt;!channel&gt; Tom &amp; &lt;@U123&gt; &lt;https://evil.example|click&gt;"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        # plain substitution (the fast path) and a template Jinja renders
        ("<!here> New order from {{ first_name }}", f"<!here> New order from {_ESCAPED}"),
        ("<https://shop.example/o/{{ id }}|{{ first_name | trim }}> {% if id %}ok{% endif %}",
         f"<https://shop.example/o/c1|{_ESCAPED}> ok"),
        ("{% set n = first_name %}{{ n ~ '!' }}", _ESCAPED + "!"),
        ("{% macro m(x) %}*{{ x }}*{% endmacro %}{{ m(first_name) }}", f"*{_ESCAPED}*"),
        # the operator may still print markup on purpose
        ("{{ ping | safe }} {{ first_name }}", f"<!subteam^S1> {_ESCAPED}"),
    ],
)
@pytest.mark.parametrize("provider", ["team", ["team", "box"]])
def test_slack_text_escapes_what_templates_print_but_not_their_markup(
    tmp_path: Path, body: str, expected: str, provider: Any
) -> None:
    c = campaign(tmp_path, {"webhook": {"body": body, "provider": provider}}, providers=_SLACK,
                 vars={"ping": "<!subteam^S1>"})
    assert render(c, Channel.WEBHOOK, person(first_name=_HOSTILE)) == WebhookContent(expected)


def test_an_emoji_escaped_as_a_surrogate_pair_in_yaml_is_one_character(tmp_path: Path) -> None:
    # YAML's "\\u" escapes are UTF-16 code units: PyYAML gives the two halves of the pair.
    path = tmp_path / "c.yaml"
    path.write_text(
        CAMPAIGN_HEAD +
        '  sms: {provider: box, body: "Hi {{ first_name }} \\ud83d\\ude00 {{ sig }}"}\n'
        '  webhook: {provider: box, body: "{{ sig }}"}\n'
        "providers: {box: {type: outbox, dir: out}}\n"
        'vars: {sig: "\\ud83c\\udf38"}\n',
        encoding="utf-8",
    )
    loaded = load_campaign(path)
    renderer = Renderer.compile(loaded.campaign, SECRET, source=loaded)
    assert renderer.render(Channel.SMS, person(), "+14155550100") == SmsContent(
        "Hi Ann \U0001f600 \U0001f338", "UCS-2", 1
    )
    assert renderer.render(Channel.WEBHOOK, person(), "x") == WebhookContent("\U0001f338")


def test_a_lone_surrogate_is_refused_not_a_crash(tmp_path: Path) -> None:
    c = campaign(tmp_path, {"sms": {"body": "Hi {{ sig }}"}, "webhook": {"body": "{{ sig }}!"}},
                 vars={"sig": "\ud83d"})
    renderer = Renderer.compile(c, SECRET)
    for channel in (Channel.SMS, Channel.WEBHOOK):
        with pytest.raises(RenderError, match="lone UTF-16 surrogate"):
            renderer.render(channel, person(), "+14155550100")
    with pytest.raises(ConfigError, match="lone UTF-16 surrogate") as info:
        Renderer.compile(campaign(tmp_path, {"sms": {"body": "Hi \udc00 {{ first_name }}"}}),
                         SECRET)
    assert info.value.field == "channels.sms.body"


def test_generic_webhook_text_is_not_slack_escaped(tmp_path: Path) -> None:
    c = campaign(tmp_path, {"webhook": {"body": "From {{ first_name }}"}}, providers=_SLACK)
    assert render(c, Channel.WEBHOOK, person(first_name=_HOSTILE)) == WebhookContent(
        f"From {_HOSTILE}"
    )


# --------------------------------------------------------------------------------------------
# Compile-time errors and metadata


def test_syntax_error_in_a_template_file_names_file_and_line(tmp_path: Path) -> None:
    c = campaign(
        tmp_path,
        {"email": {"from": "a@b.example", "subject": "s", "text": "t.txt"}},
        files={"t.txt": "Hello\n{{ first_name }}\n{% if x %}\nunclosed\n"},
    )
    with pytest.raises(ConfigError) as info:
        Renderer.compile(c, SECRET)
    error = info.value
    assert error.file == str(tmp_path / "t.txt")
    assert error.line == 3  # Jinja names the line of the block left open
    assert error.field == "channels.email.text"
    assert "template syntax error" in error.message


def test_syntax_error_on_a_given_line(tmp_path: Path) -> None:
    c = campaign(
        tmp_path, {"sms": {"template": "s.txt"}}, files={"s.txt": "one\ntwo\n{{ first_name | }}\n"}
    )
    with pytest.raises(ConfigError) as info:
        Renderer.compile(c, SECRET)
    assert (info.value.file, info.value.line, info.value.field) == (
        str(tmp_path / "s.txt"),
        3,
        "channels.sms.template",
    )


@pytest.mark.parametrize(
    "text",
    [
        "{{ " + "(" * 300 + "1" + ")" * 300 + " }}",  # RecursionError in Jinja's parser
        "{% if x %}" * 120 + "y" + "{% endif %}" * 120,  # IndentationError from Python
        "{{ 2 ** 20000 }}",  # folded at compile time: ValueError (too many digits for repr)
    ],
    ids=["deep expression", "deep blocks", "huge constant"],
)
def test_a_template_jinja_cannot_compile_is_a_config_error(tmp_path: Path, text: str) -> None:
    # Not TemplateSyntaxError, so they escaped as "internal error ... (a bug)", exit 1.
    c = campaign(tmp_path, {"sms": {"template": "s.txt"}}, files={"s.txt": text})
    with pytest.raises(ConfigError) as info:
        Renderer.compile(c, SECRET)
    assert (info.value.file, info.value.field) == (str(tmp_path / "s.txt"),
                                                    "channels.sms.template")
    assert "cannot be compiled" in info.value.message
    assert "\n" not in str(info.value)


#: A campaign file's first lines, up to its channels, for the tests that write one whole.
CAMPAIGN_HEAD = (
    "name: c\n"
    "purpose: transactional\n"
    "recipients: {key: id, columns: {phone: phone}}\n"
    "channels:\n"
)


def test_syntax_error_inline_names_the_campaign_line(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        CAMPAIGN_HEAD +
        "  sms:\n"
        "    provider: box\n"
        "    body: 'Hi {{ first_name }'\n"
        "providers: {box: {type: outbox, dir: out}}\n",
        encoding="utf-8",
    )
    loaded = load_campaign(path)
    with pytest.raises(ConfigError) as info:
        Renderer.compile(loaded.campaign, SECRET, source=loaded)
    assert (info.value.file, info.value.line, info.value.field) == (
        str(path),
        7,
        "channels.sms.body",
    )
    with pytest.raises(ConfigError) as info:
        Renderer.compile(loaded.campaign, SECRET)
    assert (info.value.file, info.value.line) == ("<campaign>", 1)


def test_template_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "s.txt").write_bytes(b"caf\xe9")
    c = campaign(tmp_path, {"sms": {"template": "s.txt"}})
    with pytest.raises(ConfigError, match="not UTF-8"):
        Renderer.compile(c, SECRET)


def test_template_hashes_and_fields_used(tmp_path: Path) -> None:
    c = email_campaign(tmp_path)
    renderer = Renderer.compile(c, SECRET)
    hashes = renderer.template_hashes
    assert (
        hashes["channels.email.text"]
        == hashlib.sha256((tmp_path / "t.txt").read_bytes()).hexdigest()
    )
    assert (
        hashes["channels.email.subject"]
        == hashlib.sha256(b"Spring sale, {{ first_name }}").hexdigest()
    )
    assert set(hashes) == {
        "channels.email.subject",
        "channels.email.text",
        "channels.email.html",
        "channels.email.list_unsubscribe.url",
        "channels.email.list_unsubscribe.mailto",
    }
    assert renderer.fields_used() == {"first_name"}


def test_token_needs_a_secret(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="secret"):
        Renderer.compile(email_campaign(tmp_path), "")


def test_unconfigured_channel_is_a_programming_error(tmp_path: Path) -> None:
    c = campaign(tmp_path, {"sms": {"body": "Hi"}})
    with pytest.raises(ValueError, match="not configured"):
        render(c, Channel.EMAIL)


# --------------------------------------------------------------------------------------------
# Hash and cost


def test_content_hash_is_stable_and_sensitive() -> None:
    a = EmailContent("s", "t", None, "a@b.example", headers=(("X", "1"),))
    assert content_hash(a) == content_hash(
        EmailContent("s", "t", None, "a@b.example", headers=(("X", "1"),))
    )
    assert len(content_hash(a)) == 16
    assert content_hash(a) != content_hash(
        EmailContent("s", None, "t", "a@b.example", headers=(("X", "1"),))
    )
    assert content_hash(SmsContent("ab", "GSM-7", 1)) != content_hash(WebhookContent("ab"))
    assert content_hash(PushContent("t", "b", {"x": "1", "y": "2"})) == content_hash(
        PushContent("t", "b", {"y": "2", "x": "1"})
    )
    # Pinned: run records compare hashes across versions and machines.
    assert content_hash(SmsContent("ab", "GSM-7", 1)) == "0d94cdb7a9088a3e"
    assert (
        content_hash(SmsContent("ab", "GSM-7", 1)) == hashlib.sha256(b"3:sms2:ab").hexdigest()[:16]
    )


def test_cost_of() -> None:
    assert cost_of(SmsContent("x" * 200, "GSM-7", 2), 1000, 7900) == 2 * 7900 + 1000
    assert cost_of(WebhookContent("x"), 1000, 7900) == 1000
    assert cost_of(EmailContent("s", "t", None, "a@b.example"), 0, 7900) == 0


# -- the fast path for simple templates ----------------------------------------------------------

_TEXT = st.text(alphabet=st.characters(blacklist_characters="{}%#", blacklist_categories=("Cs",)),
                max_size=12)
_VALUES = st.one_of(st.text(max_size=12), st.integers(), st.none(),
                    st.sampled_from(["<b>&'\"</b>", "Zoë", "😀", "{{ x }}"]))


@settings(max_examples=200, deadline=None)
@given(
    pieces=st.lists(st.tuples(_TEXT, st.sampled_from(["a", "b", "row", "first_name", "zz"])),
                    max_size=4),
    tail=_TEXT,
    values=st.dictionaries(st.sampled_from(["a", "b", "row", "first_name"]), _VALUES),
    base=st.dictionaries(st.sampled_from(["a", "zz"]), _VALUES),
    mode=st.sampled_from(["text", "html", "slack", "json"]),
)
def test_simple_templates_render_exactly_as_jinja_does(
    pieces: list[tuple[str, str]], tail: str, values: dict[str, Any], base: dict[str, Any],
    mode: str,
) -> None:
    import jinja2

    from campaign_cli.render import engine

    source = "".join(f"{text}{{{{ {name} }}}}" for text, name in pieces) + tail
    html, slack, json_escape = mode == "html", mode == "slack", mode == "json"
    finalize = engine.slack_text if slack else engine.json_text if json_escape else None
    env = engine._environment(html or slack or json_escape, finalize)
    template = env.from_string(source)
    tree = env.parse(source)
    part = engine._Part("sms body", "channels.sms.body", template, None, False,
                        frozenset(), engine._simple(tree), html, slack,
                        json_escape=json_escape)
    assert part.simple is not None
    try:
        context = template.new_context(base, shared=True)
        context.vars.update(values)
        expected: str | None = "".join(template.root_render_func(context))
    except jinja2.UndefinedError:
        expected = None  # the fast path must step aside and let Jinja raise
    assert engine._substitute(part, values, base) == expected


def test_templates_beyond_plain_substitution_are_left_to_jinja() -> None:
    from campaign_cli.render import engine

    env = engine._environment(False)
    for source in ("{{ name | upper }}", "{{ a.b }}", "{% if a %}x{% endif %}", "{{ 'x' }}",
                   "{{ a ~ b }}", "{% set a = 1 %}{{ a }}"):
        assert engine._simple(env.parse(source)) is None, source
    assert engine._simple(env.parse("Hi {{ a }}!")) == (("Hi ", "a"), ("!", None))


def test_an_emoji_escaped_as_a_surrogate_pair_in_the_email_reply_to_or_headers(
        tmp_path: Path) -> None:
    """reply_to and extra headers are not templates, so the surrogate-pair fix for templates
    missed them: "Help \\ud83c\\udf38 <help@...>" reached the providers as two lone surrogates.
    SendGrid's request could not be encoded (UnicodeEncodeError: the run stopped with exit 1
    and the message in doubt) and SMTP wrote the halves as invalid UTF-8 in an encoded word.
    (``from`` has a length constraint, and pydantic refuses such a string there: exit 2.)"""
    from campaign_cli.providers.sendgrid import SendGridAdapter

    (tmp_path / "t.txt").write_text("Hi\n", encoding="utf-8")
    c = campaign(tmp_path, {"email": {
        "from": "Shop <news@shop.example.com>",
        "reply_to": "Help \ud83c\udf38 <help@shop.example.com>",
        "subject": "Hi", "text": "t.txt", "headers": {"X-Note": "spring \ud83c\udf38"},
    }})
    content = render(c, Channel.EMAIL)
    assert content.reply_to == "Help \U0001f338 <help@shop.example.com>"
    assert content.headers == (("X-Note", "spring \U0001f338"),)
    message = OutboundMessage(run_id=1, row=7, channel=Channel.EMAIL, recipient_key="c1",
                              address="ann@example.com", idempotency_key="k", content=content,
                              content_hash="h")
    body = json.loads(SendGridAdapter(api_key="k").build(message).content)
    assert body["reply_to"] == {"email": "help@shop.example.com", "name": "Help \U0001f338"}
    assert body["headers"] == {"X-Note": "spring \U0001f338"}
    parsed = message_from_bytes(build_email(content, "ann@example.com", "<k@shop.example.com>",
                                            DATE), policy=policy.default)
    assert str(parsed["Reply-To"]) == "Help \U0001f338 <help@shop.example.com>"
    assert str(parsed["X-Note"]) == "spring \U0001f338"


@pytest.mark.parametrize(("key", "value"), [
    ("reply_to", "Help \udc00 <help@shop.example.com>"),
    ("headers", {"X-Note": "spring \ud83c"}),
])
def test_a_lone_surrogate_in_the_email_reply_to_or_headers_is_a_config_error(
        tmp_path: Path, key: str, value: Any) -> None:
    (tmp_path / "t.txt").write_text("Hi\n", encoding="utf-8")
    email = {"from": "news@shop.example.com", "subject": "Hi", "text": "t.txt", key: value}
    with pytest.raises(ConfigError, match="lone UTF-16 surrogate") as info:
        Renderer.compile(campaign(tmp_path, {"email": email}), SECRET)
    assert info.value.field is not None and info.value.field.startswith(f"channels.email.{key}")


def test_template_error_redacts_a_secret_containing_another_and_skips_tiny_values(
    tmp_path: Path,
) -> None:
    """As the campaign file's own errors: `errors.redact`'s rule (longest first, three or more
    characters), so a token containing another secret is not half shown and a one-letter
    `${VAR}` does not star every letter of the message."""
    path = tmp_path / "c.yaml"
    path.write_text(
        CAMPAIGN_HEAD +
        '  sms: {provider: box, body: "Hi {{ first_name ${TOKEN} }}"}\n'
        '  webhook: {provider: hook, body: "{{ first_name }}"}\n'
        "providers:\n"
        '  box: {type: outbox, dir: out}\n'
        '  hook: {type: webhook, url: "https://example.com/h", secret: "${USER}"}\n'
        'vars: {initial: "${INITIAL}"}\n',
        encoding="utf-8",
    )
    loaded = load_campaign(path, {"TOKEN": "mailer_2026_secret", "USER": "mailer",
                                  "INITIAL": "e"})
    with pytest.raises(ConfigError) as info:
        Renderer.compile(loaded.campaign, SECRET, source=loaded)
    message = info.value.message
    assert "2026" not in message
    assert "'***'" in message
    assert "expected token 'end of print statement'" in message
