"""A WAN in the lab: two network namespaces joined by TUN devices and a userspace relay.

    with wan(Direction(delay_ms=50, loss=0.05, rate_mbit=100)) as link:
        subprocess.run(link.argv("server", ["iperf3", "-s", "-D"]))
        with link.socket("client", socket.SOCK_STREAM) as s:
            s.connect((SERVER_IP, 5201))

The "client site" and "server site" namespaces each hold one TUN device (``10.201.0.1`` and
``10.201.0.2``, point to point); a relay process (this file, ``serve``) reads raw IP packets
from each TUN file descriptor, runs them through one ``wan_model.Link`` per direction (loss,
burst loss, bottleneck queue, delay, jitter, reordering: seeded) and writes them into the other
TUN. TCP and UDP alike cross it, so plain TCP, kcptcp and kcptun see the same path. The relay
runs in its own process (its own GIL) and takes JSON commands on stdin (``stats``, ``set``).
Needs root and /dev/net/tun. Everything is torn down on exit: the relay is ended (its TUN
devices die with their file descriptors), every process left in either namespace is killed
and both namespaces are deleted.

``python bench/wan.py ceiling`` measures what the emulator itself can carry (pps, Mbit/s,
added round-trip latency at zero configured delay).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import random
import secrets
import selectors
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import iperf3, process  # noqa: E402
from wan_model import Direction, Link  # noqa: E402

CLIENT_IP = "10.201.0.1"  # the client site's address on its TUN device
SERVER_IP = "10.201.0.2"  # the server site's address
MTU = 1500  # bytes, both TUN devices (an Ethernet path)
TXQUEUELEN = 10000  # packets the kernel queues towards the relay per TUN (it must not drop)
READ_BATCH = 64  # packets read from one TUN per wakeup before serving the other
READY_TIMEOUT = 10.0  # s for the relay to bring the devices up
RELAY_PRIORITY = 10  # SCHED_RR priority of the relay process (1..99)
TUNSETIFF = 0x400454CA
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def available() -> str | None:
    """Why the emulator cannot run here, or None."""
    if os.geteuid() != 0:
        return "not root"
    if not os.path.exists("/dev/net/tun"):
        return "no /dev/net/tun"
    return None


@contextlib.contextmanager
def inside(netns: str) -> Iterator[None]:
    """Run the body with the calling *thread* in ``netns`` (setns(2)); sockets created there
    stay in it after the thread returns to its own namespace."""
    with open("/proc/thread-self/ns/net") as home, open(f"/run/netns/{netns}") as target:
        if _libc.setns(target.fileno(), CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {netns}")
        try:
            yield
        finally:
            _libc.setns(home.fileno(), CLONE_NEWNET)


@dataclass
class Wan:
    """A running emulated path: its two namespaces and the relay's control channel."""

    client_ns: str
    server_ns: str
    relay: subprocess.Popen

    def ns(self, side: str) -> str:
        return {"client": self.client_ns, "server": self.server_ns}[side]

    def argv(self, side: str, argv: list[str]) -> list[str]:
        """``argv`` run inside one site's namespace."""
        return ["ip", "netns", "exec", self.ns(side), *argv]

    def socket(self, side: str, type: int = socket.SOCK_DGRAM) -> socket.socket:
        """An IPv4 socket that lives in one site's namespace."""
        with inside(self.ns(side)):
            return socket.socket(socket.AF_INET, type)

    def _command(self, command: dict) -> dict:
        assert self.relay.stdin is not None and self.relay.stdout is not None
        self.relay.stdin.write(json.dumps(command) + "\n")
        self.relay.stdin.flush()
        line = self.relay.stdout.readline()
        if not line:
            raise RuntimeError("the WAN relay exited")
        return json.loads(line)

    def stats(self) -> dict:
        """The relay's counters: ``{"forward": {...}, "back": {...}}`` (wan_model.LinkCounters)."""
        return self._command({"cmd": "stats"})

    def set(self, forward: Direction, back: Direction | None = None) -> None:
        """New settings for both directions (``back`` defaults to ``forward``), from now on."""
        self._command({"cmd": "set", "forward": forward.as_dict(),
                       "back": (back or forward).as_dict()})


def _ns_add(name: str) -> None:
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
    # No IPv6 on the TUN: router solicitations would be noise in every measurement.
    subprocess.run(["ip", "netns", "exec", name, "sysctl", "-qw",
                    "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"],
                   check=True)


