"""Attacks and failures around the edges of a node (real processes, both engines).

* The HTTP publish API: a JSON lone surrogate (``"\\ud800"``) as the text,
  the room or the namespace gets 400 with a JSON error and takes no room
  sequence number (the next publish gets N+1); the ``Bearer`` scheme is
  matched in any case and with any number of spaces after it.
* 2,000 connections, each closed by the client with its own code
  3000..4999: the close-code series of ``/metrics`` (parsed with
  prometheus_client's parser) and the hub's own ``closes`` dict stay at a
  handful of keys ("3xxx", "4xxx") instead of 2,000.
* ``--workers 2`` with the supervisor killed by SIGKILL: every worker closes
  its clients with 1001 and exits; a new ``--workers 2`` server starts on the
  same port and removes the dead supervisor's private directory (its stale
  broker socket and metrics).  A worker whose parent dies without
  ``prctl(PR_SET_PDEATHSIG)`` notices through its ``getppid()`` check.
* A Redis of the test's own with ``--requirepass``: a wrong password is
  reported as "authentication failed" in the log and in ``/health`` (a port
  nothing listens on as "not reachable"), and no password, right or wrong,
  appears in the log, ``fastws config show``, ``/health`` or ``/metrics``.

Every client connects to 127.0.0.1 only; every loop is bounded in count and
time.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
import websockets
from prometheus_client.parser import text_string_to_metric_families

from tests.attacks import CLOSE_CODES, MAX_CLOSE_SERIES, Target, close_series, open_and_close

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-c", "from fastws.cli.main import main; main()"]
HOST = "127.0.0.1"
ROOMS_APP = "tests.integration.apps.rooms_app:app"
TOKEN = "publish-token-for-tests"


# -- helpers -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout=10.0, interval=0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def can_connect(port) -> bool:
    try:
        socket.create_connection((HOST, port), timeout=0.5).close()
        return True
    except OSError:
        return False


def http(port, path, *, method="GET", body=None, headers=None):
    """(status, body bytes) of one request to 127.0.0.1:port."""
    req = urllib.request.Request(f"http://{HOST}:{port}{path}", data=body, headers=headers or {},
                                 method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def publish(port, raw_json: bytes, auth=f"Bearer {TOKEN}"):
    """POST /publish with ``raw_json`` as the body: (status, parsed JSON or text)."""
    status, body = http(port, "/publish", method="POST", body=raw_json,
                        headers={"Authorization": auth, "Content-Type": "application/json"})
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body.decode(errors="replace")


def scrape(port) -> dict:
    """{(sample name, frozenset(labels)): value} from /metrics."""
    status, body = http(port, "/metrics")
    assert status == 200, body
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def env_for(engine, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTWS_")}
    if engine == "wsproto":
        env["FASTWS_NO_EXTENSIONS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


class Proc:
    """A ``fastws serve`` (or other) process this test starts and stops itself."""

    def __init__(self, cmd, log_path: Path, env: dict) -> None:
        self.log_path = log_path
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL to the whole process group if it lingers."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(20)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        return self.proc.returncode


def serve(engine, log_path, port, *args, env=None, app="examples.echo:app") -> Proc:
    return Proc([*CLI, "serve", app, "--host", HOST, "--port", str(port), *args],
                log_path, env_for(engine, **(env or {})))


#: (app, WebSocket echo path) of each server mode
MODES = {"native": ("examples.echo:app", "/"), "asgi": ("examples.starlette_app:app", "/ws/echo")}


def gone(pid) -> bool:
    """The process no longer runs (exited, or a zombie nobody has reaped yet)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# -- the HTTP publish API -------------------------------------------------------------


@pytest.fixture
def rooms_server(server_factory):
    return server_factory("--broker", "memory://", "--publish-token", TOKEN, app=ROOMS_APP)


async def _member(server, room):
    ws = await websockets.connect(f"ws://{HOST}:{server.port}/room")
    await ws.send(json.dumps({"hello": {"room": room}}))
    joined = json.loads(await asyncio.wait_for(ws.recv(), 5))
    assert joined["joined"] == room
    return ws


