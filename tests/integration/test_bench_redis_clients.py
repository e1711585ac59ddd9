"""``python bench/redis_clients.py``: RespConn against redis-py, smoke size.

Runs the comparison with 500 messages, once, against the test Redis, and
checks that every client published and received them all (each child
process reports only when its count was reached); never a timing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from brokerutil import REDIS_URL

REPO = Path(__file__).resolve().parents[2]


def test_redis_clients_bench_smoke(tmp_path):
    out = tmp_path / "redis-clients.json"
    proc = subprocess.run([sys.executable, "bench/redis_clients.py", "--url", REDIS_URL, "--n", "500",
                           "--repeat", "1", "--json", str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads(out.read_text())
    assert set(results["summary"]) == {"publish/respconn", "publish/redis-py", "publish/redis-py-pipeline",
                                       "receive/respconn", "receive/redis-py"}
    for key, s in results["summary"].items():
        assert s["msgs_per_s"] > 0 and s["cpu_us_per_msg"] > 0, (key, s)
    assert "| publish | respconn |" in proc.stdout
