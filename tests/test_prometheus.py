"""A real Prometheus server scrapes a running tcpfwd; the test asks Prometheus's HTTP API."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request

import pytest
from conftest import connect, echo_roundtrip, free_port

PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(PROMETHEUS is None, reason="prometheus is not installed")

CONFIG = """\
global:
  scrape_interval: 1s
  scrape_timeout: 1s
scrape_configs:
  - job_name: portfwd
    static_configs:
      - targets: ["127.0.0.1:{metrics}"]
"""


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as reply:
        return reply.read()


def test_prometheus_scrapes_tcpfwd(tool, echo_server, tmp_path):
    port, metrics, web = free_port(), free_port(), free_port()
    fwd = tool("tcpfwd", "--metrics", f"127.0.0.1:{metrics}", f"127.0.0.1:{port}",
               f"127.0.0.1:{echo_server.port}")
    fwd.wait_for_log("metrics on")
    for i in range(3):
        with connect("127.0.0.1", port) as sock:
            echo_roundtrip(sock, 1000, seed=i)
    config = tmp_path / "prometheus.yml"
    config.write_text(CONFIG.format(metrics=metrics))
    log = open(tmp_path / "prometheus.log", "wb")
    server = subprocess.Popen(
        [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{web}"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        query = urllib.parse.urlencode({"query": "portfwd_connections_opened_total"})
        deadline = time.monotonic() + 60
        result: list = []
        while time.monotonic() < deadline and server.poll() is None:
            try:
                answer = json.loads(get(f"http://127.0.0.1:{web}/api/v1/query?{query}"))
            except OSError:  # not listening yet
                answer = {}
            result = answer.get("data", {}).get("result", [])
            if result:
                break
            time.sleep(0.5)
        assert result, (tmp_path / "prometheus.log").read_text()[-3000:]
        (sample,) = result
        assert sample["metric"]["rule"] == f"tcp:127.0.0.1:{port}"
        assert sample["metric"]["kind"] == "tcp" and sample["metric"]["job"] == "portfwd"
        assert float(sample["value"][1]) == 3
        # the target is healthy in Prometheus's own view
        targets = json.loads(get(f"http://127.0.0.1:{web}/api/v1/targets"))
        (target,) = targets["data"]["activeTargets"]
        assert target["health"] == "up"
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
    assert fwd.stop() == 0
