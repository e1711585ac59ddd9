"""Heartbeats and timeouts (one timer wheel per hub), against real sockets.

The server runs in-process (same loop as the raw-socket clients) so the test
can set sub-second timeouts; verdicts never depend on timing beyond bounded
waits for something to happen.
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import struct
import threading
import time

import pytest
import uvloop

import fastws
from fastws import core
from fastws.config import Config
from fastws.server import NativeServer

ENGINES = ["cython", "wsproto"]


def make_app():
    app = fastws.App()
    closed = []

    @app.on_message("*")
    def echo(conn, data):
        conn.send(data)

    @app.on_disconnect("*")
    def gone(conn, code, reason):
        closed.append((code, reason))

    return app, closed


async def start(engine, monkeypatch, app_factory=make_app, **timers):
    if engine == "wsproto":
        monkeypatch.setattr(core, "IMPLEMENTATION", "wsproto")
    else:
        assert core.IMPLEMENTATION == "cython"
    app, closed = app_factory()
    cfg = Config(host="127.0.0.1", port=0, close_timeout=0.5)
    for k, v in timers.items():
        setattr(cfg, k, v)
    server = NativeServer(app, cfg)
    await server.start()
    return server, closed


async def upgrade(port):
    r, w = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    w.write((f"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
             f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    head = await r.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101")
    return r, w


async def read_frame(r):
    b0, b1 = await r.readexactly(2)
    n = b1 & 0x7F
    if n == 126:
        n = struct.unpack("!H", await r.readexactly(2))[0]
    elif n == 127:
        n = struct.unpack("!Q", await r.readexactly(8))[0]
    return b0 & 0x0F, await r.readexactly(n)


def masked(opcode, payload):
    mask = os.urandom(4)
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + bytes(
        b ^ mask[i % 4] for i, b in enumerate(payload))


@pytest.mark.parametrize("engine", ENGINES)
def test_ping_timeout_closes_silent_client_with_1011(engine, monkeypatch):
    async def main():
        server, closed = await start(engine, monkeypatch, ping_interval=0.3, ping_timeout=0.3)
        r, w = await upgrade(server.port)
        op, payload = await asyncio.wait_for(read_frame(r), 5)
        assert op == 0x9  # the server's ping; we do not answer
        op, payload = await asyncio.wait_for(read_frame(r), 5)
        assert op == 0x8
        assert struct.unpack("!H", payload[:2])[0] == 1011
        assert payload[2:] == b"ping timeout"
        # we never answer the close either: the server drops the TCP link
        assert await asyncio.wait_for(r.read(), 5) == b""
        for _ in range(50):
            if closed:
                break
            await asyncio.sleep(0.05)
        assert closed == [(1011, "ping timeout")]
        await server.shutdown()

    uvloop.run(main())


@pytest.mark.parametrize("engine", ENGINES)
def test_client_answering_pings_stays_open(engine, monkeypatch):
    async def main():
        server, closed = await start(engine, monkeypatch, ping_interval=0.2, ping_timeout=0.2)
        r, w = await upgrade(server.port)
        pings = 0
        loop = asyncio.get_running_loop()
        end = loop.time() + 1.5
        while loop.time() < end:
            try:
                op, payload = await asyncio.wait_for(read_frame(r), end - loop.time())
            except asyncio.TimeoutError:
                break
            assert op == 0x9, (op, payload)
            pings += 1
            w.write(masked(0xA, payload))
        assert pings >= 2
        w.write(masked(0x1, b"still here"))
        assert await asyncio.wait_for(read_frame(r), 5) == (0x1, b"still here")
        assert closed == []
        await server.shutdown()

    uvloop.run(main())


@pytest.mark.parametrize("engine", ENGINES)
def test_half_request_head_dropped_after_handshake_timeout(engine, monkeypatch):
    async def main():
        server, closed = await start(engine, monkeypatch, handshake_timeout=0.3)
        r, w = await asyncio.open_connection("127.0.0.1", server.port)
        w.write(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n")  # ... and stop
        got = await asyncio.wait_for(r.read(), 5)
        assert got.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), got  # answered, then closed
        assert server.node.hub.handshake_timeouts == 1
        # a silent client is dropped the same way
        r, w = await asyncio.open_connection("127.0.0.1", server.port)
        assert await asyncio.wait_for(r.read(), 5) == b""
        await server.shutdown()

    uvloop.run(main())


@pytest.mark.parametrize("engine", ENGINES)
def test_idle_timeout(engine, monkeypatch):
    async def main():
        server, closed = await start(engine, monkeypatch, ping_interval=0, idle_timeout=0.4)
        r, w = await upgrade(server.port)
        op, payload = await asyncio.wait_for(read_frame(r), 5)
        assert op == 0x8 and payload == struct.pack("!H", 1000) + b"idle timeout"
        w.write(masked(0x8, struct.pack("!H", 1000)))
        assert await asyncio.wait_for(r.read(), 5) == b""
        await server.shutdown()

    uvloop.run(main())


def test_timer_wheel_holds_no_handle_per_connection(monkeypatch):
    """1,000 open connections wait in the wheel: one set entry each, and the
    hub owns a single TimerHandle."""
    async def main():
        server, closed = await start("cython", monkeypatch, ping_interval=30, ping_timeout=30)
        conns = [await upgrade(server.port) for _ in range(1000)]
        assert server.node.hub.scheduled == 1000
        for _r, w in conns:
            w.close()
        for _ in range(100):
            if server.node.hub.scheduled == 0:
                break
            await asyncio.sleep(0.05)
        assert server.node.hub.scheduled == 0
        await server.shutdown()

    uvloop.run(main())


def make_stalling_app():
    """The echo app, plus "stall": the handler blocks the event loop for a second."""
    app, closed = make_app()

    @app.on_message("/stall")
    def stall(conn, data):
        time.sleep(1.0)

    return app, closed


@pytest.mark.parametrize("engine", ENGINES)
def test_pong_that_came_while_the_loop_was_blocked_is_proof_of_life(engine, monkeypatch):
    """A ping goes out; then a handler blocks the loop across the pong's deadline
    and the client's pong arrives meanwhile.  When the loop runs again, the
    wheel's tick comes before the read: the server must see that input is
    waiting on the socket and read it before it judges the client, not close
    a live client with 1011.  (The clients are blocking sockets in a thread,
    so they act while the server's loop is blocked.)"""
    def raw_upgrade(port, path):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        key = base64.b64encode(os.urandom(16)).decode()
        s.sendall((f"GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                   f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += s.recv(1)
        assert head.startswith(b"HTTP/1.1 101")
        return s

    def recv_frame(s):
        def exactly(n):
            buf = b""
            while len(buf) < n:
                chunk = s.recv(n - len(buf))
                assert chunk, "connection closed"
                buf += chunk
            return buf
        b0, b1 = exactly(2)
        return b0 & 0x0F, exactly(b1 & 0x7F)

    def clients(port, out):
        a = raw_upgrade(port, "/")
        b = raw_upgrade(port, "/stall")
        op, payload = recv_frame(a)           # the server's ping: the wheel's tick N
        t0 = time.monotonic()
        assert op == 0x9
        # the pong is due by tick N + 4 (0.8 s, ticks of 0.2 s): block the loop between
        # ticks N + 3 and N + 4, for a second, and answer while it is blocked
        time.sleep(max(0.0, t0 + 0.7 - time.monotonic()))
        b.sendall(masked(0x2, b"x"))
        time.sleep(0.05)
        a.sendall(masked(0xA, payload))
        time.sleep(1.2)                       # the stall is over; the server judged and read
        a.sendall(masked(0x1, b"alive"))
        while True:
            op, payload = recv_frame(a)
            if op == 0x9:                     # a later ping: answer it too
                a.sendall(masked(0xA, payload))
                continue
            out.append((op, payload))
            break
        a.close()
        b.close()

    async def main():
        server, closed = await start(engine, monkeypatch, make_stalling_app, ping_interval=0.8, ping_timeout=0.8,
                                     close_timeout=5.0)
        assert server.node.hub.tick == 0.2   # a quarter of the shortest timeout
        out: list = []
        t = threading.Thread(target=clients, args=(server.port, out), daemon=True)
        loop = asyncio.get_running_loop()
        done = loop.run_in_executor(None, t.run)
        await asyncio.wait_for(done, 15)
        assert out == [(0x1, b"alive")], out
        assert server.node.hub.ping_timeouts == 0
        assert closed == [] or all(code != 1011 for code, _ in closed), closed
        await server.shutdown()

    uvloop.run(main())


@pytest.mark.parametrize("engine", ENGINES)
def test_dribbled_bytes_do_not_hold_off_the_idle_timeout(engine, monkeypatch):
    """An attacker against the check above: a frame that does not complete
    (one byte every 20 ms of 1,008) keeps input arriving around every tick.  Bytes are not
    messages: each is read as it comes, so a deadline finds none waiting for
    long, and the idle timeout still closes the connection (1000 "idle
    timeout") within a few ticks of it."""
    async def main():
        server, closed = await start(engine, monkeypatch, ping_interval=0, idle_timeout=0.4)
        r, w = await upgrade(server.port)
        frame = bytes([0x82, 0xFE, 0x03, 0xE8]) + os.urandom(4) + b"x" * 1000   # 1,008 bytes: 20 s of dribbling

        async def dribble():
            for i in range(len(frame) - 1):
                w.write(frame[i:i + 1])
                await asyncio.sleep(0.02)

        task = asyncio.get_running_loop().create_task(dribble())
        op, payload = await asyncio.wait_for(read_frame(r), 5)
        assert op == 0x8 and payload == struct.pack("!H", 1000) + b"idle timeout"
        assert not task.done()                     # closed while the frame was still coming
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await server.shutdown()

    uvloop.run(main())
