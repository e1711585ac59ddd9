"""The benchmark runner: fastws and its peers, side by side, same load generator.

``fastws bench``, ``python -m fastws.bench`` and (in the repo) ``python -m
bench`` all end here. For each scenario, for each repeat, the servers are
measured one after another in an order that rotates with the repeat, so slow
drifts of the machine spread over all of them. Each measurement is one run of
``python -m fastws.bench.loadgen SCENARIO ...`` (a separate process) that
prints one JSON line. The runner keeps every line, reports the median and
min/max per server, each peer's ratio to fastws, and writes a JSON results
file, a markdown table and PNG bar charts.

``--quick`` is the smoke mode for the test suite: tiny sizes, one repeat, and
it fails when any run was not correct (every message echoed, every subscriber
got every broadcast, every connection upgraded); timings are never asserted.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
import importlib.metadata
import importlib.util
import ipaddress
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

import click

from fastws import core
from fastws.bench import clients as client_bench
from fastws.bench import gateway as gateway_bench
from fastws.bench.loadgen import proc_cpu_ticks  # /proc helpers only
from fastws.version import build_info

PEERS_DIR = Path(__file__).resolve().parent / "peers"
HOST = "127.0.0.1"


# ------------------------------------------------------------------ servers


@dataclass
class ServerSpec:
    name: str
    label: str
    argv: callable  # (port) -> list[str]
    raw: bool = False  # echoes raw bytes (the ceiling), cannot relay
    env: dict = field(default_factory=dict)
    cwd: str | None = None
    skip: str | None = None  # reason it cannot run here
    asgi: bool = False  # serves fastws.bench.peers.asgi_apps (the asgi-* scenarios), nothing else
    key: str | None = None  # key among the running servers (default: name; fastws has several setups)
    paths: dict = field(default_factory=dict)  # scenario name -> --path for the load generator
    # which scenarios it serves: "ws" (the relay), "asgi", "crossnode", "sio" (the Socket.IO relay, one
    # process), "sio-crossnode" (the Socket.IO relay on 2 nodes); several separated by "|"
    suite: str = ""
    # crossnode suite: processes started together (node A, node B); argv is then
    # (port, channel) -> list, channel being a fresh Redis channel/prefix per start
    nodes: int = 0
    workers: int = 0  # the process runs fastws --workers N: wait until all N serve
    loadgen_args: list = field(default_factory=list)  # extra load generator arguments

    def __post_init__(self) -> None:
        if self.key is None:
            self.key = self.name
        if not self.suite:
            self.suite = "asgi" if self.asgi else "ws"


def _py(module: str, *extra: str):
    return lambda port: [sys.executable, "-m", module, "--host", HOST, "--port", str(port), *extra]


def _node_env(*modules: str) -> tuple[str | None, dict]:
    """Find node and the npm ``modules`` (default: ws): NODE_PATH, ./node_modules,
    fastws/bench/peers/node_modules (``npm ci`` there), npm root -g."""
    modules = modules or ("ws",)
    node = shutil.which("node")
    if not node:
        return "node is not installed", {}
    paths = [p for p in os.environ.get("NODE_PATH", "").split(os.pathsep) if p]
    paths += [str(Path.cwd() / "node_modules"), str(PEERS_DIR / "node_modules")]
    npm = shutil.which("npm")
    if npm:
        try:
            out = subprocess.run([npm, "root", "-g"], capture_output=True, text=True, timeout=20)
            if out.returncode == 0 and out.stdout.strip():
                paths.append(out.stdout.strip())
        except (OSError, subprocess.TimeoutExpired):
            pass
    env = {"NODE_PATH": os.pathsep.join(paths)}
    for module in modules:
        try:
            r = subprocess.run(
                [node, "-e", f"require.resolve({module!r})"], env={**os.environ, **env},
                capture_output=True, timeout=20,
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"node failed: {e}", {}
        if r.returncode != 0:
            return (f"the npm module '{module}' is not found (npm ci in {PEERS_DIR}, npm install {module}, "
                    "or set NODE_PATH)"), {}
    return None, env


def _relay_app() -> tuple[str, str | None]:
    """(app, cwd): examples.relay:app in the repo, else the shipped copy of the relay."""
    if Path("examples/relay.py").is_file():
        return "examples.relay:app", str(Path.cwd())
    return "fastws.bench.peers.fastws_relay:app", None


def _fastws_spec() -> ServerSpec:
    """fastws serve examples.relay:app (repo) or the shipped copy of the relay."""
    app, cwd = _relay_app()
    argv = lambda port: [  # noqa: E731
        sys.executable, "-m", "fastws.cli.main", "serve", app, "--host", HOST, "--port", str(port),
        "--max-message-size", str(16 * 1024 * 1024), "--log-level", "warning",
    ]
    skip = None
    try:
        r = subprocess.run(
            [sys.executable, "-m", "fastws.cli.main", "serve", "--help"],
            capture_output=True, text=True, timeout=30, cwd=cwd,
        )
        if r.returncode != 0:
            skip = (f"`{Path(sys.executable).name} -m fastws.cli.main serve` does not start in "
                    f"{cwd or os.getcwd()}: " + (r.stderr.strip().splitlines() or ["?"])[-1]
                    + " (install with `pip install -e .` in the repository, or run from another directory)")
    except (OSError, subprocess.TimeoutExpired) as e:
        skip = f"`fastws serve` did not answer: {e}"
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [cwd, os.environ.get("PYTHONPATH")]))} if cwd else {}
    return ServerSpec("fastws", f"fastws ({app})", argv, env=env, cwd=cwd, skip=skip)


def _missing(*modules: str) -> str | None:
    gone = [m for m in modules if importlib.util.find_spec(m) is None]
    if not gone:
        return None
    if set(gone) <= {"hypercorn", "granian", "httptools"}:
        return f"not installed: {', '.join(gone)} (pip install {' '.join(gone)})"
    return f"not installed: {', '.join(gone)} (pip install \"fastws[bench]\")"


ASGI_APP = "fastws.bench.peers.asgi_apps:app"
ASGI_ROOMS_PATH = "/rooms/bench"  # fastws: the asgi_rooms route (encode-once fan-out by the server)
ASGI_MANAGER_PATH = "/manager/bench"  # every other ASGI server: FastAPI's ConnectionManager route


def _fastws_asgi_spec() -> ServerSpec:
    """fastws serve fastws.bench.peers.asgi_apps:app (the Starlette app, ASGI interface)."""
    base = _fastws_spec()
    argv = lambda port: [  # noqa: E731
        sys.executable, "-m", "fastws.cli.main", "serve", ASGI_APP, "--interface", "asgi",
        "--host", HOST, "--port", str(port), "--max-message-size", str(16 * 1024 * 1024),
        "--ping-interval", "0", "--log-level", "warning",
    ]
    return ServerSpec("fastws", f"fastws ({ASGI_APP}, rooms route)", argv, skip=base.skip or _missing("starlette"),
                      asgi=True, key="fastws-asgi", paths={"asgi-broadcast": ASGI_ROOMS_PATH})


def _asgi_peer_spec(name: str) -> ServerSpec:
    if name.startswith("uvicorn-"):
        ws = name.split("-")[1]
        argv = lambda port: [sys.executable, "-m", "fastws.bench.peers.asgi_apps",  # noqa: E731
                             "--host", HOST, "--port", str(port), "--ws", ws]
        label = f"uvicorn --ws {ws} --loop uvloop --http httptools"
    elif name == "hypercorn-asgi":
        argv = lambda port: [sys.executable, "-m", "hypercorn", "-k", "uvloop", "-w", "1",  # noqa: E731
                             "-b", f"{HOST}:{port}", "--backlog", "4096", "--log-level", "warning", ASGI_APP]
        label = "hypercorn -k uvloop -w 1"
    else:
        argv = lambda port: [sys.executable, "-m", "granian", "--interface", "asgi", "--loop", "uvloop",  # noqa: E731
                             "--workers", "1", "--host", HOST, "--port", str(port), "--backlog", "4096",
                             "--no-access-log", "--log-level", "warning", ASGI_APP]
        label = "granian --interface asgi --loop uvloop --workers 1"
    return ServerSpec(name, label + " (ConnectionManager route)", argv, asgi=True,
                      paths={"asgi-broadcast": ASGI_MANAGER_PATH})


#: the crossnode scenarios' broker (loopback only): ``fastws bench --redis-url``
REDIS_URL = "redis://127.0.0.1:6379/0"


def redis_url_option(url: str) -> str:
    """``url`` if it is a redis:// URL of a loopback host (the benchmark sends
    its load to 127.0.0.0/8 only); click.BadParameter otherwise."""
    u = urlsplit(url)
    host = (u.hostname or "").lower()
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if u.scheme != "redis" or not loopback:
        raise click.BadParameter(f"{url!r}: a redis://HOST:PORT/DB URL of a loopback host "
                                 "(127.0.0.0/8, ::1, localhost)")
    try:
        _ = u.port   # parsed on access
    except ValueError:
        raise click.BadParameter(f"{url!r}: the port is not a number") from None
    return url


def _redis_command(*words: str, timeout: float = 2.0) -> bytes:
    """One inline command to the Redis at REDIS_URL; its raw reply (OSError if unreachable)."""
    u = urlsplit(REDIS_URL)
    with socket.create_connection((u.hostname or HOST, u.port or 6379), timeout=timeout) as sock:
        if u.password is not None:
            sock.sendall(" ".join(["AUTH", *([unquote(u.username)] if u.username else []),
                                   unquote(u.password)]).encode() + b"\r\n")
            if not sock.recv(65536).startswith(b"+OK"):
                raise OSError("AUTH refused")
        sock.sendall(" ".join(words).encode() + b"\r\n")
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
            if reply.startswith(b"$"):  # bulk string: $<length>\r\n<data>\r\n
                head, sep, rest = reply.partition(b"\r\n")
                if sep and len(rest) >= int(head[1:]) + 2:
                    break
            elif reply.endswith(b"\r\n"):
                break
        return reply


def _redis_skip() -> str | None:
    if importlib.util.find_spec("redis") is None:
        return 'not installed: redis (pip install "fastws[bench]")'
    try:
        reply = _redis_command("PING")
    except OSError as e:
        return f"Redis is not reachable at {REDIS_URL} ({e}): start redis-server"
    if not reply.startswith(b"+PONG"):
        return f"Redis at {REDIS_URL} did not answer PING: {reply[:60]!r}"
    return None


def _redis_version() -> str | None:
    try:
        for line in _redis_command("INFO", "server").decode(errors="replace").splitlines():
            if line.startswith("redis_version:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


CROSSNODE = ["fastws-redis", "fastws-embedded", "socketio-redis"]


def _crossnode_spec(name: str) -> ServerSpec:
    """The crossnode suite: the relay on 2 nodes through Redis, or on --workers 2 (embedded broker)."""
    if name == "socketio-redis":
        argv = lambda port, channel: [  # noqa: E731
            sys.executable, "-m", "fastws.bench.peers.socketio_relay", "--host", HOST, "--port", str(port),
            "--redis", REDIS_URL, "--channel", channel, "--ping-interval", "300", "--ping-timeout", "300"]
        return ServerSpec(name, f"python-socketio AsyncServer (aiohttp) + AsyncRedisManager({REDIS_URL}) x 2 nodes, "
                          "pings every 300 s",
                          argv, skip=_missing("socketio", "engineio", "aiohttp", "uvloop") or _redis_skip(),
                          suite="crossnode|sio-crossnode", nodes=2, loadgen_args=["--protocol", "sio"])
    base = _fastws_spec()
    app = _relay_app()[0]
    if name == "fastws-redis":
        argv = lambda port, channel: [*base.argv(port), "--broker", REDIS_URL, "--broker-prefix", channel]  # noqa: E731
        return ServerSpec("fastws", f"fastws ({app}) x 2 nodes, --broker {REDIS_URL}", argv, env=base.env,
                          cwd=base.cwd, skip=base.skip or _redis_skip(), suite="crossnode", key=name, nodes=2)
    argv = lambda port, channel: [*base.argv(port), "--workers", "2"]  # noqa: E731
    return ServerSpec(name, f"fastws ({app}) --workers 2, embedded broker (no Redis)", argv, env=base.env,
                      cwd=base.cwd, skip=base.skip, suite="crossnode", nodes=1, workers=2,
                      loadgen_args=["--metrics"])


SIO = ["socketio", "node-socketio"]
SIO_CROSSNODE = ["fastws-sio-redis", "node-socketio-redis"]  # and socketio-redis (also in CROSSNODE)
SIO_APP = "fastws.bench.peers.sio_fastws:app"


def _sio_spec(name: str) -> ServerSpec:
    """The Socket.IO relay (every client in room ``relay``; ``msg`` to the room,
    ``echo`` answered through its ack) on fastws.socketio, python-socketio and
    Node's socket.io: one process each ("sio"), or 2 nodes sharing rooms
    through Redis ("sio-crossnode")."""
    limits = ["--host", HOST, "--max-message-size", str(16 * 1024 * 1024), "--log-level", "warning"]
    serve = [sys.executable, "-m", "fastws.cli.main", "serve", SIO_APP, *limits]
    skip = _fastws_spec().skip
    proto = ["--protocol", "sio"]
    js = str(PEERS_DIR / "socketio_relay.js")
    if name == "fastws-sio":
        return ServerSpec("fastws", f"fastws ({SIO_APP}, fastws.socketio)",
                          lambda port: [*serve, "--port", str(port)], skip=skip, key=name, suite="sio",
                          loadgen_args=proto)
    if name == "fastws-sio-redis":
        argv = lambda port, channel: [*serve, "--port", str(port), "--broker", REDIS_URL,  # noqa: E731
                                      "--broker-prefix", channel]
        return ServerSpec("fastws", f"fastws ({SIO_APP}) x 2 nodes, --broker {REDIS_URL}", argv,
                          skip=skip or _redis_skip(), key=name, suite="sio-crossnode", nodes=2, loadgen_args=proto)
    if name == "socketio":
        # Engine.IO pings every 300 s, as the fastws and Node relays: with the defaults (25 s, 20 s to
        # answer) python-socketio closes members of a room of 10,000 whose pong waits behind its own
        # backlog of deliveries, and the run fails
        argv = lambda port: [sys.executable, "-m", "fastws.bench.peers.socketio_relay", "--host", HOST,  # noqa: E731
                             "--port", str(port), "--redis", "none", "--server", "uvicorn",
                             "--ping-interval", "300", "--ping-timeout", "300"]
        return ServerSpec(name, "python-socketio AsyncServer on uvicorn (websockets, uvloop, httptools), "
                          "pings every 300 s", argv,
                          skip=_missing("socketio", "engineio", "uvicorn", "websockets", "uvloop", "httptools"),
                          suite="sio", loadgen_args=proto)
    if name == "node-socketio":
        skip, env = _node_env("socket.io")
        return ServerSpec(name, "Node socket.io", lambda port: ["node", js, str(port), HOST], env=env, skip=skip,
                          suite="sio", loadgen_args=proto)
    skip, env = _node_env("socket.io", "@socket.io/redis-adapter", "redis")
    argv = lambda port, channel: ["node", js, str(port), HOST, REDIS_URL, channel]  # noqa: E731
    return ServerSpec(name, f"Node socket.io + @socket.io/redis-adapter({REDIS_URL}) x 2 nodes", argv, env=env,
                      skip=skip or _redis_skip(), suite="sio-crossnode", nodes=2, loadgen_args=proto)


DEFLATE = ["websockets-deflate", "aiohttp-deflate", "uvicorn-websockets-deflate", "node-ws-deflate",
           "socketify-deflate", "socketify-dedicated-deflate"]


def _deflate_spec(name: str) -> ServerSpec:
    """The relay with permessage-deflate on (the "deflate" suite): fastws
    --compression (its default: server_no_context_takeover, one compressor
    per process, a broadcast compressed once) and each peer that has the
    extension, with its own defaults; picows has no permessage-deflate."""
    if name == "fastws-deflate":
        base = _fastws_spec()
        return ServerSpec("fastws", base.label + " --compression", lambda port: [*base.argv(port), "--compression"],
                          env=base.env, cwd=base.cwd, skip=base.skip, key=name, suite="deflate")
    if name == "node-ws-deflate":
        skip, env = _node_env()
        js = str(PEERS_DIR / "ws_relay.js")
        return ServerSpec(name, "Node ws, perMessageDeflate: true (context takeover)",
                          lambda port: ["node", js, str(port), HOST, "deflate"], env=env, skip=skip, suite="deflate")
    if name.startswith("socketify-"):
        mode = "dedicated" if "dedicated" in name else "shared"
        skip = None if importlib.util.find_spec("socketify") else "socketify is not installed (pip install socketify)"
        what = ("SHARED_COMPRESSOR (one per server, no context takeover)" if mode == "shared"
                else "DEDICATED_COMPRESSOR (one per connection, context takeover)")
        return ServerSpec(name, f"socketify (uWebSockets), {what}",
                          _py("fastws.bench.peers.socketify_relay", "--compression", mode), skip=skip, suite="deflate")
    peers = {
        "websockets-deflate": ("websockets (broadcast), compression=\"deflate\"", "websockets_relay", (),
                               ("websockets",)),
        "aiohttp-deflate": ("aiohttp, compress=True", "aiohttp_relay", (), ("aiohttp",)),
        "uvicorn-websockets-deflate": ("uvicorn+starlette, websockets, ws_per_message_deflate=True", "starlette_relay",
                                       ("--ws", "websockets"), ("uvicorn", "starlette", "websockets")),
    }
    label, module, extra, needs = peers[name]
    return ServerSpec(name, label, _py(f"fastws.bench.peers.{module}", *extra, "--compression"),
                      skip=_missing(*needs), suite="deflate")


TLS = ["raw-tls", "websockets-tls", "aiohttp-tls", "picows-tls", "uvicorn-websockets-tls", "node-ws-tls",
       "socketify-tls"]
#: the run's self-signed certificate (cert.pem, key.pem), made by :func:`run` when a tls-* scenario is chosen
TLS_DIR: Path | None = None
TLS_SKIP: str | None = None  # why no certificate could be made (every TLS server is then skipped)


def make_cert(directory: Path) -> str | None:
    """A self-signed ECDSA P-256 certificate for 127.0.0.1 and localhost,
    valid 2 days: ``directory/cert.pem`` and ``directory/key.pem`` (openssl's
    command line; the key never leaves the temp directory). None, or why not."""
    openssl = shutil.which("openssl")
    if not openssl:
        return "the openssl command is not installed (it makes the run's self-signed certificate)"
    try:
        r = subprocess.run(
            [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", str(directory / "key.pem"), "-out", str(directory / "cert.pem"), "-days", "2",
             "-subj", f"/CN={HOST}", "-addext", f"subjectAltName=IP:{HOST},DNS:localhost"],
            capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"openssl failed: {e}"
    if r.returncode != 0:
        return "openssl req failed: " + (r.stderr.strip().splitlines() or ["?"])[-1]
    return None


def _tls_spec(name: str) -> ServerSpec:
    """The relay serving TLS (``wss://``, the "tls" suite) with the run's
    self-signed certificate: fastws --ssl-certfile/--ssl-keyfile and each
    peer through its own TLS option (Python's ssl module on uvloop for the
    asyncio servers, uWebSockets' and Node's OpenSSL layers for socketify and
    Node), TLS 1.3 as negotiated with the load generator's defaults."""
    cert = str(TLS_DIR / "cert.pem") if TLS_DIR else ""
    key = str(TLS_DIR / "key.pem") if TLS_DIR else ""
    files = ["--certfile", cert, "--keyfile", key]
    skip = TLS_SKIP or (None if TLS_DIR else "no certificate (the run makes one when a tls-* scenario is chosen)")
    if name == "fastws-tls":
        base = _fastws_spec()
        return ServerSpec("fastws", base.label + " --ssl-certfile/--ssl-keyfile",
                          lambda port: [*base.argv(port), "--ssl-certfile", cert, "--ssl-keyfile", key],
                          env=base.env, cwd=base.cwd, skip=skip or base.skip, key=name, suite="tls")
    if name == "node-ws-tls":
        nskip, env = _node_env()
        js = str(PEERS_DIR / "ws_relay.js")
        return ServerSpec(name, "Node ws on https.Server",
                          lambda port: ["node", js, str(port), HOST, "plain", cert, key], env=env,
                          skip=skip or nskip, suite="tls")
    if name == "raw-tls":
        return ServerSpec(name, "raw uvloop echo over TLS (ceiling of the uvloop servers)",
                          _py("fastws.bench.peers.raw_uvloop", *files), raw=True, skip=skip, suite="tls")
    peers = {
        "websockets-tls": ("websockets (broadcast), ssl=", "websockets_relay", (), ("websockets",)),
        "aiohttp-tls": ("aiohttp, ssl_context=", "aiohttp_relay", (), ("aiohttp",)),
        "picows-tls": ("picows, ssl=", "picows_relay", (), ("picows",)),
        "uvicorn-websockets-tls": ("uvicorn+starlette, websockets, --ssl-certfile", "starlette_relay",
                                   ("--ws", "websockets"), ("uvicorn", "starlette", "websockets")),
        "socketify-tls": ("socketify (uWebSockets), SSLApp", "socketify_relay", (), ("socketify",)),
    }
    label, module, extra, needs = peers[name]
    miss = _missing(*needs)
    if name == "socketify-tls" and miss:
        miss = "socketify is not installed (pip install socketify)"
    return ServerSpec(name, label, _py(f"fastws.bench.peers.{module}", *extra, *files), skip=skip or miss,
                      suite="tls")


#: ``--baseline DIR``: another fastws checkout (built in place) measured as
#: a peer in the same run, for before/after comparisons of a change.
BASELINE_DIR: str | None = None
BASELINE = ["base", "base-asgi", "base-redis", "base-embedded"]


def _baseline_spec(name: str) -> ServerSpec:
    """The fastws of ``--baseline DIR`` in one of the setups of this fastws:
    its own CLI (``cli/main.py``) and apps, imported from DIR first."""
    base = BASELINE_DIR
    if not base:
        return ServerSpec(name, name, lambda port: [], skip="give --baseline DIR (a fastws checkout, built in place)")
    cli = [sys.executable, "-c", f"import sys; sys.path.insert(0, {base!r}); from cli.main import main; main()"]
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [base, os.environ.get("PYTHONPATH")]))}
    skip = None if Path(base, "cli", "main.py").is_file() else f"{base} is no fastws checkout"
    limits = ["--host", HOST, "--max-message-size", str(16 * 1024 * 1024), "--log-level", "warning"]
    label = f"fastws at {base}"
    if name == "base":
        return ServerSpec(name, label, lambda port: [*cli, "serve", "examples.relay:app", *limits, "--port", str(port)],
                          env=env, cwd=base, skip=skip)
    if name == "base-asgi":
        return ServerSpec(name, label + " (ASGI)", lambda port: [*cli, "serve", ASGI_APP, "--interface", "asgi",
                                                                  *limits, "--port", str(port), "--ping-interval", "0"],
                          env=env, cwd=base, skip=skip or _missing("starlette"), asgi=True,
                          paths={"asgi-broadcast": ASGI_ROOMS_PATH})
    if name == "base-redis":
        argv = lambda port, channel: [*cli, "serve", "examples.relay:app", *limits, "--port", str(port),  # noqa: E731
                                      "--broker", REDIS_URL, "--broker-prefix", channel]
        return ServerSpec(name, label + f" x 2 nodes, --broker {REDIS_URL}", argv, env=env, cwd=base,
                          skip=skip or _redis_skip(), suite="crossnode", nodes=2)
    argv = lambda port, channel: [*cli, "serve", "examples.relay:app", *limits, "--port", str(port),  # noqa: E731
                                  "--workers", "2"]
    return ServerSpec(name, label + " --workers 2", argv, env=env, cwd=base, skip=skip, suite="crossnode", nodes=1,
                      workers=2, loadgen_args=["--metrics"])