def test_publish_lone_surrogate_is_400_and_takes_no_seq(rooms_server, engine):
    room = f"surrogate-{engine}-{os.getpid()}"
    port = rooms_server.port

    async def main():
        ws = await _member(rooms_server, room)
        try:
            one = json.dumps({"room": room, "text": "one"}).encode()
            status, doc = await asyncio.to_thread(publish, port, one)
            assert (status, doc["seq"]) == (200, 1), doc
            # json.dumps writes the lone surrogate as the escape \ud800: valid JSON, no valid text
            for bad in ({"room": room, "text": "x\ud800y"}, {"room": room + "\udfff", "text": "t"},
                        {"room": room, "namespace": "\ud800", "text": "t"}):
                raw = json.dumps(bad).encode()
                assert b"\\ud" in raw
                status, doc = await asyncio.to_thread(publish, port, raw)
                assert status == 400, (bad, status, doc)
                assert isinstance(doc, dict) and "lone surrogate" in doc["error"], doc
            two = json.dumps({"room": room, "text": "two"}).encode()
            status, doc = await asyncio.to_thread(publish, port, two)
            assert (status, doc["seq"]) == (200, 2), doc      # consecutive: nothing was burnt
            got = [await asyncio.wait_for(ws.recv(), 5) for _ in range(2)]
            assert got == ["one", "two"]
            with pytest.raises(asyncio.TimeoutError):          # and nothing else arrived
                await asyncio.wait_for(ws.recv(), 0.3)
        finally:
            await ws.close()

    asyncio.run(main())


def test_publish_bearer_scheme_in_any_case(rooms_server, engine):
    room = f"bearer-{engine}-{os.getpid()}"
    port = rooms_server.port

    async def main():
        ws = await _member(rooms_server, room)
        try:
            accepted = [f"bearer {TOKEN}", f"BEARER {TOKEN}", f"Bearer   {TOKEN}", f"bEaReR  {TOKEN}"]
            for i, auth in enumerate(accepted, 1):
                status, doc = await asyncio.to_thread(
                    publish, port, json.dumps({"room": room, "text": f"m{i}"}).encode(), auth)
                assert (status, doc) == (200, {"seq": i, "remote": True}), (auth, status, doc)
            refused = [f"Bearer {TOKEN}x", f"Bearer{TOKEN}", f"Basic {TOKEN}", TOKEN, "bearer ", "",
                       f"Bearer {TOKEN[:-1]}"]
            for auth in refused:
                status, body = await asyncio.to_thread(
                    publish, port, json.dumps({"room": room, "text": "no"}).encode(), auth)
                assert status == 401, (auth, status, body)
            got = [await asyncio.wait_for(ws.recv(), 5) for _ in accepted]
            assert got == [f"m{i}" for i in range(1, len(accepted) + 1)]
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(ws.recv(), 0.3)
        finally:
            await ws.close()

    asyncio.run(main())


# -- close codes chosen by the client ---------------------------------------------------


def test_2000_client_close_codes_keep_metrics_series_bounded(rooms_server, engine):
    port = rooms_server.port
    before = close_series(scrape(port))

    async def main():
        sem = asyncio.Semaphore(50)

        async def one(code):
            async with sem:
                return await asyncio.wait_for(open_and_close(Target(port), code, "/room"), 10)

        echoed = await asyncio.gather(*(one(c) for c in CLOSE_CODES))
        assert echoed == list(CLOSE_CODES)       # every close was a proper close handshake

    t0 = time.monotonic()
    asyncio.run(main())
    assert time.monotonic() - t0 < 120

    def counted():
        s = close_series(scrape(port))
        done = (s.get("3xxx", 0) - before.get("3xxx", 0) >= 1000
                and s.get("4xxx", 0) - before.get("4xxx", 0) >= 1000)
        return s if done else None

    series = wait_for(counted, timeout=15, interval=0.2)
    assert series, close_series(scrape(port))
    assert series["3xxx"] - before.get("3xxx", 0) == 1000
    assert series["4xxx"] - before.get("4xxx", 0) == 1000
    assert len(series) <= MAX_CLOSE_SERIES, sorted(series)
    assert all(k in ("3xxx", "4xxx", "other") or 1000 <= int(k) <= 1015 for k in series), sorted(series)

    async def hub_closes():
        async with websockets.connect(f"ws://{HOST}:{port}/room") as ws:
            await ws.send(json.dumps({"stats": 1}))
            return json.loads(await asyncio.wait_for(ws.recv(), 5))["hub"]["closes"]

    closes = asyncio.run(hub_closes())            # the hub's own dict, not just the exposition
    assert len(closes) <= MAX_CLOSE_SERIES, sorted(closes)
    assert closes["3xxx"] >= 1000 and closes["4xxx"] >= 1000, closes


