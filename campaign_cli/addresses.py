"""Address normalisation: one canonical spelling per address, so lookups and dedupe are exact.

``+1 (415) 555-0100`` and ``+14155550100`` are the same phone; ``Ann@Example.COM`` and
``ann@example.com`` the same mailbox. The store, the suppression list, the consent records and the
journal only ever see the normalised form (and its `address_hash`).

Phones: E.164 through phonenumbers, with a default region for national numbers. Emails:
email-validator's syntax check (no DNS), then lowercased whole: providers and people treat the
local part as case-insensitive, and an opt-out must match however the list spells it.
"""

from __future__ import annotations

import functools
import hashlib
import re

import phonenumbers
from email_validator import EmailNotValidError, validate_email
from phonenumbers.phonemetadata import PhoneMetadata
from phonenumbers.phonenumberutil import (
    COUNTRY_CODE_TO_REGION_CODE,
    PhoneNumberType,
    national_significant_number,
)

try:  # private to phonenumbers: a release without it gets the library's own validation
    from phonenumbers.phonenumberutil import _number_type_helper
except ImportError:  # pragma: no cover - depends on the installed phonenumbers
    _number_type_helper = None  # type: ignore[assignment]

from campaign_cli.models import Channel, url_refusal


class AddressError(ValueError):
    """An address that cannot be normalised. ``reason`` is a journal reason code."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(detail)


_E164 = re.compile(r"\+[1-9][0-9]{6,14}")


# A NANP number already written in E.164 (`+1`, then ten digits not starting with 0 or 1): for
# these, and only these, `phonenumbers.parse` yields `PhoneNumber(1, the ten digits)` whatever
# the default region (no national prefix to strip, no extension, nothing to normalise), so the
# parse is skipped. tests/test_addresses.py checks the equivalence against the library.
_NANP_E164 = re.compile(r"\+1([2-9][0-9]{9})")


def normalize_phone(raw: str, default_region: str = "US") -> str:
    text = raw.strip()
    if not text:
        raise AddressError("no_address", "phone is empty")
    nanp = _NANP_E164.fullmatch(text)
    if nanp is not None:
        number = phonenumbers.PhoneNumber(country_code=1, national_number=int(nanp[1]))
    else:
        try:
            number = phonenumbers.parse(text, default_region)
        except phonenumbers.NumberParseException as exc:
            raise AddressError("bad_phone", f"not a phone number: {text!r} ({exc})") from None
    if not is_valid_number(number):
        raise AddressError("bad_phone", f"not a valid phone number: {text!r}")
    if nanp is not None:
        return text
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def is_valid_number(number: phonenumbers.PhoneNumber) -> bool:
    """`phonenumbers.is_valid_number`, without matching the number against its region's
    patterns twice.

    For a calling code shared by several regions (+1: US, CA and 23 more; +44: GB, GG, IM, JE),
    the library first finds the region by matching the number against each region's patterns,
    then validates it by matching the same patterns of the region it found again. The first match
    already answers the question. That second pass is half the cost of validating a US number;
    this function is the library's two functions with it left out, and
    tests/test_addresses.py checks that it agrees with the library.
    """
    if _number_type_helper is None:
        return bool(phonenumbers.is_valid_number(number))
    regions = COUNTRY_CODE_TO_REGION_CODE.get(number.country_code or 0)
    if regions is None:
        return False
    if len(regions) == 1:
        return bool(phonenumbers.is_valid_number_for_region(number, regions[0]))
    nsn = national_significant_number(number)
    for region in regions:
        metadata = PhoneMetadata.metadata_for_region(region.upper(), None)
        if metadata is None:
            continue
        if metadata.leading_digits is not None:
            if re.match(metadata.leading_digits, nsn):
                return bool(phonenumbers.is_valid_number_for_region(number, region))
        elif _number_type_helper(nsn, metadata) != PhoneNumberType.UNKNOWN:
            return True
    return False


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


_WEBHOOK_URL = re.compile(
    r"(https?)://([^\s/?#@]*@)?(\[[^\s/?#\]]*\]|[^\s/?#:@]+)(:[0-9]*)?([/?#][^\s]*)?",
    re.IGNORECASE,
)


#: httpx refuses a longer URL whatever it holds.
_MAX_URL_LENGTH = 65_536


@functools.lru_cache(maxsize=4096)
def _origin_refusal(origin: str) -> str | None:
    return url_refusal(origin)


_ORIGIN = re.compile(r"(https?)://(?:[^\s/?#@]*@)?([^\s/?#]*)(.*)", re.IGNORECASE | re.DOTALL)


def _origin_only(text: str) -> str:
    """``text`` as an error may show it: scheme and host, not the user info (credentials) nor the
    path and query (a webhook's path is often its secret), which the journal's address keeps."""
    match = _ORIGIN.match(text)
    if match is None:
        return repr(text)
    scheme, host, rest = match.groups()
    return repr(f"{scheme}://{host}" + ("/..." if rest else ""))


def normalize_webhook_url(raw: str) -> str:
    text = raw.strip()
    if not text:
        raise AddressError("no_address", "webhook URL is empty")
    if not re.fullmatch(r"https?://[^\s/?#]+[^\s]*", text, re.IGNORECASE):
        raise AddressError("bad_webhook_url", f"not an http(s) URL: {text!r}")
    if any(c.isascii() and not c.isprintable() for c in text):  # httpx refuses to send it
        raise AddressError("bad_webhook_url",
                           f"a control character in the URL: {_origin_only(text)}")
    match = _WEBHOOK_URL.fullmatch(text)
    if match is not None and len(text) <= _MAX_URL_LENGTH:
        # What the client refuses lies in the scheme and authority (the path's characters were
        # checked above): one parse per origin, not one per row (~22 us each).
        scheme, userinfo, host, port, _ = match.groups()
        refused = _origin_refusal(f"{scheme}://{userinfo or ''}{host}{port or ''}/")
    else:
        refused = url_refusal(text)
    if refused is not None:
        raise AddressError("bad_webhook_url", f"not a URL a request can go to: "
                                              f"{_origin_only(text)} ({refused})")
    if match is None:  # an authority of an unusual shape: kept as written
        return text
    # Scheme and host are case-insensitive and the default port is no port (RFC 3986 6.2.3):
    # one spelling, so that a suppression matches however the URL is written. The user info and
    # the path keep their case (tokens in a webhook path are case-sensitive).
    scheme, userinfo, host, port, rest = match.groups()
    scheme = scheme.lower()
    if port == {"http": ":80", "https": ":443"}[scheme]:
        port = ""
    return f"{scheme}://{userinfo or ''}{host.lower()}{port or ''}{rest or ''}"


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
