"""Soak: churn short connections through tcpfwd and the kcptcp tunnel and UDP
sessions through udpfwd for minutes, printing each tool's RSS and fd count over time.

    python bench/soak.py --minutes 30 [--interval 30]

Loopback only. A leak shows as fd counts that do not return to their first value or RSS that
keeps climbing after the first minutes; the exit status is 1 if fds ended above the start.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))  # the shared helpers live with the tests

from conftest import ToolProcess, free_port  # noqa: E402
from hardening import fd_count, rss_kb  # noqa: E402
from test_hardening_churn import UdpEcho, tcp_once, udp_once  # noqa: E402

PSK = "0123456789abcdef" * 4
WORKERS = 4  # loops per kind of traffic


def loop(stop: threading.Event, once, counts: dict, key: str) -> None:
    while not stop.is_set():
        try:
            once()
            counts[key] = counts.get(key, 0) + 1
        except (OSError, AssertionError):
            counts[key + "_err"] = counts.get(key + "_err", 0) + 1
            time.sleep(0.1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--interval", type=float, default=30, help="seconds between samples")
    args = parser.parse_args()
    echo = subprocess.Popen([sys.executable, os.path.join(REPO, "tests", "hardening.py"), "echo"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    echo_port = int(echo.stdout.readline())
    udp_echo = UdpEcho()
    tcp_port, tun_port, udp_port = free_port(), free_port(), free_port(socket.SOCK_DGRAM)
    kcp_udp = free_port(socket.SOCK_DGRAM)
    tools = {
        "tcpfwd": ToolProcess("tcpfwd", f"127.0.0.1:{tcp_port}", f"127.0.0.1:{echo_port}"),
        "kcptcp-server": ToolProcess("kcptcp-server", "-K", PSK, f"127.0.0.1:{kcp_udp}",
                                     f"127.0.0.1:{echo_port}"),
        "kcptcp-client": ToolProcess("kcptcp-client", "-K", PSK, f"127.0.0.1:{tun_port}",
                                     f"127.0.0.1:{kcp_udp}"),
        "udpfwd": ToolProcess("udpfwd", f"127.0.0.1:{udp_port}",
                              f"127.0.0.1:{udp_echo.port}", "-t", "1"),
    }
    stop = threading.Event()
    counts: dict[str, int] = {}
    ok = True
    try:
        for tool in tools.values():
            tool.wait_for_log(r"forwarding|tunnelling|listening")
        kinds = {"tcp": lambda: tcp_once(tcp_port), "tunnel": lambda: tcp_once(tun_port),
                 "udp": lambda: udp_once(udp_port)}
        threads = [threading.Thread(target=loop, args=(stop, once, counts, key), daemon=True)
                   for key, once in kinds.items() for _ in range(WORKERS)]
        for thread in threads:
            thread.start()
        print("t_s  " + "  ".join(f"{name}:rss_kB/fds" for name in tools) + "  counts")
        started = time.monotonic()
        while time.monotonic() - started < args.minutes * 60:
            time.sleep(min(args.interval, args.minutes * 60))
            row = []
            for name, tool in tools.items():
                if tool.proc.poll() is not None:
                    print(f"soak: {name} exited {tool.proc.returncode}")
                    return 1
                row.append(f"{rss_kb(tool.pid)}/{fd_count(tool.pid)}")
            print(f"{time.monotonic() - started:5.0f}  " + "  ".join(row) + f"  {counts}",
                  flush=True)
        stop.set()
        for thread in threads:
            thread.join(15)
        time.sleep(3)  # conversations close, udpfwd sessions expire
        for name, tool in tools.items():
            fds = fd_count(tool.pid)
            tb = "Traceback" in tool.log()
            print(f"soak: {name} end: rss {rss_kb(tool.pid)} kB, fds {fds}, traceback {tb}")
            ok = ok and fds <= 8 and not tb  # idle: listener(s), epoll, pipes, stdio
    finally:
        stop.set()
        for tool in tools.values():
            tool.stop()
            tool.close()
        echo.stdin.close()
        echo.wait(10)
    print("soak: PASS" if ok else "soak: FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
