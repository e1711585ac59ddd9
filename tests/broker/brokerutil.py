"""Helpers of the broker and integration suites (imported by the conftests and the tests).

The Redis the suites use is ``$FASTWS_TEST_REDIS`` (default
``redis://127.0.0.1:6379/0``).  The suites never change that server's
state: every key and channel they make starts with the broker prefix of its
test, and every prefix of one run starts with :data:`RUN_PREFIX`
(:func:`new_prefix`), so the run's keys can be deleted at its end
(:func:`delete_keys`).  A test that must change server state (ACL users,
CONFIG SET, a shutdown) starts its own ``redis-server`` on a free port
(:class:`OwnRedis`) and stops it afterwards.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from urllib.parse import unquote, urlsplit, urlunsplit

import pytest

from fastws.broker import PublishError

REDIS_URL = os.environ.get("FASTWS_TEST_REDIS", "redis://127.0.0.1:6379/0")
STREAMS_URL = REDIS_URL.replace("redis://", "redis+streams://", 1).replace("rediss://", "rediss+streams://", 1)
_U = urlsplit(REDIS_URL)
REDIS_HOST = _U.hostname or "127.0.0.1"
REDIS_PORT = _U.port or 6379
#: the start of every broker prefix of this run (see new_prefix)
RUN_PREFIX = os.environ.get("FASTWS_TEST_RUN") or f"t{os.getpid():x}{uuid.uuid4().hex[:4]}"


def new_prefix(tag: str = "") -> str:
    """A broker prefix of its own for one test, under this run's RUN_PREFIX."""
    return f"{RUN_PREFIX}-{tag}{uuid.uuid4().hex[:10]}"


def proxied_url(proxy, scheme: str = "redis") -> str:
    """REDIS_URL with ``scheme`` through ``proxy`` (a TcpProxy in front of it):
    same credentials and database, the proxy's address."""
    netloc = f"127.0.0.1:{proxy.port}"
    if _U.username or _U.password:
        netloc = _U.netloc.rpartition("@")[0] + "@" + netloc
    return urlunsplit((scheme, netloc, _U.path or "/0", _U.query, ""))


def run(coro, timeout: float = 60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def redis_available(host: str = REDIS_HOST, port: int = REDIS_PORT) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1) as s:
            if _U.password is not None and (host, port) == (REDIS_HOST, REDIS_PORT):
                words = ["AUTH", *([unquote(_U.username)] if _U.username else []), unquote(_U.password)]
                s.sendall(" ".join(words).encode() + b"\r\n")
                if not s.recv(64).startswith(b"+OK"):
                    return False
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def need_redis():
    if not redis_available():
        pytest.fail(f"Redis at {REDIS_URL} is needed (bash .ci/run starts it; "
                    "FASTWS_TEST_REDIS names another)")


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
        self.tasks: set = set()   # the handlers of forwarded connections, awaited by close()

    async def start(self) -> TcpProxy:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", self.port)
        return self

    async def _client(self, reader, writer) -> None:
        task = asyncio.current_task()
        self.tasks.add(task)
        try:
            await self._forward(reader, writer)
        except asyncio.CancelledError:
            writer.transport.abort()     # the loop is ending: a quiet end, not a logged one
        finally:
            self.tasks.discard(task)

    async def _forward(self, reader, writer) -> None:
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

    async def cut(self, newest_first: bool = False) -> None:
        """Drop every connection (in the order they came, or the newest
        first) and refuse new ones."""
        if self.server is not None:
            self.server.close()
            self.server = None
        for a, b in (reversed(self.pairs) if newest_first else self.pairs):
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
        if self.tasks:        # every pipe sees its aborted transport and ends
            await asyncio.wait(list(self.tasks), timeout=5)


async def delete_keys(prefix: str, url: str = REDIS_URL) -> int:
    """Delete the Redis keys of every broker prefix starting with ``prefix``
    (the streams broker's streams, presence); how many there were."""
    import redis.asyncio as aioredis

    r = aioredis.from_url(url)
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


