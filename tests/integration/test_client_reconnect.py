"""fastws.connect: the reconnecting Python client against real ``fastws serve`` processes.

Every server runs on both engines (the ``engine`` fixture); the client runs on
the Cython engine in client mode here, and on the wsproto engine in a
subprocess (``FASTWS_NO_EXTENSIONS=1``).  Servers are stopped (SIGTERM),
killed (SIGKILL), frozen (SIGSTOP) and started again on the same port, as a
client meets them in production:

* the first retries of many clients that lost their server at the same
  moment spread over the whole backoff window (full jitter), not at one time;
* a server's "reconnect in X s" close reason is waited exactly, and a 503's
  Retry-After too;
* a server that refuses the client (401, 403) is not retried in a storm: one
  upgrade request and the client gives up, or a long, growing delay;
* messages sent while disconnected wait in a bounded queue (drop oldest or
  raise) and go out in order after the reconnect;
* a frozen server is found by the ping and left for another URL; of several
  URLs the one with the shortest measured round trip is used.
"""

from __future__ import annotations

import asyncio
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

import pytest

import fastws
from client_helpers import HOST, Node, eventually, handshakes, nodes
from fastws.client import Backoff, GaveUp, SendQueueFull, reconnect_hint

ECHO = "examples.echo:app"


