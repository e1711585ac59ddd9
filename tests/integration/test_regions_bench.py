"""``python -m fastws.bench.regions --quick``: the regions bench runs and is right.

A smoke run with tiny sizes (two regions on this machine, their own
``redis-server`` each, 20 ms each way between them): it asserts that every
message arrived in order (the bench itself checks and fails otherwise) and
that the figures are there and possible (no latency below the injected
delay), never a speed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(180)
def test_regions_bench_quick(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTWS_")}
    proc = subprocess.run([sys.executable, "-m", "fastws.bench.regions", "--quick", "--out", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (path,) = tmp_path.glob("quick-regions-*.json")
    r = json.loads(path.read_text())
    assert r == json.loads(proc.stdout)
    assert r["quick"] is True and r["delay_ms"] == 20.0
    lat = r["latency_ms"]
    assert lat["messages"] == 50 and r["delay_ms"] <= lat["p50"] <= lat["p99"] <= lat["max"], lat
    assert r["throughput"]["messages"] == 2000 and r["throughput"]["size"] == 64
    assert r["throughput"]["per_second"] > 0
    assert r["lookups_per_second"]["asked"] > 0 and r["lookups_per_second"]["cached"] > 0
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
