"""``fastws bench --clients --quick``: every Python client, both ceilings, resume and live latency.

The smoke mode: 2,000 echoes per client and mode, one repeat, a resume of
100 missed messages and 200 live messages per broker kind (pub/sub and
Streams, two nodes each) on the test Redis. It asserts what the run must
get right (every client finished, every live message reached both nodes,
the resume recovered); it never asserts a timing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from brokerutil import REDIS_URL

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(300)
def test_bench_clients_quick(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "fastws.bench", "--clients", "--quick", "--out", str(tmp_path),
         "--redis-url", REDIS_URL],
        cwd=REPO, capture_output=True, text=True, timeout=280,
    )
    report = f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, report
    results = json.loads((tmp_path / "clients.json").read_text())
    assert results["skipped"] == {}, results["skipped"]
    for mode in ("pingpong", "pipelined"):
        by_client = results["modes"][mode]
        assert set(by_client) == {"fastws", "fastws-cb", "websockets", "picows", "aiohttp", "raw-loop",
                                  "raw-blocking"}, (mode, set(by_client))
        for client, r in by_client.items():
            assert r["median"] > 0 and r["cpu_us_per_msg"] > 0, (mode, client, r)
    assert results["resume"]["missed"] == 100
    assert all(r["messages"] == 100 for r in results["resume"]["runs"]), results["resume"]
    live = results["live"]
    assert live["complete"], live
    assert set(live["runs"]) == {"pubsub", "streams"}
    for kind, runs in live["runs"].items():
        for r in runs:
            assert r["a"]["received"] == r["b"]["received"] == live["messages"] == 200, (kind, r)
    assert "ceiling, no WebSocket client" in proc.stdout, report
    assert "| streams |" in proc.stdout and "| pubsub |" in proc.stdout, report
