"""Helpers of the broker suite (imported by conftest.py and the tests)."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import time

import pytest

REDIS_URL = os.environ.get("FASTWS_TEST_REDIS", "redis://127.0.0.1:6379/0")
STREAMS_URL = REDIS_URL.replace("redis://", "redis+streams://", 1).replace("rediss://", "rediss+streams://", 1)


def run(coro, timeout: float = 60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def redis_available() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def need_redis():
    if not redis_available():
        pytest.fail("Redis at 127.0.0.1:6379 is needed (bash .ci/run starts it)")


def free_port(bus: bool = False) -> int:
    """A free TCP port (and, with ``bus``, port + 10000 free too, for cluster buses)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not bus:
            return port
        if port + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port")


def redis_cli(port, *args, timeout=10) -> str:
    return subprocess.run(["redis-cli", "-p", str(port), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout).stdout


class TcpProxy:
    """127.0.0.1:port -> target, forwarding bytes both ways.

    ``cut()`` drops every connection and refuses new ones (the listener is
    closed); ``restore()`` listens again on the same port. ``mode="reject"``
    accepts and closes at once (counting the attempts)."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self.server = None
        self.pairs: list = []
        self.accepted = 0
        self.mode = "forward"     # or "reject", "blackhole" (read and drop, never answer)

    async def start(self) -> "TcpProxy":
        self.server = await asyncio.start_server(self._client, "127.0.0.1", self.port)
        return self

    async def _client(self, reader, writer) -> None:
        self.accepted += 1
        if self.mode == "reject":
            writer.transport.abort()
            return
        try:
            ur, uw = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        pair = (writer, uw)
        self.pairs.append(pair)

        async def pipe(r, w):
            try:
                while True:
                    data = await r.read(65536)
                    if not data:
                        break
                    if self.mode == "blackhole":
                        continue
                    w.write(data)
                    await w.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                w.transport.abort()

        await asyncio.gather(pipe(reader, uw), pipe(ur, writer))
        if pair in self.pairs:
            self.pairs.remove(pair)

    async def cut(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        for a, b in self.pairs:
            a.transport.abort()
            b.transport.abort()
        self.pairs.clear()
        await asyncio.sleep(0)

    async def restore(self) -> None:
        self.mode = "forward"
        if self.server is None:
            self.server = await asyncio.start_server(self._client, "127.0.0.1", self.port)

    async def close(self) -> None:
        await self.cut()


async def delete_keys(prefix: str) -> int:
    """Delete the Redis keys of every broker prefix starting with ``prefix``
    (the streams broker's streams); how many there were."""
    import redis.asyncio as aioredis

    r = aioredis.from_url(REDIS_URL)
    try:
        keys = [k async for k in r.scan_iter(match=f"fastws:{prefix}*", count=1000)]
        if keys:
            await r.delete(*keys)
        return len(keys)
    finally:
        await r.aclose()


async def wait_for(cond, timeout: float = 10.0, what: str = "condition"):
    """Poll ``cond()`` until true (bounded)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)