# -- the supervisor killed with SIGKILL ------------------------------------------------


@pytest.fixture
def short_tmpdir():
    """A TMPDIR of the test's own, short enough for a Unix socket path inside."""
    path = tempfile.mkdtemp(prefix="fws-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _workers_listening(proc: Proc, port: int) -> list:
    try:
        children = psutil.Process(proc.pid).children()
    except psutil.NoSuchProcess:
        return []
    out = []
    for c in children:
        with contextlib.suppress(psutil.Error):
            if any(k.status == psutil.CONN_LISTEN and k.laddr.port == port for k in c.net_connections("tcp")):
                out.append(c)
    return out


def _stale_socket(path: str) -> None:
    """A Unix socket file nobody listens on (what a killed process leaves)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.close()


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.mark.parametrize("mode", sorted(MODES))
def test_workers_close_1001_and_exit_when_supervisor_is_killed(engine, tmp_path, short_tmpdir, mode):
    app, path = MODES[mode]
    port = free_port()
    url = f"ws://{HOST}:{port}{path}"
    env = {"TMPDIR": short_tmpdir}
    # what an earlier supervisor, killed, left behind: its socket and metrics directory
    dead = _dead_pid()
    legacy_sock = os.path.join(short_tmpdir, f"fastws-{dead}.sock")
    legacy_metrics = os.path.join(short_tmpdir, f"fastws-metrics-{dead}-abc")
    _stale_socket(legacy_sock)
    os.mkdir(legacy_metrics)
    first = serve(engine, tmp_path / "first.log", port, "--workers", "2", env=env, app=app)
    second = None
    loop = asyncio.new_event_loop()
    try:
        assert wait_for(lambda: not first.alive() or len(_workers_listening(first, port)) == 2, 30), \
            first.log()
        assert first.alive(), first.log()
        assert not os.path.exists(legacy_sock), os.listdir(short_tmpdir)      # swept at start
        assert not os.path.exists(legacy_metrics), os.listdir(short_tmpdir)
        workers = [c.pid for c in _workers_listening(first, port)]
        run_dirs = glob.glob(os.path.join(short_tmpdir, f"fastws-sup-{first.pid}-*"))
        assert len(run_dirs) == 1, os.listdir(short_tmpdir)
        assert os.path.exists(os.path.join(run_dirs[0], "broker.sock"))

        # clients on both workers (SO_REUSEPORT spreads them; bounded attempts)
        clients = []

        def holders():
            out = set()
            for c in psutil.Process(first.pid).children():
                with contextlib.suppress(psutil.Error):
                    if any(k.status == psutil.CONN_ESTABLISHED and k.laddr.port == port
                           for k in c.net_connections("tcp")):
                        out.add(c.pid)
            return out

        for _ in range(40):
            ws = loop.run_until_complete(websockets.connect(url))
            loop.run_until_complete(ws.send("hi"))
            assert loop.run_until_complete(asyncio.wait_for(ws.recv(), 5)) == "hi"
            clients.append(ws)
            if len(clients) >= 4 and wait_for(lambda: len(holders()) == 2, timeout=1):
                break
        assert holders() == set(workers), (holders(), workers)

        os.kill(first.pid, signal.SIGKILL)            # no chance to clean up or to stop anyone
        first.proc.wait(10)

        async def all_closed():
            async def closed(ws):
                with pytest.raises(websockets.ConnectionClosed):
                    await asyncio.wait_for(ws.recv(), 15)
                return ws.close_code

            return await asyncio.gather(*(closed(ws) for ws in clients))

        codes = loop.run_until_complete(all_closed())
        assert codes == [1001] * len(clients), codes
        assert wait_for(lambda: all(gone(p) for p in workers), timeout=15), \
            [(p, gone(p)) for p in workers]
        assert not can_connect(port)                   # no orphan keeps serving the port
        assert os.path.exists(os.path.join(run_dirs[0], "broker.sock"))   # left behind, stale

        # a new supervisor on the same port starts, serves, and removes what the dead one left
        second = serve(engine, tmp_path / "second.log", port, "--workers", "2", env=env, app=app)
        assert wait_for(lambda: not second.alive() or len(_workers_listening(second, port)) == 2, 30), \
            second.log()
        assert second.alive(), second.log()
        assert not os.path.exists(run_dirs[0]), os.listdir(short_tmpdir)

        async def echo():
            async with websockets.connect(url) as ws:
                await ws.send("again")
                return await asyncio.wait_for(ws.recv(), 5)

        assert loop.run_until_complete(echo()) == "again"
        assert second.stop() == 0, second.log()
        assert not glob.glob(os.path.join(short_tmpdir, f"fastws-sup-{second.pid}-*"))
    finally:
        loop.close()
        first.stop()
        if second is not None:
            second.stop()


WORKER_WITHOUT_PRCTL = """
import os, sys, time
from fastws import supervisor
from fastws.config import Config
from fastws.runner import make_server, run_until_signal
from examples.echo import app

supervisor.set_parent_death_signal = lambda sig=None: False   # as where prctl is missing
config = Config(host="127.0.0.1", port=int(sys.argv[1]))
parent = os.getpid()
pid = os.fork()
if pid == 0:
    supervisor._child(lambda index: run_until_signal(make_server(app, config)), 0, parent)
    os._exit(0)
print(pid, flush=True)
while True:
    time.sleep(1)
"""


def test_worker_notices_a_dead_parent_without_prctl(engine, tmp_path):
    port = free_port()
    script = tmp_path / "parent.py"
    script.write_text(WORKER_WITHOUT_PRCTL)
    out = tmp_path / "parent.log"
    env = env_for(engine, PYTHONPATH=str(REPO))
    with open(out, "wb") as log:
        parent = subprocess.Popen([sys.executable, str(script), str(port)], cwd=REPO, env=env,
                                  stdout=subprocess.PIPE, stderr=log, start_new_session=True)
    worker = None
    loop = asyncio.new_event_loop()
    try:
        worker = int(parent.stdout.readline())
        assert wait_for(lambda: can_connect(port), 30), out.read_text()
        ws = loop.run_until_complete(websockets.connect(f"ws://{HOST}:{port}/"))
        loop.run_until_complete(ws.send("hi"))
        assert loop.run_until_complete(asyncio.wait_for(ws.recv(), 5)) == "hi"
        parent.kill()
        parent.wait(10)
        with pytest.raises(websockets.ConnectionClosed):
            loop.run_until_complete(asyncio.wait_for(ws.recv(), 15))
        assert ws.close_code == 1001
        assert wait_for(lambda: gone(worker), timeout=15)
        assert f"the supervisor (pid {parent.pid}) is gone" in out.read_text()
    finally:
        loop.close()
        if parent.poll() is None:
            parent.kill()
            parent.wait(5)
        if worker is not None and not gone(worker):
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker, signal.SIGKILL)


# -- credentials ---------------------------------------------------------------------------


class OwnRedis:
    """A redis-server of this test's own on a free port, with a password (the
    shared one is never touched)."""

    def __init__(self, tmp_path, password: str) -> None:
        if shutil.which("redis-server") is None:
            pytest.fail("redis-server is not installed (bash .ci/run installs it)", pytrace=False)
        self.port = free_port()
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", HOST, "--save", "",
                                      "--appendonly", "no", "--dir", str(tmp_path),
                                      "--requirepass", password],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        assert wait_for(lambda: can_connect(self.port), timeout=10), "redis did not start"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def _health(port):
    status, body = http(port, "/health")
    return status, body.decode(errors="replace")


def _config_show(env: dict, tmp_path) -> str:
    r = subprocess.run([*CLI, "config", "show"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout + r.stderr


@pytest.mark.parametrize("scheme", ["redis", "redis+streams"])
def test_redis_wrong_password_is_authentication_failed_and_never_shown(engine, tmp_path, scheme):
    right, wrong = "right-Pa55-8d1f2c", "wrong-Pa55-77e0ab"
    redis = OwnRedis(tmp_path, right)
    servers = []
    try:
        def start(name, url):
            port = free_port()
            srv = serve(engine, tmp_path / f"{name}.log", port, "--broker", url, "--broker-prefix",
                        f"t-{os.getpid()}-{name}", "--publish-token", TOKEN)
            servers.append(srv)
            assert wait_for(lambda: not srv.alive() or can_connect(port), 30), srv.log()
            assert srv.alive(), srv.log()
            return srv, port

        bad, bad_port = start("wrong", f"{scheme}://:{wrong}@{HOST}:{redis.port}/0")
        good, good_port = start("right", f"{scheme}://:{right}@{HOST}:{redis.port}/0")
        down, down_port = start("down", f"{scheme}://:{right}@{HOST}:{free_port()}/0")

        st = wait_for(lambda: (lambda r: r if r[0] == 503 and "authentication failed" in r[1] else None)(
            _health(bad_port)), timeout=15, interval=0.2)
        assert st, (_health(bad_port), bad.log())
        assert json.loads(st[1])["checks"]["broker"]["ok"] is False
        assert "authentication failed" in json.loads(st[1])["checks"]["broker"]["detail"]
        assert "authentication failed" in bad.log()
        assert "not reachable" not in bad.log()

        ok = wait_for(lambda: (lambda r: r if r[0] == 200 else None)(_health(good_port)), timeout=15,
                      interval=0.2)
        assert ok and json.loads(ok[1])["checks"]["broker"]["ok"] is True, (_health(good_port), good.log())

        st = wait_for(lambda: (lambda r: r if r[0] == 503 and "not reachable" in r[1] else None)(
            _health(down_port)), timeout=15, interval=0.2)
        assert st, (_health(down_port), down.log())
        assert "authentication failed" not in st[1] and "authentication failed" not in down.log()

        # no password, right or wrong, in anything the node shows
        shown = {}
        for srv, port in ((bad, bad_port), (good, good_port), (down, down_port)):
            shown[f"log {srv.log_path.name}"] = srv.log()
            shown[f"/health {port}"] = _health(port)[1]
            shown[f"/metrics {port}"] = http(port, "/metrics")[1].decode()
        env = env_for(engine, FASTWS_BROKER=f"{scheme}://user:{wrong}@{HOST}:{redis.port}/0",
                      FASTWS_PUBLISH_TOKEN=TOKEN)
        shown["config show (env)"] = _config_show(env, tmp_path)
        toml = tmp_path / "fastws.toml"
        toml.write_text(f'broker = "{scheme}://:{right}@{HOST}:{redis.port}/0"\n')
        shown["config show (file)"] = _config_show(env_for(engine, FASTWS_CONFIG=str(toml)), tmp_path)
        assert ":****@" in shown["config show (env)"] and ":****@" in shown["config show (file)"]
        assert "user:****@" in shown["config show (env)"]
        for where, text in shown.items():
            for secret in (right, wrong, TOKEN):
                assert secret not in text, f"{secret!r} shown in {where}"
    finally:
        for srv in servers:
            srv.stop()
        redis.stop()
