"""The engine layer's second round, against real ``fastws serve`` processes
(both engines) and real clients:

* per-connection rate limits (``--max-messages-per-second``,
  ``--max-bytes-per-second``, ``--rate-burst-seconds``): a flood is closed
  with 1008 "rate limit exceeded" and counted in ``/metrics``, a client
  under the rate is not, in every mode (native, ASGI, TLS, compression,
  ``--workers 2``);
* connection ids unique across workers (``"<node_id>-<n>"``, one node id per
  worker), and the HTTP API reaching each connection by that id whichever
  worker answers the request;
* the delivery-latency histograms in ``/metrics``, one per route (native, TLS,
  ``--workers 2`` merged, ASGI);
* the client role of the engines (``Engine(client=True)`` with
  ``fastws.handshake.client_request``/``check_accept``) against a fastws
  server and a ``websockets`` server, with and without permessage-deflate.

Every client here talks to 127.0.0.1 only; every loop is bounded in count
and time.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import ssl
import threading
import time
import urllib.request

import pytest
import websockets
import websockets.sync.server
from prometheus_client.parser import text_string_to_metric_families

from asgi_helpers import AsgiProcess
from fastws import core
from fastws.errors import RATE_LIMITED
from fastws.frames import BINARY, CLOSE, ERROR, PING, TEXT
from fastws.handshake import check_accept, client_key, client_request, deflate_offer
from test_attack_compression import cert  # noqa: F401  (the module-scoped self-signed certificate)

HOST = "127.0.0.1"
TOKEN = "engine-features-token"
RATE = ("--max-messages-per-second", "50", "--rate-burst-seconds", "1")
BYTE_RATE = ("--max-bytes-per-second", "64KiB", "--rate-burst-seconds", "1")


# -- servers -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def _asgi(engine, tmp_path_factory):
    pool: dict = {}
    logdir = tmp_path_factory.mktemp(f"engine-features-asgi-{engine}")

    def get(*args):
        server = pool.get(args)
        if server is None or not server.alive():
            server = AsgiProcess("examples.starlette_app:app", engine, logdir / f"{len(pool)}.log",
                                 args=args).start()
            pool[args] = server
        return server

    yield get
    for server in pool.values():
        server.stop()


class Target:
    def __init__(self, url, port, alive, log, ssl_context=None, metrics=True):
        self.url, self.port, self.alive, self.log = url, port, alive, log
        self.ssl = ssl_context
        self.metrics = metrics


def target_for(mode, limits, server_factory, asgi, cert_dir):
    """A server with ``limits`` in ``mode``."""
    if mode == "asgi":
        server = asgi(*limits)
        return Target(server.ws + "/ws/echo", server.port, server.alive, lambda: server.log()[-4000:])
    args = list(limits)
    tls = None
    if mode == "tls":
        args += ["--ssl-certfile", str(cert_dir / "cert.pem"), "--ssl-keyfile", str(cert_dir / "key.pem")]
        tls = ssl.create_default_context(cafile=str(cert_dir / "cert.pem"))
    elif mode == "compression":
        args += ["--compression"]
    elif mode == "workers":
        args += ["--workers", "2"]
    server = server_factory(*args)
    scheme = "wss" if tls else "ws"
    return Target(f"{scheme}://{HOST}:{server.port}/", server.port, server.alive, server.log_tail, tls)


def scrape(port, tls=None) -> str:
    scheme = "https" if tls else "http"
    with urllib.request.urlopen(f"{scheme}://{HOST}:{port}/metrics", timeout=10, context=tls) as resp:
        return resp.read().decode()


def metric(text, name, labels="") -> float:
    match = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
    assert match, f"{name}{labels} not in /metrics"
    return float(match.group(1))


# -- rate limits -------------------------------------------------------------------------


async def flood(target, count, make, compression):
    """Send ``count`` messages as fast as possible; return how the connection
    ended (the close frame the server sent) and how many echoes came back."""
    async with websockets.connect(target.url, ssl=target.ssl, max_size=None, open_timeout=10,
                                  compression="deflate" if compression else None) as ws:
        echoes = 0

        async def read():
            nonlocal echoes
            try:
                async for _ in ws:
                    echoes += 1
            except websockets.ConnectionClosed:
                pass

        reader = asyncio.ensure_future(read())
        try:
            for i in range(count):
                await ws.send(make(i))
        except websockets.ConnectionClosed:
            pass
        await asyncio.wait_for(reader, 20)
        return ws.close_code, ws.close_reason, echoes


async def steady(target, per_second, seconds, compression):
    """Send ``per_second`` messages a second for ``seconds``, each echoed."""
    async with websockets.connect(target.url, ssl=target.ssl, open_timeout=10,
                                  compression="deflate" if compression else None) as ws:
        for i in range(int(per_second * seconds)):
            await ws.send(f"steady {i}")
            assert await asyncio.wait_for(ws.recv(), 10) == f"steady {i}"
            await asyncio.sleep(1 / per_second)
        return ws.close_code


@pytest.mark.parametrize("mode", ["native", "asgi", "tls", "compression", "workers"])
def test_a_message_flood_is_closed_1008(engine, mode, server_factory, _asgi, cert):  # noqa: F811
    target = target_for(mode, RATE, server_factory, _asgi, cert)
    compression = mode == "compression"

    async def main():
        # 10 a second: well under 50, never closed
        under = asyncio.ensure_future(steady(target, 10, 2.5, compression))
        code, reason, echoes = await flood(target, 2000, lambda i: f"flood {i}", compression)
        assert (code, reason) == tuple(RATE_LIMITED), (code, reason)
        # a window's worth (or two) passed, then nothing (the ASGI app answers
        # asynchronously: echoes it had not sent when the close started, maybe
        # all, are refused)
        assert (0 if mode == "asgi" else 50) <= echoes < 400, echoes
        assert await under is None               # still open when it finished

    asyncio.run(asyncio.wait_for(main(), 60))
    assert target.alive()
    if mode in ("native", "compression", "tls", "workers"):
        deadline = time.monotonic() + 10          # workers: snapshots are up to ~1 s old
        while True:
            text = scrape(target.port, target.ssl)
            if metric(text, "websocket_rate_limited_total", '{kind="messages"}') >= 1:
                break
            assert time.monotonic() < deadline, text
            time.sleep(0.3)


@pytest.mark.parametrize("mode", ["native", "asgi", "workers"])
def test_a_byte_flood_is_closed_1008(engine, mode, server_factory, _asgi, cert):  # noqa: F811
    target = target_for(mode, BYTE_RATE, server_factory, _asgi, cert)

    async def main():
        # 64 KiB a second allowed: 2 MiB in 8 KiB messages is far over it
        code, reason, echoes = await flood(target, 256, lambda i: bytes(8192), False)
        assert (code, reason) == tuple(RATE_LIMITED), (code, reason)
        assert echoes < 40, echoes

    asyncio.run(asyncio.wait_for(main(), 60))
    assert target.alive()


def test_rate_limit_setting_errors(server_factory):
    """A bad value is one line naming the key, exit code 2."""
    import subprocess
    import sys

    for args, key in ((["--max-messages-per-second", "-1"], "max_messages_per_second"),
                      (["--max-bytes-per-second", "2GiB"], "max_bytes_per_second"),
                      (["--rate-burst-seconds", "0"], "rate_burst_seconds")):
        proc = subprocess.run([sys.executable, "-m", "fastws", "serve", "examples.echo:app", "--port", "0", *args],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, proc
        assert key in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


# -- connection ids across workers ----------------------------------------------------------


def http(port, method, path, body=b"", token=TOKEN):
    req = urllib.request.Request(f"http://{HOST}:{port}{path}", data=body, method=method,
                                 headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_connection_ids_are_unique_across_workers(engine, server_factory):
    server = server_factory("--workers", "2", "--publish-token", TOKEN, app="tests.integration.apps.ids_app:app")

    async def main():
        conns, seen = [], {}
        deadline = time.monotonic() + 30
        # SO_REUSEPORT spreads connections over both workers: open until both answered
        while len(set(seen.values())) < 2 or len(conns) < 12:
            assert time.monotonic() < deadline and len(conns) < 400, seen
            ws = await websockets.connect(f"ws://{HOST}:{server.port}/")
            hello = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert hello["id"] not in seen
            seen[hello["id"]] = hello["pid"]
            conns.append((ws, hello["id"]))
        nodes = {}
        for gid, pid in seen.items():
            node, _, number = gid.rpartition("-")
            assert number.isdigit() and node, gid
            nodes.setdefault(pid, set()).add(node)
        assert all(len(v) == 1 for v in nodes.values()), nodes          # one node id per worker ...
        assert len({n for v in nodes.values() for n in v}) == len(nodes)  # ... and they differ
        # the HTTP API reaches every connection by its id, whichever worker takes the request
        loop = asyncio.get_running_loop()
        for ws, gid in conns:
            status = await loop.run_in_executor(None, http, server.port, "POST", f"/connections/{gid}",
                                                json.dumps({"text": f"to {gid}"}).encode())
            assert status == 200, (gid, status)
            assert await asyncio.wait_for(ws.recv(), 10) == f"to {gid}"
        node = next(iter(nodes.values())).pop()
        # 404: no such connection (504 for a node nobody answers for: the
        # embedded broker cannot tell that nobody listens)
        for bad, allowed in ((f"{node}-999999", (404,)), ("nobody-1-deadbeef-1", (404, 504)),
                             ("garbage", (404,)), (conns[0][1] + "0" * 30, (404,))):
            status = await loop.run_in_executor(None, http, server.port, "POST", f"/connections/{bad}",
                                                b'{"text": "x"}')
            assert status in allowed, (bad, status)
        for ws, _ in conns:
            await ws.close()

    asyncio.run(asyncio.wait_for(main(), 90))


# -- the delivery latency ---------------------------------------------------------------------


LATENCY_APP = "tests.integration.apps.latency_app:app"


def delivery_latency(text) -> dict:
    """route -> {"buckets": [(le, cumulative count), ...], "count", "sum"} of
    websocket_delivery_latency_seconds, read with prometheus_client's parser."""
    out: dict = {}
    for family in text_string_to_metric_families(text):
        if family.name != "websocket_delivery_latency_seconds":
            continue
        assert family.type == "histogram"
        for sample in family.samples:
            h = out.setdefault(sample.labels["route"], {"buckets": []})
            if sample.name.endswith("_bucket"):
                h["buckets"].append((float(sample.labels["le"]), sample.value))
            elif sample.name.endswith("_count"):
                h["count"] = sample.value
            elif sample.name.endswith("_sum"):
                h["sum"] = sample.value
    return out


