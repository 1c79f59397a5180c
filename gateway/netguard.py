"""Which backend addresses registrations may point at.

A registration names a URL the gateway will then call, so an open admin API
could aim it at the gateway's own machine, the LAN, or a cloud metadata service.
Unless ``admin.allow_private_backends`` is set, only public addresses pass;
hostnames are resolved and every address they resolve to is checked.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from gateway.errors import GatewayError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


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


async def check_backend_url(url: str, allow_private: bool) -> None:
    """Refuse (400) a URL that is not http(s), or that reaches a non-public address."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise GatewayError(400, f"endpoint_url must be an http:// or https:// URL with a host, got {url!r}")
    if parts.username or parts.password:
        raise GatewayError(400, "endpoint_url must not carry a user name or password; use the backend's api_key field")
    try:
        port = parts.port
    except ValueError:
        raise GatewayError(400, f"endpoint_url has an invalid port: {url!r}") from None
    if allow_private:
        return
    host = parts.hostname
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
                f"endpoint_url refused: {shown} {problem}; backends must be reachable at public addresses "
                "(a lab on one LAN sets admin.allow_private_backends: true)",
                code="backend_address_refused",
                param="endpoint_url",
            )


async def _resolve(host: str, port: int) -> list[IPAddress]:
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), timeout=5)
    except (OSError, TimeoutError):
        message = f"endpoint_url refused: the host {host!r} cannot be resolved"
        raise GatewayError(400, message, param="endpoint_url") from None
    return [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]


class PublicOnlyResolver(AbstractResolver):
    """Resolves like aiohttp's default, but drops non-public addresses for untrusted hosts.

    Registration checks the addresses a hostname has then; this keeps a hostname
    from being re-pointed at a private address afterwards (DNS rebinding). Hosts
    from the config file are trusted.
    """

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
            raise OSError(f"{host} resolves only to non-public addresses; refused")
        return kept

    async def close(self) -> None:
        await self._inner.close()
