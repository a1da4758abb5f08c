"""The campaign file: pydantic models, loading, ``${ENV}`` secrets and line-numbered errors.

A campaign is a YAML file. Paths in it are relative to the file (``~`` is the home directory).
Every mistake is reported as one ``FILE:LINE: key.path: message`` line (`ConfigError`, exit
code 2). Values written as ``${NAME}`` come from the environment; an unset variable is an error
naming it, and every value taken from the environment is remembered in `LoadedCampaign.secrets`
so that output can redact it.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    model_validator,
)

from campaign_cli.errors import ConfigError, redact
from campaign_cli.models import Channel, Purpose, url_refusal

# --------------------------------------------------------------------------------------------
# Field types


def _parse_rate(value: Any) -> Any:
    """``30/s``, ``100/min``, ``3600/h`` or a bare number (per second) -> messages per second."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        # The unit is optional: a bare number is per second, also as a string (from `${ENV}`).
        m = re.fullmatch(
            r"\s*([0-9]*\.?[0-9]+)\s*(?:/\s*(s|sec|second|m|min|minute|h|hour)\s*)?", value
        )
        if not m:
            raise ValueError("a rate looks like 30/s, 100/min or 3600/h")
        per = {None: 1, "s": 1, "sec": 1, "second": 1, "m": 60, "min": 60,
               "minute": 60}.get(m[2], 3600)
        return float(m[1]) / per
    raise ValueError("a rate looks like 30/s, 100/min or 3600/h")


def _positive(v: float) -> float:
    if not math.isfinite(v):  # .nan passes any comparison; .inf broke the pacer
        raise ValueError("must be a finite number (leave rate out for no limit)")
    if v <= 0:
        raise ValueError("must be greater than 0")
    return v


MIN_RATE = 0.001  # per second (3.6/h): as `--rate`; below it one message, then weeks of waiting


def _rate(v: float) -> float:
    if _positive(v) < MIN_RATE:
        raise ValueError(f"at least {MIN_RATE}/s (3.6/h): a slower rate waits weeks between sends")
    return v


Rate = Annotated[float, BeforeValidator(_parse_rate), AfterValidator(_rate)]


def _not_empty(v: object) -> object:
    """An empty path would name the campaign's own folder: refused, naming the key."""
    if isinstance(v, str) and not v.strip():
        raise ValueError("must not be empty")
    return v


def _relative_to_campaign(v: Path, info: ValidationInfo) -> Path:
    try:
        v = v.expanduser()  # "~/outbox" is in the home directory, not a folder named "~"
    except RuntimeError:
        raise ValueError(f"no home directory for {v.parts[0]}") from None
    base = (info.context or {}).get("base_dir")
    if base is not None and not v.is_absolute():
        v = Path(base) / v
    return Path(os.path.normpath(v))


def _must_be_file(v: Path) -> Path:
    if not v.is_file():
        raise ValueError(f"file not found: {v}")
    return v


def _folder_or_nothing(v: Path) -> Path:
    if v.exists() and not v.is_dir():
        raise ValueError(f"not a folder: {v}")
    return v


RelPath = Annotated[Path, BeforeValidator(_not_empty), AfterValidator(_relative_to_campaign)]
ExistingFile = Annotated[Path, BeforeValidator(_not_empty), AfterValidator(_relative_to_campaign),
                         AfterValidator(_must_be_file)]
#: A folder that may not exist yet (made when first written to), but is not a file.
Folder = Annotated[Path, BeforeValidator(_not_empty), AfterValidator(_relative_to_campaign),
                   AfterValidator(_folder_or_nothing)]
Money = Annotated[Decimal, Field(ge=0, max_digits=18, decimal_places=6)]


def _callback_url(v: str) -> str:
    """A URL Twilio takes as ``StatusCallback``; it answers 21609 to every message otherwise:
    http(s), a host name without underscores, no spaces, at most 4000 characters."""
    m = re.match(r"https?://([^/?#@\s]*@)?(\[[0-9A-Fa-f:.]+\]|[^/?#:\s]+)(:[0-9]+)?"
                r"([/?#]\S*)?$", v)
    if m is None or "_" in m[2] or len(v) > 4000 or not v.isprintable():
        raise ValueError("must be a full http:// or https:// URL (a host name without "
                         "underscores, no spaces, at most 4000 characters)")
    return v


CallbackUrl = Annotated[str, AfterValidator(_callback_url)]


