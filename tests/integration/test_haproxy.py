"""Two `fastws serve` nodes behind a real HAProxy running docs/deployment.md's haproxy.cfg.

The configuration is not copied here: it is the ```haproxy block of the
"## HAProxy" section of docs/deployment.md, read at test time, with only what
a test machine must change substituted (each substitution must match exactly
once, so a changed doc fails loudly instead of silently testing something else):

- ``bind :443 ssl crt /etc/haproxy/certs/...pem`` -> ``bind 127.0.0.1:<free
  port> ssl crt <a self-signed certificate made here>`` (TLS stays on: the
  clients speak wss://);
- the ``server wsN 127.0.0.1:800N`` ports -> the two nodes' free ports;
- to *run* it (not for ``haproxy -c``): the global ``maxconn``, which HAProxy
  turns into an fd limit of 2 x maxconn it must be able to set (it refuses to
  start otherwise), lowered to what this machine's hard fd limit allows.

Behind it: two nodes of tests/integration/apps/rooms_app.py sharing the
test Redis (``--broker $FASTWS_TEST_REDIS`` with a unique prefix), so
rooms span both nodes. Real ``websockets`` clients check: upgrades through
HAProxy land on both nodes (leastconn, no stickiness); messages flow both
ways; an idle upgraded connection stays open and answers pings (``timeout
tunnel``); a publish reaches every member on both nodes exactly once;
``/health`` answers through HAProxy; ``/metrics`` and ``/stats`` are denied
to other source addresses; the health check (``option httpchk GET /health``)
takes a draining node out before it closes anything, and meanwhile
``retry-on 503`` + ``option redispatch`` send new upgrades to the other node;
killing a node sends its clients, on reconnect at once, to the other one.

A missing ``haproxy`` binary fails the tests (``bash .ci/run`` installs it).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import http.client
import ipaddress
import json
import os
import re
import resource
import shutil
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest
import websockets

# Shared with the nginx test (a module name pytest imports it under, too).
from brokerutil import REDIS_URL, new_prefix
from test_multinode import APP, collect

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DOC = REPO / "docs" / "deployment.md"
HOST = "127.0.0.1"
HAPROXY_START_TIMEOUT = 15.0


# -- the documented configuration ---------------------------------------------


def doc_haproxy_cfg() -> str:
    """The one ```haproxy block under "## HAProxy" in docs/deployment.md."""
    text = DOC.read_text()
    section = re.search(r"^## HAProxy[ \t]*\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert section, f"{DOC} has no '## HAProxy' section"
    blocks = re.findall(r"^```haproxy[ \t]*\n(.*?)^```", section.group(1), re.S | re.M)
    assert len(blocks) == 1, (
        f"the '## HAProxy' section of {DOC} must hold exactly one ```haproxy block, "
        f"found {len(blocks)}"
    )
    return blocks[0]


def _sub_once(pattern: str, repl, text: str, what: str, count: int = 1) -> str:
    new, n = re.subn(pattern, repl, text, flags=re.M)
    assert n == count, (
        f"docs/deployment.md haproxy.cfg: expected {count} {what} line(s) matching "
        f"{pattern!r}, found {n}:\n{text}"
    )
    return new


def _global_section(cfg: str) -> str:
    match = re.search(r"^global[ \t]*\n((?:[ \t]+.*\n|[ \t]*\n)*)", cfg, re.M)
    assert match, f"no 'global' section in the doc's haproxy.cfg:\n{cfg}"
    return match.group(1)


def render_cfg(cfg: str, *, front_port: int, cert: Path, node_ports: list[int],
               maxconn: int | None = None) -> str:
    """The doc's config with the listen address, certificate path, backend
    ports (and, to run it on a small machine, the global maxconn) replaced."""
    cfg = _sub_once(
        r"^([ \t]*bind[ \t]+)\S*:443([ \t]+ssl[ \t]+crt[ \t]+)\S+",
        lambda m: f"{m.group(1)}{HOST}:{front_port}{m.group(2)}{cert}",
        cfg, "'bind :443 ssl crt FILE'",
    )
    ports = iter(node_ports)
    cfg = _sub_once(
        r"^([ \t]*server[ \t]+\S+[ \t]+)127\.0\.0\.1:\d+\b",
        lambda m: f"{m.group(1)}{HOST}:{next(ports)}",
        cfg, "'server NAME 127.0.0.1:PORT'", count=len(node_ports),
    )
    if maxconn is not None:
        body = _global_section(cfg)
        new_body = _sub_once(r"^([ \t]*maxconn[ \t]+)\d+", rf"\g<1>{maxconn}", body,
                             "global 'maxconn N'")
        cfg = cfg.replace(body, new_body, 1)
    return cfg


