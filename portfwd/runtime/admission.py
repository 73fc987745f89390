"""The admission gate of a TCP listener (tcpfwd, kcptcp-client): who may connect, how many at
once, and who the client really is when a proxy in front sends a PROXY header.

Order per accepted connection, all before any dial: ``--max-conns`` (beyond it the connection
is closed at once: accepted, so the backlog never fills and the accept loop never spins),
then with ``--accept-proxy`` the sender must be in ``--proxy-from`` and send a valid header
within 5 s, then ``--allow``/``--deny`` on the client address (the header's, if any). Every
refusal closes the connection, is counted and logged (rate-limited: a flood is one line per
10 s per kind).

Fields read by :func:`admission_config`: ``allow``, ``deny``, ``max_conns``, ``accept_proxy``,
``proxy_from``.
"""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from gevent.socket import wait_read

from portfwd.policy.cidr import AccessList, CidrSet
from portfwd.policy.proxy import MalformedHeader, Parsed, ProxyParser
from portfwd.runtime.addr import format_sockaddr
from portfwd.runtime.exporter import Families, Labels
from portfwd.runtime.logs import RateLimitedLog
from portfwd.runtime.options import ConfigError, Options

log = logging.getLogger(__name__)

PROXY_HEADER_TIMEOUT = 5.0  # s for a client to send its whole PROXY header
HEADER_READ = 4096  # bytes per recv while reading a header (the rest is relayed on)
MAX_CONNS_LIMIT = 1 << 20  # connections: bound of --max-conns


@dataclass(frozen=True)
class Admission:
    """The gate's settings."""

    access: AccessList = field(default_factory=AccessList)  # --allow / --deny
    max_conns: int = 0  # connections at once, 0 = no limit
    accept_proxy: bool = False  # --accept-proxy: every client must start with a PROXY header
    proxy_from: CidrSet | None = None  # --proxy-from; None = any peer may send the header
    header_timeout: float = PROXY_HEADER_TIMEOUT  # s


def admission_config(options: Options) -> Admission:
    """Validate the gate's options; raises ConfigError naming the bad one."""
    access = AccessList(CidrSet(options.cidrs("allow")), CidrSet(options.cidrs("deny")))
    proxy_from = options.cidrs("proxy_from")
    accept_proxy = options.flag("accept_proxy")
    if proxy_from and not accept_proxy:
        raise ConfigError("proxy_from", f"{options.label('proxy_from')} needs "
                                        f"{options.label('accept_proxy')}")
    return Admission(access=access, max_conns=options.integer("max_conns", 0, MAX_CONNS_LIMIT, 0),
                     accept_proxy=accept_proxy,
                     proxy_from=CidrSet(proxy_from) if proxy_from else None)


class Client(NamedTuple):
    """An admitted connection: who it is for and what was already read from it (a tuple:
    made per connection)."""

    address: tuple  # the client's (host, port): the PROXY header's source, else the TCP peer
    local: tuple | None  # the address the client connected to, when a PROXY header said so;
    # None: the connection's own (``getsockname()``, asked only by who needs it)
    peer: tuple  # the TCP peer itself (the proxy, when a header came)
    early: bytes = b""  # stream bytes that arrived with the header: relay them first


