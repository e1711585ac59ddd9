"""``python -m fastws.bench.capacity``: a small real run.

2,000 connections to a real ``fastws serve ... --workers 1`` from one holder
process, a short hold with server pings every second (so the holders must
answer them), three broadcasts, then close. Asserts correctness only: every
connection opened, every broadcast reached every connection exactly once,
the JSON and the PNG were written, and after the close the server's
connections and descriptors were released. Never a timing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
N = 2000


@pytest.mark.timeout(60)
def test_capacity_small_run(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "fastws.bench.capacity", "--connections", str(N), "--hold", "3",
         "--ping-interval", "1", "--ping-timeout", "1", "--close-wait", "10", "--release-wait", "15",
         "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=55,
    )
    report = f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, report
    line = json.loads(proc.stdout.strip().splitlines()[-1])
    files = list(tmp_path.glob(f"capacity-{N}-*.json"))
    assert len(files) == 1, report
    res = json.loads(files[0].read_text())
    assert res["json"] == files[0].name == Path(line["json_path"]).name
    png = tmp_path / res["png"]
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # every connection opened and was held; nothing refused, nothing lost
    assert res["ok"] is True and res["limit"] is None, report
    assert res["opened"] == N and res["open_failed"] == 0 and res["open_errors"] == {}
    assert res["held"]["server_established_ss"] == N
    assert res["held"]["server_fds_total"] >= res["baseline"]["server_fds_total"] + N
    assert res["lost_while_held"] == 0

    # the server pinged during the hold and the holders answered (nobody was closed for it)
    assert res["hold"]["pongs_sent"] > 0 and res["hold"]["lost_during_hold"] == 0

    # three broadcasts, each to every connection, in order, exactly once
    b = res["broadcast"]
    assert b["all_delivered"] is True
    assert b["complete"] == N and b["short"] == 0 and b["over"] == 0
    assert b["deliveries"] == b["expected_deliveries"] == 3 * N
    assert b["holder_errors"] == {} and b["publisher_error"] is None
    assert b["latency_all"]["samples"] == 3 * N

    # per-connection costs were computed
    for key in ("server_rss_bytes", "kernel_slab_bytes", "client_rss_bytes"):
        assert isinstance(res["per_connection"][key], int)

    # closed: every connection went, and the server let go of them
    assert res["close"]["clean"] + res["close"]["aborted"] == N
    after = res["after_close"]
    assert after["server_established_ss"] == 0
    assert after["server_fds_total"] <= res["baseline"]["server_fds_total"] + 10
