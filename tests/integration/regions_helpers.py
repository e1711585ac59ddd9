"""Three regions on one machine, for the regions tests (real processes only).

* :class:`RedisProc` - a ``redis-server`` of a region's own on a free port
  (never the shared one at 127.0.0.1:6379); it can be killed (SIGKILL) and
  started again, empty, on the same port.
* :class:`WanProxy` - an asyncio TCP proxy (in a thread of its own) between
  a region and another region's Redis: every byte waits ``delay`` seconds
  each way, in order; :meth:`WanProxy.cut` drops the open connections and
  refuses new ones until :meth:`WanProxy.heal`.
* :class:`NodeProc` - a ``fastws serve`` subprocess of a region
  (``tests/integration/apps/regions_app.py``).
* :class:`Deployment` - regions of two nodes each, each region's nodes
  reaching every other region's Redis through a proxy of their own (the
  link X->Y is the proxy X's nodes use to reach Y).
* :class:`Client` - a ``websockets`` client of the app's JSON protocol.

Everything listens on and talks to 127.0.0.1 only; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from pathlib import Path
from typing import Any

import websockets

REPO = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
APP = "tests.integration.apps.regions_app:app"
START_TIMEOUT = 30.0
#: ``fastws`` of this tree whatever is installed: the CLI package (``cli/``,
#: installed as ``fastws.cli``) is found beside ``fastws/``
SERVE = [sys.executable, "-c", "import sys, fastws; fastws.__path__.append(sys.argv.pop(1)); "
         "from fastws.cli.main import main; main()", str(REPO)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def redis_ping(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisProc:
    """A region's own ``redis-server`` (no persistence: a restart is empty)."""

    def __init__(self) -> None:
        if not shutil.which("redis-server"):
            raise RuntimeError("redis-server is not installed")
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="fastws-region-redis-")
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"redis://{HOST}:{self.port}/0"
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", HOST, "--save", "", "--appendonly", "no",
             "--dir", self.dir], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while not redis_ping(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} did not start")
            time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def cli(self, *args: str) -> str:
        return subprocess.run(["redis-cli", "-p", str(self.port), *args], capture_output=True, text=True,
                              timeout=10).stdout.strip()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)