class Gate:
    """Runs the checks; counts and logs refusals. One per listener."""

    def __init__(self, admission: Admission) -> None:
        self.admission = admission
        self.denied = 0  # refused by --allow/--deny
        self.over_limit = 0  # refused by --max-conns
        self.proxy_rejected = 0  # PROXY header missing, malformed, late or from an untrusted peer
        self._faults = RateLimitedLog(log)
        self._access = admission.access if admission.access.active else None

    @property
    def checks(self) -> bool:
        """False when the gate admits everyone as they are (callers may skip it)."""
        a = self.admission
        return a.access.active or a.max_conns > 0 or a.accept_proxy

    def admit(self, sock: socket.socket, peer: tuple, active: int) -> Client | None:
        """The connection's client, or None when it must be closed (the caller closes it).
        ``active``: connections this listener holds now, this one not included."""
        admission = self.admission
        if admission.max_conns and active >= admission.max_conns:
            self.over_limit += 1
            self._faults.warning("max-conns", "connection from %s refused: --max-conns %d "
                                 "reached", format_sockaddr(peer), admission.max_conns)
            return None
        client = Client(address=peer, local=None, peer=peer)
        if admission.accept_proxy:
            client = self._read_header(sock, peer)
            if client is None:
                return None
        if self._access is not None and not self._access.permits(client.address[0]):
            self.denied += 1
            self._faults.warning("acl", "connection from %s denied by --allow/--deny",
                                 format_sockaddr(client.address))
            return None
        return client

    def _read_header(self, sock: socket.socket, peer: tuple) -> Client | None:
        admission = self.admission
        if admission.proxy_from is not None and peer[0] not in admission.proxy_from:
            return self._reject(peer, "not in --proxy-from")
        try:
            parsed = read_proxy_header(sock, admission.header_timeout)
        except MalformedHeader as exc:
            return self._reject(peer, str(exc))
        except TimeoutError:
            return self._reject(peer, f"no complete PROXY header in "
                                      f"{admission.header_timeout:g} s")
        except OSError as exc:
            return self._reject(peer, exc.strerror or str(exc))
        header = parsed.header
        if not header.has_address or not isinstance(header.source, tuple):
            # LOCAL / UNKNOWN (a health check) or a UNIX address: the connection is its own.
            return Client(address=peer, local=None, peer=peer, early=parsed.rest)
        destination = header.destination if isinstance(header.destination, tuple) else None
        return Client(address=header.source, local=destination, peer=peer, early=parsed.rest)

    def _reject(self, peer: tuple, reason: str) -> None:
        self.proxy_rejected += 1
        self._faults.warning("proxy", "connection from %s closed: PROXY header: %s",
                             format_sockaddr(peer), reason)
        return None


def read_proxy_header(sock: socket.socket, timeout: float) -> Parsed:
    """Read and parse one PROXY header (v1 or v2) within ``timeout`` seconds. Raises
    MalformedHeader (also for EOF before its end), TimeoutError or OSError. Leaves the socket
    non-blocking."""
    sock.setblocking(False)
    parser = ProxyParser()
    deadline = time.monotonic() + timeout
    while True:
        try:
            data = sock.recv(HEADER_READ)
        except BlockingIOError:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("PROXY header timeout") from None
            wait_read(sock.fileno(), left, TimeoutError("PROXY header timeout"))
            continue
        if not data:
            raise MalformedHeader("connection closed inside the PROXY header")
        result = parser.feed(data)
        if result is not None:
            return result


class SourceFilter:
    """--allow/--deny on the sources of datagrams (udpfwd, the tunnel servers, kcpudp-client):
    a refused source is counted and logged (rate-limited) before any work is done for it. The
    count lives across reloads (:meth:`update`), so the exported counter never goes down."""

    __slots__ = ("access", "active", "denied", "_faults", "_what")

    def __init__(self, access: AccessList, log: logging.Logger, what: str) -> None:
        self.denied = 0  # datagrams (or HELLOs) dropped unread
        self._faults = RateLimitedLog(log)
        self._what = what  # what the log line calls a dropped packet: "datagram", "HELLO"
        self.update(access)

    def update(self, access: AccessList) -> None:
        self.access = access
        self.active = access.active  # callers test this first: one attribute per packet

    def permits(self, addr: Any) -> bool:
        if self.access.permits(addr[0]):
            return True
        self.denied += 1
        self._faults.warning("acl", "%s from %s dropped: denied by --allow/--deny", self._what,
                             format_sockaddr(addr))
        return False


def refusal_families(out: Families, labels: Labels, m: Any) -> None:
    """The admission gate's refusals (tcpfwd, kcptcp-client): ``denied``, ``over_limit``,
    ``proxy_rejected``."""
    out.counters_by("connections_refused", "Connections closed before any dial, by reason "
                    "(denied: --allow/--deny; over_limit: --max-conns; proxy: a PROXY header "
                    "missing, malformed, late or untrusted)", "reason",
                    {"denied": m.denied, "over_limit": m.over_limit,
                     "proxy": m.proxy_rejected}, labels)
