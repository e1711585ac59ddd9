"""Memory per permessage-deflate connection: fastws against websockets, aiohttp and Node's ws.

::

    python bench/deflate_memory.py [--conns 1000] [--size 512] [--out bench/results]

Each server is an echo server with compression on, started alone on
127.0.0.1; one client process (the ``websockets`` library, which offers
``permessage-deflate; client_max_window_bits``, as browsers do) opens
``--conns`` connections, then sends one JSON-like text message of ``--size``
bytes on each and waits for its echo. The server's VmRSS is read before the
connections, once they are open (idle) and after the one message each;
the figures are the differences divided by ``--conns``. Servers:

* ``fastws``: ``fastws serve examples.echo:app --compression`` (the defaults);
* ``fastws-no-context``: the same with ``--deflate-server-no-context-takeover
  --deflate-client-no-context-takeover`` (no compression state kept between
  messages);
* ``websockets``: ``websockets.asyncio.server.serve`` (its default
  compression);
* ``aiohttp``: ``web.WebSocketResponse(compress=True)``;
* ``node-ws``: Node's ``ws`` with ``perMessageDeflate: true`` (when ``node``
  and the ``ws`` package of ``tests/integration/node`` are there).

Everything is bounded: every wait has a timeout and every server is stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NODE_MODULES = REPO / "tests" / "integration" / "node" / "node_modules"

WEBSOCKETS_SERVER = """
import asyncio, sys
from websockets.asyncio.server import serve
async def echo(ws):
    async for m in ws:
        await ws.send(m)
async def main():
    async with serve(echo, "127.0.0.1", int(sys.argv[1]), max_size=None, ping_interval=None):
        await asyncio.Future()
asyncio.run(main())
"""

AIOHTTP_SERVER = """
import sys
from aiohttp import web, WSMsgType
async def handler(request):
    ws = web.WebSocketResponse(compress=True, autoping=False)
    await ws.prepare(request)
    async for m in ws:
        if m.type == WSMsgType.TEXT:
            await ws.send_str(m.data)
    return ws
app = web.Application()
app.router.add_get("/{tail:.*}", handler)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
"""

NODE_SERVER = """
const { WebSocketServer } = require('ws');
const wss = new WebSocketServer({ host: '127.0.0.1', port: +process.argv[2], perMessageDeflate: true });
wss.on('connection', (ws) => ws.on('message', (d, isBinary) => ws.send(d, { binary: isBinary })));
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def message(size: int) -> str:
    """A JSON-like text of ``size`` characters (what a chat or a dashboard sends)."""
    body = {"type": "update", "room": "lobby", "user": "alice", "ts": 1764547200123, "items": []}
    i = 0
    while len(json.dumps(body)) < size:
        body["items"].append({"id": i, "name": f"item-{i}", "price": 100 + i * 7, "ok": i % 2 == 0})
        i += 1
    return json.dumps(body)[:size]


def server_argv(name: str, port: int, tmp: str) -> list[str] | None:
    if name == "fastws":
        return [sys.executable, "-m", "fastws", "serve", "examples.echo:app", "--host", "127.0.0.1",
                "--port", str(port), "--compression", "--log-level", "warning", "--ping-interval", "0"]
    if name == "fastws-no-context":
        return server_argv("fastws", port, tmp) + ["--deflate-server-no-context-takeover",  # type: ignore[operator]
                                                   "--deflate-client-no-context-takeover"]
    if name == "websockets":
        return [sys.executable, "-c", WEBSOCKETS_SERVER, str(port)]
    if name == "aiohttp":
        return [sys.executable, "-c", AIOHTTP_SERVER, str(port)]
    if name == "node-ws":
        if not NODE_MODULES.is_dir() or not any(Path(p, "node").exists() for p in os.environ["PATH"].split(":")):
            return None
        script = Path(tmp, "server.js")
        script.write_text(NODE_SERVER)
        return ["node", str(script), str(port)]
    raise ValueError(name)


async def clients(port: int, conns: int, text: str, marks: list) -> None:
    from websockets.asyncio.client import connect

    url = f"ws://127.0.0.1:{port}/echo"
    opened = []
    try:
        for i in range(0, conns, 100):
            opened += await asyncio.wait_for(asyncio.gather(
                *[connect(url, compression="deflate", max_size=None, ping_interval=None, open_timeout=30)
                  for _ in range(min(100, conns - i))]), 60)
        assert all(ws.response.headers.get("Sec-WebSocket-Extensions", "").startswith("permessage-deflate")
                   for ws in opened), "compression was not negotiated"
        await asyncio.sleep(1.0)
        marks.append("idle")
        await asyncio.sleep(0.5)

        async def one(ws):
            await ws.send(text)
            assert await asyncio.wait_for(ws.recv(), 30) == text

        await asyncio.wait_for(asyncio.gather(*[one(ws) for ws in opened]), 120)
        await asyncio.sleep(1.0)
        marks.append("after")
        await asyncio.sleep(0.5)
    finally:
        await asyncio.gather(*[ws.close() for ws in opened], return_exceptions=True)


def measure(name: str, conns: int, size: int) -> dict:
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        argv = server_argv(name, port, tmp)
        if argv is None:
            return {"server": name, "skipped": "node or tests/integration/node/node_modules missing"}
        env = dict(os.environ, NODE_PATH=str(NODE_MODULES))
        proc = subprocess.Popen(argv, cwd=str(REPO), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"{name} did not start") from None
                    time.sleep(0.1)
            time.sleep(0.5)
            before = rss(proc.pid)
            marks: list[str] = []
            figures: dict[str, int] = {}

            async def run() -> None:
                task = asyncio.create_task(clients(port, conns, message(size), marks))
                seen = 0
                while not task.done():
                    await asyncio.sleep(0.05)
                    if len(marks) > seen:
                        figures[marks[seen]] = rss(proc.pid)
                        seen += 1
                await task

            asyncio.run(run())
            return {"server": name, "conns": conns, "size": size,
                    "idle_bytes_per_conn": round((figures["idle"] - before) / conns),
                    "after_one_message_bytes_per_conn": round((figures["after"] - before) / conns)}
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--conns", type=int, default=1000)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--servers", default="fastws,fastws-no-context,websockets,aiohttp,node-ws")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    rows = [measure(name, a.conns, a.size) for name in a.servers.split(",")]
    print(f"| server | idle, bytes/connection | after one {a.size} B message, bytes/connection |")
    print("|---|---:|---:|")
    for r in rows:
        if "skipped" in r:
            print(f"| {r['server']} | skipped: {r['skipped']} | |")
        else:
            print(f"| {r['server']} | {r['idle_bytes_per_conn']:,} | {r['after_one_message_bytes_per_conn']:,} |")
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M", time.gmtime())
        (a.out / f"{stamp}-deflate-memory.json").write_text(json.dumps({"when": stamp, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
