"""Requests the service makes to URLs its users give (webhooks), and the addresses it refuses.

A callback URL is hostile input: pointed at 127.0.0.1, 169.254.169.254 or 10.0.0.5 it would make
the service a proxy into the operator's own network (SSRF). So every address a URL's host
resolves to must be public, unless `COMPACTOR_WEBHOOK_ALLOW_PRIVATE` says otherwise. The check runs
when the URL is submitted (a 422 then) and again at every connection, on the very addresses
connected to: a name that resolved to a public address at submission and to a private one later
(DNS rebinding) is refused all the same.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpcore

MAX_URL_LENGTH = 2048


class AddressRefused(Exception):
    """The URL may not be called: its scheme, its form, or an address its host resolves to."""


def refusal(address: str) -> str | None:
    """Why `address` (an IP literal) may not be called, or None when it is a public address."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for kind, test in (
        ("a loopback", ip.is_loopback),
        ("an unspecified", ip.is_unspecified),
        ("a link-local", ip.is_link_local),
        ("a multicast", ip.is_multicast),
        ("a private", ip.is_private),  # last: Python counts the ones above as private too
    ):
        if test:
            return f"{address} is {kind} address"
    if not ip.is_global:  # carrier-grade NAT, documentation and other reserved ranges
        return f"{address} is not a public address"
    return None


def resolve(host: str, port: int) -> list[str]:
    """Every address `host` resolves to (an IP literal resolves to itself)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise AddressRefused(f"the host {host!r} does not resolve") from exc
    return list(dict.fromkeys(info[4][0] for info in infos))


def checked_addresses(host: str, port: int, allow_private: bool) -> list[str]:
    """The addresses to connect to for host:port; AddressRefused when any of them is refused.

    Any, not all: a name with one private address among public ones is refused, since which one
    a connection gets is not ours to choose.
    """
    addresses = resolve(host, port)
    if not allow_private:
        for address in addresses:
            reason = refusal(address)
            if reason:
                raise AddressRefused(f"{host} resolves to {address}: {reason.split(' is ', 1)[1]}")
    return addresses


def check_url(url: str, allow_private: bool) -> None:
    """Refuse a callback URL that is malformed, not http(s), or whose host resolves to a refused address."""
    if len(url) > MAX_URL_LENGTH:
        raise AddressRefused(f"the URL is longer than {MAX_URL_LENGTH} characters")
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise AddressRefused(f"the URL is malformed: {exc}") from exc
    if parts.scheme not in ("http", "https"):
        raise AddressRefused("only http and https URLs can be called")
    if not parts.hostname:
        raise AddressRefused("the URL has no host")
    if parts.username or parts.password:
        raise AddressRefused("the URL may not carry credentials; the payload is signed instead")
    checked_addresses(parts.hostname, port, allow_private)


class _GuardedBackend(httpcore.SyncBackend):
    """Connects only to addresses that pass the policy, resolved here and nowhere else."""

    def __init__(self, allow_private: bool):
        self.allow_private = allow_private

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        try:
            addresses = checked_addresses(host, port, self.allow_private)
        except AddressRefused as exc:
            raise httpcore.ConnectError(str(exc)) from exc
        error: Exception | None = None
        for address in addresses:
            try:
                # TLS still verifies the URL's host name: httpcore takes SNI from the request.
                return super().connect_tcp(address, port, timeout, local_address, socket_options)
            except httpcore.ConnectError as exc:
                error = exc
        raise error or httpcore.ConnectError(f"{host} has no address")


@dataclass(frozen=True)
class Outcome:
    """One attempt: the receiver's status code, or why there was none, and how long it took."""

    status_code: int | None
    error: str | None
    duration_ms: float

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def post(url: str, body: bytes, headers: dict[str, str], timeout_s: float, allow_private: bool) -> Outcome:
    """POST `body` once, following no redirect and no proxy from the environment.

    The receiver's answer is not read beyond its status: nothing it says reaches a user.
    """
    started = time.perf_counter()
    try:
        check_url(url, allow_private)
        # httpcore rather than httpx: only its network backend can be made to check each address.
        with httpcore.ConnectionPool(network_backend=_GuardedBackend(allow_private), retries=0) as pool:
            response = pool.request(
                "POST",
                url,
                headers=[(k.encode(), v.encode()) for k, v in headers.items()],
                content=body,
                extensions={
                    "timeout": {"connect": timeout_s, "read": timeout_s, "write": timeout_s, "pool": timeout_s}
                },
            )
        return Outcome(response.status, None, _ms(started))
    except AddressRefused as exc:
        return Outcome(None, f"refused: {exc}", _ms(started))
    except httpcore.TimeoutException:
        return Outcome(None, f"no answer within {timeout_s:g} s", _ms(started))
    except (httpcore.NetworkError, httpcore.ProtocolError, httpcore.UnsupportedProtocol) as exc:
        return Outcome(None, f"{type(exc).__name__}: {str(exc)[:200]}", _ms(started))


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 1)
