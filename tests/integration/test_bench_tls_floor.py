"""``python bench/tls_floor.py``: one TLS session's heap in this OpenSSL, smoke size.

Runs the measurement with 200 sessions (each a real TLS 1.3 handshake and one
record each way through memory BIOs) and checks the report: every figure is
there and positive, and releasing the idle buffers keeps less than the
default mode, whose two record buffers (about 17 KB each) stay allocated;
then the server's CPU per TLS 1.3 handshake, through Python's ``ssl`` (with
and without session tickets) and through pyOpenSSL (a test extra): each
figure is there and positive, and the handshakes negotiated TLS 1.3.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_tls_floor_smoke(tmp_path):
    proc = subprocess.run([sys.executable, "bench/tls_floor.py", "--conns", "200", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [written] = list(tmp_path.glob("tls-floor-*.json"))
    res = json.loads(written.read_text())
    assert res == json.loads(proc.stdout)
    figures = res["bytes_per_conn"]
    assert set(figures) == {"ssl_new", "openssl", "openssl-release", "cpython-ssl"}
    assert all(v > 0 for v in figures.values()), figures
    assert figures["openssl-release"] + 16384 < figures["openssl"], figures
    assert figures["ssl_new"] < figures["openssl-release"], figures
    cpu = res["server_handshake_us"]
    assert set(cpu) == {"cpython-ssl", "cpython-ssl-no-tickets", "pyopenssl"}, cpu
    assert all(v > 0 for v in cpu.values()), cpu
    assert res["pyopenssl_version"].startswith("OpenSSL"), res["pyopenssl_version"]