def _breaks_a_line(value: str) -> bool:
    return any(c in value for c in "\r\n\0")


def _is_header_name(value: str) -> bool:
    return re.fullmatch(r"[!-9;-~]+", value) is not None  # visible ASCII, no colon


def _one_line(value: str) -> str:
    if _breaks_a_line(value):
        raise ValueError("contains a line break or NUL (a value read from a file with its "
                         "newline?)")
    return value


def _header_value(value: str) -> str:
    _one_line(value)
    if re.fullmatch(r"[\t\x20-\x7e]*", value) is None:
        raise ValueError("holds a character an HTTP header cannot carry: a control character, "
                         "or a non-ASCII one (a zero-width or no-break space pasted with a key?)")
    return value


def _url_text(value: str) -> str:
    if any(ord(c) < 0x20 or c == "\x7f" for c in value):
        raise ValueError("contains a control character or line break (a value read from a file "
                         "with its newline?)")
    refused = url_refusal(value) if re.match(r"https?://", value, re.IGNORECASE) else None
    if refused is not None:  # refused mid-run, it left a message in doubt and stopped the run
        raise ValueError(f"not a URL the HTTP client can send to ({refused})")
    return value


def _header_name(value: str) -> str:
    if not _is_header_name(value):
        raise ValueError("not a valid header field name")
    return value