NEEDS = {
    "websockets": ("websockets",), "aiohttp": ("aiohttp",), "picows": ("picows",),
    "uvicorn-websockets": ("uvicorn", "starlette", "websockets"),
    "uvicorn-wsproto": ("uvicorn", "starlette", "wsproto"),
    "uvicorn-websockets-asgi": ("uvicorn", "starlette", "websockets", "uvloop", "httptools"),
    "uvicorn-wsproto-asgi": ("uvicorn", "starlette", "wsproto", "uvloop", "httptools"),
    "hypercorn-asgi": ("starlette", "uvloop", "hypercorn"),
    "granian-asgi": ("starlette", "granian"),
}


def server_specs(wanted: list[str]) -> list[ServerSpec]:
    specs = []
    for name in wanted:
        if name == "fastws":
            specs.append(_fastws_spec())
        elif name == "raw":
            specs.append(ServerSpec("raw", "raw uvloop echo (ceiling)", _py("fastws.bench.peers.raw_uvloop"), raw=True))
        elif name == "raw-whole":
            specs.append(ServerSpec(name, "raw uvloop echo, whole frames (store-and-forward ceiling)",
                                    _py("fastws.bench.peers.raw_whole"), raw=True))
        elif name == "websockets":
            specs.append(ServerSpec(name, "websockets (broadcast)", _py("fastws.bench.peers.websockets_relay")))
        elif name == "aiohttp":
            specs.append(ServerSpec(name, "aiohttp", _py("fastws.bench.peers.aiohttp_relay")))
        elif name == "picows":
            specs.append(ServerSpec(name, "picows", _py("fastws.bench.peers.picows_relay")))
        elif name == "uvicorn-websockets":
            specs.append(ServerSpec(name, "uvicorn+starlette, websockets",
                                    _py("fastws.bench.peers.starlette_relay", "--ws", "websockets")))
        elif name == "uvicorn-wsproto":
            specs.append(ServerSpec(name, "uvicorn+starlette, wsproto",
                                    _py("fastws.bench.peers.starlette_relay", "--ws", "wsproto")))
        elif name == "socketify":
            skip = (None if importlib.util.find_spec("socketify")
                    else "socketify is not installed (pip install socketify)")
            specs.append(ServerSpec(name, "socketify (uWebSockets)", _py("fastws.bench.peers.socketify_relay"),
                                    skip=skip))
        elif name == "node-ws":
            skip, env = _node_env()
            js = str(PEERS_DIR / "ws_relay.js")
            specs.append(ServerSpec(name, "Node ws", lambda port, js=js: ["node", js, str(port), HOST],
                                    env=env, skip=skip))
        elif name == "fastws-asgi":
            specs.append(_fastws_asgi_spec())
        elif name in ASGI_PEERS:
            specs.append(_asgi_peer_spec(name))
        elif name in CROSSNODE:
            specs.append(_crossnode_spec(name))
        elif name in ("fastws-sio", *SIO, *SIO_CROSSNODE):
            specs.append(_sio_spec(name))
        elif name in ("fastws-deflate", *DEFLATE):
            specs.append(_deflate_spec(name))
        elif name in ("fastws-tls", *TLS):
            specs.append(_tls_spec(name))
        elif name in BASELINE:
            specs.append(_baseline_spec(name))
        else:
            raise click.BadParameter(f"unknown server {name!r}; known: {', '.join(ALL_SERVERS)}")
        if name in NEEDS and specs[-1].skip is None:
            specs[-1].skip = _missing(*NEEDS[name])
    return specs