def _ns_del(name: str) -> None:
    pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True,
                          text=True).stdout.split()
    for pid in pids:  # anything still there was started by us: the namespace is ours alone
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)
    subprocess.run(["ip", "netns", "del", name], check=False)


@contextlib.contextmanager
def wan(forward: Direction, back: Direction | None = None, seed: int = 1) -> Iterator[Wan]:
    """Build the two sites and the relay (``back`` defaults to ``forward``); tear all down."""
    why = available()
    if why:
        raise RuntimeError(f"the WAN emulator needs root and /dev/net/tun: {why}")
    tag = f"{os.getpid()}-{secrets.token_hex(3)}"
    names = (f"wanc-{tag}", f"wans-{tag}")
    created: list[str] = []
    relay = None
    try:
        for name in names:
            _ns_add(name)
            created.append(name)
        config = {"client_ns": names[0], "server_ns": names[1], "seed": seed,
                  "forward": forward.as_dict(), "back": (back or forward).as_dict()}
        relay = subprocess.Popen([sys.executable, os.path.abspath(__file__), "serve",
                                  json.dumps(config)], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True)
        ready = _readline(relay, READY_TIMEOUT)
        if ready.strip() != "ready":
            raise RuntimeError(f"the WAN relay did not start: {ready!r}")
        yield Wan(names[0], names[1], relay)
    finally:
        if relay is not None:
            relay.terminate()
            try:
                relay.wait(10)
            except subprocess.TimeoutExpired:
                relay.kill()
                relay.wait()
        for name in created:
            _ns_del(name)


def _readline(proc: subprocess.Popen, timeout: float) -> str:
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return out[0] if out else ""


# --- the relay process ------------------------------------------------------------------------

def _open_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def _place(dev: str, netns: str, address: str, peer: str) -> None:
    """Move a TUN device into its site and give it its point-to-point address and route."""
    for cmd in (["ip", "link", "set", dev, "netns", netns],
                ["ip", "-n", netns, "addr", "add", address, "peer", peer, "dev", dev],
                ["ip", "-n", netns, "link", "set", dev, "mtu", str(MTU), "txqueuelen",
                 str(TXQUEUELEN), "up"]):
        subprocess.run(cmd, check=True)


def serve(config: dict) -> None:
    """The relay: TUN <-> Link <-> TUN, until SIGTERM. Commands on stdin, replies on stdout."""
    # The relay is the network: on a loaded machine it must not wait for a CPU behind the
    # software under test (a real-time priority; it sleeps in select() between packets).
    with contextlib.suppress(OSError, AttributeError):
        os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(RELAY_PRIORITY))
    rng = random.Random(config["seed"])
    links = {"forward": Link(Direction(**config["forward"]), random.Random(rng.random())),
             "back": Link(Direction(**config["back"]), random.Random(rng.random()))}
    suffix = secrets.token_hex(3)
    devs = (f"wanc{suffix}", f"wans{suffix}")
    fd_client, fd_server = _open_tun(devs[0]), _open_tun(devs[1])
    _place(devs[0], config["client_ns"], CLIENT_IP, SERVER_IP)
    _place(devs[1], config["server_ns"], SERVER_IP, CLIENT_IP)
    # A packet read from the client's TUN goes forward and out of the server's, and back.
    routes = {fd_client: (links["forward"], fd_server), fd_server: (links["back"], fd_client)}
    outs = ((links["forward"], fd_server), (links["back"], fd_client))
    sel = selectors.DefaultSelector()
    for fd in routes:
        sel.register(fd, selectors.EVENT_READ)
    sel.register(sys.stdin, selectors.EVENT_READ)
    print("ready", flush=True)
    read, write, monotonic = os.read, os.write, time.monotonic
    while True:
        deadlines = [d for d in (links["forward"].next_deadline(),
                                 links["back"].next_deadline()) if d is not None]
        timeout = max(0.0, min(deadlines) - monotonic()) if deadlines else None
        for key, _ in sel.select(timeout):
            if key.fileobj is sys.stdin:
                if not _control(sys.stdin.readline(), links):
                    return
                continue
            link, _ = routes[key.fd]
            now = monotonic()
            for _ in range(READ_BATCH):
                try:
                    link.offer(read(key.fd, 65536), now)
                except BlockingIOError:
                    break
        now = monotonic()
        for link, fd in outs:
            for packet in link.deliver(now):
                with contextlib.suppress(OSError):  # the site's stack refused it: lost
                    write(fd, packet)


