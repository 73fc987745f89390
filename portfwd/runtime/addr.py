"""Address parsing and one-time resolution for every tool.

Accepted forms (seed "Examples"): ``1.2.3.4:80``, ``[::]:80``, ``[2001:db8::2]:80``,
``localhost:80`` and ``:80`` (an empty host means "any" for a listener and the loopback
address for a destination). Ports are 1-65535. Names are resolved once, at start-up:
resolving per connection would run getaddrinfo in gevent's threadpool every time.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass


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
    """``1.2.3.4:80`` or ``[::1]:80`` for log lines."""
    host, port = sockaddr[0], sockaddr[1]
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

    ``passive`` selects listener semantics: an empty host binds the IPv4 wildcard.
    For a destination an empty host means the loopback address.
    """
    host = endpoint.host or ("0.0.0.0" if passive else "127.0.0.1")
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


def parse_and_resolve(text: str, socktype: int, *, passive: bool) -> Resolved:
    """The one call tools make per command-line address."""
    return resolve(parse_endpoint(text), socktype, passive=passive)
