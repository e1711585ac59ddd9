"""Socket.IO load: echo with acks, and idle memory per Socket.IO connection.

Raw uvloop clients speaking Engine.IO v4 / Socket.IO v5 on a WebSocket (no
Socket.IO library, no fastws code): the upgrade, the open packet ``0{...}``,
the namespace CONNECT ``40`` and its answer ``40{"sid"}``, pongs ``3`` to
pings ``2``, and every event and ack checked byte for byte.

    python -m fastws.bench.sio ackecho --port 9001 [--conns 64 --window 16 --size 32 --duration 3]
    python -m fastws.bench.sio memory --port 9001 --conns 10000 --server-pid PID

``ackecho``: each connection keeps ``window`` events ``42<id>["echo","<size
characters>"]`` in flight and the server must answer each with
``43<id>["<the same characters>"]``; the value is acks per second.
``memory``: ``conns`` connected, idle Socket.IO clients (namespace "/"
joined); the value is the server's VmRSS growth per connection.  One JSON
line on stdout, like ``fastws.bench.loadgen``.  Bounded by count and time;
traffic to the loopback host given only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time

from fastws.bench.loadgen import (
    ACCEPT,
    CLOSE,
    PING,
    TEXT,
    FrameParser,
    ProtocolError,
    client_frame,
    raise_nofile,
    rss_bytes,
    run_loop,
    upgrade_request,
    wait_quiet,
)

PATH = "/socket.io/?EIO=4&transport=websocket"


class SioClient(asyncio.Protocol):
    """One Socket.IO client: opened once the namespace CONNECT is answered."""

    def __init__(self, request: bytes, mask: bytes) -> None:
        self.request = request
        self.mask = mask
        self.transport = None
        self.head = b""
        self.upgraded = False
        self.parser = FrameParser()
        self.opened = asyncio.get_running_loop().create_future()
        self.stage = 0                  # 0: upgrade, 1: open packet, 2: CONNECT answer, 3: connected
        self.error = None
        self.on_text = None             # fn(str) for events/acks once connected
        self.pong = client_frame(TEXT, b"3", mask)
        self.closed = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.write(self.request)

    def fail(self, why: str) -> None:
        if self.error is None:
            self.error = why
        if not self.opened.done():
            self.opened.set_exception(RuntimeError(why))
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if not self.upgraded:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            head, data = self.head[:end], self.head[end + 4:]
            if not head.startswith(b"HTTP/1.1 101") or ACCEPT not in head:
                self.fail(f"upgrade refused: {head[:80]!r}")
                return
            self.upgraded = True
            self.stage = 1
            if not data:
                return
        try:
            frames = self.parser.feed(data)
        except ProtocolError as e:
            self.fail(f"protocol error: {e}")
            return
        for op, p in frames:
            if op == PING:
                self.transport.write(client_frame(0xA, p, self.mask))
                continue
            if op == CLOSE:
                self.fail(f"closed by the server: {p[:40]!r}")
                return
            if op != TEXT:
                continue
            if p == b"2":
                self.transport.write(self.pong)
                continue
            if self.stage == 1:
                if not p.startswith(b"0{"):
                    self.fail(f"expected the open packet, got {p[:40]!r}")
                    return
                self.stage = 2
                self.transport.write(client_frame(TEXT, b"40", self.mask))
            elif self.stage == 2:
                if not p.startswith(b"40{"):
                    self.fail(f"expected the CONNECT answer, got {p[:40]!r}")
                    return
                self.stage = 3
                self.opened.set_result(self)
            elif self.on_text is not None:
                self.on_text(p)

    def connection_lost(self, exc) -> None:
        self.closed = True
        if not self.opened.done():
            self.opened.set_exception(RuntimeError(f"connection lost: {exc}"))


async def open_clients(a, n: int) -> list:
    loop = asyncio.get_running_loop()
    rnd = random.Random(a.seed)
    request = upgrade_request(a.host, a.port, PATH)
    clients, sem = [], asyncio.Semaphore(200)

    async def one():
        async with sem:
            mask = bytes(rnd.getrandbits(8) for _ in range(4))
            _, c = await loop.create_connection(lambda: SioClient(request, mask), a.host, a.port)
            await asyncio.wait_for(c.opened, 30)
            clients.append(c)

    results = await asyncio.gather(*(one() for _ in range(n)), return_exceptions=True)
    errors = [str(r) for r in results if isinstance(r, BaseException)]
    return clients, errors


async def ackecho(a) -> dict:
    clients, errors = await open_clients(a, a.conns)
    payload = ("x" * a.size).encode()
    stats = {"acks": 0, "bad": 0, "first_bad": None}
    deadline = [0.0]
    measuring = [False]
    done = asyncio.get_running_loop().create_future()

    def driver(c):
        next_id = [0]
        expect = {}

        def send():
            i = next_id[0]
            next_id[0] += 1
            msg = b"42%d[\"echo\",\"%s\"]" % (i, payload)
            expect[i] = b"43%d[\"%s\"]" % (i, payload)
            c.transport.write(client_frame(TEXT, msg, c.mask))

        def on_text(p):
            if not p.startswith(b"43"):
                stats["bad"] += 1
                stats["first_bad"] = stats["first_bad"] or repr(p[:60])
                return
            j = 2
            while j < len(p) and 48 <= p[j] <= 57:
                j += 1
            i = int(p[2:j])
            want = expect.pop(i, None)
            if want != p:
                stats["bad"] += 1
                stats["first_bad"] = stats["first_bad"] or repr(p[:60])
                return
            if measuring[0]:
                stats["acks"] += 1
            if time.monotonic() < deadline[0]:
                send()
            elif not expect and not done.done() and all(not x for x in expects):
                done.set_result(None)

        c.on_text = on_text
        return send, expect

    drivers = [driver(c) for c in clients]
    expects = [e for _, e in drivers]
    deadline[0] = time.monotonic() + a.warmup + a.duration
    for send, _ in drivers:
        for _ in range(a.window):
            send()
    await asyncio.sleep(a.warmup)
    measuring[0] = True
    acks0, t0 = stats["acks"], time.monotonic()
    await asyncio.sleep(a.duration)
    measuring[0] = False
    acks1, t1 = stats["acks"], time.monotonic()
    try:
        await asyncio.wait_for(done, 10)
        drained = True
    except asyncio.TimeoutError:
        drained = False
    lost = sum(1 for c in clients if c.closed or c.error is not None)
    for c in clients:
        c.transport.abort()
    rate = (acks1 - acks0) / (t1 - t0)
    ok = not errors and stats["bad"] == 0 and drained and len(clients) == a.conns and not lost
    res = {"scenario": "sio-ackecho", "value": round(rate), "unit": "acks/s", "conns": a.conns,
           "window": a.window, "size": a.size, "opened": len(clients), "bad": stats["bad"],
           "errors": len(errors) + stats["bad"], "lost_connections": lost, "drained": drained, "ok": ok}
    first = errors[:3] + ([stats["first_bad"]] if stats["first_bad"] else [])
    if first:
        res["first_errors"] = first
    return res


async def memory(a) -> dict:
    if not a.server_pid:
        raise SystemExit("memory needs --server-pid")
    await asyncio.sleep(a.settle)
    rss0 = rss_bytes(a.server_pid)
    t0 = time.monotonic()
    clients, errors = await open_clients(a, a.conns)
    t_open = time.monotonic() - t0
    await asyncio.sleep(a.settle)
    if a.settle:
        await asyncio.to_thread(wait_quiet, a.server_pid, 3.0)
    rss1 = rss_bytes(a.server_pid)
    alive = sum(1 for c in clients if not c.closed and c.error is None)
    for c in clients:
        c.transport.abort()
    per = (rss1 - rss0) / max(1, len(clients))
    res = {"scenario": "sio-memory", "value": round(per), "unit": "bytes/conn", "kib_per_conn": round(per / 1024, 2),
           "conns": a.conns, "opened": len(clients), "alive": alive, "rss_before": rss0, "rss_after": rss1,
           "open_seconds": round(t_open, 3), "errors": len(errors), "lost_connections": len(clients) - alive,
           "ok": not errors and alive == a.conns}
    if errors:
        res["first_errors"] = errors[:3]
    return res


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m fastws.bench.sio", description=__doc__.splitlines()[0])
    p.add_argument("scenario", choices=("ackecho", "memory"))
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--conns", type=int, default=64)
    p.add_argument("--window", type=int, default=16)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--warmup", type=float, default=0.5)
    p.add_argument("--settle", type=float, default=0.5)
    p.add_argument("--server-pid", type=int, default=0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--path", help="ignored: Socket.IO is at /socket.io/")
    p.add_argument("--protocol", choices=("sio",), default="sio",
                   help="accepted for the runner's sake: these clients speak Socket.IO only")
    a = p.parse_args(argv)
    if a.host not in ("127.0.0.1", "localhost") and not a.host.startswith("127."):
        p.error("--host: the load goes to the loopback host only")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    raise_nofile()
    res = run_loop(ackecho(a) if a.scenario == "ackecho" else memory(a))
    print(json.dumps(res), flush=True)
    return 0 if res.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())

__all__ = ["ackecho", "memory", "main", "SioClient", "PATH"]
