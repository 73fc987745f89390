"""Prometheus metrics from the services' snapshots, read at scrape time, served on the gevent hub.

Glossary: a *rule* is one forwarding job (a one-rule tool has one; ``portfwd run`` many), named
by the ``rule`` label (default ``<kind>:<listen as written>``); its *kind* (``tcp``, ``udp``,
``kcptcp-client``, ``kcptcp-server``) picks the :class:`RuleKind` that turns its snapshot into
metric families, status lines and a one-line summary. The tools define their kinds (each tool's
``metrics.KIND``); this module knows none of them (tests/test_layers.py).

Nothing here runs per packet: :class:`SnapshotCollector` asks for every rule's ``metrics()``
snapshot when Prometheus scrapes, and the families are built from it then. The HTTP endpoint is
gevent's WSGI server with prometheus_client's WSGI app, greenlets in the hub like everything
else (prometheus_client's own server would run a thread). It is unauthenticated: bound to a
non-loopback address it says so in the log.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gevent.pywsgi import WSGIServer
from prometheus_client import CollectorRegistry, ProcessCollector, make_wsgi_app
from prometheus_client.metrics_core import Metric

from portfwd.runtime.addr import Resolved
from portfwd.runtime.options import StartupError
from portfwd.runtime.sockets import ListenOptions, bind_socket, cooperative

log = logging.getLogger(__name__)

PREFIX = "portfwd_"
METRICS_PATH = "/metrics"
LISTEN_BACKLOG = 64
TOP = 10  # connections / conversations listed per rule in a status dump

Labels = Mapping[str, str]
# (kind, rule, snapshot) of every rule the process runs, taken now
RuleSnapshots = Callable[[], Sequence[tuple[str, str, Any]]]


class Families:
    """The metric families of one scrape, filled rule by rule: each name is one family whose
    samples carry the rules' labels. Names are given without ``portfwd_`` and, for counters,
    without ``_total``."""

    def __init__(self) -> None:
        self._families: dict[str, Metric] = {}

    def _family(self, name: str, doc: str, mtype: str, unit: str = "") -> Metric:
        family = self._families.get(name)
        if family is None:
            family = self._families[name] = Metric(PREFIX + name, doc, mtype, unit)
        return family

    def counter(self, name: str, doc: str, value: float, labels: Labels) -> None:
        self._family(name, doc, "counter").add_sample(f"{PREFIX}{name}_total", dict(labels),
                                                      value)

    def gauge(self, name: str, doc: str, value: float, labels: Labels) -> None:
        self._family(name, doc, "gauge").add_sample(PREFIX + name, dict(labels), value)

    def counters_by(self, name: str, doc: str, key: str, counts: Mapping[str, int],
                    labels: Labels) -> None:
        """One sample per entry of ``counts`` (errno names, reasons), ``key`` its label; the
        family is declared even when nothing was counted yet."""
        self._family(name, doc, "counter")
        for value_name, value in counts.items():
            self.counter(name, doc, value, {**labels, key: value_name})

    def gauge_histogram(self, name: str, doc: str, values: Iterable[float],
                        buckets: Sequence[float], labels: Labels) -> None:
        """The distribution of a value over what is live now (e.g. each conversation's
        smoothed RTT): cumulative ``_bucket`` counts, ``_gcount`` and ``_gsum``."""
        family = self._family(name, doc, "gaugehistogram")
        counts = [0] * (len(buckets) + 1)
        total = 0.0
        for value in values:
            total += value
            for i, bound in enumerate(buckets):
                if value <= bound:
                    counts[i] += 1
                    break
            else:
                counts[-1] += 1
        running = 0
        base = f"{PREFIX}{name}"
        for bound, count in zip((*buckets, float("inf")), counts, strict=True):
            running += count
            le = "+Inf" if bound == float("inf") else repr(float(bound))
            family.add_sample(base + "_bucket", {**labels, "le": le}, running)
        family.add_sample(base + "_gcount", dict(labels), running)
        family.add_sample(base + "_gsum", dict(labels), total)

    def collect(self) -> list[Metric]:
        return list(self._families.values())


@dataclass(frozen=True)
class RuleKind:
    """How one kind of rule is shown: the tools fill one in each (their ``metrics.KIND``)."""

    name: str  # the ``kind`` label: "tcp", "udp", "kcptcp-client", "kcptcp-server"
    families: Callable[[Families, Labels, Any], None]  # snapshot -> samples with these labels
    status: Callable[[Any], list[str]]  # snapshot -> SIGUSR1 lines (counters, top 10)
    summary: Callable[[Any], str]  # snapshot -> a few words for systemd's STATUS=


def rule_name(kind: str, listen: object) -> str:
    """The default rule name: ``<kind>:<listen as written>``."""
    return f"{kind}:{listen}"


def rule_snapshots(service: Any, rule: tuple[str, str] | None) -> RuleSnapshots:
    """What to read at scrape time: ``service.rule_snapshots()`` when it has one (``portfwd
    run``: every rule), else its ``metrics()`` as the one rule ``rule = (kind, name)``."""
    many = getattr(service, "rule_snapshots", None)
    if many is not None:
        return many
    if rule is None:
        raise ValueError("a service without rule_snapshots() needs its (kind, rule)")
    kind, name = rule
    return lambda: [(kind, name, service.metrics())]


class SnapshotCollector:
    """A prometheus_client collector that renders every rule's snapshot when scraped."""

    def __init__(self, snapshots: RuleSnapshots, kinds: Mapping[str, RuleKind]) -> None:
        self.snapshots = snapshots
        self.kinds = kinds

    def collect(self) -> Iterator[Metric]:
        families = Families()
        for kind, rule, snapshot in self.snapshots():
            self.kinds[kind].families(families, {"kind": kind, "rule": rule}, snapshot)
        yield from families.collect()

    def describe(self) -> list[Metric]:
        return []  # families depend on the rules: nothing to check at registration


