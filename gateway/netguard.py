"""Which backend URLs registrations may name, and their one canonical spelling.

A registration names a URL the gateway will then call, so an open admin API
could aim it at the gateway's own machine, the LAN, or a cloud metadata service.
Unless ``admin.allow_private_backends`` is set, only public addresses pass;
hostnames are resolved and every address they resolve to is checked.

Every backend URL (registered or from ``backends:``) is first brought to one
spelling, so ``HTTP://Host:80/`` and ``http://host`` are one registration, and a
host name that cannot be looked up is refused before it reaches the health loop.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

import yarl
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from gateway.errors import GatewayError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
DEFAULT_PORTS = {"http": 80, "https": 443}
_LABEL = re.compile(r"[a-z0-9_-]{1,63}")
_API_SUFFIX = "/v1"


@dataclass(frozen=True, slots=True)
class BackendURL:
    """A backend's base URL in canonical form; ``dropped_v1`` if a pasted trailing /v1 was removed."""

    url: str
    dropped_v1: bool = False

    @property
    def note(self) -> str | None:
        """What the user should know about how their URL was changed, if anything."""
        if not self.dropped_v1:
            return None
        return f"the trailing /v1 was dropped: the gateway adds /v1/... itself, so the base URL is {self.url}"


def _shown(raw: str) -> str:
    return repr(raw if len(raw) <= 200 else raw[:200] + "...")


def normalise_url(raw: str) -> BackendURL:
    """The canonical spelling of a backend's base URL; ValueError naming the problem and the fix.

    Scheme and host are lower-cased (an international host becomes its IDNA form),
    the default port and trailing slashes go, and so does a pasted trailing ``/v1``.
    Another path is kept: a server may live under a base path (``https://host/proxy/abc``).
    """
    text = raw.strip()
    if any(ord(c) < 33 or ord(c) == 127 for c in text):
        raise ValueError(f"must not contain spaces or control characters, got {_shown(raw)}")
    try:
        parts = urlsplit(text)
    except ValueError:
        raise ValueError(f"has a malformed host (an IPv6 address goes in [brackets]), got {_shown(raw)}") from None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS or not parts.hostname:
        raise ValueError(f"must be an http:// or https:// URL with a host, got {_shown(raw)}")
    if "@" in parts.netloc:
        raise ValueError("must not carry a user name or password; use the backend's api_key field")
    if "?" in text or "#" in text:
        raise ValueError(f"must be a base URL without a query (?...) or fragment (#...), got {_shown(raw)}")
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        raise ValueError(f"has an invalid port (give 1-65535, or none for the scheme's default), got {_shown(raw)}")
    host = _canonical_host(parts.hostname)
    netloc = host if port in (None, DEFAULT_PORTS[scheme]) else f"{host}:{port}"
    path = parts.path.rstrip("/")
    dropped_v1 = path.lower().endswith(_API_SUFFIX)
    if dropped_v1:
        path = path[: -len(_API_SUFFIX)].rstrip("/")
    return BackendURL(f"{scheme}://{netloc}{path}", dropped_v1)


def url_problem(raw: str) -> str | None:
    """Why ``raw`` cannot be a backend's base URL, or None (a ``check`` for config fields)."""
    try:
        normalise_url(raw)
    except ValueError as exc:
        return str(exc)
    return None


def _canonical_host(hostname: str) -> str:
    """An IP address in its short form (IPv6 bracketed), else a host name that DNS can look up."""
    try:
        address = ipaddress.ip_address(hostname)
    except ValueError:
        pass
    else:
        return f"[{address}]" if address.version == 6 else str(address)
    name = hostname[:-1] if hostname.endswith(".") else hostname
    if not name.isascii():
        try:
            name = yarl.URL.build(scheme="http", host=name).raw_host or ""
        except ValueError:  # UnicodeError included: IDNA cannot encode it
            name = ""
    if len(name) > 253 or not all(_LABEL.fullmatch(label) for label in name.split(".")):
        raise ValueError(
            f"has a host name that cannot be looked up: {_shown(hostname)}; each dot-separated part must be "
            "1 to 63 letters, digits, hyphens or underscores (253 characters in all)"
        )
    return name.lower()


PUBLIC_ONLY = (
    "backends must be reachable at public addresses (a lab on one LAN sets admin.allow_private_backends: true)"
)
"""The rule and its way out, as a refused registration (API or import) ends its message."""


def address_problem(address: IPAddress) -> str | None:
    """Why an address is not public, or None if it is."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.is_loopback:
        return "a loopback address"
    if address.is_link_local:
        return "a link-local address (cloud metadata services live there)"
    if address.is_unspecified:
        return "an unspecified address"
    if address.is_multicast:
        return "a multicast address"
    if address.is_private:
        return "a private-network address"
    if address.is_reserved or not address.is_global:
        return "a reserved address"
    return None


async def check_backend_url(url: str, allow_private: bool) -> BackendURL:
    """The canonical form of a registration's URL; 400 if it is malformed or reaches a non-public address."""
    try:
        backend_url = normalise_url(url)
    except ValueError as exc:
        raise GatewayError(400, f"endpoint_url {exc}", param="endpoint_url") from None
    if allow_private:
        return backend_url
    parts = urlsplit(backend_url.url)
    host, port = parts.hostname or "", parts.port
    try:
        addresses: list[IPAddress] = [ipaddress.ip_address(host)]
    except ValueError:
        addresses = await _resolve(host, port or (443 if parts.scheme == "https" else 80))
    for address in addresses:
        problem = address_problem(address)
        if problem:
            shown = host if str(address) == host else f"{host} resolves to {address}, which is"
            raise GatewayError(
                400,
                f"endpoint_url refused: {shown} {problem}; {PUBLIC_ONLY}",
                code="backend_address_refused",
                param="endpoint_url",
            )
    return backend_url


async def _resolve(host: str, port: int) -> list[IPAddress]:
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), timeout=5)
    except (OSError, TimeoutError):
        message = f"endpoint_url refused: the host {host!r} cannot be resolved"
        raise GatewayError(400, message, param="endpoint_url") from None
    return [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]


class NotPublic(OSError):
    """A backend's host is, or resolves only to, addresses the rule refuses (``allow_private_backends`` off)."""


class PublicOnlyResolver(AbstractResolver):
    """Resolves like aiohttp's default, but drops non-public addresses for untrusted hosts.

    Registration checks the addresses a hostname has then; this keeps a hostname
    from being re-pointed at a private address afterwards (DNS rebinding), and an
    address written out that became private to the rule since (registered while
    ``allow_private_backends`` was on, or imported): the relay's pool passes IP
    literals through it too (``checks_addresses``). Hosts from the config file are
    trusted.
    """

    checks_addresses = True

    def __init__(self, trusted_hosts: set[str]) -> None:
        self._inner = DefaultResolver()
        self._trusted = trusted_hosts

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        if host in self._trusted:
            return results
        kept = [r for r in results if address_problem(ipaddress.ip_address(r["host"])) is None]
        if not kept:
            raise NotPublic(f"{host} resolves only to non-public addresses; refused")
        return kept

    async def close(self) -> None:
        await self._inner.close()