class OwnRedis:
    """A ``redis-server`` of the test's own on a free port, for what changes
    server state (ACL users, CONFIG SET, SHUTDOWN): the shared one is never
    touched.  ``url`` is its address; :meth:`stop` ends it (also on exit of a
    ``with`` block) and removes its directory."""

    def __init__(self, *args: str) -> None:
        if not shutil.which("redis-server"):
            pytest.fail("redis-server is not installed (bash .ci/run installs it)")
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="fastws-redis-")
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir, *args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        deadline = time.monotonic() + 15
        while not redis_available("127.0.0.1", self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"redis-server on port {self.port} did not start")
            time.sleep(0.05)

    def cli(self, *args, timeout=10) -> str:
        return redis_cli(self.port, *args, timeout=timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> OwnRedis:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


#: the service name the test Sentinels monitor
SERVICE = "fastws-test"


class Sentinels:
    """Three Sentinels watching ``master_port`` as SERVICE (quorum 2)."""

    def __init__(self, master_port: int, n: int = 3) -> None:
        self.dir = tempfile.mkdtemp(prefix="fastws-sentinel-")
        self.ports, self.procs = [], []
        for i in range(n):
            port = free_port()
            conf = os.path.join(self.dir, f"sentinel-{i}.conf")
            with open(conf, "w") as f:
                f.write(f"port {port}\nbind 127.0.0.1\ndir {self.dir}\n"
                        f"sentinel monitor {SERVICE} 127.0.0.1 {master_port} 2\n"
                        f"sentinel down-after-milliseconds {SERVICE} 1000\n"
                        f"sentinel failover-timeout {SERVICE} 6000\n"
                        f"sentinel parallel-syncs {SERVICE} 1\n")
            self.procs.append(subprocess.Popen(["redis-server", conf, "--sentinel"],
                                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            self.ports.append(port)
        deadline = time.monotonic() + 15
        for port in self.ports:
            while not redis_available("127.0.0.1", port):
                if time.monotonic() > deadline:
                    self.stop()
                    pytest.fail(f"Sentinel on port {port} did not start")
                time.sleep(0.05)

    def url(self, db: int = 0) -> str:
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.ports)
        return f"redis+sentinel://{hosts}/{SERVICE}/{db}"

    def master(self) -> str:
        return redis_cli(self.ports[0], "SENTINEL", "get-master-addr-by-name", SERVICE)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def sentinel_group_start() -> tuple[OwnRedis, OwnRedis, Sentinels]:
    """A master, its replica (synced) and three Sentinels that know both."""
    if not shutil.which("redis-server"):
        pytest.fail("redis-server is not installed (bash .ci/run installs it)")
    master = OwnRedis()
    replica = OwnRedis("--replicaof", "127.0.0.1", str(master.port))
    deadline = time.monotonic() + 15
    while "master_link_status:up" not in replica.cli("INFO", "replication"):
        if time.monotonic() > deadline:
            pytest.fail("the replica did not sync with the master")
        time.sleep(0.05)
    sentinels = Sentinels(master.port)
    # every Sentinel has found the replica (it is what they promote)
    deadline = time.monotonic() + 20
    while any(f"127.0.0.1:{replica.port}" not in
              redis_cli(p, "SENTINEL", "replicas", SERVICE).replace("\n", ":") for p in sentinels.ports):
        if time.monotonic() > deadline:
            pytest.fail("the Sentinels did not discover the replica")
        time.sleep(0.1)
    return master, replica, sentinels


def sentinel_group_stop(master: OwnRedis, replica: OwnRedis, sentinels: Sentinels) -> None:
    sentinels.stop()
    replica.stop()
    master.stop()


async def publish_until_one_arrives(pub, key, got: list, timeout: float = 40.0) -> int:
    """After a failover: ``pub`` publishes ``after-<i>`` to ``key`` every
    0.2 s until one of them is in ``got`` (bounded); the publishes that
    failed meanwhile (PublishError: no master yet), counted."""
    failed, i = 0, 0
    deadline = time.monotonic() + timeout
    while not any(p.startswith(b"after") for p in got):
        assert time.monotonic() < deadline, (pub.state, pub.problem, failed)
        i += 1
        try:
            await pub.publish(key, b"after-%d" % i)
        except PublishError:
            failed += 1
        await asyncio.sleep(0.2)
    return failed


def start_cluster(n: int, replicas: int = 0, node_timeout: int = 3000, *extra: str):
    """A Redis Cluster of ``n`` ``redis-server`` processes on free ports
    (``replicas`` per master), state ok; ``(ports, {port: process}, workdir)``
    for :func:`stop_cluster`."""
    if not (shutil.which("redis-server") and shutil.which("redis-cli")):
        pytest.fail("redis-server / redis-cli not installed (bash .ci/run installs them)")
    workdir = tempfile.mkdtemp(prefix="fastws-cluster-")
    ports: list[int] = []
    while len(ports) < n:
        p = free_port(bus=True)
        if p not in ports:
            ports.append(p)
    procs = {p: subprocess.Popen(
        ["redis-server", "--port", str(p), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
         "--cluster-config-file", f"nodes-{p}.conf", "--cluster-node-timeout", str(node_timeout),
         "--save", "", "--appendonly", "no", "--dir", workdir, "--logfile", f"redis-{p}.log", *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for p in ports}
    try:
        deadline = time.monotonic() + 15
        for p in ports:
            while "PONG" not in redis_cli(p, "PING"):
                assert time.monotonic() < deadline, f"redis-server on {p} did not start"
                time.sleep(0.05)
        out = subprocess.run(["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports),
                              "--cluster-replicas", str(replicas), "--cluster-yes"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
        deadline = time.monotonic() + 45
        for p in ports:
            while "cluster_state:ok" not in redis_cli(p, "CLUSTER", "INFO"):
                assert time.monotonic() < deadline, "cluster did not become ok"
                time.sleep(0.1)
    except BaseException:
        stop_cluster(procs, workdir)
        raise
    return ports, procs, workdir


def stop_cluster(procs: dict, workdir: str) -> None:
    for pr in procs.values():
        if pr.poll() is None:
            pr.terminate()
    for pr in procs.values():
        try:
            pr.wait(10)
        except subprocess.TimeoutExpired:
            pr.kill()
    shutil.rmtree(workdir, ignore_errors=True)


def replicated_cluster_start():
    """Three masters, each with a replica (node timeout 1 s), every replica
    synced with its master (one that never did is not promoted): ``(ports,
    {port: process}, workdir)`` for :func:`stop_cluster`."""
    ports, procs, workdir = start_cluster(6, 1, 1000, "--repl-diskless-sync-delay", "0",
                                          "--cluster-replica-validity-factor", "0")
    try:
        deadline = time.monotonic() + 30
        for p in ports:
            while cluster_role(p) != "master" and "master_link_status:up" not in redis_cli(p, "INFO", "replication"):
                assert time.monotonic() < deadline, f"replica {p} did not sync"
                time.sleep(0.1)
    except BaseException:
        stop_cluster(procs, workdir)
        raise
    return ports, procs, workdir


def cluster_role(port: int) -> str:
    return redis_cli(port, "ROLE").split("\n", 1)[0].strip()


def slot_owner(port: int, slot: int) -> int | None:
    """The port of the master that ``port``'s view of the cluster gives ``slot``."""
    for line in redis_cli(port, "CLUSTER", "NODES").splitlines():
        f = line.split()
        if len(f) < 9 or "master" not in f[2] or "fail" in f[2]:
            continue
        for r in f[8:]:
            lo, _, hi = r.partition("-")
            if lo.isdigit() and int(lo) <= slot <= int(hi or lo):
                return int(f[1].split("@")[0].rsplit(":", 1)[1])
    return None
