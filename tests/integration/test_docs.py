"""The docs run as written: every fenced block of README.md and docs/*.md.

Each block carries a marker (see ``docblocks.py``); a block without one
fails :func:`test_every_block_is_marked`, so none is skipped silently.
Blocks marked ``run NAME`` are run here by the check ``NAME`` (the
``CHECKS`` table below) against real processes: ``fastws serve`` and
``python app.py`` subprocesses, the local Redis at 127.0.0.1:6379, nginx,
real WebSocket clients (``websockets``) and HTTP clients (``urllib``,
``curl``); each check compares what happens with what the doc says (the
output it shows, the replies its comments promise).

What the harness changes in a block before running it, and nothing else:

* ports: a block's port (``--port 8000``, ``port=8000``, ``listen 80``,
  ``http://node:8001``, nginx's ``server 127.0.0.1:8001``) becomes a free
  port on 127.0.0.1, and a listen address ``0.0.0.0`` becomes
  ``127.0.0.1``: every process here listens on loopback only;
* a command without ``--port`` gets ``--port N``;
* Redis: ``10.0.0.5:6379`` becomes ``127.0.0.1:6379``, and every
  ``fastws serve`` with a broker gets a fresh ``--broker-prefix`` so that
  runs do not see each other's rooms;
* TLS files and the nginx paths (``/etc/...``) become files in a temporary
  directory (a self-signed certificate made with ``openssl``); an nginx
  block, which is the ``http {}`` part of a configuration, is wrapped in a
  minimal ``nginx.conf`` (pid, logs and temporary paths in that directory);
* Python snippets that use ``app`` without defining it (README's streams
  examples) get ``import fastws`` / ``app = fastws.App()`` (and ``import
  json``) in front; a doc's ``app:app`` is the app the doc shows, or an
  echo app when it shows none (docs/deployment.md);
* ``$TOKEN`` is set in the environment; the second ``curl`` of the publish
  API also runs with ``-w`` to read its status.

Blocks run in a temporary directory with the repository importable
(``PYTHONPATH``), with no ``FASTWS_*`` variable of the caller's
environment. Every process is stopped (SIGTERM, then SIGKILL) by the test
that started it; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import websockets

from docblocks import DOCS, KINDS, REPO, Block, all_blocks, blocks

HOST = "127.0.0.1"
START_TIMEOUT = 30.0
TIMEOUT = 10.0               # one client step (a reply, a close)
BLOCKS = all_blocks()


# ---------------------------------------------------------------- the markers


def test_every_block_is_marked():
    """Every fenced block of README.md and docs/*.md has a known marker, and
    every ``run`` names a check of this file (an unmarked block fails)."""
    problems = []
    for b in BLOCKS:
        if b.kind is None:
            problems.append(f"{b.where}: no '<!-- test: ... -->' marker above the ```{b.lang} block")
        elif b.kind not in KINDS:
            problems.append(f"{b.where}: unknown marker kind {b.kind!r} (known: {', '.join(KINDS)})")
        elif b.kind == "run" and b.arg not in CHECKS:
            problems.append(f"{b.where}: 'run {b.arg}' names no check of test_docs.py")
        elif b.kind in ("skip", "by", "file", "excerpt") and not b.arg:
            problems.append(f"{b.where}: '{b.kind}' needs an argument")
    assert not problems, "\n".join(problems)
    assert {"README.md", "docs/deployment.md", "docs/asgi.md"} <= set(DOCS)
    assert len([b for b in BLOCKS if b.kind == "run"]) >= 15


def test_readme_keeps_the_newcomer_commands_near_its_top():
    """The first two blocks of the README: install and start the server on
    its default (no broker), then the tests (the CI script)."""
    first = blocks("README.md")[:3]
    assert "pip install" in first[0].text and "fastws serve" in first[0].text, first[0].text
    assert "--broker" not in first[0].text
    assert first[0].line < 40 and first[1].line < 40
    assert {first[1].text.strip(), first[2].text.strip()} >= {"bash .ci/run"}


def _param(kinds):
    chosen = [b for b in BLOCKS if b.kind in kinds]
    return pytest.mark.parametrize("blk", chosen, ids=[f"{b.where}-{b.arg.split()[0] if b.arg else ''}"
                                                      for b in chosen])


@_param(("by",))
def test_block_run_by_another_test(blk: Block):
    """``by FILE#ID``: that test exists and reads this doc's block ``ID``."""
    name, _, ident = blk.arg.partition("#")
    path = REPO / "tests" / "integration" / name
    assert path.is_file(), f"{blk.where}: {path} does not exist"
    text = path.read_text()
    assert Path(blk.doc).name in text and ident in text, f"{blk.where}: {name} does not read {blk.doc} #{ident}"


@_param(("excerpt",))
def test_block_is_an_excerpt(blk: Block):
    """``excerpt PATH``: the block's lines are lines of PATH, in order."""
    source = [line.strip() for line in (REPO / blk.arg).read_text().splitlines() if line.strip()]
    pos = 0
    for line in (x.strip() for x in blk.text.splitlines() if x.strip()):
        assert line in source[pos:], f"{blk.where}: {line!r} is not in {blk.arg} (after line {pos})"
        pos = source.index(line, pos) + 1


@_param(("skip",))
def test_skipped_block_says_why(blk: Block):
    assert len(blk.arg.split()) >= 3, f"{blk.where}: a skip needs a reason, got {blk.arg!r}"


@_param(("run",))
def test_block_runs_as_documented(blk: Block, tmp_path):
    CHECKS[blk.arg](blk, Harness(tmp_path, blk))


# ---------------------------------------------------------------- the harness


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def redis_up() -> None:
    try:
        with socket.create_connection((HOST, 6379), timeout=2) as s:
            s.sendall(b"PING\r\n")
            assert s.recv(64).startswith(b"+PONG")
    except OSError as exc:
        pytest.fail(f"Redis is not reachable at 127.0.0.1:6379 ({exc}); bash .ci/run starts it", pytrace=False)


def forget_keys(prefix: str) -> None:
    """Delete what a run left in Redis under its prefix (streams, presence)."""
    with contextlib.suppress(OSError, ImportError):
        import redis

        client = redis.Redis(host=HOST, port=6379, socket_timeout=5)
        try:
            keys = list(client.scan_iter(match=f"*{prefix}*", count=1000))
            if keys:
                client.delete(*keys)
        except redis.RedisError:
            pass
        finally:
            client.close()


ECHO_APP = '''import fastws

app = fastws.App()


@app.on_message("*")
def echo(conn, data):
    conn.send(data)
'''


class Proc:
    """A process started by the harness, with its output in a log file."""

    def __init__(self, argv, cwd, env, log: Path) -> None:
        self.argv, self.log_path = argv, log
        self.out = open(log, "ab")  # noqa: SIM115 (closed by stop())
        self.popen = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=self.out,
                                      stderr=subprocess.STDOUT, start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_port(self, port: int, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                pytest.fail(f"{shlex.join(self.argv)} exited {self.popen.returncode}:\n{self.log()}", pytrace=False)
            with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.5):
                return
            time.sleep(0.05)
        pytest.fail(f"{shlex.join(self.argv)} did not listen on {port} in {timeout}s:\n{self.log()}", pytrace=False)

    def stop(self) -> int:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(5)
        self.out.close()
        return self.popen.returncode


class Harness:
    """A temporary directory to run one block in, and its processes."""

    def __init__(self, tmp: Path, blk: Block) -> None:
        self.tmp, self.blk = tmp, blk
        self.procs: list[Proc] = []
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("FASTWS_")}
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        self.env["PYTHONUNBUFFERED"] = "1"
        self.env["TOKEN"] = "docs-token-" + uuid.uuid4().hex[:12]
        self.prefix = "docs" + uuid.uuid4().hex[:10]
        for b in blocks(blk.doc):          # the doc's files, for its commands
            if b.kind == "file":
                (tmp / b.arg).write_text(b.text)

    def sibling(self, name: str) -> Block:
        """The block of the same doc marked ``run name``."""
        found = [b for b in blocks(self.blk.doc) if b.kind == "run" and b.arg == name]
        assert len(found) == 1, f"{self.blk.doc}: one block 'run {name}' expected"
        return found[0]

    def write(self, name: str, text: str) -> Path:
        path = self.tmp / name
        path.write_text(text)
        return path

    def start(self, argv, port: int | None = None, cwd=None) -> Proc:
        proc = Proc(argv, cwd or self.tmp, self.env, self.tmp / f"proc-{len(self.procs)}.log")
        self.procs.append(proc)
        if port is not None:
            proc.wait_port(port)
        return proc

    def sh(self, command: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", command], cwd=self.tmp, env=self.env, capture_output=True,
                              text=True, timeout=timeout)

    def stop_all(self) -> None:
        for p in self.procs:
            p.stop()

    def cert(self) -> tuple[Path, Path]:
        """A self-signed certificate for 127.0.0.1 and localhost (cert, key)."""
        cert, key = self.tmp / "cert.pem", self.tmp / "key.pem"
        if not cert.exists():
            r = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                                "-out", str(cert), "-days", "2", "-subj", "/CN=localhost", "-addext",
                                "subjectAltName=DNS:localhost,IP:127.0.0.1"], capture_output=True, text=True,
                               timeout=60)
            assert r.returncode == 0, r.stderr
        return cert, key

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop_all()
        forget_keys(self.prefix)


def commands(text: str) -> list[str]:
    """The shell commands of a ``sh`` block: continuation lines joined,
    comment lines and trailing comments dropped."""
    out, cur = [], ""
    for line in text.splitlines():
        line = line.rstrip()
        if cur == "" and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            cur += line[:-1] + " "
            continue
        cur += line
        out.append(re.sub(r"\s+#\s.*$", "", cur).strip())
        cur = ""
    return out


def serve_args(cmd: str, port: int, env: dict) -> list[str]:
    """A documented ``fastws serve ...`` as argv: ``$VAR`` from ``env``, the
    port, a listen address 0.0.0.0 and a Redis at 10.0.0.5 rewritten (see
    the module doc); ``VAR=value`` words in front go into ``env``."""
    cmd = re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m.group(1), m.group(0)), cmd)
    argv = shlex.split(cmd)
    while argv and re.match(r"^[A-Z_][A-Z0-9_]*=", argv[0]):      # VAR=value before the command
        name, _, value = argv.pop(0).partition("=")
        env[name] = value
    assert argv[:2] == ["fastws", "serve"], cmd
    if "--port" in argv:
        argv[argv.index("--port") + 1] = str(port)
    else:
        argv += ["--port", str(port)]
    if "--host" in argv and argv[argv.index("--host") + 1] == "0.0.0.0":
        argv[argv.index("--host") + 1] = HOST
    argv = [a.replace("10.0.0.5:6379", "127.0.0.1:6379") for a in argv]
    return [sys.executable, "-m", "fastws", *argv[1:]]


def with_prefix(argv: list[str], prefix: str) -> list[str]:
    return argv + ["--broker-prefix", prefix] if "--broker" in argv else argv


def http(url: str, data: bytes | None = None, headers=None, context=None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT, context=context) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


async def recv(ws, timeout: float = TIMEOUT):
    return await asyncio.wait_for(ws.recv(), timeout)


async def nothing_within(ws, seconds: float) -> bool:
    try:
        await asyncio.wait_for(ws.recv(), seconds)
    except asyncio.TimeoutError:
        return True
    return False


async def refused_status(url: str, **kw) -> int:
    try:
        async with websockets.connect(url, open_timeout=TIMEOUT, **kw):
            return 101
    except websockets.InvalidStatus as exc:
        return exc.response.status_code


# ---------------------------------------------------------------- the checks: README.md


def check_api(blk: Block, h: Harness):
    """README's API example as ``python app.py``: /hello over HTTP, the
    token check (403), the subprotocol, on_open's greeting, the echo, the
    Origin policy, the fallback route's 1008, and on_disconnect's print."""
    port = free_port()
    assert "port=8000" in blk.text
    h.write("app.py", blk.text.replace("port=8000", f"port={port}"))
    with h:
        proc = h.start([sys.executable, "app.py"], port)
        base = f"ws://{HOST}:{port}"
        assert http(f"http://{HOST}:{port}/hello") == (200, b"hello")

        async def clients():
            async with websockets.connect(f"{base}/chat?token=secret", subprotocols=["chat.v1"]) as ws:
                assert ws.subprotocol == "chat.v1"
                assert await recv(ws) == "welcome"
                await ws.send("hi")
                assert await recv(ws) == "hi"
                await ws.send(b"\x00\x01")
                assert await recv(ws) == b"\x00\x01"
            assert await refused_status(f"{base}/chat") == 403
            assert await refused_status(f"{base}/chat?token=secret", origin="https://evil.example") == 403
            assert await refused_status(f"{base}/chat?token=secret", origin="https://app.example.com") == 101
            async with websockets.connect(f"{base}/elsewhere") as ws:
                await ws.send("x")
                with pytest.raises(websockets.ConnectionClosed):
                    await recv(ws)
                assert (ws.close_code, ws.close_reason) == (1008, "no such room")

        run(clients())
        time.sleep(0.3)
        assert proc.stop() == 0, proc.log()
        assert re.search(r" 1000 ?$", proc.log(), re.M), proc.log()


def _rooms_app(h: Harness) -> None:
    h.write("app.py", blocks("README.md")[[b.arg for b in blocks("README.md")].index("rooms")].text)


def check_rooms(blk: Block, h: Harness):
    """README's rooms example (as app.py under ``fastws serve``): "join
    lobby" joins; another message goes to every other member, not back to
    the sender, not to a connection outside the room."""
    h.write("app.py", blk.text)
    port = free_port()
    with h:
        h.start([sys.executable, "-m", "fastws", "serve", "app:app", "--port", str(port)], port)
        url = f"ws://{HOST}:{port}/chat"

        async def clients():
            async with websockets.connect(url) as a, websockets.connect(url) as b, websockets.connect(url) as c:
                await a.send("join lobby")
                await b.send("join lobby")
                await asyncio.sleep(0.2)
                await a.send("hello")
                assert await recv(b) == "hello"
                assert await nothing_within(a, 0.5) and await nothing_within(c, 0.1)

        run(clients())


def _nginx() -> str:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.path.exists(nginx):
        pytest.fail("nginx is not installed (apt-get install nginx; bash .ci/run does)", pytrace=False)
    return nginx


NGINX_WRAP = """worker_processes 1;
error_log {tmp}/error.log warn;
pid {tmp}/nginx.pid;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body; proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fcgi; uwsgi_temp_path {tmp}/uwsgi; scgi_temp_path {tmp}/scgi;
{block}
}}
"""


def _nginx_front(h: Harness, text: str, listen: str, tls: bool) -> tuple[int, list[int]]:
    """Two echo nodes and nginx with ``text`` (ports and paths rewritten)."""
    h.write("app.py", ECHO_APP)
    nodes = [free_port(), free_port()]
    for port in nodes:
        h.start([sys.executable, "-m", "fastws", "serve", "app:app", "--port", str(port)], port)
    front = free_port()
    assert listen in text, listen
    text = text.replace(listen, f"listen {HOST}:{front}{' ssl' if tls else ''};")
    assert "127.0.0.1:8001" in text and "127.0.0.1:8002" in text
    text = text.replace("127.0.0.1:8001", f"127.0.0.1:{nodes[0]}").replace("127.0.0.1:8002", f"127.0.0.1:{nodes[1]}")
    if tls:
        cert, key = h.cert()
        text = re.sub(r"ssl_certificate\s+\S+;", f"ssl_certificate {cert};", text)
        text = re.sub(r"ssl_certificate_key\s+\S+;", f"ssl_certificate_key {key};", text)
    conf = h.write("nginx.conf", NGINX_WRAP.format(tmp=h.tmp, block=text))
    h.start([_nginx(), "-c", str(conf), "-g", "daemon off;"], front)
    return front, nodes


def _through_proxy(front: int, nodes: list[int], scheme: str, context=None):
    """Echo over 4 WebSockets at once through the proxy, both nodes used,
    /health answered through it (keep-alive for plain requests)."""

    async def clients():
        conns = [await websockets.connect(f"{scheme}://{HOST}:{front}/", ssl=context, open_timeout=TIMEOUT)
                 for _ in range(4)]
        try:
            for i, ws in enumerate(conns):
                await ws.send(f"m{i}")
                assert await recv(ws) == f"m{i}"
            counts = [json.loads(http(f"http://{HOST}:{p}/health")[1])["connections"] for p in nodes]
            assert all(n >= 1 for n in counts), counts      # least_conn: both nodes serve
        finally:
            for ws in conns:
                await ws.close()

    run(clients())
    status, body = http(f"{'https' if context else 'http'}://{HOST}:{front}/health", context=context)
    assert status == 200 and json.loads(body)["status"] == "healthy", body


def check_nginx(blk: Block, h: Harness):
    """README's nginx block in front of two nodes: upgrades pass, echo
    works, both nodes get connections, plain requests are answered."""
    with h:
        front, nodes = _nginx_front(h, blk.text, "listen 80;", tls=False)
        _through_proxy(front, nodes, "ws")


def _two_nodes(h: Harness, blk: Block) -> list[int]:
    """README's two ``fastws serve ... --broker redis://...`` nodes on the
    README's rooms app; their ports."""
    redis_up()
    _rooms_app(h)
    ports = []
    for cmd in commands(blk.text):
        port = free_port()
        h.start(with_prefix(serve_args(cmd, port, h.env), h.prefix), port)
        ports.append(port)
    assert len(ports) == 2, ports
    return ports


async def _member(port: int, room: str = "lobby"):
    ws = await websockets.connect(f"ws://{HOST}:{port}/chat", open_timeout=TIMEOUT)
    await ws.send(f"join {room}")
    return ws


def check_two_nodes(blk: Block, h: Harness):
    """Two nodes on one Redis: a room message published on one reaches a
    member on the other."""
    with h:
        p1, p2 = _two_nodes(h, blk)

        async def clients():
            a, b = await _member(p1), await _member(p2)
            await asyncio.sleep(0.5)                # the subscriptions reach Redis
            await a.send("hello from node 1")
            assert await recv(b) == "hello from node 1"
            await a.close()
            await b.close()

        run(clients())


def check_publish_api(blk: Block, h: Harness):
    """The two curl commands against the two nodes of the block above: the
    publish answers ``{"seq": ..., "remote": true}`` and a member on the other
    node gets the text; an unknown connection id answers 404."""
    curls = commands(blk.text)
    assert len(curls) == 2, curls
    with h:
        p1, p2 = _two_nodes(h, h.sibling("two-nodes"))

        async def clients():
            b = await _member(p2)
            await asyncio.sleep(0.5)
            r = h.sh(curls[0].replace("http://node:8001", f"http://{HOST}:{p1}"))
            assert r.returncode == 0, r.stderr
            reply = json.loads(r.stdout)
            assert isinstance(reply["seq"], int) and reply["remote"] is True, reply
            assert await recv(b) == "deploy finished"
            await b.close()

        run(clients())
        second = curls[1].replace("http://node:8001", f"http://{HOST}:{p1}")
        r = h.sh(second + " -w '\\n%{http_code}'")
        body, _, status = r.stdout.rpartition("\n")
        assert status == "404" and "error" in json.loads(body), r.stdout


PREAMBLE = "import json\n\nimport fastws\n\napp = fastws.App()\n\n"


def _streams_node(h: Harness, text: str) -> int:
    redis_up()
    h.write("app.py", PREAMBLE + text)
    port = free_port()
    h.start([sys.executable, "-m", "fastws", "serve", "app:app", "--port", str(port), "--broker",
             "redis+streams://127.0.0.1:6379/0", "--broker-prefix", h.prefix, "--publish-token", h.env["TOKEN"]],
            port)
    return port


def check_history(blk: Block, h: Harness):
    """README's history example: after three publishes to "lobby", "join
    lobby" gets them back, oldest first."""
    with h:
        port = _streams_node(h, blk.text)
        for text in ("one", "two", "three"):
            status, body = http(f"http://{HOST}:{port}/publish", json.dumps({"room": "lobby", "text": text}).encode(),
                                {"Authorization": f"Bearer {h.env['TOKEN']}"})
            assert status == 200, body

        async def client():
            async with websockets.connect(f"ws://{HOST}:{port}/chat") as ws:
                await ws.send("join lobby")
                assert [await recv(ws) for _ in range(3)] == ["one", "two", "three"]

        run(client())


def check_resume(blk: Block, h: Harness):
    """README's resume example: a member gets messages as the documented
    JSON frames; after a reconnect with the last id it saw it gets what it
    missed, then ``{"type": "joined", "complete": true}``."""
    shape = set(json.loads([b for b in blocks("README.md") if b.lang == "json"][0].text))
    with h:
        port = _streams_node(h, blk.text)
        url = f"ws://{HOST}:{port}/chat"

        async def clients():
            async with websockets.connect(url) as a:
                await a.send(json.dumps({"type": "join", "room": "lobby", "last_id": None}))
                assert json.loads(await recv(a)) == {"type": "joined", "complete": True}
                await a.send(json.dumps({"type": "say", "room": "lobby", "text": "one"}))
                first = json.loads(await recv(a))
                assert set(first) == shape and first["data"] == "one", first
            async with websockets.connect(url) as b:
                await b.send(json.dumps({"type": "join", "room": "lobby", "last_id": None}))
                assert json.loads(await recv(b))["type"] == "joined"
                for text in ("two", "three"):
                    await b.send(json.dumps({"type": "say", "room": "lobby", "text": text}))
                    assert json.loads(await recv(b))["data"] == text
            async with websockets.connect(url) as a:
                await a.send(json.dumps({"type": "join", "room": "lobby", "last_id": first["id"]}))
                got = [json.loads(await recv(a)) for _ in range(3)]
                assert [m.get("data") for m in got[:2]] == ["two", "three"], got
                assert got[2] == {"type": "joined", "complete": True}, got

        run(clients())


def check_cli_commands(blk: Block, h: Harness):
    """Every command of README's CLI summary exists (``--help`` answers), and
    ``fastws --version`` prints the version, the commit and the engine."""
    for line in blk.text.splitlines():
        words = line.split("  ")[0].split()
        if not words:
            continue
        sub = [w for w in words[1:] if not w.startswith(("[", "MODULE")) and w.isidentifier() or w == "--version"]
        if sub == ["--version"]:
            r = h.sh(f"{sys.executable} -m fastws --version")
            assert r.returncode == 0 and re.match(r"fastws \S+ \(commit \S+.*engine (cython|wsproto)\)", r.stdout), r
            continue
        r = h.sh(shlex.join([sys.executable, "-m", "fastws", *sub, "--help"]))
        assert r.returncode == 0, (line, r.stderr)


def check_serve_options(blk: Block, h: Harness):
    """Every option README lists is an option of ``fastws serve``."""
    r = h.sh(f"{sys.executable} -m fastws serve --help")
    assert r.returncode == 0, r.stderr
    listed = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", blk.text))
    known = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", r.stdout))
    assert listed and not listed - known, sorted(listed - known)


def check_auth(blk: Block, h: Harness):
    """README's authentication example (chat.py, the block above it) served
    as the command says: no token is 401; with a token of the right secret
    and audience, "lobby" and the user's own dm room are joined and another
    user's dm room is refused."""
    import jwt

    (cmd,) = commands(blk.text)
    port = free_port()
    with h:
        h.start(serve_args(cmd, port, h.env), port)
        secret = h.env["JWT_SECRET"]
        token = jwt.encode({"sub": "alice", "aud": "chat", "exp": int(time.time()) + 600}, secret, algorithm="HS256")
        wrong = jwt.encode({"sub": "alice", "aud": "chat", "exp": int(time.time()) + 600},
                           "another-secret-that-is-long-enough-for-hs256", algorithm="HS256")

        async def clients():
            assert await refused_status(f"ws://{HOST}:{port}/chat") == 401
            assert await refused_status(f"ws://{HOST}:{port}/chat?token={wrong}") == 401
            async with websockets.connect(f"ws://{HOST}:{port}/chat?token={token}") as ws:
                for room, answer in (("lobby", "joined lobby"), ("dm-alice", "joined dm-alice"),
                                     ("dm-bob", "not allowed: dm-bob")):
                    await ws.send(room)
                    assert await recv(ws) == answer

        run(clients())


# ---------------------------------------------------------------- the checks: docs/deployment.md


def _same(line: str) -> str:
    return " ".join(line.split())


def check_console(blk: Block, h: Harness):
    """A console transcript: each ``$ command`` runs in a directory with the
    doc's files (and an echo ``app.py``); its output must be the lines shown
    (``...`` stands for any lines), and a transcript that shows an error
    line must end with exit code 2."""
    h.write("app.py", ECHO_APP)
    steps = []
    for line in blk.text.splitlines():
        if line.startswith("$ "):
            steps.append((line[2:], []))
        else:
            steps[-1][1].append(line)
    with h:
        for cmd, expected in steps:
            r = h.sh(cmd.replace("fastws ", f"{sys.executable} -m fastws ", 1), timeout=30)
            got = (r.stdout + r.stderr).splitlines()
            pos = 0
            for want in expected:
                if want.strip() == "...":
                    pos = None
                    continue
                if pos is None:
                    matches = [i for i, g in enumerate(got) if _same(g) == _same(want)]
                    assert matches, (cmd, want, got)
                    pos = matches[0] + 1
                else:
                    assert pos < len(got) and _same(got[pos]) == _same(want), (cmd, want, got[pos:pos + 3])
                    pos += 1
            if pos is not None:
                assert pos == len(got), (cmd, "more output than shown", got[pos:])
            if any(w.startswith("fastws: ") for w in expected):
                assert r.returncode == 2, (cmd, r.returncode)
            else:
                assert r.returncode == 0, (cmd, r.stderr)


def check_tls(blk: Block, h: Harness):
    """``--ssl-certfile/--ssl-keyfile``: wss:// with a verified certificate;
    /health and /livez (the probes) answer over https."""
    h.write("app.py", ECHO_APP)
    cert, key = h.cert()
    (cmd,) = commands(blk.text)
    port = free_port()
    argv = serve_args(cmd.replace("/etc/fastws/fullchain.pem", str(cert)).replace("/etc/fastws/privkey.pem", str(key)),
                      port, h.env)
    ctx = ssl.create_default_context(cafile=str(cert))
    with h:
        h.start(argv, port)

        async def client():
            async with websockets.connect(f"wss://{HOST}:{port}/", ssl=ctx) as ws:
                await ws.send("over tls")
                assert await recv(ws) == "over tls"

        run(client())
        for path in ("/health", "/livez"):
            status, _ = http(f"https://{HOST}:{port}{path}", context=ctx)
            assert status == 200, path


def check_nginx_tls(blk: Block, h: Harness):
    """docs/deployment.md's nginx server block (TLS, least_conn, the map):
    wss:// echo through it, both nodes used, /health through it, and
    /metrics allowed from 127.0.0.1."""
    ctx = ssl.create_default_context(cafile=str(h.cert()[0]))
    with h:
        front, nodes = _nginx_front(h, blk.text, "listen 443 ssl;", tls=True)
        _through_proxy(front, nodes, "wss", ctx)
        status, body = http(f"https://{HOST}:{front}/metrics", context=ctx)
        assert status == 200 and b"websocket_connections_total" in body


def check_metric_names(blk: Block, h: Harness):
    """Every metric the alerts use is in a server's /metrics."""
    h.write("app.py", ECHO_APP)
    port = free_port()
    with h:
        h.start([sys.executable, "-m", "fastws", "serve", "app:app", "--port", str(port)], port)
        status, body = http(f"http://{HOST}:{port}/metrics")
        assert status == 200
        exposed = set(re.findall(r"^# TYPE (\w+)", body.decode(), re.M))
        used = set(re.findall(r"\b(websocket_\w+)", blk.text))
        assert used and not used - exposed, sorted(used - exposed)


# ---------------------------------------------------------------- the checks: docs/asgi.md


def _starlette_checks(port: int) -> None:
    status, body = http(f"http://{HOST}:{port}/")
    assert status == 200 and body, body

    async def client():
        async with websockets.connect(f"ws://{HOST}:{port}/ws/echo") as ws:
            await ws.send("asgi")
            assert await recv(ws) == "asgi"

    run(client())


def check_asgi_serve(blk: Block, h: Harness):
    """``fastws serve examples.starlette_app:app``: HTTP and a WebSocket echo."""
    (cmd,) = commands(blk.text)
    port = free_port()
    with h:
        h.start(serve_args(cmd, port, h.env), port)
        _starlette_checks(port)


def check_asgi_python(blk: Block, h: Harness):
    """``fastws.run(app, port=...)`` on the Starlette example, as a script;
    SIGTERM stops it with exit 0."""
    port = free_port()
    assert "port=8000" in blk.text
    h.write("serve_it.py", blk.text.replace("port=8000", f"port={port}"))
    with h:
        proc = h.start([sys.executable, "serve_it.py"], port)
        _starlette_checks(port)
        assert proc.stop() == 0, proc.log()


def check_asgi_rooms(blk: Block, h: Harness):
    """The FastAPI chat on rooms: with a Redis broker, and with --workers 4
    (the embedded broker): a message reaches every member of the room, on
    every worker."""
    cmds = commands(blk.text)
    assert len(cmds) == 2
    redis_up()
    for cmd, members in ((cmds[0], 2), (cmds[1], 8)):
        port = free_port()
        with h:
            proc = h.start(with_prefix(serve_args(cmd, port, h.env), h.prefix), port)
            room = "lobby" + uuid.uuid4().hex[:6]

            async def clients():    # run within this iteration (B023 does not apply)
                conns = [await websockets.connect(f"ws://{HOST}:{port}/rooms/{room}/ws/{i}",  # noqa: B023
                                                  open_timeout=TIMEOUT)
                         for i in range(members)]  # noqa: B023
                await asyncio.sleep(1.0)             # joins reach the broker on every worker
                await conns[0].send("hi")
                assert await recv(conns[0]) == "You wrote: hi"
                for ws in conns:
                    assert await recv(ws) == "Client #0 says: hi"
                for ws in conns:
                    await ws.close()

            run(clients())
            assert proc.stop() == 0, proc.log()
        h.procs.clear()


CHECKS = {
    "api": check_api,
    "rooms": check_rooms,
    "auth": check_auth,
    "nginx": check_nginx,
    "two-nodes": check_two_nodes,
    "publish-api": check_publish_api,
    "history": check_history,
    "resume": check_resume,
    "cli-commands": check_cli_commands,
    "serve-options": check_serve_options,
    "console": check_console,
    "tls": check_tls,
    "nginx-tls": check_nginx_tls,
    "metric-names": check_metric_names,
    "asgi-serve": check_asgi_serve,
    "asgi-python": check_asgi_python,
    "asgi-rooms": check_asgi_rooms,
}