@pytest.mark.parametrize("mode", ["native", "tls", "workers", "asgi"])
def test_delivery_latency_per_route(engine, mode, server_factory, _asgi, cert):  # noqa: F811
    """websocket_delivery_latency_seconds has one histogram per route: the
    App's paths natively (one upgraded by the C fast path, one through
    on_connect), merged across --workers, "asgi" for the ASGI front."""
    tls = None
    if mode == "asgi":
        server = _asgi()
        urls = {"asgi": server.ws + "/ws/echo"}
    else:
        args = []
        if mode == "tls":
            args += ["--ssl-certfile", str(cert / "cert.pem"), "--ssl-keyfile", str(cert / "key.pem")]
            tls = ssl.create_default_context(cafile=str(cert / "cert.pem"))
        elif mode == "workers":
            args += ["--workers", "2"]
        server = server_factory(*args, app=LATENCY_APP)
        scheme = "wss" if tls else "ws"
        urls = {path: f"{scheme}://{HOST}:{server.port}{path}" for path in ("/chat", "/feed")}
    rounds = {"/chat": 120, "/feed": 40, "asgi": 80}
    clients = 4
    before = delivery_latency(scrape(server.port, tls))    # a server of the pool may have served before

    async def talk(url, n):
        async with websockets.connect(url, ssl=tls, open_timeout=10) as ws:
            for i in range(n):
                await ws.send(f"m{i}")
                assert await asyncio.wait_for(ws.recv(), 10) == f"m{i}"
            # scraped while open: each echo is one write (a close would add its echo)
            await done.wait()

    async def main():
        nonlocal done
        done = asyncio.Event()
        tasks = [asyncio.create_task(talk(url, rounds[route])) for route, url in urls.items()
                 for _ in range(clients)]
        loop = asyncio.get_running_loop()
        want = {route: before.get(route, {}).get("count", 0) + clients * rounds[route] for route in urls}
        deadline = loop.time() + 30
        while True:   # --workers: the answering worker adds the others' snapshots (<= 1 s old)
            await asyncio.sleep(0.2)
            assert not any(t.done() and t.exception() for t in tasks), [t.exception() for t in tasks if t.done()]
            text = await loop.run_in_executor(None, scrape, server.port, tls)
            lat = delivery_latency(text)
            if {r: lat.get(r, {}).get("count") for r in want} == want or loop.time() > deadline:
                break
        done.set()
        await asyncio.gather(*tasks)
        return lat, want

    done = None
    lat, want = asyncio.run(asyncio.wait_for(main(), 90))
    # exactly the routes that had connections, each with its own echoes
    assert set(lat) == set(want) | set(before), lat.keys()
    for route, n in want.items():
        h = lat[route]
        assert h["count"] == n, (route, h["count"], n)
        assert [le for le, _ in h["buckets"]] == list(core.DELIVERY_LATENCY_BUCKETS) + [float("inf")]
        counts = [c for _, c in h["buckets"]]
        assert counts == sorted(counts) and counts[-1] == n
        assert 0 < h["sum"] < n * 0.5
        assert dict(h["buckets"])[0.1] >= 0.9 * n      # echoes on an idle loopback: under 100 ms


