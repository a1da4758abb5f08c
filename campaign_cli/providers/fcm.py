"""Firebase Cloud Messaging, HTTP v1 API (push).

One request per message::

    POST {base_url}/v1/projects/{project_id}/messages:send
    Authorization: Bearer <OAuth 2.0 access token>
    {"message": {"token": <device token>, "notification": {"title", "body"}, "data": {...}}}

200 answers ``{"name": "projects/p/messages/<id>"}``; the name is the provider message id.

The access token is either given (``access_token``, usually ``${FCM_ACCESS_TOKEN}``) or obtained
from a service-account key file with the OAuth 2.0 JWT-bearer grant (RFC 7523): an RS256-signed
assertion (iss = the account's ``client_email``, scope firebase.messaging, aud = the token URL)
is posted to the token URL: the config's ``token_url`` when the campaign sets it (tests point it at
loopback), else the key file's ``token_uri``. A fetched token is kept until a minute
before it expires, and only one refresh runs at a time. A 401 from FCM with a fetched token drops
it, fetches a new one and tries the message once more; a second 401 is an auth error.

Errors (``{"error": {"code", "message", "status", "details": [{"@type": ...FcmError,
"errorCode"}]}}``) map to our classes as PROVIDERS.md section 3 says:

    UNREGISTERED (404), SENDER_ID_MISMATCH (403)  PermanentError, action "suppress": prune the token
    INVALID_ARGUMENT (400)                        the same when the token is what is invalid,
                                                  else a plain PermanentError (the message is bad)
    QUOTA_EXCEEDED (429)                          RateLimitedError (Retry-After)
    UNAVAILABLE (503), INTERNAL (500), 408, 5xx   TransientError (Retry-After)
    DEADLINE_EXCEEDED, 504                        InDoubtError: FCM may have taken it
    THIRD_PARTY_AUTH_ERROR, 401, 403              ProviderAuthError: the run stops
    404 without an FCM error code                 ProviderAuthError: wrong project_id or base_url
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from campaign_cli.clock import Clock
from campaign_cli.config import FcmProviderConfig
from campaign_cli.errors import (
    ConfigError,
    PermanentError,
    ProviderAuthError,
    RateLimitedError,
    TransientError,
)
from campaign_cli.models import Channel, OutboundMessage, PushContent, SendResult
from campaign_cli.providers.base import ProviderContext
from campaign_cli.providers.http import (
    classify_transport_error,
    client_for,
    raise_for_generic_status,
    retry_after,
)
from campaign_cli.providers.process import HttpProcessError, HttpProcessGone

FCM_BASE_URL = "https://fcm.googleapis.com"
FCM_SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
#: A token is refreshed this many seconds before the expiry its endpoint announced.
REFRESH_MARGIN = 60.0
#: What an access token may hold: visible ASCII, as a Bearer header carries it (RFC 6750).
_BEARER = re.compile(r"[\x21-\x7e]+")
#: Google accepts assertions valid for at most an hour.
ASSERTION_LIFETIME = 3600

_FCM_ERROR_TYPE = "google.firebase.fcm.v1.FcmError"
_BAD_REQUEST_TYPE = "google.rpc.BadRequest"
_PRUNE = frozenset({"UNREGISTERED", "SENDER_ID_MISMATCH"})


# --------------------------------------------------------------------------------------------
# Credentials


@dataclass(frozen=True)
class ServiceAccount:
    """The parts of a Google service-account key file that the JWT-bearer grant needs."""

    client_email: str
    private_key: RSAPrivateKey = field(repr=False)
    private_key_id: str | None = None
    token_uri: str | None = None

    @classmethod
    def load(cls, path: Path) -> ServiceAccount:
        """Read and check a key file; every problem is a `ConfigError` that never quotes the key."""

        def bad(message: str) -> ConfigError:
            return ConfigError(str(path), None, None, f"service account file: {message}")

        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise bad(f"cannot read it ({exc.strerror or type(exc).__name__})") from None
        except ValueError:
            raise bad("not JSON") from None
        if not isinstance(data, dict):
            raise bad("not a JSON object")
        for name in ("client_email", "private_key"):
            if not isinstance(data.get(name), str) or not data[name]:
                raise bad(f"no {name} (is this a service-account key file?)")
        try:
            key = load_pem_private_key(data["private_key"].encode(), password=None)
        except (ValueError, TypeError):
            raise bad("private_key is not an unencrypted PEM private key") from None
        if not isinstance(key, RSAPrivateKey):
            raise bad("private_key is not an RSA key")
        kid = data.get("private_key_id")
        uri = data.get("token_uri")
        return cls(
            client_email=data["client_email"],
            private_key=key,
            private_key_id=kid if isinstance(kid, str) and kid else None,
            token_uri=uri if isinstance(uri, str) and uri else None,
        )

    def assertion(self, audience: str, issued_at: int) -> str:
        """The signed JWT for the JWT-bearer grant (RFC 7523 section 2.1)."""
        claims = {
            "iss": self.client_email,
            "scope": FCM_SCOPE,
            "aud": audience,
            "iat": issued_at,
            "exp": issued_at + ASSERTION_LIFETIME,
        }
        headers = {"kid": self.private_key_id} if self.private_key_id else None
        return jwt.encode(claims, self.private_key, algorithm="RS256", headers=headers)


class TokenSource(Protocol):
    #: False when the token is fixed: a 401 then cannot be cured by asking again.
    refreshable: bool

    async def token(self) -> str: ...

    def invalidate(self, token: str) -> None: ...


class StaticToken:
    """A token given in the configuration (``access_token``)."""

    refreshable = False

    def __init__(self, token: str) -> None:
        self._token = token

    async def token(self) -> str:
        return self._token

    def invalidate(self, token: str) -> None:
        return None


class ServiceAccountTokens:
    """Access tokens fetched with a service account, cached until shortly before they expire."""

    refreshable = True

    def __init__(
        self, account: ServiceAccount, token_url: str, client: httpx.AsyncClient, clock: Clock
    ) -> None:
        self.account = account
        self.token_url = token_url
        self._client = client
        self._clock = clock
        self._token: str | None = None
        self._fresh_until = 0.0
        self._lock = asyncio.Lock()
        #: How many tokens were fetched (for tests and diagnostics).
        self.fetches = 0

    async def token(self) -> str:
        if self._token is not None and self._clock.monotonic() < self._fresh_until:
            return self._token
        async with self._lock:
            # Whoever waited on the lock finds the token its predecessor fetched.
            if self._token is None or self._clock.monotonic() >= self._fresh_until:
                self._token, lifetime = await self._fetch()
                self._fresh_until = self._clock.monotonic() + max(0.0, lifetime - REFRESH_MARGIN)
            return self._token

    def invalidate(self, token: str) -> None:
        """Forget ``token`` (FCM refused it); a newer token fetched meanwhile is kept."""
        if self._token == token:
            self._token = None

    async def _fetch(self) -> tuple[str, float]:
        assertion = self.account.assertion(self.token_url, int(self._clock.now().timestamp()))
        try:
            response = await self._client.post(
                self.token_url,
                data={"grant_type": JWT_BEARER_GRANT, "assertion": assertion},
                headers={"accept": "application/json"},
            )
        except httpx.HTTPError as exc:
            # Nothing was delivered whatever happened to this request: never in doubt.
            failure = classify_transport_error(exc)
            raise TransientError(f"token endpoint: {failure.text}",
                                 code=f"token_{failure.code or 'error'}") from None
        except HttpProcessError as exc:
            # The HTTP process died holding the token request, not the message: the message
            # never left (not sent, the row stays as it was), and the run stops.
            raise HttpProcessGone(f"token endpoint: {exc}") from None
        self.fetches += 1
        body = _json_object(response)
        status = response.status_code
        if 200 <= status < 300:
            token = body.get("access_token")
            if not isinstance(token, str) or not token:
                raise ProviderAuthError("token endpoint answered without an access_token",
                                        code="token_response", status=status)
            if _BEARER.fullmatch(token) is None:  # httpx or aiohttp would refuse it mid-send
                raise ProviderAuthError("token endpoint answered an access_token no HTTP "
                                        "header can carry (a space, a control or non-ASCII "
                                        "character)", code="token_response", status=status)
            expires_in = body.get("expires_in", ASSERTION_LIFETIME)
            try:
                lifetime = float(expires_in)
            except (TypeError, ValueError, OverflowError):  # OverflowError: an int past a float
                lifetime = float(ASSERTION_LIFETIME)
            if math.isnan(lifetime):  # would be fresh for no time: a fetch per message
                lifetime = float(ASSERTION_LIFETIME)
            return token, lifetime
        code = body.get("error") if isinstance(body.get("error"), str) else None
        description = body.get("error_description")
        text = f"token endpoint refused the service account ({status}"
        text += f" {code})" if code else ")"
        if isinstance(description, str) and description:
            text += f": {description[:200]}"
        if status == 429:
            raise RateLimitedError(text, code=code, status=status,
                                   retry_after=retry_after(response.headers, self._clock.now()))
        if status == 408 or status >= 500:
            raise TransientError(text, code=code, status=status,
                                 retry_after=retry_after(response.headers, self._clock.now()))
        raise ProviderAuthError(text, code=code or f"token_http_{status}", status=status)


# --------------------------------------------------------------------------------------------
# The adapter


class FcmAdapter:
    """Builds ``messages:send`` requests (without the Authorization header, which `FcmProvider`
    adds) and reads the answers. Pure: no I/O."""

    def __init__(self, project_id: str, base_url: str = FCM_BASE_URL,
                 clock: Clock | None = None) -> None:
        self.url = f"{base_url.rstrip('/')}/v1/projects/{quote(project_id, safe='')}/messages:send"
        self._clock = clock

    def payload(self, message: OutboundMessage) -> dict[str, Any]:
        content = message.content
        if not isinstance(content, PushContent):
            raise PermanentError(f"fcm sends push messages, not {message.channel.value}",
                                 code="wrong_channel", answered=False)
        notification = {k: v for k, v in (("title", content.title), ("body", content.body)) if v}
        body: dict[str, Any] = {"token": message.address}
        if notification:
            body["notification"] = notification
        if content.data:
            body["data"] = {str(k): str(v) for k, v in content.data.items()}
        return {"message": body}

    def build(self, message: OutboundMessage) -> httpx.Request:
        content = json.dumps(self.payload(message), ensure_ascii=False, separators=(",", ":"))
        return httpx.Request("POST", self.url, content=content.encode("utf-8"),
                             headers={"content-type": "application/json; charset=utf-8"})

    def parse(self, message: OutboundMessage, response: httpx.Response) -> SendResult:
        status = response.status_code
        body = _json_object(response)
        if 200 <= status < 300:
            name = body.get("name")
            return SendResult(provider_message_id=name if isinstance(name, str) else None,
                              status_code=status)
        error: dict[str, Any] = body["error"] if isinstance(body.get("error"), dict) else {}
        fcm_code, violations = _details(error.get("details"))
        status_name = error.get("status") if isinstance(error.get("status"), str) else None
        text = error.get("message") if isinstance(error.get("message"), str) else None
        text = (text or f"HTTP {status}")[:500]
        code = fcm_code or status_name or f"http_{status}"
        now = self._clock.now() if self._clock is not None else None

        if fcm_code in _PRUNE:
            raise PermanentError(text, code=fcm_code, status=status, action="suppress")
        if fcm_code == "INVALID_ARGUMENT" or status_name == "INVALID_ARGUMENT":
            token_bad = "message.token" in violations or "registration token" in text.lower()
            raise PermanentError(text, code=code, status=status,
                                 action="suppress" if token_bad else None)
        if fcm_code == "QUOTA_EXCEEDED":
            raise RateLimitedError(text, code=code, status=status,
                                   retry_after=retry_after(response.headers, now))
        if fcm_code in ("UNAVAILABLE", "INTERNAL"):
            raise TransientError(text, code=code, status=status,
                                 retry_after=retry_after(response.headers, now))
        if fcm_code == "THIRD_PARTY_AUTH_ERROR":
            raise ProviderAuthError(
                f"{text} (the APNs certificate or web-push credentials in Firebase were refused)",
                code=code, status=status)
        if status == 404:
            raise ProviderAuthError(f"{text} (check project_id and base_url)", code=code,
                                    status=status)
        raise_for_generic_status(response, code, text, now=now)
        raise PermanentError(f"unexpected answer HTTP {status}", code=code, status=status)


def _details(details: Any) -> tuple[str | None, set[str]]:
    """The FcmError code and the fields named in BadRequest violations."""
    fcm_code: str | None = None
    fields: set[str] = set()
    if not isinstance(details, list):
        return None, fields
    for item in details:
        if not isinstance(item, dict):
            continue
        kind = str(item.get("@type", ""))
        if kind.endswith(_FCM_ERROR_TYPE) and isinstance(item.get("errorCode"), str):
            fcm_code = item["errorCode"]
        elif kind.endswith(_BAD_REQUEST_TYPE) and isinstance(item.get("fieldViolations"), list):
            for violation in item["fieldViolations"]:
                if isinstance(violation, dict) and isinstance(violation.get("field"), str):
                    fields.add(violation["field"])
    return fcm_code, fields


def _json_object(response: httpx.Response) -> dict[str, Any]:
    try:
        data = json.loads(response.content)
    except (ValueError, RecursionError):  # RecursionError: a body nested thousands deep
        return {}
    return data if isinstance(data, dict) else {}


# --------------------------------------------------------------------------------------------
# The provider


class FcmProvider:
    """FCM as a `Provider`: the adapter, a client, and where access tokens come from."""

    #: Its own endpoint answers for every message: ten identical refusals in a row mean our
    #: configuration is refused (the pipeline stops the run, exit 6).
    refusals_mean_config = True

    channels = frozenset({Channel.PUSH})
    deduplicates = False

    def __init__(self, name: str, adapter: FcmAdapter, client: httpx.AsyncClient,
                 tokens: TokenSource) -> None:
        self.name = name
        self.adapter = adapter
        self.client = client
        self.tokens = tokens

    @classmethod
    def from_config(
        cls, name: str, config: FcmProviderConfig, context: ProviderContext
    ) -> FcmProvider:
        base_url = config.base_url or FCM_BASE_URL
        client = client_for(config, context, base_url)
        tokens: TokenSource
        if config.access_token is not None:
            tokens = StaticToken(config.access_token)
        else:
            assert config.service_account_file is not None  # the config validator says so
            account = ServiceAccount.load(config.service_account_file)
            token_url = config.token_url
            if "token_url" not in config.model_fields_set and account.token_uri:
                token_url = account.token_uri
            tokens = ServiceAccountTokens(account, token_url, client, context.clock)
        adapter = FcmAdapter(config.project_id, base_url, context.clock)
        return cls(name, adapter, client, tokens)

    async def send(self, message: OutboundMessage) -> SendResult:
        request = self.adapter.build(message)
        token = await self.tokens.token()
        response = await self._post(request, token)
        if response.status_code == 401 and self.tokens.refreshable:
            # The token expired early or was revoked: one fresh token, one more try.
            self.tokens.invalidate(token)
            response = await self._post(self.adapter.build(message), await self.tokens.token())
        return self.adapter.parse(message, response)

    async def _post(self, request: httpx.Request, token: str) -> httpx.Response:
        request.headers["authorization"] = f"Bearer {token}"
        try:
            response = await self.client.send(request)
            await response.aread()
        except httpx.HTTPError as exc:
            raise classify_transport_error(exc) from None
        return response

    async def aclose(self) -> None:
        await self.client.aclose()