def directive(cfg: str, name: str) -> list[str]:
    """Arguments of every ``name ...`` line (comments stripped)."""
    out = []
    for line in cfg.splitlines():
        line = line.split("#", 1)[0].strip()
        if line == name or line.startswith(name + " "):
            out.append(line[len(name):].strip())
    return out


def seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+)(us|ms|s|m|h|d)?", value)
    assert m, value
    return int(m.group(1)) * {"us": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600,
                              "d": 86400, None: 1e-3}[m.group(2)]


# -- processes ----------------------------------------------------------------


def haproxy_binary() -> str:
    found = shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy") else None)
    if not found:
        pytest.fail("haproxy is not installed (apt-get install haproxy; bash .ci/run installs it)",
                    pytrace=False)
    return found


def harness_module(config):
    """tests/integration/conftest.py as pytest loaded it (Server, free_port).

    Every conftest.py outside a package is imported as module "conftest", so a
    plain ``import conftest`` may return tests/unit's; ask pytest for ours.
    """
    ours = (HERE / "conftest.py").resolve()
    for plugin in config.pluginmanager.get_plugins():
        path = getattr(plugin, "__file__", None)
        if path and Path(path).resolve() == ours:
            return plugin
    raise AssertionError(f"{ours} is not loaded as a pytest plugin")


def make_cert(directory: Path) -> Path:
    """A self-signed certificate for 127.0.0.1, key appended (HAProxy's ``crt``)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fastws-haproxy-test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(HOST))]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    path = directory / "haproxy.pem"
    path.write_bytes(
        cert.public_bytes(serialization.Encoding.PEM)
        + key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    )
    return path


def check_cfg(binary: str, path: Path) -> str:
    """``haproxy -c`` in zero-warning mode (-dW): a warning fails too."""
    proc = subprocess.run([binary, "-dW", "-c", "-f", str(path)], capture_output=True,
                          text=True, timeout=30)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"haproxy -c rejects {path}:\n{output}\n--- cfg ---\n{path.read_text()}"
    assert "WARNING" not in output and "ALERT" not in output, output
    return output


def runnable_maxconn() -> int:
    """A global maxconn this process's hard fd limit lets HAProxy apply."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    return max(100, min(10_000, (hard - 200) // 2))


