"""Address normalisation: one canonical spelling per address, so lookups and dedupe are exact.

``+1 (415) 555-0100`` and ``+14155550100`` are the same phone; ``Ann@Example.COM`` and
``ann@example.com`` the same mailbox. The store, the suppression list, the consent records and the
journal only ever see the normalised form (and its `address_hash`).

Phones: E.164 through phonenumbers, with a default region for national numbers. Emails:
email-validator's syntax check (no DNS), then lowercased whole: providers and people treat the
local part as case-insensitive, and an opt-out must match however the list spells it.
"""

from __future__ import annotations

import hashlib
import re

import phonenumbers
from email_validator import EmailNotValidError, validate_email

from campaign_cli.models import Channel


class AddressError(ValueError):
    """An address that cannot be normalised. ``reason`` is a journal reason code."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(detail)


_E164 = re.compile(r"\+[1-9][0-9]{6,14}")


def normalize_phone(raw: str, default_region: str = "US") -> str:
    text = raw.strip()
    if not text:
        raise AddressError("no_address", "phone is empty")
    try:
        number = phonenumbers.parse(text, default_region)
    except phonenumbers.NumberParseException as exc:
        raise AddressError("bad_phone", f"not a phone number: {text!r} ({exc})") from None
    if not phonenumbers.is_valid_number(number):
        raise AddressError("bad_phone", f"not a valid phone number: {text!r}")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def normalize_email(raw: str) -> str:
    text = raw.strip()
    if not text:
        raise AddressError("no_address", "email is empty")
    try:
        info = validate_email(text, check_deliverability=False)
    except EmailNotValidError as exc:
        raise AddressError("bad_email", f"not a valid email address: {text!r} ({exc})") from None
    return info.normalized.lower()


_TOKEN = re.compile(r"[A-Za-z0-9_:\-\.]{16,4096}")


def normalize_push_token(raw: str) -> str:
    text = raw.strip()
    if not text:
        raise AddressError("no_address", "push token is empty")
    if not _TOKEN.fullmatch(text):
        raise AddressError("bad_push_token", "push token has unexpected characters or length")
    return text


def normalize_webhook_url(raw: str) -> str:
    text = raw.strip()
    if not text:
        raise AddressError("no_address", "webhook URL is empty")
    if not re.fullmatch(r"https?://[^\s/?#]+[^\s]*", text):
        raise AddressError("bad_webhook_url", f"not an http(s) URL: {text!r}")
    return text


def normalize_address(channel: Channel, raw: str, default_region: str = "US") -> str:
    """The canonical form of ``raw`` for ``channel``; raises `AddressError`."""
    if channel is Channel.SMS:
        return normalize_phone(raw, default_region)
    if channel is Channel.EMAIL:
        return normalize_email(raw)
    if channel is Channel.PUSH:
        return normalize_push_token(raw)
    return normalize_webhook_url(raw)


def address_hash(address: str) -> str:
    """SHA-256 of a normalised address: what suppressions keep when the address must go."""
    return hashlib.sha256(address.encode("utf-8")).hexdigest()


def looks_like_e164(text: str) -> bool:
    return bool(_E164.fullmatch(text))