#: A value that goes into an HTTP request's header or its URL (a key, a token, a webhook URL):
#: a line break there makes the client refuse the request mid-run, or split a header.
OneLine = Annotated[str, AfterValidator(_one_line)]
#: A URL: no control character at all (the HTTP client refuses any, mid-run).
UrlText = Annotated[str, AfterValidator(_url_text)]
#: A value sent as an HTTP header's (a bearer token, a webhook's headers): httpx encodes it as
#: ASCII and aiohttp refuses control characters, each mid-run.
HeaderValue = Annotated[str, AfterValidator(_header_value)]
HeaderName = Annotated[str, AfterValidator(_header_name)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


# --------------------------------------------------------------------------------------------
# Recipients


class Columns(_Model):
    """Which CSV column holds each channel's address."""

    phone: str | None = None
    email: str | None = None
    push_token: str | None = None
    webhook_url: str | None = None

    def for_channel(self, channel: Channel) -> str | None:
        return {
            Channel.SMS: self.phone,
            Channel.EMAIL: self.email,
            Channel.PUSH: self.push_token,
            Channel.WEBHOOK: self.webhook_url,
        }[channel]


class RecipientsConfig(_Model):
    file: RelPath | None = None
    key: str = Field(min_length=1)
    columns: Columns = Columns()
    default_region: str = Field(default="US", pattern=r"^[A-Z]{2}$")
    delimiter: str = Field(default=",", min_length=1, max_length=1)


# --------------------------------------------------------------------------------------------
# Channels


ProviderRef = Annotated[
    Union[str, list[str]],
    Field(description="a provider name, or a list: the primary first, then failovers"),
]


def _names(ref: str | list[str]) -> tuple[str, ...]:
    return (ref,) if isinstance(ref, str) else tuple(ref)


class _Inline(_Model):
    """A channel whose body is a template: inline (``body``) or in a file (``template``)."""

    provider: ProviderRef

    @property
    def provider_names(self) -> tuple[str, ...]:
        return _names(self.provider)
    body: str | None = None
    template: ExistingFile | None = None

    @model_validator(mode="after")
    def _one_body(self) -> _Inline:
        if (self.body is None) == (self.template is None):
            raise ValueError("give exactly one of body (inline) or template (a file)")
        return self


class SmsChannel(_Inline):
    pass


class WebhookChannel(_Inline):
    pass


class PushChannel(_Inline):
    title: str
    data: dict[str, str] = {}


class ListUnsubscribe(_Model):
    """RFC 2369 / RFC 8058 unsubscribe targets; both are templates (``{{ unsubscribe_token }}``)."""

    url: str | None = None
    mailto: str | None = None
    one_click: bool = True

    @model_validator(mode="after")
    def _some_target(self) -> ListUnsubscribe:
        if not self.url and not self.mailto:
            raise ValueError("give url (https) and/or mailto")
        if self.url and not self.url.startswith("https://"):
            raise ValueError("url must be https:// (RFC 8058 one-click needs HTTPS)")
        return self


class EmailChannel(_Model):
    provider: ProviderRef
    sender: str = Field(alias="from", min_length=3)
    reply_to: str | None = None
    subject: str = Field(min_length=1)
    text: ExistingFile | None = None
    html: ExistingFile | None = None
    headers: dict[str, str] = {}
    list_unsubscribe: ListUnsubscribe | None = None

    @property
    def provider_names(self) -> tuple[str, ...]:
        return _names(self.provider)

    @model_validator(mode="after")
    def _some_body(self) -> EmailChannel:
        if self.text is None and self.html is None:
            raise ValueError("give text and/or html (template files)")
        for name, value in self.headers.items():
            if not _is_header_name(name):
                raise _Located(("headers", name), "not a valid header field name")
            if _breaks_a_line(value):
                raise _Located(("headers", name), f"header {name} contains a line break")
        return self


class Channels(_Model):
    """The channels to send on, in order of preference (the order written in the file)."""

    sms: SmsChannel | None = None
    email: EmailChannel | None = None
    push: PushChannel | None = None
    webhook: WebhookChannel | None = None
    _order: tuple[Channel, ...] = PrivateAttr(default=())

    @model_validator(mode="wrap")
    @classmethod
    def _keep_order(cls, data: Any, handler: Any) -> Channels:
        model: Channels = handler(data)
        keys = data.keys() if isinstance(data, Mapping) else ()
        model._order = tuple(Channel(k) for k in keys if getattr(model, str(k), None) is not None)
        return model

    @model_validator(mode="after")
    def _at_least_one(self) -> Channels:
        if not any((self.sms, self.email, self.push, self.webhook)):
            raise ValueError("name at least one channel (sms, email, push, webhook)")
        return self

    def enabled(self) -> tuple[Channel, ...]:
        if self._order:
            return self._order
        return tuple(c for c in Channel if getattr(self, c.value) is not None)

    def get(self, channel: Channel) -> SmsChannel | EmailChannel | PushChannel | WebhookChannel:
        config = getattr(self, channel.value)
        assert config is not None
        return config  # type: ignore[no-any-return]


# --------------------------------------------------------------------------------------------
# Providers


class RetryConfig(_Model):
    attempts: int = Field(default=4, ge=1, le=20)
    backoff: float = Field(default=0.5, gt=0, le=60)
    max_backoff: float = Field(default=30.0, gt=0, le=3600)


class _ProviderBase(_Model):
    rate: Rate | None = None
    burst: int | None = Field(default=None, ge=1)
    concurrency: int | None = Field(default=None, ge=1, le=1024)
    price_per_message: Money = Decimal(0)
    price_per_segment: Money = Decimal(0)
    retry: RetryConfig = RetryConfig()


class OutboxProviderConfig(_ProviderBase):
    """Writes each message to a file in ``dir``: ``.eml`` for email, ``.json`` for the others."""

    type: Literal["outbox"]
    dir: Folder


class ConsoleProviderConfig(_ProviderBase):
    """Writes each message as one JSON line to standard output."""

    type: Literal["console"]


class _HttpProvider(_ProviderBase):
    """Every HTTP provider: where it is, how long to wait, how to pace it."""

    base_url: UrlText | None = None  # each type has its own default
    timeout: float = Field(default=10.0, gt=0, le=300)

    @model_validator(mode="after")
    def _http_url(self) -> _HttpProvider:
        if self.base_url is not None and not re.match(r"https?://[^\s/]+", self.base_url):
            raise ValueError("base_url must be an http:// or https:// URL")
        return self


class TwilioProviderConfig(_HttpProvider):
    """Twilio Messages API (SMS): form-encoded POST, HTTP Basic with the account SID and token
    (or an API key SID and secret)."""

    type: Literal["twilio"]
    account_sid: str = Field(pattern=r"^AC[0-9a-fA-F]{32}$")
    auth_token: OneLine = Field(min_length=1)
    api_key_sid: str | None = Field(default=None, pattern=r"^SK[0-9a-fA-F]{32}$")
    sender: str | None = Field(default=None, alias="from")
    messaging_service_sid: str | None = Field(default=None, pattern=r"^MG[0-9a-fA-F]{32}$")
    status_callback: CallbackUrl | None = None

    @model_validator(mode="after")
    def _one_sender(self) -> TwilioProviderConfig:
        if (self.sender is None) == (self.messaging_service_sid is None):
            raise ValueError("give exactly one of from (a phone number) or messaging_service_sid")
        return self


class SendGridProviderConfig(_HttpProvider):
    """SendGrid v3 mail/send (email): JSON, Bearer API key."""

    type: Literal["sendgrid"]
    api_key: HeaderValue = Field(min_length=1)


class SmtpProviderConfig(_ProviderBase):
    """Any SMTP server (email), through a pool of connections (one per concurrent send)."""

    type: Literal["smtp"]
    host: str = Field(min_length=1)
    port: int | None = Field(default=None, ge=1, le=65535)
    security: Literal["starttls", "tls", "none"] = "starttls"
    username: str | None = None
    password: str | None = None
    timeout: float = Field(default=30.0, gt=0, le=300)
    helo: str | None = None


class FcmProviderConfig(_HttpProvider):
    """Firebase Cloud Messaging HTTP v1 (push). Credentials: an OAuth access token, or a service
    account file from which tokens are fetched at ``token_url``."""

    type: Literal["fcm"]
    project_id: str = Field(min_length=1)
    access_token: HeaderValue | None = None
    service_account_file: ExistingFile | None = None
    token_url: UrlText = "https://oauth2.googleapis.com/token"  # noqa: S105 - a URL, not a secret

    @model_validator(mode="after")
    def _one_credential(self) -> FcmProviderConfig:
        if (self.access_token is None) == (self.service_account_file is None):
            raise ValueError("give exactly one of access_token or service_account_file")
        return self


class SlackProviderConfig(_HttpProvider):
    """A Slack incoming webhook: its URL is the secret (use ``${SLACK_WEBHOOK_URL}``)."""

    type: Literal["slack"]
    url: UrlText = Field(pattern=r"^https?://")


class WebhookProviderConfig(_HttpProvider):
    """A generic JSON POST, signed with HMAC-SHA256 and carrying an ``Idempotency-Key`` header.
    ``url`` is the endpoint unless the recipient file has a webhook_url column."""

    type: Literal["webhook"]
    url: UrlText | None = Field(default=None, pattern=r"^https?://")
    secret: OneLine | None = None
    signature_header: HeaderName = "X-Campaign-Signature"
    headers: dict[HeaderName, HeaderValue] = {}
    #: ``headers`` go to ``url`` only, not to the URLs a recipient file names (which may be
    #: anyone's, and headers usually carry the operator's credentials), unless this says so.
    headers_to_recipient_urls: bool = False
    #: A recipient file's URLs may reach public addresses only (not loopback, private networks,
    #: link-local cloud metadata, ...: `campaign_cli.providers.public`), unless this says so.
    #: ``url`` is the campaign author's own choice and is never checked.
    allow_private_urls: bool = False


ProviderConfig = Annotated[
    Union[
        OutboxProviderConfig,
        ConsoleProviderConfig,
        TwilioProviderConfig,
        SendGridProviderConfig,
        SmtpProviderConfig,
        FcmProviderConfig,
        SlackProviderConfig,
        WebhookProviderConfig,
    ],
    Field(discriminator="type"),
]


#: Which channels each provider type can carry.
PROVIDER_CHANNELS: dict[str, frozenset[Channel]] = {
    "outbox": frozenset(Channel),
    "console": frozenset(Channel),
    "twilio": frozenset({Channel.SMS}),
    "sendgrid": frozenset({Channel.EMAIL}),
    "smtp": frozenset({Channel.EMAIL}),
    "fcm": frozenset({Channel.PUSH}),
    "slack": frozenset({Channel.WEBHOOK}),
    "webhook": frozenset({Channel.WEBHOOK}),
}

# --------------------------------------------------------------------------------------------
# The campaign


class CircuitBreaker(_Model):
    """When a channel names several providers: after ``threshold`` consecutive transient failures
    or connection errors a provider's circuit opens and traffic goes to the next one; after
    ``cooldown`` seconds one probe message tries the provider again."""

    threshold: int = Field(default=5, ge=1, le=1000)
    cooldown: float = Field(default=30.0, gt=0, le=3600)


class Limits(_Model):
    concurrency: int = Field(default=16, ge=1, le=1024)
    circuit_breaker: CircuitBreaker = CircuitBreaker()
    max_spend: Money | None = None
    currency: str = Field(default="USD", pattern=r"^[A-Z]{3}$")


class Compliance(_Model):
    consent: Literal["required", "not_required"] | None = None
    in_doubt: Literal["resend", "skip"] | None = None
    suppression_lists: list[ExistingFile] = []
    consent_records: list[ExistingFile] = []


#: Data keys FCM refuses (400 INVALID_ARGUMENT), besides those starting with "google" or "gcm".
_FCM_RESERVED_KEYS = frozenset({"from", "message_type"})


class Campaign(_Model):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
    purpose: Purpose
    recipients: RecipientsConfig
    channels: Channels
    strategy: Literal["all", "first_available"] = "all"
    providers: dict[str, ProviderConfig]
    limits: Limits = Limits()
    compliance: Compliance = Compliance()
    vars: dict[str, Any] = {}

    @model_validator(mode="after")
    def _consistent(self) -> Campaign:
        for channel in self.channels.enabled():
            config = self.channels.get(channel)
            names = config.provider_names
            if not names or len(set(names)) != len(names):
                raise _Located(("channels", channel.value, "provider"),
                               "name one provider, or a list of distinct providers")
            for name in names:
                if name not in self.providers:
                    known = ", ".join(sorted(self.providers)) or "none"
                    raise _Located(
                        ("channels", channel.value, "provider"),
                        f"no provider named {name!r} (providers: {known})",
                    )
                kind = self.providers[name].type
                if channel not in PROVIDER_CHANNELS[kind]:
                    raise _Located(
                        ("channels", channel.value, "provider"),
                        f"provider {name!r} (type {kind}) cannot send {channel.value}",
                    )
            push = self.channels.push
            if channel is Channel.PUSH and push is not None and any(
                self.providers[name].type == "fcm" for name in names
            ):
                for key in push.data:
                    if not key or key in _FCM_RESERVED_KEYS or key.startswith(("google", "gcm")):
                        raise _Located(
                            ("channels", "push", "data", key),
                            "FCM reserves this data key (from, message_type, anything starting "
                            "with google or gcm) and refuses every message that uses it",
                        )
            column = self.recipients.columns.for_channel(channel)
            if column is None and channel is not Channel.WEBHOOK:
                field = {Channel.SMS: "phone", Channel.EMAIL: "email", Channel.PUSH: "push_token"}
                raise _Located(
                    ("recipients", "columns"),
                    f"channel {channel.value} needs recipients.columns.{field[channel]}",
                )
        email = self.channels.email
        if email and self.purpose is Purpose.MARKETING and email.list_unsubscribe is None:
            raise _Located(
                ("channels", "email"),
                "marketing email needs list_unsubscribe (RFC 8058 one-click unsubscribe)",
            )
        return self

    @property
    def consent_required(self) -> bool:
        if self.compliance.consent is None:
            return self.purpose is Purpose.MARKETING
        return self.compliance.consent == "required"

    def providers_in_use(self) -> tuple[str, ...]:
        """The providers some channel sends through (primaries and failovers), each once, in
        the order the channels name them. A provider no channel names sends nothing."""
        names: dict[str, None] = {}
        for channel in self.channels.enabled():
            names.update(dict.fromkeys(self.channels.get(channel).provider_names))
        return tuple(names)

    @property
    def in_doubt_policy(self) -> Literal["resend", "skip"]:
        if self.compliance.in_doubt is None:
            return "skip" if self.purpose is Purpose.MARKETING else "resend"
        return self.compliance.in_doubt


class _Located(ValueError):
    """A cross-field error that knows which key it is about (relative to the model raising it)."""

    def __init__(self, loc: tuple[str, ...], message: str) -> None:
        super().__init__(message)
        self.loc = loc
        self.message = message


# --------------------------------------------------------------------------------------------
# Loading


@dataclass(frozen=True)
class LoadedCampaign:
    campaign: Campaign
    path: Path
    secrets: frozenset[str]
    lines: Mapping[tuple[str, ...], int]

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    def line_of(self, *loc: str) -> int | None:
        return _line_for(self.lines, loc)


#: ``$$``, ``${NAME}``, or a shell spelling with a default or a check (``${NAME:-x}``), which is
#: refused rather than left as it is (the literal text would go out as the credential).
_ENV_REF = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-=?+])[^}]*)?\}")


