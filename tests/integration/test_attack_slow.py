"""Clients that send slowly, or not at all, against real server processes.

Every test runs on both engines (``cython``, ``wsproto``) and in both modes:
``native`` (a ``fastws.App``) and ``asgi`` (a raw ASGI 3 app), both from
tests/integration/apps/slow_app.py.  Expected in every case:

* a request head (plain HTTP or upgrade) not complete within
  ``--handshake-timeout`` gets ``408 Request Timeout`` and the connection is
  closed (slowloris: one byte every 1-2 s);
* a request body not complete within ``--body-timeout`` of its head: 408,
  closed;
* a client that opens TCP to a TLS port and sends nothing is dropped after
  ``--handshake-timeout``, not after the loop's default 60 s;
* the server's open file descriptors (``/proc/PID/fd``) come back to what
  they were before the attack.

And TLS works in ASGI mode: ``https://`` and ``wss://`` with real clients.

All traffic goes to 127.0.0.1; every attack is bounded in count and time.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
import urllib.request

import pytest
import websockets

from tests import attacks
from tests.attacks import SLOW_HEAD as HEAD
from tests.attacks import TIMEOUT_408, UPGRADE, client_context, read_all, tls_args, trickle

NATIVE = "tests.integration.apps.slow_app:app"
ASGI = "tests.integration.apps.slow_app:asgi"
MODES = {"native": NATIVE, "asgi": ASGI}
HOST = "127.0.0.1"
SLOWLORIS = 300                 # concurrent slow connections


@pytest.fixture(params=sorted(MODES))
def mode(request) -> str:
    return request.param


# -- helpers (the slow clients themselves: tests/attacks.py) ------------------------


def wait_fds_back(server, baseline: int, timeout: float = 10.0) -> int:
    """The server's open fd count once it is back to ``baseline`` (or what
    it is after ``timeout`` seconds, for the assertion message)."""
    return attacks.wait_fds_back(server.proc.pid, baseline, timeout)


def settled_fds(server) -> int:
    """The fd count once it stops moving (connections of earlier tests on a
    shared server may still be closing)."""
    return attacks.settled_fds(server.proc.pid)


def run(coro, limit: float = 60):
    return asyncio.run(asyncio.wait_for(coro, limit))


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1 (also its own CA), made here."""
    return attacks.make_cert(tmp_path_factory.mktemp("tls"))


# -- slow request heads (slowloris) ---------------------------------------------------


def test_300_slowloris_heads_get_408_and_fds_come_back(server_factory, mode):
    server = server_factory("--handshake-timeout", "2s", app=MODES[mode])
    baseline = settled_fds(server)

    async def attack():
        return await asyncio.gather(*(trickle(server.port, HEAD, (1.0, 2.0), limit=20)
                                      for _ in range(SLOWLORIS)))

    t0 = time.monotonic()
    results = run(attack())
    took = time.monotonic() - t0
    not_closed = [r for r in results if not r[1]]
    assert not not_closed, f"{len(not_closed)} of {SLOWLORIS} slow connections still open after 20 s"
    no_408 = [r[0][:60] for r in results if not r[0].startswith(TIMEOUT_408)]
    assert not no_408, f"{len(no_408)} of {SLOWLORIS} did not get 408, e.g. {no_408[:3]}"
    # each one was closed about handshake_timeout after its connect (2 s; the wheel ticks
    # 0.5 s, so up to a tick early)
    slowest = max(r[2] for r in results)
    fastest = min(r[2] for r in results)
    assert fastest >= 1.0 and slowest < 8.0, (fastest, slowest)
    assert took < 20.0
    n = wait_fds_back(server, baseline)
    assert n <= baseline, f"server holds {n} fds, {baseline} before the attack"


def test_slow_upgrade_request_gets_408(server_factory, mode):
    server = server_factory("--handshake-timeout", "1s", app=MODES[mode])
    baseline = settled_fds(server)
    got, closed, took = run(trickle(server.port, UPGRADE, (0.3, 0.5), limit=10))
    assert closed and got.startswith(TIMEOUT_408), got
    assert 0.5 <= took < 5.0, took
    assert wait_fds_back(server, baseline) <= baseline


def test_silent_client_is_closed_after_handshake_timeout(server_factory, mode):
    server = server_factory("--handshake-timeout", "1s", app=MODES[mode])
    baseline = settled_fds(server)
    got, closed, took = run(trickle(server.port, b"", (0, 0), limit=10))
    assert closed and got == b"", got        # nothing asked, nothing answered
    assert 0.5 <= took < 5.0, took
    assert wait_fds_back(server, baseline) <= baseline


