"""Allow/deny lists of CIDR blocks (``--allow``/``--deny``, ``--proxy-from``).

Rules, as nginx's ``allow``/``deny`` and HAProxy's ``src`` ACLs are used in practice: a
denied address is refused whatever the allow list says (deny wins); an empty allow list
allows everyone not denied. IPv4 clients of a dual-stack listener arrive as v4-mapped IPv6
(``::ffff:10.1.2.3``): they are matched as the IPv4 address they are, so ``10.0.0.0/8``
covers them, and a rule written v4-mapped (``::ffff:10.0.0.0/104``) covers plain IPv4.

A check runs per accepted connection before any dial, so it is a bisect over merged integer
ranges, not a loop over ``ipaddress`` networks: 100 entries cost the same as one.
"""

from __future__ import annotations

import bisect
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
V4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def parse_cidr(text: str) -> Network:
    """``10.0.0.0/8``, ``2001:db8::/32``, or a bare address (a /32 or /128); host bits must be
    zero (``10.0.0.1/8`` is a typo more often than a wish). Raises ValueError."""
    net = ipaddress.ip_network(text.strip(), strict=True)
    if isinstance(net, ipaddress.IPv6Network) and net.subnet_of(V4_MAPPED):
        # ::ffff:a.b.c.d/n (n >= 96) is the IPv4 block a.b.c.d/(n - 96)
        low = ipaddress.IPv4Address(int(net.network_address) & 0xFFFFFFFF)
        return ipaddress.IPv4Network(f"{low}/{net.prefixlen - 96}")
    return net


class RangeSet:
    """Merged, sorted ``[start, end]`` integer ranges of one IP version."""

    __slots__ = ("starts", "ends")

    def __init__(self, networks: Iterable[Network]) -> None:
        ranges = sorted((int(n.network_address), int(n.broadcast_address)) for n in networks)
        merged: list[list[int]] = []
        for start, end in ranges:
            if merged and start <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        self.starts = [s for s, _ in merged]
        self.ends = [e for _, e in merged]

    def __contains__(self, value: int) -> bool:
        i = bisect.bisect_right(self.starts, value) - 1
        return i >= 0 and value <= self.ends[i]

    def __bool__(self) -> bool:
        return bool(self.starts)


class CidrSet:
    """A set of networks of both versions; ``address in cidrs`` for an address string."""

    __slots__ = ("v4", "v6", "networks")

    def __init__(self, networks: Iterable[Network] = ()) -> None:
        self.networks = tuple(networks)
        self.v4 = RangeSet(n for n in self.networks if n.version == 4)
        self.v6 = RangeSet(n for n in self.networks if n.version == 6)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CidrSet) and set(self.networks) == set(other.networks)

    def __hash__(self) -> int:
        return hash(frozenset(self.networks))

    def __repr__(self) -> str:
        return f"CidrSet([{', '.join(map(str, self.networks))}])"

    def __contains__(self, address: str) -> bool:
        version, value = address_key(address)
        return value in (self.v4 if version == 4 else self.v6)


def address_key(address: str) -> tuple[int, int]:
    """(IP version, integer value) of an address string; v4-mapped IPv6 counts as IPv4; a
    scope id (``fe80::1%eth0``) is ignored. Raises ValueError for anything else."""
    if ":" not in address:  # dotted quad: without ipaddress's parser (per connection)
        parts = address.split(".")
        if len(parts) == 4 and address.replace(".", "").isdigit() and address.isascii():
            a, b, c, d = map(int, parts)
            if a <= 255 and b <= 255 and c <= 255 and d <= 255:
                return 4, (a << 24) | (b << 16) | (c << 8) | d
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if ip.version == 6:
        mapped = ip.ipv4_mapped  # type: ignore[union-attr]
        if mapped is not None:
            return 4, int(mapped)
    return ip.version, int(ip)


@dataclass(frozen=True)
class AccessList:
    """``--allow``/``--deny`` of one listener."""

    allow: CidrSet = field(default_factory=CidrSet)  # empty: everyone not denied
    deny: CidrSet = field(default_factory=CidrSet)

    @classmethod
    def of(cls, allow: Iterable[str] = (), deny: Iterable[str] = ()) -> AccessList:
        """From CIDR strings (raises ValueError on a bad one)."""
        return cls(CidrSet(map(parse_cidr, allow)), CidrSet(map(parse_cidr, deny)))

    @property
    def active(self) -> bool:
        """False when there is nothing to check (the forwarder skips the call)."""
        return bool(self.allow) or bool(self.deny)

    def permits(self, address: str) -> bool:
        """Deny wins; an empty allow list allows; an unparsable address is refused."""
        try:
            version, value = address_key(address)
        except ValueError:
            return False
        if value in (self.deny.v4 if version == 4 else self.deny.v6):
            return False
        if not self.allow:
            return True
        return value in (self.allow.v4 if version == 4 else self.allow.v6)