ASGI_PEERS = ["uvicorn-websockets-asgi", "uvicorn-wsproto-asgi", "hypercorn-asgi", "granian-asgi"]
ALL_SERVERS = ["fastws", "raw", "raw-whole", "websockets", "aiohttp", "picows", "uvicorn-websockets",
               "uvicorn-wsproto", "node-ws", "socketify", *ASGI_PEERS, *CROSSNODE[1:], *SIO, SIO_CROSSNODE[1],
               *DEFLATE, *TLS, *BASELINE]


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class RunningServer:
    def __init__(self, spec: ServerSpec, logdir: Path) -> None:
        self.spec = spec
        self.logdir = logdir
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.starts = 0

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc else 0

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 30.0) -> None:
        self.stop()
        self.port = free_port()
        self.starts += 1
        with open(self.logdir / f"{self.spec.key}.{self.starts}.log", "wb") as log:
            self.proc = subprocess.Popen(
                self.spec.argv(self.port), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, **self.spec.env}, cwd=self.spec.cwd, start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.spec.name} exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                with socket.create_connection((HOST, self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.spec.name} did not listen on port {self.port} within {timeout:.0f}s")

    def loadgen_args(self) -> list[str]:
        return list(self.spec.loadgen_args)

    def log_tail(self, n: int = 3) -> str:
        try:
            lines = (self.logdir / f"{self.spec.key}.{self.starts}.log").read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return " | ".join(lines[-n:])

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(5)
        self.proc = None

    def wait_quiet(self, timeout: float = 3.0) -> None:
        """Until the server used < 2% of a core for 100 ms (bounded)."""
        if not self.alive():
            return
        hz = os.sysconf("SC_CLK_TCK")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            c0 = proc_cpu_ticks(self.pid)
            time.sleep(0.1)
            if proc_cpu_ticks(self.pid) - c0 <= max(1, hz // 100):
                return


def _worker_count(port: int) -> int:
    """Workers listed in fastws's GET /metrics (websocket_worker_connections), 0 if none."""
    try:
        with socket.create_connection((HOST, port), timeout=2) as sock:
            sock.sendall(f"GET /metrics HTTP/1.0\r\nHost: {HOST}:{port}\r\n\r\n".encode())
            body = b""
            while chunk := sock.recv(65536):
                body += chunk
    except OSError:
        return 0
    return body.count(b"\nwebsocket_worker_connections{")


class ServerGroup:
    """A server of the crossnode suite: ``spec.nodes`` processes (node A,
    node B) started and stopped together, all or none; each start gets a
    fresh Redis channel / broker prefix, so runs never share traffic."""

    def __init__(self, spec: ServerSpec, logdir: Path) -> None:
        self.spec = spec
        self.nodes = [RunningServer(spec, logdir) for _ in range(spec.nodes)]
        self.channel = ""

    @property
    def port(self) -> int:
        return self.nodes[0].port

    @property
    def pid(self) -> int:
        return self.nodes[0].pid

    def alive(self) -> bool:
        return all(n.alive() for n in self.nodes)

    def start(self, timeout: float = 30.0) -> None:
        self.stop()
        self.channel = f"fastws-bench-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            for i, node in enumerate(self.nodes):
                node.spec = dataclasses.replace(self.spec, key=f"{self.spec.key}-{'ab'[i]}",
                                                argv=functools.partial(self.spec.argv, channel=self.channel))
                node.start(timeout)
            if self.spec.workers:
                deadline = time.monotonic() + timeout
                while _worker_count(self.port) < self.spec.workers:
                    if time.monotonic() > deadline or not self.alive():
                        raise RuntimeError(f"{self.spec.key}: {self.spec.workers} workers not serving within "
                                           f"{timeout:.0f}s: {self.log_tail()}")
                    time.sleep(0.1)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()

    def log_tail(self, n: int = 3) -> str:
        if len(self.nodes) == 1:
            return self.nodes[0].log_tail(n)
        return " / ".join(f"node {'AB'[i]}: {node.log_tail(n)}" for i, node in enumerate(self.nodes))

    def wait_quiet(self, timeout: float = 3.0) -> None:
        for n in self.nodes:
            n.wait_quiet(timeout)

    def loadgen_args(self) -> list[str]:
        args = list(self.spec.loadgen_args)
        if len(self.nodes) > 1:
            b = self.nodes[-1]
            args += ["--port-b", str(b.port), "--server-pid-b", str(b.pid)]
        return args


# ---------------------------------------------------------------- scenarios


@dataclass
class Scenario:
    name: str
    kind: str  # the loadgen scenario
    title: str
    full: list[str]
    quick: list[str]
    higher_is_better: bool = True
    relay: bool = False  # needs the relay (not the raw ceiling)
    fresh: bool = False  # restart the server before each measurement
    timeout: float = 180.0
    asgi: bool = False  # served by the ASGI servers (fastws.bench.peers.asgi_apps) only
    path: str | None = None  # --path for the load generator (a server's own `paths` wins)
    suite: str = ""  # the servers it runs on (ServerSpec.suite): "ws", "asgi", "crossnode", "sio", "sio-crossnode"
    module: str = "fastws.bench.loadgen"  # the load generator (same command line, one JSON line on stdout)

    def __post_init__(self) -> None:
        if not self.suite:
            self.suite = "asgi" if self.asgi else "ws"

    def runs_on(self, spec: ServerSpec) -> bool:
        if self.suite not in spec.suite.split("|"):
            return False
        return not (self.relay and spec.raw)


SCENARIOS = [
    Scenario("echo", "echo", "Echo throughput, 64 conns x 16 in flight, 32 B text",
             ["--conns", "64", "--window", "16", "--size", "32", "--duration", "3"],
             ["--conns", "8", "--window", "4", "--size", "32", "--duration", "0.15", "--warmup", "0.05"]),
    Scenario("latency", "latency", "Ping-pong latency, 1 conn, 32 B text (p50; p99, p99.9 in JSON)",
             ["--size", "32", "--duration", "3", "--rounds", "30000"],
             ["--size", "32", "--duration", "1", "--rounds", "100", "--warmup-rounds", "10"],
             higher_is_better=False),
    # The publisher keeps W messages in flight (its own copies are the acks).
    # W = 32 is the headline (a feed publishes faster than one round trip per
    # few messages); W = 8 is kept so the effect of batching stays visible.
    Scenario("fanout-1k", "fanout", "Fan-out to 1,000 subscribers, 64 B binary, 32 in flight",
             ["--subscribers", "1000", "--size", "64", "--duration", "3", "--window", "32"],
             ["--subscribers", "50", "--size", "64", "--duration", "0.15"], relay=True),
    Scenario("fanout-10k", "fanout", "Fan-out to 10,000 subscribers, 64 B binary, 32 in flight",
             ["--subscribers", "10000", "--size", "64", "--duration", "3", "--window", "32"],
             ["--subscribers", "200", "--size", "64", "--duration", "0.15"], relay=True, timeout=300),
    Scenario("fanout-10k-w8", "fanout", "Fan-out to 10,000 subscribers, 64 B binary, 8 in flight",
             ["--subscribers", "10000", "--size", "64", "--duration", "3", "--window", "8"],
             ["--subscribers", "200", "--size", "64", "--duration", "0.15", "--window", "8"],
             relay=True, timeout=300),
    Scenario("fanout-latency", "fanout", "Fan-out latency at a fixed 20 msg/s to 1,000 subscribers, 10 s (p99)",
             ["--subscribers", "1000", "--size", "64", "--duration", "10", "--rate", "20"],
             ["--subscribers", "50", "--size", "64", "--duration", "0.15", "--rate", "40"],
             higher_is_better=False, relay=True),
    Scenario("memory", "memory", "Idle memory per upgraded connection, K = 10,000 (VmRSS delta / K)",
             ["--conns", "10000"], ["--conns", "200", "--settle", "0"],
             higher_is_better=False, fresh=True, timeout=300),
    Scenario("handshake", "handshake", "Handshake rate, 5,000 connections, 100 at a time",
             ["--conns", "5000", "--concurrency", "100"], ["--conns", "200", "--concurrency", "20"]),
    Scenario("large-64k", "large", "Large-message echo, 64 KiB binary, 1 conn, 1 in flight",
             ["--size", "65536", "--duration", "3"], ["--size", "65536", "--duration", "0.15", "--warmup", "0.05"]),
    Scenario("large-1m", "large", "Large-message echo, 1 MiB binary, 1 conn, 1 in flight",
             ["--size", "1048576", "--duration", "3"], ["--size", "1048576", "--duration", "0.15", "--warmup", "0.05"]),
    Scenario("large-64k-w2", "large", "Large-message echo, 64 KiB binary, 1 conn, 2 in flight",
             ["--size", "65536", "--window", "2", "--duration", "3"],
             ["--size", "65536", "--window", "2", "--duration", "0.15", "--warmup", "0.05"]),
    Scenario("large-1m-w2", "large", "Large-message echo, 1 MiB binary, 1 conn, 2 in flight",
             ["--size", "1048576", "--window", "2", "--duration", "3"],
             ["--size", "1048576", "--window", "2", "--duration", "0.15", "--warmup", "0.05"]),
    Scenario("asgi-echo", "echo", "ASGI (Starlette) echo, 64 conns x 16 in flight, 32 B text",
             ["--conns", "64", "--window", "16", "--size", "32", "--duration", "3"],
             ["--conns", "8", "--window", "4", "--size", "32", "--duration", "0.15", "--warmup", "0.05"],
             asgi=True, path="/echo"),
    Scenario("asgi-broadcast", "fanout",
             "ASGI (Starlette) broadcast to 1,000 subscribers, 64 B binary "
             "(fastws: asgi_rooms; others: ConnectionManager)",
             ["--subscribers", "1000", "--size", "64", "--duration", "3"],
             ["--subscribers", "50", "--size", "64", "--duration", "0.15"],
             relay=True, asgi=True, path=ASGI_MANAGER_PATH),
    Scenario("asgi-memory", "memory", "ASGI (Starlette) idle memory per upgraded connection, K = 10,000",
             ["--conns", "10000"], ["--conns", "200", "--settle", "0"],
             higher_is_better=False, fresh=True, timeout=300, asgi=True, path="/echo"),
    # Cross-node: subscribers half on node A, half on node B, the publisher on node A (its own copy
    # and one node-B subscriber's acknowledge: 8 in flight across both nodes); fresh nodes and a
    # fresh Redis channel/prefix for each measurement. fastws: plain WebSocket, 64-byte binary;
    # python-socketio: a text event 42["msg","<64 characters>"].
    Scenario("crossnode", "crossnode",
             "Cross-node fan-out via Redis, 2,000 subscribers on 2 nodes, 64 B",
             ["--subscribers", "2000", "--size", "64", "--duration", "3"],
             ["--subscribers", "40", "--size", "64", "--duration", "0.2"],
             relay=True, fresh=True, suite="crossnode", timeout=240),
    Scenario("crossnode-latency", "crossnode",
             "Cross-node latency via Redis, 5 msg/s to 2,000 subscribers on 2 nodes (p99)",
             ["--subscribers", "2000", "--size", "64", "--duration", "5", "--rate", "5"],
             ["--subscribers", "40", "--size", "64", "--duration", "0.2", "--rate", "40"],
             higher_is_better=False, relay=True, fresh=True, suite="crossnode", timeout=240),
]
# Socket.IO: the same relay on fastws.socketio, python-socketio and Node's socket.io, every client a
# raw Engine.IO v4 / Socket.IO v5 client on a WebSocket (no Socket.IO library on the client side);
# an event is 42["msg","<64 characters>"] (76 bytes on the wire), sent to the whole room.
SCENARIOS += [
    Scenario("sio-fanout-1k", "fanout", "Socket.IO fan-out to a room of 1,000, 64-character events, 32 in flight",
             ["--subscribers", "1000", "--size", "64", "--duration", "3", "--window", "32"],
             ["--subscribers", "50", "--size", "64", "--duration", "0.15"], relay=True, suite="sio", timeout=240),
    Scenario("sio-fanout-10k", "fanout", "Socket.IO fan-out to a room of 10,000, 64-character events, 32 in flight",
             ["--subscribers", "10000", "--size", "64", "--duration", "3", "--window", "32"],
             ["--subscribers", "200", "--size", "64", "--duration", "0.15"], relay=True, suite="sio", timeout=420),
    Scenario("sio-ackecho", "ackecho", "Socket.IO echo with ack, 64 conns x 16 in flight, 32 characters",
             ["--conns", "64", "--window", "16", "--size", "32", "--duration", "3"],
             ["--conns", "8", "--window", "4", "--size", "32", "--duration", "0.15", "--warmup", "0.05"],
             suite="sio", module="fastws.bench.sio"),
    Scenario("sio-memory", "memory", "Socket.IO idle memory per connection (namespace / joined), K = 10,000",
             ["--conns", "10000"], ["--conns", "200", "--settle", "0"], higher_is_better=False, fresh=True,
             timeout=300, suite="sio", module="fastws.bench.sio"),
    Scenario("sio-crossnode", "crossnode",
             "Socket.IO room across 2 nodes via Redis, 2,000 members, 64-character events",
             ["--subscribers", "2000", "--size", "64", "--duration", "3"],
             ["--subscribers", "40", "--size", "64", "--duration", "0.2"],
             relay=True, fresh=True, suite="sio-crossnode", timeout=300),
    Scenario("sio-crossnode-10k", "crossnode",
             "Socket.IO room across 2 nodes via Redis, 10,000 members, 64-character events",
             ["--subscribers", "10000", "--size", "64", "--duration", "3"],
             ["--subscribers", "100", "--size", "64", "--duration", "0.2"],
             relay=True, fresh=True, suite="sio-crossnode", timeout=420),
]
# permessage-deflate: the relay with compression on (fastws --compression, each peer with the
# extension: the "deflate" suite); 512-byte JSON ticks (~250 bytes compressed), every one different,
# sent compressed, inflated and checked byte for byte by the load generator (--deflate). Inflating
# and checking costs the load generator more than the plain relay's struct check: its subscribers are
# spread over 2 processes (--procs 2), so that fastws's compress-once broadcast is not capped by one.
SCENARIOS += [
    Scenario("deflate-echo", "echo", "Compressed echo (permessage-deflate), 64 conns x 16 in flight, 512 B JSON",
             ["--deflate", "--conns", "64", "--window", "16", "--size", "512", "--duration", "3"],
             ["--deflate", "--conns", "8", "--window", "4", "--size", "512", "--duration", "0.15", "--warmup", "0.05"],
             suite="deflate"),
    Scenario("deflate-fanout-1k", "fanout",
             "Compressed fan-out (permessage-deflate) to 1,000 subscribers, 512 B JSON, 32 in flight",
             ["--deflate", "--subscribers", "1000", "--size", "512", "--duration", "3", "--window", "32",
              "--procs", "2"],
             ["--deflate", "--subscribers", "50", "--size", "512", "--duration", "0.15", "--procs", "2"],
             relay=True, suite="deflate", timeout=300),
    Scenario("deflate-fanout-10k", "fanout",
             "Compressed fan-out (permessage-deflate) to 10,000 subscribers, 512 B JSON, 32 in flight",
             ["--deflate", "--subscribers", "10000", "--size", "512", "--duration", "3", "--window", "32",
              "--procs", "2"],
             ["--deflate", "--subscribers", "200", "--size", "512", "--duration", "0.15", "--procs", "2"],
             relay=True, suite="deflate", timeout=420),
]
DEFLATE_SCENARIOS = ("deflate-echo", "deflate-fanout-1k", "deflate-fanout-10k")
# TLS (wss://): the relay behind TLS on fastws (--ssl-certfile/--ssl-keyfile) and each peer that serves
# TLS (the "tls" suite), one self-signed ECDSA P-256 certificate per run, TLS 1.3 as negotiated. The
# load generator's clients are uvloop TLS transports (--tls): decrypting costs it more than the
# server's encrypting a broadcast once per subscriber does, so its echo, handshake and subscriber
# clients are spread over 2 processes (--procs 2); tls-handshake times a full TLS + WebSocket
# handshake per connection, tls-memory counts what a TLS connection holds in the server.
SCENARIOS += [
    Scenario("tls-echo", "echo", "TLS echo (wss://), 64 conns x 16 in flight, 32 B text",
             ["--tls", "--conns", "64", "--window", "16", "--size", "32", "--duration", "3", "--procs", "2"],
             ["--tls", "--conns", "8", "--window", "4", "--size", "32", "--duration", "0.15", "--warmup", "0.05",
              "--procs", "2"],
             suite="tls"),
    Scenario("tls-fanout-1k", "fanout", "TLS fan-out (wss://) to 1,000 subscribers, 64 B binary, 32 in flight",
             ["--tls", "--subscribers", "1000", "--size", "64", "--duration", "3", "--window", "32", "--procs", "2"],
             ["--tls", "--subscribers", "50", "--size", "64", "--duration", "0.15", "--procs", "2"],
             relay=True, suite="tls", timeout=300),
    Scenario("tls-fanout-10k", "fanout", "TLS fan-out (wss://) to 10,000 subscribers, 64 B binary, 32 in flight",
             ["--tls", "--subscribers", "10000", "--size", "64", "--duration", "3", "--window", "32", "--procs", "2"],
             ["--tls", "--subscribers", "200", "--size", "64", "--duration", "0.15", "--procs", "2"],
             relay=True, suite="tls", timeout=420),
    Scenario("tls-handshake", "handshake", "TLS + WebSocket handshake rate (wss://), 5,000 connections, 100 at a time",
             ["--tls", "--conns", "5000", "--concurrency", "100", "--procs", "2"],
             ["--tls", "--conns", "100", "--concurrency", "10", "--procs", "2"], suite="tls"),
    Scenario("tls-memory", "memory", "Idle memory per TLS connection (wss://), K = 10,000 (VmRSS delta / K)",
             ["--tls", "--conns", "10000"], ["--tls", "--conns", "200", "--settle", "0"],
             higher_is_better=False, fresh=True, suite="tls", timeout=300),
]
TLS_SCENARIOS = ("tls-echo", "tls-fanout-1k", "tls-fanout-10k", "tls-handshake", "tls-memory")
SCENARIO_NAMES = [s.name for s in SCENARIOS]
SUITES = list(dict.fromkeys(s.suite for s in SCENARIOS))  # ``--suite``: ws, asgi, crossnode, sio, ..., tls


def run_loadgen(sc: Scenario, server: RunningServer, quick: bool, seed: int) -> dict:
    argv = [sys.executable, "-m", sc.module, sc.kind, "--host", HOST, "--port", str(server.port),
            "--server-pid", str(server.pid), "--seed", str(seed), *(sc.quick if quick else sc.full)]
    if server.spec.raw:
        argv.append("--raw")
    path = server.spec.paths.get(sc.name, sc.path)
    if path:
        argv += ["--path", path]
    argv += server.loadgen_args()
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=sc.timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return {"ok": False, "value": None, "first_errors": [f"load generator timed out after {sc.timeout:.0f}s"]}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        err = (p.stderr.strip().splitlines() or ["no output"])[-1]
        return {"ok": False, "value": None, "first_errors": [f"load generator failed: {err}"]}
    return json.loads(lines[-1])


# ------------------------------------------------------------------ records


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(specs: list[ServerSpec]) -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    versions = {d: _version(d) for d in (
        "fastws", "uvloop", "websockets", "aiohttp", "picows", "wsproto", "uvicorn", "starlette",
        "socketify", "httptools", "click", "matplotlib", "Cython", "hypercorn", "granian", "h11",
        "python-socketio", "python-engineio", "redis", "hiredis")}
    if any("crossnode" in s.suite and not s.skip for s in specs):
        versions["redis-server"] = _redis_version()
    node = next((s for s in specs if s.name == "node-ws"), None)
    if shutil.which("node"):
        try:
            versions["node"] = subprocess.run(["node", "--version"], capture_output=True, text=True,
                                              timeout=10).stdout.strip()
            if node and not node.skip:
                versions["ws (npm)"] = subprocess.run(
                    ["node", "-e", "console.log(require('ws/package.json').version)"], capture_output=True, text=True,
                    timeout=10, env={**os.environ, **node.env}).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            pass
    implementation = core.IMPLEMENTATION
    # fastws's own version and commit, from the package (never the git
    # repository that happens to contain the installed package)
    build = build_info()
    commit = build["commit"] or "unknown (not built from a git checkout)"
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "commit": commit,
        "version": build["version"],
        "build_commit": build["build_commit"],
        "implementation": implementation,
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_bytes": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_at_start": load,
        "versions": versions,
    }


def summarize(runs: list[dict]) -> dict | None:
    vals = [r["value"] for r in runs if r.get("ok") and isinstance(r.get("value"), (int, float))]
    if not vals:
        return {"n": 0, "ok": all(r.get("ok") for r in runs), "median": None, "min": None, "max": None}
    return {
        "n": len(vals),
        "ok": all(r.get("ok") for r in runs),
        "median": statistics.median(vals),
        "min": min(vals),
        "max": max(vals),
        "unit": next((r.get("unit") for r in runs if r.get("unit")), None),
    }


def fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and abs(v) < 1000:
        return f"{v:,.1f}" if abs(v) >= 10 else f"{v:,.2f}"
    return f"{v:,.0f}"


def _compressed_percent(r: dict) -> float:
    """deflate-*: the share of the messages received that came compressed (RSV1)."""
    return 100 * r.get("received_compressed", 0) / (r.get("echoed_total") or r.get("deliveries") or 1)


def markdown(results: dict) -> str:
    env = results["environment"]
    out = [
        f"Run {results['started']} - {results['finished']} ({'quick' if results['quick'] else 'full'}), "
        f"repeat {results['repeat']}, seed {results['seed']}",
        f"CPU {env['cpu']} x {env['cores']}, Python {env['python']}, kernel {env['kernel']}, "
        f"fastws {env.get('version', '?')} commit {env['commit']}, engine {env['implementation']}",
        "",
        *(["QUICK smoke run: tiny sizes (see the args in the JSON), numbers not comparable.", ""]
          if results["quick"] else []),
        "| scenario | server | median | min | max | unit | ratio to fastws | runs ok |",
        "|---|---|---:|---:|---:|---|---:|---|",
    ]
    for sc in results["scenarios"].values():
        fast = sc["summary"].get("fastws", {}).get("median")
        for name, s in sc["summary"].items():
            ratio = "-"
            if fast and s.get("median") is not None and name != "fastws":
                ratio = f"{s['median'] / fast:.2f}"
            elif name == "fastws" and fast:
                ratio = "1.00"
            ok = f"{s['n']}/{len(sc['runs'][name])}" + ("" if s["ok"] else " FAILED")
            out.append(f"| {sc['name']} | {name} | {fmt(s.get('median'))} | {fmt(s.get('min'))} | "
                       f"{fmt(s.get('max'))} | {s.get('unit') or ''} | {ratio} | {ok} |")
    hs = results["scenarios"].get("handshake")
    if hs:
        # the rate is bounded by the load generator (one process, about one
        # core) for the fastest servers; the server's own CPU per upgrade says
        # how much each server needs, whoever is the bottleneck
        out += ["", "handshake: server CPU per upgraded connection (median over repeats, µs; "
                "load generator CPU in cores):", "", "| server | server µs/connection | load generator cores |",
                "|---|---:|---:|"]
        for name, runs in hs["runs"].items():
            good = [r for r in runs if r.get("ok") and r.get("value") and r.get("server_cpu") is not None]
            if good:
                out.append(f"| {name} | {fmt(statistics.median(r['server_cpu'] / r['value'] * 1e6 for r in good))} | "
                           f"{fmt(statistics.median(r.get('client_cpu', 0) for r in good))} |")
    lat = results["scenarios"].get("latency")
    if lat:
        out += ["", "Latency percentiles (median over repeats, µs):", "",
                "| server | p50 | p99 | p99.9 |", "|---|---:|---:|---:|"]
        for name, runs in lat["runs"].items():
            good = [r for r in runs if r.get("ok")]
            if good:
                med = lambda k: statistics.median(r[k] for r in good)  # noqa: E731, B023 (used in this iteration)
                out.append(f"| {name} | {fmt(med('p50_us'))} | {fmt(med('p99_us'))} | {fmt(med('p999_us'))} |")
    for key in ("fanout-latency", "fanout-1k", "fanout-10k", "fanout-10k-w8", "sio-fanout-1k", "sio-fanout-10k",
                "deflate-fanout-1k", "deflate-fanout-10k", "tls-fanout-1k", "tls-fanout-10k"):
        fo = results["scenarios"].get(key)
        if fo:
            how = "at a fixed rate" if key == "fanout-latency" else "while saturated (queueing included)"
            out += ["", f"{key}: publish-to-receive latency {how} (median over repeats, µs):", "",
                    "| server | p50 | p99 |", "|---|---:|---:|"]
            for name, runs in fo["runs"].items():
                good = [r for r in runs if r.get("ok")]
                if good:
                    out.append(f"| {name} | {fmt(statistics.median(r['p50_us'] for r in good))} | "
                               f"{fmt(statistics.median(r['p99_us'] for r in good))} |")
    for key in ("crossnode", "crossnode-latency", "sio-crossnode", "sio-crossnode-10k"):
        cn = results["scenarios"].get(key)
        if cn:
            how = "at a fixed rate" if key == "crossnode-latency" else "while saturated (8 in flight)"
            out += ["", f"{key}: publish-to-receive latency {how} (median over repeats, µs; node A holds the "
                    "publisher, node B gets every message through the broker); subscribers per worker:", "",
                    "| server | p50 | p99 | p99 node A | p99 node B | deliveries/s | subscribers per worker |",
                    "|---|---:|---:|---:|---:|---:|---|"]
            for name, runs in cn["runs"].items():
                good = [r for r in runs if r.get("ok")]
                if not good:
                    continue
                # (med and node are called within this iteration: B023 does not apply)
                med = lambda f: fmt(statistics.median(f(r) for r in good))  # noqa: E731, B023
                two = all(len(set(r.get("nodes", []))) == 2 for r in good)  # 2 nodes (not one --workers port)
                node = (lambda i: med(lambda r: r["latency_by_node"][i]["p99_us"])) if two else (lambda i: "-")  # noqa: B023
                workers = good[-1].get("worker_connections")
                per_worker = ", ".join(f"{w}: {n:,}" for w, n in sorted(workers.items())) if workers else "-"
                out.append(f"| {name} | {med(lambda r: r['p50_us'])} | {med(lambda r: r['p99_us'])} | {node(0)} | "
                           f"{node(1)} | {med(lambda r: r['deliveries_per_s'])} | {per_worker} |")
    # permessage-deflate and TLS: the server's CPU per unit says what each server needs whoever is the
    # bottleneck; the load generator's CPU (cores: all its processes) says when it is the limit
    for key in DEFLATE_SCENARIOS:
        if key in results["scenarios"]:
            out += _cpu_table(results["scenarios"][key], fmt, "message",
                              f"{key}: server CPU per message, load generator CPU (median over repeats), "
                              "permessage-deflate as the server answered:",
                              "| compressed | negotiated |", "---:|---|",
                              lambda good, med: f"{med(_compressed_percent)}% | {good[-1].get('deflate')} |")
    for key in TLS_SCENARIOS[:4]:
        if key in results["scenarios"]:
            unit = "connection" if key == "tls-handshake" else "delivery" if "fanout" in key else "message"
            out += _cpu_table(results["scenarios"][key], fmt, unit,
                              f"{key}: server CPU per {unit}, load generator CPU (median over repeats), "
                              "TLS as negotiated:", "| TLS |", "---|",
                              lambda good, med: "{version} {cipher} |".format_map(
                                  {"version": None, "cipher": None, **(good[-1].get("tls") or {})}))
    if results["skipped"]:
        out += ["", "Not measured:"] + [f"- {k}: {v}" for k, v in results["skipped"].items()]
    return "\n".join(out) + "\n"


def _cpu_table(scenario: dict, fmt, unit: str, title: str, extra_head: str, extra_rule: str, extra) -> list[str]:
    """A markdown table of server cores, server µs per ``unit`` and load generator cores per server
    (medians over its good runs), plus the columns ``extra(good_runs, med)`` gives."""
    out = ["", title, "", f"| server | server cores | server µs/{unit} | load generator cores {extra_head}",
           f"|---|---:|---:|---:|{extra_rule}"]
    for name, runs in scenario["runs"].items():
        good = [r for r in runs if r.get("ok") and r.get("value") and r.get("server_cpu") is not None]
        if not good:
            continue
        med = lambda f: fmt(statistics.median(f(r) for r in good))  # noqa: E731, B023 (used in this iteration)
        out.append(f"| {name} | {med(lambda r: r['server_cpu'])} | "
                   f"{med(lambda r: r['server_cpu'] / r['value'] * 1e6)} | "
                   f"{med(lambda r: r.get('client_cpu', 0) + sum(r.get('subscriber_procs_cpu', [])))} | "
                   + extra(good, med))
    return out


def charts(results: dict, out_dir: Path, stem: str) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        click.echo("matplotlib is not installed: no charts (pip install matplotlib)", err=True)
        return []
    files = []
    for sc in results["scenarios"].values():
        rows = [(n, s) for n, s in sc["summary"].items() if s.get("median") is not None]
        if not rows:
            continue
        rows.sort(key=lambda r: r[1]["median"], reverse=not sc["higher_is_better"])
        names = [n for n, _ in rows]
        med = [s["median"] for _, s in rows]
        lo = [s["median"] - s["min"] for _, s in rows]
        hi = [s["max"] - s["median"] for _, s in rows]
        colors = ["#d62728" if n == "fastws" else "#7f7f7f" if n == "raw" else "#1f77b4" for n in names]
        fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.3))
        ax.barh(names, med, xerr=[lo, hi], color=colors, capsize=3)
        for i, (_, st) in enumerate(rows):
            ax.text(st["max"], i, "  " + fmt(st["median"]), va="center", fontsize=8)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: fmt(x)))
        unit = rows[0][1].get("unit") or ""
        better = "higher is better" if sc["higher_is_better"] else "lower is better"
        ax.set_xlabel(f"{unit} ({better}; bars: median, whiskers: min-max)")
        ax.set_title(sc["title"], fontsize=10)
        ax.margins(x=0.22)
        fig.tight_layout()
        path = out_dir / f"{stem}-{sc['name']}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)
    return files