class HAProxy:
    """``haproxy -f cfg -db`` (foreground). Looks like conftest's ``Server``
    to its failure-report hook (engine, port, args, describe, log_tail)."""

    engine = "haproxy"

    def __init__(self, binary: str, cfg_path: Path, log_path: Path, port: int):
        self.binary, self.cfg_path, self.log_path, self.port = binary, cfg_path, log_path, port
        self.args = ("-f", str(cfg_path), "-db")
        self.proc: subprocess.Popen | None = None
        self.stopped = False
        self.started_at = 0.0

    def start(self) -> None:
        self.started_at = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [self.binary, *self.args], cwd=self.cfg_path.parent,
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        deadline = time.monotonic() + HAPROXY_START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"haproxy exited with {self.proc.returncode}\n{self.describe()}\n"
                            f"{self.log_tail()}", pytrace=False)
            with contextlib.suppress(OSError):
                socket.create_connection((HOST, self.port), 0.2).close()
                return
            time.sleep(0.05)
        pytest.fail(f"haproxy did not listen on {self.port} within {HAPROXY_START_TIMEOUT}s\n"
                    f"{self.describe()}\n{self.log_tail()}", pytrace=False)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")
        return ""

    def log_tail(self) -> str:
        return self.log()[-6000:]

    def describe(self) -> str:
        cfg = self.cfg_path.read_text() if self.cfg_path.exists() else ""
        return f"{self.binary} {' '.join(self.args)}\nlog={self.log_path}\n--- cfg ---\n{cfg}"

    def wait_log(self, text: str, timeout: float) -> float:
        """Seconds until ``text`` shows in haproxy's output (fails after ``timeout``)."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if text in self.log():
                return time.monotonic() - start
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not in haproxy's output within {timeout}s:\n{self.log_tail()}")

    def stop(self) -> None:
        self.stopped = True
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)  # hard stop: closes every connection
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


@pytest.fixture(scope="module")
def haproxy_bin() -> str:
    return haproxy_binary()


@pytest.fixture
def make_cluster(request, tmp_path, haproxy_bin):
    """``make_cluster(ws1_args=())``: HAProxy running the doc's config in front
    of two rooms_app nodes sharing Redis (``ws1_args``: extra options of the
    first node, HAProxy's server ws1). Everything started is stopped at
    teardown; on failure conftest's report hook attaches every log."""
    harness = harness_module(request.config)
    reported = harness._active_servers.setdefault(request.node.nodeid, [])
    started = []

    def make(ws1_args: tuple[str, ...] = ()) -> dict:
        prefix = new_prefix("hap")
        nodes = []
        for i in range(2):
            node = harness.Server(
                engine="cython", app=APP, env={}, log_path=tmp_path / f"node{i}.log",
                args=("--broker", REDIS_URL, "--broker-prefix", prefix, "--ping-interval", "0",
                      "--server-id", f"ws{i + 1}", *(ws1_args if i == 0 else ())),
            )
            started.append(node)
            reported.append(node)
            node.start()
            nodes.append(node)
        front = harness.free_port()
        cert = make_cert(tmp_path)
        cfg = tmp_path / "haproxy.cfg"
        cfg.write_text(render_cfg(doc_haproxy_cfg(), front_port=front, cert=cert,
                                  node_ports=[n.port for n in nodes], maxconn=runnable_maxconn()))
        check_cfg(haproxy_bin, cfg)
        proxy = HAProxy(haproxy_bin, cfg, tmp_path / "haproxy.log", front)
        started.append(proxy)
        reported.append(proxy)
        proxy.start()
        return {"front": front, "nodes": nodes, "proxy": proxy, "tmp": tmp_path,
                "ssl": ssl.create_default_context(cafile=str(cert)),
                "url": f"wss://{HOST}:{front}"}

    yield make
    try:
        dead = [p for p in started if not p.alive() and not p.stopped]
        assert not dead, "died during the test:\n" + "\n\n".join(
            f"{p.describe()}\n{p.log_tail()}" for p in dead)
    finally:
        for p in reversed(started):
            p.stop()
        harness._active_servers.pop(request.node.nodeid, None)


@pytest.fixture
def cluster(make_cluster) -> dict:
    return make_cluster()


# -- clients ------------------------------------------------------------------


async def join(info, room):
    """A client through HAProxy in ``room``; returns (ws, pid of its node)."""
    ws = await websockets.connect(f"{info['url']}/room", ssl=info["ssl"], max_size=None,
                                  open_timeout=10, ping_interval=None)
    await ws.send(json.dumps({"hello": {"room": room}}))
    hello = json.loads(await asyncio.wait_for(ws.recv(), 10))
    assert hello["joined"] == room
    return ws, hello["pid"]


def https(info, path, source=HOST):
    """GET through HAProxy from ``source``; (status, body)."""
    conn = http.client.HTTPSConnection(HOST, info["front"], context=info["ssl"], timeout=10,
                                       source_address=(source, 0))
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def node_pids(info):
    return {n.proc.pid for n in info["nodes"]}


# -- tests --------------------------------------------------------------------


def test_doc_config_is_valid_haproxy(haproxy_bin, tmp_path):
    """The doc's block, with its production figures, passes ``haproxy -c``
    without a warning, and has what WebSockets behind HAProxy need."""
    cfg = doc_haproxy_cfg()
    cert = make_cert(tmp_path)
    path = tmp_path / "haproxy.cfg"
    path.write_text(render_cfg(cfg, front_port=8443, cert=cert, node_ports=[8001, 8002]))
    check_cfg(haproxy_bin, path)

    assert directive(cfg, "mode") == ["http"], "WebSocket upgrades need mode http"
    timeouts = {t.split()[0]: seconds(t.split()[1]) for t in directive(cfg, "timeout")}
    assert "tunnel" in timeouts, "no 'timeout tunnel': upgraded connections die after 'timeout client'"
    # above fastws's default ping interval (20 s) and the client/server timeouts
    assert timeouts["tunnel"] > max(20, timeouts.get("client", 0), timeouts.get("server", 0))
    checks = directive(cfg, "option httpchk")
    assert checks, "no active health check ('option httpchk')"
    assert checks[0].split()[-1] == "/health", (
        f"{checks}: check readiness (/health: 503 while draining); /livez stays 200 while draining")
    assert "redispatch" in " ".join(directive(cfg, "option")), \
        "no 'option redispatch': leastconn sends reconnects to a dead node until its check fails"
    assert all("check" in s.split() for s in directive(cfg, "server")), "a server without 'check'"
    assert not directive(cfg, "cookie") and not any("source" in b for b in directive(cfg, "balance")), \
        "fastws needs no stickiness"


def test_rooms_across_both_nodes_through_haproxy(cluster):
    info = cluster

    async def main():
        room = "hap-multi"
        clients = [await join(info, room) for _ in range(6)]
        pids = [pid for _, pid in clients]
        assert set(pids) == node_pids(info), pids        # both nodes got clients
        assert max(pids.count(p) for p in set(pids)) <= 4, pids  # leastconn spreads them
        await asyncio.sleep(0.5)                          # subscriptions reach Redis

        # client -> server -> client, both directions, through the tunnel
        N = 50
        for k, (ws, _) in enumerate(clients):
            await ws.send(json.dumps({"publish": room, "count": N, "size": 200, "pub": k}))
        total = N * len(clients)
        for ws, _ in clients:
            got = await collect(ws, total)
            for k in range(len(clients)):  # exactly once, in order per publisher
                assert [i for p, i in got if p == k] == list(range(N)), k
            assert len(got) == total
        # exactly once: no duplicate arrives late
        for ws, _ in clients:
            await drain_acks(ws)

        # one publish on one node reaches members on both, once each
        ws0, _ = clients[0]
        await ws0.send(json.dumps({"publish": room, "count": 1, "size": 64, "pub": "one"}))
        for ws, _ in clients:
            assert await collect(ws, 1, timeout=10) == [("one", 0)]
        for ws, _ in clients:
            await drain_acks(ws)
        for ws, _ in clients:
            await ws.close()

    asyncio.run(main())

    # plain HTTP through the same frontend: /health from a node
    status, body = https(info, "/health")
    assert status == 200, body
    assert json.loads(body)["status"] == "healthy"
    status, _ = https(info, "/livez")
    assert status == 200
    # operations data: allowed from 127.0.0.1, denied from other sources
    seen = set()
    for _ in range(6):  # leastconn with equal loads takes turns: both nodes answer
        status, body = https(info, "/metrics")
        assert status == 200 and b"websocket_connections_total" in body
        seen.update(re.findall(rb'server_id="(ws\d)"', body))
    assert seen == {b"ws1", b"ws2"}, seen
    status, _ = https(info, "/metrics", source="127.0.0.2")
    assert status == 403
    status, _ = https(info, "/stats", source="127.0.0.2")
    assert status == 403

    # the health checks (GET /health HTTP/1.0, no Host) pass: no node went
    # down over more than inter x fall
    proxy = info["proxy"]
    time.sleep(max(0.0, proxy.started_at + 4.5 - time.monotonic()))
    assert "is DOWN" not in proxy.log(), proxy.log_tail()


async def drain_acks(ws, wait=0.3):
    """Read ``{"published": n}`` acks; fail on any other message."""
    while True:
        try:
            msg = json.loads(await asyncio.wait_for(ws.recv(), wait))
        except asyncio.TimeoutError:
            return
        assert "published" in msg, f"unexpected message (a duplicate?) {msg}"


def test_idle_upgraded_connection_stays_open(cluster):
    """No traffic at all (server pings off, client pings off) for a while,
    then a ping/pong and a message still go through HAProxy."""
    info = cluster
    cfg = doc_haproxy_cfg()
    timeouts = {t.split()[0]: seconds(t.split()[1]) for t in directive(cfg, "timeout")}
    assert timeouts["tunnel"] >= 60, timeouts

    async def main():
        ws, _ = await join(info, "hap-idle")
        await asyncio.sleep(3.0)
        pong = await ws.ping(b"after-idle")
        await asyncio.wait_for(pong, 5)
        await ws.send(json.dumps({"publish": "hap-idle", "count": 1, "size": 64, "pub": "idle"}))
        assert await collect(ws, 1, timeout=5) == [("idle", 0)]
        await ws.close()
        assert ws.close_code == 1000

    asyncio.run(main())


def test_draining_node_is_taken_out_before_it_closes(make_cluster):
    """SIGTERM a node (drain_delay 7 s). At once, new upgrades that HAProxy
    sends it get 503 and are retried on the other node (``retry-on 503``,
    ``option redispatch``); the doc's ``option httpchk GET /health`` marks it
    down within about inter x fall (the doc: "within about 4 s"); its own
    clients keep working, in rooms spanning both nodes, until it closes them
    with 1001 and they reconnect to the other node."""
    drain_delay = 7.0
    info = make_cluster(ws1_args=("--drain-delay", str(drain_delay)))
    victim, other = info["nodes"]          # haproxy's ws1, ws2
    proxy = info["proxy"]

    async def main():
        room = "hap-drain"
        clients = [await join(info, room) for _ in range(4)]
        assert {p for _, p in clients} == node_pids(info)
        t0 = time.monotonic()
        victim.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        early = [await join(info, room) for _ in range(4)]     # not down yet in HAProxy
        assert {p for _, p in early} == {other.proc.pid}, [p for _, p in early]
        took = await asyncio.to_thread(proxy.wait_log, "fastws/ws1 is DOWN", 6.0)
        assert time.monotonic() - t0 < drain_delay - 1, took
        late = [await join(info, room) for _ in range(2)]
        assert {p for _, p in late} == {other.proc.pid}
        await asyncio.sleep(0.3)
        # the draining node's clients are still served, and rooms still span nodes
        ws_v = next(ws for ws, p in clients if p == victim.proc.pid)
        await ws_v.send(json.dumps({"publish": room, "count": 1, "size": 64, "pub": "d"}))
        everyone = clients + early + late
        for ws, _ in everyone:
            assert await collect(ws, 1, timeout=10) == [("d", 0)]
        # then the node closes its clients with 1001 "going away", through HAProxy
        for ws, pid in clients:
            if pid == victim.proc.pid:
                with pytest.raises(websockets.ConnectionClosed):
                    while True:
                        await asyncio.wait_for(ws.recv(), drain_delay + 5)
                assert ws.close_code == 1001, (ws.close_code, ws.close_reason)
                ws2, pid2 = await join(info, room)
                assert pid2 == other.proc.pid
                await ws2.close()
        for ws, pid in everyone:
            if pid != victim.proc.pid:
                await ws.close()

    asyncio.run(main())
    victim.proc.wait(15)
    assert victim.stop() == 0, victim.log_tail()
    assert "ws2 is DOWN" not in proxy.log(), proxy.log_tail()


def test_killed_node_clients_reconnect_to_the_other(cluster):
    """kill -9 a node: its clients are closed through HAProxy and reconnect
    at once (before any health check noticed) to the other node."""
    info = cluster
    victim, other = info["nodes"]

    async def main():
        room = "hap-kill"
        clients = [await join(info, room) for _ in range(6)]
        assert {p for _, p in clients} == node_pids(info)
        victim_pid = victim.proc.pid
        victim.proc.kill()
        victim.stop()
        survivors = []
        for ws, pid in clients:
            if pid == victim_pid:
                with pytest.raises(websockets.ConnectionClosed):
                    await asyncio.wait_for(ws.recv(), 10)
                ws2, pid2 = await join(info, room)
                assert pid2 == other.proc.pid
                survivors.append((ws2, pid2))
            else:
                survivors.append((ws, pid))
        await asyncio.sleep(0.3)
        for k, (ws, _) in enumerate(survivors):
            await ws.send(json.dumps({"publish": room, "count": 10, "size": 64, "pub": k}))
        for ws, _ in survivors:
            got = await collect(ws, 10 * len(survivors))
            for k in range(len(survivors)):
                assert [i for p, i in got if p == k] == list(range(10))
        for ws, _ in survivors:
            await ws.close()

    asyncio.run(main())