def _control(line: str, links: dict[str, Link]) -> bool:
    if not line:
        return False  # our parent is gone
    command = json.loads(line)
    if command["cmd"] == "set":
        for name in links:
            links[name].reconfigure(Direction(**command[name]))
        reply: dict = {"ok": True}
    else:
        reply = {name: asdict(link.counters) for name, link in links.items()}
    print(json.dumps(reply), flush=True)
    return True


# --- measuring the emulator itself --------------------------------------------------------------

def udp_rtts(link: Wan, count: int, size: int = 64, budget: float = 20.0) -> list[float]:
    """Sequential UDP echoes client -> server site through the emulator; round trips in ms.

    A lost probe or reply is skipped after 1 s (it is not a sample)."""
    server = link.socket("server")
    client = link.socket("client")
    with server, client:
        server.bind((SERVER_IP, 0))
        port = server.getsockname()[1]
        stop = threading.Event()

        def echo() -> None:
            server.settimeout(0.2)
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    data, addr = server.recvfrom(65536)
                    server.sendto(data, addr)

        thread = threading.Thread(target=echo, daemon=True)
        thread.start()
        client.settimeout(1.0)
        samples: list[float] = []
        deadline = time.monotonic() + budget
        try:
            for i in range(count):
                if time.monotonic() > deadline:
                    break
                payload = i.to_bytes(4, "big") + bytes(size - 4)
                start = time.perf_counter()
                client.sendto(payload, (SERVER_IP, port))
                with contextlib.suppress(TimeoutError):
                    while client.recv(65536)[:4] != payload[:4]:
                        pass  # a late reply to an earlier probe
                    samples.append((time.perf_counter() - start) * 1000)
        finally:
            stop.set()
            thread.join()
    return samples


@dataclass(frozen=True)
class Ceiling:
    """What the emulator carries with nothing configured (its own limits)."""

    mbit: float  # iperf3 TCP, 1 stream, client -> server site
    pps: float  # iperf3 UDP 64-byte datagrams delivered per second, unlimited offer
    rtt_p50_ms: float  # UDP echo round trip at zero configured delay
    rtt_p99_ms: float

    def describe(self) -> str:
        return (f"emulator ceiling (this run, loaded machine): {self.mbit:.0f} Mbit/s TCP, "
                f"{self.pps / 1000:.1f} kpps (64-byte UDP), added RTT p50 {self.rtt_p50_ms:.2f} "
                f"ms / p99 {self.rtt_p99_ms:.2f} ms at zero configured delay")


def wait_bound(link: Wan, side: str, port: int, socktype: int = socket.SOCK_STREAM,
               proc: subprocess.Popen | None = None, timeout: float = 10.0) -> None:
    """Wait until something in one site is bound to ``port`` (our own bind there fails),
    without connecting or sending (iperf3 -s dislikes probes). ``proc`` dying ends the wait."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with link.socket(side, socktype) as probe:
            try:
                probe.bind(("0.0.0.0", port))
            except OSError:
                return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[4]} exited with {proc.returncode}")
        time.sleep(0.05)
    raise RuntimeError(f"nothing bound to port {port} in the {side} site")


@contextlib.contextmanager
def iperf3_server(link: Wan, port: int = 5201) -> Iterator[int]:
    """An iperf3 -s in the server site; its port."""
    with process(link.argv("server", ["iperf3", "-s", "-p", str(port)])) as proc:
        wait_bound(link, "server", port, proc=proc)
        yield port


def iperf3_through(link: Wan, port: int, seconds: int, *extra: str,
                   host: str = SERVER_IP) -> dict:
    """iperf3 -c from the client site to host:port; the parsed JSON result."""
    return iperf3(port, seconds, *extra, host=host, prefix=tuple(link.argv("client", [])))


def ceiling(seconds: int = 3) -> Ceiling:
    with wan(Direction()) as link:
        rtts = udp_rtts(link, 300)
        with iperf3_server(link) as port:
            tcp = iperf3_through(link, port, seconds)
            udp = iperf3_through(link, port, seconds, "-u", "-b", "0", "-l", "64")
    mbit = tcp["end"]["sum_received"]["bits_per_second"] / 1e6
    s = udp["end"]["sum"]
    pps = (s["packets"] - s["lost_packets"]) / s["seconds"]
    ordered = sorted(rtts)
    return Ceiling(mbit, pps, statistics.median(ordered),
                   ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))])


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        serve(json.loads(sys.argv[2]))
    elif sys.argv[1:2] == ["ceiling"]:
        print(ceiling().describe())
    else:
        sys.exit("usage: wan.py ceiling")
