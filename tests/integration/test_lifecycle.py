"""Workers, graceful drain, admission limits and `fastws check`, on real
`fastws serve` processes and real clients."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import websockets

REPO = Path(__file__).resolve().parents[2]


def fastws_command():
    return [sys.executable, "-c", "from fastws.cli.main import main; main()"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(*args, env=None):
    port = free_port()
    cmd = [*fastws_command(), "serve", "examples.echo:app", "--host", "127.0.0.1", "--port", str(port),
           *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc, port
        except OSError:
            assert proc.poll() is None, proc.stdout.read().decode()
            time.sleep(0.05)
    proc.kill()
    raise AssertionError("server did not start")


def stop(proc, sig=signal.SIGTERM, timeout=20):
    if proc.poll() is None:
        os.killpg(proc.pid, sig) if sig == signal.SIGKILL else proc.send_signal(sig)
    try:
        return proc.wait(timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def raw_upgrade(port):
    s = socket.create_connection(("127.0.0.1", port), 5)
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
              b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(4096)
        if not chunk:
            break
        head += chunk
    return s, head


def test_sigterm_drains_with_1001_and_exits_0():
    proc, port = start("--reconnect-delay", "2")

    async def main():
        clients = [await websockets.connect(f"ws://127.0.0.1:{port}/") for _ in range(5)]
        for c in clients:
            await c.send("hi")
            assert await c.recv() == "hi"
        proc.send_signal(signal.SIGTERM)
        reasons = []
        for c in clients:
            await asyncio.wait_for(c.wait_closed(), 10)
            assert c.close_code == 1001
            reasons.append(c.close_reason)
        return reasons

    reasons = asyncio.run(main())
    assert proc.wait(20) == 0
    for r in reasons:
        assert r.startswith("server restarting; reconnect in ")
        delay = float(r.rsplit(" ", 1)[1].rstrip("s"))
        assert 2.0 <= delay <= 4.0
    assert len(set(reasons)) > 1   # spread with jitter


def test_503_paths_carry_retry_after():
    proc, port = start("--max-connections", "2", "--retry-after", "3")
    try:
        a, ha = raw_upgrade(port)
        b, hb = raw_upgrade(port)
        assert ha.startswith(b"HTTP/1.1 101") and hb.startswith(b"HTTP/1.1 101")
        c, hc = raw_upgrade(port)
        assert hc.startswith(b"HTTP/1.1 503"), hc
        retry = [line for line in hc.split(b"\r\n") if line.lower().startswith(b"retry-after:")]
        assert retry and 3 <= int(retry[0].split(b":")[1]) <= 6
        for s in (a, b, c):
            s.close()
    finally:
        stop(proc)
    proc, port = start("--handshake-rate", "1", "--handshake-burst", "1")
    try:
        a, ha = raw_upgrade(port)
        b, hb = raw_upgrade(port)
        assert ha.startswith(b"HTTP/1.1 101")
        assert hb.startswith(b"HTTP/1.1 503") and b"\r\nRetry-After: " in hb, hb
        a.close()
        b.close()
    finally:
        stop(proc)


def test_workers_share_the_port_and_a_killed_worker_is_replaced():
    proc, port = start("--workers", "2")
    try:
        import psutil

        sup = psutil.Process(proc.pid)
        deadline = time.monotonic() + 10
        while len(sup.children()) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        kids = sup.children()
        assert len(kids) == 2

        async def echo_many(n):
            for _ in range(n):
                async with websockets.connect(f"ws://127.0.0.1:{port}/") as ws:
                    await ws.send("x")
                    assert await ws.recv() == "x"

        asyncio.run(echo_many(10))
        victim = kids[0].pid
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            pids = {c.pid for c in sup.children()}
            if len(pids) == 2 and victim not in pids:
                break
            time.sleep(0.1)
        pids = {c.pid for c in sup.children()}
        assert len(pids) == 2 and victim not in pids
        time.sleep(0.5)
        asyncio.run(echo_many(10))
    finally:
        code = stop(proc)
    assert code == 0
    out = proc.stdout.read().decode()
    assert f"(pid {victim}) exited with code -9" in out and "restarting" in out


def test_rolling_restart_loses_no_connection_attempt():
    """Old and new server share the port (SO_REUSEPORT); the old one drains
    at a paced rate; every client reconnects (to the new one) at its first
    attempt after the delay the close reason names."""
    old, port = start("--reuse-port", "--drain-rate", "100", "--reconnect-delay", "0.2")
    new = None
    try:
        async def client(results):
            ws = await websockets.connect(f"ws://127.0.0.1:{port}/")
            await ws.wait_closed()
            assert ws.close_code == 1001
            delay = float(ws.close_reason.rsplit(" ", 1)[1].rstrip("s"))
            await asyncio.sleep(delay)
            ws2 = await websockets.connect(f"ws://127.0.0.1:{port}/")   # one attempt, must work
            await ws2.send("back")
            results.append(await ws2.recv())
            await ws2.close()

        async def main():
            nonlocal new
            results = []
            tasks = [asyncio.create_task(client(results)) for _ in range(50)]
            await asyncio.sleep(1.0)          # all 50 are connected to the old server
            new = subprocess.Popen([*fastws_command(), "serve", "examples.echo:app", "--host",
                                    "127.0.0.1", "--port", str(port), "--reuse-port"], cwd=REPO,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                   start_new_session=True)
            await asyncio.sleep(2.0)          # the new one listens on the same port
            assert new.poll() is None
            old.send_signal(signal.SIGTERM)
            await asyncio.wait_for(asyncio.gather(*tasks), 30)
            return results

        results = asyncio.run(main())
        assert results == ["back"] * 50
        assert old.wait(20) == 0
    finally:
        stop(old)
        if new is not None:
            stop(new)


def test_fastws_check_prints_limits():
    out = subprocess.run([*fastws_command(), "check", "-n", "100000"], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0
    assert "open files" in out.stdout and "somaxconn" in out.stdout
    assert "for 100,000 connections" in out.stdout


def test_workers_share_rooms_through_the_embedded_broker():
    """--workers 2 without a broker URL: a room message reaches members on
    every worker (the supervisor runs the embedded broker)."""
    import json

    port = free_port()
    proc = subprocess.Popen(
        [*fastws_command(), "serve", "tests.integration.apps.rooms_app:app", "--host", "127.0.0.1",
         "--port", str(port), "--workers", "2"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        time.sleep(1.0)   # both workers listening

        async def main():
            clients = []
            pids = set()
            for _ in range(40):
                ws = await websockets.connect(f"ws://127.0.0.1:{port}/room")
                await ws.send(json.dumps({"hello": {"room": "w"}}))
                pids.add(json.loads(await ws.recv())["pid"])
                clients.append(ws)
                if len(pids) == 2 and len(clients) >= 4:
                    break
            assert len(pids) == 2, pids     # members on both workers
            await asyncio.sleep(0.3)
            await clients[0].send(json.dumps({"publish": "w", "count": 50, "pub": 0}))
            for ws in clients:
                got = []
                while len(got) < 50:
                    msg = json.loads(await asyncio.wait_for(ws.recv(), 10))
                    if msg.get("pub") == 0:
                        got.append(msg["i"])
                assert got == list(range(50))
            for ws in clients:
                await ws.close()

        asyncio.run(main())
    finally:
        assert stop(proc) == 0