# -- the client role against real servers -------------------------------------------------------


class RawClient:
    """A WebSocket client made of a socket, the handshake helpers and an
    ``Engine(client=True)`` of the engine under test."""

    def __init__(self, engine_name, host, port, path="/", subprotocols=(), compression=False):
        self.engine_cls = core.engine_module(engine_name).Engine
        self.sock = socket.create_connection((host, port), timeout=10)
        key = client_key()
        offers = [deflate_offer(client_no_context_takeover=True)] if compression else []
        self.sock.sendall(client_request(f"{host}:{port}", path, key, list(subprotocols), offers))
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.sock.recv(65536)
            assert chunk, f"closed during the handshake: {data!r}"
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        self.accept = check_accept(head + b"\r\n\r\n", key, list(subprotocols), offers)
        assert (self.accept.deflate is not None) == compression, head
        self.engine = self.engine_cls(client=True, deflate=self.accept.deflate, max_message_size=1 << 24)
        self.events = list(self.engine.receive(rest)) if rest else []

    def send(self, frame):
        self.sock.sendall(frame)

    def next_event(self, kinds=(TEXT, BINARY, CLOSE, ERROR)):
        deadline = time.monotonic() + 10
        while True:
            while self.events:
                event = self.events.pop(0)
                out = self.engine.data_to_send()
                if out:
                    self.sock.sendall(out)
                if event[0] in kinds:
                    return event
            assert time.monotonic() < deadline, "no event in 10 s"
            data = self.sock.recv(1 << 20)
            if not data:
                return None
            self.events += self.engine.receive(data)

    def wait_eof(self):
        """The server closes the TCP connection after the close exchange."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            data = self.sock.recv(65536)
            if not data:
                return True
            assert self.engine.receive(data) == []
        return False


def exchange(client):
    big = bytes(i % 253 for i in range(300_000))
    for message in ("hello", "é€𝄞" * 100, b"\x00\x01\x02", big, "x" * 70_000):
        client.send(client.engine.send(message))
        kind = TEXT if isinstance(message, str) else BINARY
        assert client.next_event() == (kind, message)
    client.send(client.engine.ping(b"are you there"))
    assert client.next_event(kinds=(PING, 0xA)) == (0xA, b"are you there")
    client.send(client.engine.close(1000, "done"))
    kind, code, _ = client.next_event()              # fastws echoes the code, websockets the reason too
    assert (kind, code) == (CLOSE, 1000)
    assert client.wait_eof()


@pytest.mark.parametrize("compression", [False, True], ids=["plain", "deflate"])
def test_client_engine_against_a_fastws_server(engine, server_factory, compression):
    server = server_factory("--compression", "--max-message-size", "16MiB")
    client = RawClient(engine, HOST, server.port, "/echo", compression=compression)
    exchange(client)


@pytest.fixture(scope="module")
def websockets_server():
    """A ``websockets`` echo server (not fastws) on a thread: the third-party peer."""
    def handler(ws):
        for message in ws:
            ws.send(message)

    server = websockets.sync.server.serve(handler, HOST, 0, max_size=1 << 24, compression="deflate")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.socket.getsockname()[1]
    server.shutdown()
    thread.join(10)


@pytest.mark.parametrize("compression", [False, True], ids=["plain", "deflate"])
def test_client_engine_against_a_websockets_server(engine, websockets_server, compression):
    client = RawClient(engine, HOST, websockets_server, "/", compression=compression)
    exchange(client)


def test_client_engine_server_closes_first(engine, server_factory):
    """The server starts the close (a 1009 for an oversize message): the
    client echoes it and the server ends the TCP connection."""
    server = server_factory("--max-message-size", "1000")
    client = RawClient(engine, HOST, server.port, "/")
    client.send(client.engine.send("y" * 1001))
    assert client.next_event() == (CLOSE, 1009, "message too big")
    assert client.wait_eof()