class ValueCollector:
    """Unlabelled values read at scrape time: ``values()`` gives ``(name, doc, "counter" or
    "gauge", value)`` rows, names as :class:`Families` takes them (the -w workers' own)."""

    def __init__(self, values: Callable[[], Iterable[tuple[str, str, str, float]]]) -> None:
        self.values = values

    def collect(self) -> Iterator[Metric]:
        families = Families()
        for name, doc, mtype, value in self.values():
            add = families.counter if mtype == "counter" else families.gauge
            add(name, doc, value, {})
        yield from families.collect()

    def describe(self) -> list[Metric]:
        return []


def make_registry(snapshots: RuleSnapshots, kinds: Mapping[str, RuleKind],
                  process: bool = True) -> CollectorRegistry:
    """A registry with the snapshot collector and (``process``) the standard process collector
    (``process_open_fds``, ``process_resident_memory_bytes``, ``process_cpu_seconds_total``)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(snapshots, kinds))
    if process:
        ProcessCollector(registry=registry)
    return registry


def status_lines(snapshots: RuleSnapshots, kinds: Mapping[str, RuleKind]) -> list[str]:
    """The SIGUSR1 dump: for every rule a header, then its kind's status lines."""
    lines: list[str] = []
    for kind, rule, snapshot in snapshots():
        lines.append(f"status rule={rule} kind={kind}")
        lines.extend(f"status rule={rule}: {line}" for line in kinds[kind].status(snapshot))
    return lines


def summary_line(snapshots: RuleSnapshots, kinds: Mapping[str, RuleKind]) -> str:
    """systemd's STATUS=: every rule's summary, ``; ``-separated."""
    return "; ".join(f"{rule}: {kinds[kind].summary(snapshot)}"
                     for kind, rule, snapshot in snapshots())


def top(entries: Iterable[Any], size: Callable[[Any], int], count: int = TOP) -> list[Any]:
    """The ``count`` largest entries by ``size``, largest first (for the status dumps)."""
    return sorted(entries, key=size, reverse=True)[:count]


def is_loopback(addr: Resolved) -> bool:
    try:
        return ipaddress.ip_address(addr.host.split("%")[0]).is_loopback
    except ValueError:
        return False


class MetricsEndpoint:
    """``GET /metrics`` on ``addr``, bound in the foreground (so a busy port is a start-up
    error, exit 1) and served by :meth:`start` on the hub."""

    def __init__(self, addr: Resolved, registry: CollectorRegistry) -> None:
        try:
            sock = bind_socket(addr, socket.SOCK_STREAM, ListenOptions(reuseaddr=True))
            sock.listen(LISTEN_BACKLOG)
        except OSError as exc:
            raise StartupError(f"cannot serve metrics on {addr}: {exc.strerror or exc}") from None
        self.sock = cooperative(sock)  # accepted connections are gevent sockets too
        self.addr = addr
        metrics_app = make_wsgi_app(registry)

        def app(environ: dict, start_response: Callable) -> Iterable[bytes]:
            if environ.get("PATH_INFO", "/") not in (METRICS_PATH, METRICS_PATH + "/"):
                start_response("404 Not Found", [("Content-Type", "text/plain")])
                return [b"metrics are at /metrics\n"]
            return metrics_app(environ, start_response)

        self.server = WSGIServer(self.sock, app, log=None, error_log=log)

    @property
    def address(self) -> tuple:
        return self.sock.getsockname()

    def start(self) -> None:
        self.server.start()
        if not is_loopback(self.addr):
            log.warning("metrics endpoint on %s is not loopback: it is unauthenticated, anyone "
                        "who can reach it reads every counter", self.addr)
        log.info("metrics on http://%s%s", self.addr, METRICS_PATH)

    def stop(self) -> None:
        self.server.stop(timeout=1)
