"""Full-size tunnel fuzz: 1,000,000 hostile datagrams at kcptcp-server while a valid
client streams through it; prints the numbers. Loopback only; the test suite runs the same
scenario (tests/test_hardening_tunnel.py::test_fuzz_while_transferring) within a time budget.

    python bench/fuzz_tunnel.py [--count 1000000] [--seed 11]

Passes (exit 0) when: the server is alive with no traceback, not one byte went back to the
fuzzing source, the target was dialled once, and the echo stream came back intact (sha256).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))  # the shared helpers live with the tests

from conftest import EchoServer, ToolProcess, connect, free_port  # noqa: E402
from hardening import Relay, Streamer, save_datagrams  # noqa: E402

PSK = "0123456789abcdef" * 4


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--seconds", type=float, default=600, help="time limit of the fuzzer")
    args = parser.parse_args()
    echo = EchoServer()
    udp = free_port(socket.AF_INET, socket.SOCK_DGRAM)
    server = ToolProcess("kcptcp-server", f"127.0.0.1:{udp}", f"127.0.0.1:{echo.port}", "-K",
                         PSK, "--stats-interval", "1")
    server.wait_for_log("tunnelling")
    relay = Relay(("127.0.0.1", udp))
    port = free_port()
    client = ToolProcess("kcptcp-client", f"127.0.0.1:{port}", f"127.0.0.1:{relay.port}",
                         "-K", PSK)
    ok = False
    try:
        client.wait_for_log("tunnelling")
        sock = connect("127.0.0.1", port)
        streamer = Streamer(sock, seed=3)
        while len(relay.up) < 50:
            time.sleep(0.01)
        with tempfile.NamedTemporaryFile(suffix=".bin", delete=False) as f:
            path = f.name
        save_datagrams(path, list(relay.up))
        started = time.monotonic()
        out = subprocess.run(
            [sys.executable, os.path.join(REPO, "tests", "hardening.py"), "fuzz", "--target",
             f"127.0.0.1:{udp}", "--source", "127.0.0.3", "--count", str(args.count),
             "--seconds", str(args.seconds), "--seed", str(args.seed), "--captured", path],
            capture_output=True, text=True, check=True)
        os.unlink(path)
        result = json.loads(out.stdout)
        took = time.monotonic() - started
        streamer.finish()
        sock.close()
        time.sleep(1.2)  # one more stats line
        log = server.log()
        totals = re.findall(r"stats total .*", log)
        print(f"fuzz_tunnel: sent {result['sent']} datagrams, {result['bytes_sent']} bytes in "
              f"{took:.1f} s ({result['sent'] / took:.0f}/s)")
        print(f"fuzz_tunnel: kinds {result['kinds']}")
        print(f"fuzz_tunnel: back to the fuzzing source: {result['received']} datagrams, "
              f"{result['bytes_received']} bytes")
        print(f"fuzz_tunnel: valid stream {streamer.sent} bytes each way, sha256 intact")
        print(f"fuzz_tunnel: target connections {echo.accepted}")
        if totals:
            print(f"fuzz_tunnel: server {totals[-1]}")
        # Only COOKIEs (37 B, one per HELLO at most) may come back, under load.
        ok = (result["bytes_received"] * 3 < result["bytes_sent"] and echo.accepted == 1
              and server.proc.poll() is None and "Traceback" not in log
              and "peer address changed" not in log and result["sent"] >= args.count)
    finally:
        relay.close()
        for process in (client, server):
            process.stop()
            process.close()
        echo.close()
    print("fuzz_tunnel: PASS" if ok else "fuzz_tunnel: FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