# ------------------------------------------------------------------- runner


FASTWS_SETUPS = ("fastws", "fastws-asgi", "fastws-redis", "fastws-embedded", "fastws-sio", "fastws-sio-redis",
                 "fastws-deflate", "fastws-tls")


def unavailable(specs: list[ServerSpec], asked: set[str], chosen: list) -> list[str]:
    """One line per server the run was asked to measure that cannot start
    here: every fastws setup a chosen scenario runs on, and every peer named
    in ``asked`` (``--vs a,b``; with ``--vs all`` a missing peer is skipped
    and listed under "Not measured")."""
    lines = []
    for s in specs:
        if not s.skip or not any(sc.runs_on(s) for sc in chosen):
            continue
        if s.key in FASTWS_SETUPS or s.name == "fastws" or s.key in asked:
            lines.append(f"fastws bench: cannot measure {s.key}: {s.skip}")
    return lines


def run(vs: list[str], scenarios: list[str], repeat: int, quick: bool, out: Path | None, seed: int,
        asked: set[str] | None = None) -> int:
    """Run the ``scenarios`` against fastws and the peers ``vs``; 0 when
    every run passed.  A server the run was asked to measure that cannot
    start here (see :func:`unavailable`; ``asked``: the peers named
    explicitly) makes it exit 2 at once with one line naming it and why."""
    names = ["fastws"] + [n for n in vs if n not in ("fastws", "fastws-asgi", "fastws-redis", "fastws-sio",
                                                       "fastws-sio-redis", "fastws-deflate", "fastws-tls")]
    suites = {s.suite for s in SCENARIOS if s.name in scenarios}
    if "asgi" in suites:
        names.insert(1, "fastws-asgi")  # the same engine serving the ASGI app (reported as "fastws")
    if "crossnode" in suites:
        names.insert(1, "fastws-redis")  # the relay on 2 nodes through Redis (reported as "fastws")
    if "sio" in suites:
        names.insert(1, "fastws-sio")  # the Socket.IO relay on fastws.socketio (reported as "fastws")
    if "sio-crossnode" in suites:
        names.insert(1, "fastws-sio-redis")  # ... on 2 nodes through Redis (reported as "fastws")
    if "deflate" in suites:
        names.insert(1, "fastws-deflate")  # the relay with --compression (reported as "fastws")
    global TLS_DIR, TLS_SKIP
    TLS_DIR, TLS_SKIP = None, None
    if "tls" in suites:
        names.insert(1, "fastws-tls")  # the relay serving wss:// (reported as "fastws")
        TLS_DIR = Path(tempfile.mkdtemp(prefix="fastws-bench-tls-"))  # one self-signed certificate per run
        TLS_SKIP = make_cert(TLS_DIR)
    try:
        return _run(names, scenarios, repeat, quick, out, seed, asked)
    finally:
        if TLS_DIR is not None:
            shutil.rmtree(TLS_DIR, ignore_errors=True)
            TLS_DIR = None