def load_campaign(path: Path | str, env: Mapping[str, str] | None = None) -> LoadedCampaign:
    """Read, substitute, validate. Raises `ConfigError` with file, line and key path."""
    path = Path(path)
    shown = str(path)
    env = os.environ if env is None else env
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(shown, None, None, "campaign file not found") from None
    except OSError as exc:
        raise ConfigError(shown, None, None, f"cannot read campaign file: {exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            shown, raw.count(b"\n", 0, exc.start) + 1, None,
            f"not UTF-8: byte 0x{raw[exc.start]:02x} (save the file as UTF-8)",
        ) from None
    try:
        node = yaml.compose(text, Loader=_DepthLimitedLoader)  # first: safe_load recurses too
        data = yaml.load(text, Loader=_SafeLoader)  # noqa: S506 - a SafeLoader
    except yaml.MarkedYAMLError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else None
        raise ConfigError(shown, line, None, f"not valid YAML: {exc.problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(shown, None, None, f"not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(
            shown, 1, None, "a campaign file is a mapping of keys (name, purpose, ...)"
        )
    lines: dict[tuple[str, ...], int] = {}
    if node is not None:
        _collect_lines(node, (), lines, shown, set(), [_MAX_ALIAS_EXPANSION])

    secrets: set[str] = set()

    def substitute(value: Any, loc: tuple[str, ...]) -> Any:
        if isinstance(value, str):

            def repl(m: re.Match[str]) -> str:
                if m[0] == "$$":
                    return "$"
                name = m[1]
                if m[2] is not None:
                    raise ConfigError(
                        shown, _line_for(lines, loc), ".".join(loc),
                        f"${{{name}{m[2]}...}}: defaults and checks are not supported: "
                        f"write ${{{name}}} and set {name} (write $$ for a literal $)",
                    )
                if name not in env:
                    raise ConfigError(
                        shown, _line_for(lines, loc), ".".join(loc),
                        f"environment variable {name} is not set",
                    )
                secret = env[name]
                if secret and (not loc or loc[-1] not in _PLAIN_SETTINGS):
                    secrets.add(secret)
                return secret

            return _ENV_REF.sub(repl, value)
        if isinstance(value, dict):
            return {k: substitute(v, (*loc, str(k))) for k, v in value.items()}
        if isinstance(value, list):
            return [substitute(v, (*loc, str(i))) for i, v in enumerate(value)]
        return value

    data = substitute(data, ())
    try:
        campaign = Campaign.model_validate(data, context={"base_dir": path.resolve().parent})
    except ValidationError as exc:
        raise _config_error(shown, exc, data, lines, secrets) from None
    return LoadedCampaign(campaign, path, frozenset(secrets), lines)


_MAX_DEPTH = 100

#: Keys whose values are settings, not credentials: a `${VAR}` there is not redacted from output
#: (a `max_spend: ${MAX_SPEND}` of 100 would otherwise turn every "100" printed into "***").
#: Anything not named here (tokens, keys, passwords, URLs, headers, ...) is a secret.
_PLAIN_SETTINGS = frozenset({
    "rate", "burst", "concurrency", "timeout", "price_per_message", "price_per_segment",
    "max_spend", "currency", "attempts", "backoff", "max_backoff", "threshold", "cooldown",
    "default_region", "purpose", "strategy", "in_doubt", "consent", "port", "security",
})


class _DepthLimitedLoader(yaml.SafeLoader):
    """PyYAML composes one recursion per level of nesting: a few thousand levels would end in
    RecursionError. Refuse more than `_MAX_DEPTH` levels as bad YAML, at the line where the
    level begins (no campaign needs a tenth of it)."""

    _depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        self._depth += 1
        try:
            if self._depth > _MAX_DEPTH:
                raise yaml.MarkedYAMLError(
                    problem=f"nested more than {_MAX_DEPTH} levels deep",
                    problem_mark=self.peek_event().start_mark,  # type: ignore[no-untyped-call]
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


class _SafeLoader(yaml.SafeLoader):
    """`yaml.SafeLoader`, but a value its explicit tag cannot read (``!!int x``,
    ``!!timestamp 2020-13-45``) is a YAML error at its line: PyYAML's constructors raise
    ValueError, KeyError or AttributeError for those."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except yaml.YAMLError:
            raise
        except (ValueError, KeyError, AttributeError, TypeError, OverflowError):
            tag = str(node.tag).replace("tag:yaml.org,2002:", "!!")
            raise yaml.constructor.ConstructorError(
                None, None, f"this value is not a valid {tag}", node.start_mark
            ) from None


_MERGE_TAG = "tag:yaml.org,2002:merge"
_MAX_ALIAS_EXPANSION = 10_000


def _collect_lines(
    node: yaml.Node,
    loc: tuple[str, ...],
    out: dict[tuple[str, ...], int],
    shown: str,
    seen: set[int],
    budget: list[int],
    alias: tuple[str, ...] | None = None,
) -> None:
    """Note the line of every key path; refuse a key written twice in one mapping (YAML would
    silently keep the last: a pasted second ``consent:`` must not quietly win).

    An alias is the very node of its anchor, met again: every node met again spends ``budget``,
    so that aliases of aliases ("billion laughs") are refused here, at the outermost ``alias``,
    before this walk, the ``${ENV}`` substitution and validation copy them out into billions of
    values."""
    if id(node) in seen:
        alias = alias or loc
        budget[0] -= 1
        if budget[0] < 0:
            raise ConfigError(shown, _line_for(out, alias), ".".join(alias) or None,
                              f"aliases (*name) expand to more than {_MAX_ALIAS_EXPANSION} "
                              "values: write the values out, or alias less")
    else:
        seen.add(id(node))
        out.setdefault(loc, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        first: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = (*loc, str(key_node.value))
            line = key_node.start_mark.line + 1
            if key_node.tag != _MERGE_TAG:  # `<<: *a` merges, and later keys override it
                if key[-1] in first:
                    raise ConfigError(shown, line, ".".join(key),
                                      f"duplicate key (also on line {first[key[-1]]})")
                first[key[-1]] = line
            out[key] = line
            _collect_lines(value_node, key, out, shown, seen, budget, alias)
            out[key] = line
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _collect_lines(item, (*loc, str(i)), out, shown, seen, budget, alias)


def _line_for(lines: Mapping[tuple[str, ...], int], loc: tuple[str, ...]) -> int | None:
    for n in range(len(loc), -1, -1):
        if loc[:n] in lines:
            return lines[loc[:n]]
    return None


def _walk_loc(data: Any, loc: tuple[Any, ...]) -> tuple[str, ...]:
    """Pydantic's error location, less the parts that are not keys of the data (union tags,
    validator names), as a path of keys."""
    path: list[str] = []
    current = data
    for part in loc:
        key = str(part)
        if isinstance(current, dict) and key in current:
            path.append(key)
            current = current[key]
        elif isinstance(current, list) and isinstance(part, int) and part < len(current):
            path.append(key)
            current = current[part]
        elif isinstance(current, dict) and part == loc[-1]:
            path.append(key)  # a missing key: name it
            break
    return tuple(path)


def _config_error(
    shown: str,
    exc: ValidationError,
    data: Any,
    lines: Mapping[tuple[str, ...], int],
    secrets: set[str],
) -> ConfigError:
    errors = exc.errors(include_url=False)
    # A misspelt key also leaves the key it was meant to be missing: name the misspelling.
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = _walk_loc(data, first["loc"])
    ctx = first.get("ctx") or {}
    ctx_error = ctx.get("error")
    if isinstance(ctx_error, _Located):
        loc = (*loc, *ctx_error.loc)
        message = ctx_error.message
    elif first["type"] == "extra_forbidden":
        message = "unknown key"
    elif first["type"] in ("missing", "union_tag_not_found"):
        message = "required key is missing"
    else:
        message = first["msg"].removeprefix("Value error, ")
        given = first.get("input")
        if first["type"] == "string_type" and isinstance(given, (bool, int, float)):
            # YAML 1.1 reads no/yes/on/off as booleans, +1555... and 0755 as numbers.
            kind = "a boolean" if isinstance(given, bool) else "a number"
            message += f" (YAML read this value as {kind}: write it in quotes)"
    if first["type"] in ("union_tag_invalid", "union_tag_not_found"):
        loc = (*loc, str(ctx.get("discriminator", "type")).strip("'"))
    message = redact(message, secrets)
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return ConfigError(shown, _line_for(lines, loc), ".".join(loc) or None, message)


def iter_template_files(campaign: Campaign) -> Iterator[tuple[tuple[str, ...], Path]]:
    """Every template file the campaign names, with the key path that names it."""
    for channel in campaign.channels.enabled():
        config = campaign.channels.get(channel)
        for attr in ("template", "text", "html"):
            value = getattr(config, attr, None)
            if isinstance(value, Path):
                yield ("channels", channel.value, attr), value
