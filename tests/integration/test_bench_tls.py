"""``fastws bench --suite tls``: the wss:// scenarios, quick, on fastws and websockets.

The runner makes one self-signed certificate for the run and starts fastws
(``--ssl-certfile/--ssl-keyfile``) and the websockets relay (``--certfile/
--keyfile``) with it; the load generator (``--tls``) connects through TLS and
checks what it always checks: every echo byte for byte, every subscriber got
every broadcast in order, every upgrade answered with the right
``Sec-WebSocket-Accept``. Tiny sizes; timings are never asserted.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(180)
def test_bench_tls_quick(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "fastws.bench", "--quick", "--suite", "tls", "--vs", "websockets-tls",
         "--out", str(tmp_path)],
        cwd=REPO, env=dict(os.environ), capture_output=True, text=True, timeout=170,
    )
    report = f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, report
    files = sorted(tmp_path.glob("quick-*.json"))
    assert files, report
    results = json.loads(files[-1].read_text())

    from fastws.bench.runner import TLS_SCENARIOS

    assert set(results["scenarios"]) == set(TLS_SCENARIOS)
    for name, sc in results["scenarios"].items():
        assert set(sc["runs"]) == {"fastws", "websockets-tls"}, (name, set(sc["runs"]))
        assert "--ssl-certfile" in sc["servers"]["fastws"]["label"], sc["servers"]["fastws"]
        assert "--tls" in sc["args"], sc["args"]
        for server, runs in sc["runs"].items():
            assert len(runs) == 1, (name, server)
            r = runs[0]
            assert r["ok"], (name, server, r)
            assert r["errors"] == 0 and r["lost_connections"] == 0, (name, server, r)
            # every connection was a TLS connection (the version the server chose is recorded)
            assert r["tls"]["enabled"] and r["tls"]["version"].startswith("TLSv1."), (name, server, r)
            if r["scenario"] == "echo":
                assert r["procs"] == 2 and len(r["procs_values"]) == 2, r
                assert r["echoed_total"] == r["sent_total"] > 0 and r["messages"] > 0, r
            elif r["scenario"] == "fanout":
                assert r["deliveries"] == r["expected_deliveries"] > 0, r
                assert r["subscribers_complete"] == r["subscribers"] == r["opened"], r
            elif r["scenario"] == "handshake":
                # opened means: TLS handshake done, 101 received, Sec-WebSocket-Accept checked
                assert r["opened"] == r["requested"] > 0 and r["procs"] == 2, r
            else:
                assert r["scenario"] == "memory", r
                assert r["opened"] == r["conns"] > 0, r
                assert r["rss_after"] > 0 and r["rss_before"] > 0 and isinstance(r["value"], int), r
                assert r["unit"] == "bytes/conn", r
    table = next(tmp_path.glob("quick-*.md")).read_text()
    assert "tls-handshake: server CPU per connection" in table, table


class _WrongAccept(asyncio.Protocol):
    """A TLS server whose 101 carries a wrong Sec-WebSocket-Accept."""

    def connection_made(self, transport):
        self.transport = transport
        self.head = b""

    def data_received(self, data):
        self.head += data
        if b"\r\n\r\n" in self.head:
            self.transport.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                                 b"Connection: Upgrade\r\nSec-WebSocket-Accept: AAAAAAAAAAAAAAAAAAAAAAAAAAA=\r\n\r\n")


@pytest.mark.timeout(60)
def test_loadgen_tls_checks_the_accept(tmp_path):
    """Over TLS the load generator still checks every Sec-WebSocket-Accept:
    a server answering a wrong one fails the handshake scenario."""
    from fastws.bench.runner import make_cert

    assert make_cert(tmp_path) is None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(loop.create_server(_WrongAccept, "127.0.0.1", 0, ssl=ctx))
    port = server.sockets[0].getsockname()[1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "fastws.bench.loadgen", "handshake", "--tls", "--port", str(port),
             "--conns", "5", "--concurrency", "2", "--duration", "10"],
            cwd=REPO, capture_output=True, text=True, timeout=50,
        )
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        server.close()
    assert proc.returncode == 1, proc.stderr
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not r["ok"] and r["opened"] == 0 and r["errors"] >= 5, r
    assert "Sec-WebSocket-Accept" in r["first_errors"][0], r
    assert r["tls"]["version"].startswith("TLSv1."), r