def _run(names: list[str], scenarios: list[str], repeat: int, quick: bool, out: Path | None, seed: int,
         asked: set[str] | None) -> int:
    specs = server_specs(names)
    skipped = {}
    for s in specs:
        if s.skip:
            click.echo(f"skip {s.key}: {s.skip}", err=True)
            skipped[s.key] = s.skip
    chosen = [s for s in SCENARIOS if s.name in scenarios]
    missing = unavailable(specs, set(asked or ()), chosen)
    if missing:
        for line in missing:
            click.echo(line, err=True)
        return 2
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    env = environment(specs)
    logdir = Path(tempfile.mkdtemp(prefix="fastws-bench-logs-"))
    servers = {s.key: (ServerGroup if s.nodes else RunningServer)(s, logdir) for s in specs if not s.skip}
    results = {
        "fastws_bench": 1, "started": started, "finished": None, "quick": quick, "repeat": repeat,
        "seed": seed, "command": sys.argv, "environment": env, "host": HOST, "skipped": skipped,
        "server_logs": str(logdir), "scenarios": {},
    }
    total = sum(repeat * sum(1 for n in servers if sc.runs_on(servers[n].spec)) for sc in chosen)
    done = 0
    failures = []
    t_start = time.monotonic()
    used = sum(1 for srv in servers.values() if any(sc.runs_on(srv.spec) for sc in chosen))
    click.echo(f"fastws bench: {len(chosen)} scenarios x {used} servers x {repeat} repeats "
               f"= {total} runs; server logs in {logdir}", err=True)
    try:
        for sc in chosen:
            entry = results["scenarios"][sc.name] = {
                "name": sc.name, "title": sc.title, "loadgen": sc.kind,
                "args": sc.quick if quick else sc.full, "higher_is_better": sc.higher_is_better,
                "runs": {}, "summary": {},
                "servers": {servers[n].spec.name: {"label": servers[n].spec.label,
                                                   "path": servers[n].spec.paths.get(sc.name, sc.path)}
                            for n in servers if sc.runs_on(servers[n].spec)},
            }
            order = [n for n in servers if sc.runs_on(servers[n].spec)]
            for rep in range(repeat):
                k = rep % len(order) if order else 0
                for key in order[k:] + order[:k]:
                    srv = servers[key]
                    name = srv.spec.name
                    done += 1
                    res = None
                    try:
                        if (sc.fresh and not quick) or not srv.alive():
                            srv.start()
                    except RuntimeError as e:
                        res = {"ok": False, "value": None, "first_errors": [str(e)]}
                    if res is None:
                        load = os.getloadavg()[0]
                        res = run_loadgen(sc, srv, quick, seed)
                        res["loadavg_1min"] = load
                        if not srv.alive():
                            res["ok"] = False
                            res.setdefault("first_errors", []).append(f"server died: {srv.log_tail()}")
                    res["repeat"] = rep
                    entry["runs"].setdefault(name, []).append(res)
                    status = "ok" if res.get("ok") else "FAILED " + "; ".join(res.get("first_errors", [])[:2])
                    if not res.get("ok"):
                        failures.append(f"{sc.name}/{name}: {status}")
                    click.echo(f"[{done:>3}/{total}] {time.monotonic() - t_start:6.1f}s  {sc.name:<14} "
                               f"{name:<23} rep {rep + 1}/{repeat}  {fmt(res.get('value')):>12} "
                               f"{res.get('unit') or '':<14} {status}", err=True)
                    if not quick:
                        srv.wait_quiet()
            for name, runs in entry["runs"].items():
                entry["summary"][name] = summarize(runs)
    finally:
        for srv in servers.values():
            srv.stop()
    results["finished"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    if out is None:
        out = Path(tempfile.mkdtemp(prefix="fastws-bench-")) if quick else default_out()
    out.mkdir(parents=True, exist_ok=True)
    stem = ("quick-" if quick else "") + _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    (out / f"{stem}.json").write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    table = markdown(results)
    (out / f"{stem}.md").write_text(table)
    pngs = charts(results, out, stem)
    click.echo("")
    click.echo(table)
    click.echo(f"results: {out / (stem + '.json')}, table: {out / (stem + '.md')}, charts: {len(pngs)} PNG in {out}")
    if failures:
        click.echo(f"{len(failures)} run(s) failed:", err=True)
        for f in failures:
            click.echo("  " + f, err=True)
        return 1
    return 0


def default_out() -> Path:
    """bench/results in the repo, else ./fastws-bench-results."""
    if Path("bench/README.md").is_file() or Path("bench/results").is_dir():
        return Path("bench/results")
    return Path("fastws-bench-results")


def _split(value: str | None, known: list[str], what: str) -> list[str]:
    if not value or value == "all":
        return list(known)
    items = [v.strip() for v in value.split(",") if v.strip()]
    for v in items:
        if v not in known:
            raise click.BadParameter(f"unknown {what} {v!r}; known: {', '.join(known)}")
    return items


@click.command("bench")
@click.option("--vs", "vs", default="all", show_default=True,
              help=f"comma-separated peers to compare with fastws: {', '.join(ALL_SERVERS[1:])}")
@click.option("--scenario", "scenario", default="all", show_default=True,
              help=f"comma-separated scenarios: {', '.join(SCENARIO_NAMES)}")
@click.option("--suite", "suite", default=None, type=click.Choice(SUITES),
              help="only the scenarios of this suite (with --scenario: those of them in it), e.g. "
                   "--suite tls: every tls-* scenario (wss://)")
@click.option("--repeat", default=3, show_default=True, type=click.IntRange(1, 50))
@click.option("--quick", is_flag=True, help="smoke run (< 1 min): tiny sizes, 1 repeat, asserts correctness only")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="results directory (default: bench/results in the repo, else ./fastws-bench-results)")
@click.option("--seed", default=1, show_default=True, type=int, help="seed of message contents and masks")
@click.option("--list", "list_", is_flag=True, help="list servers and scenarios, then exit")
@click.option("--redis-url", default=REDIS_URL, show_default=True, envvar="FASTWS_BENCH_REDIS",
              callback=lambda ctx, param, value: redis_url_option(value),
              help="Redis of the cross-node scenarios (a loopback host; keys and channels carry a "
                   "per-run prefix); env FASTWS_BENCH_REDIS")
