"""Templates compiled once per run, rendered per message (DESIGN.md section 3, step 4).

`Renderer.compile` reads and compiles every template of a campaign in a Jinja2 sandbox that
refuses unknown names (``StrictUndefined``) and unsafe attributes, and whose values cannot be
mutated from a template (so one recipient's render cannot change what the next one sees). HTML
email bodies are autoescaped; text, SMS, push, webhook bodies and subjects are not, except that a
webhook body that goes to Slack has Slack's control characters (``&``, ``<``, ``>``) escaped in
everything it prints (`slack_text`), so recipient data cannot mention, ping or link while the
template's own markup (``<!here>``, ``<url|text>``) still works. A syntax error
is a `ConfigError` naming the file, line and key; anything that goes wrong while rendering one
recipient is a `RenderError`, which fails that recipient (``render_failed``), not the run.

A template sees, later names winning::

    **campaign.vars, **recipient.fields,
    row, vars, recipient {key, address}, campaign {name, purpose}, unsubscribe_token

Rendering is on the hot path: the campaign's variables live in one dict built at compile time and
each render adds only a small per-recipient dict on top (no copy of ``vars``); a template without
any ``{{ }}`` or ``{% %}`` is rendered once at compile time; the unsubscribe token is computed only
for channels whose templates use it.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import markupsafe
from jinja2 import meta, nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from campaign_cli.config import (
    Campaign,
    EmailChannel,
    LoadedCampaign,
    PushChannel,
    SmsChannel,
    WebhookChannel,
)
from campaign_cli.errors import ConfigError, redact
from campaign_cli.models import (
    Channel,
    Content,
    EmailContent,
    Purpose,
    PushContent,
    Recipient,
    SmsContent,
    WebhookContent,
)
from campaign_cli.render.email import (
    MAX_LINE,
    RESERVED_HEADERS,
    format_mailbox,
    structured_header,
)
from campaign_cli.render.sms import sms_info

#: FCM and APNs refuse payloads over 4 KB; keep a margin.
PUSH_PAYLOAD_LIMIT = 4000
#: Twilio refuses a Body over 1,600 characters (PROVIDERS.md section 1).
SMS_BODY_LIMIT = 1600

#: Names every template sees, which a recipient-file column of the same name cannot override.
RESERVED_NAMES = frozenset({"row", "vars", "recipient", "campaign", "unsubscribe_token"})

# An opt-out instruction (PROVIDERS.md section 5): a carrier keyword written in capitals as a word,
# "opt out" / "unsubscribe" in any case, or "reply/text ... stop" in any case.
_OPT_OUT = re.compile(
    r"\b(?:STOP|STOPALL|UNSUBSCRIBE|CANCEL|END|QUIT|REVOKE|OPTOUT)\b"
    r"|(?i:\bopt[\s-]?out\b|\bunsubscribe\b"
    r"|\b(?:reply|text|txt|send|sms)\s+[\"'“‘]?(?:stop|stopall|cancel|end|quit|revoke)\b)"
)
_OPT_OUT_MESSAGE = (
    "marketing SMS must tell the recipient how to opt out (e.g. 'Reply STOP to opt out')"
)
_BREAKS = re.compile(r"[\r\n\0]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_LONE_SURROGATE = (
    "holds a lone UTF-16 surrogate (half of an escaped character such as \\ud83d), not text"
)
_URI = re.compile(r"[!-+\--;=?-~]+")  # printable ASCII but space, "<", ">" and ","
# Headers a campaign's `headers:` may not set: the message's own, and the unsubscribe pair that
# list_unsubscribe writes.
_EMAIL_HEADERS_SET = RESERVED_HEADERS | {"list-unsubscribe", "list-unsubscribe-post"}
_TEMPLATE_FILENAME = "<template>"  # what Jinja calls code compiled from a string


class RenderError(Exception):
    """One recipient's message cannot be rendered; ``template`` names which part failed."""

    def __init__(self, message: str, template: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.template = template


# --------------------------------------------------------------------------------------------
# Module-level helpers (pure)


def unsubscribe_token(secret: str, campaign: str, channel: Channel | str, address: str) -> str:
    """The opaque token of one address: urlsafe base64 of HMAC-SHA256(secret, campaign NUL channel
    NUL address), first 16 bytes, no padding. Whoever holds the secret can check a token."""
    name = channel.value if isinstance(channel, Channel) else channel
    mac = hmac.digest(secret.encode(), f"{campaign}\0{name}\0{address}".encode(), "sha256")
    return base64.urlsafe_b64encode(mac[:16]).rstrip(b"=").decode("ascii")


def content_hash(content: Content) -> str:
    """A short (16 hex digits) SHA-256 of what a message says; equal content, equal hash."""
    parts: tuple[str | None, ...]
    if isinstance(content, SmsContent):  # the common case, spelled out: same text as below
        body = content.body
        data = f"3:sms{len(body)}:{body}"
        return hashlib.sha256(data.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    if isinstance(content, EmailContent):
        flat = [x for pair in content.headers for x in pair]
        parts = (
            "email",
            content.subject,
            content.text,
            content.html,
            content.sender,
            content.reply_to,
            *flat,
        )
    elif isinstance(content, PushContent):
        flat = [x for pair in sorted(content.data.items()) for x in pair]
        parts = ("push", content.title, content.body, *flat)
    else:
        parts = ("webhook", content.text)
    data = "".join("-" if p is None else f"{len(p)}:{p}" for p in parts)
    return hashlib.sha256(data.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def cost_of(content: Content, price_per_message_micros: int, price_per_segment_micros: int) -> int:
    """What sending ``content`` costs, in micro-units: SMS pay per segment plus per message."""
    if isinstance(content, SmsContent):
        return content.segments * price_per_segment_micros + price_per_message_micros
    return price_per_message_micros


# --------------------------------------------------------------------------------------------
# Compiled templates


@dataclass(frozen=True, slots=True)
class _Part:
    """One compiled template: ``label`` for render errors, ``field`` for config errors."""

    label: str
    field: str
    template: jinja2.Template
    constant: str | None  # the output of a template with nothing dynamic in it
    multiline: bool
    names: frozenset[str]  # the undeclared variables it reads
    #: Text and plain ``{{ name }}`` substitutions only: (text, name or None) pairs, rendered
    #: without Jinja's machinery (`_substitute`); None for anything else.
    simple: tuple[tuple[str, str | None], ...] | None = None
    html: bool = False
    slack: bool = False  # what it prints is escaped for Slack (`slack_text`)
    #: A webhook body that is a JSON object (`_json_kind`): it must render to one, and it is sent
    #: as the payload's ``data``; anything else is sent as ``text``, never parsed.
    json_body: bool = False
    json_escape: bool = False  # what it prints is escaped as JSON string content (`json_text`)


class Renderer:
    """Compiled templates of one campaign; `render` turns one recipient into `Content`.

    Build it with `Renderer.compile`. It holds no state that changes after compiling, so one
    instance may render from several threads.
    """

    def __init__(
        self,
        campaign: Campaign,
        secret: str,
        base: dict[str, Any],
        parts: dict[Channel, dict[str, _Part]],
        hashes: dict[str, str],
    ) -> None:
        self._secret = secret.encode()
        self._base = base
        self._parts = parts
        self._hashes = hashes
        self._vars = campaign.vars
        self._campaign_info = base["campaign"]
        self._marketing = campaign.purpose is Purpose.MARKETING
        self._token_prefix = {
            channel: f"{campaign.name}\0{channel.value}\0"
            for channel, channel_parts in parts.items()
            if any("unsubscribe_token" in p.names for p in channel_parts.values())
        }
        email = campaign.channels.email
        self._email_static = _email_static(email)
        unsub = email.list_unsubscribe if email else None
        self._one_click = bool(unsub and unsub.one_click)
        renderers: dict[Channel, Callable[[dict[str, Any]], Content]] = {
            Channel.SMS: self._sms,
            Channel.EMAIL: self._email,
            Channel.PUSH: self._push,
            Channel.WEBHOOK: self._webhook,
        }
        self._renderers = {channel: renderers[channel] for channel in parts}

    # ----------------------------------------------------------------------------------------
    # Compiling

    @classmethod
    def compile(
        cls,
        campaign: Campaign,
        unsubscribe_secret: str,
        *,
        source: LoadedCampaign | None = None,
    ) -> Renderer:
        """Read and compile every template of ``campaign``; raises `ConfigError`.

        ``source`` (the loaded campaign file) lets errors in inline templates name the campaign
        file and the line of their key; without it they name ``<campaign>`` and the template line.
        """
        compiler = _Compiler(campaign, source)
        parts: dict[Channel, dict[str, _Part]] = {}
        channels = campaign.channels
        for channel in channels.enabled():
            config = channels.get(channel)
            loc = ("channels", channel.value)
            found: dict[str, _Part] = {}
            if isinstance(config, EmailChannel):
                compiler.check_email(config)
                found["subject"] = compiler.inline(
                    "email subject", (*loc, "subject"), config.subject
                )
                if config.text is not None:
                    found["text"] = compiler.file("email text", (*loc, "text"), config.text)
                if config.html is not None:
                    found["html"] = compiler.file(
                        "email html", (*loc, "html"), config.html, html=True
                    )
                unsub = config.list_unsubscribe
                if unsub is not None and unsub.url:
                    found["unsub_url"] = compiler.inline(
                        "email list_unsubscribe.url", (*loc, "list_unsubscribe", "url"), unsub.url
                    )
                if unsub is not None and unsub.mailto:
                    found["unsub_mailto"] = compiler.inline(
                        "email list_unsubscribe.mailto",
                        (*loc, "list_unsubscribe", "mailto"),
                        unsub.mailto,
                    )
            else:
                slack = isinstance(config, WebhookChannel) and any(
                    campaign.providers[name].type == "slack" for name in config.provider_names
                )
                found["body"] = compiler.body(f"{channel.value} body", loc, config, slack,
                                              webhook=isinstance(config, WebhookChannel))
                if isinstance(config, PushChannel):
                    found["title"] = compiler.inline("push title", (*loc, "title"), config.title)
                    for key, value in config.data.items():
                        found[f"data.{key}"] = compiler.inline(
                            f"push data.{key}", (*loc, "data", key), value
                        )
                if isinstance(config, SmsChannel) and campaign.purpose is Purpose.MARKETING:
                    compiler.check_opt_out(found["body"], loc, config)
            parts[channel] = found
        names = {n for ps in parts.values() for p in ps.values() for n in p.names}
        if "unsubscribe_token" in names and not unsubscribe_secret:
            raise ValueError("templates use unsubscribe_token but the unsubscribe secret is empty")
        globals_: dict[str, Any] = dict(compiler.text_env.globals)
        base = {
            **globals_,
            **campaign.vars,
            "vars": campaign.vars,
            "campaign": {"name": campaign.name, "purpose": campaign.purpose.value},
        }
        return cls(campaign, unsubscribe_secret, base, parts, compiler.hashes)

    @property
    def template_hashes(self) -> dict[str, str]:
        """SHA-256 of each template's source, by key path (``channels.sms.body``)."""
        return dict(self._hashes)

    @property
    def channels(self) -> tuple[Channel, ...]:
        return tuple(self._parts)

    @property
    def uses_secret(self) -> bool:
        """Whether any template renders an ``unsubscribe_token`` (made with the store's secret)."""
        return bool(self._token_prefix)

    def fields_used(self, channel: Channel | None = None) -> frozenset[str]:
        """Names the templates read that neither the campaign's vars nor the renderer provide:
        they must come from the recipient file (for ``validate`` to check against its header)."""
        chosen = [self._parts[channel]] if channel is not None else list(self._parts.values())
        names = {n for ps in chosen for p in ps.values() for n in p.names}
        return frozenset(names - RESERVED_NAMES - self._base.keys())

    # ----------------------------------------------------------------------------------------
    # Rendering

    def render(self, channel: Channel, recipient: Recipient, address: str) -> Content:
        """One recipient's message on ``channel``; raises `RenderError`."""
        try:
            renderer = self._renderers[channel]
        except KeyError:
            raise ValueError(f"channel {channel.value} is not configured") from None
        local: dict[str, Any] = {
            **recipient.fields,
            "row": recipient.row,
            "vars": self._vars,
            "recipient": {"key": recipient.key, "address": address},
            "campaign": self._campaign_info,
        }
        prefix = self._token_prefix.get(channel)
        if prefix is not None:
            mac = hmac.digest(self._secret, (prefix + address).encode(), "sha256")
            local["unsubscribe_token"] = (
                base64.urlsafe_b64encode(mac[:16]).rstrip(b"=").decode("ascii")
            )
        return renderer(local)

    def _run(self, part: _Part, local: dict[str, Any]) -> str:
        if part.constant is not None:
            return part.constant
        if part.simple is not None:
            text = _substitute(part, local, self._base)
            if text is not None:
                return text if text.isascii() else _whole_characters(part, text)
        template = part.template
        context = template.new_context(self._base, shared=True)
        context.vars.update(local)
        try:
            text = "".join(template.root_render_func(context))
        except Exception as exc:  # any failure of one template fails one recipient
            raise RenderError(_describe(part, exc), part.label) from None
        return text if text.isascii() else _whole_characters(part, text)

    def _sms(self, local: dict[str, Any]) -> SmsContent:
        parts = self._parts[Channel.SMS]
        body = self._run(parts["body"], local).strip()
        if not body:
            raise RenderError("sms body: rendered to an empty message", "sms body")
        if len(body) > SMS_BODY_LIMIT:
            raise RenderError(f"sms body: {len(body)} characters, over the {SMS_BODY_LIMIT} an "
                              "SMS may hold", "sms body")
        if self._marketing and not _OPT_OUT.search(body):
            raise RenderError(f"sms body: {_OPT_OUT_MESSAGE}", "sms body")
        encoding, segments = sms_info(body)
        return SmsContent(body, encoding, segments)

    def _email(self, local: dict[str, Any]) -> EmailContent:
        parts = self._parts[Channel.EMAIL]
        sender, reply_to, headers = self._email_static
        subject = self._run(parts["subject"], local).strip()
        if not subject:
            raise RenderError("email subject: rendered empty", "email subject")
        if _BREAKS.search(subject):
            raise RenderError("email subject: contains a line break", "email subject")
        text = html = None
        if "text" in parts:
            text = self._run(parts["text"], local)
            if not text.strip():
                raise RenderError("email text: rendered empty", "email text")
        if "html" in parts:
            html = self._run(parts["html"], local)
            if not html.strip():
                raise RenderError("email html: rendered empty", "email html")
        if "unsub_url" in parts or "unsub_mailto" in parts:
            headers = headers + self._list_unsubscribe(parts, local)
        return EmailContent(subject, text, html, sender, reply_to, headers)

    def _list_unsubscribe(
        self, parts: Mapping[str, _Part], local: dict[str, Any]
    ) -> tuple[tuple[str, str], ...]:
        uris = []
        mailto_part = parts.get("unsub_mailto")
        if mailto_part is not None:
            mailto = _uri(mailto_part, self._run(mailto_part, local))
            if not mailto.lower().startswith("mailto:"):
                mailto = "mailto:" + mailto
            uris.append(f"<{mailto}>")
        url_part = parts.get("unsub_url")
        if url_part is not None:
            url = _uri(url_part, self._run(url_part, local))
            if not url.startswith("https://"):
                raise RenderError(f"{url_part.label}: must be an https:// URL", url_part.label)
            uris.append(f"<{url}>")
        header = ", ".join(uris)
        # Checked as the message will write it: a recipient's value may make it too long. Only
        # a line over MAX_LINE can fail (`_uri` let through printable ASCII only, no spaces).
        if len("List-Unsubscribe: ") + len(header) > MAX_LINE:
            try:
                structured_header("List-Unsubscribe", header)
            except ValueError as exc:  # (refused there, it stopped the run, the batch in doubt)
                part = url_part or mailto_part
                label = "email list_unsubscribe" if part is None else part.label
                raise RenderError(f"{label}: {exc}", label) from None
        if url_part is not None and self._one_click:
            return (
                ("List-Unsubscribe", header),
                ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"),
            )
        return (("List-Unsubscribe", header),)

    def _push(self, local: dict[str, Any]) -> PushContent:
        parts = self._parts[Channel.PUSH]
        title = self._run(parts["title"], local).strip()
        body = self._run(parts["body"], local).strip()
        if not title and not body:
            raise RenderError("push: title and body both rendered empty", "push body")
        data = {
            name[5:]: self._run(part, local)
            for name, part in parts.items()
            if name.startswith("data.")
        }
        # Cheap bound first: JSON takes at most 6 bytes per character (\u00XX) plus the frame.
        chars = len(title) + len(body) + sum(len(k) + len(v) + 6 for k, v in data.items())
        if 6 * chars + 64 > PUSH_PAYLOAD_LIMIT:
            payload = {"notification": {"title": title, "body": body}, "data": data}
            size = len(json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode())
            if size > PUSH_PAYLOAD_LIMIT:
                raise RenderError(
                    f"push: payload is {size} bytes, over the {PUSH_PAYLOAD_LIMIT}-byte limit",
                    "push body",
                )
        return PushContent(title, body, data)

    def _webhook(self, local: dict[str, Any]) -> WebhookContent:
        part = self._parts[Channel.WEBHOOK]["body"]
        text = self._run(part, local)
        if not text.strip():
            raise RenderError("webhook body: rendered to nothing", "webhook body")
        if part.json_body:
            try:
                data = json.loads(text)
            except ValueError as exc:
                raise RenderError(
                    f"webhook body: the template is a JSON object but this recipient's values "
                    f"made it invalid JSON ({exc}); print values inside quotes or with | tojson",
                    "webhook body",
                ) from None
            if not isinstance(data, dict):
                raise RenderError("webhook body: rendered to JSON that is not an object",
                                  "webhook body")
        return WebhookContent(text, part.json_body)


# --------------------------------------------------------------------------------------------
# Compile-time helpers


class _Compiler:
    """Reads, hashes and compiles templates, turning every problem into a `ConfigError`."""

    def __init__(self, campaign: Campaign, source: LoadedCampaign | None) -> None:
        self.campaign = campaign
        self.source = source
        self.hashes: dict[str, str] = {}
        self.text_env = _environment(autoescape=False)
        self.html_env = _environment(autoescape=True)
        # Autoescaped so that macros and block sets yield Markup, which is never escaped twice;
        # `slack_text` escapes everything else first, so HTML escaping adds nothing to it.
        self.slack_env = _environment(autoescape=True, finalize=slack_text)
        # The same for a JSON webhook body: every value printed is JSON string content.
        self.json_env = _environment(autoescape=True, finalize=json_text)

    def where(self, loc: tuple[str, ...]) -> tuple[str, int | None]:
        if self.source is None:
            return "<campaign>", None
        return str(self.source.path), self.source.line_of(*loc)

    def error(
        self, loc: tuple[str, ...], message: str, file: str | None = None, line: int | None = None
    ) -> ConfigError:
        if file is None:
            file, line = self.where(loc)
        if self.source is not None:
            message = redact(message, self.source.secrets)
        return ConfigError(file, line, ".".join(loc), message)

    def inline(
        self, label: str, loc: tuple[str, ...], text: str, html: bool = False, slack: bool = False
    ) -> _Part:
        return self._compile(label, loc, text, None, html, slack)

    def file(
        self, label: str, loc: tuple[str, ...], path: Path, html: bool = False, slack: bool = False
    ) -> _Part:
        try:
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as exc:
            raise self.error(loc, f"template is not UTF-8: {exc.reason}", str(path)) from None
        except OSError as exc:
            raise self.error(
                loc, f"cannot read template: {exc.strerror or exc}", str(path)
            ) from None
        return self._compile(label, loc, text, path, html, slack)

    def body(
        self,
        label: str,
        loc: tuple[str, ...],
        config: SmsChannel | PushChannel | WebhookChannel,
        slack: bool = False,
        webhook: bool = False,
    ) -> _Part:
        if config.template is not None:
            part = self.file(label, (*loc, "template"), config.template, slack=slack)
        else:
            assert config.body is not None
            part = self.inline(label, (*loc, "body"), config.body, slack=slack)
        if not webhook or slack:  # (Slack takes text: its bodies stay text)
            return part
        kind = _json_kind(part.template.environment.parse(_source_of(part, config)))
        if kind is None:
            return part
        if kind == "literal":  # compiled again, with every printed value escaped for JSON
            source = _source_of(part, config)
            part = self._compile(label, (*loc, "template" if config.template else "body"),
                                 source, config.template, False, json_escape=True)
        return dataclasses.replace(part, json_body=True)

    def _compile(
        self,
        label: str,
        loc: tuple[str, ...],
        text: str,
        path: Path | None,
        html: bool,
        slack: bool = False,
        json_escape: bool = False,
    ) -> _Part:
        field = ".".join(loc)
        self.hashes[field] = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
        if not text.isascii() and _SURROGATE.search(text):
            # YAML's "\\u" escapes are UTF-16 code units: "\\ud83d\\ude00" is one emoji.
            try:
                text = _join_surrogates(text)
            except UnicodeDecodeError:
                raise self.error(loc, f"the template {_LONE_SURROGATE}") from None
        env = (self.html_env if html else self.slack_env if slack
               else self.json_env if json_escape else self.text_env)
        try:
            tree = env.parse(text)
            template = env.from_string(tree)
            # A snapshot of the globals (a ChainMap over the environment's, which never change
            # after compiling): each render's Context copies their keys, and iterating a
            # ChainMap cost a tenth of a render (measured).
            template.globals = dict(template.globals)
        except jinja2.TemplateSyntaxError as exc:
            message = f"template syntax error: {exc.message}"
            if path is not None:
                raise self.error(loc, message, str(path), exc.lineno) from None
            if self.source is None:
                raise self.error(loc, message, "<campaign>", exc.lineno) from None
            if "\n" in text:
                message += f" (line {exc.lineno} of the template)"
            raise self.error(loc, message) from None
        except (RecursionError, SyntaxError, ValueError, OverflowError, MemoryError) as exc:
            # Nesting deeper than Jinja's parser or Python's compiler can take, or a constant
            # expression Jinja folds into something it cannot write (`2 ** 20000`).
            problem = "nested too deeply" if isinstance(exc, (RecursionError, SyntaxError)) \
                else f"{type(exc).__name__}: {exc}"
            raise self.error(loc, f"template cannot be compiled: {problem}",
                             None if path is None else str(path)) from None
        names = frozenset(meta.find_undeclared_variables(tree))
        constant = template.render() if _is_constant(tree) else None
        return _Part(label, field, template, constant, "\n" in text.rstrip("\n"), names,
                     _simple(tree), html, slack, json_escape=json_escape)

    def check_email(self, config: EmailChannel) -> None:
        loc = ("channels", "email")
        # Not templates, so not joined when compiled: `_email_static` joins them.
        values: list[tuple[tuple[str, ...], str]] = [(("from",), config.sender)]
        if config.reply_to is not None:
            values.append((("reply_to",), config.reply_to))
        values += [(("headers", name), value) for name, value in config.headers.items()]
        for key, value in values:
            if not value.isascii() and _SURROGATE.search(value):
                try:
                    _join_surrogates(value)
                except UnicodeDecodeError:
                    raise self.error((*loc, *key), f"the value {_LONE_SURROGATE}") from None
        try:
            format_mailbox(config.sender, "From")
        except ValueError as exc:
            raise self.error((*loc, "from"), str(exc)) from None
        if config.reply_to is not None:
            try:
                format_mailbox(config.reply_to, "Reply-To")
            except ValueError as exc:
                raise self.error((*loc, "reply_to"), str(exc)) from None
        for name in config.headers:
            if name.lower() in _EMAIL_HEADERS_SET:
                raise self.error(
                    (*loc, "headers", name),
                    f"header {name} is set by campaign-cli itself"
                    + (" (use list_unsubscribe)" if name.lower().startswith("list-unsub") else ""),
                )

    def check_opt_out(self, part: _Part, loc: tuple[str, ...], config: SmsChannel) -> None:
        """A marketing SMS that says the same to everyone can be checked once, now."""
        if part.constant is None or _OPT_OUT.search(part.constant):
            return
        key = (*loc, "template" if config.template is not None else "body")
        if config.template is not None:
            raise self.error(key, _OPT_OUT_MESSAGE, str(config.template), None)
        raise self.error(key, _OPT_OUT_MESSAGE)


def slack_text(value: Any) -> markupsafe.Markup:
    """``value`` as Slack text that formats nothing: ``&``, ``<`` and ``>`` (its only control
    characters) as ``&amp;``, ``&lt;``, ``&gt;``, as Slack's "formatting text" guide asks (not
    quotes: Slack would show ``&#39;`` as it is). Markup (``| safe``, a macro's output) is the
    template's own and is left as it is."""
    if isinstance(value, markupsafe.Markup):
        return value
    text = str(value).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return markupsafe.Markup(text)  # noqa: S704 - escaped for Slack on the line above


def json_text(value: Any) -> markupsafe.Markup:
    """``value`` as the inside of a JSON string (quotes, backslashes and control characters
    escaped), for a webhook body written as a JSON object: a recipient's name cannot close its
    string and add keys. Markup (``| tojson``, ``| safe``, a macro's output) is left as it is."""
    if isinstance(value, markupsafe.Markup):
        return value
    return markupsafe.Markup(json.dumps(str(value), ensure_ascii=False)[1:-1])  # noqa: S704


def _json_kind(tree: nodes.Template) -> str | None:
    """Whether a webhook body is a JSON object, from its template alone (never from what a
    recipient's values render to): ``"literal"`` when its text starts with ``{`` (a JSON object
    written out, its values printed into it), ``"tojson"`` when it is one expression ending in
    ``| tojson``, None for text."""
    body = list(tree.body)
    if not body or not isinstance(body[0], nodes.Output):
        return None
    items = [n for n in body[0].nodes
             if not (isinstance(n, nodes.TemplateData) and not n.data.strip())]
    if not items:
        return None
    head = items[0]
    if isinstance(head, nodes.TemplateData):
        return "literal" if head.data.lstrip().startswith("{") else None
    if len(body) == 1 and len(items) == 1 and isinstance(head, nodes.Filter) \
            and head.name == "tojson":
        return "tojson"
    return None


def _source_of(part: _Part, config: SmsChannel | PushChannel | WebhookChannel) -> str:
    if config.template is not None:
        return config.template.read_text(encoding="utf-8-sig")
    assert config.body is not None
    return config.body


def _environment(
    autoescape: bool, finalize: Callable[[Any], Any] | None = None
) -> ImmutableSandboxedEnvironment:
    return ImmutableSandboxedEnvironment(
        undefined=jinja2.StrictUndefined,
        autoescape=autoescape,
        finalize=finalize,
        keep_trailing_newline=False,
        auto_reload=False,
    )


def _is_constant(tree: nodes.Template) -> bool:
    """True when the template is only text: no expression, tag or comment that does anything."""
    return all(
        isinstance(node, nodes.Output)
        and all(isinstance(child, nodes.TemplateData) for child in node.nodes)
        for node in tree.body
    )


def _simple(tree: nodes.Template) -> tuple[tuple[str, str | None], ...] | None:
    """The template as (text, variable) pairs, if it is only text and ``{{ name }}``s."""
    pairs: list[tuple[str, str | None]] = []
    text: list[str] = []
    for node in tree.body:
        if not isinstance(node, nodes.Output):
            return None
        for child in node.nodes:
            if isinstance(child, nodes.TemplateData):
                text.append(child.data)
            elif isinstance(child, nodes.Name) and child.ctx == "load":
                pairs.append(("".join(text), child.name))
                text = []
            else:
                return None
    pairs.append(("".join(text), None))
    return tuple(pairs)


_MISSING = object()


def _substitute(part: _Part, local: dict[str, Any], base: dict[str, Any]) -> str | None:
    """What Jinja's code for a simple template yields (`str` of each value, markupsafe's
    `escape` where the template autoescapes HTML, `slack_text` for Slack; names resolved in the
    render's variables, then the base context), without building a Context. None when a name is
    missing or a value will not convert: the caller then renders with Jinja, which raises the
    error it always raised."""
    assert part.simple is not None
    convert = (markupsafe.escape if part.html else slack_text if part.slack
               else json_text if part.json_escape else str)
    out: list[str] = []
    try:
        for text, name in part.simple:
            out.append(text)
            if name is not None:
                value = local.get(name, _MISSING)
                if value is _MISSING:
                    value = base.get(name, _MISSING)
                    if value is _MISSING:
                        return None
                out.append(convert(value))
    except Exception:  # noqa: BLE001 - Jinja renders it again and reports it as it always did
        return None
    return "".join(out)


def _email_static(
    config: EmailChannel | None,
) -> tuple[str, str | None, tuple[tuple[str, str], ...]]:
    if config is None:
        return "", None, ()
    # YAML's "\\u" escapes are UTF-16 code units: "\\ud83d\\ude00" is one emoji (lone halves
    # were refused by `_Compiler.check_email`).
    return (
        _whole(config.sender),
        None if config.reply_to is None else _whole(config.reply_to),
        tuple((name, _whole(value)) for name, value in config.headers.items()),
    )


def _whole(text: str) -> str:
    return _join_surrogates(text) if not text.isascii() and _SURROGATE.search(text) else text


def _join_surrogates(text: str) -> str:
    """Each UTF-16 surrogate pair of ``text`` as the one character it encodes (what YAML's and
    Jinja's ``\\uD83D\\uDE00`` escapes give); `UnicodeDecodeError` for a lone surrogate."""
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le")


def _whole_characters(part: _Part, text: str) -> str:
    """``text`` with its surrogate pairs joined (values from YAML ``vars`` may hold them); a lone
    surrogate cannot be encoded for any provider, so it fails the recipient, not the run."""
    if not _SURROGATE.search(text):
        return text
    try:
        return _join_surrogates(text)
    except UnicodeDecodeError:
        raise RenderError(f"{part.label}: {_LONE_SURROGATE}", part.label) from None


def _uri(part: _Part, value: str) -> str:
    value = value.strip()
    if not _URI.fullmatch(value):
        raise RenderError(
            f"{part.label}: {value!r} is not a URI that can go in a header "
            "(no spaces, brackets, commas or non-ASCII: use | urlencode)",
            part.label,
        )
    return value


def _describe(part: _Part, exc: Exception) -> str:
    """``sms body: 'first_name' is undefined``, with the template line when it has several."""
    if isinstance(exc, jinja2.TemplateError):
        problem = exc.message or type(exc).__name__
    else:
        problem = f"{type(exc).__name__}: {exc}"
    where = part.label
    if part.multiline:
        line = None
        tb = exc.__traceback__
        while tb is not None:
            if tb.tb_frame.f_code.co_filename == _TEMPLATE_FILENAME:
                line = part.template.get_corresponding_lineno(tb.tb_lineno)
            tb = tb.tb_next
        if line is not None:
            where = f"{where} (line {line})"
    return f"{where}: {problem}"
