"""Which hosts a recipient's own URL may reach: public addresses only.

A recipient file is anyone's text (a CRM export, a web form), and its ``webhook_url`` column
says where the run POSTs, signed with the campaign's secret. Without a check, one row naming
``http://169.254.169.254/...`` (a cloud's metadata service), ``http://localhost:6379/`` or an
intranet host makes the sender a request forger inside the operator's network (SSRF). So a request
to a recipient's URL (`PUBLIC_ONLY`, set by the webhook adapter unless the provider's
``allow_private_urls`` is true) may go only to a public address:

- a host written as an address is checked as written (aiohttp never asks a resolver for it);
- a host name is resolved by `PublicOnlyResolver`, which refuses the name if *any* address it
  resolves to is not public. The connection then goes to the addresses it checked, so a name that
  answers a public address to a check and a private one to the connection (DNS rebinding) cannot
  slip past it.

Refused is `NonPublicAddress`: an `httpx.ConnectError` (no connection was made, nothing left),
which `classify_transport_error` turns into the recipient's bad address: the row ends
``invalid``, code ``private_address``. The provider's own ``url`` is never checked: the campaign's
author chose it, and an internal gateway is a fine place to send.

What "public" means is IANA's special-purpose registries (RFC 6890 and successors), written out
here rather than read from `ipaddress.is_global`: CPython before 3.11.10 and 3.12.4 called some of
these ranges global (CVE-2024-4032), and none looks inside IPv6 addresses that carry an IPv4 one
(6to4, NAT64, mapped), which reach that IPv4 address.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import TYPE_CHECKING, Any

import httpx

from campaign_cli.models import inet_aton_address

if TYPE_CHECKING:
    from aiohttp.abc import AbstractResolver

#: The httpx request extension that asks for this check (a bool).
PUBLIC_ONLY = "public_only"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_V4: tuple[tuple[ipaddress.IPv4Network, str], ...] = tuple(
    (ipaddress.IPv4Network(net), name) for net, name in (
        ("0.0.0.0/8", "'this network'"),
        ("10.0.0.0/8", "private"),
        ("100.64.0.0/10", "shared (carrier-grade NAT)"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local (cloud metadata)"),
        ("172.16.0.0/12", "private"),
        ("192.0.0.0/24", "IETF protocol"),
        ("192.0.2.0/24", "documentation"),
        ("192.88.99.0/24", "6to4 relay"),
        ("192.168.0.0/16", "private"),
        ("198.18.0.0/15", "benchmarking"),
        ("198.51.100.0/24", "documentation"),
        ("203.0.113.0/24", "documentation"),
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved"),  # (255.255.255.255, broadcast, among them)
    )
)
_V6: tuple[tuple[ipaddress.IPv6Network, str], ...] = tuple(
    (ipaddress.IPv6Network(net), name) for net, name in (
        ("::/127", "unspecified or loopback"),
        ("::/8", "reserved (IPv4-compatible among them)"),
        ("64:ff9b:1::/48", "local NAT64"),
        ("100::/64", "discard"),
        ("2001::/23", "IETF protocol (Teredo among them)"),
        ("2001:db8::/32", "documentation"),
        ("3fff::/20", "documentation"),
        ("5f00::/16", "segment routing"),
        ("fc00::/7", "unique local (private)"),
        ("fe80::/10", "link-local"),
        ("fec0::/10", "site-local"),
        ("ff00::/8", "multicast"),
    )
)
#: IPv6 prefixes whose addresses carry an IPv4 address that they reach.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def not_public(address: str | IPAddress) -> str | None:
    """Why ``address`` is not a public one (``"loopback"``, ``"private"``, ...), or None."""
    ip = ipaddress.ip_address(address.split("%", 1)[0] if isinstance(address, str) else address)
    if isinstance(ip, ipaddress.IPv6Address):
        carried = ip.ipv4_mapped or ip.sixtofour
        if carried is None and ip in _NAT64:
            carried = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if carried is not None:
            reason = not_public(carried)
            return None if reason is None else f"{reason} (inside an IPv6 address)"
        ranges: Any = _V6
    else:
        ranges = _V4
    for network, name in ranges:
        if ip in network:
            return str(name)
    if not ip.is_global:  # what this Python knows beyond the lists above
        return "not globally reachable"
    return None


#: The characters of every IPv4 spelling (dotted, decimal, octal, hex).
_NUMERIC = frozenset("0123456789abcdefxABCDEFX.")


def literal_address(host: str) -> IPAddress | None:
    """The address ``host`` names when it is written as one, else None (a name to resolve).
    Also the legacy IPv4 spellings the C library takes (``127.1``, ``0x7f000001``, ``2130706433``),
    which a resolver would turn into an address without asking DNS."""
    text = host.strip("[]").split("%", 1)[0]
    if ":" not in text and not _NUMERIC.issuperset(text):
        return None  # a name (an address has a colon, or only these characters): ~0.4 us
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return inet_aton_address(text)


class NonPublicAddress(httpx.ConnectError):
    """A recipient's URL whose host is, or resolves to, an address that is not public. No
    connection was made."""


def refusal(host: str, address: str | IPAddress, reason: str) -> NonPublicAddress:
    named = "" if str(address) == host.strip("[]") else f"{host} resolves to "
    return NonPublicAddress(
        f"{named}{address}, not a public address ({reason}): a recipient's URL may only reach "
        "public addresses (the provider's allow_private_urls: true lifts this)"
    )


def check_literal(host: str) -> None:
    """Raise `NonPublicAddress` if ``host`` is written as an address that is not public."""
    address = literal_address(host)
    if address is not None:
        reason = not_public(address)
        if reason is not None:
            raise refusal(host, address, reason)


def public_only_resolver(inner: AbstractResolver | None = None) -> AbstractResolver:
    """An aiohttp resolver that answers a name only when every address it resolves to is public.
    Made inside the running event loop (aiohttp's default resolver takes it)."""
    from aiohttp.abc import AbstractResolver, ResolveResult
    from aiohttp.resolver import DefaultResolver

    class PublicOnlyResolver(AbstractResolver):
        def __init__(self, inner: AbstractResolver) -> None:
            self._inner = inner

        async def resolve(
            self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
        ) -> list[ResolveResult]:
            found = await self._inner.resolve(host, port, family)
            for entry in found:
                reason = not_public(entry["host"])
                if reason is not None:
                    raise refusal(host, entry["host"], reason)
            return found

        async def close(self) -> None:
            await self._inner.close()

    return PublicOnlyResolver(inner if inner is not None else DefaultResolver())
