"""Address parsing and one-time resolution for every tool.

Accepted forms (seed "Examples"): ``1.2.3.4:80``, ``[::]:80``, ``[2001:db8::2]:80``,
``localhost:80`` and ``:80`` (an empty host means "any" for a listener -- ``[::]`` with
IPV6_V6ONLY off, so IPv4 and IPv6 both, where the system has IPv6, else ``0.0.0.0`` -- and the
loopback address for a destination). Ports are 1-65535. Names are resolved once, at start-up:
resolving per connection would run getaddrinfo in gevent's threadpool every time.
"""

from __future__ import annotations

import functools
import socket
from dataclasses import dataclass

V4_MAPPED = "::ffff:"  # RFC 4291 2.5.5.2: how an IPv6 socket names an IPv4 peer


class AddressError(ValueError):
    """A command-line address that cannot be used; the message is meant for the user."""


@dataclass(frozen=True)
class HostPort:
    """A parsed ``host:port`` before resolution."""

    host: str  # name or literal without brackets; "" means unspecified
    port: int  # 1-65535

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Resolved:
    """A resolved endpoint, ready for ``bind``/``connect``/``sendto``."""

    family: socket.AddressFamily
    sockaddr: tuple  # (host, port) or (host, port, flowinfo, scope_id)

    @property
    def host(self) -> str:
        return self.sockaddr[0]

    @property
    def port(self) -> int:
        return self.sockaddr[1]

    def __str__(self) -> str:
        return format_sockaddr(self.sockaddr)


def format_sockaddr(sockaddr: tuple) -> str:
    """``1.2.3.4:80`` or ``[::1]:80`` for log lines; an IPv4 peer of a dual-stack listener
    (``::ffff:1.2.3.4``) is written as the IPv4 address it is."""
    host, port = sockaddr[0], sockaddr[1]
    if host.startswith(V4_MAPPED) and "." in host:
        host = host[len(V4_MAPPED):]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_endpoint(text: str) -> HostPort:
    """Split ``host:port`` / ``[v6]:port`` / ``:port``; raise AddressError with a clear reason."""
    if text.startswith("["):
        close = text.find("]")
        if close < 0 or text[close + 1 : close + 2] != ":":
            raise AddressError(f"bad address {text!r}: expected [ipv6]:port")
        host, port_text = text[1:close], text[close + 2 :]
        if not host:
            raise AddressError(f"bad address {text!r}: empty IPv6 address")
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise AddressError(f"bad address {text!r}: expected host:port")
        if ":" in host:
            raise AddressError(f"bad address {text!r}: write IPv6 addresses as [addr]:port")
    if not port_text.isdigit():
        raise AddressError(f"bad port in {text!r}: expected a number 1-65535")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise AddressError(f"bad port in {text!r}: {port} is outside 1-65535")
    return HostPort(host, port)


def usable(infos: list, socktype: int) -> tuple[Resolved, ...]:
    """getaddrinfo's answer as Resolved endpoints of the families we use, duplicates dropped,
    in the resolver's order (RFC 6724)."""
    out: list[Resolved] = []
    for family, kind, _, _, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6) and kind == socktype:
            resolved = Resolved(socket.AddressFamily(family), tuple(sockaddr))
            if resolved not in out:
                out.append(resolved)
    return tuple(out)


def resolve_all(endpoint: HostPort, socktype: int) -> tuple[Resolved, ...]:
    """Every address of a destination (Happy Eyeballs races them), resolved at start-up."""
    host = endpoint.host or "127.0.0.1"
    try:
        infos = socket.getaddrinfo(host, endpoint.port, 0, socktype)
    except (socket.gaierror, UnicodeError) as exc:
        raise AddressError(f"cannot resolve {endpoint}: {exc}") from None
    found = usable(infos, socktype)
    if not found:
        raise AddressError(f"cannot resolve {endpoint}: no IPv4 or IPv6 address")
    return found


def is_literal(host: str) -> bool:
    """True for an IP address (or the empty host): nothing to re-resolve."""
    if not host:
        return True
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host.split("%")[0])
    except OSError:
        return False
    return True


def resolve(endpoint: HostPort, socktype: int, *, passive: bool) -> Resolved:
    """Resolve once, before the service starts (blocking is fine there).

    ``passive`` selects listener semantics: an empty host binds the wildcard of both families
    (:func:`any_host`). For a destination an empty host means the loopback address.
    """
    host = endpoint.host or (any_host() if passive else "127.0.0.1")
    flags = socket.AI_PASSIVE if passive else 0
    try:
        infos = socket.getaddrinfo(host, endpoint.port, 0, socktype, 0, flags)
    except (socket.gaierror, UnicodeError) as exc:
        raise AddressError(f"cannot resolve {endpoint}: {exc}") from None
    # Prefer what the resolver lists first (RFC 6724 order), but only families we can use.
    for family, _, _, _, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6):
            return Resolved(socket.AddressFamily(family), tuple(sockaddr))
    raise AddressError(f"cannot resolve {endpoint}: no IPv4 or IPv6 address")


@functools.cache
def any_host() -> str:
    """``::`` where this system can bind IPv6 (the listener then takes IPv4 too, as V4-mapped
    addresses: bind_socket sets IPV6_V6ONLY off unless -6), else ``0.0.0.0``."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind(("::", 0))
    except OSError:  # no IPv6 in this kernel or namespace (ipv6.disable=1, disable_ipv6)
        return "0.0.0.0"
    return "::"


def parse_and_resolve(text: str, socktype: int, *, passive: bool) -> Resolved:
    """The one call tools make per command-line address."""
    return resolve(parse_endpoint(text), socktype, passive=passive)