def test_undecided_upgrade_is_dropped_after_handshake_timeout(server_factory, mode):
    """The application takes 30 s to decide on an upgrade: the opening
    handshake is bounded by handshake_timeout, so the connection goes."""
    server = server_factory("--handshake-timeout", "1s", app=MODES[mode])
    baseline = settled_fds(server)
    got, closed, took = run(trickle(server.port, b"", (0, 0), limit=10,
                                    first=UPGRADE.replace(b"/ws", b"/undecided")))
    # dropped by the handshake timer, or (native, the same deadline) answered
    # 503 when the decision's own timeout fires first: either way, closed in time
    assert closed and (got == b"" or got.startswith(b"HTTP/1.1 503 ")), got
    assert 0.5 <= took < 5.0, took
    assert wait_fds_back(server, baseline) <= baseline
    if mode.startswith("native"):
        # the application's decision is cancelled, not left running for a client that is gone
        deadline = time.monotonic() + 5
        while True:
            with urllib.request.urlopen(f"http://{HOST}:{server.port}/undecided-state", timeout=5) as r:
                state = r.read().decode()
            if state == "cancelled" or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert state == "cancelled", state


def test_keepalive_next_head_counted_from_its_first_byte(server_factory):
    """ASGI mode (keep-alive): the second request's head must be complete
    within handshake_timeout of its first byte."""
    server = server_factory("--handshake-timeout", "1s", app=ASGI)

    async def go():
        reader, writer = await asyncio.open_connection(HOST, server.port)
        try:
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200 ")
            assert await asyncio.wait_for(reader.readexactly(2), 5) == b"ok"
            await asyncio.sleep(1.5)      # idle longer than handshake_timeout: keep-alive allows it
            t0 = time.monotonic()
            writer.write(b"GET / HTTP/1.1\r\n")      # ... and the rest never comes
            got, closed = await read_all(reader, 10)
            return got, closed, time.monotonic() - t0
        finally:
            writer.transport.abort()

    got, closed, took = run(go())
    assert closed and got.startswith(TIMEOUT_408), got
    assert 0.5 <= took < 5.0, took


# -- slow request bodies ------------------------------------------------------------------


def test_slow_body_gets_408(server_factory, mode):
    server = server_factory("--handshake-timeout", "5s", "--body-timeout", "1s", app=MODES[mode])
    baseline = settled_fds(server)
    head = b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
    got, closed, took = run(trickle(server.port, b"x" * 100, (0.3, 0.5), limit=10, first=head))
    assert closed and got.startswith(TIMEOUT_408), got
    assert 0.5 <= took < 4.0, took     # the body's deadline, not the 5 s of the handshake
    # a body that comes in time is served
    with socket.create_connection(server.address, timeout=10) as s:
        s.sendall(head + b"y" * 100)
        reply = s.recv(4096)
    assert reply.startswith(b"HTTP/1.1 200 ") and reply.endswith(b"100"), reply
    assert wait_fds_back(server, baseline) <= baseline


# -- TLS --------------------------------------------------------------------------------------


def test_silent_tls_client_is_dropped_after_handshake_timeout(server_factory, mode, cert):
    server = server_factory("--handshake-timeout", "1s", *tls_args(cert), app=MODES[mode])
    baseline = settled_fds(server)
    with socket.create_connection(server.address, timeout=15) as s:   # no ClientHello, ever
        t0 = time.monotonic()
        try:
            got = s.recv(100)
        except ConnectionResetError:
            got = b""
        took = time.monotonic() - t0
    assert got == b""
    assert 0.5 <= took < 6.0, f"a silent TLS client held its connection {took:.1f} s"
    assert wait_fds_back(server, baseline) <= baseline


def test_slow_head_over_tls_gets_408(server_factory, mode, cert):
    server = server_factory("--handshake-timeout", "1s", *tls_args(cert), app=MODES[mode])
    got, closed, took = run(trickle(server.port, HEAD, (0.3, 0.5), limit=10,
                                    ssl_ctx=client_context(cert)))
    assert closed and got.startswith(TIMEOUT_408), got
    assert took < 6.0, took


def test_tls_in_asgi_mode(server_factory, cert):
    """https:// and wss:// in ASGI mode: the WebSocket is handed to the
    engine over the TLS transport (so its writes must go through TLS)."""
    server = server_factory(*tls_args(cert), app=ASGI)
    ctx = client_context(cert)
    assert "ASGI app listening on https://" in server.log()
    big = os.urandom(300_000)

    async def go():
        async with websockets.connect(f"wss://{HOST}:{server.port}/ws", ssl=ctx,
                                      max_size=1 << 20) as ws:
            assert await ws.recv() == "wss"             # scope["scheme"]
            for i in range(20):
                await ws.send(f"hello {i}")
                assert await ws.recv() == f"hello {i}"
            await ws.send(big)                          # many TLS records each way
            assert await ws.recv() == big
        # a plain ws:// client is not served in clear text
        with pytest.raises((websockets.exceptions.WebSocketException, OSError)):   # no handshake, no crash
            async with websockets.connect(f"ws://{HOST}:{server.port}/ws", open_timeout=5):
                pass

    run(go())
    with urllib.request.urlopen(f"https://{HOST}:{server.port}/scheme", context=ctx, timeout=10) as r:
        assert r.status == 200 and r.read() == b"https"
    body = b"z" * 50_000
    req = urllib.request.Request(f"https://{HOST}:{server.port}/upload", data=body, method="POST")
    with urllib.request.urlopen(req, context=ctx, timeout=10) as r:
        assert r.status == 200 and r.read() == b"50000"