def run(coro, timeout: float = 60.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


# -- talking ------------------------------------------------------------------------------


def test_messages_round_trip_on_the_client_engine(engine, tmp_path):
    """Text, binary, unicode and a 1 MiB message, with and without
    compression, on the Cython client engine; then the same on the wsproto
    client engine in a subprocess."""
    payloads = ["hello", "ünïcødé ✓", b"\x00\x01\xff" * 10, "x" * ((1 << 20) - 16), bytes(range(256)) * 100]
    with nodes() as ns:
        plain = Node(engine, tmp_path, "--max-message-size", "2MiB", app=ECHO)
        deflate = Node(engine, tmp_path, "--max-message-size", "2MiB", "--compression", app=ECHO)
        ns += [plain.start(), deflate.start()]

        async def main():
            for node, compression in ((plain, False), (deflate, True)):
                async with fastws.connect(node.url + "/e", compression=compression,
                                          max_message_size=2 << 20) as ws:
                    ext = ws.websocket.extensions
                    assert any(e.startswith("permessage-deflate") for e in ext) == compression, ext
                    for p in payloads:
                        await ws.send(p)
                        assert await ws.recv() == p
        run(main())

        script = (
            "import asyncio, fastws, fastws.core as c\n"
            "async def main():\n"
            f"    async with fastws.connect({plain.url + '/e'!r}) as ws:\n"
            "        await ws.send('over wsproto'); print(c.IMPLEMENTATION, await ws.recv())\n"
            "asyncio.run(main())\n")
        env = dict(os.environ, FASTWS_NO_EXTENSIONS="1")
        out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "wsproto over wsproto"


def test_wss_with_compression_and_a_reconnect(engine, tmp_path):
    """wss:// (the server's TLS, a self-signed certificate the client trusts
    by its CA file), permessage-deflate, a reconnect after the server is
    killed; a client that does not trust the certificate never connects
    (each TLS failure is a failed attempt, retried with its backoff: here it
    gives up after max_attempts=3)."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    r = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                        str(cert), "-days", "2", "-subj", "/CN=localhost", "-addext",
                        "subjectAltName=DNS:localhost,IP:127.0.0.1"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    with nodes() as ns:
        node = Node(engine, tmp_path, "--ssl-certfile", str(cert), "--ssl-keyfile", str(key), "--compression",
                    app=ECHO)
        ns.append(node.start())
        url = f"wss://127.0.0.1:{node.port}/e"

        async def main():
            ctx = __import__("ssl").create_default_context(cafile=str(cert))
            async with fastws.connect(url, ssl=ctx, compression=True, backoff=Backoff(0.05, 0.1)) as ws:
                assert any(e.startswith("permessage-deflate") for e in ws.websocket.extensions)
                await ws.send("secure " * 100)
                assert await ws.recv() == "secure " * 100
                node.kill()
                await eventually(lambda: not ws.connected)
                node.start()
                await ws.wait_connected()
                await ws.send(b"\x00again")
                assert await ws.recv() == b"\x00again"
                assert ws.connections == 2
            untrusting = fastws.connect(url, backoff=Backoff(0.05, 0.1, max_attempts=3))
            with pytest.raises(GaveUp) as info:
                await untrusting.start()
            assert untrusting.connections == 0
            assert "CERTIFICATE" in str(info.value.error).upper(), info.value.error
        run(main())


def test_iteration_goes_on_across_reconnects(engine, tmp_path):
    with nodes() as ns:
        node = Node(engine, tmp_path, app=ECHO)
        ns.append(node.start())

        async def main():
            got = []
            ws = await fastws.connect(node.url + "/e", backoff=Backoff(0.05, 0.2))

            async def reader():
                async for m in ws:
                    got.append(m)
            task = asyncio.create_task(reader())
            await ws.send("one")
            await eventually(lambda: got == ["one"])
            node.kill()
            await eventually(lambda: not ws.connected)
            node.start()
            await ws.wait_connected()
            await ws.send("two")
            await eventually(lambda: got == ["one", "two"])
            assert ws.connections == 2
            await ws.close()
            await asyncio.wait_for(task, 5)          # iteration ended by close()
        run(main())


# -- backoff -------------------------------------------------------------------------------


def test_first_retries_of_many_clients_spread_over_the_window(engine, tmp_path):
    """200 clients lose their server at the same instant (SIGKILL: no hint):
    their first retry delays spread over [0, base] (full jitter), they are
    not one value or a narrow band."""
    n, base = 200, 1.0
    with nodes() as ns:
        node = Node(engine, tmp_path, app=ECHO)
        ns.append(node.start())

        async def main():
            clients = [fastws.connect(node.url + "/e", backoff=Backoff(base, 8.0)) for _ in range(n)]
            await asyncio.gather(*(c.start() for c in clients))
            node.kill()
            await eventually(lambda: all(c.delays for c in clients), timeout=15)
            firsts = [c.delays[0] for c in clients]
            await asyncio.gather(*(c.close() for c in clients))
            return firsts
        firsts = run(main())
    assert all(0.0 <= d <= base for d in firsts), (min(firsts), max(firsts))
    assert len(set(firsts)) == n                       # no two clients wait the same time
    quarters = [sum(1 for d in firsts if q * base / 4 <= d < (q + 1) * base / 4) for q in range(4)]
    # uniform over the window: about 50 per quarter (each count's sd is ~6)
    assert all(20 <= c <= 80 for c in quarters), quarters
    assert max(firsts) - min(firsts) > 0.8 * base
    assert 0.2 * base < statistics.pstdev(firsts) < 0.4 * base   # uniform: base / sqrt(12) = 0.29 base


def test_reconnect_hint_in_the_close_reason_is_waited(engine, tmp_path):
    """A server that restarts closes with "server restarting; reconnect in
    X s" (X jittered per connection in [1.5, 3]); each client waits X (not
    its own backoff) and connects to the restarted server."""
    with nodes() as ns:
        node = Node(engine, tmp_path, "--reconnect-delay", "1.5", app=ECHO)
        ns.append(node.start())

        async def main():
            lost_at, up_at = {}, {}
            clients = []
            for i in range(10):
                c = fastws.connect(node.url + "/e", backoff=Backoff(0.01, 0.02),
                                   on_disconnect=lambda c, code, reason, i=i: lost_at.setdefault(i, time.monotonic()))
                c.connect_callbacks.append(lambda c, i=i: c.connections == 2 and up_at.setdefault(i, time.monotonic()))
                clients.append(c)
            await asyncio.gather(*(c.start() for c in clients))
            await asyncio.to_thread(node.stop)
            await asyncio.to_thread(node.start)          # the same port again
            await eventually(lambda: len(up_at) == len(clients), timeout=20)
            hints = []
            for i, c in enumerate(clients):
                code, reason = c.last_close
                hint = reconnect_hint(reason)
                assert code == 1001 and hint is not None, c.last_close
                assert 1.5 <= hint <= 3.05, hint
                assert c.delays[0] == hint                # the hint, not the backoff's 0..10 ms
                assert up_at[i] - lost_at[i] >= hint - 0.05, (up_at[i] - lost_at[i], hint)
                hints.append(hint)
            await asyncio.gather(*(c.close() for c in clients))
            return hints
        hints = run(main())
    assert len(set(hints)) > 1                          # the server spread them


def test_retry_after_of_a_503_is_waited(engine, tmp_path):
    with nodes() as ns:
        node = Node(engine, tmp_path, "--max-connections", "1", "--retry-after", "1", app=ECHO)
        ns.append(node.start())

        async def main():
            first = await fastws.connect(node.url + "/e")
            second = fastws.connect(node.url + "/e", backoff=Backoff(0.01, 0.02))
            await second.start(wait=False)
            await eventually(lambda: second.delays, timeout=10)
            err = second.last_error
            assert isinstance(err, fastws.errors.HandshakeError) and err.status == 503, err
            header = dict(err.headers)["retry-after"]
            assert second.delays[0] == float(header) and 1 <= float(header) <= 2, (second.delays, header)
            await first.close()
            t0 = time.monotonic()
            await second.wait_connected()
            assert time.monotonic() - t0 <= float(header) + 1.0
            await second.send("in")
            assert await second.recv() == "in"
            await second.close()
        run(main())


@pytest.mark.parametrize("status", [401, 403])
def test_a_refusing_server_gets_one_request_not_a_storm(engine, tmp_path, status):
    """401 (a bad token) and 403 (an Origin the server does not allow): the
    client gives up after the one refused request; with on_refused="backoff"
    it waits refused_delay, then twice that ... (a handful of requests in
    3.5 s where a plain backoff from 10 ms would make hundreds)."""
    with nodes() as ns:
        node = Node(engine, tmp_path)
        ns.append(node.start())
        if status == 401:
            url, headers = node.url + "/rt-auth?token=bad", []
        else:
            url, headers = node.url + "/rt", [("Origin", "http://evil.example")]

        async def main():
            with pytest.raises(GaveUp) as info:
                async with fastws.connect(url, headers=headers, backoff=Backoff(0.01, 0.02)):
                    pass
            assert info.value.status == status
            assert handshakes(node, status) == 1

            c = fastws.connect(url, headers=headers, backoff=Backoff(0.01, 0.02), on_refused="backoff",
                               refused_delay=0.5)
            await c.start(wait=False)
            await asyncio.sleep(3.5)
            delays = list(c.delays)
            await c.close()
            return delays
        delays = run(main())
        # waits of 0.25..0.5, 0.5..1, 1..2, 2..4 s: 3 or 4 of them begin within 3.5 s
        assert 3 <= len(delays) <= 4, delays
        for i, d in enumerate(delays):
            assert 0.5 * 2 ** i / 2 <= d <= 0.5 * 2 ** i, delays
        # one request per wait (and the first client's one), where a 10 ms backoff would make hundreds
        assert 1 + len(delays) <= handshakes(node, status) <= 2 + len(delays)


# -- while disconnected ----------------------------------------------------------------------


def test_messages_sent_while_disconnected_wait_in_a_bounded_queue(engine, tmp_path):
    with nodes() as ns:
        node = Node(engine, tmp_path, app=ECHO)
        ns.append(node.start())

        async def main():
            ws = await fastws.connect(node.url + "/e", backoff=Backoff(0.05, 0.1), send_queue=3)
            strict = await fastws.connect(node.url + "/e", backoff=Backoff(0.05, 0.1), send_queue=2,
                                          send_queue_policy="raise")
            node.kill()
            await eventually(lambda: not ws.connected and not strict.connected)
            for i in range(5):
                await ws.send(f"m{i}")
            assert ws.queued == 3 and ws.dropped == 2
            strict.send_nowait("a")
            strict.send_nowait("b")
            with pytest.raises(SendQueueFull):
                await strict.send("c")
            node.start()
            assert [await ws.recv() for _ in range(3)] == ["m2", "m3", "m4"]
            assert [await strict.recv() for _ in range(2)] == ["a", "b"]
            assert ws.queued == 0
            await ws.close()
            await strict.close()
        run(main())


def test_a_frozen_server_is_found_by_the_ping_and_left_for_another_url(engine, tmp_path):
    with nodes() as ns:
        a = Node(engine, tmp_path, app=ECHO, name="a")
        b = Node(engine, tmp_path, app=ECHO, name="b")
        ns += [a.start(), b.start()]

        async def main():
            ws = fastws.connect([a.url + "/e", b.url + "/e"], ping_interval=0.3, ping_timeout=0.5,
                                open_timeout=1.0, backoff=Backoff(0.05, 0.1))
            await ws.start()
            first = ws.url
            frozen = a if first.startswith(a.url) else b
            other = b if frozen is a else a
            frozen.signal(__import__("signal").SIGSTOP)
            t0 = time.monotonic()
            await eventually(lambda: ws.last_close is not None, timeout=10)
            assert ws.last_close == (1006, "ping timeout")
            assert time.monotonic() - t0 < 3.0
            await ws.wait_connected()
            assert ws.url.startswith(other.url)
            await ws.send("still here")
            assert await ws.recv() == "still here"
            await ws.close()
            frozen.signal(__import__("signal").SIGCONT)
        run(main())


class _SlowListener:
    """A TCP port whose connections take a SYN retransmission (~1 s) to be
    established: its accept queue (backlog 0) is full of held connections
    for the first ``hold`` seconds; then it relays what it accepts to
    ``target`` (a real server), so it is a working URL with a long round trip."""

    def __init__(self, target: tuple, hold: float = 0.5) -> None:
        self.target = target
        self.sock = socket.socket()
        self.sock.bind((HOST, 0))
        self.sock.listen(0)
        self.port = self.sock.getsockname()[1]
        self.fillers = []
        for _ in range(4):
            s = socket.socket()
            s.setblocking(False)
            try:
                s.connect((HOST, self.port))
            except BlockingIOError:
                pass
            self.fillers.append(s)
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._serve, args=(hold,), daemon=True)]
        self.threads[0].start()

    def _serve(self, hold) -> None:
        time.sleep(hold)
        self.sock.settimeout(0.2)
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            if any(conn.getpeername() == f.getsockname() for f in self.fillers if f.fileno() >= 0):
                conn.close()
                continue
            try:
                up = socket.create_connection(self.target, timeout=2)
            except OSError:
                conn.close()
                continue
            for src, dst in ((conn, up), (up, conn)):
                t = threading.Thread(target=self._pipe, args=(src, dst), daemon=True)
                t.start()
                self.threads.append(t)

    def _pipe(self, src, dst) -> None:
        try:
            while not self.stop.is_set():
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.stop.set()
        for s in self.fillers + [self.sock]:
            s.close()


def test_the_url_with_the_shortest_round_trip_is_used(engine, tmp_path):
    """Two URLs: a slow one (its TCP handshake takes a SYN retransmission)
    listed first and a fast one: the client measures both and connects to
    the fast one; when that server dies it goes to the slow one."""
    with nodes() as ns:
        fast = Node(engine, tmp_path, app=ECHO, name="fast")
        behind = Node(engine, tmp_path, app=ECHO, name="behind-slow")
        ns += [fast.start(), behind.start()]
        slow = _SlowListener((HOST, behind.port))
        slow_url = f"ws://{HOST}:{slow.port}/e"
        try:
            async def main():
                ws = await fastws.connect([slow_url, fast.url + "/e"], backoff=Backoff(0.05, 0.1), rtt_timeout=3.0)
                rtts = dict(ws.ranking.rtts)
                assert ws.url == fast.url + "/e", rtts
                assert rtts[slow_url] > 0.5 and rtts[fast.url + "/e"] < 0.1, rtts
                fast.kill()
                await eventually(lambda: ws.connected and ws.url == slow_url, timeout=15)
                await ws.send("via the slow one")
                assert await ws.recv() == "via the slow one"
                await ws.close()
            run(main())
        finally:
            slow.close()