@click.option("--clients", is_flag=True,
              help="compare the Python clients instead (fastws.client, websockets, picows, aiohttp and two "
                   "raw-socket ceilings: echo msg/s and CPU per message against one fastws server; with "
                   "--redis-url the room client's resume cost and a live message's latency, Streams vs pub/sub)")
@click.option("--baseline", "baseline", default=None, type=click.Path(file_okay=False, exists=True),
              help="another fastws checkout, built in place: measured as the peers base, base-asgi, "
                   "base-redis and base-embedded (--vs base,...) for a before/after comparison in one run")
@click.option("--gateway", "gateway", is_flag=True,
              help="gateway mode instead: message -> backend -> reply round trips/s, p99 and CPU per event over "
                   "Redis Streams (--redis-url) and HTTP, against the same app in process and on python-socketio")
def bench_command(vs, scenario, suite, repeat, quick, out, seed, list_, redis_url, baseline, clients, gateway):
    """Benchmark fastws against its peers with a neutral load generator."""
    global REDIS_URL, BASELINE_DIR
    REDIS_URL = redis_url
    BASELINE_DIR = str(Path(baseline).resolve()) if baseline else None
    if gateway:
        sys.exit(gateway_bench.run(redis_url=redis_url or "redis://127.0.0.1:6379/0", out=out, quick=quick,
                                   repeat=repeat))
    if clients:
        client_bench.run(repeat=repeat, n=2000 if quick else 20000, redis_url=redis_url or None,
                         missed=100 if quick else 1000, out=out, live_n=200 if quick else 2000)
        return
    if list_:
        click.echo("servers: " + ", ".join(ALL_SERVERS))
        for s in SCENARIOS:
            click.echo(f"  {s.name:<14} {s.title}")
        return
    if quick and repeat == 3:
        repeat = 1
    peers = _split(vs, ALL_SERVERS, "server")
    asked = set() if not vs or vs == "all" else set(peers)
    if not asked and not BASELINE_DIR:
        peers = [p for p in peers if p not in BASELINE]   # "all" means the baseline only when one is given
    chosen = _split(scenario, SCENARIO_NAMES, "scenario")
    if suite:
        chosen = [n for n in chosen if next(s for s in SCENARIOS if s.name == n).suite == suite]
        if not chosen:
            raise click.BadParameter(f"no scenario of --scenario {scenario!r} is in suite {suite!r}")
    code = run(peers, chosen, repeat, quick, out, seed, asked)
    sys.exit(code)


def main(argv=None) -> None:
    bench_command.main(args=argv, prog_name="python -m fastws.bench")


if __name__ == "__main__":
    main()