class WanProxy:
    """``127.0.0.1:port`` -> ``target_port``, ``delay`` seconds each way."""

    def __init__(self, target_port: int, delay: float) -> None:
        self.target_port = target_port
        self.delay = delay
        self.port = free_port()
        self.cut_off = False
        self.links: set[asyncio.Transport] = set()
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._server: asyncio.base_events.Server | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("proxy did not start")

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def main() -> None:
            self._server = await asyncio.start_server(self._serve, HOST, self.port)
            self._ready.set()

        self.loop.run_until_complete(main())
        self.loop.run_forever()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.cut_off:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(HOST, self.target_port)
        except OSError:
            writer.transport.abort()
            return
        pair = {writer.transport, up_writer.transport}
        self.links |= pair   # type: ignore[arg-type]
        try:
            await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer),
                                 return_exceptions=True)
        finally:
            for w in (writer, up_writer):
                w.transport.abort()
            self.links -= pair   # type: ignore[arg-type]

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Bytes from ``reader`` to ``writer``, each chunk ``delay`` later, in order."""
        queue: deque[tuple[float, bytes]] = deque()
        more = asyncio.Event()
        done = False

        async def deliver() -> None:
            while True:
                while not queue:
                    if done:
                        return
                    more.clear()
                    await more.wait()
                due, chunk = queue[0]
                wait = due - self.loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                queue.popleft()
                if writer.transport.is_closing():
                    return
                writer.write(chunk)

        task = self.loop.create_task(deliver())
        try:
            while chunk := await reader.read(65536):
                queue.append((self.loop.time() + self.delay, chunk))
                more.set()
        finally:
            done = True
            more.set()
            with contextlib.suppress(Exception):
                await task
            if not writer.transport.is_closing() and writer.can_write_eof():
                with contextlib.suppress(OSError):
                    writer.write_eof()

    def cut(self) -> None:
        """Drop every open connection and refuse new ones."""
        def go() -> None:
            self.cut_off = True
            for t in list(self.links):
                t.abort()
        self.loop.call_soon_threadsafe(go)

    def heal(self) -> None:
        def go() -> None:
            self.cut_off = False
        self.loop.call_soon_threadsafe(go)

    def close(self) -> None:
        def go() -> None:
            if self._server is not None:
                self._server.close()
            for t in list(self.links):
                t.abort()
            self.loop.stop()
        self.loop.call_soon_threadsafe(go)
        self.thread.join(5)


class NodeProc:
    """One ``fastws serve`` of a region."""

    def __init__(self, region: str, broker: str, peers: str, log_dir: Path, index: int, *extra: str,
                 app: str = APP) -> None:
        self.region = region
        self.port = free_port()
        self.url = f"ws://{HOST}:{self.port}"
        self.log_path = log_dir / f"node-{region}{index}.log"
        self.argv = [*SERVE, "serve", app,
                     "--host", HOST, "--port", str(self.port), "--broker", broker, "--region", region,
                     "--region-peers", peers, "--server-id", f"{region}{index}", *extra]
        env = {k: v for k, v in os.environ.items() if not k.startswith("FASTWS_")}
        self.out = open(self.log_path, "ab")  # noqa: SIM115 (closed by stop())
        self.proc = subprocess.Popen(self.argv, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=self.out,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://{HOST}:{self.port}{path}", timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def get_json(self, path: str) -> tuple[int, Any]:
        status, body = self.get(path)
        return status, json.loads(body)

    def metric(self, name: str, **labels: str) -> float:
        """The value of one sample of ``/metrics`` (0 when it is not there)."""
        _, body = self.get("/metrics")
        want = {f'{k}="{v}"' for k, v in labels.items()}
        for line in body.decode().splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                head, _, value = line.rpartition(" ")
                inside = head[len(name):].strip("{}")
                if want <= set(inside.split(",")) if inside else not want:
                    return float(value)
        return 0.0

    def healthy(self) -> bool:
        try:
            return self.get("/health", 2.0)[0] == 200
        except OSError:
            return False

    def wait_health(self, want: int = 200, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"node {self.region} exited {self.proc.returncode}:\n{self.log()}")
            try:
                if self.get("/health", 2.0)[0] == want:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"node {self.region}:{self.port} /health never said {want}:\n{self.log()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.out.close()


class Deployment:
    """``names`` regions, ``nodes`` nodes each, WAN ``delay`` between regions."""

    def __init__(self, log_dir: Path, names: tuple[str, ...] = ("a", "b", "c"), nodes: int = 2,
                 delay: float = 0.04, extra: tuple[str, ...] = ()) -> None:
        self.names = names
        self.redis: dict[str, RedisProc] = {}
        self.proxies: dict[tuple[str, str], WanProxy] = {}
        self.nodes: dict[str, list[NodeProc]] = {}
        try:
            for n in names:
                self.redis[n] = RedisProc()
            for x in names:
                for y in names:
                    if x != y:
                        self.proxies[(x, y)] = WanProxy(self.redis[y].port, delay)
            for x in names:
                peers = ",".join(f"{y}=redis://{HOST}:{self.proxies[(x, y)].port}/0" for y in names if y != x)
                self.nodes[x] = [NodeProc(x, self.redis[x].url, peers, log_dir, i, *extra) for i in range(nodes)]
            for x in names:
                for node in self.nodes[x]:
                    node.wait_health()
        except BaseException:
            self.stop()
            raise

    def node(self, region: str, i: int = 0) -> NodeProc:
        return self.nodes[region][i]

    def all_nodes(self) -> list[NodeProc]:
        return [n for ns in self.nodes.values() for n in ns]

    def cut(self, x: str, y: str) -> None:
        self.proxies[(x, y)].cut()
        self.proxies[(y, x)].cut()

    def heal(self, x: str, y: str) -> None:
        self.proxies[(x, y)].heal()
        self.proxies[(y, x)].heal()

    def logs(self) -> str:
        return "\n".join(f"--- {n.log_path.name}\n{n.log()[-4000:]}" for n in self.all_nodes())

    def stop(self) -> None:
        for ns in self.nodes.values():
            for n in ns:
                n.stop()
        for p in self.proxies.values():
            p.close()
        for r in self.redis.values():
            r.stop()


class Client:
    """A ``websockets`` client of ``regions_app``: every message it gets is kept."""

    def __init__(self, ws: websockets.ClientConnection, user: str | None, region: str) -> None:
        self.ws = ws
        self.user = user
        self.region = region
        self.got: list[dict[str, Any]] = []
        self._task = asyncio.get_running_loop().create_task(self._read())
        self._new = asyncio.Event()

    @classmethod
    async def connect(cls, node: NodeProc, user: str | None = None, path: str = "/ws") -> Client:
        ws = await websockets.connect(node.url + path + (f"?user={user}" if user else ""), open_timeout=10)
        hello = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert hello == {"op": "hello", "region": node.region, "user": user}, hello
        return cls(ws, user, node.region)

    async def _read(self) -> None:
        with contextlib.suppress(websockets.ConnectionClosed):
            async for data in self.ws:
                self.got.append(json.loads(data))
                self._new.set()

    async def send(self, **cmd: Any) -> None:
        await self.ws.send(json.dumps(cmd))

    async def join(self, room: str) -> None:
        await self.send(op="join", room=room)
        await self.wait(lambda m: m == {"op": "joined", "room": room})

    def of(self, op: str, **match: Any) -> list[dict[str, Any]]:
        return [m for m in self.got if m.get("op") == op and all(m.get(k) == v for k, v in match.items())]

    async def wait(self, pred: Any, timeout: float = 15.0) -> dict[str, Any]:
        """The first message kept that ``pred`` accepts (waiting for it)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            for m in self.got:
                if pred(m):
                    return m
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                raise AssertionError(f"{self.user}@{self.region}: nothing matched; got {self.got[-10:]}")
            self._new.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._new.wait(), left)

    async def wait_count(self, op: str, n: int, timeout: float = 20.0, **match: Any) -> list[dict[str, Any]]:
        """Wait until at least ``n`` messages of ``op`` (and ``match``) arrived."""
        deadline = asyncio.get_running_loop().time() + timeout
        while len(self.of(op, **match)) < n:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                raise AssertionError(f"{self.user}@{self.region}: {len(self.of(op, **match))} of {n} {op} "
                                     f"messages; last: {self.got[-5:]}")
            self._new.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._new.wait(), left)
        return self.of(op, **match)

    async def close(self) -> None:
        await self.ws.close()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._task


async def routed(sender: Client, user: str, region: str) -> None:
    """Until the sender's node finds ``user`` in ``region``: a user's directory
    entry is written just after its hello, and a message for a user found
    nowhere is dropped (``sent`` says to which regions it went)."""
    for i in range(100):
        data = f"probe-{user}-{i}"
        await sender.send(op="to", user=user, data=data)
        sent = await sender.wait(lambda m: m.get("op") == "sent" and m.get("data") == data, timeout=30)  # noqa: B023
        if sent["regions"] == [region]:
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"{user} not found in region {region}")


async def dm(sender: Client, to: Client, data: str) -> None:
    """``sender`` writes ``to`` once its node finds ``to``'s region; ``to`` gets it."""
    await routed(sender, to.user or "", to.region)
    await sender.send(op="to", user=to.user, data=data)
    await to.wait(lambda m: m == {"op": "dm", "from": sender.user, "data": data}, timeout=30)


def dms(c: Client) -> list[str]:
    return [m["data"] for m in c.of("dm") if not m["data"].startswith("probe-")]
